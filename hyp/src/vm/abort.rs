//! Stage-2 aborts: demand paging of guest RAM, emulated MMIO, and wild
//! accesses (an injected external abort, or the VM stopped with a message).

use crate::arch::esr::{Abort, ESR_IL, FSC_SEA};
use crate::arch::read_sysreg;
use crate::mm::glue::{Access, FaultError, FaultKind};
use crate::vm::devices;
use crate::vm::exit::{inject_sync, stop, Action};
use crate::vm::vcpu::Vcpu;
use rmap::Ipa;

/// The faulting IPA: page from HPFAR_EL2, offset from FAR_EL2 (the
/// hardware's raw values become a typed address here, once).
fn fault_ipa() -> Ipa {
    let hpfar = read_sysreg!("hpfar_el2");
    let far = read_sysreg!("far_el2");
    Ipa::new(((hpfar >> 4) & 0xff_ffff_ffff) << 12 | (far & 0xfff))
}

pub fn handle(vcpu: &mut Vcpu, esr: u64) -> Action {
    let typed = fault_ipa();
    let abort = Abort::decode(esr);
    // Device emulation and the messages decode register offsets from the
    // raw address.
    let ipa = typed.raw();
    if vcpu.vm.mem.ram.contains(ipa) {
        // A fault on the guest's own stage-1 walk (S1PTW) is the walker's
        // access (`abort.write`), whichever access it walked for; only a
        // fetch's own fault is an exec fault (KVM's
        // `kvm_vcpu_trap_is_exec_fault`).
        let access = match (abort.is_data || abort.s1ptw, abort.write) {
            (false, _) => Access::Fetch,
            (true, true) => Access::Write,
            (true, false) => Access::Read,
        };
        let kind = match (abort.translation, abort.access_flag) {
            (true, _) => FaultKind::Translation,
            (false, true) => FaultKind::AccessFlag,
            (false, false) => FaultKind::Permission,
        };
        return ram_fault(vcpu, typed, access, kind);
    }
    if abort.is_data && !abort.s1ptw {
        match abort.access {
            Some(access) => {
                if let Some(action) = devices::mmio(vcpu, access, ipa) {
                    return action;
                }
            }
            None if devices::is_device(&vcpu.vm, ipa) => return devices::unemulatable(vcpu),
            None => {}
        }
    }
    wild(vcpu, ipa, abort.is_data)
}

fn ram_fault(vcpu: &mut Vcpu, ipa: Ipa, access: Access, kind: FaultKind) -> Action {
    match crate::mm::glue::fault(&vcpu.vm.mem, ipa, access, kind) {
        // A page of a disk image that failed its checksum was zero-filled:
        // the guest must never run on it (mm::diskpages).
        Ok(()) => match crate::mm::diskpages::take_failure() {
            None => Action::Continue,
            Some((_, page)) => {
                crate::println!(
                    "[hyp] vm {}: page {page} of its disk image is corrupt (IPA {ipa:#x})",
                    vcpu.vm.id
                );
                stop(vcpu, "its disk image has a corrupt page")
            }
        },
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
        Err(FaultError::NoRegion) => wild(vcpu, ipa.raw(), true),
        Err(FaultError::Other(e)) => {
            crate::println!(
                "[hyp] vm {}: fault at IPA {ipa:#x} failed: {e:?}",
                vcpu.vm.id
            );
            stop(vcpu, "hit a memory-manager error")
        }
    }
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
