//! Where table pages come from.

use crate::sync::atomic::AtomicU64;
use crate::ENTRIES_PER_TABLE;

/// One table page seen as descriptors.
pub type TablePage = [AtomicU64; ENTRIES_PER_TABLE];

/// Memory for translation tables.
///
/// In the hypervisor (identity-mapped at EL2) [`TableMemory::table`] is the identity
/// `PA -> &*(pa as *const TablePage)`; on the host it indexes a buffer playing physical memory
/// (`HostMemory`, feature `host`).
///
/// Implementations must be usable from several CPUs at once (`&self`).
pub trait TableMemory {
    /// A zeroed, 4 KiB-aligned table page, or `None` when memory is exhausted.
    fn alloc_zeroed_table(&self) -> Option<u64>;

    /// Returns a table page obtained from [`TableMemory::alloc_zeroed_table`]. Its contents are
    /// unspecified (not necessarily zero).
    fn free_table(&self, pa: u64);

    /// `pages` (1..=16, a power of two) zeroed, physically contiguous table pages whose first
    /// address is aligned to `pages * 4096`: the concatenated root tables.
    fn alloc_zeroed_root(&self, pages: usize) -> Option<u64>;

    /// Returns a root obtained from [`TableMemory::alloc_zeroed_root`] with the same `pages`.
    fn free_root(&self, pa: u64, pages: usize);

    /// The table page at `pa`.
    ///
    /// # Safety
    ///
    /// `pa` was returned by [`TableMemory::alloc_zeroed_table`] or is a page of a root from
    /// [`TableMemory::alloc_zeroed_root`], and is not freed while the returned reference lives.
    /// (An implementation over real memory turns `pa` into a reference; a wrong `pa` reads or
    /// writes memory that is not a table.)
    unsafe fn table(&self, pa: u64) -> &TablePage;
}

impl<T: TableMemory + ?Sized> TableMemory for &T {
    fn alloc_zeroed_table(&self) -> Option<u64> {
        (**self).alloc_zeroed_table()
    }
    fn free_table(&self, pa: u64) {
        (**self).free_table(pa)
    }
    fn alloc_zeroed_root(&self, pages: usize) -> Option<u64> {
        (**self).alloc_zeroed_root(pages)
    }
    fn free_root(&self, pa: u64, pages: usize) {
        (**self).free_root(pa, pages)
    }
    unsafe fn table(&self, pa: u64) -> &TablePage {
        // SAFETY: the caller upholds the same contract for the inner memory.
        unsafe { (**self).table(pa) }
    }
}
