//! Region and VM teardown: zap the leaves, unlink from the reverse map, and only then let the
//! stage-2 tables go (lesson 5: every table an rmap walk can reach is alive).

use crate::backend::{CasError, FrameAllocator, PageState, Stage2, Stage2Locked, SwapStore};
use crate::region::{Region, RegionList};
use crate::{Ipa, Rmap, VmId, PAGE_SIZE};
use core::ops::Range;

/// Proof that every region of `vm` in `range` was unlinked from the reverse map: the only way
/// to call [`Stage2::free_tables`]. It cannot be built outside this crate.
#[must_use = "present it to Stage2::free_tables"]
#[derive(Debug)]
pub struct UnlinkProof {
    vm: VmId,
    range: Range<Ipa>,
}

impl UnlinkProof {
    /// A proof that was not earned: only for the test showing what it prevents.
    #[cfg(test)]
    pub(crate) fn forged_for_test(vm: VmId) -> Self {
        UnlinkProof {
            vm,
            range: Ipa::ZERO..Ipa::MAX,
        }
    }

    /// The VM whose regions were unlinked.
    pub fn vm(&self) -> VmId {
        self.vm
    }

    /// The IPA range no rmap walker can reach any more.
    pub fn range(&self) -> Range<Ipa> {
        self.range.clone()
    }
}

impl Rmap {
    /// Tears down every region of a VM (list write-locked): zaps leaves (dropping frame
    /// mappings and swap references), then unlinks each region from the reverse map. The
    /// returned proof lets the caller free the stage-2 tables.
    pub fn destroy_vm<S: Stage2, A: FrameAllocator, W: SwapStore>(
        &self,
        list: &mut RegionList,
        s2: &S,
        alloc: &A,
        swap: &W,
    ) -> UnlinkProof {
        #[cfg(feature = "mutate-free-tables-before-unlink")]
        return self.destroy_vm_freeing_first(list, s2, alloc, swap);
        #[cfg_attr(feature = "mutate-free-tables-before-unlink", allow(unreachable_code))]
        for start in list.starts() {
            let region = list.take(start).expect("listed");
            self.remove_region(region, s2, alloc, swap);
        }
        UnlinkProof {
            vm: list.vm(),
            range: Ipa::ZERO..Ipa::MAX,
        }
    }

    /// Broken variant (lesson 5): the stage-2 tables are freed after the zap but before the
    /// regions are unlinked, so a walker can still follow a chain into them.
    #[cfg(feature = "mutate-free-tables-before-unlink")]
    fn destroy_vm_freeing_first<S: Stage2, A: FrameAllocator, W: SwapStore>(
        &self,
        list: &mut RegionList,
        s2: &S,
        alloc: &A,
        swap: &W,
    ) -> UnlinkProof {
        let mut regions = alloc::vec::Vec::new();
        for start in list.starts() {
            let region = list.take(start).expect("listed");
            self.zap(&region, s2, alloc, swap);
            regions.push(region);
        }
        s2.free_tables(UnlinkProof {
            vm: list.vm(),
            range: Ipa::ZERO..Ipa::MAX,
        });
        for mut region in regions {
            self.unlink_region(&mut region);
        }
        UnlinkProof {
            vm: list.vm(),
            range: Ipa::ZERO..Ipa::MAX,
        }
    }

    /// Removes one region (like `munmap`): zap, unlink, and a proof for its range.
    pub fn unmap_region<S: Stage2, A: FrameAllocator, W: SwapStore>(
        &self,
        list: &mut RegionList,
        start: Ipa,
        s2: &S,
        alloc: &A,
        swap: &W,
    ) -> Option<UnlinkProof> {
        let region = list.take(start)?;
        let range = region.start()..region.end();
        self.remove_region(region, s2, alloc, swap);
        Some(UnlinkProof {
            vm: list.vm(),
            range,
        })
    }

    fn remove_region<S: Stage2, A: FrameAllocator, W: SwapStore>(
        &self,
        mut region: Region,
        s2: &S,
        alloc: &A,
        swap: &W,
    ) {
        self.zap(&region, s2, alloc, swap);
        self.unlink_region(&mut region);
    }

    /// Clears every leaf of `region` and drops what each mapped, [`ZAP_CHUNK`] leaves at a time:
    /// the leaves are cleared under the stage-2 lock, their TLB entries invalidated
    /// ([`Stage2::flush_deferred`]), and only then are the frames and swap slots they held let
    /// go, so no TLB entry can reach a freed frame. A block is cleared whole (never split), so
    /// teardown needs no table page even when nothing it frees comes back before the end. A
    /// migration entry's frame already lost this mapping when the entry was installed; the
    /// migrator simply will not find it again.
    fn zap<S: Stage2, A: FrameAllocator, W: SwapStore>(
        &self,
        region: &Region,
        s2: &S,
        alloc: &A,
        swap: &W,
    ) {
        let mut from = region.start();
        loop {
            let mut cleared = [(Ipa::ZERO, 0, PageState::Invalid); ZAP_CHUNK];
            let mut n = 0;
            {
                let mut table = s2.lock();
                while n < ZAP_CHUNK {
                    let Some((ipa, entry)) = table.next_entry(from, region.end()) else {
                        break;
                    };
                    match table.clear_leaf(ipa, entry, region.start()..region.end()) {
                        Ok((start, pages, first)) => {
                            cleared[n] = (start, pages, first);
                            n += 1;
                            from = (start + pages * PAGE_SIZE).max(ipa + PAGE_SIZE);
                        }
                        // Changed under us (a hardware access-flag update): look again.
                        Err(CasError::Changed(found)) if found != entry => {}
                        // Cannot be cleared (a block across the region's end with no table page
                        // to split it): leave it. Its frames stay referenced, so they leak
                        // rather than be freed while mapped; the table goes with the VM.
                        Err(_) => from = ipa + PAGE_SIZE,
                    }
                }
            }
            if n == 0 {
                return;
            }
            s2.flush_deferred();
            for &(start, pages, first) in &cleared[..n] {
                for i in 0..pages {
                    match first.page(i) {
                        PageState::Mapped { pfn, .. } => {
                            self.remove_rmap_at(pfn, region, start + i * PAGE_SIZE, alloc)
                        }
                        PageState::Swapped { slot } => self.put_swap(slot, swap, alloc),
                        // The zero page is in no reverse map and holds no reference.
                        PageState::Migrating { .. } | PageState::Invalid | PageState::ZeroPage => {}
                    }
                }
            }
        }
    }
}

/// Leaves a zap clears between TLB flushes: each flush is one VMID-wide invalidation, and the
/// chunk lives on the stack.
const ZAP_CHUNK: usize = 64;
