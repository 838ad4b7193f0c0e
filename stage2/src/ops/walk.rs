//! The public visitor walk ([`Stage2Table::walk`]) as one more visitor of the walker.

use super::driver::{After, NoMaintenance, OpVisitor, Step, Visit, Walk};
use super::Reserve;
use crate::{DescriptorKind, Error, LeafInfo, Stage2Table, TableMemory, Visitor, WalkAction};

/// A [`Visitor`] seen as an operation that only reads.
struct ReadOnly<'v, V: Visitor + ?Sized>(&'v mut V);

impl<V: Visitor + ?Sized> OpVisitor for ReadOnly<'_, V> {
    type Error = ();
    // Each descriptor read once, whatever it holds (`Locked` is reported as a software entry).
    const SETTLE: bool = false;

    fn visit(&mut self, v: &Visit) -> Step<()> {
        let action = match v.desc.kind(v.level) {
            DescriptorKind::Table { pa } => match self.0.table_pre(v.chunk.base, v.level, pa) {
                WalkAction::Continue => return Step::Descend,
                WalkAction::SkipTable => return Step::Next,
                WalkAction::Stop => WalkAction::Stop,
            },
            _ => match LeafInfo::decode(crate::Ipa::new(v.chunk.base), v.level, v.desc) {
                Some(info) => self.0.leaf(&info),
                None => WalkAction::Continue,
            },
        };
        match action {
            WalkAction::Stop => Step::Stop(()),
            _ => Step::Next,
        }
    }

    fn table_post(&mut self, v: &Visit) -> After<()> {
        let pa = v.desc.output_address(v.level);
        match self.0.table_post(v.chunk.base, v.level, pa) {
            WalkAction::Stop => After::Stop(()),
            _ => After::Keep,
        }
    }
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
    // Commit only, and nothing is written: no pages, no maintenance. A stop is not an error.
    let _ =
        Walk::new(t, ipa, end).commit(&mut ReadOnly(v), Reserve::empty(&t.mem), &mut NoMaintenance);
    Ok(())
}
