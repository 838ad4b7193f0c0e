//! A VM's stage-2 table (the `stage2` crate) and VMID, guarded by the VM's
//! stage-2 lock (DESIGN level 4), and its TLB maintenance. Guest RAM is
//! mapped page by page (or as 2 MiB blocks on first touch); entries are valid
//! pages (writable, or read-only for copy-on-write) or software entries.

use crate::machine::Machine;
use core::sync::atomic::{AtomicU64, Ordering};
use platform::board::MAX_CPUS;
use rmap::{Ipa, Pa};
use stage2::{Leaf, Perm, S2Attrs, S2Config, Stage2Table, TlbMaintenance, Vmid, Vttbr};

// The CPUs that may hold a VM's TLB entries are one u64 mask (`cpus`).
const _: () = assert!(MAX_CPUS <= 64);

/// Stage-2 invalidations (by IPA or VMID) kept on one CPU.
pub static LOCAL_FLUSHES: AtomicU64 = AtomicU64::new(0);
/// Stage-2 invalidations broadcast to every CPU.
pub static BROADCAST_FLUSHES: AtomicU64 = AtomicU64::new(0);
/// Invalidations skipped because the VM never had a VMID (never ran).
pub static NO_VMID_FLUSHES: AtomicU64 = AtomicU64::new(0);

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
pub struct VmTlb<'a, M: Machine> {
    machine: &'a M,
    cpus: &'a AtomicU64,
    vmid: &'a Vmid,
}

impl<M: Machine> VmTlb<'_, M> {
    /// The VTTBR to invalidate with, and whether this CPU is the only one
    /// that may hold the VM's entries; None if the VM never had a VMID.
    /// It marks itself first: the invalidation loads the VM's VTTBR here.
    fn target(&self, table: Vttbr) -> Option<(Vttbr, bool)> {
        let me = 1u64 << self.machine.cpu_index();
        self.cpus.fetch_or(me, Ordering::SeqCst);
        // The descriptor stores before this are observed by every CPU before
        // the mask and the VMID are read. Pairs with `GuestMemory::load_here`,
        // which takes the VMID, then marks its CPU, then walks: either we see
        // its mark and number, or its walks see the new descriptors.
        self.machine.dsb_ish();
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

impl<M: Machine> TlbMaintenance for VmTlb<'_, M> {
    fn invalidate_ipa(&self, vttbr: Vttbr, ipa: u64, level: u8) {
        match self.target(vttbr) {
            Some((vttbr, true)) => self.machine.invalidate_ipa_local(vttbr, ipa),
            Some((vttbr, false)) => self.machine.tlb().invalidate_ipa(vttbr, ipa, level),
            None => {}
        }
    }

    fn invalidate_vmid(&self, vttbr: Vttbr) {
        match self.target(vttbr) {
            Some((vttbr, true)) => self.machine.invalidate_vmid_local(vttbr),
            Some((vttbr, false)) => self.machine.tlb().invalidate_vmid(vttbr),
            None => {}
        }
    }

    fn invalidate_icache(&self, pa: u64, len: u64) {
        self.machine.tlb().invalidate_icache(pa, len);
    }

    fn invalidate_all(&self) {
        self.machine.tlb().invalidate_all();
    }

    fn clean_dcache_poc(&self, pa: u64, len: u64) {
        self.machine.tlb().clean_dcache_poc(pa, len);
    }
}

/// Whether a guest RAM leaf may be executed: KVM's lazy I-cache policy. A
/// frame whose contents the hypervisor wrote (zeroed, copied, swapped in,
/// migrated) or that a new mapper maps is mapped not executable; the guest's
/// first instruction fetch from it faults, and the fault makes the I-cache
/// coherent with the frame and then allows execution
/// ([`GuestMemory::make_executable`]). Data pages, most of guest memory,
/// never pay for I-cache maintenance, and a copy-on-write fault does none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetch {
    /// Not executable until a fetch faults on it.
    Faults,
    /// Executable: the I-cache was made coherent with the frame since the
    /// frame last changed under this mapping.
    Allowed,
}

/// Stage-2 attributes of guest RAM: normal memory, writable unless shared
/// copy-on-write, executable as `fetch` says.
pub fn ram_attrs(writable: bool, fetch: Fetch) -> S2Attrs {
    let exec = fetch == Fetch::Allowed;
    S2Attrs::normal(Perm::new(true, writable, exec))
}

/// The software bits (descriptor bits 58:55) that mark a valid leaf as a
/// mapping of the shared zero page (`PageState::ZeroPage`): the state is
/// read from the descriptor alone, without comparing its address against the
/// zero frame's, and no other leaf sets software bits.
pub const ZERO_PAGE_SW: u8 = 0b0001;

/// Stage-2 attributes of a zero-page mapping: read-only, execute-never until
/// a fetch faults (`GuestMemory::make_executable` makes any valid leaf
/// executable, this one too; its frame never changes, so once is enough),
/// marked [`ZERO_PAGE_SW`].
pub fn zero_page_attrs() -> S2Attrs {
    S2Attrs {
        sw: ZERO_PAGE_SW,
        ..ram_attrs(false, Fetch::Faults)
    }
}

/// The VM's stage-2 table and VMID, guarded by the VM's stage-2 lock.
pub struct GuestMemory<M: Machine> {
    machine: M,
    /// None once torn down (no vCPU of the VM can run any more). Its own
    /// VMID field is 0: the VMID comes from `vmid` at each load.
    table: Option<Stage2Table<M::Tables>>,
    /// The VMID (generation and number): none until a vCPU first loads, so
    /// a snapshot (never scheduled) never holds one.
    vmid: Vmid,
    /// Defer this lock holder's TLB invalidations to one VMID-wide flush
    /// (fork write-protecting a whole VM).
    pub(crate) batching: bool,
    /// IPAs cleared with their invalidation still pending (`bbm.rs`).
    #[cfg(debug_assertions)]
    unflushed: core::cell::RefCell<crate::bbm::Unflushed>,
    /// Physical CPUs that may hold TLB entries of this VM: each sets its bit
    /// before it loads the VM's VTTBR (`load_here`), and bits are never
    /// cleared. An invalidation with no other bit set stays on its own CPU
    /// (`VmTlb`). A renumbered VM keeps its bits (an over-approximation):
    /// what other CPUs held under its old number went with the rollover.
    cpus: AtomicU64,
}

impl<M: Machine> GuestMemory<M> {
    /// An empty table of configuration `cfg`, its root from `machine`'s
    /// table memory; None if the root could not be allocated.
    pub fn new(cfg: S2Config, machine: M) -> Option<Self> {
        let table = Stage2Table::new(cfg, 0, machine.tables()).ok()?;
        Some(GuestMemory {
            machine,
            table: Some(table),
            vmid: Vmid::new(),
            batching: false,
            #[cfg(debug_assertions)]
            unflushed: Default::default(),
            cpus: AtomicU64::new(0),
        })
    }

    /// The table; panics after teardown.
    pub fn table(&self) -> &Stage2Table<M::Tables> {
        self.table
            .as_ref()
            .expect("guest memory used after teardown")
    }

    /// A vCPU of this VM is being loaded on this CPU: revalidates the VM's
    /// VMID (a new one if a rollover took it, which may itself roll over)
    /// and returns the VTTBR_EL2 value to run under until the vCPU is put
    /// (the machine's VMID allocator `put`). The VMID is taken before the
    /// CPU marks itself, and the barrier orders both before the CPU's first
    /// table walk, pairing with the one in `VmTlb::target`: a flusher either
    /// sees the mark and the number, or made its change visible first.
    pub fn load_here(&self) -> u64 {
        let cpu = self.machine.cpu_index();
        let number = self
            .machine
            .vmids()
            .load(&self.vmid, cpu, self.machine.tlb());
        self.cpus.fetch_or(1 << cpu, Ordering::SeqCst);
        self.machine.dsb_ish();
        Vttbr::new(self.table().vttbr().baddr(), number).raw()
    }

    /// TLB maintenance for this VM's table.
    pub fn tlb(&self) -> VmTlb<'_, M> {
        VmTlb {
            machine: &self.machine,
            cpus: &self.cpus,
            vmid: &self.vmid,
        }
    }

    /// Whether the VM's table still exists (teardown frees it).
    pub fn is_live(&self) -> bool {
        self.table.is_some()
    }

    /// Break-before-make witness (`bbm.rs`, debug builds): `[ipa, +len)` was
    /// made invalid with its invalidation deferred.
    pub(crate) fn bbm_note(&self, ipa: Ipa, len: u64) {
        let ipa = ipa.raw();
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
    pub(crate) fn bbm_check_make(&self, ipa: Ipa, len: u64) {
        let ipa = ipa.raw();
        #[cfg(debug_assertions)]
        self.unflushed.borrow().check_make(ipa, len);
        let _ = (ipa, len);
    }

    /// The table, unless the VM was torn down.
    pub(crate) fn live(&self) -> Option<&Stage2Table<M::Tables>> {
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

    /// An instruction fetch faulted on `ipa`'s leaf, mapped not executable
    /// ([`Fetch::Faults`]): makes the I-cache coherent with the leaf's frames
    /// (the stage-2 commit does it before the executable leaf is written:
    /// Arm ARM D7.5.9, instruction cache coherency, and D8.16 for the
    /// relaxed entry's TLB invalidation) and allows execution. False if no
    /// valid leaf maps `ipa` (the fault then takes the ordinary path).
    pub fn make_executable(&self, ipa: Ipa) -> bool {
        let Some(table) = self.table.as_ref() else {
            return false;
        };
        loop {
            let Some(leaf) = table.lookup(ipa) else {
                return false;
            };
            let Leaf::Mapped(m) = leaf.leaf else {
                return false;
            };
            if m.attrs.perm.exec {
                // Another vCPU allowed it meanwhile (its invalidation reached us).
                return true;
            }
            let exec = leaf
                .desc
                .with_perm(Perm::new(true, m.attrs.perm.write, true));
            match table.compare_exchange_leaf(leaf.ipa, leaf.level, leaf.desc, exec, &self.tlb()) {
                Ok(()) => return true,
                // The Access flag changed under us: look again.
                Err(stage2::CasError::Mismatch(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// Host PA of guest page `ipa`, if a valid page maps it.
    pub fn pa_of(&self, ipa: Ipa) -> Option<Pa> {
        self.live()?.lookup(ipa).and_then(|l| l.pa_of(ipa))
    }

    /// Issues the invalidations deferred by batched changes (rmap's
    /// `Stage2::flush_deferred`): one VMID-wide flush.
    pub fn flush_deferred(&self) {
        if let Some(table) = &self.table {
            self.tlb().invalidate_vmid(table.vttbr());
        }
        self.bbm_flushed();
    }

    /// Frees the (already emptied and unlinked) table. The VMID number is
    /// not given back: it stays taken until the next rollover, which
    /// invalidates everything before any reuse.
    pub fn destroy(&mut self) {
        if let Some(table) = self.table.take() {
            table.destroy(&self.tlb());
        }
    }

    /// The machine this table's frames come from (its zero page).
    pub(crate) fn machine(&self) -> &M {
        &self.machine
    }

    /// Starts deferring TLB invalidations to one flush (see `end_batch`).
    pub fn begin_batch(&mut self) {
        self.batching = true;
    }

    /// Ends a batch: one VMID-wide invalidation covers every change made in it.
    pub fn end_batch(&mut self) {
        if core::mem::take(&mut self.batching) {
            self.flush_deferred();
        }
    }
}
