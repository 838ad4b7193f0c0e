//! VM fork: regions cloned, chains linked (Linux's `anon_vma_fork` / `anon_vma_clone`), then
//! stage-2 entries copied read-only, in time proportional to the mapped entries.

use crate::backend::{PageState, Stage2, Stage2Locked, SwapStore};
use crate::folio::FOLIO_PAGES;
use crate::ksm::ItemKey;
use crate::region::{Region, RegionList};
use crate::{Error, Ipa, Rmap, PAGE_SIZE};
use alloc::vec::Vec;

/// IPA a fork copies per pass (16 blocks of 2 MiB; a multiple of 2 MiB, so a block is never
/// cut): each pass is one walk of the parent's table and one of the child's, so a bigger
/// chunk spreads their cost over more blocks, while the child's batch stays bounded (at
/// most 8,192 page entries, 256 KiB, where the parent maps pages).
const FORK_CHUNK: u64 = 16 * FOLIO_PAGES * PAGE_SIZE;

impl Rmap {
    /// Forks `parent` (write-locked: no fault may change its entries meanwhile) into `child`
    /// (write-locked, empty). Every region is cloned and linked into the reverse map *before*
    /// its entries are copied, so a concurrent migration walk that misses a child entry is
    /// guaranteed to visit it later (the child's chains sit at the tail). On error the child
    /// keeps what was already forked; destroy it.
    ///
    /// The caller invalidates the parent's whole VMID (`Stage2::flush_deferred`) before the
    /// parent runs again, even if every entry changed here was invalid: a concurrent batch
    /// migration or reclaim defers the invalidation of the entries it turned into migration
    /// entries, so the parent's TLB may still hold a writable translation of a frame whose
    /// entry this fork write-protected and shared; a store through it after the fork would
    /// reach the child's copy. (Linux's `dup_mmap` ends with `flush_tlb_mm` of the parent;
    /// hypmm's `fork_memory` with its batch's flush.)
    pub fn fork_vm<S: Stage2, W: SwapStore>(
        &self,
        parent: &mut RegionList,
        parent_s2: &S,
        child: &mut RegionList,
        child_s2: &S,
        swap: &W,
    ) -> Result<(), Error> {
        assert!(child.is_empty(), "fork into a VM with regions");
        let child_vm = child.vm();
        for region in parent.iter() {
            let mut clone = self.region_clone(region, child_vm);
            if let Err(e) = self.anon_vma_fork(&mut clone, region) {
                self.unlink_region(&mut clone);
                return Err(e);
            }
            child.insert(clone);
            self.copy_entries(region, parent_s2, child_s2, swap)?;
        }
        Ok(())
    }

    /// Links a child region to its parent's lineage (Linux's `anon_vma_fork`): a chain to every
    /// anon_vma the parent region is linked to, in the parent's order, each new chain at the
    /// tail; then its own anon_vma, reusing a family member that has no live region and fewer
    /// than two children (exact counts: the CVE-2022-42703 fix), or a new child of the parent's.
    pub fn anon_vma_fork(&self, child: &mut Region, parent: &Region) -> Result<(), Error> {
        let Some(parent_anon) = parent.anon_vma() else {
            return Ok(()); // nothing faulted yet: the child prepares lazily
        };
        let child_vm = child.vm();
        let mut family = self.lock_family_write(parent_anon);
        // The candidate is only noted until every link is made: on a failed link the caller
        // unlinks the child's chains with `unlink_region`, which decrements
        // `num_active_regions` of the region's anon_vma, so the region may name it only once
        // that was incremented (Linux's anon_vma_clone clears `dst->anon_vma` on its
        // enomem_failure path for the same reason).
        let mut reuse = None;
        for &chain in parent.chains() {
            let anon_vma = self.chain_info(chain).anon_vma;
            self.link(&mut family, anon_vma, child_vm, child)?;
            let node = family.node_mut(anon_vma);
            if reuse.is_none() && node.num_active_regions == 0 && node.num_children < 2 {
                reuse = Some(anon_vma);
            }
        }
        if let Some(reused) = reuse {
            family.node_mut(reused).num_active_regions += 1;
            child.anon_vma = Some(reused);
            return Ok(());
        }
        // The new anon_vma joins the family under the root lock we hold, before it is
        // published in the region (lesson 1).
        let own = self.alloc_anon_vma(Some(parent_anon))?;
        family.insert(own);
        if let Err(e) = self.link(&mut family, own, child_vm, child) {
            family.remove(own);
            drop(family);
            self.put_anon_vma(own);
            return Err(e);
        }
        family.node_mut(own).num_active_regions += 1;
        family.node_mut(parent_anon).num_children += 1;
        child.anon_vma = Some(own);
        Ok(())
    }

    /// Copies a region's leaves into the child, making both read-only (CoW). Both stage-2
    /// locks are held for the whole copy (parent's first), like Linux's two PTE locks, so a
    /// walker sees each leaf either before it was copied or in both VMs.
    /// Copies a region's entries from parent to child, [`FORK_CHUNK`] of IPA at a time: one
    /// pass write-protects the parent's entries and takes the child's references, then the
    /// child's slots are filled in bulk. If the child's table cannot grow, the references taken for
    /// entries not installed are dropped again and the fork fails (the caller destroys the
    /// child, whose installed entries are then accounted normally).
    fn copy_entries<S: Stage2, W: SwapStore>(
        &self,
        region: &Region,
        parent_s2: &S,
        child_s2: &S,
        swap: &W,
    ) -> Result<(), Error> {
        let mut parent = parent_s2.lock();
        let mut child = child_s2.lock_nested();
        // Room for a pass of blocks plus one leaf's 512 pages: the reservation below then
        // never grows it while the parent maps blocks.
        let mut batch: Vec<(Ipa, u64, PageState)> = Vec::with_capacity(2 * FOLIO_PAGES as usize);
        let mut start = region.start();
        while start < region.end() {
            let end = (start.align_down(FORK_CHUNK) + FORK_CHUNK).min(region.end());
            batch.clear();
            let mut failed = None;
            parent.update_leaves(start, end, &mut |ipa, pages, entry| {
                if failed.is_some() {
                    return None;
                }
                // Room for the leaf's entries first: a pass may hold up to 8,192, and a push
                // that cannot grow the vector would panic; short of heap, the fork fails.
                if batch.try_reserve(pages as usize).is_err() {
                    failed = Some(Error::OutOfFrames);
                    return None;
                }
                let shared = self.share_leaf(region, swap, &mut batch, (ipa, pages, entry));
                failed = shared.is_err().then_some(Error::TooManyMappings);
                shared.ok().flatten()
            });
            if let Some(e) = failed {
                // Refused before the child sees anything of this chunk; the parent's entries
                // made read-only meanwhile just take a copy-on-write fault that re-homes them.
                batch
                    .iter()
                    .for_each(|&(ipa, pages, e)| self.unshare_entry(e, pages, swap, region, ipa));
                return Err(e);
            }
            let installed = child.fill_leaves(&batch);
            if installed < batch.len() {
                batch[installed..]
                    .iter()
                    .for_each(|&(ipa, pages, e)| self.unshare_entry(e, pages, swap, region, ipa));
                return Err(Error::OutOfFrames);
            }
            start = end;
        }
        Ok(())
    }

    /// Shares one parent leaf (`ipa`, `pages`, the entry of its first page) with the child:
    /// the child's entries go to `batch`; returns the parent's replacement, or `Err` when a
    /// frame, folio or swap slot has the map limit's mappings (what this leaf already put in
    /// `batch` is the caller's to unshare).
    fn share_leaf<W: SwapStore>(
        &self,
        region: &Region,
        swap: &W,
        batch: &mut Vec<(Ipa, u64, PageState)>,
        (ipa, pages, entry): (Ipa, u64, PageState),
    ) -> Result<Option<PageState>, ()> {
        match self.share_block(entry, pages) {
            Share::Block(block) => {
                batch.push((ipa, pages, block));
                return Ok(Some(block));
            }
            Share::TooMany => return Err(()),
            Share::Pages => {}
        }
        // A page; or a block the child maps page by page (its folio has the most block
        // entries it may have): the parent's stays a block.
        let mut shared = None;
        for i in 0..pages {
            let at = ipa + i * PAGE_SIZE;
            let key = self.item_key(region, at);
            let Some(page) = self.share_entry(entry.page(i), 1, swap, key) else {
                return if entry == PageState::Invalid {
                    Ok(None)
                } else {
                    Err(())
                };
            };
            batch.push((at, 1, page));
            shared.get_or_insert(page);
        }
        Ok(shared)
    }

    /// How a fork child gets a parent's block `entry` of `pages` pages mapping a folio:
    /// read-only as one more block entry counted on the folio (`crate::folio`), not 512
    /// references; or page by page (a page, or a folio with [`crate::folio::ENTIRE_MAX`] block entries);
    /// or not at all (the folio has the map limit's).
    fn share_block(&self, entry: PageState, pages: u64) -> Share {
        let PageState::Mapped { pfn, .. } = entry else {
            return Share::Pages;
        };
        if pages != FOLIO_PAGES {
            return Share::Pages;
        }
        if self.frames.try_map_entire(pfn, self.map_limit) {
            return Share::Block(PageState::Mapped {
                pfn,
                writable: false,
            });
        }
        if self.frames.entire_mapcount(pfn) >= self.map_limit {
            Share::TooMany
        } else {
            Share::Pages
        }
    }

    /// The entry a fork child gets for a parent's `entry` covering `pages` pages (read-only,
    /// one more reference on each frame). None for an invalid entry, and when a frame already
    /// has the map limit's mappings or the swap slot as many references (nothing taken).
    /// A merged frame (never in a block) also counts the mapping in its family's item,
    /// `key`: the child is of the parent's family.
    fn share_entry<W: SwapStore>(
        &self,
        entry: PageState,
        pages: u64,
        swap: &W,
        key: Option<ItemKey>,
    ) -> Option<PageState> {
        match entry {
            PageState::Mapped { pfn, .. } => {
                for p in pfn.run(pages) {
                    if !self.frames.frame(p).try_inc_map(self.map_limit) {
                        pfn.run(p - pfn).for_each(|q| {
                            let last = self.frames.frame(q).dec_map();
                            debug_assert!(!last, "the parent still maps it");
                        });
                        return None;
                    }
                    if self.frames.frame(p).is_merged() {
                        self.merged_count(p, key, true);
                    }
                }
                Some(PageState::Mapped {
                    pfn,
                    writable: false,
                })
            }
            PageState::Migrating { pfn, .. } => Some(PageState::Migrating {
                pfn,
                writable: false,
            }),
            PageState::Swapped { slot } => {
                if swap.refs(slot).is_some_and(|r| r >= self.map_limit) {
                    return None;
                }
                swap.dup(slot);
                Some(entry)
            }
            // Copied as it is (Linux's `copy_present_pte` of a special PTE): the zero
            // page is counted nowhere.
            PageState::ZeroPage => Some(entry),
            PageState::Invalid => None,
        }
    }

    /// Drops the references `share_entry` took for an entry that was not installed. The
    /// parent still maps the frames, so this never frees one.
    fn unshare_entry<W: SwapStore>(
        &self,
        entry: PageState,
        pages: u64,
        swap: &W,
        region: &Region,
        ipa: Ipa,
    ) {
        match entry {
            // The parent's block was split meanwhile if this was the last block entry: its
            // pages count the parent, so the shares go without freeing anything.
            PageState::Mapped { pfn, .. }
                if pages == FOLIO_PAGES && self.frames.unmap_entire(pfn) =>
            {
                pfn.run(pages).for_each(|p| {
                    let last = self.frames.frame(p).dec_map();
                    debug_assert!(!last, "the parent still maps it");
                });
            }
            PageState::Mapped { .. } if pages == FOLIO_PAGES => {}
            PageState::Mapped { pfn, .. } => pfn.run(pages).for_each(|p| {
                if self.frames.frame(p).is_merged() {
                    self.merged_count(p, self.item_key(region, ipa), false);
                }
                let last = self.frames.frame(p).dec_map();
                debug_assert!(!last, "the parent still maps it");
            }),
            PageState::Swapped { slot } => swap.put(slot),
            _ => {}
        }
    }
}

/// How a fork shares a parent's leaf ([`Rmap::share_block`]).
enum Share {
    /// As one block entry, counted once on its folio.
    Block(PageState),
    /// Page by page, each page counted on its frame.
    Pages,
    /// Not at all: the folio has the map limit's block entries.
    TooMany,
}
