//! The memory vocabulary every layer of the hypervisor shares, at the bottom of the stack
//! (`stage2`, `rmap` and `hyp` build on it; it builds on nothing).
//!
//! - [`Ipa`], [`Pa`] and [`Pfn`]: typed addresses. Each is a `u64` underneath, but they do not
//!   convert into one another except where that means something ([`Pa::pfn`], [`Pfn::pa`]),
//!   so `map(ipa, pa, len)` called with the two swapped does not compile. The raw value is
//!   reached with `new`/`raw`, at the hardware boundary only (ESR/FAR/HPFAR, system
//!   registers, descriptors, the device tree).
//! - [`PageState`]: the one enum for what a stage-2 slot says about a guest page, shared by
//!   the reverse map (which decides the changes), the stage-2 table (which encodes the
//!   non-valid states in invalid descriptors) and the hypervisor (which converts between
//!   the two). Its transitions are listed once, in the [`state`] module, and checked by
//!   [`PageState::check_transition`] where they happen.
#![no_std]

pub mod addr;
pub mod state;

pub use addr::{Ipa, Pa, Pfn, PAGE_SHIFT, PAGE_SIZE};
pub use state::{BadTransition, PageState, Transition};
