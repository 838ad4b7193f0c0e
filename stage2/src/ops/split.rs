//! Splitting blocks, creating tables on a path, and counting the pages that needs.

use super::{cas, chunks, load_settled, locked, Reserve};
use crate::flush::OpFlush;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::{
    level_size, Descriptor, DescriptorKind, Error, Flusher, Stage2Table, TableMemory, LAST_LEVEL,
};

/// Table pages needed to split the block at `level` so that exactly `[start, end)` (part of it)
/// gets its own descriptors: one table, plus the splits of partly covered blocks below.
pub(crate) fn split_cost(level: u8, start: u64, end: u64) -> usize {
    let below = level + 1;
    let partial = |c: &super::Chunk| below < LAST_LEVEL && !c.full(below);
    1 + chunks(below, start, end)
        .filter(partial)
        .map(|c| split_cost(below, c.start, c.end))
        .sum::<usize>()
}

/// Table pages needed to split the valid blocks that `[start, end)` covers only in part, in
/// the table at `table_pa` of `level`.
pub(crate) fn count_partial_blocks<M: TableMemory>(
    t: &Stage2Table<M>,
    table_pa: u64,
    level: u8,
    start: u64,
    end: u64,
) -> usize {
    let mut n = 0;
    for c in chunks(level, start, end) {
        let d = load_settled(t.slot(table_pa, level, c.start));
        match d.kind(level) {
            DescriptorKind::Table { pa } => {
                n += count_partial_blocks(t, pa, level + 1, c.start, c.end)
            }
            DescriptorKind::Leaf { .. } if level < LAST_LEVEL && !c.full(level) => {
                n += split_cost(level, c.start, c.end)
            }
            _ => {}
        }
    }
    n
}

/// Replaces the valid block `old` in `slot` (at `level`, translating from `base`) by a table of
/// next-level leaves with the same translation and attributes, by break-before-make. `Err`
/// with the value found if the slot no longer holds `old`. Caller holds the stage-2 lock.
pub(crate) fn split_slot<M: TableMemory, F: Flusher + ?Sized>(
    t: &Stage2Table<M>,
    slot: &AtomicU64,
    level: u8,
    base: u64,
    old: Descriptor,
    reserve: &mut Reserve<'_, M>,
    flush: &mut OpFlush<'_, F>,
) -> Result<u64, Descriptor> {
    let sub = level_size(level + 1);
    let pa = old.output_address(level);
    // Break first: once the slot is Locked neither hardware nor lockless updaters touch it, so
    // the children are built from its final value.
    cas(slot, old, Descriptor::from_raw(locked()))?;
    let table = reserve.take();
    // SAFETY: the reserve holds pages from `alloc_zeroed_table`; this one is ours until it is
    // linked below, and a linked table lives until `unmap`/`destroy`, which cannot run
    // concurrently with a split (the caller holds the stage-2 lock).
    for (i, e) in unsafe { t.mem.table(table) }.iter().enumerate() {
        e.store(
            old.with_output(pa + i as u64 * sub, level + 1).raw(),
            Ordering::Relaxed,
        );
    }
    flush.break_now(base, level);
    slot.store(Descriptor::table(table).raw(), Ordering::Release);
    t.counters.account(level, old, Descriptor::EMPTY);
    t.counters.leaves[level as usize + 1].fetch_add(512, Ordering::Relaxed);
    t.counters.table_pages.fetch_add(1, Ordering::Relaxed);
    Ok(table)
}

/// Links a fresh table from `reserve` into the empty `slot`. `Err` with the value found if the
/// slot is no longer empty.
pub(crate) fn install_table<M: TableMemory>(
    t: &Stage2Table<M>,
    slot: &AtomicU64,
    reserve: &mut Reserve<'_, M>,
) -> Result<u64, Descriptor> {
    let table = reserve.take();
    match cas(slot, Descriptor::EMPTY, Descriptor::table(table)) {
        Ok(()) => {
            t.counters.table_pages.fetch_add(1, Ordering::Relaxed);
            Ok(table)
        }
        Err(found) => {
            t.mem.free_table(table);
            Err(found)
        }
    }
}

/// Table pages needed to give `ipa` its own page slot (creating tables or splitting blocks).
pub(crate) fn path_cost<M: TableMemory>(t: &Stage2Table<M>, ipa: u64) -> Result<usize, Error> {
    let (level, _) = t.find(ipa, LAST_LEVEL)?;
    Ok((LAST_LEVEL - level) as usize)
}

/// Walks to the page slot of `ipa`, splitting valid blocks and, if `create`, creating tables
/// in empty slots. `Err` with the level and value of the slot where it had to stop.
pub(crate) fn page_slot<'t, M: TableMemory, F: Flusher + ?Sized>(
    t: &'t Stage2Table<M>,
    ipa: u64,
    create: bool,
    reserve: &mut Reserve<'_, M>,
    flush: &mut OpFlush<'_, F>,
) -> Result<&'t AtomicU64, (u8, Descriptor)> {
    let mut table = t.root_pa;
    let mut level = t.cfg.start_level();
    loop {
        let slot = t.slot(table, level, ipa);
        if level == LAST_LEVEL {
            return Ok(slot);
        }
        let d = load_settled(slot);
        let next = match d.kind(level) {
            DescriptorKind::Table { pa } => Ok(pa),
            DescriptorKind::Empty if create => install_table(t, slot, reserve),
            DescriptorKind::Leaf { .. } => split_slot(
                t,
                slot,
                level,
                ipa & !(level_size(level) - 1),
                d,
                reserve,
                flush,
            ),
            _ => return Err((level, d)),
        };
        // On Err the slot changed under us: look at it again.
        if let Ok(pa) = next {
            table = pa;
            level += 1;
        }
    }
}

/// [`Stage2Table::split_block`].
pub(crate) fn split_block<M: TableMemory, F: Flusher + ?Sized>(
    t: &Stage2Table<M>,
    ipa: u64,
    tlb: &F,
) -> Result<(), Error> {
    let (level, d) = t.find(ipa, LAST_LEVEL)?;
    if !matches!(d.kind(level), DescriptorKind::Leaf { .. }) {
        return Err(Error::NotMapped);
    }
    let mut reserve = Reserve::new(&t.mem, path_cost(t, ipa)?)?;
    let mut flush = OpFlush::new(tlb, t.vttbr());
    page_slot(t, ipa, false, &mut reserve, &mut flush)
        .map(|_| ())
        .map_err(|_| Error::NotMapped)
}
