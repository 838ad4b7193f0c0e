//! Stage-2 aborts: demand paging of guest RAM, emulated MMIO, and wild
//! accesses (an injected external abort, or the VM stopped with a message).

use crate::arch::read_sysreg;
use crate::exit::{inject_sync, stop, Action, ESR_IL};
use crate::mm::FaultError;
use crate::vcpu::Vcpu;
use crate::vpl011::{Output, VPL011_BASE, VPL011_SIZE};

const ISS_ISV: u64 = 1 << 24;
const ISS_WNR: u64 = 1 << 6;
const ISS_S1PTW: u64 = 1 << 7;
/// Fault status: synchronous external abort, not on a table walk.
const FSC_SEA: u64 = 0x10;
const EC_IABT_LOW: u64 = 0x20;
/// Fault status class (FSC[5:2]) of a translation fault at any level.
const FSC_TRANSLATION: u64 = 0b0001;

/// The faulting IPA: page from HPFAR_EL2, offset from FAR_EL2.
fn fault_ipa() -> u64 {
    let hpfar = read_sysreg!("hpfar_el2");
    let far = read_sysreg!("far_el2");
    ((hpfar >> 4) & 0xff_ffff_ffff) << 12 | (far & 0xfff)
}

pub fn handle(vcpu: &mut Vcpu, esr: u64) -> Action {
    let ipa = fault_ipa();
    let is_data = (esr >> 26) != EC_IABT_LOW;
    // A stage-1 table walk may write (hardware access/dirty flags), so a
    // walk fault is a write fault, as KVM treats it.
    let write = is_data && (esr & ISS_WNR != 0 || esr & ISS_S1PTW != 0);
    if vcpu.vm.ram.contains(ipa) {
        let translation = (esr & 0x3f) >> 2 == FSC_TRANSLATION;
        return ram_fault(vcpu, ipa, write, translation);
    }
    let in_uart = (VPL011_BASE..VPL011_BASE + VPL011_SIZE).contains(&ipa);
    if in_uart && is_data && esr & ISS_S1PTW == 0 {
        return mmio(vcpu, esr, ipa - VPL011_BASE);
    }
    if let Some(action) = crate::vgic::mmio(vcpu, esr, ipa) {
        return action;
    }
    wild(vcpu, ipa, is_data)
}

fn ram_fault(vcpu: &mut Vcpu, ipa: u64, write: bool, translation: bool) -> Action {
    match crate::mm::fault(&vcpu.vm, ipa, write, translation) {
        Ok(()) => Action::Continue,
        Err(FaultError::NoMemory) => {
            crate::println!(
                "[hyp] vm {} ({}) paused: out of memory faulting IPA {ipa:#x}; free memory and `resume {}`",
                vcpu.vm.id,
                vcpu.vm.name,
                vcpu.vm.id
            );
            vcpu.vm.pause();
            Action::Yield
        }
        Err(FaultError::NoRegion) => wild(vcpu, ipa, true),
        Err(FaultError::Other(e)) => {
            crate::println!(
                "[hyp] vm {}: fault at IPA {ipa:#x} failed: {e:?}",
                vcpu.vm.id
            );
            stop(vcpu, "hit a memory-manager error")
        }
    }
}

/// Emulates a load or store to the vPL011 from the syndrome (ISV=1 forms).
fn mmio(vcpu: &mut Vcpu, esr: u64, off: u64) -> Action {
    if esr & ISS_ISV == 0 {
        return stop(
            vcpu,
            "accessed the UART with an instruction we cannot emulate (ISV=0)",
        );
    }
    let srt = ((esr >> 16) & 0x1f) as usize;
    let size = 1u64 << ((esr >> 22) & 3);
    if esr & ISS_WNR != 0 {
        let value = if srt == 31 { 0 } else { vcpu.regs.x[srt] };
        let out = vcpu.vm.uart.lock().write(off, value as u32);
        if let Output::Line(line) = out {
            print_guest_line(vcpu, &line);
        }
    } else {
        let value = vcpu.vm.uart.lock().read(off) as u64;
        let mask = if size == 8 {
            u64::MAX
        } else {
            (1 << (size * 8)) - 1
        };
        if srt != 31 {
            vcpu.regs.x[srt] = value & mask;
        }
    }
    crate::vpl011::update_irq(&vcpu.vm);
    vcpu.regs.pc += 4;
    Action::Continue
}

/// A guest line on the physical console, labelled when several VMs exist.
pub(crate) fn print_guest_line(vcpu: &Vcpu, line: &[u8]) {
    crate::vpl011::print_output(&vcpu.vm, line);
}

/// An access outside the VM's RAM and devices: a synchronous external abort
/// for the guest to handle, as real hardware would give for a bus error.
fn wild(vcpu: &mut Vcpu, ipa: u64, is_data: bool) -> Action {
    let from_el1 = vcpu.regs.pstate & 0xf != 0;
    let ec = if is_data { 0x24 } else { 0x20 } + u64::from(from_el1);
    let esr = (ec << 26) | ESR_IL | FSC_SEA;
    let far = read_sysreg!("far_el2");
    crate::println!(
        "[hyp] vm {} vcpu {}: access to IPA {ipa:#x} outside its memory (PC={:#x}); injecting an external abort",
        vcpu.vm.id,
        vcpu.index,
        vcpu.regs.pc
    );
    match inject_sync(vcpu, esr, Some(far)) {
        Ok(()) => Action::Continue,
        Err(why) => stop(vcpu, why),
    }
}
