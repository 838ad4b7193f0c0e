//! The memory manager: one reverse map (`rmap::Rmap`) over every RAM frame,
//! and what it needs from the machine: the frame allocator, a page store for
//! swapped-out pages, and the set of live VMs. Faults, loading, fork and
//! teardown of guest memory all go through here, so every guest frame is
//! accounted for in the rmap (mapcount, anon_vma, index).

use crate::mm::frames::PAGE_SIZE;
use crate::mm::memory::HypMachine;
use crate::mm::vmmem::{self, VmMemory};
use alloc::sync::Arc;
use rmap::{
    Fault, FrameAllocator, FrameTable, Ipa, Pa, Pfn, RegionFlags, Rmap, Stage2, Stage2Locked, VmId,
    VmSet,
};
use spin::Once;
use stage2::TlbMaintenance;

static RMAP: Once<Rmap> = Once::new();
/// anon_vma and chain pools start with one segment and grow from the heap
/// (and so from frames) as VMs need them; bounded chains (DESIGN lesson 6)
/// keep them proportional to live regions. Their cap is what RAM could hold
/// if it held nothing but pool slots (none is smaller than this many bytes),
/// so memory runs out first: the cap only sizes the pools' segment
/// directories (a few KiB), it never refuses a VM memory could hold.
const MIN_SLOT_BYTES: usize = 32;

/// The pools' cap for `frames` frames of RAM.
fn pool_cap(frames: usize) -> usize {
    (frames.saturating_mul(PAGE_SIZE as usize) / MIN_SLOT_BYTES).min(rmap::pool::MAX_SLOTS)
}

pub fn rmap() -> &'static Rmap {
    RMAP.get().expect("rmap not initialised")
}

/// The PFN span the frame table covers (every RAM bank) and where the table
/// itself lives: the top of the highest bank, page-aligned, 16 bytes per
/// frame of the span. Sized to the machine at boot and kept out of the frame
/// allocator like the hypervisor's image (`main` reserves it), so it comes
/// neither from the heap (whose buddy allocator would round a 64 GiB host's
/// 256 MiB table up to 512 MiB) nor from the frames guests use.
pub fn frame_table_range(board: &platform::Board) -> platform::MemRange {
    let (_, count) = span(board);
    let bytes =
        (count as u64 * core::mem::size_of::<rmap::Frame>() as u64).next_multiple_of(PAGE_SIZE);
    let top = board.ram.iter().map(|r| r.end()).max().unwrap_or(0) & !(PAGE_SIZE - 1);
    platform::MemRange {
        base: top - bytes,
        size: bytes,
    }
}

/// First PFN and number of frames of the RAM banks' span.
fn span(board: &platform::Board) -> (Pfn, usize) {
    let lo = board.ram.iter().map(|r| r.base).min().unwrap_or(0);
    let hi = board.ram.iter().map(|r| r.end()).max().unwrap_or(0);
    (Pa::new(lo).pfn(), ((hi - lo) / PAGE_SIZE) as usize)
}

/// Frame metadata for every frame of the RAM banks' span, in the memory of
/// `frame_table_range` (which `main` kept out of the frame allocator).
pub fn init(board: &platform::Board) {
    let (base, count) = span(board);
    let table = frame_table_range(board);
    const {
        assert!(core::mem::size_of::<rmap::pool::Slot<rmap::AnonVma>>() >= MIN_SLOT_BYTES);
        assert!(core::mem::size_of::<rmap::pool::Slot<rmap::chain::Chain>>() >= MIN_SLOT_BYTES);
    }
    let cap = pool_cap(count);
    RMAP.call_once(|| Rmap::new(frame_table(base, count, table), cap, cap));
}

/// The frame table (16 bytes per frame of the RAM span) in `at`.
fn frame_table(base: Pfn, count: usize, at: platform::MemRange) -> FrameTable {
    assert!(
        count * core::mem::size_of::<rmap::Frame>() <= at.size as usize,
        "frame table range too small"
    );
    // SAFETY: `at` is RAM kept out of the frame allocator for the frame table
    // alone (main reserves `frame_table_range`) and given to it for good,
    // identity mapped at EL2 as normal memory, page-aligned (so aligned for
    // `Frame`) and large enough for `count` (checked above). Called once.
    let memory = unsafe {
        core::slice::from_raw_parts_mut(at.base as *mut core::mem::MaybeUninit<rmap::Frame>, count)
    };
    FrameTable::in_memory(base, memory)
}

/// The frame allocator as rmap sees it.
pub struct HypFrames;

impl FrameAllocator for HypFrames {
    #[inline]
    fn alloc(&self) -> Option<Pfn> {
        hypmm::Frames(&HypMachine).alloc()
    }

    #[inline]
    fn free(&self, pfn: Pfn) {
        hypmm::Frames(&HypMachine).free(pfn)
    }

    #[inline]
    fn free_folio(&self, head: Pfn) {
        hypmm::Frames(&HypMachine).free_folio(head)
    }

    #[inline]
    fn alloc_folio(&self) -> Option<Pfn> {
        hypmm::Frames(&HypMachine).alloc_folio()
    }

    #[inline]
    fn zero(&self, pfn: Pfn) {
        hypmm::Frames(&HypMachine).zero(pfn)
    }

    #[inline]
    fn copy(&self, dst: Pfn, src: Pfn) {
        hypmm::Frames(&HypMachine).copy(dst, src)
    }

    #[inline]
    fn same_contents(&self, a: Pfn, b: Pfn) -> bool {
        hypmm::Frames(&HypMachine).same_contents(a, b)
    }

    #[inline]
    fn is_zero(&self, pfn: Pfn) -> bool {
        hypmm::Frames(&HypMachine).is_zero(pfn)
    }
}

/// Reclaimed pages: the compressed store (`store.rs`).
pub use crate::mm::store::STORE;

/// The live VMs, as rmap walkers see them.
pub struct HypVms;

impl VmSet for HypVms {
    type Vm = VmMemory;

    fn with_vm<R>(&self, id: VmId, f: impl FnOnce(&VmMemory) -> R) -> Option<R> {
        let vm: Arc<VmMemory> = vmmem::get(id.0)?;
        if !vm.memory.lock().is_live() {
            return None;
        }
        Some(f(&vm))
    }
}

/// Guest RAM as one region of the VM's IPA space.
pub fn create_ram_region(vm: &VmMemory) -> Result<(), rmap::Error> {
    let mut list = vm.regions.write();
    rmap().region_create(
        &mut list,
        Ipa::new(vm.ram.base),
        vm.ram.size / PAGE_SIZE,
        RegionFlags::NONE,
    )
}

/// Why a fault could not be resolved.
pub enum FaultError {
    NoMemory,
    NoRegion,
    Other(rmap::Error),
}

/// The access that faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A load.
    Read,
    /// An instruction fetch.
    Fetch,
    /// A store (or the guest's own stage-1 walk, which may write A/D flags).
    Write,
}

/// What the stage-2 entry was when the access faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// The entry was invalid: the only kind that can be a 2 MiB first touch.
    Translation,
    /// A permission fault on an entry that exists.
    Permission,
    /// An Access flag fault: the entry exists, the reclaim clock cleared
    /// its (software-managed) Access flag.
    AccessFlag,
}

/// Resolves a stage-2 fault on guest RAM at `ipa` (demand-zero, copy-on-write,
/// swap-in, or waiting out a migration). Returns once the guest can retry.
pub fn fault(vm: &VmMemory, ipa: Ipa, access: Access, kind: FaultKind) -> Result<(), FaultError> {
    // The two faults on an entry that only needs a bit set: the guest
    // touched a page the clock aged, or fetched from one mapped not
    // executable (`hypmm::Fetch`). If the entry went meanwhile, the
    // ordinary path below resolves the fault.
    let page = ipa.page();
    // A chunk of a loaded image not installed yet gets its entries first:
    // taken for empty, it would become 512 zero pages.
    if crate::mm::diskpages::ensure(vm, page).is_err() {
        return Err(FaultError::NoMemory);
    }
    match (kind, access) {
        (FaultKind::AccessFlag, _) if vm.memory.lock().mkyoung(page) => return Ok(()),
        (FaultKind::Permission, Access::Fetch) if vm.memory.lock().make_executable(page) => {
            return Ok(())
        }
        _ => {}
    }
    let write = access == Access::Write;
    // The swap cache and region bookkeeping may allocate a little heap; the
    // heap may have to grow, from frames reclaim can give back.
    let heap_ok = || crate::mm::heap::guest_may_allocate(4096);
    let heap_ok = heap_ok() || (crate::mm::memctl::reclaim_for_fault() && heap_ok());
    if !heap_ok {
        return Err(FaultError::NoMemory);
    }
    crate::mm::memory::refill_reserve();
    // Below the low watermark, reclaim before allocating (no lock held here),
    // including before a 2 MiB first touch takes 512 frames.
    crate::mm::memctl::balance();
    if kind == FaultKind::Translation && fault_block(vm, ipa) {
        let chunk = ipa.align_down(crate::mm::memory::BLOCK_SIZE);
        let mut log = vm.dirty.lock();
        chunk
            .pages_to(chunk + crate::mm::memory::BLOCK_SIZE)
            .for_each(|page| log.note(page));
        return Ok(());
    }
    vm.dirty.lock().note(ipa.page());
    // A stage-2 table page missing for the fault's own change comes back as
    // OutOfFrames, like a missing frame.
    let result = rmap().handle_fault(&vm.regions, vm, &HypFrames, &STORE, ipa, write);
    if matches!(result, Ok(Fault::Done)) && access == Access::Fetch {
        // The page was just mapped not executable: spare the guest the
        // fetch's second fault.
        vm.memory.lock().make_executable(page);
    }
    match result {
        Ok(Fault::Retry(Some(pfn))) => rmap().wait_frame_unlocked(pfn),
        Ok(_) => {}
        Err(rmap::Error::OutOfFrames) if crate::mm::memctl::reclaim_for_fault() => {}
        Err(rmap::Error::OutOfFrames | rmap::Error::OutOfAnonVmas | rmap::Error::OutOfChains) => {
            return Err(FaultError::NoMemory)
        }
        Err(rmap::Error::NoRegion) => return Err(FaultError::NoRegion),
        Err(e) => return Err(FaultError::Other(e)),
    }
    Ok(())
}

/// Linux's huge anonymous fault (`hypmm::fault_block`): the first touch of
/// an empty 2 MiB chunk maps 512 fresh zeroed frames with one block entry;
/// false sends the fault down the page path.
fn fault_block(vm: &VmMemory, ipa: Ipa) -> bool {
    hypmm::fault_block(rmap(), &vm.regions, vm, &HypMachine, ipa)
}

/// Writes `data` into guest RAM at `ipa` as the guest would (write faults
/// first, so every frame is a private, rmap-tracked page of the VM).
pub fn write_guest(vm: &VmMemory, ipa: Ipa, data: &[u8]) -> Result<(), FaultError> {
    let mut done = 0usize;
    while done < data.len() {
        let addr = ipa + done as u64;
        let off = addr.page_offset() as usize;
        let n = (PAGE_SIZE as usize - off).min(data.len() - done);
        let page = addr.page();
        let pa = loop {
            let entry = vm.lock().lookup(page);
            if matches!(entry, rmap::PageState::Mapped { writable: true, .. }) {
                // None: moved (migration) since the lookup; look again.
                if let Some(pa) = vm.memory.lock().pa_of(page) {
                    break pa;
                }
                continue;
            }
            let kind = if matches!(
                entry,
                rmap::PageState::Mapped { .. } | rmap::PageState::ZeroPage
            ) {
                FaultKind::Permission
            } else {
                FaultKind::Translation
            };
            fault(vm, page, Access::Write, kind)?;
        };
        // SAFETY: `pa` backs a writable page of this VM, identity mapped;
        // the VM is not running yet (loader), so nothing races the copy.
        unsafe {
            core::ptr::copy_nonoverlapping(
                data[done..].as_ptr(),
                (pa + off as u64).raw() as *mut u8,
                n,
            )
        };
        // The page is mapped already: clean it before the VM runs (it reads
        // its image and DTB with the MMU off).
        crate::mm::memory::publish(pa + off as u64, n as u64);
        // Pages a fault maps here start execute-never, so their first fetch
        // maintains the I-cache; this covers a page some earlier fetch made
        // executable already (once per loaded byte, at load time only).
        crate::mm::memory::TLB.invalidate_icache((pa + off as u64).raw(), n as u64);
        done += n;
    }
    Ok(())
}

/// What `hypmm`'s generic memory operations work with on this machine.
pub fn cx(rmap: &Rmap) -> hypmm::MemCtx<'_, HypMachine, crate::mm::store::PageStore> {
    hypmm::MemCtx {
        rmap,
        machine: &HypMachine,
        swap: &STORE,
    }
}

/// Tears down a VM's memory (`hypmm::teardown`): zap every entry, unlink
/// its regions, and only then free its stage-2 tables (DESIGN lesson 5).
pub fn teardown(vm: &VmMemory) {
    crate::mm::diskpages::drop_pending(vm);
    hypmm::teardown(&cx(rmap()), vm)
}

/// Shares every page of `parent` copy-on-write with the empty `child`
/// (`hypmm::fork_memory`): one batched TLB invalidation for the parent.
/// Both VMs must be stopped (no vCPU on a CPU).
pub fn fork_memory(parent: &VmMemory, child: &VmMemory) -> Result<(), rmap::Error> {
    // The child copies the parent's table: every entry must be in it.
    crate::mm::diskpages::complete(parent).map_err(|_| rmap::Error::OutOfFrames)?;
    hypmm::fork_memory(&cx(rmap()), parent, child)
}

/// Frames mapped by more than one stage-2 entry.
pub fn shared_frames() -> u64 {
    let frames = rmap().frames();
    frames
        .iter()
        .filter(|&(pfn, _)| frames.mapcount(pfn) > 1)
        .count() as u64
}

/// Drops `vm`'s pages in `[start, start + len)` (MEM_RELEASE): each entry is
/// cleared and its frame or swap slot reference dropped; untouched pages
/// cost nothing. Blocks are split first (the reserve covers the table page).
pub fn release(vm: &VmMemory, start: Ipa, len: u64) -> Result<(), rmap::Error> {
    // A pending chunk installed after the release would bring its old
    // contents back: install the ones the range touches first.
    crate::mm::diskpages::ensure_range(vm, start, len).map_err(|_| rmap::Error::OutOfFrames)?;
    let machine = (&HypMachine, &STORE);
    hypmm::release(
        rmap(),
        &vm.regions,
        vm,
        machine,
        start..start + len,
        |ipa| vm.dirty.lock().note(ipa),
    )
}
