//! The host swap store: page contents in reference-counted slots. Like the hypervisor's store
//! (`hyp/src/mm/store.rs`) it reuses freed slot numbers, lowest first, so a slot number can come
//! back for another page as soon as its last reference goes; a test can run code of its own
//! at the moment a swap-in uses a slot ([`HostMachine::on_next`]).

use super::HostMachine;
use crate::backend::SwapStore;
use crate::lock::{Level, OrderedMutex};
use crate::sync::atomic::Ordering;
use crate::Pfn;
use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

/// Slot number → (contents, references); numbers freed and not yet reused.
#[derive(Default)]
pub(super) struct SwapTable {
    pub(super) slots: BTreeMap<u64, (Box<[u64]>, u32)>,
    free: BTreeSet<u64>,
    next: u64,
    stats: SwapStats,
}

/// What the swap store did so far (a stress test shows slot reuse really happened).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwapStats {
    /// Pages stored.
    pub stores: u64,
    /// Stores that got a slot number freed before (reuse).
    pub reused: u64,
    /// Slots read back into frames (swap-ins, swap-cache fills).
    pub loads: u64,
}

impl SwapTable {
    /// The lowest free slot number (slot numbers start at 1).
    fn take_number(&mut self) -> u64 {
        self.stats.stores += 1;
        if let Some(slot) = self.free.pop_first() {
            self.stats.reused += 1;
            return slot;
        }
        self.next += 1;
        self.next
    }
}

/// A store operation a test can run code at ([`HostMachine::on_next`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwapOp {
    /// `SwapStore::refs`: the hook runs before the count is read.
    Refs,
    /// `SwapStore::load`: the hook runs after the contents were copied out.
    Load,
}

type Hook = Box<dyn FnOnce(u64) + Send>;

/// One-shot hooks, each run (with no store lock held) at the next matching operation.
pub(super) struct Hooks(OrderedMutex<Vec<(SwapOp, Hook)>>);

impl Default for Hooks {
    fn default() -> Self {
        Hooks(OrderedMutex::new(
            Level::ALLOCATOR,
            "host.swap_hooks",
            Vec::new(),
        ))
    }
}

impl HostMachine {
    /// Runs `hook(slot)` once, at the next `op` on any slot, with no lock of the store held:
    /// a test makes something happen exactly while a fault is using a slot (e.g. MEM_RELEASE
    /// dropping the entry and the slot being reused). The hook runs on the calling thread; to
    /// take locks the caller may hold (a region list), it spawns a thread and joins it.
    pub fn on_next(&self, op: SwapOp, hook: impl FnOnce(u64) + Send + 'static) {
        self.hooks.0.lock().push((op, Box::new(hook)));
    }

    /// Stores, slot-number reuses and loads so far.
    pub fn swap_stats(&self) -> SwapStats {
        self.swap.lock().stats
    }

    fn run_hook(&self, op: SwapOp, slot: u64) {
        let hook = {
            let mut hooks = self.hooks.0.lock();
            let at = hooks.iter().position(|(o, _)| *o == op);
            at.map(|at| hooks.remove(at).1)
        };
        if let Some(hook) = hook {
            hook(slot);
        }
    }
}

impl SwapStore for HostMachine {
    fn store(&self, pfn: Pfn) -> Option<u64> {
        self.check_copy(None, Some(pfn));
        let contents = self
            .page(pfn)
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect();
        let mut swap = self.swap.lock();
        if swap.slots.len() >= self.swap_capacity.load(Ordering::SeqCst) {
            return None;
        }
        let slot = swap.take_number();
        swap.slots.insert(slot, (contents, 1));
        Some(slot)
    }
    fn load(&self, slot: u64, pfn: Pfn) {
        self.check_copy(Some(pfn), None);
        {
            let mut swap = self.swap.lock();
            swap.stats.loads += 1;
            let (contents, _) = swap.slots.get(&slot).expect("load of a free swap slot");
            for (d, &s) in self.page(pfn).iter().zip(contents.iter()) {
                d.store(s, Ordering::Relaxed);
            }
        }
        self.hw.wrote_and_published(pfn);
        self.run_hook(SwapOp::Load, slot);
    }
    fn dup(&self, slot: u64) {
        assert!(self.try_dup(slot), "dup of a free swap slot {slot}");
    }
    fn try_dup(&self, slot: u64) -> bool {
        let mut swap = self.swap.lock();
        swap.slots.get_mut(&slot).map(|s| s.1 += 1).is_some()
    }
    fn refs(&self, slot: u64) -> Option<u32> {
        self.run_hook(SwapOp::Refs, slot);
        Some(self.swap.lock().slots.get(&slot).map_or(0, |s| s.1))
    }
    fn put(&self, slot: u64) {
        let mut swap = self.swap.lock();
        let refs = &mut swap
            .slots
            .get_mut(&slot)
            .expect("put of a free swap slot")
            .1;
        *refs -= 1;
        if *refs == 0 {
            swap.slots.remove(&slot);
            swap.free.insert(slot);
        }
    }
}
