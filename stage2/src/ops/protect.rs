//! Changing the permissions of a range.

use super::split::{count_partial_blocks, split_slot};
use super::{cas, chunks, load_settled, Reserve};
use crate::flush::OpFlush;
use crate::software;
use crate::{
    level_size, Descriptor, DescriptorKind, Error, Flusher, MemType, Perm, Stage2Table,
    TableMemory, LAST_LEVEL,
};

struct Protector<'a, 'r, M: TableMemory, F: Flusher + ?Sized> {
    t: &'a Stage2Table<M>,
    perm: Perm,
    reserve: Reserve<'r, M>,
    flush: OpFlush<'a, F>,
}

impl<M: TableMemory, F: Flusher + ?Sized> Protector<'_, '_, M, F> {
    fn walk(&mut self, table: u64, level: u8, start: u64, end: u64) {
        for c in chunks(level, start, end) {
            let slot = self.t.slot(table, level, c.start);
            loop {
                let d = load_settled(slot);
                let new = match d.kind(level) {
                    DescriptorKind::Table { pa } => {
                        self.walk(pa, level + 1, c.start, c.end);
                        break;
                    }
                    DescriptorKind::Leaf { .. } if level < LAST_LEVEL && !c.full(level) => {
                        let _ = split_slot(
                            self.t,
                            slot,
                            level,
                            c.base,
                            d,
                            &mut self.reserve,
                            &mut self.flush,
                        );
                        continue;
                    }
                    DescriptorKind::Leaf { pa, attrs, .. } => {
                        let perm = match attrs.mem {
                            MemType::Normal => self.perm,
                            MemType::Device => Perm {
                                exec: false,
                                ..self.perm
                            },
                        };
                        if perm.exec && !attrs.perm.exec {
                            self.flush.icache(pa, level_size(level));
                        }
                        d.with_perm(perm)
                    }
                    DescriptorKind::Software(e) => {
                        let e = software::restrict_writable(e, self.perm.write);
                        Descriptor::software(e).unwrap_or(d)
                    }
                    DescriptorKind::Empty | DescriptorKind::Locked | DescriptorKind::Unknown(_) => {
                        break
                    }
                };
                if new == d {
                    break;
                }
                if cas(slot, d, new).is_ok() {
                    if d.is_valid() {
                        self.flush.changed(c.base, level);
                    }
                    break;
                }
            }
        }
    }
}

/// [`Stage2Table::protect`].
pub(crate) fn protect<M: TableMemory, F: Flusher + ?Sized>(
    t: &Stage2Table<M>,
    ipa: u64,
    len: u64,
    perm: Perm,
    tlb: &F,
) -> Result<(), Error> {
    let end = t.check_range(ipa, len)?;
    let level = t.cfg.start_level();
    let reserve = Reserve::new(&t.mem, count_partial_blocks(t, t.root_pa, level, ipa, end))?;
    let flush = OpFlush::new(tlb, t.vttbr());
    let mut p = Protector {
        t,
        perm,
        reserve,
        flush,
    };
    p.walk(t.root_pa, level, ipa, end);
    Ok(())
}
