//! The visitor walk.

use super::chunks;
use crate::sync::atomic::Ordering;
use crate::{
    Descriptor, DescriptorKind, Error, LeafInfo, Stage2Table, TableMemory, Visitor, WalkAction,
};

/// Visits the table at `table_pa` of `level` over `[start, end)`; `true` when told to stop.
fn walk_table<M: TableMemory, V: Visitor + ?Sized>(
    t: &Stage2Table<M>,
    table_pa: u64,
    level: u8,
    start: u64,
    end: u64,
    v: &mut V,
) -> bool {
    for c in chunks(level, start, end) {
        let d = Descriptor::from_raw(t.slot(table_pa, level, c.start).load(Ordering::Acquire));
        let action = match d.kind(level) {
            DescriptorKind::Table { pa } => match v.table_pre(c.base, level, pa) {
                WalkAction::Continue => {
                    if walk_table(t, pa, level + 1, c.start, c.end, v) {
                        return true;
                    }
                    v.table_post(c.base, level, pa)
                }
                other => other,
            },
            _ => match LeafInfo::decode(crate::Ipa::new(c.base), level, d) {
                Some(info) => v.leaf(&info),
                None => WalkAction::Continue,
            },
        };
        if action == WalkAction::Stop {
            return true;
        }
    }
    false
}

/// [`Stage2Table::walk`].
pub(crate) fn walk<M: TableMemory, V: Visitor + ?Sized>(
    t: &Stage2Table<M>,
    ipa: u64,
    len: u64,
    v: &mut V,
) -> Result<(), Error> {
    let end = ipa
        .checked_add(len)
        .filter(|&e| e <= t.cfg.ipa_limit())
        .ok_or(Error::OutOfRange)?;
    walk_table(t, t.root_pa, t.cfg.start_level(), ipa, end, v);
    Ok(())
}
