//! `dev`: the devices the hypervisor itself drives, never a guest: the
//! virtio-mmio transports the host DTB lists (`virtio`), the `virtio-drivers`
//! HAL over the frame allocator (`hal`), the control channel, a
//! virtio-console port polled by CPU 0 (`control`, issue 19), and the disk,
//! a virtio-blk device for the hypervisor's own storage (`blk`, issue 17).
//! May use `arch` and `mm`; never `vdev`, `vm`, `boot` or `console`.
//!
//! Guests never see these devices: the guest DTB (`boot::guest_dtb`) lists
//! only the emulated ones, and a guest's stage 2 maps only its RAM, so a guest
//! access to a virtio-mmio window is an unmapped IPA (`vm::abort`: an injected
//! external abort).

pub mod blk;
mod blkerr;
pub mod control;
pub mod hal;
pub mod virtio;
