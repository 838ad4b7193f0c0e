//! Changing the permissions of a range.

use super::driver::{OpVisitor, Step, Visit, Walk};
use crate::flush::OpFlush;
use crate::{
    Descriptor, DescriptorKind, Error, Flusher, MemType, Perm, Stage2Table, TableMemory, LAST_LEVEL,
};

/// The visitor: every valid leaf the range covers gets the permissions (a block covered in
/// part is split first); migration and swap entries lose `writable` with write permission.
struct Protector {
    perm: Perm,
}

impl Protector {
    /// What `d` (at `level`) becomes, if it is a leaf or software entry.
    fn protected(&self, d: Descriptor, level: u8) -> Option<Descriptor> {
        match d.kind(level) {
            DescriptorKind::Leaf { attrs, .. } => Some(d.with_perm(match attrs.mem {
                MemType::Normal => self.perm,
                // Device memory is never executable.
                MemType::Device => Perm {
                    exec: false,
                    ..self.perm
                },
            })),
            DescriptorKind::Software(e) => {
                let e = crate::software::restrict_writable(e, self.perm.write);
                Some(Descriptor::software(e).unwrap_or(d))
            }
            _ => None,
        }
    }
}

impl OpVisitor for Protector {
    type Error = Error;
    const ICACHE: bool = true;

    fn visit(&mut self, v: &Visit) -> Step<Error> {
        match v.desc.kind(v.level) {
            DescriptorKind::Table { .. } => Step::Descend,
            DescriptorKind::Leaf { .. } if v.level < LAST_LEVEL && !v.chunk.full(v.level) => {
                Step::Split
            }
            _ => match self.protected(v.desc, v.level) {
                Some(new) if new != v.desc => Step::Write(new),
                _ => Step::Next,
            },
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
    let mut flush = OpFlush::new(tlb, t.vttbr());
    Ok(Walk::new(t, ipa, end).run(&mut Protector { perm }, &mut flush)?)
}
