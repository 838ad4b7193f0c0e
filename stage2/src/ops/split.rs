//! Splitting the blocks over one page.

use super::driver::{OpVisitor, Step, Visit, Walk};
use crate::flush::OpFlush;
use crate::{DescriptorKind, Error, Flusher, Stage2Table, TableMemory, LAST_LEVEL};

/// The visitor of [`split_block`]: split every block on the path down to the page.
struct SplitToPage;

impl OpVisitor for SplitToPage {
    type Error = Error;

    fn visit(&mut self, v: &Visit) -> Step<Error> {
        match v.desc.kind(v.level) {
            DescriptorKind::Table { .. } => Step::Descend,
            DescriptorKind::Leaf { .. } if v.level < LAST_LEVEL => Step::Split,
            DescriptorKind::Leaf { .. } => Step::Next,
            _ => Step::Stop(Error::NotMapped),
        }
    }
}

/// [`Stage2Table::split_block`].
pub(crate) fn split_block<M: TableMemory, F: Flusher + ?Sized>(
    t: &Stage2Table<M>,
    ipa: u64,
    tlb: &F,
) -> Result<(), Error> {
    let mut flush = OpFlush::new(tlb, t.vttbr());
    Ok(Walk::page(t, ipa)?.run(&mut SplitToPage, &mut flush)?)
}
