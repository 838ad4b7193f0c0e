//! Mapping a range into empty slots.

use super::driver::{OpVisitor, Step, Visit, Walk};
use crate::flush::OpFlush;
use crate::{
    level_size, AttrEncoding, Descriptor, DescriptorKind, Error, Flusher, S2Attrs, Stage2Table,
    TableMemory, LAST_LEVEL,
};

/// How [`map`] lays out and prepares a mapping.
#[derive(Clone, Copy)]
pub(crate) struct MapMode {
    /// Use 1 GiB and 2 MiB blocks where alignment allows.
    pub blocks: bool,
    /// The frames are already coherent with the instruction cache: no I-cache maintenance.
    pub coherent: bool,
}

/// The visitor: a leaf in every empty slot the range covers at the level it fits, tables
/// created on the way; any other non-empty slot is [`Error::AlreadyMapped`].
struct MapRange {
    ipa: u64,
    pa: u64,
    attrs: S2Attrs,
    blocks: bool,
    enc: AttrEncoding,
}

impl MapRange {
    fn pa_of(&self, ipa: u64) -> u64 {
        self.pa + (ipa - self.ipa)
    }

    /// Whether the chunk is mapped by one leaf at `level` (if its slot is empty).
    fn leaf_here(&self, v: &Visit) -> bool {
        v.level == LAST_LEVEL
            || (self.blocks
                && v.level >= 1
                && v.chunk.full(v.level)
                && self.pa_of(v.chunk.base).is_multiple_of(level_size(v.level)))
    }
}

impl OpVisitor for MapRange {
    type Error = Error;
    // Plain loads: a `Locked` slot is not empty either.
    const SETTLE: bool = false;

    fn visit(&mut self, v: &Visit) -> Step<Error> {
        match v.desc.kind(v.level) {
            DescriptorKind::Table { .. } => Step::Descend,
            DescriptorKind::Empty if self.leaf_here(v) => {
                let pa = self.pa_of(v.chunk.base);
                match Descriptor::leaf_encoded(pa, v.level, self.attrs, true, self.enc) {
                    Ok(leaf) => Step::Write(leaf),
                    Err(e) => Step::Stop(e),
                }
            }
            DescriptorKind::Empty => Step::Create,
            _ => Step::Stop(Error::AlreadyMapped),
        }
    }
}

/// [`Stage2Table::map`], [`Stage2Table::map_pages`] and [`Stage2Table::map_coherent`].
pub(crate) fn map<M: TableMemory, F: Flusher + ?Sized>(
    t: &Stage2Table<M>,
    ipa: u64,
    pa: u64,
    len: u64,
    attrs: S2Attrs,
    how: MapMode,
    tlb: &F,
) -> Result<(), Error> {
    let end = t.check_range(ipa, len)?;
    attrs.validate()?;
    if !pa.is_multiple_of(crate::PAGE_SIZE) {
        return Err(Error::Misaligned);
    }
    if pa
        .checked_add(len)
        .is_none_or(|e| e > 1u64 << t.cfg.pa_bits())
    {
        return Err(Error::OutOfRange);
    }
    let mut range = MapRange {
        ipa,
        pa,
        attrs,
        blocks: how.blocks,
        enc: t.cfg.attr_encoding(),
    };
    let walk = Walk::new(t, ipa, end);
    let reserve = walk.prepare(&mut range)?;
    let mut flush = OpFlush::new(tlb, t.vttbr());
    if attrs.perm.exec && !how.coherent {
        flush.icache(pa, len);
    }
    // Under the stage-2 lock the empty slots the prepare saw stay empty, so the commit cannot
    // stop; if it did, the error is returned rather than a panic.
    let r = walk.commit(&mut range, reserve, &mut flush);
    debug_assert!(
        r.is_ok(),
        "stage2: an empty slot was filled under the stage-2 lock"
    );
    Ok(r?)
}
