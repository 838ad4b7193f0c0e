//! VM fork, snapshot and restore. A fork shares every guest frame
//! copy-on-write through the reverse map (mm::fork_memory) and clones every
//! vCPU (general, EL1 system, FP/SIMD and virtual timer state) and the
//! emulated UART. Its cost follows the mapped stage-2 entries, not the bytes
//! of guest memory. A snapshot is a frozen fork that is never scheduled.

use crate::vm::vcpu::Vcpu;
use crate::vm::{Vm, VmError};
use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

#[derive(Debug)]
pub enum ForkError {
    /// Someone else is pausing, forking or stopping this VM right now.
    Busy,
    NotRunnable(&'static str),
    /// A guest named a snapshot that is not its own (or no snapshot at all).
    NotOwner,
    Vm(VmError),
    Memory(rmap::Error),
    /// A restore failed after it had changed the VM's memory: the VM was
    /// stopped rather than left running on half-restored memory.
    Lost(&'static str),
}

/// Who asks for a restore: the rule for which snapshots it may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Actor {
    /// The VM itself, by hypercall: only snapshots taken of itself.
    Guest,
    /// The console (the operator): any snapshot of the same shape.
    Operator,
}

impl core::fmt::Display for ForkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ForkError::Busy => {
                f.write_str("the VM is busy (being paused, forked or stopped); try again")
            }
            ForkError::NotRunnable(why) => f.write_str(why),
            ForkError::NotOwner => f.write_str("that snapshot does not belong to the VM"),
            ForkError::Lost(why) => write!(f, "{why}; the VM was stopped"),
            ForkError::Vm(e) => write!(f, "{e}"),
            ForkError::Memory(rmap::Error::TooManyMappings) => write!(
                f,
                "a page would be shared by more than {} VMs (its 16-bit mapcount's limit)",
                rmap::MAP_LIMIT
            ),
            ForkError::Memory(e) => write!(f, "out of memory-manager resources ({e:?})"),
        }
    }
}

/// What a fork makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForkKind {
    /// A new VM that starts running.
    Running,
    /// A frozen snapshot: never scheduled, only forked from or restored to.
    Snapshot,
}

/// Clones `parent` into a new VM. `caller` is the parent's vCPU that asked
/// (a hypercall), owned by this CPU; None from the console.
pub fn fork(
    parent: &Arc<Vm>,
    caller: Option<&mut Vcpu>,
    kind: ForkKind,
) -> Result<Arc<Vm>, ForkError> {
    let frozen = kind == ForkKind::Snapshot;
    let own = usize::from(caller.is_some());
    let was_running = parent.quiesce(own).ok_or(ForkError::Busy)?;
    let result = fork_quiesced(parent, caller, frozen);
    parent.unquiesce(was_running);
    result
}

fn fork_quiesced(
    parent: &Arc<Vm>,
    caller: Option<&mut Vcpu>,
    frozen: bool,
) -> Result<Arc<Vm>, ForkError> {
    let name = if frozen { "snapshot" } else { "fork" };
    if !crate::mm::heap::guest_may_allocate(fork_heap_bytes(parent)) {
        return Err(ForkError::Vm(VmError::NoMemory));
    }
    let child = Vm::create_empty(
        name,
        parent.nr_vcpus,
        parent.mem.ram.size,
        frozen.then_some(parent.id),
        Some(parent.group()),
    )
    .map_err(ForkError::Vm)?;
    if let Err(e) = crate::mm::glue::fork_memory(&parent.mem, &child.mem) {
        child.stop(crate::vm::STATUS_FAULT);
        return Err(ForkError::Memory(e));
    }
    let mut vcpus: Vec<Box<Vcpu>> = parent.clone_parked_vcpus(&child);
    if let Some(caller) = caller {
        caller.put();
        let mut copy = Box::new(caller.clone_into(child.clone()));
        copy.regs.x[0] = 0;
        if frozen {
            child.snapshot_vcpu.call_once(|| caller.index);
        }
        vcpus.push(copy);
        // put() handed the timer and interrupt state back; the caller keeps running.
        caller.load();
    }
    let uart = parent.uart.lock().clone_state();
    child.uart.lock().restore_from(uart);
    child.vgic.copy_from(&parent.vgic);
    child.vtimer.copy_from(&parent.vtimer);
    child.adopt_vcpus(vcpus);
    if frozen {
        // From now on the parent's changes are logged relative to it.
        parent.mem.dirty.lock().reset(Some(child.id));
    }
    if !frozen {
        child.resume();
    }
    Ok(child)
}

/// Heap a fork of `parent` takes, roughly (the admission check's estimate):
/// the VM, its vCPUs (and the copies a restore makes), and its dirty log.
fn fork_heap_bytes(parent: &Vm) -> usize {
    let vcpus = parent.nr_vcpus * (core::mem::size_of::<Vcpu>() + 256);
    let dirty = (parent.mem.ram.size / crate::mm::frames::PAGE_SIZE / 8) as usize;
    core::mem::size_of::<Vm>() + 2 * vcpus + dirty + 16 * 1024
}

/// Resets `vm` to `snapshot`: its memory becomes the snapshot's (shared
/// copy-on-write again, pages it dirtied are freed) and its vCPUs take the
/// snapshot's state: the vCPU that took it (by hypercall) resumes after its
/// HVC with x0 = 0, x1 = `cookie`, every other vCPU where the snapshot found
/// it. `caller` (a vCPU of `vm` asking by hypercall) is reloaded with the
/// state of its own index. A guest
/// (`Actor::Guest`) may name only a snapshot taken of itself; the operator
/// any snapshot of the same shape. A refused restore changes nothing; one
/// that fails after changing memory stops the VM (`ForkError::Lost`).
pub fn restore(
    vm: &Arc<Vm>,
    snapshot: &Arc<Vm>,
    actor: Actor,
    caller: Option<&mut Vcpu>,
    cookie: u64,
) -> Result<(), ForkError> {
    check_restore(vm, snapshot, actor)?;
    let t0 = crate::arch::timer::now();
    let own = usize::from(caller.is_some());
    let was_running = vm.quiesce(own).ok_or(ForkError::Busy)?;
    let result = restore_quiesced(vm, snapshot, caller, cookie);
    if let Err(ForkError::Lost(why)) = &result {
        crate::println!("[hyp] vm {}: restore failed: {why}; stopping it", vm.id);
        vm.stop(crate::vm::STATUS_FAULT);
    }
    vm.unquiesce(was_running);
    if result.is_ok() {
        vm.restores.fetch_add(1, Ordering::Relaxed);
        let ticks = crate::arch::timer::now() - t0;
        vm.restore_ticks.fetch_add(ticks, Ordering::Relaxed);
    }
    result
}

/// Whether `actor` may restore `vm` to `snapshot` (nothing is changed).
fn check_restore(vm: &Vm, snapshot: &Vm, actor: Actor) -> Result<(), ForkError> {
    if actor == Actor::Guest && snapshot.snapshot_of != Some(vm.id) {
        return Err(ForkError::NotOwner);
    }
    if !snapshot.is_frozen() {
        return Err(ForkError::NotRunnable("that VM is not a snapshot"));
    }
    if vm.is_frozen() {
        return Err(ForkError::NotRunnable(
            "a snapshot cannot be restored into (fork it first)",
        ));
    }
    if snapshot.nr_vcpus != vm.nr_vcpus || snapshot.mem.ram != vm.mem.ram {
        return Err(ForkError::NotRunnable(
            "the snapshot has another shape (vCPUs or RAM)",
        ));
    }
    if !crate::mm::heap::guest_may_allocate(fork_heap_bytes(vm)) {
        return Err(ForkError::Vm(VmError::NoMemory));
    }
    Ok(())
}

fn restore_quiesced(
    vm: &Arc<Vm>,
    snapshot: &Arc<Vm>,
    caller: Option<&mut Vcpu>,
    cookie: u64,
) -> Result<(), ForkError> {
    let fast = {
        let log = vm.mem.dirty.lock();
        log.base == Some(snapshot.id) && !log.overflow
    };
    if fast {
        use crate::mm::restore::RestoreError;
        match crate::mm::restore::restore_dirty(&vm.mem, &snapshot.mem) {
            Ok(()) => {}
            // Checked before anything changed: the VM is as it was.
            Err(RestoreError::SnapshotGone) => {
                return Err(ForkError::NotRunnable("the snapshot is being destroyed"))
            }
            Err(RestoreError::Memory) => {
                return Err(ForkError::Lost("out of stage-2 table memory mid-restore"))
            }
        }
    } else {
        if !snapshot.mem.memory.lock().is_live() {
            return Err(ForkError::NotRunnable("the snapshot is being destroyed"));
        }
        crate::mm::restore::reset_memory(&vm.mem);
        crate::mm::glue::fork_memory(&snapshot.mem, &vm.mem)
            .map_err(|_| ForkError::Lost("out of memory-manager resources mid-restore"))?;
        if vm.mem.regions.read().is_empty() {
            return Err(ForkError::Lost("the snapshot was destroyed mid-restore"));
        }
        vm.mem.dirty.lock().reset(Some(snapshot.id));
    }
    // The fast path's log is already relative to the snapshot, and what it
    // still names are the pages restored in place, still writable: they stay
    // logged, since the guest's next write to them will not fault.
    restore_devices(vm, snapshot, caller, cookie);
    Ok(())
}

/// The snapshot's UART, vGIC, timer and vCPU state into `vm` (quiesced);
/// the caller's vCPU is reloaded with it.
fn restore_devices(vm: &Arc<Vm>, snapshot: &Arc<Vm>, caller: Option<&mut Vcpu>, cookie: u64) {
    // Device state first: the caller's vCPU is reloaded below with it. The
    // UART keeps its own register-image frame (still mapped at its IPA).
    let uart = snapshot.uart.lock().clone_state();
    vm.uart.lock().restore_from(uart);
    vm.vgic.copy_from(&snapshot.vgic);
    vm.vtimer.copy_from(&snapshot.vtimer);
    crate::vm::devices::update_irq(vm);
    let mut vcpus = snapshot.clone_parked_vcpus(vm);
    // The vCPU that took the snapshot resumes after its HVC with x0 = 0
    // (set when the snapshot was taken) and x1 = the cookie. Every other
    // vCPU, the caller included if it is another, resumes exactly where the
    // snapshot found it: its registers are not ours to change.
    if let Some(&taker) = snapshot.snapshot_vcpu.get() {
        if let Some(v) = vcpus.iter_mut().find(|v| v.index == taker) {
            v.regs.x[1] = cookie;
        }
    }
    if let Some(caller) = caller {
        if let Some(pos) = vcpus.iter().position(|v| v.index == caller.index) {
            let state = vcpus.swap_remove(pos);
            caller.regs = state.regs.clone();
            caller.el1 = state.el1.clone();
            caller.fp = state.fp.clone();
            caller.power = state.power;
            caller.load();
        }
    }
    vm.replace_parked_vcpus(vcpus);
}
