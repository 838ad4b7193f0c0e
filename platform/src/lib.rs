//! QEMU `virt` platform description found in the DTB, and the ABI the
//! hypervisor offers its guests. `no_std`, tested on the host.
#![cfg_attr(not(test), no_std)]

pub mod abi;
