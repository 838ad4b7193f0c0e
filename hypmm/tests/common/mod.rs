//! A host machine for the real adapter: stage2's `HostMemory` for table
//! pages and `RecordingTlb` for maintenance, rmap's `HostMachine` for guest
//! frames and swap, and rmap's real `Rmap` over them. A TLB model (fed by the
//! tests' guest accesses, drained by the recorded invalidations) checks that
//! no frame is freed while a translation to it may still be cached.

#![allow(dead_code)]

use hypmm::{GuestMemory, GuestVm, LockedStage2, Machine, MemCtx, PAGE_SIZE};
use platform::board::MAX_CPUS;
use rmap::host::HostMachine;
use rmap::lock::{Level, OrderedMutex, OrderedRwLock};
use rmap::{
    Fault, FrameAllocator, FrameTable, Ipa, Pa, PageState, Pfn, RegionFlags, RegionList, Rmap,
    Stage2, Stage2Locked, UnlinkProof, VmId, VmSet,
};
use stage2::host::{HostMemory, RecordingTlb, TlbCall};
use stage2::{S2Config, VmidAllocator, VmidBits, Vttbr};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Guest RAM of every test VM.
pub const RAM_BASE: Ipa = Ipa::new(0x4000_0000);
/// 4 MiB: two 2 MiB chunks.
pub const RAM_PAGES: u64 = 1024;
/// First guest frame (PA 4 GiB), away from the table pages at 2 GiB.
pub const FRAME_BASE: Pfn = Pfn::new(0x10_0000);
/// 16 MiB of guest frames.
pub const FRAMES: usize = 4096;
/// The shared zero page: outside the guest frames (as hyp's is, with the
/// table pages), so rmap's frame table does not cover it.
pub const ZERO_PAGE: Pa = Pa::new(0xC000_0000);
/// A 2 MiB block in pages.
pub const BLOCK_PAGES: u64 = hypmm::BLOCK_SIZE / PAGE_SIZE;

/// Everything the machine handle points at (leaked: one per test).
pub struct Hw {
    pub tables: HostMemory,
    pub tlb: RecordingTlb,
    pub frames: HostMachine,
    pub vmids: VmidAllocator<MAX_CPUS>,
    pub cfg: S2Config,
    pub cpu: AtomicUsize,
    pub local_flushes: AtomicU64,
    /// (VMID, IPA page) -> PA page a guest may still have cached.
    pub cached: Mutex<BTreeMap<(u16, u64), u64>>,
    /// Every frame freed, in order.
    pub freed: Mutex<Vec<u64>>,
    /// A view of the world's frame table (the stage 2 reports block splits to it).
    pub meta: FrameTable,
}

impl Hw {
    /// The TLB model's side of an invalidation: what it covers is no
    /// longer cached.
    pub fn on_tlb(&self, call: &TlbCall) {
        let mut cached = self.cached.lock().unwrap();
        match *call {
            TlbCall::Ipa { vmid, ipa, .. } => {
                cached.remove(&(vmid, ipa & !(PAGE_SIZE - 1)));
            }
            TlbCall::Vmid { vmid } => cached.retain(|k, _| k.0 != vmid),
            TlbCall::All => cached.clear(),
            _ => {}
        }
    }

    /// The PoC cleans recorded so far, as (PA, length).
    pub fn cleans(&self) -> Vec<(u64, u64)> {
        let calls = self.tlb.calls();
        let f = |c: &TlbCall| match *c {
            TlbCall::CleanPoc { pa, len } => Some((pa, len)),
            _ => None,
        };
        calls.iter().filter_map(f).collect()
    }
}

/// The host machine handle (`Copy`, like hyp's zero-sized one).
#[derive(Clone, Copy)]
pub struct HostMach(pub &'static Hw);

impl Machine for HostMach {
    type Tables = &'static HostMemory;
    type Tlb = RecordingTlb;

    fn tables(&self) -> &'static HostMemory {
        &self.0.tables
    }
    fn tlb(&self) -> &RecordingTlb {
        &self.0.tlb
    }
    fn invalidate_ipa_local(&self, vttbr: Vttbr, ipa: u64) {
        self.0.local_flushes.fetch_add(1, Ordering::SeqCst);
        stage2::TlbMaintenance::invalidate_ipa(&self.0.tlb, vttbr, ipa, 3);
    }
    fn invalidate_vmid_local(&self, vttbr: Vttbr) {
        self.0.local_flushes.fetch_add(1, Ordering::SeqCst);
        stage2::TlbMaintenance::invalidate_vmid(&self.0.tlb, vttbr);
    }
    fn cpu_index(&self) -> usize {
        self.0.cpu.load(Ordering::SeqCst)
    }
    fn dsb_ish(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
    }
    fn vmids(&self) -> &VmidAllocator<MAX_CPUS> {
        &self.0.vmids
    }
    fn config(&self) -> S2Config {
        self.0.cfg
    }
    fn alloc_frame(&self) -> Option<Pa> {
        self.0.frames.alloc().map(Pfn::pa)
    }
    fn alloc_contiguous_zeroed(&self, pages: usize) -> Option<Pa> {
        let pfn = self.0.frames.alloc_contiguous(pages as u64)?;
        Some(pfn.pa())
    }
    /// Not zeroed (block migration's target): the copy overwrites it.
    fn alloc_contiguous(&self, pages: usize) -> Option<Pa> {
        self.0.frames.alloc_run(pages as u64).map(Pfn::pa)
    }
    fn frame_table(&self) -> &FrameTable {
        &self.0.meta
    }
    /// The TLB model's check: no guest may still cache a translation to it.
    fn free_frame(&self, pa: Pa) {
        let cached = self.0.cached.lock().unwrap();
        let pa = pa.raw();
        if let Some((k, _)) = cached.iter().find(|(_, &p)| p == pa) {
            panic!(
                "frame {pa:#x} freed while VMID {} may cache IPA {:#x}",
                k.0, k.1
            );
        }
        drop(cached);
        self.0.freed.lock().unwrap().push(pa);
        self.0.frames.free(Pa::new(pa).pfn());
    }
    unsafe fn zero_frame(&self, pa: Pa) {
        self.0.frames.zero(pa.pfn());
    }
    unsafe fn copy_frame(&self, dst: Pa, src: Pa) {
        self.0.frames.copy(dst.pfn(), src.pfn());
    }
    unsafe fn frames_equal(&self, a: Pa, b: Pa) -> bool {
        use rmap::FrameAllocator;
        // The zero page is outside the host frames: it holds zeroes.
        match (a == ZERO_PAGE, b == ZERO_PAGE) {
            (true, true) => true,
            (true, false) => self.0.frames.is_zero(b.pfn()),
            (false, true) => self.0.frames.is_zero(a.pfn()),
            (false, false) => self.0.frames.same_contents(a.pfn(), b.pfn()),
        }
    }
    unsafe fn frame_hash(&self, pa: Pa) -> u64 {
        // Host pages hold a pattern of one value (`write_value`): hash it.
        let value = if pa == ZERO_PAGE {
            0
        } else {
            self.0.frames.read_value(pa.pfn())
        };
        value.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
    fn zero_page(&self) -> Pa {
        ZERO_PAGE
    }
}

/// A VM as hyp's `VmMemory` is one, minus the dirty log.
pub struct TestVm {
    pub id: u32,
    pub vmid: u16,
    /// The stage-2 root's PA, for [`walk`].
    pub root: u64,
    pub regions: OrderedRwLock<RegionList>,
    pub memory: OrderedMutex<GuestMemory<HostMach>>,
    /// The dirty log: pages whose entry may differ from the latest snapshot.
    pub dirty: Mutex<BTreeSet<Ipa>>,
}

impl GuestVm<HostMach> for TestVm {
    fn regions(&self) -> &OrderedRwLock<RegionList> {
        &self.regions
    }
    fn ram(&self) -> Range<Ipa> {
        RAM_BASE..RAM_BASE + RAM_PAGES * PAGE_SIZE
    }
    fn next_dirty(&self, from: Ipa) -> Option<Ipa> {
        self.dirty.lock().unwrap().range(from..).next().copied()
    }
    fn clear_dirty(&self, ipa: Ipa) {
        self.dirty.lock().unwrap().remove(&ipa);
    }
}

impl Stage2 for TestVm {
    type Locked<'a> = LockedStage2<'a, HostMach>;

    fn lock(&self) -> LockedStage2<'_, HostMach> {
        LockedStage2::new(self.memory.lock())
    }
    fn lock_nested(&self) -> LockedStage2<'_, HostMach> {
        LockedStage2::new(self.memory.lock_nested(1))
    }
    fn flush_deferred(&self) {
        self.memory.lock().flush_deferred();
    }
    fn free_tables(&self, proof: UnlinkProof) {
        assert_eq!(proof.vm().0, self.id);
        self.memory.lock().destroy();
    }
}

/// The live VMs, as rmap walkers see them.
#[derive(Default)]
pub struct TestVms(pub Mutex<BTreeMap<u32, Arc<TestVm>>>);

impl VmSet for TestVms {
    type Vm = TestVm;

    fn with_vm<R>(&self, id: VmId, f: impl FnOnce(&TestVm) -> R) -> Option<R> {
        let vm = self.0.lock().unwrap().get(&id.0).cloned()?;
        if !vm.memory.lock().is_live() {
            return None;
        }
        Some(f(&vm))
    }
}

/// A machine, a reverse map and its VMs.
pub struct World {
    pub m: HostMach,
    pub rmap: Rmap,
    pub vms: TestVms,
}

impl World {
    /// A world whose stage 2 uses FEAT_S2FWB or not.
    pub fn new(fwb: bool) -> World {
        let cfg = S2Config::new(2, 40, VmidBits::Eight)
            .expect("config")
            .with_fwb(fwb);
        let table = FrameTable::leaked(FRAME_BASE, FRAMES);
        let hw: &'static Hw = Box::leak(Box::new(Hw {
            tables: HostMemory::new(256),
            tlb: RecordingTlb::new(),
            frames: HostMachine::new(FRAME_BASE, FRAMES, 1, 64),
            vmids: VmidAllocator::new(VmidBits::Eight),
            cfg,
            cpu: AtomicUsize::new(0),
            local_flushes: AtomicU64::new(0),
            cached: Mutex::new(BTreeMap::new()),
            freed: Mutex::new(Vec::new()),
            meta: table.view().expect("a leaked table has a view"),
        }));
        hw.tlb.set_hook(move |call| hw.on_tlb(call));
        let rmap = Rmap::new(table, 1024, 1024);
        World {
            m: HostMach(hw),
            rmap,
            vms: TestVms::default(),
        }
    }

    pub fn hw(&self) -> &'static Hw {
        self.m.0
    }

    /// A VM with `pages` of RAM as one region, loaded once (so it has a VMID).
    pub fn vm(&self, id: u32, pages: u64) -> Arc<TestVm> {
        let vm = self.empty_vm(id);
        let mut list = vm.regions.write();
        let r = self
            .rmap
            .region_create(&mut list, RAM_BASE, pages, RegionFlags::NONE);
        r.expect("region");
        drop(list);
        vm
    }

    /// A VM with no region (a fork child).
    pub fn empty_vm(&self, id: u32) -> Arc<TestVm> {
        let mem = GuestMemory::new(self.m.0.cfg, self.m).expect("root");
        let vmid = (mem.load_here() >> 48) as u16;
        let root = mem.table().vttbr().baddr();
        assert_ne!(vmid, 0);
        let vm = Arc::new(TestVm {
            id,
            vmid,
            root,
            regions: OrderedRwLock::new(Level::VM_REGIONS, "vm.regions", RegionList::new(VmId(id))),
            memory: OrderedMutex::new(Level::STAGE2, "vm.stage2", mem),
            dirty: Mutex::new(BTreeSet::new()),
        });
        self.vms.0.lock().unwrap().insert(id, vm.clone());
        vm
    }

    /// The stage-2 fault as hyp's `glue::fault` takes it (minus reclaim and
    /// the dirty log): a translation fault tries the 2 MiB first touch,
    /// then rmap's page fault, until the guest could retry. Err if an
    /// update could not allocate a table page (hyp's `NoMemory`).
    pub fn fault(&self, vm: &TestVm, ipa: Ipa, write: bool) -> Result<(), rmap::Error> {
        for _ in 0..8 {
            let translation = vm.lock().lookup(ipa) == PageState::Invalid;
            if translation && hypmm::fault_block(&self.rmap, &vm.regions, vm, &self.m, ipa) {
                let chunk = ipa.align_down(hypmm::BLOCK_SIZE);
                let mut dirty = vm.dirty.lock().unwrap();
                dirty.extend(chunk.pages_to(chunk + hypmm::BLOCK_SIZE));
                return Ok(());
            }
            vm.dirty.lock().unwrap().insert(ipa.page());
            // A table page missing for the fault's change is its error (OutOfFrames).
            let r = self.rmap.handle_fault(
                &vm.regions,
                vm,
                &hypmm::Frames(&self.m),
                &self.hw().frames,
                ipa,
                write,
            )?;
            match r {
                Fault::Done => return Ok(()),
                Fault::Retry(Some(pfn)) => self.rmap.wait_frame_unlocked(pfn),
                Fault::Retry(None) => {}
            }
        }
        panic!("fault at {ipa:#x} did not resolve");
    }

    /// The guest accesses `ipa` (after its fault): its TLB may now cache
    /// the translation, until an invalidation covers it.
    pub fn touch(&self, vm: &TestVm, ipa: Ipa) {
        let pa = vm.memory.lock().pa_of(ipa).expect("touched page is mapped");
        // The TLB model keys raw addresses, as the hardware's does.
        let page = ipa.page().raw();
        let mut cached = self.hw().cached.lock().unwrap();
        cached.insert((vm.vmid, page), pa.page().raw());
    }

    /// Faults and touches.
    pub fn access(&self, vm: &TestVm, ipa: Ipa, write: bool) {
        self.fault(vm, ipa, write).expect("fault");
        self.touch(vm, ipa);
    }

    /// rmap's view of the entry at `ipa`, through the adapter.
    pub fn entry(&self, vm: &TestVm, ipa: Ipa) -> PageState {
        vm.lock().lookup(ipa)
    }

    /// The level of the stage-2 leaf mapping `ipa` (2: block, 3: page).
    pub fn level(&self, vm: &TestVm, ipa: Ipa) -> Option<u8> {
        vm.memory.lock().table().lookup(ipa).map(|l| l.level)
    }

    /// What hypmm's generic operations work with.
    pub fn cx(&self) -> MemCtx<'_, HostMach, HostMachine> {
        MemCtx {
            rmap: &self.rmap,
            machine: &self.m,
            swap: &self.hw().frames,
        }
    }

    /// Forks `parent` into the empty `child` (`hypmm::fork_memory`); the
    /// parent's dirty log is then relative to the child (a snapshot).
    pub fn fork(&self, parent: &TestVm, child: &TestVm) {
        hypmm::fork_memory(&self.cx(), parent, child).expect("fork");
        parent.dirty.lock().unwrap().clear();
    }

    /// Tears `vm` down (`hypmm::teardown`).
    pub fn teardown(&self, vm: &TestVm) {
        hypmm::teardown(&self.cx(), vm);
        self.vms.0.lock().unwrap().remove(&vm.id);
    }

    /// Releases `range` of `vm` (`hypmm::release`), logging what it cleared.
    pub fn release(&self, vm: &TestVm, range: Range<Ipa>) -> Result<Vec<Ipa>, rmap::Error> {
        let mut released = Vec::new();
        let both = (&self.m, &self.hw().frames);
        hypmm::release(&self.rmap, &vm.regions, vm, both, range, |ipa| {
            released.push(ipa);
        })?;
        vm.dirty.lock().unwrap().extend(released.iter().copied());
        Ok(released)
    }
}

/// What a hardware walker sees: the PA `ipa` translates to through the
/// table at `root`, read word by word from host memory without any lock
/// (an oracle independent of the stage2 crate's own walker).
pub fn walk(hw: &Hw, root: u64, ipa: u64) -> Option<u64> {
    let (desc, shift) = walk_leaf(hw, root, ipa)?;
    let out = desc & 0x0000_ffff_ffff_f000;
    Some(out + (ipa & ((1 << shift) - 1) & !0xfff))
}

/// The valid leaf descriptor a hardware walker uses for `ipa`, and the log2
/// of the size it maps (the same lock-free oracle as [`walk`]).
pub fn walk_leaf(hw: &Hw, root: u64, ipa: u64) -> Option<(u64, u32)> {
    let cfg = hw.cfg;
    let mut table = root;
    let mut level = cfg.start_level();
    // The start level's table may be several concatenated pages.
    let mut index = ipa >> (12 + 9 * (3 - level as u32));
    loop {
        let desc = hw.tables.read(table + index * 8);
        let shift = 12 + 9 * (3 - level as u32);
        match (desc & 3, level) {
            (0 | 2, _) => return None,
            (3, 3) | (1, _) => return Some((desc, shift)),
            _ => {}
        }
        table = desc & 0x0000_ffff_ffff_f000;
        level += 1;
        index = (ipa >> (12 + 9 * (3 - level as u32))) & 511;
    }
}
