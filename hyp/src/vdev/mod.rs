//! `vdev`: the emulated devices a guest sees — the GICv3 distributor and
//! redistributors with list registers (`vgic`), the virtual timer (`vtimer`)
//! and the PL011 UART (`vpl011`). May use `arch` and `mm`; never `vm`,
//! `boot` or `console`: what a device needs of a vCPU or VM comes in through
//! the narrow types and traits defined here.

pub mod vgic;
pub mod vpl011;
pub mod vtimer;
pub mod wire;
