//! A VM's host stage 2: page leaves, 2 MiB block leaves (512 consecutive frames) and the
//! last-level tables pages need. A page installed where no last-level table exists yet, and
//! the split of a block before one of its pages changes, take a table page from the world's
//! bounded budget ([`HostHw::set_table_budget`]) and fail when none is left, as the
//! hypervisor's table does; clearing a whole block ([`Stage2Locked::clear_leaf`]) and
//! write-protecting one (fork's `update_leaves`) never allocate. Changes invalidate the TLB
//! model as the hypervisor's table invalidates the TLB (see [`super::hw`]).

use super::hw::{page_of, HostHw};
use crate::backend::{CasError, PageState, Stage2, Stage2Locked};
use crate::lock::{Level, OrderedMutex, OrderedMutexGuard};
use crate::{Ipa, Pfn, UnlinkProof, VmId, PAGE_SIZE};
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::ops::Range;

#[path = "stage2_block.rs"]
mod block;

/// Pages in a block leaf.
pub const BLOCK_PAGES: u64 = 512;
/// Bytes a block leaf maps.
pub const BLOCK_SIZE: u64 = BLOCK_PAGES * PAGE_SIZE;

/// The 2 MiB chunk holding `ipa`.
fn chunk(ipa: Ipa) -> Ipa {
    ipa.align_down(BLOCK_SIZE)
}

/// Leaves of one VM (each with its access flag) and its last-level tables.
#[derive(Default)]
pub(super) struct Tables {
    pages: BTreeMap<Ipa, (PageState, bool)>,
    /// Block leaves by first IPA: the entry of their first page.
    blocks: BTreeMap<Ipa, (PageState, bool)>,
    /// Chunks that have a last-level table.
    tables: BTreeSet<Ipa>,
    /// `clear_leaf` failures a test injected, by page.
    clear_faults: BTreeMap<Ipa, ClearFault>,
}

/// How an injected `clear_leaf` failure behaves (what hyp's real table can do).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClearFault {
    /// Once: the entry reads as changed (the hardware set its access flag between the
    /// caller's lookup and the clear); the next try succeeds.
    Changed,
    /// Always: the entry cannot be cleared (a block across the region's end with no table
    /// page to split it); it stays mapped.
    Stuck,
}

impl Tables {
    fn lookup(&self, ipa: Ipa) -> PageState {
        let page = page_of(ipa);
        if let Some(e) = self.pages.get(&page) {
            return e.0;
        }
        let base = chunk(page);
        self.blocks
            .get(&base)
            .map_or(PageState::Invalid, |b| b.0.page((page - base) / PAGE_SIZE))
    }

    fn next_entry(&self, from: Ipa, end: Ipa) -> Option<(Ipa, PageState)> {
        if from >= end {
            return None;
        }
        let page = self.pages.range(from..end).next().map(|(&i, e)| (i, e.0));
        // A block starting before `from` is reported from `from` on, as hyp does.
        let block = self
            .blocks
            .range(from.saturating_sub(BLOCK_SIZE - 1)..end)
            .next()
            .map(|(&b, e)| {
                let at = b.max(from);
                (at, e.0.page((at - b) / PAGE_SIZE))
            });
        match (page, block) {
            (Some(p), Some(b)) => Some(if p.0 < b.0 { p } else { b }),
            (p, b) => p.or(b),
        }
    }

    /// Every leaf, a block as its pages.
    pub(super) fn entries(&self) -> Vec<(Ipa, PageState)> {
        let mut all: Vec<(Ipa, PageState)> = self.pages.iter().map(|(&i, e)| (i, e.0)).collect();
        for (&b, e) in &self.blocks {
            all.extend((0..BLOCK_PAGES).map(|i| (b + i * PAGE_SIZE, e.0.page(i))));
        }
        all.sort_by_key(|&(ipa, _)| ipa);
        all
    }
}

type Table = Option<Tables>;

/// Every change of a leaf goes through here: one not in `PageState`'s transition table is a
/// bug in the reverse map (or in a test driving the backend), so it panics, in every build.
fn check_transition(old: PageState, new: PageState) {
    if let Err(bad) = PageState::check_transition(old, new) {
        panic!("{bad}");
    }
}

/// Whether the first of `leaves` is a whole aligned block item (a parent's block a fork
/// copies): only such an item becomes a block leaf, so every block leaf maps a folio whose
/// entire mapcount counts it (`crate::folio`); a run of page items stays pages.
fn block_item(leaves: &[(Ipa, u64, PageState)]) -> bool {
    matches!(leaves.first(), Some(&(ipa, BLOCK_PAGES, PageState::Mapped { pfn, .. }))
        if ipa.is_aligned(BLOCK_SIZE) && pfn.is_aligned(BLOCK_PAGES))
}

/// A VM's stage 2 (see the module documentation). `None` once freed: any access after that
/// panics, which is how a test sees a walker reach freed tables.
pub struct HostStage2 {
    vm: VmId,
    hw: Arc<HostHw>,
    table: OrderedMutex<Table>,
}

/// A locked [`HostStage2`].
pub struct HostStage2Guard<'a> {
    vm: VmId,
    hw: &'a HostHw,
    table: OrderedMutexGuard<'a, Table>,
}

impl HostStage2Guard<'_> {
    pub(super) fn map(&self) -> &Tables {
        let vm = self.vm;
        self.table
            .as_ref()
            .unwrap_or_else(|| panic!("rmap walker reached freed stage-2 tables of {vm:?}"))
    }

    fn map_mut(&mut self) -> &mut Tables {
        let vm = self.vm;
        self.table
            .as_mut()
            .unwrap_or_else(|| panic!("rmap walker reached freed stage-2 tables of {vm:?}"))
    }

    /// The leaf at `ipa`, or `None` once the tables are freed: for the guest's own accesses,
    /// which may outlive a destroy that ran under them (an rmap walker reaching freed tables
    /// is a bug, and `lookup` panics for it).
    pub fn live_lookup(&self, ipa: Ipa) -> Option<PageState> {
        self.table.as_ref().map(|t| t.lookup(ipa))
    }

    /// A table page for `chunk`, unless it has one; false if none is left (the world's
    /// hardware counts the refusal).
    fn ensure_table(&mut self, chunk: Ipa) -> bool {
        if self.map().tables.contains(&chunk) {
            return true;
        }
        if !self.hw.alloc_table() {
            return false;
        }
        self.map_mut().tables.insert(chunk);
        true
    }

    /// Splits the block holding `ipa` into pages (break-before-make: the block's TLB entries
    /// are invalidated at once); false if no table page is left. True if there is no block.
    fn split(&mut self, ipa: Ipa) -> bool {
        let base = chunk(ipa);
        let Some(&(entry, young)) = self.map().blocks.get(&base) else {
            return true;
        };
        if !self.ensure_table(base) {
            return false;
        }
        self.hw.block_split(entry);
        let t = self.map_mut();
        t.blocks.remove(&base);
        for i in 0..BLOCK_PAGES {
            t.pages.insert(base + i * PAGE_SIZE, (entry.page(i), young));
        }
        self.hw.invalidate(self.vm, base..base + BLOCK_SIZE);
        true
    }

    /// The CAS of both `compare_exchange`s; `defer` leaves the invalidation pending.
    fn cas(
        &mut self,
        ipa: Ipa,
        old: PageState,
        new: PageState,
        defer: bool,
    ) -> Result<(), CasError> {
        let page = page_of(ipa);
        let current = self.lookup(page);
        if current != old {
            return Err(CasError::Changed(current));
        }
        check_transition(old, new);
        if !self.split(page) {
            return Err(CasError::NoMemory);
        }
        if new != PageState::Invalid && !self.ensure_table(chunk(page)) {
            return Err(CasError::NoMemory);
        }
        let t = self.map_mut();
        match new {
            PageState::Invalid => t.pages.remove(&page),
            _ => t.pages.insert(page, (new, true)),
        };
        if matches!(old, PageState::Mapped { .. }) && !defer {
            self.hw.invalidate(self.vm, page..page + PAGE_SIZE);
        }
        if let PageState::Mapped { pfn, writable } = new {
            self.hw.check_install(self.vm, page, 1, pfn, writable);
        }
        Ok(())
    }

    /// Maps a fresh writable block of the 512 frames from `pfn` (aligned) at `ipa` (aligned)
    /// if the chunk is empty; no table page is needed (hyp's `map_block`).
    pub fn map_block(&mut self, ipa: Ipa, pfn: Pfn) -> bool {
        assert!(
            ipa.is_aligned(BLOCK_SIZE) && pfn.is_aligned(BLOCK_PAGES),
            "misaligned block"
        );
        let entry = PageState::Mapped {
            pfn,
            writable: true,
        };
        self.install_block(ipa, entry)
    }

    /// A block leaf at the aligned `ipa` if its chunk is empty.
    fn install_block(&mut self, ipa: Ipa, entry: PageState) -> bool {
        if self.next_entry(ipa, ipa + BLOCK_SIZE).is_some() {
            return false;
        }
        check_transition(PageState::Invalid, entry);
        if let PageState::Mapped { pfn, writable } = entry {
            self.hw
                .check_install(self.vm, ipa, BLOCK_PAGES, pfn, writable);
        }
        self.map_mut().blocks.insert(ipa, (entry, true));
        true
    }

    /// Whether a block leaf maps `ipa`.
    pub fn is_block(&self, ipa: Ipa) -> bool {
        self.map().blocks.contains_key(&chunk(ipa))
    }

    /// Installs one item of `fill_leaves` page by page (taken out again if a page fails, so
    /// the count stays exact).
    fn fill_leaf(&mut self, ipa: Ipa, pages: u64, entry: PageState) -> bool {
        let page = |i: u64| (ipa + i * PAGE_SIZE, entry.page(i));
        let done = (0..pages)
            .take_while(|&i| {
                let (at, e) = page(i);
                self.compare_exchange(at, PageState::Invalid, e).is_ok()
            })
            .count() as u64;
        if done == pages {
            return true;
        }
        for i in 0..done {
            let (at, e) = page(i);
            let _ = self.compare_exchange(at, e, PageState::Invalid);
        }
        false
    }

    /// `update_leaves` for a block wholly inside the range: reported once; a write-protect
    /// keeps it a block (one immediate invalidation), any other change goes page by page.
    fn update_block(
        &mut self,
        base: Ipa,
        f: &mut dyn FnMut(Ipa, u64, PageState) -> Option<PageState>,
    ) {
        let old = self.lookup(base);
        let Some(new) = f(base, BLOCK_PAGES, old).filter(|&n| n != old) else {
            return;
        };
        // A block migration entry (block migration, `Rmap::migrate_folio`) is write-protected
        // in place too: splitting it would need a table page, and a parent left writable
        // while its child shares the frames read-only would break copy-on-write.
        let protect = matches!(
            (old, new),
            (PageState::Mapped { pfn: a, .. }, PageState::Mapped { pfn: b, writable: false })
            | (PageState::Migrating { pfn: a, .. }, PageState::Migrating { pfn: b, writable: false })
                if a == b
        );
        if protect {
            check_transition(old, new);
            if let Some(b) = self.map_mut().blocks.get_mut(&base) {
                b.0 = new;
            }
            self.hw.invalidate(self.vm, base..base + BLOCK_SIZE);
            return;
        }
        for i in 0..BLOCK_PAGES {
            let _ = self.cas(base + i * PAGE_SIZE, old.page(i), new.page(i), false);
        }
    }
}

impl Stage2Locked for HostStage2Guard<'_> {
    fn lookup(&self, ipa: Ipa) -> PageState {
        self.map().lookup(ipa)
    }
    fn compare_exchange(
        &mut self,
        ipa: Ipa,
        old: PageState,
        new: PageState,
    ) -> Result<(), CasError> {
        self.cas(ipa, old, new, false)
    }
    fn compare_exchange_deferred(
        &mut self,
        ipa: Ipa,
        old: PageState,
        new: PageState,
    ) -> Result<(), CasError> {
        self.cas(ipa, old, new, true)
    }
    fn test_and_clear_young(&mut self, ipa: Ipa) -> bool {
        let page = page_of(ipa);
        let t = self.map_mut();
        let leaf = match t.pages.get_mut(&page) {
            Some(e) => Some(e),
            None => t.blocks.get_mut(&chunk(page)),
        };
        leaf.is_some_and(|e| core::mem::replace(&mut e.1, false))
    }
    fn clear_leaf(
        &mut self,
        ipa: Ipa,
        old: PageState,
        within: Range<Ipa>,
    ) -> Result<(Ipa, u64, PageState), CasError> {
        let page = page_of(ipa);
        let found = self.lookup(page);
        if found != old {
            return Err(CasError::Changed(found));
        }
        match self.map_mut().clear_faults.get(&page).copied() {
            Some(ClearFault::Changed) => {
                self.map_mut().clear_faults.remove(&page);
                // Any other entry: the caller must look again.
                return Err(CasError::Changed(PageState::Migrating {
                    pfn: Pfn::new(u64::MAX),
                    writable: false,
                }));
            }
            Some(ClearFault::Stuck) => return Err(CasError::NoMemory),
            None => {}
        }
        let base = chunk(page);
        if base >= within.start && base + BLOCK_SIZE <= within.end {
            // A whole block goes as one entry: no split, no table page; TLB left pending.
            if let Some((first, _)) = self.map_mut().blocks.remove(&base) {
                check_transition(first, PageState::Invalid);
                return Ok((base, BLOCK_PAGES, first));
            }
        }
        self.cas(page, old, PageState::Invalid, true)
            .map(|()| (page, 1, old))
    }
    fn next_entry(&self, from: Ipa, end: Ipa) -> Option<(Ipa, PageState)> {
        self.map().next_entry(from, end)
    }
    fn lookup_block(&self, ipa: Ipa) -> Option<PageState> {
        self.map().blocks.get(&chunk(ipa)).map(|b| b.0)
    }
    fn compare_exchange_block(
        &mut self,
        ipa: Ipa,
        old: PageState,
        new: PageState,
    ) -> Result<(), CasError> {
        self.cas_block(ipa, old, new)
    }
    fn update_leaves(
        &mut self,
        start: Ipa,
        end: Ipa,
        f: &mut dyn FnMut(Ipa, u64, PageState) -> Option<PageState>,
    ) {
        let mut from = start;
        while let Some((ipa, entry)) = self.next_entry(from, end) {
            let base = chunk(ipa);
            if ipa == base && self.is_block(base) && base + BLOCK_SIZE <= end {
                self.update_block(base, f);
                from = base + BLOCK_SIZE;
                continue;
            }
            // A page, or a page of a block partly in the range (split on change).
            from = ipa + PAGE_SIZE;
            if let Some(new) = f(ipa, 1, entry).filter(|&n| n != entry) {
                let _ = self.cas(ipa, entry, new, false);
            }
        }
    }
    /// As hyp: a whole block item becomes one block leaf; anything else goes item by item.
    fn fill_leaves(&mut self, leaves: &[(Ipa, u64, PageState)]) -> usize {
        let mut done = 0;
        while done < leaves.len() {
            let (ipa, pages, entry) = leaves[done];
            if block_item(&leaves[done..]) {
                // Counted as one block entry: installed as one, or not at all.
                if !self.install_block(ipa, entry) {
                    break;
                }
                done += 1;
                continue;
            }
            if !self.fill_leaf(ipa, pages, entry) {
                break;
            }
            done += 1;
        }
        done
    }
}

impl HostStage2 {
    /// Empty tables for `vm`, on hardware of its own (unlimited table pages).
    pub fn new(vm: VmId) -> Self {
        Self::with_hw(vm, Arc::default())
    }

    /// Empty tables for `vm` on shared hardware (a world's budget and TLB model).
    pub fn with_hw(vm: VmId, hw: Arc<HostHw>) -> Self {
        HostStage2 {
            vm,
            hw,
            table: OrderedMutex::new(Level::STAGE2, "vm.stage2", Some(Tables::default())),
        }
    }

    /// The hardware it stands on.
    pub fn hw(&self) -> &Arc<HostHw> {
        &self.hw
    }

    /// Every leaf, a block as its 512 pages (empty once freed).
    pub fn entries(&self) -> Vec<(Ipa, PageState)> {
        self.table
            .lock()
            .as_ref()
            .map_or_else(Vec::new, Tables::entries)
    }

    /// Makes `clear_leaf` of the page at `ipa` fail as `fault` says (tests of the callers'
    /// failure paths, which the host tables otherwise never take).
    pub fn inject_clear_fault(&self, ipa: Ipa, fault: ClearFault) {
        if let Some(t) = self.table.lock().as_mut() {
            t.clear_faults.insert(page_of(ipa), fault);
        }
    }

    /// First IPAs of the block leaves (empty once freed).
    pub fn blocks(&self) -> Vec<Ipa> {
        let table = self.table.lock();
        table
            .as_ref()
            .map_or_else(Vec::new, |t| t.blocks.keys().copied().collect())
    }
}

impl Stage2 for HostStage2 {
    type Locked<'a> = HostStage2Guard<'a>;
    fn lock(&self) -> HostStage2Guard<'_> {
        HostStage2Guard {
            vm: self.vm,
            hw: &self.hw,
            table: self.table.lock(),
        }
    }
    fn lock_nested(&self) -> HostStage2Guard<'_> {
        HostStage2Guard {
            vm: self.vm,
            hw: &self.hw,
            table: self.table.lock_nested(1),
        }
    }
    fn flush_deferred(&self) {
        self.hw.flush(self.vm);
    }
    fn free_tables(&self, proof: UnlinkProof) {
        assert_eq!(proof.vm(), self.vm, "proof for another VM");
        *self.table.lock() = None;
        // The VMID is invalidated with the tables.
        self.hw.flush(self.vm);
    }
}
