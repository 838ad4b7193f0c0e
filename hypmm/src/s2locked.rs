//! rmap's `Stage2Locked` operations on a locked VM table: lookups, CAS
//! updates with break-before-make, range walks for fork and restore, and
//! leaf clears for teardown and release.

use crate::machine::Machine;
use crate::PAGE_SIZE;
use alloc::vec::Vec;
use core::cell::Cell;
use rmap::CasError as Refused;
use rmap::{Ipa, PageState, Stage2Locked};
use stage2::{Batch, CasError, LeafInfo, Visitor, WalkAction};

use crate::locked::{
    check_transition, decode, encode, fetch_after, Frames, LockedStage2, Run, RunAccess, BLOCK_SIZE,
};

impl<M: Machine> Stage2Locked for LockedStage2<'_, M> {
    fn lookup(&self, ipa: Ipa) -> PageState {
        let Some(table) = self.mem.live() else {
            return PageState::Invalid;
        };
        let leaf = table.lookup(ipa);
        self.last.set(Some((ipa.page(), leaf)));
        decode(leaf, ipa)
    }

    fn compare_exchange(
        &mut self,
        ipa: Ipa,
        old: PageState,
        new: PageState,
    ) -> Result<(), Refused> {
        // Once the reclaim clock cleared an access flag, hardware AF may set
        // it between our lookup and the CAS: the same entry, so retry (AF
        // only goes 0 -> 1, so a few tries suffice; a persistent failure
        // such as an unsplittable block is reported).
        let mut tries = 0;
        loop {
            match self.cas(ipa, old, new) {
                Err(Refused::Changed(found)) if found == old && tries < 4 => tries += 1,
                r => return r,
            }
        }
    }

    fn compare_exchange_deferred(
        &mut self,
        ipa: Ipa,
        old: PageState,
        new: PageState,
    ) -> Result<(), Refused> {
        // Batched migration/reclaim: the invalidation waits for
        // `Stage2::flush_deferred`, which the batch calls before it copies.
        let was = core::mem::replace(&mut self.mem.batching, true);
        let r = self.compare_exchange(ipa, old, new);
        self.mem.batching = was;
        r
    }

    /// One pass over each last-level table (`Stage2Table::update_pages`),
    /// every invalidation owed left to the caller's `Stage2::flush_deferred`;
    /// a page still inside a block is split and changed the slow way.
    fn update_pages(
        &mut self,
        ipas: &[Ipa],
        decide: &mut dyn FnMut(usize, PageState) -> Option<PageState>,
        applied: &mut dyn FnMut(usize, PageState, PageState),
    ) {
        self.last.set(None);
        if !self.mem.is_live() {
            return;
        }
        let change = Cell::new(None);
        let mut blocked = Vec::new();
        {
            let table = self.mem.table();
            let tlb = self.mem.tlb();
            let batch = Batch::new(&tlb, table.vttbr());
            let (enc, zero) = (self.enc(), self.zero_page());
            table.update_pages(
                ipas,
                &mut |k, leaf| {
                    let old = decode(Some(*leaf), ipas[k]);
                    let new = decide(k, old)?;
                    check_transition(old, new);
                    change.set(Some((old, new)));
                    Some(encode(new, enc, fetch_after(leaf, ipas[k], new), zero))
                },
                &mut |k, result| {
                    let Some((old, new)) = change.take() else {
                        return;
                    };
                    match result {
                        Ok(()) => {
                            // A migration entry keeps its frame: putting the
                            // same frame back needs no break (same output
                            // address), and a new one is installed only after
                            // the batch's flush, so only Invalid/Swap count.
                            if let (PageState::Mapped { .. } | PageState::ZeroPage, true) = (
                                old,
                                matches!(new, PageState::Invalid | PageState::Swapped { .. }),
                            ) {
                                self.mem.bbm_note(ipas[k].page(), PAGE_SIZE);
                            }
                            applied(k, old, new)
                        }
                        Err(CasError::NoSlot { .. }) => blocked.push((k, old, new)),
                        Err(_) => {}
                    }
                },
                &batch,
            );
            // As compare_exchange_deferred: the flush is the caller's (flush_deferred).
            let _ = batch.into_pending();
        }
        for (k, old, new) in blocked {
            if self.compare_exchange_deferred(ipas[k], old, new).is_ok() {
                applied(k, old, new);
            }
        }
    }

    fn lookup_block(&self, ipa: Ipa) -> Option<PageState> {
        self.block_state(ipa)
    }

    fn compare_exchange_block(
        &mut self,
        ipa: Ipa,
        old: PageState,
        new: PageState,
    ) -> Result<(), Refused> {
        self.replace_block(ipa, old, new)
    }

    fn test_and_clear_young(&mut self, ipa: Ipa) -> bool {
        self.last.set(None);
        self.mem.live().is_some_and(|t| t.test_and_clear_young(ipa))
    }

    /// A block inside `within` is cleared as one entry (teardown, restore):
    /// no split, so no table page is needed.
    fn clear_leaf(
        &mut self,
        ipa: Ipa,
        old: PageState,
        within: core::ops::Range<Ipa>,
    ) -> Result<(Ipa, u64, PageState), Refused> {
        self.last.set(None);
        let leaf = self.mem.live().and_then(|t| t.lookup(ipa));
        let Some(leaf) = leaf else {
            return Err(Refused::Changed(PageState::Invalid));
        };
        let found = decode(Some(leaf), ipa);
        if found != old {
            return Err(Refused::Changed(found));
        }
        let whole = leaf.ipa >= within.start && leaf.ipa + leaf.size() <= within.end;
        if leaf.level == stage2::LAST_LEVEL || !whole {
            let page = ipa.page();
            return self
                .compare_exchange_deferred(page, old, PageState::Invalid)
                .map(|()| (page, 1, old));
        }
        check_transition(old, PageState::Invalid);
        let was = core::mem::replace(&mut self.mem.batching, true);
        let result = self.replace_leaf(&leaf, PageState::Invalid);
        self.mem.batching = was;
        match result {
            Ok(()) => Ok((
                leaf.ipa,
                leaf.size() / PAGE_SIZE,
                decode(Some(leaf), leaf.ipa),
            )),
            Err(CasError::Mismatch(d)) => Err(Refused::Changed(decode(
                LeafInfo::decode(ipa, leaf.level, d),
                ipa,
            ))),
            Err(_) => Err(Refused::Changed(found)),
        }
    }

    /// One walk; a whole block inside the range is reported once and, if the
    /// replacement only write-protects it, stays one block entry (fork).
    fn update_leaves(
        &mut self,
        start: Ipa,
        end: Ipa,
        f: &mut dyn FnMut(Ipa, u64, PageState) -> Option<PageState>,
    ) {
        self.last.set(None);
        let Some(table) = self.mem.live() else {
            return;
        };
        let end = end.min(Ipa::new(table.config().ipa_limit()));
        if start >= end {
            return;
        }
        let mut blocks = Vec::new();
        let this = &*self;
        let mut visit = |leaf: &LeafInfo| {
            if leaf.level < stage2::LAST_LEVEL {
                blocks.push(*leaf);
                return;
            }
            let old = decode(Some(*leaf), leaf.ipa);
            if let Some(new) = f(leaf.ipa, 1, old).filter(|&n| n != old) {
                this.replace_retrying(leaf, old, new);
            }
        };
        let _ = this.mem.table().walk(start, end - start, &mut visit);
        for leaf in blocks {
            let whole = leaf.ipa >= start && leaf.ipa + leaf.size() <= end;
            if !whole {
                // Never for fork (2 MiB-aligned chunks); pages one by one.
                self.update_block_pages(&leaf, start, end, f);
                continue;
            }
            let pages = leaf.size() / PAGE_SIZE;
            let old = decode(Some(leaf), leaf.ipa);
            let Some(new) = f(leaf.ipa, pages, old).filter(|&n| n != old) else {
                continue;
            };
            if !self.write_protect_block(&leaf, old, new) {
                for i in 0..pages {
                    let _ = self.cas(leaf.ipa + i * PAGE_SIZE, old.page(i), new.page(i));
                }
            }
        }
    }

    /// Groups consecutive items into runs, each mapped with one table call (a
    /// whole aligned 2 MiB run as one block entry).
    fn fill_leaves(&mut self, leaves: &[(Ipa, u64, PageState)]) -> usize {
        self.last.set(None);
        if !self.mem.is_live() {
            return 0;
        }
        let mut done = 0;
        while done < leaves.len() {
            let (ipa, pages, entry) = leaves[done];
            check_transition(PageState::Invalid, entry);
            let PageState::Mapped { pfn, writable } = entry else {
                if self.fill_hole(ipa, entry).is_err() {
                    return done;
                }
                done += 1;
                continue;
            };
            let (mut items, mut len) = (1, pages);
            while let Some(&(next_ipa, next_pages, next)) = leaves.get(done + items) {
                let contiguous = next_ipa == ipa + len * PAGE_SIZE
                    && next
                        == (PageState::Mapped {
                            pfn: pfn + len,
                            writable,
                        });
                // Only a whole block item (a parent's block) maps as a block entry: the
                // folio's entire mapcount counts it (rmap's `folio`), never a run of pages.
                if !contiguous || (len + next_pages) * PAGE_SIZE >= BLOCK_SIZE {
                    break;
                }
                len += next_pages;
                items += 1;
            }
            let run = Run {
                access: if writable {
                    RunAccess::Write
                } else {
                    RunAccess::Read
                },
                frames: Frames::Shared,
            };
            if !self.map_run(ipa, pfn, len, run) {
                return done;
            }
            done += items;
        }
        done
    }

    fn next_entry(&self, from: Ipa, end: Ipa) -> Option<(Ipa, PageState)> {
        struct First(Option<(Ipa, PageState)>, Ipa);
        impl Visitor for First {
            fn leaf(&mut self, leaf: &LeafInfo) -> WalkAction {
                // A block starting before `from` is reported from `from` on.
                let ipa = leaf.ipa.max(self.1);
                self.0 = Some((ipa, decode(Some(*leaf), ipa)));
                WalkAction::Stop
            }
        }
        let mut first = First(None, from);
        let table = self.mem.live()?;
        let end = end.min(Ipa::new(table.config().ipa_limit()));
        if from >= end {
            return None;
        }
        table.walk(from, end - from, &mut first).ok()?;
        first.0
    }
}
