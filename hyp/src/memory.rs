//! A VM's stage-2 table (the `stage2` crate) as the reverse map sees it: the
//! `rmap::Stage2` / `Stage2Locked` traits over the VM's stage-2 lock (DESIGN
//! level 4). Guest RAM is mapped page by page; entries are valid pages
//! (writable, or read-only for copy-on-write) or software entries.

use crate::frames::{self, PAGE_SIZE};
use crate::vm::{Vm, VmError};
use alloc::vec::Vec;
use core::cell::Cell;
use core::sync::atomic::{AtomicU64, Ordering};
use rmap::lock::OrderedMutexGuard;
use rmap::{S2Entry, Stage2, Stage2Locked, UnlinkProof};
use spin::{Mutex, Once};
use stage2::memory::TablePage;
use stage2::{
    Aarch64Tlb, Batch, CasError, Descriptor, Leaf, LeafInfo, Perm, S2Attrs, S2Config, Stage2Table,
    SwEntry, TableMemory, TlbMaintenance, Visitor, VmidBits, Vttbr, WalkAction,
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
    1 << crate::percpu::cpu_index()
}

/// TLB maintenance for one VM (stage-2 lock held): an invalidation stays on
/// this CPU (`TLBI IPAS2E1`/`VMALLS12E1` with non-shareable barriers) when no
/// other CPU can hold the VM's entries, which saves the broadcast (under
/// QEMU's TCG it stops every vCPU thread; on silicon it is DVM traffic to
/// every core), and is broadcast otherwise.
struct VmTlb<'a> {
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
fn ram_attrs(writable: bool) -> S2Attrs {
    S2Attrs::normal(if writable { Perm::RWX } else { Perm::RX })
}

/// The VM's stage-2 table and VMID, guarded by the VM's stage-2 lock.
pub struct GuestMemory {
    /// None once torn down (no vCPU of the VM can run any more).
    table: Option<Stage2Table<FrameTables>>,
    vmid: u16,
    /// Defer this lock holder's TLB invalidations to one VMID-wide flush
    /// (fork write-protecting a whole VM).
    batching: bool,
    /// IPAs cleared with their invalidation still pending (`bbm.rs`).
    #[cfg(debug_assertions)]
    unflushed: core::cell::RefCell<crate::bbm::Unflushed>,
    /// A stage-2 table page could not be allocated during an update.
    pub out_of_memory: bool,
    /// Physical CPUs that may hold TLB entries of this VMID: each sets its
    /// bit before it loads the VM's VTTBR (`note_loaded_here`), and bits are
    /// never cleared while the VMID lives. An invalidation with no other bit
    /// set stays on its own CPU (`VmTlb`).
    cpus: AtomicU64,
}

impl GuestMemory {
    pub fn new() -> Result<GuestMemory, VmError> {
        let cfg = *CONFIG.get().expect("stage-2 config");
        let vmid = VMIDS.lock().alloc().ok_or(VmError::NoVmid)?;
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
                Err(VmError::NoMemory)
            }
        }
    }

    fn table(&self) -> &Stage2Table<FrameTables> {
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
    fn tlb(&self) -> VmTlb<'_> {
        VmTlb { cpus: &self.cpus }
    }

    pub fn is_live(&self) -> bool {
        self.table.is_some()
    }

    /// Break-before-make witness (`bbm.rs`, debug builds): `[ipa, +len)` was
    /// made invalid with its invalidation deferred.
    fn bbm_note(&self, ipa: u64, len: u64) {
        #[cfg(debug_assertions)]
        self.unflushed.borrow_mut().note(ipa, len);
        let _ = (ipa, len);
    }

    /// Every deferred invalidation was issued.
    fn bbm_flushed(&self) {
        #[cfg(debug_assertions)]
        self.unflushed.borrow_mut().flushed();
    }

    /// A valid entry is about to be made at `[ipa, +len)`.
    fn bbm_check_make(&self, ipa: u64, len: u64) {
        #[cfg(debug_assertions)]
        self.unflushed.borrow().check_make(ipa, len);
        let _ = (ipa, len);
    }

    /// The table, unless the VM was torn down.
    fn live(&self) -> Option<&Stage2Table<FrameTables>> {
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
    fn destroy(&mut self) {
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

/// A 2 MiB block: guest RAM's first touch of an empty aligned chunk maps one.
pub const BLOCK_SIZE: u64 = 2 << 20;

fn decode(leaf: Option<LeafInfo>, ipa: u64) -> S2Entry {
    let Some(leaf) = leaf else {
        return S2Entry::Invalid;
    };
    match leaf.leaf {
        Leaf::Mapped(m) => S2Entry::Page {
            pfn: (m.pa + (ipa - leaf.ipa)) >> 12,
            writable: m.attrs.perm.write,
        },
        Leaf::Software(SwEntry::Migration { pfn, writable }) => {
            S2Entry::Migration { pfn, writable }
        }
        Leaf::Software(SwEntry::Swap { slot, .. }) => S2Entry::Swap { slot },
        // A transient break-before-make owner: report it as a migration of
        // nothing, so callers retry.
        Leaf::Software(_) => S2Entry::Invalid,
    }
}

fn encode(entry: S2Entry) -> Descriptor {
    match entry {
        S2Entry::Invalid => Descriptor::EMPTY,
        S2Entry::Page { pfn, writable } => {
            Descriptor::page(pfn << 12, ram_attrs(writable)).expect("page descriptor")
        }
        S2Entry::Migration { pfn, writable } => {
            Descriptor::software(SwEntry::Migration { pfn, writable })
        }
        S2Entry::Swap { slot } => Descriptor::software(SwEntry::Swap {
            slot,
            writable: false,
        }),
    }
}

/// The locked stage-2 as `rmap` uses it.
pub struct LockedStage2<'a> {
    mem: OrderedMutexGuard<'a, GuestMemory>,
    /// The leaf the last `lookup` found, by page: a reverse-map walk verifies
    /// a page and then changes it, and the change reuses this instead of
    /// walking the table again. Used at most once (`cas` takes it) and cleared
    /// by every other change through this guard, so it can be stale only by
    /// what the hardware did meanwhile (an access-flag update), which makes
    /// the descriptor CAS fail and the retry look the leaf up afresh.
    last: Cell<Option<(u64, Option<LeafInfo>)>>,
}

impl LockedStage2<'_> {
    /// Whether a table page could not be allocated since the flag was last
    /// taken (the fault path reports it as out of memory); clears it.
    pub fn take_out_of_memory(&mut self) -> bool {
        core::mem::take(&mut self.mem.out_of_memory)
    }

    /// The VM's table still exists (it is freed by teardown, under this lock).
    pub fn is_live(&self) -> bool {
        self.mem.is_live()
    }

    fn cas(&mut self, ipa: u64, old: S2Entry, new: S2Entry) -> Result<(), S2Entry> {
        // A torn-down VM reads as empty and refuses every change: a console
        // command or rmap walker that still holds the VM must not panic.
        let Some(table) = self.mem.live() else {
            return Err(S2Entry::Invalid);
        };
        let page = ipa & !(PAGE_SIZE - 1);
        let current = match self.last.take() {
            Some((at, leaf)) if at == page => leaf,
            _ => table.lookup(ipa),
        };
        let found = decode(current, ipa);
        if found != old {
            return Err(found);
        }
        if !matches!(old, S2Entry::Page { .. }) && matches!(new, S2Entry::Page { .. }) {
            self.mem.bbm_check_make(page, PAGE_SIZE);
        }
        let Some(mut current) = current else {
            // Filling a hole may need table pages: map() obtains them first.
            return self.fill_hole(ipa, new);
        };
        if current.level < stage2::LAST_LEVEL {
            // rmap works page by page: a block is split before one page changes.
            current = self.split(ipa).ok_or(found)?;
        }
        match self.replace_leaf(&current, new) {
            Ok(()) => Ok(()),
            Err(CasError::Mismatch(d)) => Err(decode(LeafInfo::decode(ipa, current.level, d), ipa)),
            Err(_) => Err(found),
        }
    }

    /// Maps a fresh, writable 2 MiB block (huge first-touch fault).
    pub fn map_block(&mut self, ipa: u64, pa: u64) -> bool {
        self.last.set(None);
        if !self.mem.is_live() {
            return false;
        }
        self.map_run(ipa, pa / PAGE_SIZE, BLOCK_SIZE / PAGE_SIZE, true, false)
    }

    /// CAS of a leaf the caller just read, retried while only a hardware
    /// access-flag update got in between.
    fn replace_retrying(&self, leaf: &LeafInfo, old: S2Entry, new: S2Entry) {
        let mut cur = *leaf;
        while let Err(CasError::Mismatch(d)) = self.replace_leaf(&cur, new) {
            cur.desc = d;
            if decode(Some(cur), cur.ipa) != old {
                break;
            }
        }
    }

    /// Makes a writable block read-only as one entry, if `new` is exactly
    /// that; false if it is some other change (the caller splits).
    fn write_protect_block(&self, leaf: &LeafInfo, old: S2Entry, new: S2Entry) -> bool {
        let (
            S2Entry::Page { pfn: a, .. },
            S2Entry::Page {
                pfn: b,
                writable: false,
            },
        ) = (old, new)
        else {
            return false;
        };
        let Leaf::Mapped(m) = leaf.leaf else {
            return false;
        };
        if a != b {
            return false;
        }
        let ro = Descriptor::leaf(m.pa, leaf.level, ram_attrs(false), m.young)
            .expect("block descriptor");
        let table = self.mem.table();
        let tlb = self.mem.tlb();
        let batch = Batch::new(&tlb, table.vttbr());
        let flusher: &dyn stage2::Flusher = if self.mem.batching { &batch } else { &tlb };
        let ok = table
            .compare_exchange_leaf(leaf.ipa, leaf.level, leaf.desc, ro, flusher)
            .is_ok();
        // A pending flush is issued by end_batch() (or was already done).
        let _ = batch.into_pending();
        ok
    }

    /// Splits the block mapping `ipa` into pages; the page's leaf afterwards.
    fn split(&mut self, ipa: u64) -> Option<LeafInfo> {
        let table = self.mem.table();
        if let Err(e) = table.split_block(ipa, &self.mem.tlb()) {
            if e == stage2::Error::NoMemory {
                self.mem.out_of_memory = true;
            }
            return None;
        }
        table.lookup(ipa)
    }

    /// The pages of a block only partly inside an update: changed one by one
    /// (`cas` splits the block first).
    fn update_block_pages(
        &mut self,
        leaf: &LeafInfo,
        start: u64,
        end: u64,
        f: &mut dyn FnMut(u64, u64, S2Entry) -> Option<S2Entry>,
    ) {
        let (lo, hi) = (leaf.ipa.max(start), (leaf.ipa + leaf.size()).min(end));
        for ipa in (lo..hi).step_by(PAGE_SIZE as usize) {
            let old = decode(Some(*leaf), ipa);
            if let Some(new) = f(ipa, 1, old).filter(|&n| n != old) {
                let _ = self.cas(ipa, old, new);
            }
        }
    }

    /// CAS of a leaf found by a lookup or walk. Inside a batch the final
    /// invalidation is left to `end_batch` (one VMID-wide flush).
    fn replace_leaf(&self, leaf: &LeafInfo, new: S2Entry) -> Result<(), CasError> {
        if self.mem.batching
            && matches!(leaf.leaf, Leaf::Mapped(_))
            && matches!(new, S2Entry::Invalid | S2Entry::Swap { .. })
        {
            // Noted before the write (a failed CAS only makes it stricter).
            self.mem.bbm_note(leaf.ipa, leaf.size());
        }
        let table = self.mem.table();
        if self.mem.batching {
            let tlb = self.mem.tlb();
            let batch = Batch::new(&tlb, table.vttbr());
            let r =
                table.compare_exchange_leaf(leaf.ipa, leaf.level, leaf.desc, encode(new), &batch);
            // The pending VMID-wide flush is issued by end_batch().
            let _ = batch.into_pending();
            r
        } else {
            table.compare_exchange_leaf(
                leaf.ipa,
                leaf.level,
                leaf.desc,
                encode(new),
                &self.mem.tlb(),
            )
        }
    }

    /// Maps a run of pages with consecutive IPAs and frames in one table
    /// operation; returns false if the table could not grow. `shared`: the
    /// frames are mapped elsewhere already (a fork child's fill), so their
    /// contents are coherent with the I-cache and need no maintenance.
    fn map_run(&mut self, ipa: u64, pfn: u64, pages: u64, writable: bool, shared: bool) -> bool {
        let len = pages * PAGE_SIZE;
        self.mem.bbm_check_make(ipa, len);
        let table = self.mem.table();
        let attrs = ram_attrs(writable);
        // A whole aligned 2 MiB run (a forked block) stays one block entry.
        let block = len == BLOCK_SIZE
            && ipa.is_multiple_of(BLOCK_SIZE)
            && (pfn << 12).is_multiple_of(BLOCK_SIZE);
        let result = match (shared, block) {
            (true, _) => table.map_coherent(ipa, pfn << 12, len, attrs, block, &self.mem.tlb()),
            (false, true) => table.map(ipa, pfn << 12, len, attrs, &self.mem.tlb()),
            (false, false) => table.map_pages(ipa, pfn << 12, len, attrs, &self.mem.tlb()),
        };
        match result {
            Ok(()) => true,
            Err(_) => {
                self.mem.out_of_memory = true;
                false
            }
        }
    }

    fn fill_hole(&mut self, ipa: u64, new: S2Entry) -> Result<(), S2Entry> {
        let table = self.mem.table();
        let result = match new {
            S2Entry::Invalid => return Ok(()),
            S2Entry::Page { pfn, writable } => table.map(
                ipa,
                pfn << 12,
                PAGE_SIZE,
                ram_attrs(writable),
                &self.mem.tlb(),
            ),
            S2Entry::Migration { pfn, writable } => table
                .set_software(ipa, SwEntry::Migration { pfn, writable }, &self.mem.tlb())
                .map(|_| ()),
            S2Entry::Swap { slot } => table
                .set_software(
                    ipa,
                    SwEntry::Swap {
                        slot,
                        writable: false,
                    },
                    &self.mem.tlb(),
                )
                .map(|_| ()),
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                if e == stage2::Error::NoMemory {
                    self.mem.out_of_memory = true;
                }
                Err(S2Entry::Invalid)
            }
        }
    }
}

impl Stage2Locked for LockedStage2<'_> {
    fn lookup(&self, ipa: u64) -> S2Entry {
        let Some(table) = self.mem.live() else {
            return S2Entry::Invalid;
        };
        let leaf = table.lookup(ipa);
        self.last.set(Some((ipa & !(PAGE_SIZE - 1), leaf)));
        decode(leaf, ipa)
    }

    fn compare_exchange(&mut self, ipa: u64, old: S2Entry, new: S2Entry) -> Result<(), S2Entry> {
        // Once the reclaim clock cleared an access flag, hardware AF may set
        // it between our lookup and the CAS: the same entry, so retry (AF
        // only goes 0 -> 1, so a few tries suffice; a persistent failure
        // such as an unsplittable block is reported).
        let mut tries = 0;
        loop {
            match self.cas(ipa, old, new) {
                Err(found) if found == old && tries < 4 => tries += 1,
                r => return r,
            }
        }
    }

    fn compare_exchange_deferred(
        &mut self,
        ipa: u64,
        old: S2Entry,
        new: S2Entry,
    ) -> Result<(), S2Entry> {
        // Batched migration/reclaim: the invalidation waits for
        // `Stage2::flush_deferred`, which the batch calls before it copies.
        let was = core::mem::replace(&mut self.mem.batching, true);
        let r = self.compare_exchange(ipa, old, new);
        self.mem.batching = was;
        r
    }

    /// One pass over each last-level table (`Stage2Table::update_pages`),
    /// every invalidation owed left to the caller's `Stage2::flush_deferred`;
    /// a page still inside a block is split and changed the slow way.
    fn update_pages(
        &mut self,
        ipas: &[u64],
        decide: &mut dyn FnMut(usize, S2Entry) -> Option<S2Entry>,
        applied: &mut dyn FnMut(usize, S2Entry, S2Entry),
    ) {
        self.last.set(None);
        if !self.mem.is_live() {
            return;
        }
        let change = Cell::new(None);
        let mut blocked = Vec::new();
        {
            let table = self.mem.table();
            let tlb = self.mem.tlb();
            let batch = Batch::new(&tlb, table.vttbr());
            table.update_pages(
                ipas,
                &mut |k, leaf| {
                    let old = decode(Some(*leaf), ipas[k]);
                    let new = decide(k, old)?;
                    change.set(Some((old, new)));
                    Some(encode(new))
                },
                &mut |k, result| {
                    let Some((old, new)) = change.take() else {
                        return;
                    };
                    match result {
                        Ok(()) => {
                            // A migration entry keeps its frame: putting the
                            // same frame back needs no break (same output
                            // address), and a new one is installed only after
                            // the batch's flush, so only Invalid/Swap count.
                            if let (S2Entry::Page { .. }, true) =
                                (old, matches!(new, S2Entry::Invalid | S2Entry::Swap { .. }))
                            {
                                self.mem.bbm_note(ipas[k] & !(PAGE_SIZE - 1), PAGE_SIZE);
                            }
                            applied(k, old, new)
                        }
                        Err(CasError::NoSlot { .. }) => blocked.push((k, old, new)),
                        Err(_) => {}
                    }
                },
                &batch,
            );
            // As compare_exchange_deferred: the flush is the caller's (flush_deferred).
            let _ = batch.into_pending();
        }
        for (k, old, new) in blocked {
            if self.compare_exchange_deferred(ipas[k], old, new).is_ok() {
                applied(k, old, new);
            }
        }
    }

    fn test_and_clear_young(&mut self, ipa: u64) -> bool {
        self.last.set(None);
        self.mem.live().is_some_and(|t| t.test_and_clear_young(ipa))
    }

    /// A block inside `within` is cleared as one entry (teardown, restore):
    /// no split, so no table page is needed.
    fn clear_leaf(
        &mut self,
        ipa: u64,
        old: S2Entry,
        within: core::ops::Range<u64>,
    ) -> Result<(u64, u64, S2Entry), S2Entry> {
        self.last.set(None);
        let leaf = self.mem.live().and_then(|t| t.lookup(ipa));
        let Some(leaf) = leaf else {
            return Err(S2Entry::Invalid);
        };
        let found = decode(Some(leaf), ipa);
        if found != old {
            return Err(found);
        }
        let whole = leaf.ipa >= within.start && leaf.ipa + leaf.size() <= within.end;
        if leaf.level == stage2::LAST_LEVEL || !whole {
            let page = ipa & !(PAGE_SIZE - 1);
            return self
                .compare_exchange_deferred(page, old, S2Entry::Invalid)
                .map(|()| (page, 1, old));
        }
        let was = core::mem::replace(&mut self.mem.batching, true);
        let result = self.replace_leaf(&leaf, S2Entry::Invalid);
        self.mem.batching = was;
        match result {
            Ok(()) => Ok((
                leaf.ipa,
                leaf.size() / PAGE_SIZE,
                decode(Some(leaf), leaf.ipa),
            )),
            Err(CasError::Mismatch(d)) => Err(decode(LeafInfo::decode(ipa, leaf.level, d), ipa)),
            Err(_) => Err(found),
        }
    }

    /// One walk; a whole block inside the range is reported once and, if the
    /// replacement only write-protects it, stays one block entry (fork).
    fn update_leaves(
        &mut self,
        start: u64,
        end: u64,
        f: &mut dyn FnMut(u64, u64, S2Entry) -> Option<S2Entry>,
    ) {
        self.last.set(None);
        let Some(table) = self.mem.live() else {
            return;
        };
        let end = end.min(table.config().ipa_limit());
        if start >= end {
            return;
        }
        let mut blocks = Vec::new();
        let this = &*self;
        let mut visit = |leaf: &LeafInfo| {
            if leaf.level < stage2::LAST_LEVEL {
                blocks.push(*leaf);
                return;
            }
            let old = decode(Some(*leaf), leaf.ipa);
            if let Some(new) = f(leaf.ipa, 1, old).filter(|&n| n != old) {
                this.replace_retrying(leaf, old, new);
            }
        };
        let _ = this.mem.table().walk(start, end - start, &mut visit);
        for leaf in blocks {
            let whole = leaf.ipa >= start && leaf.ipa + leaf.size() <= end;
            if !whole {
                // Never for fork (2 MiB-aligned chunks); pages one by one.
                self.update_block_pages(&leaf, start, end, f);
                continue;
            }
            let pages = leaf.size() / PAGE_SIZE;
            let old = decode(Some(leaf), leaf.ipa);
            let Some(new) = f(leaf.ipa, pages, old).filter(|&n| n != old) else {
                continue;
            };
            if !self.write_protect_block(&leaf, old, new) {
                for i in 0..pages {
                    let _ = self.cas(leaf.ipa + i * PAGE_SIZE, old.page(i), new.page(i));
                }
            }
        }
    }

    /// Groups consecutive items into runs, each mapped with one table call (a
    /// whole aligned 2 MiB run as one block entry).
    fn fill_leaves(&mut self, leaves: &[(u64, u64, S2Entry)]) -> usize {
        self.last.set(None);
        if !self.mem.is_live() {
            return 0;
        }
        let mut done = 0;
        while done < leaves.len() {
            let (ipa, pages, entry) = leaves[done];
            let S2Entry::Page { pfn, writable } = entry else {
                if self.fill_hole(ipa, entry).is_err() {
                    return done;
                }
                done += 1;
                continue;
            };
            let (mut items, mut len) = (1, pages);
            while let Some(&(next_ipa, next_pages, next)) = leaves.get(done + items) {
                let contiguous = next_ipa == ipa + len * PAGE_SIZE
                    && next
                        == (S2Entry::Page {
                            pfn: pfn + len,
                            writable,
                        });
                if !contiguous || (len + next_pages) * PAGE_SIZE > BLOCK_SIZE {
                    break;
                }
                len += next_pages;
                items += 1;
            }
            if !self.map_run(ipa, pfn, len, writable, true) {
                return done;
            }
            done += items;
        }
        done
    }

    fn next_entry(&self, from: u64, end: u64) -> Option<(u64, S2Entry)> {
        struct First(Option<(u64, S2Entry)>, u64);
        impl Visitor for First {
            fn leaf(&mut self, leaf: &LeafInfo) -> WalkAction {
                // A block starting before `from` is reported from `from` on.
                let ipa = leaf.ipa.max(self.1);
                self.0 = Some((ipa, decode(Some(*leaf), ipa)));
                WalkAction::Stop
            }
        }
        let mut first = First(None, from);
        let table = self.mem.live()?;
        let end = end.min(table.config().ipa_limit());
        if from >= end {
            return None;
        }
        table.walk(from, end - from, &mut first).ok()?;
        first.0
    }
}

impl Stage2 for Vm {
    type Locked<'a> = LockedStage2<'a>;

    fn lock(&self) -> LockedStage2<'_> {
        LockedStage2 {
            mem: self.memory.lock(),
            last: Cell::new(None),
        }
    }

    fn lock_nested(&self) -> LockedStage2<'_> {
        LockedStage2 {
            mem: self.memory.lock_nested(1),
            last: Cell::new(None),
        }
    }

    fn flush_deferred(&self) {
        let mem = self.memory.lock();
        if mem.is_live() {
            mem.tlb().invalidate_vmid(mem.table().vttbr());
        }
        mem.bbm_flushed();
    }

    fn free_tables(&self, proof: UnlinkProof) {
        debug_assert_eq!(proof.vm().0, self.id);
        self.memory.lock().destroy();
    }
}
