//! Host implementations for tests (feature `host`): [`HostMemory`], a buffer playing physical
//! memory, and [`RecordingTlb`], which records every maintenance call.

use crate::memory::{TableMemory, TablePage};
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::{TlbMaintenance, Vttbr, PAGE_SIZE};
use std::boxed::Box;
use std::sync::Mutex;
use std::vec::Vec;

/// Pattern written over freed pages, so a table used after being freed is noticed.
pub const POISON: u64 = 0xdead_0000_dead_0001;

#[repr(C, align(4096))]
struct Page(TablePage);

struct AllocState {
    allocated: usize,
    /// Allocations that may still succeed (None: unlimited).
    budget: Option<usize>,
}

/// A host buffer playing physical memory for table pages, with an allocator that can be told
/// to fail (to test that operations change nothing on `NoMemory`), double-free detection and
/// poisoning of freed pages.
pub struct HostMemory {
    base: u64,
    pages: Box<[Page]>,
    /// Written under `state`'s lock, read without it.
    used: Box<[AtomicBool]>,
    state: Mutex<AllocState>,
}

impl HostMemory {
    /// Physical address of the first page of [`HostMemory::new`]'s buffer.
    pub const DEFAULT_BASE: u64 = 0x8000_0000;

    /// `pages` pages of memory at physical [`HostMemory::DEFAULT_BASE`].
    pub fn new(pages: usize) -> Self {
        Self::with_base(Self::DEFAULT_BASE, pages)
    }

    /// `pages` pages at physical `base` (aligned to 64 KiB).
    pub fn with_base(base: u64, pages: usize) -> Self {
        assert_eq!(base % (16 * PAGE_SIZE), 0, "base must be 64 KiB aligned");
        let pages: Box<[Page]> = (0..pages)
            .map(|_| Page(core::array::from_fn(|_| AtomicU64::new(0))))
            .collect();
        let used = (0..pages.len()).map(|_| AtomicBool::new(false)).collect();
        let state = AllocState {
            allocated: 0,
            budget: None,
        };
        HostMemory {
            base,
            pages,
            used,
            state: Mutex::new(state),
        }
    }

    /// Physical address of the first page.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Pages currently allocated.
    pub fn allocated_pages(&self) -> usize {
        self.state.lock().unwrap().allocated
    }

    /// After `n` more successful page allocations, every allocation fails (`None`: never fail).
    /// A multi-page root counts as its number of pages.
    pub fn fail_after(&self, n: Option<usize>) {
        self.state.lock().unwrap().budget = n;
    }

    /// Whether `pa` is in this memory.
    pub fn contains(&self, pa: u64) -> bool {
        pa >= self.base && pa < self.base + self.pages.len() as u64 * PAGE_SIZE
    }

    /// Whether the page holding `pa` is allocated.
    pub fn is_allocated(&self, pa: u64) -> bool {
        self.contains(pa) && self.used[self.index(pa)].load(Ordering::Acquire)
    }

    /// Reads the 8-byte word at physical `pa` (what a hardware table walker would see).
    pub fn read(&self, pa: u64) -> u64 {
        assert!(
            self.contains(pa) && pa.is_multiple_of(8),
            "read outside host memory: {pa:#x}"
        );
        self.pages[self.index(pa)].0[((pa % PAGE_SIZE) / 8) as usize].load(Ordering::Acquire)
    }

    fn index(&self, pa: u64) -> usize {
        ((pa - self.base) / PAGE_SIZE) as usize
    }

    fn alloc(&self, count: usize) -> Option<u64> {
        let mut st = self.state.lock().unwrap();
        if let Some(b) = st.budget {
            st.budget = Some(b.checked_sub(count)?);
        }
        let n = self.used.len();
        let free = |i: usize| !self.used[i].load(Ordering::Relaxed);
        let first = (0..n)
            .step_by(count)
            .find(|&i| i + count <= n && (i..i + count).all(free))?;
        for page in &self.pages[first..first + count] {
            page.0.iter().for_each(|e| e.store(0, Ordering::Relaxed));
        }
        self.used[first..first + count]
            .iter()
            .for_each(|u| u.store(true, Ordering::Release));
        st.allocated += count;
        Some(self.base + first as u64 * PAGE_SIZE)
    }

    fn free(&self, pa: u64, count: usize) {
        assert!(
            self.contains(pa) && pa.is_multiple_of(count as u64 * PAGE_SIZE),
            "bad free {pa:#x}"
        );
        let first = self.index(pa);
        for page in &self.pages[first..first + count] {
            page.0
                .iter()
                .for_each(|e| e.store(POISON, Ordering::Relaxed));
        }
        let mut st = self.state.lock().unwrap();
        for i in first..first + count {
            let was = self.used[i].swap(false, Ordering::Release);
            assert!(
                was,
                "double free of table page {:#x}",
                self.base + i as u64 * PAGE_SIZE
            );
        }
        st.allocated -= count;
    }
}

impl TableMemory for HostMemory {
    fn alloc_zeroed_table(&self) -> Option<u64> {
        self.alloc(1)
    }

    fn free_table(&self, pa: u64) {
        self.free(pa, 1)
    }

    fn alloc_zeroed_root(&self, pages: usize) -> Option<u64> {
        assert!(pages.is_power_of_two() && pages <= 16);
        self.alloc(pages)
    }

    fn free_root(&self, pa: u64, pages: usize) {
        self.free(pa, pages)
    }

    unsafe fn table(&self, pa: u64) -> &TablePage {
        assert!(
            self.contains(pa) && pa.is_multiple_of(PAGE_SIZE),
            "table outside host memory: {pa:#x}"
        );
        assert!(self.is_allocated(pa), "use of a free table page {pa:#x}");
        &self.pages[self.index(pa)].0
    }
}

/// One maintenance call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlbCall {
    /// [`TlbMaintenance::invalidate_ipa`].
    Ipa {
        /// VMID of the VTTBR given.
        vmid: u16,
        /// IPA.
        ipa: u64,
        /// Level hint.
        level: u8,
    },
    /// [`TlbMaintenance::invalidate_vmid`].
    Vmid {
        /// VMID of the VTTBR given.
        vmid: u16,
    },
    /// [`TlbMaintenance::invalidate_icache`].
    Icache {
        /// Physical start.
        pa: u64,
        /// Length.
        len: u64,
    },
    /// [`TlbMaintenance::invalidate_all`].
    All,
    /// [`TlbMaintenance::clean_dcache_poc`].
    CleanPoc {
        /// Physical start.
        pa: u64,
        /// Length.
        len: u64,
    },
}

type Hook = Box<dyn Fn(&TlbCall) + Send + Sync>;

/// Records every maintenance call, optionally running a hook at each (to check the state of
/// the tables at the moment of an invalidation).
#[derive(Default)]
pub struct RecordingTlb {
    calls: Mutex<Vec<TlbCall>>,
    hook: Mutex<Option<Hook>>,
}

impl RecordingTlb {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `hook` at every call, before recording it.
    pub fn set_hook(&self, hook: impl Fn(&TlbCall) + Send + Sync + 'static) {
        *self.hook.lock().unwrap() = Some(Box::new(hook));
    }

    /// Removes the hook.
    pub fn clear_hook(&self) {
        *self.hook.lock().unwrap() = None;
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<TlbCall> {
        self.calls.lock().unwrap().clone()
    }

    /// The calls so far, forgetting them.
    pub fn take(&self) -> Vec<TlbCall> {
        core::mem::take(&mut *self.calls.lock().unwrap())
    }

    fn record(&self, call: TlbCall) {
        if let Some(hook) = &*self.hook.lock().unwrap() {
            hook(&call);
        }
        self.calls.lock().unwrap().push(call);
    }
}

impl TlbMaintenance for RecordingTlb {
    fn invalidate_ipa(&self, vttbr: Vttbr, ipa: u64, level: u8) {
        self.record(TlbCall::Ipa {
            vmid: vttbr.vmid(),
            ipa,
            level,
        });
    }

    fn invalidate_vmid(&self, vttbr: Vttbr) {
        self.record(TlbCall::Vmid { vmid: vttbr.vmid() });
    }

    fn invalidate_icache(&self, pa: u64, len: u64) {
        self.record(TlbCall::Icache { pa, len });
    }

    fn invalidate_all(&self) {
        self.record(TlbCall::All);
    }

    fn clean_dcache_poc(&self, pa: u64, len: u64) {
        self.record(TlbCall::CleanPoc { pa, len });
    }
}
