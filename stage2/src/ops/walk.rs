use crate::{Error, Stage2Table, TableMemory, Visitor};
pub(crate) fn walk<M: TableMemory, V: Visitor + ?Sized>(
    _t: &Stage2Table<M>,
    _ipa: u64,
    _len: u64,
    _v: &mut V,
) -> Result<(), Error> {
    todo!()
}
