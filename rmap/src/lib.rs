//! The anon_vma reverse map of Linux, applied to virtual machines.
//!
//! A [`Frame`] (our `struct page`) points at an [`AnonVma`]; each anon_vma indexes the
//! [`chain`]s of every [`Region`] (our `vm_area_struct`, a range of one VM's IPA space) that may
//! map its frames; from a frame, [`Rmap::walk`] finds every VM and IPA mapping it. Fork,
//! copy-on-write, migration and reclaim are written here as algorithms over small traits
//! ([`backend`]) that the hypervisor implements with its stage-2 tables.
//!
//! See `README.md` for the design, the lock order and how each seed lesson is honoured.
#![no_std]
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(missing_docs)]

extern crate alloc;

pub mod anon_rmap;
pub mod anon_vma;
pub mod backend;
pub mod batch;
pub mod chain;
pub mod destroy;
pub mod fault;
pub mod folio;
mod folio_migrate;
pub mod fork;
pub mod frame;
pub mod interval;
pub mod ksm;
mod ksm_move;
pub mod lock;
pub mod merge;
mod merge_zero;
pub mod migrate;
pub mod pool;
pub mod reclaim;
pub mod region;
mod segdir;
pub mod swap_cache;
pub mod sync;
pub mod walk;

#[cfg(test)]
mod tests;

#[cfg(any(test, feature = "std"))]
pub mod host;

pub use anon_vma::{AnonHandle, AnonVma};
pub use backend::{CasError, FrameAllocator, Stage2, Stage2Locked, SwapStore, VmSet};
pub use batch::Skip;
pub use chain::{ChainHandle, ChainInfo};
pub use destroy::UnlinkProof;
pub use fault::Fault;
pub use frame::{Frame, FrameGuard, FrameTable};
pub use ksm::{ItemInfo, MergeStats, StableInfo};
pub use lock::lockdep;
pub use merge::{MergeError, MergePage};
pub use region::{Region, RegionFlags, RegionList};
pub use walk::{AnonRef, Mapper};

use chain::Chain;
use pool::Pool;

// The typed addresses and the page-state vocabulary are `mmtypes`'s, re-exported so
// users of the reverse map need not name that crate.
pub use mmtypes::{Ipa, Pa, PageState, Pfn, PAGE_SIZE};

/// A VM's identity as the reverse map records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmId(pub u32);

/// Why an operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// No region covers the address.
    NoRegion,
    /// Misaligned, empty or overlapping range.
    BadRange,
    /// The anon_vma pool is full.
    OutOfAnonVmas,
    /// The chain pool is full.
    OutOfChains,
    /// No free frame.
    OutOfFrames,
    /// The swap store is full.
    OutOfSwap,
    /// The frame is free, not anonymous, or no longer mapped.
    NotMapped,
    /// The frame is locked or pinned by someone else, or mapped where the walk may not go
    /// (a temporary region): try later.
    Busy,
    /// A fork would map a frame, or share a swap slot, more than [`MAP_LIMIT`] times.
    TooManyMappings,
}

/// The most mappings a fork may give one frame (or references one swap slot). A frame's
/// mapcount is 16 bits (it keeps `Frame` at 16 bytes); capping forks at half of that leaves
/// room for what later paths add without a check (a swap-in maps the slot's frame once per
/// reference), so no path can overflow it.
pub const MAP_LIMIT: u32 = (u16::MAX / 2) as u32;

/// The reverse map: frame metadata plus the type-stable pools of anon_vmas and chains.
pub struct Rmap {
    frames: FrameTable,
    anon_pool: Pool<AnonVma>,
    chain_pool: Pool<Chain>,
    swap_cache: swap_cache::SwapCache,
    /// Merged frames' stable nodes and their rmap items (`ksm.rs`), bounded by memory only.
    stable_pool: Pool<ksm::StableNode>,
    item_pool: Pool<ksm::RmapItem>,
    /// Forks refuse to map a frame (or share a swap slot) more often ([`MAP_LIMIT`]).
    map_limit: u32,
}

impl Rmap {
    /// A reverse map over `frames` with room for up to `max_anon_vmas` anon_vmas and
    /// `max_chains` chains (at most [`pool::MAX_SLOTS`] each). The pools start with one segment
    /// and grow as the VMs need them.
    pub fn new(frames: FrameTable, max_anon_vmas: usize, max_chains: usize) -> Self {
        // A merged frame has one node, so the frame count bounds the nodes; items (one per
        // family and offset mapping a merged frame) are bounded only by the slot format.
        let nodes = frames.len().min(pool::MAX_SLOTS);
        Rmap {
            frames,
            anon_pool: Pool::new(pool::SEGMENT_SLOTS, max_anon_vmas, "pool.anon_vma"),
            chain_pool: Pool::new(pool::SEGMENT_SLOTS, max_chains, "pool.chain"),
            swap_cache: swap_cache::SwapCache::default(),
            // No segment until the first merge: a hypervisor that never merges pays nothing.
            stable_pool: Pool::new(0, nodes, "pool.stable_node"),
            item_pool: Pool::new(0, pool::MAX_SLOTS, "pool.rmap_item"),
            map_limit: MAP_LIMIT,
        }
    }

    /// Lowers the most mappings a fork may give one frame (or references one swap slot) below
    /// [`MAP_LIMIT`], the default: an operator's cap on how widely a page may be shared, or a
    /// test's way to reach the limit quickly.
    pub fn limit_mappings(&mut self, limit: u32) {
        self.map_limit = limit.min(MAP_LIMIT);
    }

    /// The frame metadata table.
    pub fn frames(&self) -> &FrameTable {
        &self.frames
    }

    /// An anon_vma's slot, for inspection (e.g. the console's `rmap <pa>`).
    pub fn anon_vma(&self, handle: AnonHandle) -> Option<&AnonVma> {
        self.anon_pool.get(handle)
    }
}
