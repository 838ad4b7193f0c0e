//! AArch64 stage-2 translation tables (4 KiB granule) for the EL2 microhypervisor.
//!
//! This crate owns everything about a VM's stage-2 tables: the descriptor format
//! ([`descriptor`]), the `VTCR_EL2`/`VTTBR_EL2` values ([`config`]), software entries kept in
//! invalid descriptors ([`software`]), the table operations with break-before-make
//! ([`Stage2Table`]), a visitor walker ([`walk`]), TLB maintenance behind a trait ([`tlb`]) and
//! the VMID generation allocator ([`vmid`]).
//! It knows nothing of the machine beyond two traits: [`TableMemory`] (where table pages come
//! from, and how a table's physical address becomes a reference) and [`TlbMaintenance`].
//!
//! # Concurrency contract
//!
//! Every method takes `&self`; descriptors are `AtomicU64`s and every change to a descriptor that
//! may be live is a compare-and-swap, so a concurrent hardware Access-flag/dirty update or a
//! lockless updater on another CPU is never lost. What the *caller* must hold:
//!
//! | operation | caller must hold |
//! |---|---|
//! | [`Stage2Table::map`], [`Stage2Table::map_pages`], [`Stage2Table::unmap`], [`Stage2Table::protect`], [`Stage2Table::split_block`], [`Stage2Table::set_software`] | the VM's stage-2 lock |
//! | [`Stage2Table::compare_exchange_leaf`] with `expected` == [`Descriptor::EMPTY`] | the VM's stage-2 lock (filling a hole is a structural change: `map` and `unmap` count on empty slots staying empty while they hold the lock) |
//! | [`Stage2Table::compare_exchange_leaf`] with a non-empty `expected`, [`Stage2Table::lookup`], [`Stage2Table::walk`], [`Stage2Table::test_and_clear_young`], [`Stage2Table::mkyoung`] | only *table lifetime*: no concurrent `unmap` or `destroy` (the only operations that free table pages). In the hypervisor that is the VM's region-list lock held for read, `unmap`/`destroy` being called with it held for write; the stage-2 lock also suffices |
//! | [`Stage2Table::set_vmid`] | the VM's stage-2 lock, and the VM not running on any CPU |
//! | [`Stage2Table::destroy`] | exclusive ownership (by value), and the VM already unlinked from the reverse map (DESIGN lesson 5) |
//!
//! The transient [`Descriptor::LOCKED`] token is what a break-before-make puts in a slot between the
//! "break" and the "make". Whoever holds a slot `Locked` must not take any lock before releasing
//! it: structural operations that meet a `Locked` slot spin until it changes.
//!
//! # TLB maintenance
//!
//! Every change to a *valid* descriptor (other than setting the Access flag, which faulting
//! entries are never cached for, and other than [`Stage2Table::test_and_clear_young`], see its
//! docs) is followed by TLB invalidation of that VMID before the operation returns: per IPA for a
//! few entries, one VMID-wide invalidation for many. Inside a [`Batch`] the final invalidation is
//! deferred to one `invalidate_vmid` when the batch ends; the "break" invalidation of a
//! break-before-make and the invalidation before table pages are freed are never deferred.
//! I-cache maintenance is done before an executable mapping of a frame becomes visible.
//!
//! # Cache maintenance to the point of coherency
//!
//! Mapping never cleans data caches: a frame the hypervisor writes (zeroes, copies, loads) owes
//! one clean to the point of coherency before any guest may map it, done by its writer with
//! [`publish_frames`] ([`TlbMaintenance::clean_dcache_poc`]), unless the configuration uses
//! FEAT_S2FWB ([`S2Config::with_fwb`], leaves then force Write-Back so no guest access is
//! non-cacheable). Table pages need none: walks are cacheable (`VTCR_EL2.IRGN0/ORGN0`).
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![no_std]
#![deny(missing_docs)]

#[cfg(any(test, feature = "host"))]
extern crate std;

pub mod config;
pub mod descriptor;
mod flush;
#[cfg(any(test, feature = "host"))]
pub mod host;
mod leaf;
pub mod memory;
mod ops;
pub mod software;
pub mod stats;
pub mod sync;
pub mod table;
pub mod tlb;
pub mod vmid;
pub mod walk;

pub use config::{fwb_supported, AttrEncoding, S2Config, VmidBits, Vttbr, HCR_EL2_FWB};
pub use descriptor::{Descriptor, DescriptorKind, MemType, Perm, S2Attrs};
#[cfg(any(test, feature = "host"))]
pub use host::{HostMemory, RecordingTlb, TlbCall};
pub use memory::TableMemory;
pub use stats::Stats;
pub use table::{CasError, Leaf, LeafInfo, Mapping, Stage2Table};
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub use tlb::aarch64::Aarch64Tlb;
pub use tlb::{publish_frames, Batch, Flusher, TlbMaintenance};
pub use vmid::{Vmid, VmidAllocator};
// The typed addresses and page states this crate's API speaks, re-exported for its users.
pub use mmtypes::{Ipa, Pa, PageState, Pfn};
pub use walk::{Visitor, WalkAction};

/// Size of a page (the translation granule) in bytes.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
/// Number of descriptors in one table page.
pub const ENTRIES_PER_TABLE: usize = 512;
/// The deepest (page) level of a 4 KiB-granule walk.
pub const LAST_LEVEL: u8 = 3;

/// Bytes mapped by one descriptor at `level` (0..=3): 512 GiB, 1 GiB, 2 MiB, 4 KiB.
pub const fn level_size(level: u8) -> u64 {
    1u64 << level_shift(level)
}

/// log2 of [`level_size`].
pub const fn level_shift(level: u8) -> u32 {
    PAGE_SHIFT + 9 * (LAST_LEVEL - level) as u32
}

/// Everything that can go wrong in this crate. An operation that returns an error changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// A table page (or the root tables) could not be allocated. Nothing was changed and every
    /// page reserved for the operation was returned.
    NoMemory,
    /// An address or length is not aligned to [`PAGE_SIZE`] (or to the block size asked for).
    Misaligned,
    /// The IPA range (or an output PA) is outside what the configuration translates.
    OutOfRange,
    /// `map`: a page of the range already holds a mapping or a software entry.
    AlreadyMapped,
    /// No valid mapping at that IPA (split of a hole, ...).
    NotMapped,
    /// A zero-length range.
    EmptyRange,
    /// The VMID does not fit the configured VMID width.
    BadVmid,
    /// Unsupported IPA size (supported: 25..=48 bits, and not above the PA size).
    UnsupportedIpaSize,
    /// Unsupported `ID_AA64MMFR0_EL1.PARange` value.
    UnsupportedPaRange,
    /// Attributes that cannot be mapped (executable device memory, software bits > 0xF).
    BadAttrs,
    /// A descriptor that is not a leaf for its level (a table descriptor given to
    /// `compare_exchange_leaf`, a software entry above the page level, a misaligned output).
    BadDescriptor,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self, f)
    }
}
