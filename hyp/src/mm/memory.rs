//! A VM's stage-2 table (the `stage2` crate) as the reverse map sees it: the
//! `rmap::Stage2` / `Stage2Locked` traits over the VM's stage-2 lock (DESIGN
//! level 4). Guest RAM is mapped page by page; entries are valid pages
//! (writable, or read-only for copy-on-write) or software entries.

use crate::mm::frames::{self, PAGE_SIZE};
use crate::mm::vmmem::MemError;
use core::sync::atomic::{AtomicU64, Ordering};
use spin::{Mutex, Once};
use stage2::memory::TablePage;
use stage2::{
    Aarch64Tlb, Perm, S2Attrs, S2Config, Stage2Table, TableMemory, TlbMaintenance, VmidBits, Vttbr,
};

/// Table pages come from the frame allocator and are reached through the
/// hypervisor's identity map.
pub struct FrameTables;

impl TableMemory for FrameTables {
    fn alloc_zeroed_table(&self) -> Option<u64> {
        frames::get().alloc_zeroed().or_else(take_reserve)
    }

    fn free_table(&self, pa: u64) {
        frames::get().free(pa)
    }

    fn alloc_zeroed_root(&self, pages: usize) -> Option<u64> {
        // Unmovable: from the top of RAM, away from guest frames (evacuate).
        frames::get().alloc_contiguous_zeroed_unmovable(pages)
    }

    fn free_root(&self, pa: u64, pages: usize) {
        for i in 0..pages as u64 {
            frames::get().free(pa + i * PAGE_SIZE);
        }
    }

    fn table(&self, pa: u64) -> &TablePage {
        // SAFETY: `pa` is a table page this memory handed out (a RAM frame
        // owned by the table until freed), identity mapped at EL2; table
        // entries are only accessed atomically.
        unsafe { &*(pa as *const TablePage) }
    }
}

/// Table pages kept back for splitting 2 MiB blocks when the allocator is
/// empty: zapping, migrating or copying one page of a block must split it,
/// and teardown must not fail for want of one table page. Lock level:
/// frame allocator (innermost).
static RESERVE: Mutex<arrayvec::ArrayVec<u64, 16>> = Mutex::new(arrayvec::ArrayVec::new_const());

fn take_reserve() -> Option<u64> {
    let pa = RESERVE.lock().pop()?;
    frames::zero_frame(pa);
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
static VMIDS: Mutex<VmidAllocator> = Mutex::new(VmidAllocator {
    used: [0; 1024],
    max: 0,
});
// SAFETY: the hypervisor runs at EL2 without VHE, identity mapped, with
// interrupts masked at EL2, so nothing re-enters an invalidation that has
// switched VTTBR_EL2.
pub static TLB: Aarch64Tlb = unsafe { Aarch64Tlb::new() };

/// Stage-2 invalidations (by IPA or VMID) kept on one CPU, and broadcast.
pub static LOCAL_FLUSHES: AtomicU64 = AtomicU64::new(0);
pub static BROADCAST_FLUSHES: AtomicU64 = AtomicU64::new(0);

fn this_cpu_bit() -> u64 {
    1 << crate::arch::percpu::cpu_index()
}

/// TLB maintenance for one VM (stage-2 lock held): an invalidation stays on
/// this CPU (`TLBI IPAS2E1`/`VMALLS12E1` with non-shareable barriers) when no
/// other CPU can hold the VM's entries, which saves the broadcast (under
/// QEMU's TCG it stops every vCPU thread; on silicon it is DVM traffic to
/// every core), and is broadcast otherwise.
pub(super) struct VmTlb<'a> {
    cpus: &'a AtomicU64,
}

impl VmTlb<'_> {
    /// Whether this CPU is the only one that may hold the VM's entries.
    /// It marks itself first: the invalidation loads the VM's VTTBR here.
    fn only_here(&self) -> bool {
        let me = this_cpu_bit();
        self.cpus.fetch_or(me, Ordering::SeqCst);
        // The descriptor stores before this are observed by every CPU before
        // the mask is read (pairs with `GuestMemory::note_loaded_here`).
        crate::arch::dsb_ish();
        let local = self.cpus.load(Ordering::SeqCst) == me;
        let counter = if local {
            &LOCAL_FLUSHES
        } else {
            &BROADCAST_FLUSHES
        };
        counter.fetch_add(1, Ordering::Relaxed);
        local
    }
}

impl TlbMaintenance for VmTlb<'_> {
    fn invalidate_ipa(&self, vttbr: Vttbr, ipa: u64, level: u8) {
        if self.only_here() {
            TLB.invalidate_ipa_local(vttbr, ipa);
        } else {
            TLB.invalidate_ipa(vttbr, ipa, level);
        }
    }

    fn invalidate_vmid(&self, vttbr: Vttbr) {
        if self.only_here() {
            TLB.invalidate_vmid_local(vttbr);
        } else {
            TLB.invalidate_vmid(vttbr);
        }
    }

    fn invalidate_icache(&self, pa: u64, len: u64) {
        TLB.invalidate_icache(pa, len);
    }

    fn invalidate_all(&self) {
        TLB.invalidate_all();
    }
}

/// VMIDs in use, one bit each (up to 16-bit VMIDs). VMID 0 is never given
/// to a guest. A VMID is freed only after its table's destroy() invalidated
/// every TLB entry of that VMID, so reuse finds nothing stale.
struct VmidAllocator {
    used: [u64; 1024],
    max: u16,
}

impl VmidAllocator {
    fn alloc(&mut self) -> Option<u16> {
        (1..=self.max)
            .find(|&v| self.used[v as usize / 64] & (1 << (v % 64)) == 0)
            .inspect(|&v| {
                self.used[v as usize / 64] |= 1 << (v % 64);
            })
    }

    fn free(&mut self, v: u16) {
        self.used[v as usize / 64] &= !(1 << (v % 64));
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
    let pa_bits = [32u8, 36, 40, 42, 44, 48, 52][(parange as usize).min(6)];
    let cfg = S2Config::new(parange, pa_bits.min(40), vmid_bits)
        .expect("stage-2 configuration")
        .with_hw_access_flag(hw_af);
    VMIDS.lock().max = cfg.max_vmid();
    crate::println!(
        "[hyp] stage 2: {}-bit IPA, {}-bit PA, {} VMIDs, hardware access flag {}",
        cfg.ipa_bits(),
        cfg.pa_bits(),
        cfg.max_vmid(),
        if hw_af { "on" } else { "off" }
    );
    CONFIG.call_once(|| cfg);
}

pub fn vtcr() -> u64 {
    CONFIG.get().expect("stage-2 config").vtcr()
}

/// Stage-2 attributes of guest RAM: normal memory, executable, writable
/// unless shared copy-on-write.
pub(super) fn ram_attrs(writable: bool) -> S2Attrs {
    S2Attrs::normal(if writable { Perm::RWX } else { Perm::RX })
}

/// The VM's stage-2 table and VMID, guarded by the VM's stage-2 lock.
pub struct GuestMemory {
    /// None once torn down (no vCPU of the VM can run any more).
    table: Option<Stage2Table<FrameTables>>,
    vmid: u16,
    /// Defer this lock holder's TLB invalidations to one VMID-wide flush
    /// (fork write-protecting a whole VM).
    pub(super) batching: bool,
    /// IPAs cleared with their invalidation still pending (`bbm.rs`).
    #[cfg(debug_assertions)]
    unflushed: core::cell::RefCell<crate::mm::bbm::Unflushed>,
    /// A stage-2 table page could not be allocated during an update.
    pub out_of_memory: bool,
    /// Physical CPUs that may hold TLB entries of this VMID: each sets its
    /// bit before it loads the VM's VTTBR (`note_loaded_here`), and bits are
    /// never cleared while the VMID lives. An invalidation with no other bit
    /// set stays on its own CPU (`VmTlb`).
    cpus: AtomicU64,
}

impl GuestMemory {
    pub fn new() -> Result<GuestMemory, MemError> {
        let cfg = *CONFIG.get().expect("stage-2 config");
        let vmid = VMIDS.lock().alloc().ok_or(MemError::NoVmid)?;
        match Stage2Table::new(cfg, vmid, FrameTables) {
            Ok(table) => Ok(GuestMemory {
                table: Some(table),
                vmid,
                batching: false,
                #[cfg(debug_assertions)]
                unflushed: Default::default(),
                out_of_memory: false,
                cpus: AtomicU64::new(0),
            }),
            Err(_) => {
                VMIDS.lock().free(vmid);
                Err(MemError::NoMemory)
            }
        }
    }

    pub(super) fn table(&self) -> &Stage2Table<FrameTables> {
        self.table
            .as_ref()
            .expect("guest memory used after teardown")
    }

    pub fn vttbr(&self) -> u64 {
        self.table().vttbr().raw()
    }

    /// This CPU is about to load the VM's VTTBR and may cache its entries
    /// from now on. The barrier orders the mark before the CPU's first table
    /// walk, pairing with the one in `VmTlb::only_here`: a flusher either
    /// sees the mark and broadcasts, or made its change visible first.
    pub fn note_loaded_here(&self) {
        self.cpus.fetch_or(this_cpu_bit(), Ordering::SeqCst);
        crate::arch::dsb_ish();
    }

    /// TLB maintenance for this VM's table.
    pub(super) fn tlb(&self) -> VmTlb<'_> {
        VmTlb { cpus: &self.cpus }
    }

    pub fn is_live(&self) -> bool {
        self.table.is_some()
    }

    /// Break-before-make witness (`bbm.rs`, debug builds): `[ipa, +len)` was
    /// made invalid with its invalidation deferred.
    pub(super) fn bbm_note(&self, ipa: u64, len: u64) {
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
    pub(super) fn bbm_check_make(&self, ipa: u64, len: u64) {
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
    pub fn mkyoung(&self, ipa: u64) -> bool {
        self.table.as_ref().is_some_and(|t| t.mkyoung(ipa))
    }

    /// Host PA of guest page `ipa`, if a valid page maps it.
    pub fn pa_of(&self, ipa: u64) -> Option<u64> {
        self.live()?.lookup(ipa).and_then(|l| l.pa_of(ipa))
    }

    /// Frees the (already emptied and unlinked) table and the VMID.
    pub(super) fn destroy(&mut self) {
        if let Some(table) = self.table.take() {
            table.destroy(&self.tlb());
            VMIDS.lock().free(self.vmid);
        }
    }

    /// Starts deferring TLB invalidations to one flush (see `end_batch`).
    pub fn begin_batch(&mut self) {
        self.batching = true;
    }

    /// Ends a batch: one VMID-wide invalidation covers every change made in it.
    pub fn end_batch(&mut self) {
        if core::mem::take(&mut self.batching) {
            if let Some(table) = &self.table {
                self.tlb().invalidate_vmid(table.vttbr());
            }
            self.bbm_flushed();
        }
    }
}

pub use super::locked::{LockedStage2, BLOCK_SIZE};
