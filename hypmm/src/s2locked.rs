//! rmap's `Stage2Locked` operations on a locked VM table: lookups, CAS
//! updates with break-before-make, range walks for fork and restore, and
//! leaf clears for teardown and release.

use crate::machine::Machine;
use crate::memory::{ram_attrs, Fetch};
use crate::PAGE_SIZE;
use alloc::vec::Vec;
use core::cell::Cell;
use rmap::CasError as Refused;
use rmap::{Ipa, PageState, Stage2Locked};
use stage2::{AttrEncoding, Batch, CasError, Descriptor, Leaf, LeafInfo, Visitor, WalkAction};

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

    /// One walk, each leaf changed in place as it is met; a whole block whose
    /// replacement only write-protects it stays one block entry (fork). A
    /// block only partly inside the range, or changed otherwise, is changed
    /// page by page after the walk (`cas` splits it), and so is a leaf whose
    /// compare-and-swap lost to an Access-flag update, from what was found.
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
        let mut later: Vec<Later> = Vec::new();
        let mut missed: Vec<Missed> = Vec::new();
        {
            let this = &*self;
            let change = Cell::new(None);
            let tlb = this.mem.tlb();
            let batch = Batch::new(&tlb, table.vttbr());
            // Inside a batch (fork) the invalidations wait for end_batch's one
            // VMID-wide flush; otherwise they are done before the walk returns.
            let flusher: &dyn stage2::Flusher = if this.mem.batching { &batch } else { &tlb };
            let mut decide = |leaf: &LeafInfo, whole: bool| {
                if !whole {
                    later.push((*leaf, None));
                    return None;
                }
                let old = decode(Some(*leaf), leaf.ipa);
                let new = f(leaf.ipa, leaf.size() / PAGE_SIZE, old).filter(|&n| n != old)?;
                check_transition(old, new);
                let Some(desc) = this.replacement(leaf, old, new) else {
                    later.push((*leaf, Some((old, new))));
                    return None;
                };
                change.set(Some((old, new)));
                Some(desc)
            };
            let mut lost = |leaf: &LeafInfo, found: Descriptor| {
                if let Some((old, new)) = change.take() {
                    missed.push((*leaf, found, old, new));
                }
            };
            let _ = table.update_leaves(start, end - start, &mut decide, &mut lost, flusher);
            // A pending flush is issued by end_batch() (or was already done).
            let _ = batch.into_pending();
        }
        self.redo_after_walk(start, end, f, missed, later);
    }

    /// Installs the items in one table walk (`Stage2Table::fill_leaves`: a
    /// whole aligned 2 MiB item, a parent's block, as one block entry); if
    /// that fails (the table cannot grow), as many as fit, one run at a time.
    fn fill_leaves(&mut self, leaves: &[(Ipa, u64, PageState)]) -> usize {
        self.last.set(None);
        if !self.mem.is_live() {
            return 0;
        }
        if self.fill_in_one_walk(leaves) {
            return leaves.len();
        }
        self.fill_runs(leaves)
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

/// A leaf `update_leaves` changes after its walk: by pages (`None`: only
/// partly inside the range, the caller decides each page) or with this change.
type Later = (LeafInfo, Option<(PageState, PageState)>);
/// A leaf whose compare-and-swap lost: as shown, the value found, the change.
type Missed = (LeafInfo, Descriptor, PageState, PageState);

impl<M: Machine> LockedStage2<'_, M> {
    /// What `update_leaves` could not do in its walk: a lost compare-and-swap
    /// redone from what was found if the page state is still the one decided
    /// on; a block split and changed page by page.
    fn redo_after_walk(
        &mut self,
        start: Ipa,
        end: Ipa,
        f: &mut dyn FnMut(Ipa, u64, PageState) -> Option<PageState>,
        missed: Vec<Missed>,
        mut later: Vec<Later>,
    ) {
        for (leaf, found, old, new) in missed {
            let cur = LeafInfo::decode(leaf.ipa, leaf.level, found);
            let same = cur.filter(|c| decode(Some(*c), c.ipa) == old);
            match same {
                Some(cur) if cur.level == stage2::LAST_LEVEL => {
                    self.replace_retrying(&cur, old, new)
                }
                Some(cur) if self.write_protect_block(&cur, old, new) => {}
                _ if leaf.level < stage2::LAST_LEVEL => later.push((leaf, Some((old, new)))),
                _ => {}
            }
        }
        for (leaf, change) in later {
            match change {
                // Never for fork (2 MiB-aligned chunks); pages one by one.
                None => self.update_block_pages(&leaf, start, end, f),
                // A block migration entry write-protected by a fork stays one
                // entry (`write_protect_block`); a mapped block got its
                // descriptor in the walk.
                Some((old, new))
                    if leaf.level < stage2::LAST_LEVEL
                        && self.write_protect_block(&leaf, old, new) => {}
                Some((old, new)) => {
                    for i in 0..leaf.size() / PAGE_SIZE {
                        let _ = self.cas(leaf.ipa + i * PAGE_SIZE, old.page(i), new.page(i));
                    }
                }
            }
        }
    }

    /// The descriptor `update_leaves` writes over `leaf` for `old` -> `new`:
    /// for a block only a write-protect of the same frames (anything else is
    /// split first, None); for a page, `new` encoded.
    fn replacement(&self, leaf: &LeafInfo, old: PageState, new: PageState) -> Option<Descriptor> {
        if leaf.level < stage2::LAST_LEVEL {
            return write_protected(leaf, old, new, self.enc());
        }
        if self.mem.batching
            && matches!(leaf.leaf, Leaf::Mapped(_))
            && matches!(new, PageState::Invalid | PageState::Swapped { .. })
        {
            // Noted before the write (a failed CAS only makes it stricter).
            self.mem.bbm_note(leaf.ipa, PAGE_SIZE);
        }
        let fetch = fetch_after(leaf, leaf.ipa, new);
        Some(encode(new, self.enc(), fetch, self.zero_page()))
    }

    /// `leaves` as stage-2 items, each checked; false, with nothing changed,
    /// if they cannot all be installed in one walk.
    fn fill_in_one_walk(&mut self, leaves: &[(Ipa, u64, PageState)]) -> bool {
        let mut items = Vec::new();
        if items.try_reserve_exact(leaves.len()).is_err() {
            return false;
        }
        let (enc, zero) = (self.enc(), self.zero_page());
        for &(ipa, pages, entry) in leaves {
            check_transition(PageState::Invalid, entry);
            self.mem.bbm_check_make(ipa, pages * PAGE_SIZE);
            let level = match entry {
                PageState::Invalid => continue,
                PageState::Mapped { pfn, .. }
                    if pages * PAGE_SIZE == BLOCK_SIZE
                        && ipa.is_aligned(BLOCK_SIZE)
                        && pfn.pa().is_aligned(BLOCK_SIZE) =>
                {
                    stage2::LAST_LEVEL - 1
                }
                // A run of pages: the general path maps it.
                PageState::Mapped { .. } if pages != 1 => return false,
                _ => stage2::LAST_LEVEL,
            };
            let desc = match entry {
                // Coherent already (mapped by the parent), execute-never until
                // a fetch faults, as `map_run` maps a shared run.
                PageState::Mapped { pfn, writable } => Descriptor::leaf_encoded(
                    pfn.pa().raw(),
                    level,
                    ram_attrs(writable, Fetch::Faults),
                    true,
                    enc,
                )
                .expect("leaf descriptor"),
                _ => encode(entry, enc, Fetch::Faults, zero),
            };
            items.push((ipa.page(), level, desc));
        }
        let table = self.mem.table();
        table.fill_leaves(&items, &self.mem.tlb()).is_ok()
    }

    /// Groups consecutive items into runs, each mapped with one table call (a
    /// whole aligned 2 MiB run as one block entry); how many were installed.
    fn fill_runs(&mut self, leaves: &[(Ipa, u64, PageState)]) -> usize {
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
}

/// The read-only block descriptor of `leaf` if `old` -> `new` only
/// write-protects it (the same frames); None for any other change.
pub(crate) fn write_protected(
    leaf: &LeafInfo,
    old: PageState,
    new: PageState,
    enc: AttrEncoding,
) -> Option<Descriptor> {
    let (
        PageState::Mapped { pfn: a, .. },
        PageState::Mapped {
            pfn: b,
            writable: false,
        },
    ) = (old, new)
    else {
        return None;
    };
    let Leaf::Mapped(m) = leaf.leaf else {
        return None;
    };
    if a != b {
        return None;
    }
    // Execute permission stays as it was: the frames do not change.
    let fetch = if m.attrs.perm.exec {
        Fetch::Allowed
    } else {
        Fetch::Faults
    };
    let attrs = ram_attrs(false, fetch);
    Descriptor::leaf_encoded(m.pa.raw(), leaf.level, attrs, m.young, enc).ok()
}
