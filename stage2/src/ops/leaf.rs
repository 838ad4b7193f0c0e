//! Single-leaf operations: software entries, compare-and-swap, Access flag.

use super::driver::{Halt, NoMaintenance, OpVisitor, Step, Visit, Walk};
use super::Reserve;
use crate::flush::OpFlush;
use crate::{
    CasError, Descriptor, DescriptorKind, Error, Flusher, LeafInfo, Stage2Table, TableMemory,
    LAST_LEVEL,
};
use mmtypes::{Ipa, PageState};

pub(crate) use super::update::update_pages;

/// Checks `new` may be stored in a leaf slot of `level`: a page state at the page level; a
/// migration entry also in a 2 MiB block slot (block migration replaces a block with one
/// entry standing for its pages, page `i` naming frame `pfn + i`, and back), its frame
/// aligned to the block.
pub(crate) fn check_new(new: Descriptor, level: u8) -> Result<(), Error> {
    match new.kind(level) {
        DescriptorKind::Empty | DescriptorKind::Leaf { .. } | DescriptorKind::Locked => Ok(()),
        DescriptorKind::Software(_) if level == LAST_LEVEL => Ok(()),
        DescriptorKind::Software(PageState::Migrating { pfn, .. })
            if level == LAST_LEVEL - 1 && pfn.pa().is_aligned(crate::level_size(level)) =>
        {
            Ok(())
        }
        _ => Err(Error::BadDescriptor),
    }
}

/// The visitor of [`set_software`]: make the path to the page slot (create tables in empty
/// slots, split blocks), then store the entry whatever the slot held.
struct SetSoftware {
    new: Descriptor,
    old: Option<LeafInfo>,
}

impl OpVisitor for SetSoftware {
    type Error = Error;

    fn visit(&mut self, v: &Visit) -> Step<Error> {
        if v.level == LAST_LEVEL {
            return Step::Write(self.new);
        }
        match v.desc.kind(v.level) {
            DescriptorKind::Table { .. } => Step::Descend,
            DescriptorKind::Empty => Step::Create,
            DescriptorKind::Leaf { .. } => Step::Split,
            // A software entry above the page level, an unknown pattern.
            _ => Step::Stop(Error::BadDescriptor),
        }
    }

    fn written(&mut self, v: &Visit, _: Descriptor) -> bool {
        self.old = LeafInfo::decode(Ipa::new(v.chunk.base), v.level, v.desc);
        false
    }
}

/// [`Stage2Table::set_software`].
pub(crate) fn set_software<M: TableMemory, F: Flusher + ?Sized>(
    t: &Stage2Table<M>,
    ipa: u64,
    entry: PageState,
    tlb: &F,
) -> Result<Option<LeafInfo>, Error> {
    let new = Descriptor::software(entry)?;
    let walk = Walk::page(t, ipa)?;
    let mut op = SetSoftware { new, old: None };
    let mut flush = OpFlush::new(tlb, t.vttbr());
    walk.run(&mut op, &mut flush)?;
    Ok(op.old)
}

/// The visitor of [`compare_exchange_leaf`]: down to `level` through tables, then `new` if
/// the slot holds `expected`.
struct Exchange {
    level: u8,
    expected: Descriptor,
    new: Descriptor,
}

impl OpVisitor for Exchange {
    type Error = CasError;
    // The value found is reported, `Locked` included: the caller decides whether to wait.
    const SETTLE: bool = false;
    const ICACHE: bool = true;

    fn visit(&mut self, v: &Visit) -> Step<CasError> {
        if v.level < self.level {
            return match v.desc.kind(v.level) {
                DescriptorKind::Table { .. } => Step::Descend,
                _ => Step::Stop(CasError::NoSlot {
                    level: v.level,
                    found: v.desc,
                }),
            };
        }
        if v.desc != self.expected {
            return Step::Stop(CasError::Mismatch(v.desc));
        }
        Step::Write(self.new)
    }
}

/// [`Stage2Table::compare_exchange_leaf`].
pub(crate) fn compare_exchange_leaf<M: TableMemory, F: Flusher + ?Sized>(
    t: &Stage2Table<M>,
    ipa: u64,
    level: u8,
    expected: Descriptor,
    new: Descriptor,
    tlb: &F,
) -> Result<(), CasError> {
    if !(t.cfg.start_level().max(1)..=LAST_LEVEL).contains(&level) {
        return Err(CasError::Invalid(Error::BadDescriptor));
    }
    check_new(new, level).map_err(CasError::Invalid)?;
    if expected.is_table(level) {
        // Tables are linked and unlinked only by structural operations.
        return Err(CasError::Invalid(Error::BadDescriptor));
    }
    let walk = Walk::page(t, ipa).map_err(CasError::Invalid)?;
    let mut op = Exchange {
        level,
        expected,
        new,
    };
    let mut flush = OpFlush::new(tlb, t.vttbr());
    // Commit only: the visitor never creates or splits, so it needs no pages.
    walk.commit(&mut op, Reserve::empty(&t.mem), &mut flush)
        .map_err(|h| match h {
            Halt::Stopped(e) => e,
            Halt::NoMemory => CasError::Invalid(Error::NoMemory),
        })
}

/// The visitor of [`update_young`]: the first non-table slot on the path of the page.
struct Young {
    young: bool,
    answer: bool,
}

impl OpVisitor for Young {
    type Error = core::convert::Infallible;
    const SETTLE: bool = false;
    // Neither setting nor clearing the Access flag is invalidated (see `test_and_clear_young`).
    const INVALIDATE: bool = false;

    fn visit(&mut self, v: &Visit) -> Step<Self::Error> {
        match v.desc.kind(v.level) {
            DescriptorKind::Table { .. } => Step::Descend,
            DescriptorKind::Leaf { .. } if v.desc.young() != self.young => {
                Step::Write(v.desc.with_young(self.young))
            }
            DescriptorKind::Leaf { .. } => {
                self.answer = self.young;
                Step::Next
            }
            _ => Step::Next,
        }
    }

    fn written(&mut self, _: &Visit, _: Descriptor) -> bool {
        self.answer = true;
        false
    }
}

/// Sets or clears the Access flag of the valid leaf translating `ipa`. Returns whether a valid
/// leaf was found (setting) or whether the flag was set (clearing).
pub(crate) fn update_young<M: TableMemory>(t: &Stage2Table<M>, ipa: u64, young: bool) -> bool {
    let Ok(walk) = Walk::page(t, ipa) else {
        return false;
    };
    let mut op = Young {
        young,
        answer: false,
    };
    // Takes no pages, never stops; its writes change only the Access flag.
    let _ = walk.commit(&mut op, Reserve::empty(&t.mem), &mut NoMaintenance);
    op.answer
}
