//! Unmapping a range, freeing emptied tables, and freeing everything on destroy.

use super::split::{count_partial_blocks, split_slot};
use super::{cas, chunks, load_settled, Reserve};
use crate::flush::OpFlush;
use crate::sync::atomic::Ordering;
use crate::{
    Descriptor, DescriptorKind, Error, Flusher, LeafInfo, Stage2Table, TableMemory, LAST_LEVEL,
};

/// Unlinked table pages waiting for the TLB invalidation that must precede their freeing,
/// chained through their first word (an invalid descriptor: a stale walk reading it faults).
struct Unlinked {
    head: u64,
}

struct Unmapper<'a, 'r, M: TableMemory, F: Flusher + ?Sized, L: FnMut(&LeafInfo)> {
    t: &'a Stage2Table<M>,
    reserve: Reserve<'r, M>,
    flush: OpFlush<'a, F>,
    on_leaf: L,
    unlinked: Unlinked,
    removed: u64,
}

impl<M: TableMemory, F: Flusher + ?Sized, L: FnMut(&LeafInfo)> Unmapper<'_, '_, M, F, L> {
    fn clear(&mut self, table: u64, level: u8, start: u64, end: u64) {
        for c in chunks(level, start, end) {
            let slot = self.t.slot(table, level, c.start);
            loop {
                let d = load_settled(slot);
                match d.kind(level) {
                    DescriptorKind::Empty => break,
                    DescriptorKind::Table { pa } => {
                        self.clear(pa, level + 1, c.start, c.end);
                        self.unlink_if_empty(slot, d, pa);
                        break;
                    }
                    DescriptorKind::Leaf { .. } if level < LAST_LEVEL && !c.full(level) => {
                        // Split, then look at the slot again (now a table).
                        let _ = split_slot(
                            self.t,
                            slot,
                            level,
                            c.base,
                            d,
                            &mut self.reserve,
                            &mut self.flush,
                        );
                    }
                    _ => {
                        if cas(slot, d, Descriptor::EMPTY).is_ok() {
                            self.removed_leaf(c.base, level, d);
                            break;
                        }
                    }
                }
            }
        }
    }

    fn removed_leaf(&mut self, base: u64, level: u8, d: Descriptor) {
        self.t.counters.account(level, d, Descriptor::EMPTY);
        if d.is_valid() {
            self.flush.changed(base, level);
            self.removed += crate::level_size(level);
        }
        if let Some(info) = LeafInfo::decode(crate::Ipa::new(base), level, d) {
            (self.on_leaf)(&info);
        }
    }

    fn unlink_if_empty(
        &mut self,
        slot: &crate::sync::atomic::AtomicU64,
        d: Descriptor,
        table: u64,
    ) {
        // SAFETY: `table` is the output address of a table descriptor of this table, read under
        // the stage-2 lock: allocated and linked until this unmap unlinks and frees it.
        let page = unsafe { self.t.mem.table(table) };
        if page.iter().any(|e| e.load(Ordering::Acquire) != 0) {
            return;
        }
        if cas(slot, d, Descriptor::EMPTY).is_ok() {
            page[0].store(self.unlinked.head, Ordering::Relaxed);
            self.unlinked.head = table;
        }
    }

    /// Invalidates the VMID (walk caches may still point at unlinked tables), then frees them.
    fn free_unlinked(&mut self) {
        if self.unlinked.head == 0 {
            return;
        }
        self.flush.vmid_now();
        while self.unlinked.head != 0 {
            let pa = self.unlinked.head;
            // SAFETY: `pa` is on this unmap's list of unlinked pages, not yet freed.
            self.unlinked.head = unsafe { self.t.mem.table(pa) }[0].load(Ordering::Relaxed);
            self.t.mem.free_table(pa);
            self.t.counters.table_pages.fetch_sub(1, Ordering::Relaxed);
        }
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
    let level = t.cfg.start_level();
    let reserve = Reserve::new(&t.mem, count_partial_blocks(t, t.root_pa, level, ipa, end))?;
    let flush = OpFlush::new(tlb, t.vttbr());
    let mut u = Unmapper {
        t,
        reserve,
        flush,
        on_leaf,
        unlinked: Unlinked { head: 0 },
        removed: 0,
    };
    u.clear(t.root_pa, level, ipa, end);
    u.free_unlinked();
    Ok(u.removed)
}

/// Frees every table page below the table at `table_pa` of `level` (not the table itself).
fn free_below<M: TableMemory>(t: &Stage2Table<M>, table_pa: u64, level: u8, start: u64, end: u64) {
    for c in chunks(level, start, end) {
        let d = Descriptor::from_raw(t.slot(table_pa, level, c.start).load(Ordering::Acquire));
        if let DescriptorKind::Table { pa } = d.kind(level) {
            free_below(t, pa, level + 1, c.start, c.end);
            t.mem.free_table(pa);
        }
    }
}

/// Frees every table page, root included ([`Stage2Table::destroy`]; TLB already invalidated).
pub(crate) fn free_all<M: TableMemory>(t: &Stage2Table<M>) {
    free_below(t, t.root_pa, t.cfg.start_level(), 0, t.cfg.ipa_limit());
    t.mem.free_root(t.root_pa, t.cfg.root_pages());
}
