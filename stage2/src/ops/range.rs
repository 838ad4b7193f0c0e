//! Range operations for a fork: every leaf of a range changed in one walk
//! ([`Stage2Table::update_leaves`]), and a list of leaves installed in empty slots in one
//! walk ([`Stage2Table::fill_leaves`]). A fork of 1 GiB of 2 MiB blocks is 512 leaves on
//! each side; one walk per leaf (a lookup, then a compare-and-swap or a map, each from the
//! root) cost more than the change itself.

use super::driver::{OpVisitor, Step, Visit, Walk};
use super::leaf::check_new;
use super::Reserve;
use crate::flush::OpFlush;
use crate::{
    level_size, Descriptor, DescriptorKind, Error, Flusher, LeafInfo, Stage2Table, TableMemory,
};
use mmtypes::Ipa;

/// The visitor of [`Stage2Table::update_leaves`].
struct LeafUpdate<'f> {
    f: &'f mut dyn FnMut(&LeafInfo, bool) -> Option<Descriptor>,
    missed: &'f mut dyn FnMut(&LeafInfo, Descriptor),
    /// The leaf whose replacement is being written: shown again only if the write found the
    /// slot changed.
    writing: Option<LeafInfo>,
}

impl OpVisitor for LeafUpdate<'_> {
    type Error = core::convert::Infallible;
    // The replacement never makes a frame newly executable in practice (a write-protect keeps
    // what the leaf had), but if one did, the I-cache is made coherent as a CAS would.
    const ICACHE: bool = true;

    fn visit(&mut self, v: &Visit) -> Step<Self::Error> {
        if let Some(shown) = self.writing.take() {
            // The compare-and-swap lost to a concurrent change (a hardware Access-flag
            // update): `f` is not asked twice, the caller redoes it from what was found.
            (self.missed)(&shown, v.desc);
            return Step::Next;
        }
        if let DescriptorKind::Table { .. } = v.desc.kind(v.level) {
            return Step::Descend;
        }
        let Some(info) = LeafInfo::decode(Ipa::new(v.chunk.base), v.level, v.desc) else {
            return Step::Next; // empty, or an unknown pattern
        };
        let whole = v.chunk.full(v.level);
        match (self.f)(&info, whole) {
            Some(new) if whole && check_new(new, v.level).is_ok() => {
                self.writing = Some(info);
                Step::Write(new)
            }
            _ => Step::Next,
        }
    }

    fn written(&mut self, _: &Visit, _: Descriptor) -> bool {
        self.writing = None;
        false
    }
}

/// The visitor of [`Stage2Table::fill_leaves`]: `items` in ascending order, from `k` on.
struct FillList<'a> {
    items: &'a [(Ipa, u8, Descriptor)],
    k: usize,
}

impl OpVisitor for FillList<'_> {
    type Error = Error;
    // Plain loads: a `Locked` slot is not empty either.
    const SETTLE: bool = false;

    fn visit(&mut self, v: &Visit) -> Step<Error> {
        // Items of slots already passed (the prepare skips its writes without telling).
        while self
            .items
            .get(self.k)
            .is_some_and(|&(ipa, _, _)| ipa.raw() < v.chunk.start)
        {
            self.k += 1;
        }
        let Some(&(ipa, level, desc)) = self.items.get(self.k) else {
            return Step::Next;
        };
        if ipa.raw() >= v.chunk.end {
            return Step::Next; // no item in this slot
        }
        match v.desc.kind(v.level) {
            DescriptorKind::Table { .. } if v.level < level => Step::Descend,
            DescriptorKind::Empty if v.level < level => Step::Create,
            DescriptorKind::Empty if v.level == level && v.chunk.full(level) => Step::Write(desc),
            _ => Step::Stop(Error::AlreadyMapped),
        }
    }

    fn written(&mut self, _: &Visit, _: Descriptor) -> bool {
        self.k += 1;
        false
    }
}

impl<M: TableMemory> Stage2Table<M> {
    /// Offers every leaf (valid or software) translating some of `[ipa, ipa + len)` to
    /// `f(leaf, whole)`, in ascending order, in one walk: `whole` says whether the leaf lies
    /// wholly inside the range. A leaf `f` answers a new descriptor for (a leaf of the same
    /// level, or empty; only for a whole leaf) is compare-and-swapped in place as
    /// [`Stage2Table::compare_exchange_leaf`] would (break-before-make where the output or
    /// memory attributes change; a permission change, such as a fork's write-protect of a
    /// block, needs none, the TLB invalidation alone, Arm ARM D8.16.1), every invalidation
    /// owed going to one flush (per IPA for a few, the VMID past that, or `tlb`'s batch).
    /// If the slot changed between the load and the compare-and-swap, `f` is not asked again:
    /// `missed(leaf, found)` reports the leaf as `f` saw it and the value found.
    ///
    /// Caller holds the VM's stage-2 lock.
    pub fn update_leaves<F: Flusher + ?Sized>(
        &self,
        ipa: Ipa,
        len: u64,
        f: &mut dyn FnMut(&LeafInfo, bool) -> Option<Descriptor>,
        missed: &mut dyn FnMut(&LeafInfo, Descriptor),
        tlb: &F,
    ) -> Result<(), Error> {
        let end = self.check_range(ipa.raw(), len)?;
        let mut op = LeafUpdate {
            f,
            missed,
            writing: None,
        };
        let mut flush = OpFlush::new(tlb, self.vttbr());
        // Commit only: the visitor never creates or splits tables, so it needs no pages.
        let walk = Walk::new(self, ipa.raw(), end);
        let _ = walk.commit(&mut op, Reserve::empty(&self.mem), &mut flush);
        Ok(())
    }

    /// Installs `items` (IPA, level, leaf descriptor), ascending and each in its own slot, in
    /// empty slots in one walk, creating the tables on the way: all of them, or none and the
    /// error ([`Error::NoMemory`] before anything is allocated or written;
    /// [`Error::AlreadyMapped`] if a slot is not empty; [`Error::Misaligned`] if an IPA is not
    /// aligned to its level). Only empty slots are written, so no TLB invalidation is owed,
    /// and no I-cache maintenance is done: the frames must already be coherent (a fork
    /// child's copy of its parent's leaves).
    ///
    /// Caller holds the VM's stage-2 lock.
    pub fn fill_leaves<F: Flusher + ?Sized>(
        &self,
        items: &[(Ipa, u8, Descriptor)],
        tlb: &F,
    ) -> Result<(), Error> {
        let (Some(first), Some(last)) = (items.first(), items.last()) else {
            return Ok(());
        };
        let mut prev_end = 0;
        for &(ipa, level, desc) in items {
            let size = level_size(level);
            if !ipa.raw().is_multiple_of(size) || ipa.raw() < prev_end {
                return Err(Error::Misaligned);
            }
            check_new(desc, level)?;
            prev_end = ipa.raw() + size;
        }
        let start = first.0.raw();
        let end = self.check_range(start, last.0.raw() + level_size(last.1) - start)?;
        let mut op = FillList { items, k: 0 };
        let walk = Walk::new(self, start, end);
        let reserve = walk.prepare(&mut op)?;
        op.k = 0;
        let mut flush = OpFlush::new(tlb, self.vttbr());
        // Under the stage-2 lock the empty slots the prepare saw stay empty: the commit
        // cannot stop (if it did, the error is returned rather than a panic).
        let r = walk.commit(&mut op, reserve, &mut flush);
        debug_assert!(
            r.is_ok() && op.k == items.len(),
            "stage2: a fill left an item"
        );
        Ok(r?)
    }
}
