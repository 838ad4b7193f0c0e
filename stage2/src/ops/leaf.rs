use crate::{CasError, Descriptor, Error, Flusher, LeafInfo, Stage2Table, SwEntry, TableMemory};
pub(crate) fn set_software<M: TableMemory, F: Flusher + ?Sized>(
    _t: &Stage2Table<M>,
    _ipa: u64,
    _e: SwEntry,
    _tlb: &F,
) -> Result<Option<LeafInfo>, Error> {
    todo!()
}
pub(crate) fn compare_exchange_leaf<M: TableMemory, F: Flusher + ?Sized>(
    _t: &Stage2Table<M>,
    _ipa: u64,
    _level: u8,
    _e: Descriptor,
    _n: Descriptor,
    _tlb: &F,
) -> Result<(), CasError> {
    todo!()
}
pub(crate) fn update_young<M: TableMemory>(_t: &Stage2Table<M>, _ipa: u64, _young: bool) -> bool {
    todo!()
}
