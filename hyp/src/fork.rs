//! VM fork, snapshot and restore. A fork shares every guest frame
//! copy-on-write through the reverse map (mm::fork_memory) and clones every
//! vCPU (general, EL1 system, FP/SIMD and virtual timer state) and the
//! emulated UART. Its cost follows the mapped stage-2 entries, not the bytes
//! of guest memory. A snapshot is a frozen fork that is never scheduled.

use crate::vcpu::Vcpu;
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
    Vm(VmError),
    Memory(rmap::Error),
}

impl core::fmt::Display for ForkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ForkError::Busy => {
                f.write_str("the VM is busy (being paused, forked or stopped); try again")
            }
            ForkError::NotRunnable(why) => f.write_str(why),
            ForkError::Vm(e) => write!(f, "{e}"),
            ForkError::Memory(e) => write!(f, "out of memory-manager resources ({e:?})"),
        }
    }
}

/// Clones `parent` into a new VM. `caller` is the parent's vCPU that asked
/// (a hypercall), owned by this CPU; None from the console. The new VM starts
/// running unless `frozen` (a snapshot).
pub fn fork(
    parent: &Arc<Vm>,
    caller: Option<&mut Vcpu>,
    frozen: bool,
) -> Result<Arc<Vm>, ForkError> {
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
    let child =
        Vm::create_empty(name, parent.nr_vcpus, parent.ram.size, frozen).map_err(ForkError::Vm)?;
    if let Err(e) = crate::mm::fork_memory(parent, &child) {
        child.stop(crate::vm::STATUS_FAULT);
        return Err(ForkError::Memory(e));
    }
    let mut vcpus: Vec<Box<Vcpu>> = parent.clone_parked_vcpus(&child);
    if let Some(caller) = caller {
        caller.put();
        let mut copy = Box::new(caller.clone_into(child.clone()));
        copy.regs.x[0] = 0;
        vcpus.push(copy);
        // put() handed the timer and interrupt state back; the caller keeps running.
        caller.load();
    }
    *child.uart.lock() = parent.uart.lock().clone_state();
    child.vgic.copy_from(&parent.vgic);
    child.vtimer.copy_from(&parent.vtimer);
    child.adopt_vcpus(vcpus);
    if frozen {
        // From now on the parent's changes are logged relative to it.
        parent.dirty.lock().reset(Some(child.id));
    }
    if !frozen {
        child.resume();
    }
    Ok(child)
}

/// Resets `vm` to `snapshot`: its memory becomes the snapshot's (shared
/// copy-on-write again, pages it dirtied are freed) and its vCPUs take the
/// snapshot's state. `caller` (a vCPU of `vm` asking by hypercall) gets the
/// snapshot's state for its index with x0 = 0, x1 = `cookie`.
pub fn restore(
    vm: &Arc<Vm>,
    snapshot: &Arc<Vm>,
    caller: Option<&mut Vcpu>,
    cookie: u64,
) -> Result<(), ForkError> {
    if !snapshot.is_frozen() {
        return Err(ForkError::NotRunnable("that VM is not a snapshot"));
    }
    if snapshot.nr_vcpus != vm.nr_vcpus || snapshot.ram != vm.ram {
        return Err(ForkError::NotRunnable(
            "the snapshot has another shape (vCPUs or RAM)",
        ));
    }
    let t0 = crate::timer::now();
    let own = usize::from(caller.is_some());
    let was_running = vm.quiesce(own).ok_or(ForkError::Busy)?;
    let result = restore_quiesced(vm, snapshot, caller, cookie);
    vm.unquiesce(was_running);
    if result.is_ok() {
        vm.restores.fetch_add(1, Ordering::Relaxed);
        let ticks = crate::timer::now() - t0;
        vm.restore_ticks.fetch_add(ticks, Ordering::Relaxed);
    }
    result
}

fn restore_quiesced(
    vm: &Arc<Vm>,
    snapshot: &Arc<Vm>,
    caller: Option<&mut Vcpu>,
    cookie: u64,
) -> Result<(), ForkError> {
    let fast = {
        let log = vm.dirty.lock();
        log.base == Some(snapshot.id) && !log.overflow
    };
    if fast {
        restore_dirty(vm, snapshot)?;
    } else {
        crate::mm::teardown(vm);
        vm.memory.lock().reinit().map_err(ForkError::Vm)?;
        crate::mm::fork_memory(snapshot, vm).map_err(ForkError::Memory)?;
    }
    vm.dirty.lock().reset(Some(snapshot.id));
    // Device state first: the caller's vCPU is reloaded below with it.
    *vm.uart.lock() = snapshot.uart.lock().clone_state();
    vm.vgic.copy_from(&snapshot.vgic);
    vm.vtimer.copy_from(&snapshot.vtimer);
    let mut vcpus = snapshot.clone_parked_vcpus(vm);
    if let Some(caller) = caller {
        if let Some(pos) = vcpus.iter().position(|v| v.index == caller.index) {
            let state = vcpus.swap_remove(pos);
            caller.regs = state.regs.clone();
            caller.el1 = state.el1.clone();
            caller.fp = state.fp.clone();
            caller.power = state.power;
            caller.regs.x[0] = 0;
            caller.regs.x[1] = cookie;
            caller.load();
        }
    }
    vm.replace_parked_vcpus(vcpus);
    Ok(())
}

/// Restore in time proportional to the pages dirtied since the snapshot
/// (the VM's dirty log), not to the VM's size: each dirtied page is dropped
/// and the snapshot's frame shared again.
fn restore_dirty(vm: &Vm, snapshot: &Vm) -> Result<(), ForkError> {
    let pages = core::mem::take(&mut vm.dirty.lock().pages);
    let _regions = vm.regions.write();
    // No vCPU of `vm` runs until we return, so its stale TLB entries are
    // unused: one VMID-wide invalidation at the end covers every page, even
    // though dropped frames are freed before it.
    vm.memory.lock().begin_batch();
    let result = pages
        .into_iter()
        .try_for_each(|ipa| crate::mm::restore_page(vm, snapshot, ipa));
    vm.memory.lock().end_batch();
    result.map_err(ForkError::Memory)
}
