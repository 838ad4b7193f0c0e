//! Plain in-memory implementations of the backend traits, for tests, the stress test and the
//! benchmark: "physical memory" of page contents, a swap store, per-VM stage-2 maps, a VM set,
//! and whole-world invariant checks. Hardware-free and small; not for use at EL2.

mod cache;
mod check;
mod check_merged;
mod flush_hook;
mod hw;
mod restore;
mod stage2;
mod swap;
mod vm;

pub use flush_hook::{FlushHooked, HookedVm};
pub use hw::HostHw;
pub use stage2::{ClearFault, HostStage2, HostStage2Guard, BLOCK_PAGES, BLOCK_SIZE};
use swap::{Hooks, SwapTable};
pub use swap::{SwapOp, SwapStats};
pub use vm::HostVm;

use crate::backend::{FrameAllocator, Stage2, Stage2Locked, VmSet};
use crate::lock::{Level, OrderedMutex, OrderedRwLock};
use crate::region::RegionFlags;
use crate::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use crate::{Error, Ipa, Pfn, Rmap, VmId, PAGE_SIZE};
use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;

/// Host frames with contents (`words` u64 per page), a free list, and a swap store.
pub struct HostMachine {
    base: Pfn,
    words: usize,
    mem: Box<[AtomicU64]>,
    free: OrderedMutex<Vec<Pfn>>,
    swap: OrderedMutex<SwapTable>,
    swap_capacity: AtomicUsize,
    hooks: Hooks,
    /// Per frame, bumped when it is freed (the TLB model tells a stale entry by it).
    gens: Box<[AtomicU64]>,
    hw: Arc<HostHw>,
    /// Frame allocations that may still succeed (`u64::MAX`: unlimited), and those refused.
    frame_budget: AtomicU64,
    frame_failures: AtomicU64,
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
                base.run(frames as u64).rev().collect(),
            ),
            swap: OrderedMutex::new(Level::ALLOCATOR, "host.swap", SwapTable::default()),
            swap_capacity: AtomicUsize::new(swap_capacity),
            hooks: Hooks::default(),
            gens: (0..frames).map(|_| AtomicU64::new(0)).collect(),
            hw: Arc::default(),
            frame_budget: AtomicU64::new(u64::MAX),
            frame_failures: AtomicU64::new(0),
        }
    }

    /// Allows `n` more frame allocations (`None`: as many as there are free frames); the
    /// next one after those fails, as the hypervisor's allocator does when memory runs out
    /// (a block's run counts as one allocation).
    pub fn set_frame_budget(&self, n: Option<u64>) {
        self.frame_budget
            .store(n.unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// Room for `n` swapped pages from now on (slots in use beyond it stay until freed).
    pub fn set_swap_capacity(&self, n: usize) {
        self.swap_capacity.store(n, Ordering::SeqCst);
    }

    /// Frame allocations refused so far (budget spent or no free frame).
    pub fn frame_failures(&self) -> u64 {
        self.frame_failures.load(Ordering::SeqCst)
    }

    /// Takes one allocation from the budget; false (and counted) when none is left.
    fn take_budget(&self) -> bool {
        let took = self
            .frame_budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| match b {
                u64::MAX => Some(b),
                0 => None,
                b => Some(b - 1),
            })
            .is_ok();
        if !took {
            self.frame_failures.fetch_add(1, Ordering::SeqCst);
        }
        took
    }

    /// The TLB model's check of a whole-frame fill of `dst` or read of `src`
    /// ([`HostHw`]'s `check_copy`).
    pub(super) fn check_copy(&self, dst: Option<Pfn>, src: Option<Pfn>) {
        let tlbs = self.hw.tlb.lock();
        self.hw.check_copy(&tlbs, dst, src, &|pfn| self.gen(pfn));
    }

    /// Whether `pfn` is on the free list (for the invariant checks).
    pub fn is_free(&self, pfn: Pfn) -> bool {
        self.free.lock().contains(&pfn)
    }

    /// The frames on the free list.
    pub fn free_frames(&self) -> alloc::collections::BTreeSet<Pfn> {
        self.free.lock().iter().copied().collect()
    }

    /// The table-page budget, TLB model and failure record this machine's VMs share.
    pub fn hw(&self) -> &Arc<HostHw> {
        &self.hw
    }

    /// The frame's generation (changes when it is freed).
    pub(super) fn gen(&self, pfn: Pfn) -> u64 {
        self.gens[(pfn - self.base) as usize].load(Ordering::SeqCst)
    }

    /// `pages` (a power of two) free frames from an aligned PFN, zeroed, or `None` if no
    /// such run is free (hyp's `alloc_contiguous_zeroed`, for a first-touch block).
    pub fn alloc_contiguous(&self, pages: u64) -> Option<Pfn> {
        let pfn = self.alloc_run(pages)?;
        pfn.run(pages).for_each(|q| self.zero(q));
        Some(pfn)
    }

    /// [`HostMachine::alloc_contiguous`] without zeroing (a block migration's target, which
    /// the copy overwrites).
    pub fn alloc_run(&self, pages: u64) -> Option<Pfn> {
        if !self.take_budget() {
            return None;
        }
        let mut free = self.free.lock();
        let set: alloc::collections::BTreeSet<Pfn> = free.iter().copied().collect();
        let first = self.base.raw().next_multiple_of(pages);
        let end = self.base.raw() + self.gens.len() as u64;
        let pfn = (first..end)
            .step_by(pages as usize)
            .map(Pfn::new)
            .find(|&p| p.raw() + pages <= end && p.run(pages).all(|q| set.contains(&q)))?;
        free.retain(|&q| !(pfn..pfn + pages).contains(&q));
        Some(pfn)
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
        if !self.take_budget() {
            return None;
        }
        let pfn = self.free.lock().pop();
        if pfn.is_none() {
            self.frame_failures.fetch_add(1, Ordering::SeqCst);
        }
        pfn
    }
    /// An aligned run from the free list, not zeroed; counted as one allocation of the
    /// frame budget (as a first-touch block's run is).
    fn alloc_folio(&self) -> Option<Pfn> {
        self.alloc_run(crate::folio::FOLIO_PAGES)
    }
    /// Also the TLB model's check: no VM may still cache a translation to the frame.
    fn free(&self, pfn: Pfn) {
        {
            let tlbs = self.hw.tlb.lock();
            self.hw.check_free(&tlbs, pfn);
            self.gens[(pfn - self.base) as usize].fetch_add(1, Ordering::SeqCst);
        }
        self.free.lock().push(pfn);
    }
    /// Also the cache model's record: the frame is written, then cleaned to the PoC.
    fn zero(&self, pfn: Pfn) {
        self.check_copy(Some(pfn), None);
        self.page(pfn)
            .iter()
            .for_each(|w| w.store(0, Ordering::Relaxed));
        self.hw.wrote_and_published(pfn);
    }
    /// As `zero`, recorded in the cache model. Also the TLB model's check: no vCPU may
    /// write `src` while it is copied, nor see `dst` before the copy is complete.
    fn copy(&self, dst: Pfn, src: Pfn) {
        self.check_copy(Some(dst), Some(src));
        for (d, s) in self.page(dst).iter().zip(self.page(src)) {
            d.store(s.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.hw.wrote_and_published(dst);
    }
    /// Word by word. Also the TLB model's check: no vCPU may write either frame while they
    /// are compared (a merge write-protects both first, invalidating their TLB entries).
    fn same_contents(&self, a: Pfn, b: Pfn) -> bool {
        self.check_copy(None, Some(a));
        self.check_copy(None, Some(b));
        let word = |w: &AtomicU64| w.load(Ordering::Relaxed);
        self.page(a)
            .iter()
            .map(word)
            .eq(self.page(b).iter().map(word))
    }
    /// Word by word, with `same_contents`'s TLB model check.
    fn is_zero(&self, pfn: Pfn) -> bool {
        self.check_copy(None, Some(pfn));
        self.page(pfn)
            .iter()
            .all(|w| w.load(Ordering::Relaxed) == 0)
    }
}

/// The VM set: `Arc`s so a walker keeps a VM alive while it looks at it.
pub struct HostVms {
    vms: OrderedRwLock<BTreeMap<VmId, Arc<HostVm>>>,
    next: AtomicU32,
    hw: Arc<HostHw>,
}

impl Default for HostVms {
    fn default() -> Self {
        Self::with_hw(Arc::default())
    }
}

impl HostVms {
    /// An empty set whose VMs stand on `hw` (a machine's: [`HostMachine::hw`]).
    pub fn with_hw(hw: Arc<HostHw>) -> Self {
        HostVms {
            vms: OrderedRwLock::new(Level::ALLOCATOR, "host.vms", BTreeMap::new()),
            next: AtomicU32::new(1),
            hw,
        }
    }

    /// A new empty VM.
    pub fn create(&self) -> Arc<HostVm> {
        let id = VmId(self.next.fetch_add(1, Ordering::Relaxed));
        let vm = Arc::new(HostVm::with_hw(id, self.hw.clone()));
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
        Self::with_swap(frames, words, max_anon_vmas, max_chains, frames)
    }

    /// [`HostWorld::new`] with room for only `swap_capacity` swapped pages.
    pub fn with_swap(
        frames: usize,
        words: usize,
        max_anon_vmas: usize,
        max_chains: usize,
        swap_capacity: usize,
    ) -> Self {
        let base = Pfn::new(0x40_000);
        let machine = HostMachine::new(base, frames, words, swap_capacity);
        // Leaked so the stage 2 can hold a view: it reports block splits to the folio counts.
        let table = crate::FrameTable::leaked(base, frames);
        machine
            .hw()
            .set_frames(table.view().expect("a leaked table has a view"));
        HostWorld {
            rmap: Rmap::new(table, max_anon_vmas, max_chains),
            vms: HostVms::with_hw(machine.hw().clone()),
            machine,
        }
    }

    /// The table-page budget, TLB model and failure record of this world.
    pub fn hw(&self) -> &HostHw {
        self.machine.hw()
    }

    /// A huge first touch, as hyp's `fault_block`: if the 2 MiB chunk holding `ipa` lies in a
    /// region of `vm` and has no leaf yet, 512 fresh zeroed frames (aligned) are recorded as
    /// exclusive pages (`Rmap::add_new_anon_block`) and mapped as one writable block leaf.
    /// False if the chunk does not qualify or no aligned run of free frames is left.
    pub fn fault_block(&self, vm: &HostVm, ipa: Ipa) -> bool {
        let chunk = ipa.align_down(BLOCK_SIZE);
        let prepared = vm.regions.read().find(ipa).map(|r| r.anon_vma().is_some());
        match prepared {
            None => return false,
            Some(false)
                if self
                    .rmap
                    .anon_vma_prepare(&mut vm.regions.write(), ipa)
                    .is_err() =>
            {
                return false
            }
            _ => {}
        }
        let regions = vm.regions.read();
        let Some(region) = regions.find(ipa) else {
            return false;
        };
        if chunk < region.start() || chunk + BLOCK_SIZE > region.end() {
            return false;
        }
        let mut s2 = vm.s2.lock();
        if s2.next_entry(chunk, chunk + BLOCK_SIZE).is_some() {
            return false;
        }
        let Some(pfn) = self.machine.alloc_contiguous(BLOCK_PAGES) else {
            return false;
        };
        self.rmap
            .add_new_anon_block(pfn, BLOCK_PAGES, region, chunk);
        let mapped = s2.map_block(chunk, pfn);
        assert!(mapped, "an empty chunk takes a block");
        true
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
        // As hypmm's `fork_memory` (its batch's end): one VMID-wide invalidation before the
        // parent runs again, which `Rmap::fork_vm` requires of its caller.
        parent.s2.flush_deferred();
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
