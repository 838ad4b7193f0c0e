//! What the reverse map needs from the outside, kept minimal and hardware-free. The hypervisor
//! implements these with its stage-2 tables, VM table and frame allocator; `rmap::host` has
//! plain in-memory implementations for tests.

use crate::{Ipa, Pfn, VmId};
pub use mmtypes::PageState;

/// Why a stage-2 change was not made. Out of memory is a value here, returned by the change
/// that needed the table page, not a flag the caller reads later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CasError {
    /// The slot no longer holds the expected state; it holds this one.
    Changed(PageState),
    /// The change needed a stage-2 table page (a last-level table to create, a block to
    /// split) and none was left; the slot still holds the expected state.
    NoMemory,
}

/// A VM's stage-2 table while its lock is held (lock order level 4). Implementations do the
/// TLB maintenance a change needs (break-before-make) inside `compare_exchange`.
pub trait Stage2Locked {
    /// The leaf at `ipa`.
    fn lookup(&self, ipa: Ipa) -> PageState;
    /// Replaces the leaf at `ipa` if it still is `old`; otherwise says what was there, or
    /// that the table could not grow for the change.
    fn compare_exchange(
        &mut self,
        ipa: Ipa,
        old: PageState,
        new: PageState,
    ) -> Result<(), CasError>;
    /// Clears the access flag of a valid leaf; returns whether it was set.
    fn test_and_clear_young(&mut self, ipa: Ipa) -> bool;
    /// Like `compare_exchange`, but the TLB invalidation that replacing a valid leaf with an
    /// invalid one owes may be left pending until [`Stage2::flush_deferred`] (implementations
    /// must also do it before anyone else relies on this lock, as Linux's
    /// `flush_tlb_batched_pending`). Batched migration and reclaim use it for one invalidation
    /// per VM per batch. The default does not defer.
    fn compare_exchange_deferred(
        &mut self,
        ipa: Ipa,
        old: PageState,
        new: PageState,
    ) -> Result<(), CasError> {
        self.compare_exchange(ipa, old, new)
    }
    /// Changes many pages of this VM under one lock hold (batched migration and reclaim): for
    /// each `ipas[k]` (ascending) reads the leaf and, if `decide(k, entry)` returns a
    /// replacement, installs it, leaving the TLB invalidation a replaced valid leaf owes
    /// pending as [`Stage2Locked::compare_exchange_deferred`] does; `applied(k, old, new)`
    /// follows each change made (a block that cannot be split now stays as it was). Invalid
    /// slots are skipped. Every frame installed must already be coherent with the instruction
    /// cache: the frame that was there, or one [`FrameAllocator::copy`] wrote. The default
    /// looks up and changes page by page; a real table walks each last-level table once.
    fn update_pages(
        &mut self,
        ipas: &[Ipa],
        decide: &mut dyn FnMut(usize, PageState) -> Option<PageState>,
        applied: &mut dyn FnMut(usize, PageState, PageState),
    ) {
        for (k, &ipa) in ipas.iter().enumerate() {
            let old = self.lookup(ipa);
            if old == PageState::Invalid {
                continue;
            }
            if let Some(new) = decide(k, old) {
                if self.compare_exchange_deferred(ipa, old, new).is_ok() {
                    applied(k, old, new);
                }
            }
        }
    }

    /// Clears the whole leaf holding `ipa` if the entry at `ipa` still is `old`: a page, or a
    /// block lying inside `within`, which is cleared as one entry without being split, so this
    /// never allocates (teardown and restore use it; a block partly outside `within` is split
    /// and only `ipa`'s page cleared, which can fail for want of a table page). The TLB
    /// invalidation is left pending as [`Stage2Locked::compare_exchange_deferred`] leaves it:
    /// the caller flushes ([`Stage2::flush_deferred`]) before it frees what the leaf mapped.
    /// Returns the leaf's first IPA, its page count and the old entry of its first page, or
    /// what is at `ipa` if it is not `old`, or `NoMemory` if it could not be cleared for want
    /// of a table page to split a block. The default clears a page.
    fn clear_leaf(
        &mut self,
        ipa: Ipa,
        old: PageState,
        within: core::ops::Range<Ipa>,
    ) -> Result<(Ipa, u64, PageState), CasError> {
        let _ = within;
        let page = ipa.page();
        self.compare_exchange_deferred(page, old, PageState::Invalid)
            .map(|()| (page, 1, old))
    }
    /// The entry of the first page of the 2 MiB block leaf holding `ipa`, if one block leaf
    /// maps that whole chunk (a valid block, or a block-sized migration entry); `None` for
    /// page leaves and holes. Block migration (`Rmap::migrate_folio`) uses it to tell a
    /// mapper's block from 512 pages that look the same page by page. The default knows no
    /// blocks, so block migration backs off to page migration.
    fn lookup_block(&self, ipa: Ipa) -> Option<PageState> {
        let _ = ipa;
        None
    }

    /// Replaces the whole 2 MiB block leaf holding `ipa` if its first page still is `old`,
    /// with a block leaf whose first page is `new` (page `i` gets `new.page(i)`), as one
    /// entry: never split, so it never allocates. Block migration's two changes per mapper:
    /// `Mapped(p) -> Migrating(p)` (the "break" of break-before-make, Arm ARM DDI 0487
    /// D8.16.1: the invalidation that replacing a valid leaf owes is left pending until
    /// [`Stage2::flush_deferred`], as [`Stage2Locked::compare_exchange_deferred`] leaves it)
    /// and `Migrating(p) -> Mapped(q)` (the "make", after that flush; a new valid leaf
    /// over an invalid one owes no invalidation). `Changed` with what page `ipa` holds if
    /// the leaf is not such a block (a split one included: then it may even read as `old`).
    /// The default knows no blocks.
    fn compare_exchange_block(
        &mut self,
        ipa: Ipa,
        old: PageState,
        new: PageState,
    ) -> Result<(), CasError> {
        let _ = (old, new);
        Err(CasError::Changed(self.lookup(ipa)))
    }

    /// The first non-invalid leaf at or above `from` and below `end` (fork copies and
    /// destroy zaps with this).
    fn next_entry(&self, from: Ipa, end: Ipa) -> Option<(Ipa, PageState)>;

    /// Visits every non-invalid leaf in `[start, end)` in IPA order; `f` returns a
    /// replacement for the entry, or `None` to leave it. Fork write-protects a parent with
    /// this. The default uses `next_entry` and `compare_exchange`; a real table does it in one
    /// pass over its last-level tables.
    fn update_range(
        &mut self,
        start: Ipa,
        end: Ipa,
        f: &mut dyn FnMut(Ipa, PageState) -> Option<PageState>,
    ) {
        let mut from = start;
        while let Some((ipa, entry)) = self.next_entry(from, end) {
            from = ipa + crate::PAGE_SIZE;
            if let Some(new) = f(ipa, entry) {
                if new != entry {
                    let _ = self.compare_exchange(ipa, entry, new);
                }
            }
        }
    }

    /// Like [`Stage2Locked::update_range`], but a leaf mapping `pages` consecutive pages (a
    /// block) is reported once, as `f(ipa, pages, entry of its first page)`, and a replacement
    /// applies to the whole leaf (page `i` gets the replacement's frame + `i`). Fork uses it
    /// to copy a block as one entry. The default reports every page on its own.
    fn update_leaves(
        &mut self,
        start: Ipa,
        end: Ipa,
        f: &mut dyn FnMut(Ipa, u64, PageState) -> Option<PageState>,
    ) {
        self.update_range(start, end, &mut |ipa, entry| f(ipa, 1, entry));
    }

    /// [`Stage2Locked::fill`] for leaves of several pages (`(ipa, pages, entry of the first
    /// page)`); returns how many items were installed. The default installs page by page.
    /// Fork fills a child with its parent's frames, already mapped (and so coherent with the
    /// instruction cache) there: an implementation need not do I-cache maintenance again.
    fn fill_leaves(&mut self, leaves: &[(Ipa, u64, PageState)]) -> usize {
        for (n, &(ipa, pages, entry)) in leaves.iter().enumerate() {
            let page = |i: u64| (ipa + i * crate::PAGE_SIZE, entry.page(i));
            let done = (0..pages)
                .take_while(|&i| {
                    let (at, e) = page(i);
                    self.compare_exchange(at, PageState::Invalid, e).is_ok()
                })
                .count() as u64;
            if done < pages {
                // Take this item's pages out again so the count stays exact.
                for i in 0..done {
                    let (at, e) = page(i);
                    let _ = self.compare_exchange(at, e, PageState::Invalid);
                }
                return n;
            }
        }
        leaves.len()
    }

    /// Installs `entries` (ascending IPAs) into empty slots; returns how many were installed
    /// before the first failure (the table could not grow). Fork fills a child with this.
    fn fill(&mut self, entries: &[(Ipa, PageState)]) -> usize {
        entries
            .iter()
            .take_while(|(ipa, e)| self.compare_exchange(*ipa, PageState::Invalid, *e).is_ok())
            .count()
    }
}

/// A VM's stage-2 table.
pub trait Stage2 {
    /// The locked table.
    type Locked<'a>: Stage2Locked
    where
        Self: 'a;
    /// Takes the stage-2 lock (level 4).
    fn lock(&self) -> Self::Locked<'_>;
    /// Takes the stage-2 lock as the second of a pair (the fork child's, after the parent's).
    fn lock_nested(&self) -> Self::Locked<'_>;
    /// Performs the TLB invalidations `compare_exchange_deferred` left pending (one VMID-wide
    /// invalidation). The default has none pending.
    fn flush_deferred(&self) {}
    /// Frees the table memory. Takes the proof that every region was unlinked from the reverse
    /// map first, so no rmap walker can reach freed tables (DESIGN lesson 5).
    fn free_tables(&self, proof: crate::UnlinkProof);
}

/// The set of live VMs, as the rmap walker sees it.
pub trait VmSet {
    /// A VM's stage-2.
    type Vm: Stage2;
    /// Runs `f` on VM `id`, or returns `None` if it does not exist or is being destroyed.
    /// Implementations must keep the VM alive for the duration of `f` (e.g. an `Arc`) and
    /// must not hold any memory-manager lock while calling `f`.
    fn with_vm<R>(&self, id: VmId, f: impl FnOnce(&Self::Vm) -> R) -> Option<R>;
}

/// Host frames: allocation and contents.
///
/// Every frame this crate maps into a VM was last written by `zero`, `copy` or
/// [`SwapStore::load`] (or by the VM itself). Those three owe the data-cache maintenance a
/// guest needs: **on return the frame is clean to the point of coherency** — the hypervisor's
/// writes through its cacheable map are in memory, so a guest reading with its MMU or data
/// cache off, or through a Device mapping (non-cacheable accesses), sees them and not the
/// previous owner's data — or the CPU forces Write-Back at stage 2 (FEAT_S2FWB), which makes
/// the clean unnecessary. It is owed once per frame written, not per mapping: a frame mapped
/// again (fork, CoW sharing, putting a migration entry back) holds nothing new.
pub trait FrameAllocator {
    /// A free frame, or `None` when memory is exhausted. Its contents are unspecified, and so
    /// is the state of its cache lines: it reaches a VM only after `zero` or a full overwrite.
    fn alloc(&self) -> Option<Pfn>;
    /// A free 2 MiB-aligned run of [`crate::folio::FOLIO_PAGES`] frames (its first frame),
    /// or `None` when no such run is free. Contents and cache state unspecified, as for
    /// [`FrameAllocator::alloc`]: block migration (`Rmap::migrate_folio`) overwrites every
    /// frame with [`FrameAllocator::copy`] before any VM can see it. Each frame of the run
    /// is later returned with [`FrameAllocator::free`] on its own, like any other frame.
    /// The default has none: block migration then falls back to page migration.
    fn alloc_folio(&self) -> Option<Pfn> {
        None
    }
    /// Returns a frame whose last reference was dropped.
    fn free(&self, pfn: Pfn);
    /// Returns the 512 frames of the aligned run at `head`, whose last references were all
    /// dropped (a folio block migration moved whole): one call instead of 512. The default
    /// frees them one by one.
    fn free_folio(&self, head: Pfn) {
        head.run(crate::folio::FOLIO_PAGES)
            .for_each(|p| self.free(p));
    }
    /// Fills a frame with zeroes (before it reaches a VM); clean to the point of coherency on
    /// return (see the trait documentation).
    fn zero(&self, pfn: Pfn);
    /// Copies a frame's contents (CoW, migration); `dst` is clean to the point of coherency on
    /// return. Code pages need I-cache maintenance after (cleaning to the PoC does not make
    /// instruction fetch see the copy: that is the point of unification and an I-cache
    /// invalidation, done by the stage 2 when the frame is mapped executable).
    fn copy(&self, dst: Pfn, src: Pfn);
    /// Whether two frames hold the same bytes (same-page merging compares a pair after
    /// write-protecting both, Linux's `pages_identical`). Both are pinned and no VM can
    /// write either during the call.
    fn same_contents(&self, a: Pfn, b: Pfn) -> bool;
    /// Whether a frame holds only zero bytes (merging into the shared zero page checks it
    /// after write-protecting every mapping). The frame is pinned and no VM can write it
    /// during the call.
    fn is_zero(&self, pfn: Pfn) -> bool;
}

/// Where reclaimed pages go. Slots are reference-counted: one per swap entry in any stage-2,
/// plus one held by whoever created the slot (until its entries are installed), one by the
/// swap cache while it caches the slot, and one by each fault using the slot. A slot number
/// may be reused for another page as soon as its last reference is dropped, so nobody may use
/// a slot without holding a reference of their own (or the stage-2 lock of an entry that
/// still names it).
pub trait SwapStore {
    /// Saves a frame's contents into a new slot holding one reference; `None` if full.
    fn store(&self, pfn: Pfn) -> Option<u64>;
    /// Copies a slot's contents into a frame (the caller holds a reference). The frame is
    /// clean to the point of coherency on return, as after [`FrameAllocator::copy`].
    fn load(&self, slot: u64, pfn: Pfn);
    /// Takes one more reference on a slot the caller knows is live (a new swap entry, e.g. in
    /// a fork child, copied from an entry that holds one).
    fn dup(&self, slot: u64);
    /// Takes one more reference if `slot` is live; false (and nothing taken) if it is free.
    /// A fault takes its own reference with this while its stage-2 lock shows the entry
    /// (Linux's swap-in holds the swap entry the same way, `get_swap_device` and
    /// `swapcache_prepare`), so a concurrent zap (MEM_RELEASE) cannot free the slot, and
    /// the number cannot be reused for another page, while the fault still uses it.
    fn try_dup(&self, slot: u64) -> bool;
    /// Drops one reference; the last frees the slot.
    fn put(&self, slot: u64);
    /// References on `slot` now, or `None` for a slot that does not hold one page's
    /// contents (a shared marker such as an all-zero page), which the swap cache never
    /// caches.
    fn refs(&self, slot: u64) -> Option<u32>;
}
