use crate::{Error, Flusher, S2Attrs, Stage2Table, TableMemory};
pub(crate) fn map<M: TableMemory, F: Flusher + ?Sized>(
    _t: &Stage2Table<M>,
    _ipa: u64,
    _pa: u64,
    _len: u64,
    _attrs: S2Attrs,
    _blocks: bool,
    _tlb: &F,
) -> Result<(), Error> {
    todo!()
}
