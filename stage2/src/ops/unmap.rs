//! Unmapping a range, freeing emptied tables, and freeing everything on destroy.

use super::driver::{After, Halt, NoMaintenance, OpVisitor, Step, Visit, Walk};
use super::Reserve;
use crate::flush::OpFlush;
use crate::{
    level_size, Descriptor, DescriptorKind, Error, Flusher, LeafInfo, Stage2Table, TableMemory,
    LAST_LEVEL,
};

/// The visitor: every leaf the range covers is cleared (a block it covers in part is split
/// first), every table it leaves empty is unlinked.
struct Unmapper<L: FnMut(&LeafInfo)> {
    on_leaf: L,
    removed: u64,
}

impl<L: FnMut(&LeafInfo)> OpVisitor for Unmapper<L> {
    type Error = Error;

    fn visit(&mut self, v: &Visit) -> Step<Error> {
        match v.desc.kind(v.level) {
            DescriptorKind::Empty => Step::Next,
            DescriptorKind::Table { .. } => Step::Descend,
            DescriptorKind::Leaf { .. } if v.level < LAST_LEVEL && !v.chunk.full(v.level) => {
                Step::Split
            }
            _ => Step::Write(Descriptor::EMPTY),
        }
    }

    fn table_post(&mut self, _: &Visit) -> After<Error> {
        After::Unlink
    }

    fn written(&mut self, v: &Visit, _: Descriptor) -> bool {
        if v.desc.is_valid() {
            self.removed += level_size(v.level);
        }
        if let Some(info) = LeafInfo::decode(crate::Ipa::new(v.chunk.base), v.level, v.desc) {
            (self.on_leaf)(&info);
        }
        false
    }
}

/// [`Stage2Table::unmap`].
pub(crate) fn unmap<M: TableMemory, F: Flusher + ?Sized>(
    t: &Stage2Table<M>,
    ipa: u64,
    len: u64,
    tlb: &F,
    on_leaf: impl FnMut(&LeafInfo),
) -> Result<u64, Error> {
    let end = t.check_range(ipa, len)?;
    let mut u = Unmapper {
        on_leaf,
        removed: 0,
    };
    let mut flush = OpFlush::new(tlb, t.vttbr());
    Walk::new(t, ipa, end).run(&mut u, &mut flush)?;
    Ok(u.removed)
}

/// The visitor of [`free_all`]: every table, deepest first.
struct FreeTables;

impl OpVisitor for FreeTables {
    type Error = core::convert::Infallible;
    const SETTLE: bool = false;

    fn visit(&mut self, v: &Visit) -> Step<Self::Error> {
        match v.desc.kind(v.level) {
            DescriptorKind::Table { .. } => Step::Descend,
            _ => Step::Next,
        }
    }

    fn table_post(&mut self, _: &Visit) -> After<Self::Error> {
        After::Free
    }
}

/// Frees every table page, root included ([`Stage2Table::destroy`]; TLB already invalidated).
pub(crate) fn free_all<M: TableMemory>(t: &Stage2Table<M>) {
    let walk = Walk::new(t, 0, t.cfg.ipa_limit());
    // Never stops and takes no pages: only `Descend`, `Next` and `Free`.
    let r = walk.commit(&mut FreeTables, Reserve::empty(&t.mem), &mut NoMaintenance);
    debug_assert_eq!(r, Ok::<(), Halt<_>>(()));
    t.mem.free_root(t.root_pa, t.cfg.root_pages());
}
