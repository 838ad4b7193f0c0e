//! The anon_vma reverse map of Linux, applied to virtual machines.
//!
//! See `README.md` for the design, the lock order and how each seed lesson is honoured.
#![no_std]
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(missing_docs)]

extern crate alloc;

pub mod lock;
pub use lock::lockdep;
