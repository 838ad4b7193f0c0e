//! `boot`: starting guests. May use `arch`, `mm`, `vdev` and `vm`; never
//! `console`.
//!
//! Owns the hypervisor's boot arguments (`bootargs`), the arm64 Image loader
//! (`loader`), Linux's boot protocol and initramfs placement (`linux`), the
//! guest device tree (`guest_dtb`) and independent VMs: the default ones and
//! `create` (`create`).

pub mod bootargs;
pub mod create;
pub mod guest_dtb;
pub mod linux;
pub mod loader;
