//! `LockedStage2`: a VM's stage-2 table with its lock held (DESIGN level 4),
//! as the reverse map changes it, and the conversion between page states
//! (`mmtypes::PageState`, the vocabulary rmap and stage2 share) and stage-2
//! leaves. The `rmap::Stage2Locked`
//! operations on it are in `s2locked`.

use crate::machine::Machine;
use crate::memory::{ram_attrs, zero_page_attrs, Fetch, GuestMemory, ZERO_PAGE_SW};
use crate::PAGE_SIZE;
use core::cell::Cell;
use rmap::lock::OrderedMutexGuard;
use rmap::CasError as Refused;
use rmap::{Ipa, Pa, PageState, Pfn};
use stage2::{AttrEncoding, Batch, CasError, Descriptor, Leaf, LeafInfo, Perm};

/// What a run of pages is mapped for (`LockedStage2::map_run`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    /// The guest's access: read-only (copy-on-write) or writable.
    pub access: RunAccess,
    /// Where the frames come from.
    pub frames: Frames,
}

/// A run's guest permission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunAccess {
    /// Read (and execute): a copy-on-write share.
    Read,
    /// Read and write.
    Write,
}

/// Where a run's frames come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Frames {
    /// Just filled by the hypervisor: the table's maintenance applies.
    Fresh,
    /// Mapped elsewhere already (a fork child's fill): their contents are
    /// coherent with the I-cache and need no maintenance.
    Shared,
}

/// A 2 MiB block: guest RAM's first touch of an empty aligned chunk maps one.
pub const BLOCK_SIZE: u64 = 2 << 20;

/// The page state of page `ipa` of `leaf` (a slot stage2 reports as no
/// leaf, a hole or one a break-before-make holds, is `Invalid`: callers
/// retry).
pub(crate) fn decode(leaf: Option<LeafInfo>, ipa: Ipa) -> PageState {
    let Some(leaf) = leaf else {
        return PageState::Invalid;
    };
    match leaf.leaf {
        Leaf::Mapped(m) if m.attrs.sw & ZERO_PAGE_SW != 0 => PageState::ZeroPage,
        Leaf::Mapped(m) => PageState::Mapped {
            pfn: (m.pa + (ipa.page() - leaf.ipa)).pfn(),
            writable: m.attrs.perm.write,
        },
        // A block-sized migration entry (block migration) stands for its pages: page `i`
        // is frame `pfn + i`'s entry, whose lock a fault on it waits for.
        Leaf::Software(state) => state.page((ipa.page() - leaf.ipa) / PAGE_SIZE),
    }
}

/// The page-level descriptor of `state`, its MemAttr encoded as the
/// table's configuration says (FWB or not), executable as `fetch` says; a
/// zero-page entry maps `zero`, the machine's zero frame.
pub(crate) fn encode(state: PageState, enc: AttrEncoding, fetch: Fetch, zero: Pa) -> Descriptor {
    match state {
        PageState::Invalid => Descriptor::EMPTY,
        PageState::Mapped { pfn, writable } => {
            let attrs = ram_attrs(writable, fetch);
            Descriptor::leaf_encoded(pfn.pa().raw(), 3, attrs, true, enc).expect("page descriptor")
        }
        PageState::ZeroPage => {
            Descriptor::leaf_encoded(zero.raw(), 3, zero_page_attrs(), true, enc)
                .expect("zero-page descriptor")
        }
        PageState::Migrating { .. } | PageState::Swapped { .. } => {
            Descriptor::software(state).expect("a state an invalid descriptor keeps")
        }
    }
}

/// Whether page `ipa` of `leaf` stays executable as `new`: only if it was
/// and keeps its frame (a permission change, a migration entry's frame put
/// back). A new frame, or new contents, waits for a fetch to fault
/// ([`Fetch`]).
pub(crate) fn fetch_after(leaf: &LeafInfo, ipa: Ipa, new: PageState) -> Fetch {
    let same_frame = match (decode(Some(*leaf), ipa), new) {
        (PageState::Mapped { pfn: a, .. }, PageState::Mapped { pfn: b, .. }) => a == b,
        _ => false,
    };
    match leaf.leaf {
        Leaf::Mapped(m) if m.attrs.perm.exec && same_frame => Fetch::Allowed,
        _ => Fetch::Faults,
    }
}

/// Checks a change against the transition table (`mmtypes::state`) in
/// debug builds: rmap decides every change, from states only the
/// hypervisor writes, so a guest cannot reach a refused one; one is a
/// hypervisor bug. rmap's host tests check every change in every build,
/// and this crate's host tests run with debug assertions.
pub(crate) fn check_transition(old: PageState, new: PageState) {
    if cfg!(debug_assertions) {
        if let Err(bad) = PageState::check_transition(old, new) {
            panic!("{bad}");
        }
    }
}

/// The locked stage-2 as `rmap` uses it.
pub struct LockedStage2<'a, M: Machine> {
    pub(crate) mem: OrderedMutexGuard<'a, GuestMemory<M>>,
    /// The leaf the last `lookup` found, by page: a reverse-map walk verifies
    /// a page and then changes it, and the change reuses this instead of
    /// walking the table again. Used at most once (`cas` takes it) and cleared
    /// by every other change through this guard, so it can be stale only by
    /// what the hardware did meanwhile (an access-flag update), which makes
    /// the descriptor CAS fail and the retry look the leaf up afresh.
    pub(crate) last: Cell<Option<(Ipa, Option<LeafInfo>)>>,
}

impl<'a, M: Machine> LockedStage2<'a, M> {
    /// The view of a locked table (the guard is the VM's stage-2 lock).
    pub fn new(mem: OrderedMutexGuard<'a, GuestMemory<M>>) -> Self {
        LockedStage2 {
            mem,
            last: Cell::new(None),
        }
    }

    /// The VM's table still exists (it is freed by teardown, under this lock).
    pub fn is_live(&self) -> bool {
        self.mem.is_live()
    }

    /// The machine's shared zero frame.
    pub(crate) fn zero_page(&self) -> Pa {
        self.mem.machine().zero_page()
    }

    /// How this table's leaves encode MemAttr (for FWB or not).
    pub(crate) fn enc(&self) -> AttrEncoding {
        self.mem.table().config().attr_encoding()
    }

    pub(crate) fn cas(&mut self, ipa: Ipa, old: PageState, new: PageState) -> Result<(), Refused> {
        // A torn-down VM reads as empty and refuses every change: a console
        // command or rmap walker that still holds the VM must not panic.
        let Some(table) = self.mem.live() else {
            return Err(Refused::Changed(PageState::Invalid));
        };
        let page = ipa.page();
        let current = match self.last.take() {
            Some((at, leaf)) if at == page => leaf,
            _ => table.lookup(ipa),
        };
        let found = decode(current, ipa);
        if found != old {
            return Err(Refused::Changed(found));
        }
        check_transition(old, new);
        let valid = |s: PageState| matches!(s, PageState::Mapped { .. } | PageState::ZeroPage);
        if !valid(old) && valid(new) {
            self.mem.bbm_check_make(page, PAGE_SIZE);
        }
        let Some(mut current) = current else {
            // Filling a hole may need table pages: map() obtains them first.
            return self.fill_hole(ipa, new);
        };
        if current.level < stage2::LAST_LEVEL {
            // rmap works page by page: a block is split before one page changes.
            current = self.split(ipa)?;
        }
        match self.replace_leaf(&current, new) {
            Ok(()) => Ok(()),
            Err(CasError::Mismatch(d)) => Err(Refused::Changed(decode(
                LeafInfo::decode(ipa, current.level, d),
                ipa,
            ))),
            Err(_) => Err(Refused::Changed(found)),
        }
    }

    /// Maps a fresh, writable 2 MiB block (huge first-touch fault).
    pub fn map_block(&mut self, ipa: Ipa, pa: Pa) -> bool {
        let first_touch = PageState::Mapped {
            pfn: pa.pfn(),
            writable: true,
        };
        check_transition(PageState::Invalid, first_touch);
        self.last.set(None);
        if !self.mem.is_live() {
            return false;
        }
        let run = Run {
            access: RunAccess::Write,
            frames: Frames::Fresh,
        };
        self.map_run(ipa, pa.pfn(), BLOCK_SIZE / PAGE_SIZE, run)
    }

    /// CAS of a leaf the caller just read, retried while only a hardware
    /// access-flag update got in between.
    pub(crate) fn replace_retrying(&self, leaf: &LeafInfo, old: PageState, new: PageState) {
        check_transition(old, new);
        let mut cur = *leaf;
        while let Err(CasError::Mismatch(d)) = self.replace_leaf(&cur, new) {
            cur.desc = d;
            if decode(Some(cur), cur.ipa) != old {
                break;
            }
        }
    }

    /// Makes a writable block read-only as one entry, if `new` is exactly
    /// that; false if it is some other change (the caller splits).
    pub(crate) fn write_protect_block(
        &self,
        leaf: &LeafInfo,
        old: PageState,
        new: PageState,
    ) -> bool {
        if let (PageState::Migrating { pfn: a, .. }, PageState::Migrating { pfn: b, .. }) =
            (old, new)
        {
            // A block migration entry stays one entry too (fork during a block
            // migration): it cannot be split, and left writable while the child
            // shares its frames it would break copy-on-write once remapped.
            return a == b && self.write_protect_migration_block(leaf, old, new);
        }
        let Some(ro) = crate::s2locked::write_protected(leaf, old, new, self.enc()) else {
            return false;
        };
        check_transition(old, new);
        let table = self.mem.table();
        let tlb = self.mem.tlb();
        let batch = Batch::new(&tlb, table.vttbr());
        let flusher: &dyn stage2::Flusher = if self.mem.batching { &batch } else { &tlb };
        let ok = table
            .compare_exchange_leaf(leaf.ipa, leaf.level, leaf.desc, ro, flusher)
            .is_ok();
        // A pending flush is issued by end_batch() (or was already done).
        let _ = batch.into_pending();
        ok
    }

    /// Splits the block mapping `ipa` into pages; the page's leaf afterwards,
    /// or why not: no table page for the split, or the block changed.
    /// A split block mapping a folio counts page by page from then on: its
    /// folio's entire mapcount moves to the pages (`FrameTable::split_entire`,
    /// under this lock, before any page of it changes).
    pub(crate) fn split(&mut self, ipa: Ipa) -> Result<LeafInfo, Refused> {
        let table = self.mem.table();
        let changed = || Refused::Changed(decode(table.lookup(ipa), ipa));
        let block = match table.lookup(ipa) {
            Some(LeafInfo {
                leaf: Leaf::Mapped(m),
                level,
                ..
            }) if level < stage2::LAST_LEVEL => Some(m.pa.pfn()),
            _ => None,
        };
        match table.split_block(ipa, &self.mem.tlb()) {
            Err(stage2::Error::NoMemory) => Err(Refused::NoMemory),
            Err(_) => Err(changed()),
            Ok(()) => {
                if let Some(head) = block {
                    self.mem.machine().frame_table().split_entire(head);
                }
                table.lookup(ipa).ok_or_else(changed)
            }
        }
    }

    /// The pages of a block only partly inside an update: changed one by one
    /// (`cas` splits the block first).
    pub(crate) fn update_block_pages(
        &mut self,
        leaf: &LeafInfo,
        start: Ipa,
        end: Ipa,
        f: &mut dyn FnMut(Ipa, u64, PageState) -> Option<PageState>,
    ) {
        let (lo, hi) = (leaf.ipa.max(start), (leaf.ipa + leaf.size()).min(end));
        for ipa in lo.pages_to(hi) {
            let old = decode(Some(*leaf), ipa);
            if let Some(new) = f(ipa, 1, old).filter(|&n| n != old) {
                let _ = self.cas(ipa, old, new);
            }
        }
    }

    /// Readies page `ipa` for a restore that rewrites its frame in place: true
    /// if it is a page leaf (not a block) mapping `pfn` writable, the VM's own
    /// frame, and then it is made execute-never, so the new contents reach the
    /// I-cache only through a fetch fault ([`Fetch`]). False, with nothing
    /// changed, for any other entry. Taking execute permission away changes
    /// neither the output address nor the attributes, so it needs no
    /// break-before-make (Arm ARM DDI 0487 D8.16.1), only a TLB invalidation
    /// before the guest runs again: it is left to the caller's
    /// `Stage2::flush_deferred`.
    pub(crate) fn ready_refill(&mut self, ipa: Ipa, pfn: Pfn) -> bool {
        self.last.set(None);
        let own = PageState::Mapped {
            pfn,
            writable: true,
        };
        let Some(table) = self.mem.live() else {
            return false;
        };
        loop {
            let Some(leaf) = table.lookup(ipa) else {
                return false;
            };
            if leaf.level != stage2::LAST_LEVEL || decode(Some(leaf), ipa) != own {
                return false;
            }
            let Leaf::Mapped(m) = leaf.leaf else {
                return false;
            };
            if !m.attrs.perm.exec {
                return true;
            }
            let xn = leaf.desc.with_perm(Perm::new(true, true, false));
            let tlb = self.mem.tlb();
            let batch = Batch::new(&tlb, table.vttbr());
            let r = table.compare_exchange_leaf(leaf.ipa, leaf.level, leaf.desc, xn, &batch);
            let _ = batch.into_pending();
            match r {
                Ok(()) => return true,
                // Only the hardware's Access-flag update can race us here.
                Err(CasError::Mismatch(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// CAS of a leaf found by a lookup or walk. Inside a batch the final
    /// invalidation is left to `end_batch` (one VMID-wide flush).
    pub(crate) fn replace_leaf(&self, leaf: &LeafInfo, new: PageState) -> Result<(), CasError> {
        if self.mem.batching
            && matches!(leaf.leaf, Leaf::Mapped(_))
            && matches!(new, PageState::Invalid | PageState::Swapped { .. })
        {
            // Noted before the write (a failed CAS only makes it stricter).
            self.mem.bbm_note(leaf.ipa, leaf.size());
        }
        let table = self.mem.table();
        let fetch = fetch_after(leaf, leaf.ipa, new);
        if self.mem.batching {
            let tlb = self.mem.tlb();
            let batch = Batch::new(&tlb, table.vttbr());
            let r = table.compare_exchange_leaf(
                leaf.ipa,
                leaf.level,
                leaf.desc,
                encode(new, self.enc(), fetch, self.zero_page()),
                &batch,
            );
            // The pending VMID-wide flush is issued by end_batch().
            let _ = batch.into_pending();
            r
        } else {
            table.compare_exchange_leaf(
                leaf.ipa,
                leaf.level,
                leaf.desc,
                encode(new, self.enc(), fetch, self.zero_page()),
                &self.mem.tlb(),
            )
        }
    }

    /// Maps a run of pages with consecutive IPAs and frames in one table
    /// operation; returns false if the table could not grow.
    pub(crate) fn map_run(&mut self, ipa: Ipa, pfn: Pfn, pages: u64, run: Run) -> bool {
        let (writable, shared) = (run.access == RunAccess::Write, run.frames == Frames::Shared);
        let len = pages * PAGE_SIZE;
        self.mem.bbm_check_make(ipa, len);
        let table = self.mem.table();
        // Fresh frames' contents are new to the I-cache; shared ones may be
        // too (the mapper they come from may never have fetched from them).
        let attrs = ram_attrs(writable, Fetch::Faults);
        // A whole aligned 2 MiB run (a forked block) stays one block entry.
        let block =
            len == BLOCK_SIZE && ipa.is_aligned(BLOCK_SIZE) && pfn.pa().is_aligned(BLOCK_SIZE);
        let pa = pfn.pa();
        let result = match (shared, block) {
            (true, _) => table.map_coherent(ipa, pa, len, attrs, block, &self.mem.tlb()),
            (false, true) => table.map(ipa, pa, len, attrs, &self.mem.tlb()),
            (false, false) => table.map_pages(ipa, pa, len, attrs, &self.mem.tlb()),
        };
        // Out of table pages, as the callers report it: a short fill (fork's
        // OutOfFrames), or a block not mapped (the fault takes the page path).
        result.is_ok()
    }

    pub(crate) fn fill_hole(&mut self, ipa: Ipa, new: PageState) -> Result<(), Refused> {
        let table = self.mem.table();
        let result = match new {
            PageState::Invalid => return Ok(()),
            PageState::Mapped { pfn, writable } => table.map(
                ipa.page(),
                pfn.pa(),
                PAGE_SIZE,
                ram_attrs(writable, Fetch::Faults),
                &self.mem.tlb(),
            ),
            PageState::ZeroPage => table.map(
                ipa.page(),
                self.zero_page(),
                PAGE_SIZE,
                zero_page_attrs(),
                &self.mem.tlb(),
            ),
            PageState::Migrating { .. } | PageState::Swapped { .. } => {
                table.set_software(ipa, new, &self.mem.tlb()).map(|_| ())
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(stage2::Error::NoMemory) => Err(Refused::NoMemory),
            Err(_) => Err(Refused::Changed(PageState::Invalid)),
        }
    }
}
