//! Synchronous guest exits: decode ESR_EL2 and dispatch. Everything a guest
//! can do here ends in an emulated result, an injected exception, or the VM
//! stopped with a clear message: never a hypervisor failure.

use crate::arch::esr::{
    self, SysregAccess, EC_DABT_LOW, EC_HVC64, EC_IABT_LOW, EC_SMC64, EC_SYSREG, EC_WFX, ESR_IL,
};
use crate::arch::{read_sysreg, write_sysreg, ExitKind};
use crate::vm::vcpu::Vcpu;

/// What the CPU does with the vCPU after an exit.
pub enum Action {
    /// Re-enter the guest.
    Continue,
    /// Give up the CPU (slice over, WFI, powered off, VM no longer running).
    Yield,
}

pub fn handle(vcpu: &mut Vcpu, kind: ExitKind) -> Action {
    if kind != ExitKind::Sync {
        let why = match kind {
            ExitKind::SError => "an SError",
            _ => "an AArch32 exception (unsupported)",
        };
        return stop(vcpu, why);
    }
    let esr = read_sysreg!("esr_el2");
    match esr::ec(esr) {
        EC_WFX => wfx(vcpu, esr),
        EC_HVC64 => crate::vm::hypercall::handle(vcpu),
        EC_SMC64 => {
            // We give guests no secure firmware: SMC returns NOT_SUPPORTED.
            vcpu.regs.x[0] = u64::MAX;
            vcpu.regs.pc += 4;
            Action::Continue
        }
        EC_SYSREG => sysreg(vcpu, esr),
        EC_IABT_LOW | EC_DABT_LOW => crate::vm::abort::handle(vcpu, esr),
        ec => {
            crate::println!(
                "[hyp] vm {} vcpu {}: unexpected exit EC={ec:#x} ({}) ESR={esr:#x} PC={:#x}; injecting undefined instruction",
                vcpu.vm.id,
                vcpu.index,
                crate::arch::exception::ec_name(ec),
                vcpu.regs.pc
            );
            inject_undef(vcpu);
            Action::Continue
        }
    }
}

/// Trapped system instructions. Set/way cache maintenance (trapped by
/// HCR_EL2.TSW because with stage-2 the guest cannot address other VMs'
/// lines) is a no-op: our guests' memory is always coherent. Anything else
/// is undefined for the guest.
fn sysreg(vcpu: &mut Vcpu, esr: u64) -> Action {
    let access = SysregAccess::decode(esr);
    if access.is_dc_set_way() {
        vcpu.regs.pc += 4;
        return Action::Continue;
    }
    if access.is_gic_sgi() {
        // Write-only registers: a read returns 0.
        if access.read {
            if access.rt != 31 {
                vcpu.regs.x[access.rt] = 0;
            }
        } else {
            let value = if access.rt == 31 {
                0
            } else {
                vcpu.regs.x[access.rt]
            };
            vcpu.vm.vgic.send_sgi(vcpu.index, value);
        }
        vcpu.regs.pc += 4;
        return Action::Continue;
    }
    inject_undef(vcpu);
    Action::Continue
}

/// Longest a vCPU sleeps in the run queue with no timer armed: a WFI may end
/// spuriously, and this bounds what a missed wake-up could cost.
const MAX_SLEEP_MS: u64 = 1000;

/// A trapped WFI or WFE. A WFI blocks the physical CPU with the vCPU still
/// loaded until its own timer, a kick from another CPU (an interrupt
/// injected for it) or at most the next scheduling tick. If another vCPU is
/// ready to run, or background work (`sched::Background`) waits, it gives
/// the CPU up instead, and sleeps in the run queue until its timer's
/// deadline or an interrupt for it, as KVM blocks a vCPU in WFI: two idle
/// vCPUs sharing a CPU must not hand it to each other at every WFI (four
/// idle Linux vCPUs on two CPUs exited 16,000 times a second each so).
fn wfx(vcpu: &mut Vcpu, esr: u64) -> Action {
    vcpu.regs.pc += 4;
    crate::vm::devices::flush_partial_line(vcpu);
    if crate::arch::esr::is_wfe(esr) {
        // A spinning lock waiter: let a waiting vCPU (maybe the holder) run.
        return if crate::vm::sched::queue_empty() {
            Action::Continue
        } else {
            Action::Yield
        };
    }
    loop {
        if crate::vdev::vtimer::firing() || vcpu.vm.vgic.has_pending(vcpu.index) {
            return Action::Continue;
        }
        if vcpu.vm.state() != crate::vm::VmState::Running {
            return Action::Yield;
        }
        // The CPU would idle: a ready vCPU, or background work, has it.
        if !crate::vm::sched::queue_empty() || crate::vm::sched::background_ready() {
            if vcpu.vm.vgic.sleep(vcpu.index) {
                let cap = crate::arch::timer::now() + crate::arch::timer::ms_to_ticks(MAX_SLEEP_MS);
                let timer = crate::vdev::vtimer::deadline().unwrap_or(u64::MAX);
                vcpu.wake_at = Some(timer.min(cap));
            }
            return Action::Yield;
        }
        crate::vm::sched::idle_wfi();
        if crate::vm::sched::handle_host_irqs(Some(vcpu)) {
            // A scheduling tick: a spurious wake-up, which the architecture
            // allows, for guests that wait with WFI for memory to change.
            return Action::Continue;
        }
    }
}

/// Vector offset for a synchronous exception taken to EL1 from the guest's
/// current mode.
fn vector_offset(pstate: u64) -> u64 {
    match pstate & 0xf {
        0x4 => 0x000, // EL1t
        0x5 => 0x200, // EL1h
        _ => 0x400,   // EL0, AArch64
    }
}

/// Delivers a synchronous exception with `esr` (and `far`) to the guest's
/// EL1 vectors. The vCPU is loaded, so its EL1 registers are live.
pub fn inject_sync(vcpu: &mut Vcpu, esr: u64, far: Option<u64>) -> Result<(), &'static str> {
    let vbar = read_sysreg!("vbar_el1");
    if vbar == 0 {
        return Err("the guest has no exception vectors");
    }
    let target = vbar + vector_offset(vcpu.regs.pstate);
    if vcpu.regs.pc >= vbar && vcpu.regs.pc < vbar + 0x800 && vcpu.regs.pstate & 0xf != 0 {
        return Err("the fault recurred inside the guest's exception vectors");
    }
    write_sysreg!("esr_el1", esr);
    if let Some(far) = far {
        write_sysreg!("far_el1", far);
    }
    write_sysreg!("elr_el1", vcpu.regs.pc);
    write_sysreg!("spsr_el1", vcpu.regs.pstate);
    vcpu.regs.pc = target;
    vcpu.regs.pstate = crate::vm::vcpu::PSTATE_EL1H_MASKED;
    Ok(())
}

pub fn inject_undef(vcpu: &mut Vcpu) {
    if let Err(why) = inject_sync(vcpu, ESR_IL, None) {
        stop(vcpu, why);
    }
}

/// Stops the vCPU's VM with a message; other VMs are unaffected.
pub fn stop(vcpu: &mut Vcpu, why: &'static str) -> Action {
    crate::println!(
        "[hyp] vm {} ({}) stopped: vcpu {} {why} at PC={:#x}",
        vcpu.vm.id,
        vcpu.vm.name,
        vcpu.index,
        vcpu.regs.pc
    );
    crate::vm::sched::vm_event(crate::vm::sched::VmEvent::Faulted {
        vm: vcpu.vm.id,
        vcpu: vcpu.index,
        why,
        pc: vcpu.regs.pc,
    });
    vcpu.vm.stop(crate::vm::STATUS_FAULT);
    Action::Yield
}
