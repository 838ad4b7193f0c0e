//! Virtual machines: identity, lifecycle (create, pause, stop, tear down) and
//! the table of live VMs. A VM's memory (stage-2 + frames) lives in
//! `memory::GuestMemory` behind the VM's stage-2 lock.

use crate::mm::{MemError, VmMemory};
use crate::vdev::vpl011::Vpl011;
use crate::vm::vcpu::{Power, Vcpu};
use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
use platform::MemRange;
use spin::Mutex;

/// Guest RAM starts here, as on a bare QEMU virt.
pub const GUEST_RAM_BASE: u64 = 0x4000_0000;
/// Exit status of a VM the hypervisor stopped because of what it did.
pub const STATUS_FAULT: i64 = 2;
/// Most vCPUs per VM.
pub const MAX_VCPUS: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum VmState {
    Running = 0,
    Paused = 1,
    /// Being stopped: vCPUs are dropped as the CPUs running them notice.
    Stopping = 2,
}

impl VmState {
    fn from_u8(v: u8) -> VmState {
        match v {
            0 => VmState::Running,
            1 => VmState::Paused,
            _ => VmState::Stopping,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
        }
    }
}

pub struct Vm {
    pub id: u32,
    pub name: String,
    pub nr_vcpus: usize,
    /// Its memory: RAM range, region list, stage-2 table and dirty log (the
    /// memory manager's half of the VM, also reachable from `mm` by id).
    pub mem: Arc<VmMemory>,
    pub uart: Mutex<Vpl011>,
    pub vgic: crate::vdev::vgic::Vgic,
    pub vtimer: crate::vdev::vtimer::VTimer,
    state: AtomicU8,
    /// vCPUs not in `parked`: queued or running on a CPU.
    active_vcpus: AtomicUsize,
    /// vCPUs that are off or paused. A scheduling structure: never held
    /// together with a memory-manager lock.
    parked: Mutex<Vec<Box<Vcpu>>>,
    pub exit_status: AtomicI64,
    torn_down: AtomicBool,
    /// A snapshot: never scheduled, only forked from or restored to.
    frozen: bool,
    /// Held while a fork, snapshot or restore has this VM quiesced.
    busy: AtomicBool,
    /// Guest exits handled (all vCPUs).
    pub exits: AtomicUsize,
    /// For a snapshot, the VM it was taken of: the only VM that may restore
    /// itself to it by hypercall (the console, as the operator, may restore
    /// any VM of the same shape to it).
    pub snapshot_of: Option<u32>,
    /// For a snapshot taken by hypercall, the index of the vCPU that took it:
    /// a restore resumes that vCPU after its HVC with x0 = 0, x1 = cookie.
    pub snapshot_vcpu: spin::Once<usize>,
    /// Restores of this VM and the counter ticks they took (`STATS`).
    pub restores: AtomicU64,
    pub restore_ticks: AtomicU64,
    /// Trust group: VMs merge identical pages only within one (issue 16). A
    /// fork or snapshot starts in its parent's, a VM created on its own in
    /// a fresh one; `merge group` moves it.
    group: AtomicU32,
    /// Counter ticks at the first guest entry of any of its vCPUs (0: not
    /// yet): when its guest's first instruction could run.
    first_entry: AtomicU64,
}

/// Told once per VM, at its first guest entry (vCPU loaded, the counter
/// then): a higher layer's measure (`persist`: a restore's time to its first
/// guest instruction; layers.txt: `vm` never imports it). Installed once.
static FIRST_ENTRY: spin::Once<fn(&Vm, u64)> = spin::Once::new();

/// Installs the first-entry hook (the first caller's wins).
pub fn set_first_entry_hook(hook: fn(&Vm, u64)) {
    FIRST_ENTRY.call_once(|| hook);
}

static VMS: Mutex<BTreeMap<u32, Arc<Vm>>> = Mutex::new(BTreeMap::new());
static NEXT_ID: AtomicUsize = AtomicUsize::new(1);
/// The next fresh trust group: above every group ever given or named, so a
/// new VM never lands in a group by accident.
static NEXT_GROUP: AtomicU32 = AtomicU32::new(1);
/// Worst exit status of any VM so far: the machine's exit status.
pub static WORST_STATUS: AtomicI64 = AtomicI64::new(0);
/// VMs ever created (so "no VMs left" is not confused with "none yet").
pub static CREATED: AtomicUsize = AtomicUsize::new(0);

/// Errors creating a VM.
#[derive(Debug)]
pub enum VmError {
    NoMemory,
    BadImage(&'static str),
    BadConfig(&'static str),
    /// More guest RAM asked for than the machine has free.
    TooBig {
        mib: u64,
        free_mib: u64,
    },
}

impl From<MemError> for VmError {
    fn from(e: MemError) -> VmError {
        match e {
            MemError::NoMemory => VmError::NoMemory,
        }
    }
}

impl core::fmt::Display for VmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VmError::NoMemory => f.write_str("out of memory"),
            VmError::BadImage(why) => write!(f, "bad guest image: {why}"),
            VmError::BadConfig(why) => write!(f, "bad VM configuration: {why}"),
            VmError::TooBig { mib, free_mib } => write!(
                f,
                "out of memory: {mib} MiB of guest RAM asked for, {free_mib} MiB free"
            ),
        }
    }
}

impl Vm {
    /// Creates a VM with a guest RAM region (nothing mapped yet) and all
    /// vCPUs off and parked.
    pub fn create(name: &str, nr_vcpus: usize, ram_size: u64) -> Result<Arc<Vm>, VmError> {
        let vm = Vm::create_empty(name, nr_vcpus, ram_size, None, None)?;
        if crate::mm::glue::create_ram_region(&vm.mem).is_err() {
            vm.stop(STATUS_FAULT);
            return Err(VmError::BadConfig("guest RAM region"));
        }
        let vcpus = (0..nr_vcpus)
            .map(|i| Box::new(Vcpu::new(vm.clone(), i)))
            .collect();
        *vm.parked.lock() = vcpus;
        vm.state.store(VmState::Running as u8, Ordering::Release);
        Ok(vm)
    }

    /// A VM with no regions and no vCPUs, paused (fork fills it, then
    /// `resume` starts it unless it is a frozen snapshot of `snapshot_of`),
    /// in trust group `group` (None: a fresh one).
    pub fn create_empty(
        name: &str,
        nr_vcpus: usize,
        ram_size: u64,
        snapshot_of: Option<u32>,
        group: Option<u32>,
    ) -> Result<Arc<Vm>, VmError> {
        if nr_vcpus == 0 || nr_vcpus > MAX_VCPUS {
            return Err(VmError::BadConfig("vCPU count must be 1..=16"));
        }
        let ram = MemRange {
            base: GUEST_RAM_BASE,
            size: ram_size,
        };
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed) as u32;
        let mem = VmMemory::create(id, ram)?;
        let vm = Arc::new(Vm {
            id,
            name: String::from(name),
            nr_vcpus,
            mem,
            uart: Mutex::new(Vpl011::default()),
            vgic: crate::vdev::vgic::Vgic::new(nr_vcpus),
            vtimer: crate::vdev::vtimer::VTimer::new(),
            state: AtomicU8::new(VmState::Paused as u8),
            active_vcpus: AtomicUsize::new(0),
            parked: Mutex::new(Vec::new()),
            exit_status: AtomicI64::new(0),
            torn_down: AtomicBool::new(false),
            frozen: snapshot_of.is_some(),
            busy: AtomicBool::new(false),
            exits: AtomicUsize::new(0),
            snapshot_of,
            snapshot_vcpu: spin::Once::new(),
            restores: AtomicU64::new(0),
            restore_ticks: AtomicU64::new(0),
            group: AtomicU32::new(
                group.unwrap_or_else(|| NEXT_GROUP.fetch_add(1, Ordering::Relaxed)),
            ),
            first_entry: AtomicU64::new(0),
        });
        VMS.lock().insert(id, vm.clone());
        CREATED.fetch_add(1, Ordering::Relaxed);
        Ok(vm)
    }

    /// Its trust group.
    pub fn group(&self) -> u32 {
        self.group.load(Ordering::Relaxed)
    }

    /// Moves it to trust group `group` (`merge group`); fresh groups are
    /// numbered above it from now on.
    pub fn set_group(&self, group: u32) {
        NEXT_GROUP.fetch_max(group.saturating_add(1), Ordering::Relaxed);
        self.group.store(group, Ordering::Relaxed);
    }

    pub fn state(&self) -> VmState {
        VmState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Loads this VM's stage-2 translation on this CPU.
    pub fn load_stage2(&self) {
        let vttbr = self.mem.memory.lock().load_here();
        // SAFETY: the root of this VM's live stage-2 table and the VMID it
        // holds while this vCPU is loaded (guest translation only: EL2's own
        // map is TTBR0_EL2).
        unsafe { crate::arch::write_el2_sysreg!("vttbr_el2", vttbr) };
        crate::arch::isb();
    }

    /// Unloads the VM's stage-2 translation from this CPU (a vCPU was put):
    /// VTTBR_EL2 names VMID 0, which no VM is given, and no table, as KVM's
    /// nVHE `__load_host_stage2` does without a host stage 2. Otherwise the
    /// VM's root (freed at teardown, and its VMID reused) stays the CPU's
    /// stage-2 context while EL2 runs, which CPUs with the speculative-AT
    /// errata (Cortex-A76 1165522, A55 1530923, A57/A72 1319367; KVM's
    /// ARM64_WORKAROUND_SPECULATIVE_AT) may walk and cache from.
    pub fn unload_stage2(&self) {
        // SAFETY: no stage-2 table for this CPU; only guest translation is
        // affected, and no vCPU runs here until one is loaded again.
        unsafe { crate::arch::write_el2_sysreg!("vttbr_el2", 0u64) };
        crate::arch::isb();
        crate::mm::memory::unload_here();
    }

    /// Powers on vCPU `index` at `entry` with x0 = `context` (boot or PSCI CPU_ON).
    /// Returns false if it is not parked and off.
    pub fn power_on(&self, index: usize, entry: u64, context: u64) -> bool {
        let mut vcpu = {
            let mut parked = self.parked.lock();
            let Some(pos) = parked
                .iter()
                .position(|v| v.index == index && v.power == Power::Off)
            else {
                return false;
            };
            // Counted active before the parking lock drops, so a concurrent
            // stop() never sees zero active vCPUs while this one is in flight.
            self.active_vcpus.fetch_add(1, Ordering::AcqRel);
            parked.swap_remove(pos)
        };
        vcpu.reset(entry, context);
        crate::vm::sched::enqueue(vcpu);
        true
    }

    /// Whether vCPU `index` is on (running, queued, or paused while on).
    pub fn vcpu_is_on(&self, index: usize) -> bool {
        let parked = self.parked.lock();
        match parked.iter().find(|v| v.index == index) {
            Some(v) => v.power == Power::On,
            None => index < self.nr_vcpus,
        }
    }

    /// Takes a vCPU that leaves a physical CPU or the run queue: parks it
    /// (off, or VM paused), drops it (VM stopping), or says to requeue it.
    pub fn settle(&self, vcpu: Box<Vcpu>) -> Option<Box<Vcpu>> {
        match self.state() {
            VmState::Running if vcpu.power == Power::On => return Some(vcpu),
            VmState::Stopping => drop(vcpu),
            _ => self.parked.lock().push(vcpu),
        }
        if self.active_vcpus.fetch_sub(1, Ordering::AcqRel) == 1
            && self.state() == VmState::Stopping
        {
            self.teardown();
        }
        None
    }

    /// Stops the VM with `status`. Running vCPUs are dropped when their CPUs
    /// next look; the last one out tears the VM down.
    pub fn stop(&self, status: i64) {
        if self.state.swap(VmState::Stopping as u8, Ordering::AcqRel) == VmState::Stopping as u8 {
            return;
        }
        self.exit_status.store(status, Ordering::Relaxed);
        WORST_STATUS.fetch_max(status, Ordering::Relaxed);
        let parked = core::mem::take(&mut *self.parked.lock());
        drop(parked);
        crate::vm::sched::kick_all();
        if self.active_vcpus.load(Ordering::Acquire) == 0 {
            self.teardown();
        }
    }

    pub fn pause(&self) -> bool {
        let ok = self
            .state
            .compare_exchange(
                VmState::Running as u8,
                VmState::Paused as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if ok {
            crate::vm::sched::kick_all();
        }
        ok
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Stops this VM's vCPUs and waits until all but `own` (the caller's
    /// vCPU, owned by this CPU) are parked. Returns whether it was running,
    /// or None if the VM is stopping or another quiescer holds it.
    pub fn quiesce(&self, own: usize) -> Option<bool> {
        if self.busy.swap(true, Ordering::AcqRel) {
            return None;
        }
        let was_running = self.pause();
        if self.state() == VmState::Stopping {
            self.busy.store(false, Ordering::Release);
            return None;
        }
        while self.active_vcpus() > own {
            crate::vm::sched::park_queued(self);
            crate::vm::sched::kick_all();
            core::hint::spin_loop();
        }
        Some(was_running)
    }

    /// Ends a quiesce: resumes the VM if it was running before.
    pub fn unquiesce(&self, was_running: bool) {
        if was_running {
            self.resume();
        }
        self.busy.store(false, Ordering::Release);
    }

    /// Copies of the parked vCPUs (the VM is quiesced), owned by `child`.
    pub fn clone_parked_vcpus(&self, child: &Arc<Vm>) -> Vec<Box<Vcpu>> {
        self.parked
            .lock()
            .iter()
            .map(|v| Box::new(v.clone_into(child.clone())))
            .collect()
    }

    /// Installs the vCPUs of a fresh fork (all parked; `resume` starts them).
    pub fn adopt_vcpus(&self, vcpus: Vec<Box<Vcpu>>) {
        *self.parked.lock() = vcpus;
    }

    /// Replaces the parked vCPUs' state (restore), keeping the count.
    pub fn replace_parked_vcpus(&self, vcpus: Vec<Box<Vcpu>>) {
        let old = core::mem::replace(&mut *self.parked.lock(), vcpus);
        drop(old);
    }

    /// Called right before every guest entry: records the VM's first (one
    /// relaxed load afterwards) and tells the hook.
    pub fn note_entry(&self) {
        if self.first_entry.load(Ordering::Relaxed) != 0 {
            return;
        }
        let now = crate::arch::timer::now();
        let first = self
            .first_entry
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        if let (Ok(_), Some(hook)) = (first, FIRST_ENTRY.get()) {
            hook(self, now);
        }
    }

    pub fn resume(&self) -> bool {
        if self.frozen {
            return false;
        }
        if self
            .state
            .compare_exchange(
                VmState::Paused as u8,
                VmState::Running as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return false;
        }
        let on: Vec<Box<Vcpu>> = {
            let mut parked = self.parked.lock();
            let (on, off): (Vec<_>, Vec<_>) = core::mem::take(&mut *parked)
                .into_iter()
                .partition(|v| v.power == Power::On);
            *parked = off;
            self.active_vcpus.fetch_add(on.len(), Ordering::AcqRel);
            on
        };
        for v in on {
            crate::vm::sched::enqueue(v);
        }
        true
    }

    /// vCPUs currently queued or running.
    pub fn active_vcpus(&self) -> usize {
        self.active_vcpus.load(Ordering::Acquire)
    }

    /// Frees the VM's memory and removes it from the table. Runs once, when
    /// no vCPU of a stopping VM is left on any CPU.
    fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::AcqRel) {
            return;
        }
        crate::mm::glue::teardown(&self.mem);
        // The table is gone and its VMID invalidated: no stage-2 entry or
        // TLB entry can reach the UART's register image any more.
        let image = self.uart.lock().take_image();
        if image != 0 {
            crate::mm::frames::get().free(rmap::Pa::new(image));
        }
        crate::mm::vmmem::unregister(self.id);
        VMS.lock().remove(&self.id);
        let status = self.exit_status.load(Ordering::Relaxed);
        crate::println!(
            "[hyp] vm {} ({}) stopped, status {status}",
            self.id,
            self.name
        );
        crate::vm::sched::vm_event(crate::vm::sched::VmEvent::Exited {
            vm: self.id,
            status,
        });
        // Snapshots this VM took of itself by hypercall: only it could
        // restore them, so they would only hold memory and a VMID. (Those
        // the console took stay: the operator may restore any VM to them.)
        let own: Vec<Arc<Vm>> = VMS
            .lock()
            .values()
            .filter(|v| v.snapshot_of == Some(self.id) && v.snapshot_vcpu.get().is_some())
            .cloned()
            .collect();
        for snapshot in own {
            snapshot.stop(0);
        }
    }
}

pub fn get(id: u32) -> Option<Arc<Vm>> {
    VMS.lock().get(&id).cloned()
}

pub fn all() -> Vec<Arc<Vm>> {
    VMS.lock().values().cloned().collect()
}

pub fn count() -> usize {
    VMS.lock().len()
}

/// VMs that can run (snapshots excluded).
pub fn count_runnable() -> usize {
    VMS.lock().values().filter(|v| !v.is_frozen()).count()
}
