//! Guest-memory operations built on rmap and the adapter: the huge
//! first-touch fault and MEM_RELEASE. Generic over the VM type (`S`: hyp's
//! `VmMemory`, or a host test's VM) whose locked stage 2 is the adapter.

use crate::frames::{publish, Frames};
use crate::locked::{LockedStage2, BLOCK_SIZE};
use crate::machine::Machine;
use crate::PAGE_SIZE;
use rmap::lock::OrderedRwLock;
use rmap::{CasError, Ipa, PageState, RegionList, Rmap, Stage2, Stage2Locked, SwapStore};

/// Linux's huge anonymous fault: the first touch of an empty 2 MiB-aligned
/// chunk that the region covers maps 512 fresh zeroed frames with one block
/// entry (fewer faults, and fork copies one entry instead of 512). Returns
/// false, having changed nothing, when the caller must take the page path:
/// the chunk is partly mapped, the region has no anon_vma yet, no aligned
/// 2 MiB of frames is free, or the table could not grow.
pub fn fault_block<M, S>(
    rmap: &Rmap,
    regions: &OrderedRwLock<RegionList>,
    vm: &S,
    machine: &M,
    ipa: Ipa,
) -> bool
where
    M: Machine,
    S: for<'a> Stage2<Locked<'a> = LockedStage2<'a, M>>,
{
    let chunk = ipa.align_down(BLOCK_SIZE);
    let regions = regions.read();
    let Some(region) = regions.find(ipa) else {
        return false;
    };
    if region.anon_vma().is_none() || chunk < region.start() || chunk + BLOCK_SIZE > region.end() {
        return false;
    }
    let mut s2 = vm.lock();
    if s2.next_entry(chunk, chunk + BLOCK_SIZE).is_some() {
        return false;
    }
    let pages = BLOCK_SIZE / PAGE_SIZE;
    let Some(pa) = machine.alloc_contiguous_zeroed(pages as usize) else {
        return false;
    };
    // Zeroed through our cacheable map: clean before the guest sees it.
    publish(machine, pa, BLOCK_SIZE);
    let pfn = pa.pfn();
    rmap.add_new_anon_block(pfn, pages, region, chunk);
    if !s2.map_block(chunk, pa) {
        rmap.remove_new_anon_block(pfn, pages, &Frames(machine));
        return false;
    }
    true
}

/// Drops `vm`'s pages in `[start, start + len)` (MEM_RELEASE): each entry is
/// cleared and its frame or swap slot reference dropped; untouched pages
/// cost nothing. Blocks are split first (hyp's reserve covers the table
/// page); a split that finds no table page is `OutOfFrames`. `released`
/// sees each page whose entry was cleared (hyp's dirty log).
pub fn release<M, S, W>(
    rmap: &Rmap,
    regions: &OrderedRwLock<RegionList>,
    vm: &S,
    (machine, swap): (&M, &W),
    range: core::ops::Range<Ipa>,
    mut released: impl FnMut(Ipa),
) -> Result<(), rmap::Error>
where
    M: Machine,
    S: for<'a> Stage2<Locked<'a> = LockedStage2<'a, M>>,
    W: SwapStore,
{
    let regions = regions.read();
    let mut from = range.start;
    loop {
        let next = vm.lock().next_entry(from, range.end);
        let Some((ipa, entry)) = next else {
            return Ok(());
        };
        match entry {
            PageState::Migrating { pfn, .. } => {
                rmap.wait_frame_unlocked(pfn);
                continue;
            }
            _ => match vm.lock().compare_exchange(ipa, entry, PageState::Invalid) {
                Err(CasError::NoMemory) => return Err(rmap::Error::OutOfFrames),
                Err(CasError::Changed(_)) => continue,
                Ok(()) => {}
            },
        }
        match entry {
            // With its region, a merged frame's family share is dropped exactly.
            PageState::Mapped { pfn, .. } => match regions.find(ipa) {
                Some(region) => rmap.remove_rmap_at(pfn, region, ipa, &Frames(machine)),
                None => rmap.remove_rmap(pfn, &Frames(machine)),
            },
            PageState::Swapped { slot } => rmap.put_swap(slot, swap, &Frames(machine)),
            // The zero page holds no reference.
            PageState::Migrating { .. } | PageState::Invalid | PageState::ZeroPage => {}
        }
        released(ipa);
        from = ipa + PAGE_SIZE;
    }
}
