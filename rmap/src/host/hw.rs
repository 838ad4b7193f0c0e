//! The hardware the host stage 2 stands on, shared by every VM of a [`super::HostWorld`]: a
//! bounded allocator of last-level table pages (failure injection), a per-VM TLB model, and
//! the record of what went wrong (a frame freed while a TLB entry may still reach it, an
//! access through such a stale entry, a valid entry installed where the TLB may still hold
//! another translation: break-before-make with the invalidation still pending).
//!
//! The TLB model: a vCPU access ([`super::HostVm::read`] / [`super::HostVm::write`]) caches
//! the page entry it used, per VM, until an invalidation covers it. `compare_exchange` of a
//! valid entry invalidates at once (break-before-make), as does splitting a block;
//! `compare_exchange_deferred`, `update_pages` and `clear_leaf` leave it cached until
//! [`crate::Stage2::flush_deferred`] (VMID-wide), and `free_tables` drops the VM's entries
//! (its VMID is invalidated with its tables). Accesses run under the TLB lock, so an
//! invalidation waits for them, as TLBI + DSB waits for accesses in flight.
//!
//! The data-cache model (frames written and not cleaned to the point of coherency) is in
//! [`super::cache`].

use crate::lock::{Level, OrderedMutex};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::{Ipa, Pfn, VmId, PAGE_SIZE};
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;

/// A cached translation of one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Cached {
    pub(super) pfn: Pfn,
    pub(super) writable: bool,
    /// The frame's generation when it was cached: it changes when the frame is freed.
    pub(super) gen: u64,
}

/// Per VM, page IPA → cached translation.
pub(super) type Tlbs = BTreeMap<VmId, BTreeMap<Ipa, Cached>>;

/// Table-page budget, TLB model and failure record (see the module documentation).
pub struct HostHw {
    /// Table pages that may still be allocated; `u64::MAX` is unlimited.
    budget: AtomicU64,
    tables: AtomicU64,
    ooms: AtomicU64,
    /// Whole-block leaf changes (`compare_exchange_block`: block migration).
    block_changes: AtomicU64,
    pub(super) tlb: OrderedMutex<Tlbs>,
    failures: OrderedMutex<Vec<String>>,
    /// Frames written and not cleaned to the point of coherency ([`super::cache`]).
    pub(super) cache: super::cache::CacheModel,
    /// The world's frame table, where a split block's mapping moves to per-page counts.
    frames: spin::Once<crate::FrameTable>,
}

impl Default for HostHw {
    fn default() -> Self {
        HostHw {
            budget: AtomicU64::new(u64::MAX),
            tables: AtomicU64::new(0),
            ooms: AtomicU64::new(0),
            block_changes: AtomicU64::new(0),
            tlb: OrderedMutex::new(Level::ALLOCATOR, "host.tlb", BTreeMap::new()),
            failures: OrderedMutex::new(Level::ALLOCATOR, "host.failures", Vec::new()),
            cache: Default::default(),
            frames: spin::Once::new(),
        }
    }
}

impl HostHw {
    /// Gives the stage 2 a view of the world's frame table (once).
    pub fn set_frames(&self, view: crate::FrameTable) {
        self.frames.call_once(|| view);
    }

    /// A stage 2 split a block leaf mapping `entry` (its first page): the mapping now counts
    /// page by page (hyp's stage 2 does the same).
    pub(super) fn block_split(&self, entry: crate::PageState) {
        if let (crate::PageState::Mapped { pfn, .. }, Some(frames)) = (entry, self.frames.get()) {
            frames.split_entire(pfn);
        }
    }

    /// Allows `n` more table-page allocations (`None`: unlimited); the next one after those
    /// fails, as a hypervisor out of table memory does.
    pub fn set_table_budget(&self, n: Option<u64>) {
        self.budget.store(n.unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// Table pages allocated so far (splits and new last-level tables).
    pub fn tables_allocated(&self) -> u64 {
        self.tables.load(Ordering::SeqCst)
    }

    /// Whole-block leaf changes made so far (`Stage2Locked::compare_exchange_block`).
    pub fn block_changes(&self) -> u64 {
        self.block_changes.load(Ordering::SeqCst)
    }

    pub(super) fn count_block_change(&self) {
        self.block_changes.fetch_add(1, Ordering::SeqCst);
    }

    /// Table-page allocations that failed so far.
    pub fn out_of_memory_count(&self) -> u64 {
        self.ooms.load(Ordering::SeqCst)
    }

    /// Takes one table page from the budget; false (and counted) when none is left.
    pub(super) fn alloc_table(&self) -> bool {
        let took = self
            .budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| match b {
                u64::MAX => Some(b),
                0 => None,
                b => Some(b - 1),
            })
            .is_ok();
        let counter = if took { &self.tables } else { &self.ooms };
        counter.fetch_add(1, Ordering::SeqCst);
        took
    }

    /// Invalidates `vm`'s cached translations in `range` (TLBI by IPA).
    pub(super) fn invalidate(&self, vm: VmId, range: Range<Ipa>) {
        if let Some(cached) = self.tlb.lock().get_mut(&vm) {
            let gone: Vec<Ipa> = cached.range(range).map(|(&ipa, _)| ipa).collect();
            gone.iter().for_each(|ipa| {
                cached.remove(ipa);
            });
        }
    }

    /// Invalidates every cached translation of `vm` (TLBI by VMID).
    pub(super) fn flush(&self, vm: VmId) {
        self.tlb.lock().remove(&vm);
    }

    /// Break-before-make, as hyp's witness (`hyp/src/mm/bbm.rs`) checks it: a valid leaf of
    /// `pages` pages from `first` (frames consecutive) is being installed at `ipa`; any
    /// translation `vm`'s TLB still caches in its range for something else (an invalidation
    /// still pending) is a failure. So is a frame not cleaned to the point of coherency since
    /// the hypervisor wrote it ([`super::cache`]).
    pub(super) fn check_install(&self, vm: VmId, ipa: Ipa, pages: u64, first: Pfn, writable: bool) {
        self.check_clean(vm, ipa, pages, first);
        let tlbs = self.tlb.lock();
        let Some(cached) = tlbs.get(&vm) else {
            return;
        };
        for (&at, c) in cached.range(ipa..ipa + pages * PAGE_SIZE) {
            let pfn = first + (at - ipa) / PAGE_SIZE;
            if (c.pfn, c.writable) != (pfn, writable) {
                self.record(format!(
                    "{vm:?}: break-before-make: frame {pfn:#x} (writable {writable}) mapped at \
                     IPA {at:#x} while the TLB may still hold frame {:#x} (writable {}) there",
                    c.pfn, c.writable
                ));
            }
        }
    }

    /// Records a failure (reported by [`super::HostWorld::check`]).
    pub(super) fn record(&self, what: String) {
        self.failures.lock_nested(1).push(what);
    }

    /// Called with the TLB lock held when `pfn` is freed: every VM still caching a
    /// translation to it is a failure (the entries stay, so a later access through one is
    /// reported too).
    pub(super) fn check_free(&self, tlbs: &Tlbs, pfn: Pfn) {
        for (vm, cached) in tlbs {
            for (ipa, c) in cached.iter().filter(|(_, c)| c.pfn == pfn) {
                self.record(format!(
                    "frame {pfn:#x} freed while {vm:?}'s TLB may still hold it at IPA {ipa:#x} \
                     (writable {})",
                    c.writable
                ));
            }
        }
    }

    /// Called with the TLB lock held when a frame is written or read whole by the host:
    /// `dst` filled (zeroed, copied into, loaded from swap) or `src` read (copied, stored to
    /// swap). A VM whose TLB can reach `dst` could see it half-written; one whose TLB can
    /// still write `src` could change it half-way through the copy (a lost write). Entries
    /// whose frame was freed since they were cached (`gen` differs) are reported on use.
    pub(super) fn check_copy(
        &self,
        tlbs: &Tlbs,
        dst: Option<Pfn>,
        src: Option<Pfn>,
        gen: &dyn Fn(Pfn) -> u64,
    ) {
        for (vm, cached) in tlbs {
            for (ipa, c) in cached.iter().filter(|(_, c)| c.gen == gen(c.pfn)) {
                if Some(c.pfn) == dst {
                    self.record(format!(
                        "frame {:#x} filled while {vm:?}'s TLB may still reach it at IPA {ipa:#x}",
                        c.pfn
                    ));
                }
                if Some(c.pfn) == src && c.writable {
                    self.record(format!(
                        "frame {:#x} copied while {vm:?}'s TLB may still write it at IPA {ipa:#x}",
                        c.pfn
                    ));
                }
            }
        }
    }

    /// The failures recorded so far (TLB model).
    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().clone()
    }

    /// Forgets the failures recorded so far (a test that provoked them on purpose).
    pub fn take_failures(&self) -> Vec<String> {
        core::mem::take(&mut *self.failures.lock())
    }

    /// Pages `vm`'s TLB model caches now.
    pub fn cached_pages(&self, vm: VmId) -> Vec<Ipa> {
        self.tlb
            .lock()
            .get(&vm)
            .map_or_else(Vec::new, |c| c.keys().copied().collect())
    }
}

/// The page holding `ipa`.
pub(super) fn page_of(ipa: Ipa) -> Ipa {
    ipa.page()
}
