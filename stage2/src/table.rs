//! A VM's stage-2 table: the public operations.
//!
//! See the crate docs for what the caller must hold for each operation and for the TLB rules.

use crate::config::{S2Config, Vttbr};
use crate::descriptor::{Descriptor, DescriptorKind, S2Attrs};
use crate::memory::TableMemory;
use crate::stats::{Counters, Stats};
use crate::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use crate::tlb::{Batch, Flusher, TlbMaintenance};
use crate::walk::Visitor;
use crate::{level_shift, ops, Error, Perm, PAGE_SIZE};
use mmtypes::{Ipa, Pa, PageState};

pub use crate::leaf::{CasError, Leaf, LeafInfo, Mapping};

/// A VM's stage-2 translation table.
///
/// Owns its table pages (obtained from `M`), not the frames it maps.
pub struct Stage2Table<M: TableMemory> {
    pub(crate) cfg: S2Config,
    vmid: AtomicU16,
    pub(crate) root_pa: u64,
    pub(crate) mem: M,
    pub(crate) counters: Counters,
}

impl<M: TableMemory> Stage2Table<M> {
    /// An empty table for `vmid`, its root (of [`S2Config::root_pages`] concatenated pages)
    /// allocated from `mem`.
    ///
    /// Errors: [`Error::BadVmid`], [`Error::NoMemory`], and [`Error::Misaligned`] /
    /// [`Error::OutOfRange`] if `mem` returned an unusable root.
    pub fn new(cfg: S2Config, vmid: u16, mem: M) -> Result<Self, Error> {
        if vmid > cfg.max_vmid() {
            return Err(Error::BadVmid);
        }
        let pages = cfg.root_pages();
        let root_pa = mem.alloc_zeroed_root(pages).ok_or(Error::NoMemory)?;
        if let Err(e) = cfg.vttbr(root_pa, vmid) {
            mem.free_root(root_pa, pages);
            return Err(e);
        }
        let counters = Counters::default();
        counters.table_pages.store(pages as u64, Ordering::Relaxed);
        Ok(Stage2Table {
            cfg,
            vmid: AtomicU16::new(vmid),
            root_pa,
            mem,
            counters,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &S2Config {
        &self.cfg
    }

    /// The `VTCR_EL2` value (the same for every VM of one configuration).
    pub fn vtcr(&self) -> u64 {
        self.cfg.vtcr()
    }

    /// The `VTTBR_EL2` value: root address and current VMID.
    pub fn vttbr(&self) -> Vttbr {
        Vttbr::new(self.root_pa, self.vmid())
    }

    /// Physical address of the root table(s).
    pub fn root_pa(&self) -> u64 {
        self.root_pa
    }

    /// The current VMID.
    pub fn vmid(&self) -> u16 {
        self.vmid.load(Ordering::Relaxed)
    }

    /// Gives the VM a new VMID (VMID generation rollover). Caller: the stage-2 lock, the VM
    /// running on no CPU, and the old VMID's TLB entries invalidated before that VMID is reused.
    pub fn set_vmid(&self, vmid: u16) -> Result<(), Error> {
        if vmid > self.cfg.max_vmid() {
            return Err(Error::BadVmid);
        }
        self.vmid.store(vmid, Ordering::Relaxed);
        Ok(())
    }

    /// The table memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// A batch deferring the final invalidations of operations on this VM to one
    /// `invalidate_vmid` at its end.
    pub fn batch<'a, T: TlbMaintenance>(&self, tlb: &'a T) -> Batch<'a, T> {
        Batch::new(tlb, self.vttbr())
    }

    /// Maps `[ipa, ipa + len)` to `[pa, pa + len)` with `attrs`, Access flag set, using 1 GiB
    /// and 2 MiB blocks wherever alignment of both addresses and the length allow.
    ///
    /// Every slot of the range must be empty (no mapping, no software entry), else
    /// [`Error::AlreadyMapped`]. All table pages needed are allocated before anything is written:
    /// on [`Error::NoMemory`] nothing changed. Only empty slots are written, so no TLB
    /// invalidation is needed; for an executable mapping the I-cache is made coherent with
    /// `[pa, pa + len)` first.
    ///
    /// Caller holds the VM's stage-2 lock.
    pub fn map<F: Flusher + ?Sized>(
        &self,
        ipa: Ipa,
        pa: Pa,
        len: u64,
        attrs: S2Attrs,
        tlb: &F,
    ) -> Result<(), Error> {
        let how = ops::map::MapMode {
            blocks: true,
            coherent: false,
        };
        ops::map::map(self, ipa.raw(), pa.raw(), len, attrs, how, tlb)
    }

    /// [`Stage2Table::map`] with 4 KiB pages only (no blocks).
    pub fn map_pages<F: Flusher + ?Sized>(
        &self,
        ipa: Ipa,
        pa: Pa,
        len: u64,
        attrs: S2Attrs,
        tlb: &F,
    ) -> Result<(), Error> {
        let how = ops::map::MapMode {
            blocks: false,
            coherent: false,
        };
        ops::map::map(self, ipa.raw(), pa.raw(), len, attrs, how, tlb)
    }

    /// [`Stage2Table::map`] (`blocks`) or [`Stage2Table::map_pages`] for frames whose contents
    /// are already coherent with the instruction cache: mapped executable elsewhere and not
    /// written by the hypervisor since (a fork child's share of its parent's frames). Guest
    /// writes are the guest's own to make coherent, as on bare metal, and coherence belongs
    /// to the physical frame, not to the mapping, so no I-cache maintenance is done: for a
    /// forked 2 MiB block that would be 32,768 cache-line cleans of memory that did not change.
    pub fn map_coherent<F: Flusher + ?Sized>(
        &self,
        ipa: Ipa,
        pa: Pa,
        len: u64,
        attrs: S2Attrs,
        blocks: bool,
        tlb: &F,
    ) -> Result<(), Error> {
        let how = ops::map::MapMode {
            blocks,
            coherent: true,
        };
        ops::map::map(self, ipa.raw(), pa.raw(), len, attrs, how, tlb)
    }

    /// Removes every leaf (valid or software) in `[ipa, ipa + len)`, splitting blocks that lie
    /// partly outside the range, and frees table pages left empty. `on_leaf` sees each removed
    /// leaf (whole, as it was) so the caller can drop frame references and swap slots. Returns
    /// the number of bytes of valid mappings removed.
    ///
    /// TLB: removed valid entries are invalidated before return (or when the batch ends); a
    /// frame reported to `on_leaf` must not be reused before then. Table pages are freed only
    /// after an immediate VMID-wide invalidation. Tables for splitting blocks are reserved first:
    /// on [`Error::NoMemory`] nothing changed.
    ///
    /// Caller holds the VM's stage-2 lock, and excludes lockless users (lookup, walk, CAS,
    /// young) since table pages may be freed.
    pub fn unmap<F: Flusher + ?Sized>(
        &self,
        ipa: Ipa,
        len: u64,
        tlb: &F,
        on_leaf: impl FnMut(&LeafInfo),
    ) -> Result<u64, Error> {
        ops::unmap::unmap(self, ipa.raw(), len, tlb, on_leaf)
    }

    /// Sets the permissions of every valid leaf in `[ipa, ipa + len)` to `perm` (attributes,
    /// Access flag and software bits kept), splitting blocks that lie partly outside the range.
    /// Migration and swap entries in the range lose their `writable` flag when `perm` has no
    /// write. Holes are skipped.
    ///
    /// TLB: every changed valid entry is invalidated before return (or when the batch ends); the
    /// I-cache is made coherent before a frame becomes executable. On [`Error::NoMemory`]
    /// nothing changed.
    ///
    /// Caller holds the VM's stage-2 lock.
    pub fn protect<F: Flusher + ?Sized>(
        &self,
        ipa: Ipa,
        len: u64,
        perm: Perm,
        tlb: &F,
    ) -> Result<(), Error> {
        ops::protect::protect(self, ipa.raw(), len, perm, tlb)
    }

    /// Splits the block holding `ipa` so that the 4 KiB page at `ipa` has its own page
    /// descriptor (a 1 GiB block becomes 2 MiB blocks, the one holding `ipa` becomes pages),
    /// with break-before-make; the translation is unchanged. `Ok` if `ipa` is already a page.
    ///
    /// Errors: [`Error::NotMapped`] without a valid leaf, [`Error::NoMemory`] (nothing changed).
    ///
    /// Caller holds the VM's stage-2 lock.
    pub fn split_block<F: Flusher + ?Sized>(&self, ipa: Ipa, tlb: &F) -> Result<(), Error> {
        ops::split::split_block(self, ipa.raw(), tlb)
    }

    /// Stores the page state `entry` (`Migrating` or `Swapped`, else [`Error::BadDescriptor`])
    /// in the page slot of `ipa`, whatever it held (creating tables, or splitting a block, as
    /// needed), and returns what it held. A replaced valid entry is invalidated before return
    /// (or when the batch ends).
    ///
    /// Caller holds the VM's stage-2 lock.
    pub fn set_software<F: Flusher + ?Sized>(
        &self,
        ipa: Ipa,
        entry: PageState,
        tlb: &F,
    ) -> Result<Option<LeafInfo>, Error> {
        ops::leaf::set_software(self, ipa.raw(), entry, tlb)
    }

    /// Atomically replaces the descriptor of the slot at `level` on the walk of `ipa` with `new`
    /// if it holds `expected` (typically [`LeafInfo::desc`] from a lookup).
    ///
    /// `new` must be empty, a leaf descriptor for `level`, or a software entry (level 3; a
    /// migration entry of a 2 MiB-aligned frame at level 2 too, block migration's;
    /// [`Descriptor::LOCKED`] at any leaf level); `expected` must not be a table descriptor. Changing the output address or memory attributes
    /// of a valid entry to another valid entry is done with break-before-make: the slot goes
    /// `Locked`, is invalidated at once, then gets `new`. Other changes to a valid entry are
    /// invalidated before return (or when the batch ends), except setting the Access flag. The
    /// I-cache is made coherent before a frame becomes executable.
    ///
    /// Caller: the stage-2 lock when `expected` is empty; otherwise only table lifetime (see the
    /// crate docs), so fault handlers can race with each other and with hardware AF updates.
    pub fn compare_exchange_leaf<F: Flusher + ?Sized>(
        &self,
        ipa: Ipa,
        level: u8,
        expected: Descriptor,
        new: Descriptor,
        tlb: &F,
    ) -> Result<(), CasError> {
        ops::leaf::compare_exchange_leaf(self, ipa.raw(), level, expected, new, tlb)
    }

    /// Changes many pages under one lock hold: for each page `ipas[k]` (ascending), reads its
    /// leaf and, if `f(k, leaf)` returns a new descriptor, installs it as
    /// [`Stage2Table::compare_exchange_leaf`] would (break-before-make where needed, a racing
    /// Access-flag update retried by asking `f` again), then reports the outcome with
    /// `done(k, result)`. Consecutive pages in one last-level table are reached without
    /// walking from the root again, and every invalidation owed goes to one flush (per IPA
    /// for a few, the whole VMID past that, or the batch `tlb` defers to). A page still inside
    /// a block gets `Err(CasError::NoSlot)` (the caller splits). Empty slots are skipped.
    ///
    /// The frames installed must already be coherent with the instruction cache (mapped
    /// before, or written by the caller, who did the maintenance): no I-cache maintenance
    /// is done here.
    ///
    /// Caller holds the VM's stage-2 lock.
    pub fn update_pages<F: Flusher + ?Sized>(
        &self,
        ipas: &[Ipa],
        f: &mut dyn FnMut(usize, &LeafInfo) -> Option<Descriptor>,
        done: &mut dyn FnMut(usize, Result<(), CasError>),
        tlb: &F,
    ) {
        ops::leaf::update_pages(self, ipas, f, done, tlb)
    }

    /// Clears the Access flag of the valid leaf translating `ipa`; returns whether it was set
    /// (false for holes and software entries). For the reclaim clock.
    ///
    /// No TLB invalidation (the same choice as Linux/KVM `kvm_age_gfn`): clearing AF is not a
    /// change any translation depends on for correctness. A CPU that still caches the entry
    /// keeps accessing without setting AF again, so a hot page may look cold and be reclaimed
    /// early; reclaim itself replaces the entry with break-before-make, so this only costs a
    /// refault. A caller wanting precise ageing flushes the VM once per clock sweep
    /// ([`TlbMaintenance::invalidate_vmid`]). Works with hardware AF and with software AF
    /// (the next access takes an Access-flag fault and the handler calls
    /// [`Stage2Table::mkyoung`]).
    ///
    /// Caller: table lifetime only.
    pub fn test_and_clear_young(&self, ipa: Ipa) -> bool {
        ops::leaf::update_young(self, ipa.raw(), false)
    }

    /// Sets the Access flag of the valid leaf translating `ipa` (software AF: the Access-flag
    /// fault handler). Returns whether a valid leaf was found. No TLB maintenance is needed
    /// (entries that cause Access-flag faults are not cached).
    ///
    /// Caller: table lifetime only.
    pub fn mkyoung(&self, ipa: Ipa) -> bool {
        ops::leaf::update_young(self, ipa.raw(), true)
    }

    /// The leaf translating `ipa`: a valid block/page or a software entry; `None` for a hole
    /// or an IPA outside the range.
    ///
    /// Caller: table lifetime only. The answer may be stale as soon as it is returned; act on
    /// it with [`Stage2Table::compare_exchange_leaf`].
    pub fn lookup(&self, ipa: Ipa) -> Option<LeafInfo> {
        let (level, desc) = self.find(ipa.raw(), crate::LAST_LEVEL).ok()?;
        LeafInfo::decode(ipa, level, desc)
    }

    /// Visits `[ipa, ipa + len)` (see [`crate::walk`]).
    ///
    /// Errors: [`Error::OutOfRange`] if the range goes past the IPA size.
    ///
    /// Caller: table lifetime only.
    pub fn walk<V: Visitor + ?Sized>(
        &self,
        ipa: Ipa,
        len: u64,
        visitor: &mut V,
    ) -> Result<(), Error> {
        ops::walk::walk(self, ipa.raw(), len, visitor)
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }

    /// Frees every table page, root included, after invalidating the VMID's TLB entries
    /// (the VMID may then be reused). Mapped frames are not touched: the caller must have
    /// unmapped them (or walked them) and unlinked the VM from the reverse map first.
    pub fn destroy<T: TlbMaintenance + ?Sized>(self, tlb: &T) {
        tlb.invalidate_vmid(self.vttbr());
        ops::unmap::free_all(&self);
    }

    // ---- crate-internal helpers shared by the operations ----

    /// The descriptor slot for `ipa` at `level` in the table at `table_pa` (the root if `level`
    /// is the start level: concatenated pages are indexed as one table).
    pub(crate) fn slot(&self, table_pa: u64, level: u8, ipa: u64) -> &AtomicU64 {
        let idx = (ipa >> level_shift(level)) as usize;
        let idx = if level == self.cfg.start_level() {
            idx
        } else {
            idx & 511
        };
        // SAFETY: callers pass this table's root or the output address of a table descriptor
        // they read from it; the crate's concurrency contract (no `unmap`/`destroy` concurrent
        // with any other operation) keeps such a page allocated while they use the slot.
        let page = unsafe { self.mem.table(table_pa + (idx >> 9) as u64 * PAGE_SIZE) };
        &page[idx & 511]
    }

    /// Walks towards `ipa`, stopping at `target` or at the first non-table slot. Returns
    /// that slot's level and value, or [`Error::OutOfRange`].
    pub(crate) fn find(&self, ipa: u64, target: u8) -> Result<(u8, Descriptor), Error> {
        let (level, slot) = self.find_slot(ipa, target)?;
        Ok((level, Descriptor::from_raw(slot.load(Ordering::Acquire))))
    }

    /// As [`Self::find`], returning the slot itself.
    pub(crate) fn find_slot(&self, ipa: u64, target: u8) -> Result<(u8, &AtomicU64), Error> {
        self.find_slot_in(ipa, target)
            .map(|(level, slot, _)| (level, slot))
    }

    /// As [`Self::find_slot`], also returning the physical address of the table holding the
    /// slot (so that neighbouring slots can be reached without another walk).
    pub(crate) fn find_slot_in(
        &self,
        ipa: u64,
        target: u8,
    ) -> Result<(u8, &AtomicU64, u64), Error> {
        if ipa >= self.cfg.ipa_limit() {
            return Err(Error::OutOfRange);
        }
        let mut table = self.root_pa;
        let mut level = self.cfg.start_level();
        loop {
            let slot = self.slot(table, level, ipa);
            if level == target {
                return Ok((level, slot, table));
            }
            match Descriptor::from_raw(slot.load(Ordering::Acquire)).kind(level) {
                DescriptorKind::Table { pa } => {
                    table = pa;
                    level += 1;
                }
                _ => return Ok((level, slot, table)),
            }
        }
    }

    /// Checks `[ipa, ipa + len)` is a non-empty, page-aligned range inside the IPA space and
    /// returns its end.
    pub(crate) fn check_range(&self, ipa: u64, len: u64) -> Result<u64, Error> {
        if len == 0 {
            return Err(Error::EmptyRange);
        }
        if (ipa | len) & (PAGE_SIZE - 1) != 0 {
            return Err(Error::Misaligned);
        }
        match ipa.checked_add(len) {
            Some(end) if end <= self.cfg.ipa_limit() => Ok(end),
            _ => Err(Error::OutOfRange),
        }
    }
}
