//! The data-cache side of the host hardware: which frames the hypervisor wrote through its
//! cacheable map and has not cleaned to the point of coherency (PoC) since.
//!
//! On a CPU without FEAT_S2FWB a guest running with its MMU or data cache off (Linux's early
//! boot, the test guest's entry), or mapping a frame as Device, reads DRAM past the caches: a
//! frame the hypervisor zeroed, copied or swapped in must be cleaned to the PoC before any
//! guest can map it, or the guest sees stale memory (the previous owner's data). The
//! backends' writes ([`crate::FrameAllocator::zero`], [`crate::FrameAllocator::copy`],
//! [`crate::SwapStore::load`], the host's contiguous first-touch allocation) mark the frame
//! written and then clean it, as hyp's do with `stage2::publish_frames`; installing a valid
//! stage-2 leaf over a frame still marked is a failure, reported by
//! [`super::HostWorld::check`]. With FWB ([`HostHw::set_fwb`]) stage 2 forces Write-Back,
//! nothing is cleaned and nothing is owed.

use super::hw::HostHw;
use crate::lock::{Level, OrderedMutex};
use crate::{Ipa, Pfn, VmId, PAGE_SIZE};
use alloc::collections::BTreeSet;
use alloc::format;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// See the module documentation.
pub(super) struct CacheModel {
    fwb: AtomicBool,
    /// Frames written by the hypervisor and not cleaned to the PoC since.
    unclean: OrderedMutex<BTreeSet<Pfn>>,
    /// Frame cleans done.
    cleans: AtomicU64,
    /// Cleans still to be "forgotten" (failure injection).
    skip: AtomicU64,
}

impl Default for CacheModel {
    fn default() -> Self {
        CacheModel {
            fwb: AtomicBool::new(false),
            unclean: OrderedMutex::new(Level::ALLOCATOR, "host.unclean", BTreeSet::new()),
            cleans: AtomicU64::new(0),
            skip: AtomicU64::new(0),
        }
    }
}

impl HostHw {
    /// Models a CPU with FEAT_S2FWB (`HCR_EL2.FWB` set): guest accesses to RAM are always
    /// Write-Back, so frames need no cleaning and none is done. Default: no FWB.
    pub fn set_fwb(&self, on: bool) {
        self.cache.fwb.store(on, Ordering::SeqCst);
    }

    /// Whether the modelled CPU has FEAT_S2FWB.
    pub fn fwb(&self) -> bool {
        self.cache.fwb.load(Ordering::SeqCst)
    }

    /// Frames cleaned to the PoC so far (one per frame written, none with FWB).
    pub fn frames_cleaned(&self) -> u64 {
        self.cache.cleans.load(Ordering::SeqCst)
    }

    /// Makes the next `n` cleans do nothing, as a backend that forgot one would: a test proves
    /// with it that a missing clean is caught.
    pub fn skip_next_cleans(&self, n: u64) {
        self.cache.skip.store(n, Ordering::SeqCst);
    }

    /// Frames the hypervisor wrote and has not cleaned to the PoC since.
    pub fn unclean_frames(&self) -> Vec<Pfn> {
        self.cache.unclean.lock().iter().copied().collect()
    }

    /// The hypervisor wrote `pfn` through its cacheable map, then does what the contracts of
    /// `zero`, `copy` and `load` owe before returning: clean it to the PoC, unless FWB.
    /// Called with no host lock held.
    pub(super) fn wrote_and_published(&self, pfn: Pfn) {
        let mut unclean = self.cache.unclean.lock();
        let skipped = self
            .cache
            .skip
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if self.fwb() || skipped {
            unclean.insert(pfn);
        } else {
            unclean.remove(&pfn);
            self.cache.cleans.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A valid leaf of `pages` frames from `first` is being installed at `ipa` in `vm`:
    /// without FWB, a frame written and not cleaned since is a failure.
    pub(super) fn check_clean(&self, vm: VmId, ipa: Ipa, pages: u64, first: Pfn) {
        if self.fwb() {
            return;
        }
        let dirty: Vec<Pfn> = {
            let unclean = self.cache.unclean.lock();
            unclean.range(first..first + pages).copied().collect()
        };
        for pfn in dirty {
            let at = ipa + (pfn - first) * PAGE_SIZE;
            self.record(format!(
                "{vm:?}: frame {pfn:#x} mapped at IPA {at:#x} while the hypervisor's writes to \
                 it were not cleaned to the point of coherency (a guest with caches off would \
                 read stale memory)"
            ));
        }
    }
}
