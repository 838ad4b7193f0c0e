use crate::{Error, Flusher, Perm, Stage2Table, TableMemory};
pub(crate) fn protect<M: TableMemory, F: Flusher + ?Sized>(
    _t: &Stage2Table<M>,
    _ipa: u64,
    _len: u64,
    _perm: Perm,
    _tlb: &F,
) -> Result<(), Error> {
    todo!()
}
