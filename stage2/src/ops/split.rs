use crate::{Error, Flusher, Stage2Table, TableMemory};
pub(crate) fn split_block<M: TableMemory, F: Flusher + ?Sized>(
    _t: &Stage2Table<M>,
    _ipa: u64,
    _tlb: &F,
) -> Result<(), Error> {
    todo!()
}
