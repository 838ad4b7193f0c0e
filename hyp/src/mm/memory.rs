//! A VM's stage-2 table (the `stage2` crate) as the reverse map sees it: the
//! `rmap::Stage2` / `Stage2Locked` traits over the VM's stage-2 lock (DESIGN
//! level 4). Guest RAM is mapped page by page; entries are valid pages
//! (writable, or read-only for copy-on-write) or software entries.

use crate::mm::frames::{self, PAGE_SIZE};
use crate::mm::vmmem::MemError;
use core::sync::atomic::{AtomicU64, Ordering};
use platform::board::MAX_CPUS;

// The CPUs that may hold a VM's TLB entries are one u64 mask (`cpus`).
const _: () = assert!(MAX_CPUS <= 64);
use rmap::{Ipa, Pa};
use spin::{Mutex, Once};
use stage2::memory::TablePage;
use stage2::{
    Aarch64Tlb, Perm, S2Attrs, S2Config, Stage2Table, TableMemory, TlbMaintenance, Vmid,
    VmidAllocator, VmidBits, Vttbr,
};

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

/// Stage-2 invalidations (by IPA or VMID) kept on one CPU, and broadcast.
pub static LOCAL_FLUSHES: AtomicU64 = AtomicU64::new(0);
pub static BROADCAST_FLUSHES: AtomicU64 = AtomicU64::new(0);
/// Invalidations skipped because the VM never had a VMID (never ran).
pub static NO_VMID_FLUSHES: AtomicU64 = AtomicU64::new(0);

fn vmids() -> &'static VmidAllocator<MAX_CPUS> {
    VMIDS.get().expect("stage-2 config")
}

/// The VMID allocator's (largest number, generation, rollovers), for `stats`.
pub fn vmid_stats() -> (u16, u64, u64) {
    let v = vmids();
    (v.max(), v.generation(), v.rollovers())
}

fn this_cpu_bit() -> u64 {
    1 << crate::arch::percpu::cpu_index()
}

/// TLB maintenance for one VM (stage-2 lock held): an invalidation stays on
/// this CPU (`TLBI IPAS2E1`/`VMALLS12E1` with non-shareable barriers) when no
/// other CPU can hold the VM's entries, which saves the broadcast (under
/// QEMU's TCG it stops every vCPU thread; on silicon it is DVM traffic to
/// every core), and is broadcast otherwise.
///
/// The VMID invalidated is the VM's *current number* (`Vmid::number`), not
/// the table's VTTBR (whose VMID field is 0: the table owns none). Whatever
/// the number's generation: a vCPU loaded since before a rollover, and not
/// loaded again, still runs under it (the rollover reserved it) and caches
/// entries, so a stale generation does not mean "nothing cached". A number
/// that meanwhile went to another VM only costs that VM refills: its
/// previous holder's entries under it went with the rollover that freed it.
/// Only a VM that never had a number (never ran) has nothing cached, and is
/// skipped.
pub(super) struct VmTlb<'a> {
    cpus: &'a AtomicU64,
    vmid: &'a Vmid,
}

impl VmTlb<'_> {
    /// The VTTBR to invalidate with, and whether this CPU is the only one
    /// that may hold the VM's entries; None if the VM never had a VMID.
    /// It marks itself first: the invalidation loads the VM's VTTBR here.
    fn target(&self, table: Vttbr) -> Option<(Vttbr, bool)> {
        let me = this_cpu_bit();
        self.cpus.fetch_or(me, Ordering::SeqCst);
        // The descriptor stores before this are observed by every CPU before
        // the mask and the VMID are read. Pairs with `GuestMemory::load_here`,
        // which takes the VMID, then marks its CPU, then walks: either we see
        // its mark and number, or its walks see the new descriptors.
        crate::arch::dsb_ish();
        let local = self.cpus.load(Ordering::SeqCst) == me;
        let number = self.vmid.number();
        let counter = match (number, local) {
            (0, _) => &NO_VMID_FLUSHES,
            (_, true) => &LOCAL_FLUSHES,
            (_, false) => &BROADCAST_FLUSHES,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        (number != 0).then(|| (Vttbr::new(table.baddr(), number), local))
    }
}

impl TlbMaintenance for VmTlb<'_> {
    fn invalidate_ipa(&self, vttbr: Vttbr, ipa: u64, level: u8) {
        match self.target(vttbr) {
            Some((vttbr, true)) => TLB.invalidate_ipa_local(vttbr, ipa),
            Some((vttbr, false)) => TLB.invalidate_ipa(vttbr, ipa, level),
            None => {}
        }
    }

    fn invalidate_vmid(&self, vttbr: Vttbr) {
        match self.target(vttbr) {
            Some((vttbr, true)) => TLB.invalidate_vmid_local(vttbr),
            Some((vttbr, false)) => TLB.invalidate_vmid(vttbr),
            None => {}
        }
    }

    fn invalidate_icache(&self, pa: u64, len: u64) {
        TLB.invalidate_icache(pa, len);
    }

    fn invalidate_all(&self) {
        TLB.invalidate_all();
    }

    fn clean_dcache_poc(&self, pa: u64, len: u64) {
        TLB.clean_dcache_poc(pa, len);
    }
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
pub fn publish(pa: rmap::Pa, len: u64) {
    stage2::publish_frames(CONFIG.get().expect("stage-2 config"), &TLB, pa.raw(), len);
}

/// How stage-2 leaves encode MemAttr (for FWB or not).
pub(super) fn attr_encoding() -> stage2::AttrEncoding {
    CONFIG.get().expect("stage-2 config").attr_encoding()
}

/// Stage-2 attributes of guest RAM: normal memory, executable, writable
/// unless shared copy-on-write.
pub(super) fn ram_attrs(writable: bool) -> S2Attrs {
    S2Attrs::normal(if writable { Perm::RWX } else { Perm::RX })
}

/// The VM's stage-2 table and VMID, guarded by the VM's stage-2 lock.
pub struct GuestMemory {
    /// None once torn down (no vCPU of the VM can run any more). Its own
    /// VMID field is 0: the VMID comes from `vmid` at each load.
    table: Option<Stage2Table<FrameTables>>,
    /// The VMID (generation and number): none until a vCPU first loads, so
    /// a snapshot (never scheduled) never holds one.
    vmid: Vmid,
    /// Defer this lock holder's TLB invalidations to one VMID-wide flush
    /// (fork write-protecting a whole VM).
    pub(super) batching: bool,
    /// IPAs cleared with their invalidation still pending (`bbm.rs`).
    #[cfg(debug_assertions)]
    unflushed: core::cell::RefCell<crate::mm::bbm::Unflushed>,
    /// Per physical CPU: a stage-2 table page could not be allocated during
    /// an update this CPU made. Per CPU because several vCPUs of the VM fault
    /// at once: one whose own fault succeeded must not take (and act on)
    /// another's failure, which that one would then miss. Set and taken
    /// under the stage-2 lock, by the CPU that made the update.
    oom: [core::sync::atomic::AtomicBool; MAX_CPUS],
    /// Physical CPUs that may hold TLB entries of this VM: each sets its bit
    /// before it loads the VM's VTTBR (`load_here`), and bits are never
    /// cleared. An invalidation with no other bit set stays on its own CPU
    /// (`VmTlb`). A renumbered VM keeps its bits (an over-approximation):
    /// what other CPUs held under its old number went with the rollover.
    cpus: AtomicU64,
}

impl GuestMemory {
    pub fn new() -> Result<GuestMemory, MemError> {
        let cfg = *CONFIG.get().expect("stage-2 config");
        match Stage2Table::new(cfg, 0, FrameTables) {
            Ok(table) => Ok(GuestMemory {
                table: Some(table),
                vmid: Vmid::new(),
                batching: false,
                #[cfg(debug_assertions)]
                unflushed: Default::default(),
                oom: [const { core::sync::atomic::AtomicBool::new(false) }; MAX_CPUS],
                cpus: AtomicU64::new(0),
            }),
            Err(_) => Err(MemError::NoMemory),
        }
    }

    pub(super) fn table(&self) -> &Stage2Table<FrameTables> {
        self.table
            .as_ref()
            .expect("guest memory used after teardown")
    }

    /// A vCPU of this VM is being loaded on this CPU: revalidates the VM's
    /// VMID (a new one if a rollover took it, which may itself roll over)
    /// and returns the VTTBR_EL2 value to run under until the vCPU is put
    /// (`unload_here`). The VMID is taken before the CPU marks itself, and
    /// the barrier orders both before the CPU's first table walk, pairing
    /// with the one in `VmTlb::target`: a flusher either sees the mark and
    /// the number, or made its change visible first.
    pub fn load_here(&self) -> u64 {
        let cpu = crate::arch::percpu::cpu_index();
        let number = vmids().load(&self.vmid, cpu, &TLB);
        self.cpus.fetch_or(1 << cpu, Ordering::SeqCst);
        crate::arch::dsb_ish();
        Vttbr::new(self.table().vttbr().baddr(), number).raw()
    }

    /// The vCPU loaded by `load_here` was put (VTTBR_EL2 no longer names
    /// the VM here): a rollover need not keep the VM's number for this CPU.
    pub fn unload_here() {
        vmids().put(crate::arch::percpu::cpu_index());
    }

    /// TLB maintenance for this VM's table.
    pub(super) fn tlb(&self) -> VmTlb<'_> {
        VmTlb {
            cpus: &self.cpus,
            vmid: &self.vmid,
        }
    }

    pub fn is_live(&self) -> bool {
        self.table.is_some()
    }

    /// Break-before-make witness (`bbm.rs`, debug builds): `[ipa, +len)` was
    /// made invalid with its invalidation deferred.
    pub(super) fn bbm_note(&self, ipa: Ipa, len: u64) {
        let ipa = ipa.raw();
        #[cfg(debug_assertions)]
        self.unflushed.borrow_mut().note(ipa, len);
        let _ = (ipa, len);
    }

    /// Every deferred invalidation was issued.
    pub(super) fn bbm_flushed(&self) {
        #[cfg(debug_assertions)]
        self.unflushed.borrow_mut().flushed();
    }

    /// A valid entry is about to be made at `[ipa, +len)`.
    pub(super) fn bbm_check_make(&self, ipa: Ipa, len: u64) {
        let ipa = ipa.raw();
        #[cfg(debug_assertions)]
        self.unflushed.borrow().check_make(ipa, len);
        let _ = (ipa, len);
    }

    /// The table, unless the VM was torn down.
    pub(super) fn live(&self) -> Option<&Stage2Table<FrameTables>> {
        self.table.as_ref()
    }

    /// Pages mapped (valid stage-2 page entries).
    pub fn resident_pages(&self) -> u64 {
        self.table.as_ref().map_or(0, |t| {
            let st = t.stats();
            st.mapped_pages + st.mapped_blocks_2m * 512 + st.mapped_blocks_1g * 512 * 512
        })
    }

    /// Sets the access flag of the leaf mapping `ipa` (software AF: the
    /// reclaim clock cleared it and the guest touched the page again).
    pub fn mkyoung(&self, ipa: Ipa) -> bool {
        self.table.as_ref().is_some_and(|t| t.mkyoung(ipa))
    }

    /// Host PA of guest page `ipa`, if a valid page maps it.
    pub fn pa_of(&self, ipa: Ipa) -> Option<Pa> {
        self.live()?.lookup(ipa).and_then(|l| l.pa_of(ipa))
    }

    /// Frees the (already emptied and unlinked) table. The VMID number is
    /// not given back: it stays taken until the next rollover, which
    /// invalidates everything before any reuse.
    pub(super) fn destroy(&mut self) {
        if let Some(table) = self.table.take() {
            table.destroy(&self.tlb());
        }
    }

    /// Notes that an update on this CPU could not allocate a table page.
    pub(super) fn note_oom(&self) {
        self.oom[crate::arch::percpu::cpu_index()].store(true, Ordering::Relaxed);
    }

    /// Whether an update this CPU made since the last call could not
    /// allocate a table page; clears it.
    pub fn take_oom(&self) -> bool {
        self.oom[crate::arch::percpu::cpu_index()].swap(false, Ordering::Relaxed)
    }

    /// Starts deferring TLB invalidations to one flush (see `end_batch`);
    /// used through `VmMemory::batch`.
    pub(super) fn begin_batch(&mut self) {
        self.batching = true;
    }

    /// Ends a batch: one VMID-wide invalidation covers every change made in it.
    pub(super) fn end_batch(&mut self) {
        if core::mem::take(&mut self.batching) {
            if let Some(table) = &self.table {
                self.tlb().invalidate_vmid(table.vttbr());
            }
            self.bbm_flushed();
        }
    }
}

pub use super::locked::{LockedStage2, BLOCK_SIZE};
