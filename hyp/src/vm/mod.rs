//! `vm`: virtual machines and their vCPUs. May use `arch`, `mm` and `vdev`;
//! never `boot` or `console`.
//!
//! Owns the VM table and lifecycle (`machine`), vCPU state and the world
//! switch around it (`vcpu`), the scheduler (`sched`), exit decoding (`exit`),
//! the abort path that sends RAM faults to `mm` and device accesses to `vdev`
//! (`abort`), hypercalls and PSCI (`hypercall`), and the VM half of fork,
//! snapshot and restore (`fork`: quiesce, clone vCPUs and devices, resume).

pub mod abort;
pub mod devices;
pub mod exit;
pub mod fork;
pub mod hypercall;
mod machine;
pub mod sched;
pub mod vcpu;

pub use machine::*;
