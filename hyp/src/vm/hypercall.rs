//! HVC from a guest: PSCI emulation and our vendor-hypervisor calls
//! (platform::abi). Every argument is validated; a bad one gets an error code.

use crate::vm::exit::Action;
use crate::vm::fork::ForkKind;
use crate::vm::vcpu::{Power, Vcpu};
use platform::abi;
use smccc::psci;

const PSCI_VERSION_1_0: u64 = 0x1_0000;
const SMCCC_VERSION: u32 = 0x8000_0000;
const SMCCC_VERSION_1_1: u64 = 0x1_0001;

fn err(code: i32) -> u64 {
    code as i64 as u64
}

pub fn handle(vcpu: &mut Vcpu) -> Action {
    // HVC's preferred return address is already the next instruction.
    let fid = vcpu.regs.x[0] as u32;
    let (a1, a2, a3) = (vcpu.regs.x[1], vcpu.regs.x[2], vcpu.regs.x[3]);
    let ret = match fid {
        SMCCC_VERSION => SMCCC_VERSION_1_1,
        psci::PSCI_VERSION => PSCI_VERSION_1_0,
        psci::PSCI_FEATURES => features(a1 as u32),
        psci::PSCI_MIGRATE_INFO_TYPE => 2, // no trusted OS to migrate
        psci::PSCI_CPU_ON_64 => cpu_on(vcpu, a1, a2, a3),
        psci::PSCI_AFFINITY_INFO_64 => affinity_info(vcpu, a1, a2),
        // SMC32/HVC32 calls take their arguments in the W registers: the
        // upper halves are not the caller's (SMCCC, "Argument passing").
        psci::PSCI_CPU_ON_32 => cpu_on(vcpu, w(a1), w(a2), w(a3)),
        psci::PSCI_AFFINITY_INFO_32 => affinity_info(vcpu, w(a1), w(a2)),
        psci::PSCI_CPU_OFF => {
            vcpu.power = Power::Off;
            return Action::Yield;
        }
        psci::PSCI_SYSTEM_OFF => {
            crate::println!("[hyp] vm {} powered off (PSCI SYSTEM_OFF)", vcpu.vm.id);
            vcpu.vm.stop(0);
            return Action::Yield;
        }
        psci::PSCI_SYSTEM_RESET => {
            crate::println!(
                "[hyp] vm {} asked for SYSTEM_RESET; reset is not supported yet, stopping it",
                vcpu.vm.id
            );
            vcpu.vm.stop(0);
            return Action::Yield;
        }
        abi::HVC_EXIT => {
            let status = a1.min(255) as i64;
            crate::println!("[hyp] vm {} exited with status {status}", vcpu.vm.id);
            vcpu.vm.stop(status);
            return Action::Yield;
        }
        abi::HVC_VM_ID => vcpu.vm.id as u64,
        abi::HVC_FORK => return fork(vcpu, ForkKind::Running),
        abi::HVC_SNAPSHOT => return fork(vcpu, ForkKind::Snapshot),
        abi::HVC_RESTORE => return restore(vcpu, a1, a2),
        abi::HVC_STATS => stat(vcpu, a1),
        abi::HVC_MEM_RELEASE => mem_release(vcpu, a1, a2),
        _ => err(psci::error::NOT_SUPPORTED),
    };
    vcpu.regs.x[0] = ret;
    Action::Continue
}

/// The 32-bit argument of an SMC32/HVC32 call.
fn w(x: u64) -> u64 {
    x & 0xffff_ffff
}

fn features(fid: u32) -> u64 {
    match fid {
        // Linux finds SMCCC 1.1 (and so SMCCC_VERSION) through this.
        SMCCC_VERSION => 0,
        psci::PSCI_VERSION
        | psci::PSCI_FEATURES
        | psci::PSCI_CPU_ON_64
        | psci::PSCI_CPU_ON_32
        | psci::PSCI_CPU_OFF
        | psci::PSCI_AFFINITY_INFO_64
        | psci::PSCI_AFFINITY_INFO_32
        | psci::PSCI_MIGRATE_INFO_TYPE
        | psci::PSCI_SYSTEM_OFF
        | psci::PSCI_SYSTEM_RESET => 0,
        _ => err(psci::error::NOT_SUPPORTED),
    }
}

/// vCPU index for an MPIDR affinity value the guest passes (see Vcpu::mpidr).
fn vcpu_index(vcpu: &Vcpu, mpidr: u64) -> Option<usize> {
    if mpidr & !0xff0f != 0 {
        return None;
    }
    let index = ((mpidr >> 8) & 0xff) as usize * 16 + (mpidr & 0xf) as usize;
    (index < vcpu.vm.nr_vcpus).then_some(index)
}

fn cpu_on(vcpu: &Vcpu, target: u64, entry: u64, context: u64) -> u64 {
    let Some(index) = vcpu_index(vcpu, target) else {
        return err(psci::error::INVALID_PARAMETERS);
    };
    if !vcpu.vm.mem.ram.contains(entry) || entry & 3 != 0 {
        return err(psci::error::INVALID_ADDRESS);
    }
    if index == vcpu.index || !vcpu.vm.power_on(index, entry, context) {
        return err(psci::error::ALREADY_ON);
    }
    0
}

fn affinity_info(vcpu: &Vcpu, target: u64, level: u64) -> u64 {
    let Some(index) = vcpu_index(vcpu, target) else {
        return err(psci::error::INVALID_PARAMETERS);
    };
    if level != 0 {
        return err(psci::error::INVALID_PARAMETERS);
    }
    if index == vcpu.index || vcpu.vm.vcpu_is_on(index) {
        0
    } else {
        1
    }
}

fn smccc(code: i64) -> u64 {
    code as u64
}

/// FORK / SNAPSHOT: the child's (or snapshot's) id to the caller, 0 in the
/// child. If another fork or a pause holds the VM, the call is retried once
/// the vCPU runs again.
fn fork(vcpu: &mut Vcpu, kind: ForkKind) -> Action {
    let vm = vcpu.vm.clone();
    match crate::vm::fork::fork(&vm, Some(vcpu), kind) {
        Ok(child) => vcpu.regs.x[0] = child.id as u64,
        Err(crate::vm::fork::ForkError::Busy) => {
            vcpu.regs.pc -= 4;
            return Action::Yield;
        }
        Err(e) => {
            crate::println!("[hyp] vm {}: fork failed: {e}", vm.id);
            vcpu.regs.x[0] = smccc(abi::SMCCC_NO_MEMORY);
        }
    }
    Action::Continue
}

/// RESTORE: only to a snapshot taken of the calling VM (see
/// docs/ARCHITECTURE.md, "Who may name what"); any other id, a VM that is not
/// a snapshot, or a snapshot of another VM, gets INVALID_PARAMETER and changes
/// nothing. A restore that fails after changing memory stops the VM.
fn restore(vcpu: &mut Vcpu, snap: u64, cookie: u64) -> Action {
    use crate::vm::fork::{Actor, ForkError};
    let vm = vcpu.vm.clone();
    let Some(snapshot) = u32::try_from(snap).ok().and_then(crate::vm::get) else {
        vcpu.regs.x[0] = smccc(abi::SMCCC_INVALID_PARAMETER);
        return Action::Continue;
    };
    match crate::vm::fork::restore(&vm, &snapshot, Actor::Guest, Some(vcpu), cookie) {
        Ok(()) => {}
        Err(ForkError::Busy) => {
            vcpu.regs.pc -= 4;
            return Action::Yield;
        }
        Err(ForkError::NotRunnable(_) | ForkError::NotOwner) => {
            vcpu.regs.x[0] = smccc(abi::SMCCC_INVALID_PARAMETER)
        }
        // The VM is stopping: this vCPU must not enter it again.
        Err(ForkError::Lost(_)) => return Action::Yield,
        Err(e) => {
            crate::println!("[hyp] vm {}: restore failed: {e}", vm.id);
            vcpu.regs.x[0] = smccc(abi::SMCCC_NO_MEMORY);
        }
    }
    Action::Continue
}

fn stat(vcpu: &Vcpu, which: u64) -> u64 {
    let Some(stat) = abi::Stat::from_u64(which) else {
        return smccc(abi::SMCCC_INVALID_PARAMETER);
    };
    stat_value(stat, &vcpu.vm)
}

/// A counter for HVC_STATS and the console: the memory manager's, and this
/// VM's restores.
pub fn stat_value(which: abi::Stat, vm: &crate::vm::Vm) -> u64 {
    use abi::Stat;
    use core::sync::atomic::Ordering;
    let f = crate::mm::frames::get();
    let rmap = crate::mm::glue::rmap();
    match which {
        Stat::FreeFrames => f.free_count() as u64,
        Stat::UsedFrames => (f.total_count() - f.free_count()) as u64,
        Stat::SharedFrames => crate::mm::glue::shared_frames(),
        Stat::VmPages => vm.mem.memory.lock().resident_pages(),
        Stat::LiveVms => crate::vm::count() as u64,
        Stat::AnonVmas => rmap.live_anon_vmas() as u64,
        Stat::Chains => rmap.live_chains() as u64,
        Stat::Restores => vm.restores.load(Ordering::Relaxed),
        Stat::RestoreNanos => {
            let ticks = vm.restore_ticks.load(Ordering::Relaxed);
            crate::arch::timer::ticks_to_ns(ticks)
        }
    }
}

/// MEM_RELEASE: the guest gives back `[start, start + len)` of its RAM; the
/// pages read as zero afterwards (a fresh frame on the next touch).
fn mem_release(vcpu: &Vcpu, start: u64, len: u64) -> u64 {
    let page = crate::mm::frames::PAGE_SIZE;
    let ram = vcpu.vm.mem.ram;
    let end = start.checked_add(len);
    let valid = len > 0
        && start.is_multiple_of(page)
        && len.is_multiple_of(page)
        && ram.contains(start)
        && end.is_some_and(|e| e <= ram.end());
    if !valid {
        return smccc(abi::SMCCC_INVALID_PARAMETER);
    }
    match crate::mm::glue::release(&vcpu.vm.mem, rmap::Ipa::new(start), len) {
        Ok(()) => 0,
        Err(_) => smccc(abi::SMCCC_NO_MEMORY),
    }
}
