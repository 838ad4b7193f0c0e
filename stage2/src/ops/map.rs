//! Mapping a range into empty slots.

use super::split::install_table;
use super::{cas, chunks, Chunk, Reserve};
use crate::flush::OpFlush;
use crate::sync::atomic::Ordering;
use crate::{
    level_size, Descriptor, DescriptorKind, Error, Flusher, S2Attrs, Stage2Table, TableMemory,
    LAST_LEVEL,
};

struct MapRange<'t, M: TableMemory> {
    t: &'t Stage2Table<M>,
    ipa: u64,
    pa: u64,
    attrs: S2Attrs,
    blocks: bool,
}

impl<M: TableMemory> MapRange<'_, M> {
    fn pa_of(&self, ipa: u64) -> u64 {
        self.pa + (ipa - self.ipa)
    }

    /// Whether the chunk is mapped by one leaf at `level` (if its slot is empty).
    fn leaf_here(&self, level: u8, c: &Chunk) -> bool {
        level == LAST_LEVEL
            || (self.blocks
                && level >= 1
                && c.full(level)
                && self.pa_of(c.base).is_multiple_of(level_size(level)))
    }

    /// Prepare: table pages needed below the table at `table` (`None`: a table still to be
    /// created, all empty), or [`Error::AlreadyMapped`].
    fn count(&self, table: Option<u64>, level: u8, start: u64, end: u64) -> Result<usize, Error> {
        let mut n = 0;
        for c in chunks(level, start, end) {
            let raw = table.map_or(0, |pa| {
                self.t.slot(pa, level, c.start).load(Ordering::Acquire)
            });
            match Descriptor::from_raw(raw).kind(level) {
                DescriptorKind::Table { pa } => {
                    n += self.count(Some(pa), level + 1, c.start, c.end)?
                }
                DescriptorKind::Empty if self.leaf_here(level, &c) => {}
                DescriptorKind::Empty => n += 1 + self.count(None, level + 1, c.start, c.end)?,
                _ => return Err(Error::AlreadyMapped),
            }
        }
        Ok(n)
    }

    /// Commit: the same walk, writing.
    fn commit(&self, table: u64, level: u8, start: u64, end: u64, reserve: &mut Reserve<'_, M>) {
        for c in chunks(level, start, end) {
            let slot = self.t.slot(table, level, c.start);
            let d = Descriptor::from_raw(slot.load(Ordering::Acquire));
            let next = match d.kind(level) {
                DescriptorKind::Table { pa } => pa,
                DescriptorKind::Empty if self.leaf_here(level, &c) => {
                    self.install_leaf(slot, level, c.base);
                    continue;
                }
                DescriptorKind::Empty => install_table(self.t, slot, reserve)
                    .expect("stage2: empty slot filled under the stage-2 lock"),
                _ => unreachable!("stage2: map prepare accepted a non-empty slot"),
            };
            self.commit(next, level + 1, c.start, c.end, reserve);
        }
    }

    fn install_leaf(&self, slot: &crate::sync::atomic::AtomicU64, level: u8, base: u64) {
        let enc = self.t.cfg.attr_encoding();
        let new = Descriptor::leaf_encoded(self.pa_of(base), level, self.attrs, true, enc)
            .expect("stage2: checked leaf");
        cas(slot, Descriptor::EMPTY, new)
            .expect("stage2: empty slot filled under the stage-2 lock");
        self.t.counters.account(level, Descriptor::EMPTY, new);
    }
}

/// [`Stage2Table::map`] and [`Stage2Table::map_pages`].
/// How [`map`] lays out and prepares a mapping.
#[derive(Clone, Copy)]
pub(crate) struct MapMode {
    /// Use 1 GiB and 2 MiB blocks where alignment allows.
    pub blocks: bool,
    /// The frames are already coherent with the instruction cache: no I-cache maintenance.
    pub coherent: bool,
}

pub(crate) fn map<M: TableMemory, F: Flusher + ?Sized>(
    t: &Stage2Table<M>,
    ipa: u64,
    pa: u64,
    len: u64,
    attrs: S2Attrs,
    how: MapMode,
    tlb: &F,
) -> Result<(), Error> {
    let blocks = how.blocks;
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
    let range = MapRange {
        t,
        ipa,
        pa,
        attrs,
        blocks,
    };
    let start_level = t.cfg.start_level();
    let needed = range.count(Some(t.root_pa), start_level, ipa, end)?;
    let mut reserve = Reserve::new(&t.mem, needed)?;
    if attrs.perm.exec && !how.coherent {
        OpFlush::new(tlb, t.vttbr()).icache(pa, len);
    }
    range.commit(t.root_pa, start_level, ipa, end, &mut reserve);
    Ok(())
}
