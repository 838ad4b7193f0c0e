//! QEMU `virt` platform: what the DTB says the board has, the register maps of
//! its devices (PL011, GICv3), and the ABI the hypervisor offers its guests.
//! `no_std`, tested on the host with a DTB dumped from QEMU.
#![deny(
    missing_docs,
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks
)]
#![cfg_attr(not(test), no_std)]

pub mod abi;
pub mod board;
pub mod gicv3;
pub mod pl011;

pub use board::{Board, BoardError, MemRange, VirtioMmio};
