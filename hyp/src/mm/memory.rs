//! The machine under the stage-2 adapter: stage-2 configuration from the ID
//! registers, table pages from the frame allocator (with the split reserve),
//! the VMID allocator and the EL2 TLB. The adapter itself (a VM's table and
//! VMID, rmap's `Stage2Locked` over it) is the host-tested `hypmm` crate,
//! instantiated here with [`HypMachine`].

use crate::mm::frames::{self, PAGE_SIZE};
use crate::mm::vmmem::MemError;
use platform::board::MAX_CPUS;
use rmap::Pa;
use spin::{Mutex, Once};
use stage2::memory::TablePage;
use stage2::{Aarch64Tlb, S2Config, TableMemory, VmidAllocator, VmidBits, Vttbr};

/// Table pages come from the frame allocator and are reached through the
/// hypervisor's identity map.
pub struct FrameTables;

impl TableMemory for FrameTables {
    // stage2's TableMemory speaks raw table addresses (its descriptor
    // boundary); the allocator's typed ones are converted here, once.
    fn alloc_zeroed_table(&self) -> Option<u64> {
        frames::get()
            .alloc_zeroed()
            .or_else(take_reserve)
            .map(Pa::raw)
    }

    fn free_table(&self, pa: u64) {
        frames::get().free(Pa::new(pa))
    }

    fn alloc_zeroed_root(&self, pages: usize) -> Option<u64> {
        // Unmovable: from the top of RAM, away from guest frames (evacuate).
        frames::get()
            .alloc_contiguous_zeroed_unmovable(pages)
            .map(Pa::raw)
    }

    fn free_root(&self, pa: u64, pages: usize) {
        for i in 0..pages as u64 {
            frames::get().free(Pa::new(pa + i * PAGE_SIZE));
        }
    }

    unsafe fn table(&self, pa: u64) -> &TablePage {
        // SAFETY: by the contract `pa` is a table page this memory handed
        // out and has not taken back (a RAM frame owned by the table),
        // identity mapped at EL2; table entries are only accessed atomically.
        unsafe { &*(pa as *const TablePage) }
    }
}

/// Table pages kept back for splitting 2 MiB blocks when the allocator is
/// empty: zapping, migrating or copying one page of a block must split it,
/// and teardown must not fail for want of one table page. Lock level:
/// frame allocator (innermost).
static RESERVE: Mutex<arrayvec::ArrayVec<Pa, 16>> = Mutex::new(arrayvec::ArrayVec::new_const());

fn take_reserve() -> Option<Pa> {
    let pa = RESERVE.lock().pop()?;
    // SAFETY: reserve frames are allocated and owned by the reserve alone;
    // popped, this one is the caller's.
    unsafe { frames::zero_frame(pa) };
    Some(pa)
}

/// Frames held in the split reserve (for leak checks: `stats`).
pub fn reserve_len() -> usize {
    RESERVE.lock().len()
}

/// Tops the split reserve up from the allocator. Called where no
/// memory-manager lock is held (the start of a fault).
pub fn refill_reserve() {
    let mut reserve = RESERVE.lock();
    while !reserve.is_full() {
        let Some(pa) = frames::get().alloc() else {
            break;
        };
        reserve.push(pa);
    }
}

static CONFIG: Once<S2Config> = Once::new();
/// VMIDs are a cache held only by VMs that run (`stage2::vmid`): each vCPU
/// load revalidates its VM's (`GuestMemory::load_here`), and running out
/// starts a new generation after invalidating every TLB entry.
static VMIDS: Once<VmidAllocator<MAX_CPUS>> = Once::new();
// SAFETY: the hypervisor runs at EL2 without VHE, identity mapped, with
// interrupts masked at EL2, so nothing re-enters an invalidation that has
// switched VTTBR_EL2.
pub static TLB: Aarch64Tlb = unsafe { Aarch64Tlb::new() };

pub use hypmm::{BROADCAST_FLUSHES, LOCAL_FLUSHES, NO_VMID_FLUSHES};

fn vmids() -> &'static VmidAllocator<MAX_CPUS> {
    VMIDS.get().expect("stage-2 config")
}

/// The VMID allocator's (largest number, generation, rollovers), for `stats`.
pub fn vmid_stats() -> (u16, u64, u64) {
    let v = vmids();
    (v.max(), v.generation(), v.rollovers())
}

/// The machine under the stage-2 adapter (`hypmm`): table pages from the
/// frame allocator, `TLBI`/`DC` through [`TLB`], this CPU by `MPIDR_EL1`.
/// Zero-sized, so `hypmm`'s generic code compiles to direct calls.
#[derive(Clone, Copy, Debug)]
pub struct HypMachine;

impl hypmm::Machine for HypMachine {
    type Tables = FrameTables;
    type Tlb = Aarch64Tlb;

    #[inline]
    fn tables(&self) -> FrameTables {
        FrameTables
    }

    #[inline]
    fn tlb(&self) -> &Aarch64Tlb {
        &TLB
    }

    #[inline]
    fn invalidate_ipa_local(&self, vttbr: Vttbr, ipa: u64) {
        TLB.invalidate_ipa_local(vttbr, ipa);
    }

    #[inline]
    fn invalidate_vmid_local(&self, vttbr: Vttbr) {
        TLB.invalidate_vmid_local(vttbr);
    }

    #[inline]
    fn cpu_index(&self) -> usize {
        crate::arch::percpu::cpu_index()
    }

    #[inline]
    fn dsb_ish(&self) {
        crate::arch::dsb_ish();
    }

    #[inline]
    fn vmids(&self) -> &VmidAllocator<MAX_CPUS> {
        vmids()
    }

    #[inline]
    fn config(&self) -> S2Config {
        *CONFIG.get().expect("stage-2 config")
    }

    #[inline]
    fn alloc_frame(&self) -> Option<Pa> {
        frames::get().alloc()
    }

    #[inline]
    fn alloc_contiguous_zeroed(&self, pages: usize) -> Option<Pa> {
        frames::get().alloc_contiguous_zeroed(pages)
    }

    fn alloc_contiguous(&self, pages: usize) -> Option<Pa> {
        frames::get().alloc_contiguous(pages)
    }

    fn free_contiguous(&self, pa: Pa, pages: usize) {
        frames::get().free_run(pa, pages)
    }

    #[inline]
    fn frame_table(&self) -> &rmap::FrameTable {
        crate::mm::glue::rmap().frames()
    }

    #[inline]
    fn free_frame(&self, pa: Pa) {
        frames::get().free(pa)
    }

    #[inline]
    unsafe fn zero_frame(&self, pa: Pa) {
        // SAFETY: the caller owns the frame and nothing maps it (the trait's
        // contract), which is `zero_frame`'s.
        unsafe { frames::zero_frame(pa) }
    }

    #[inline]
    unsafe fn copy_frame(&self, dst: Pa, src: Pa) {
        // SAFETY: the trait's contract (`dst` owned and fresh, `src` pinned,
        // distinct) is `copy_frame`'s.
        unsafe { frames::copy_frame(dst, src) }
    }

    #[inline]
    unsafe fn frames_equal(&self, a: Pa, b: Pa) -> bool {
        // SAFETY: the trait's contract (both pinned RAM frames nobody writes
        // meanwhile) is `frames_equal`'s.
        unsafe { frames::frames_equal(a, b) }
    }

    unsafe fn frame_hash(&self, pa: Pa) -> u64 {
        // SAFETY: the trait's contract (a RAM frame) is `frame_hash`'s.
        unsafe { frames::frame_hash(pa) }
    }

    #[inline]
    fn zero_page(&self) -> Pa {
        *ZERO_PAGE.get().expect("zero page")
    }
}

/// The one shared zero frame every `PageState::ZeroPage` entry maps: an
/// unmovable frame (allocated where the stage-2 tables are, outside the
/// movable range that migration and evacuation work on, and unknown to the
/// reverse map), zeroed and published at boot, never written or freed.
static ZERO_PAGE: Once<Pa> = Once::new();

/// The shared zero frame's address (`rmap <pa>` names it).
pub fn zero_page() -> Option<Pa> {
    ZERO_PAGE.get().copied()
}

/// Chooses the stage-2 configuration from this CPU's ID registers.
pub fn init() {
    let mmfr0 = crate::arch::read_sysreg!("id_aa64mmfr0_el1");
    let mmfr1 = crate::arch::read_sysreg!("id_aa64mmfr1_el1");
    let parange = (mmfr0 & 0xf) as u8;
    let vmid_bits = if (mmfr1 >> 4) & 0xf == 2 {
        VmidBits::Sixteen
    } else {
        VmidBits::Eight
    };
    let hw_af = mmfr1 & 0xf != 0;
    // FEAT_S2FWB: stage 2 forces Write-Back, so frames need no PoC cleaning
    // (docs/ARCHITECTURE.md, "Cache maintenance"); `fwb()` sets HCR_EL2.FWB.
    let mmfr2 = crate::arch::read_sysreg!("id_aa64mmfr2_el1");
    let fwb = stage2::fwb_supported(mmfr2);
    let pa_bits = [32u8, 36, 40, 42, 44, 48, 52][(parange as usize).min(6)];
    let cfg = S2Config::new(parange, pa_bits.min(40), vmid_bits)
        .expect("stage-2 configuration")
        .with_hw_access_flag(hw_af)
        .with_fwb(fwb);
    VMIDS.call_once(|| VmidAllocator::new(vmid_bits));
    crate::println!(
        "[hyp] stage 2: {}-bit IPA, {}-bit PA, {} VMIDs, hardware access flag {}, \
         ID_AA64MMFR2_EL1 {mmfr2:#x}: FWB {}",
        cfg.ipa_bits(),
        cfg.pa_bits(),
        cfg.max_vmid(),
        if hw_af { "on" } else { "off" },
        if fwb {
            "on (no PoC cleaning)"
        } else {
            "off (frames cleaned to PoC)"
        }
    );
    CONFIG.call_once(|| cfg);
    ZERO_PAGE.call_once(|| {
        let pa = frames::get()
            .alloc_zeroed()
            .expect("a frame for the zero page");
        // Cleaned to the PoC once: a guest with its caches off reads zeroes.
        publish(pa, PAGE_SIZE);
        pa
    });
}

pub fn vtcr() -> u64 {
    CONFIG.get().expect("stage-2 config").vtcr()
}

/// Whether stage 2 uses FEAT_S2FWB: every CPU must then set `HCR_EL2.FWB`.
pub fn fwb() -> bool {
    CONFIG.get().expect("stage-2 config").fwb()
}

/// Makes `pa..pa + len`, just written through the hypervisor's cacheable
/// map, visible to a guest whatever its stage-1 attributes (MMU off, Device):
/// cleaned to the PoC unless FEAT_S2FWB. Once per frame written, before a
/// guest can map (or, if mapped, read) it.
pub fn publish(pa: Pa, len: u64) {
    stage2::publish_frames(CONFIG.get().expect("stage-2 config"), &TLB, pa.raw(), len);
}

/// The VM's stage-2 table and VMID, guarded by the VM's stage-2 lock
/// (`hypmm::GuestMemory` on this machine).
pub type GuestMemory = hypmm::GuestMemory<HypMachine>;

/// A VM's stage-2 table with its lock held, as rmap changes it.
pub type LockedStage2<'a> = hypmm::LockedStage2<'a, HypMachine>;

pub use hypmm::BLOCK_SIZE;

/// A new VM's empty stage-2 table.
pub fn new_guest_memory() -> Result<GuestMemory, MemError> {
    let cfg = *CONFIG.get().expect("stage-2 config");
    GuestMemory::new(cfg, HypMachine).ok_or(MemError::NoMemory)
}

/// The vCPU loaded by `GuestMemory::load_here` was put (VTTBR_EL2 no longer
/// names the VM here): a rollover need not keep the VM's number for this CPU.
pub fn unload_here() {
    vmids().put(crate::arch::percpu::cpu_index());
}
