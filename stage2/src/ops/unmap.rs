use crate::{Error, Flusher, LeafInfo, Stage2Table, TableMemory};
pub(crate) fn unmap<M: TableMemory, F: Flusher + ?Sized>(
    _t: &Stage2Table<M>,
    _ipa: u64,
    _len: u64,
    _tlb: &F,
    _f: impl FnMut(&LeafInfo),
) -> Result<u64, Error> {
    todo!()
}
pub(crate) fn free_all<M: TableMemory>(_t: &Stage2Table<M>) {
    todo!()
}
