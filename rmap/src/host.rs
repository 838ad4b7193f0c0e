//! Plain in-memory implementations of the backend traits, for tests, the stress test and the
//! benchmark: "physical memory" of page contents, a swap store, per-VM stage-2 maps, a VM set,
//! and whole-world invariant checks. Hardware-free and small; not for use at EL2.

mod check;
mod swap;

pub use swap::SwapOp;
use swap::{Hooks, SwapTable};

use crate::backend::{FrameAllocator, S2Entry, Stage2, Stage2Locked, VmSet};
use crate::lock::{Level, OrderedMutex, OrderedMutexGuard, OrderedRwLock};
use crate::region::{RegionFlags, RegionList};
use crate::{Error, Fault, Ipa, Pfn, Rmap, UnlinkProof, VmId, PAGE_SIZE};
use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Host frames with contents (`words` u64 per page), a free list, and a swap store.
pub struct HostMachine {
    base: Pfn,
    words: usize,
    mem: Box<[AtomicU64]>,
    free: OrderedMutex<Vec<Pfn>>,
    swap: OrderedMutex<SwapTable>,
    swap_capacity: usize,
    hooks: Hooks,
}

const CHECK_SALT: u64 = 0x9e37_79b9_7f4a_7c15;

impl HostMachine {
    /// `frames` frames from PFN `base`, `words` u64 per page (1 for no checksum), and room for
    /// `swap_capacity` swapped pages.
    pub fn new(base: Pfn, frames: usize, words: usize, swap_capacity: usize) -> Self {
        assert!(words >= 1);
        HostMachine {
            base,
            words,
            mem: (0..frames * words).map(|_| AtomicU64::new(0)).collect(),
            free: OrderedMutex::new(
                Level::ALLOCATOR,
                "host.frames",
                (base..base + frames as u64).rev().collect(),
            ),
            swap: OrderedMutex::new(Level::ALLOCATOR, "host.swap", SwapTable::default()),
            swap_capacity,
            hooks: Hooks::default(),
        }
    }

    fn page(&self, pfn: Pfn) -> &[AtomicU64] {
        let at = (pfn - self.base) as usize * self.words;
        &self.mem[at..at + self.words]
    }

    /// Fills a page with a pattern derived from `value`, the last word a checksum.
    pub fn write_value(&self, pfn: Pfn, value: u64) {
        let page = self.page(pfn);
        let mut sum = CHECK_SALT;
        for (i, word) in page.iter().enumerate() {
            let v = if i == 0 || i + 1 < page.len() {
                value.rotate_left(i as u32) ^ (i as u64)
            } else {
                sum
            };
            sum = sum.rotate_left(7) ^ v;
            word.store(v, Ordering::Relaxed);
        }
    }

    /// Reads the value a page holds; panics if its checksum does not match (a torn copy).
    /// An all-zero page reads as 0: a demand-zero page that another vCPU's store has not
    /// reached yet (its fault maps the zeroed frame, then the store lands).
    pub fn read_value(&self, pfn: Pfn) -> u64 {
        let page = self.page(pfn);
        let words: Vec<u64> = page.iter().map(|w| w.load(Ordering::Relaxed)).collect();
        let value = words[0];
        if words.len() > 1 && words.iter().any(|&w| w != 0) {
            let mut sum = CHECK_SALT;
            for &w in &words[..words.len() - 1] {
                sum = sum.rotate_left(7) ^ w;
            }
            assert_eq!(
                sum,
                words[words.len() - 1],
                "page {pfn:#x}: checksum mismatch"
            );
        }
        value
    }

    /// Frames currently allocated.
    pub fn allocated(&self) -> usize {
        self.mem.len() / self.words - self.free.lock().len()
    }

    /// The value held in a swap slot (first word), without loading it.
    pub fn swap_value(&self, slot: u64) -> u64 {
        self.swap.lock().slots.get(&slot).expect("free swap slot").0[0]
    }

    /// Swap slots in use, with their reference counts.
    pub fn swap_refs(&self) -> BTreeMap<u64, u32> {
        self.swap
            .lock()
            .slots
            .iter()
            .map(|(&s, (_, r))| (s, *r))
            .collect()
    }
}

impl FrameAllocator for HostMachine {
    fn alloc(&self) -> Option<Pfn> {
        self.free.lock().pop()
    }
    fn free(&self, pfn: Pfn) {
        self.free.lock().push(pfn);
    }
    fn zero(&self, pfn: Pfn) {
        self.page(pfn)
            .iter()
            .for_each(|w| w.store(0, Ordering::Relaxed));
    }
    fn copy(&self, dst: Pfn, src: Pfn) {
        for (d, s) in self.page(dst).iter().zip(self.page(src)) {
            d.store(s.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

type Table = Option<BTreeMap<Ipa, (S2Entry, bool)>>;

/// A VM's stage-2 as a map from IPA to leaf (plus an access flag). `None` once freed: any
/// access after that panics, which is how a test sees a walker reach freed tables.
pub struct HostStage2 {
    vm: VmId,
    table: OrderedMutex<Table>,
}

/// A locked [`HostStage2`].
pub struct HostStage2Guard<'a> {
    vm: VmId,
    table: OrderedMutexGuard<'a, Table>,
}

impl HostStage2Guard<'_> {
    fn map(&self) -> &BTreeMap<Ipa, (S2Entry, bool)> {
        let vm = self.vm;
        self.table
            .as_ref()
            .unwrap_or_else(|| panic!("rmap walker reached freed stage-2 tables of {vm:?}"))
    }

    fn map_mut(&mut self) -> &mut BTreeMap<Ipa, (S2Entry, bool)> {
        let vm = self.vm;
        self.table
            .as_mut()
            .unwrap_or_else(|| panic!("rmap walker reached freed stage-2 tables of {vm:?}"))
    }
}

impl Stage2Locked for HostStage2Guard<'_> {
    fn lookup(&self, ipa: Ipa) -> S2Entry {
        self.map().get(&ipa).map_or(S2Entry::Invalid, |e| e.0)
    }
    fn compare_exchange(&mut self, ipa: Ipa, old: S2Entry, new: S2Entry) -> Result<(), S2Entry> {
        let current = self.lookup(ipa);
        if current != old {
            return Err(current);
        }
        match new {
            S2Entry::Invalid => self.map_mut().remove(&ipa),
            _ => self.map_mut().insert(ipa, (new, true)),
        };
        Ok(())
    }
    fn test_and_clear_young(&mut self, ipa: Ipa) -> bool {
        self.map_mut()
            .get_mut(&ipa)
            .is_some_and(|e| core::mem::replace(&mut e.1, false))
    }
    fn next_entry(&self, from: Ipa, end: Ipa) -> Option<(Ipa, S2Entry)> {
        self.map()
            .range(from..end)
            .next()
            .map(|(&ipa, e)| (ipa, e.0))
    }
}

impl HostStage2 {
    /// Empty tables for `vm`.
    pub fn new(vm: VmId) -> Self {
        HostStage2 {
            vm,
            table: OrderedMutex::new(Level::STAGE2, "vm.stage2", Some(BTreeMap::new())),
        }
    }

    /// Every leaf (empty once freed).
    pub fn entries(&self) -> Vec<(Ipa, S2Entry)> {
        let table = self.table.lock();
        table
            .iter()
            .flat_map(|t| t.iter().map(|(&ipa, e)| (ipa, e.0)))
            .collect()
    }
}

impl Stage2 for HostStage2 {
    type Locked<'a> = HostStage2Guard<'a>;
    fn lock(&self) -> HostStage2Guard<'_> {
        HostStage2Guard {
            vm: self.vm,
            table: self.table.lock(),
        }
    }
    fn lock_nested(&self) -> HostStage2Guard<'_> {
        HostStage2Guard {
            vm: self.vm,
            table: self.table.lock_nested(1),
        }
    }
    fn free_tables(&self, proof: UnlinkProof) {
        assert_eq!(proof.vm(), self.vm, "proof for another VM");
        *self.table.lock() = None;
    }
}

/// A host VM: region list and stage-2.
pub struct HostVm {
    /// Its id.
    pub id: VmId,
    /// Region list (level 1).
    pub regions: OrderedRwLock<RegionList>,
    /// Stage-2 (level 4).
    pub s2: HostStage2,
}

impl HostVm {
    /// A VM with no regions.
    pub fn new(id: VmId) -> Self {
        HostVm {
            id,
            regions: OrderedRwLock::new(Level::VM_REGIONS, "vm.regions", RegionList::new(id)),
            s2: HostStage2::new(id),
        }
    }

    /// A guest store of `value` to the page at `ipa`, faulting as the hardware would. The
    /// store happens under the stage-2 lock, standing in for "the TLB still holds a valid,
    /// writable entry": once a migrator replaced the entry, no store reaches the old frame.
    pub fn write(&self, rmap: &Rmap, m: &HostMachine, ipa: Ipa, value: u64) -> Result<(), Error> {
        loop {
            if let S2Entry::Page {
                pfn,
                writable: true,
            } = self.s2.lock().lookup(ipa)
            {
                m.write_value(pfn, value);
                return Ok(());
            }
            self.fault(rmap, m, ipa, true)?;
        }
    }

    /// A guest load from the page at `ipa` (0 if never written).
    pub fn read(&self, rmap: &Rmap, m: &HostMachine, ipa: Ipa) -> Result<u64, Error> {
        loop {
            let entry = {
                let table = self.s2.lock();
                match table.lookup(ipa) {
                    // Read under the lock, as a TLB hit on a still-valid entry would.
                    S2Entry::Page { pfn, .. } => return Ok(m.read_value(pfn)),
                    other => other,
                }
            };
            if entry == S2Entry::Invalid {
                let mapped = self.regions.read().find(ipa).is_some();
                return if mapped { Ok(0) } else { Err(Error::NoRegion) };
            }
            self.fault(rmap, m, ipa, false)?;
        }
    }

    /// What the guest would read at `ipa`, without faulting anything in (for checks at
    /// quiescent points: a swapped page is read from the store).
    pub fn peek(&self, m: &HostMachine, ipa: Ipa) -> u64 {
        match self.s2.lock().lookup(ipa) {
            S2Entry::Page { pfn, .. } => m.read_value(pfn),
            S2Entry::Swap { slot } => m.swap_value(slot),
            S2Entry::Invalid => 0,
            S2Entry::Migration { .. } => panic!("migration entry at a quiescent point"),
        }
    }

    /// MEM_RELEASE of the page at `ipa`, as `hyp::mm::release` does it: under the region
    /// list's read lock only, so it races this VM's faults; the entry is cleared by CAS and
    /// its frame mapping or swap-slot reference dropped.
    pub fn release(&self, rmap: &Rmap, m: &HostMachine, ipa: Ipa) {
        let _regions = self.regions.read();
        loop {
            let entry = self.s2.lock().lookup(ipa);
            match entry {
                S2Entry::Invalid => return,
                S2Entry::Migration { pfn, .. } => {
                    rmap.wait_frame_unlocked(pfn);
                    continue;
                }
                _ if self
                    .s2
                    .lock()
                    .compare_exchange(ipa, entry, S2Entry::Invalid)
                    .is_err() =>
                {
                    continue
                }
                S2Entry::Page { pfn, .. } => rmap.remove_rmap(pfn, m),
                S2Entry::Swap { slot } => rmap.put_swap(slot, m, m),
            }
            return;
        }
    }

    fn fault(&self, rmap: &Rmap, m: &HostMachine, ipa: Ipa, write: bool) -> Result<(), Error> {
        match rmap.handle_fault(&self.regions, &self.s2, m, m, ipa, write)? {
            Fault::Retry(Some(pfn)) => rmap.wait_frame_unlocked(pfn),
            Fault::Retry(None) => core::hint::spin_loop(),
            Fault::Done => {}
        }
        Ok(())
    }
}

/// The VM set: `Arc`s so a walker keeps a VM alive while it looks at it.
pub struct HostVms {
    vms: OrderedRwLock<BTreeMap<VmId, Arc<HostVm>>>,
    next: AtomicU32,
}

impl Default for HostVms {
    fn default() -> Self {
        HostVms {
            vms: OrderedRwLock::new(Level::ALLOCATOR, "host.vms", BTreeMap::new()),
            next: AtomicU32::new(1),
        }
    }
}

impl HostVms {
    /// A new empty VM.
    pub fn create(&self) -> Arc<HostVm> {
        let id = VmId(self.next.fetch_add(1, Ordering::Relaxed));
        let vm = Arc::new(HostVm::new(id));
        self.vms.write().insert(id, vm.clone());
        vm
    }

    /// A VM by id.
    pub fn get(&self, id: VmId) -> Option<Arc<HostVm>> {
        self.vms.read().get(&id).cloned()
    }

    /// Forgets a VM (after its tables were freed).
    pub fn remove(&self, id: VmId) {
        self.vms.write().remove(&id);
    }

    /// All VMs.
    pub fn all(&self) -> Vec<Arc<HostVm>> {
        self.vms.read().values().cloned().collect()
    }
}

impl VmSet for HostVms {
    type Vm = HostStage2;
    fn with_vm<R>(&self, id: VmId, f: impl FnOnce(&HostStage2) -> R) -> Option<R> {
        let vm = self.get(id)?;
        Some(f(&vm.s2))
    }
}

/// Everything a host test needs, wired together.
pub struct HostWorld {
    /// The reverse map.
    pub rmap: Rmap,
    /// Memory and swap.
    pub machine: HostMachine,
    /// The VMs.
    pub vms: HostVms,
}

impl HostWorld {
    /// A world of `frames` frames with `words` u64 per page, and pools sized for them.
    pub fn new(frames: usize, words: usize, max_anon_vmas: usize, max_chains: usize) -> Self {
        let base = 0x40_000;
        HostWorld {
            rmap: Rmap::new(
                crate::FrameTable::new(base, frames),
                max_anon_vmas,
                max_chains,
            ),
            machine: HostMachine::new(base, frames, words, frames),
            vms: HostVms::default(),
        }
    }

    /// A VM with the given `(start IPA, pages)` regions.
    pub fn create_vm(&self, regions: &[(Ipa, u64)]) -> Arc<HostVm> {
        let vm = self.vms.create();
        let mut list = vm.regions.write();
        for &(start, pages) in regions {
            self.rmap
                .region_create(&mut list, start, pages, RegionFlags::NONE)
                .expect("valid region");
        }
        drop(list);
        vm
    }

    /// Forks `parent` into a new VM.
    pub fn fork(&self, parent: &HostVm) -> Result<Arc<HostVm>, Error> {
        let child = self.vms.create();
        let mut parent_list = parent.regions.write();
        let mut child_list = child.regions.write_nested(1);
        let forked = self.rmap.fork_vm(
            &mut parent_list,
            &parent.s2,
            &mut child_list,
            &child.s2,
            &self.machine,
        );
        drop((parent_list, child_list));
        match forked {
            Ok(()) => Ok(child),
            Err(e) => {
                self.destroy(&child);
                Err(e)
            }
        }
    }

    /// Destroys a VM: zap, unlink, free tables (with the proof), forget.
    pub fn destroy(&self, vm: &HostVm) {
        let mut list = vm.regions.write();
        let proof = self
            .rmap
            .destroy_vm(&mut list, &vm.s2, &self.machine, &self.machine);
        vm.s2.free_tables(proof);
        drop(list);
        self.vms.remove(vm.id);
    }

    /// Every allocated frame that is mapped somewhere (candidates for migrate / reclaim).
    pub fn mapped_frames(&self) -> Vec<Pfn> {
        self.rmap
            .frames()
            .iter()
            .filter(|(_, f)| f.is_mapped())
            .map(|(pfn, _)| pfn)
            .collect()
    }
}

/// The `i`-th page of a region starting at `start`.
pub fn page_ipa(start: Ipa, i: u64) -> Ipa {
    start + i * PAGE_SIZE
}
