//! The VM-state blob of a saved VM (snapfile stores it as is; its layout is
//! docs/SNAPSHOT-STATE.md, its encoding and checks `snapfile::state`, tested
//! on the host): a magic and version, the
//! VM's shape and name, the guest's virtual count, every vCPU (general
//! registers, PC, PSTATE, the EL1 system registers of `vcpu::El1Regs`,
//! FP/SIMD), the vGIC and the UART. The same state a fork copies between
//! two VMs in memory (`vm::fork`), written out.
//!
//! The virtual timer is saved as the guest's virtual count, not as the
//! counter offset: the physical counter restarts with each boot, so a
//! restore sets the offset that makes the virtual count continue from the
//! saved value (CNTV_CVAL, in virtual time, stays right with it).

use super::PersistError;
use crate::vdev::vpl011::Vpl011;
use crate::vdev::wire::{Dec, Enc};
use crate::vm::vcpu::{El1Regs, FpRegs, GuestRegs, Power, Vcpu};
use crate::vm::Vm;
use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use snapfile::{StateError, VcpuState, VmState};

/// What a blob says a VM looks like.
pub struct Header {
    pub name: String,
    pub ram_base: u64,
    pub ram_size: u64,
    pub vcpus: usize,
}

fn bad(e: StateError) -> PersistError {
    PersistError::BadState(e.what())
}

/// The state of `vm` (quiesced or frozen) with `vcpus` (all of them, any
/// order), named `name`. The layout is snapfile's (`snapfile::encode_state`);
/// the vGIC and the UART encode their own part after the vCPUs.
pub fn encode(vm: &Vm, name: &str, vcpus: &[Box<Vcpu>]) -> Vec<u8> {
    let mut devices = Enc::default();
    vm.vgic.save_state(&mut devices);
    vm.uart.lock().save(&mut devices);
    let mut sorted: Vec<&Box<Vcpu>> = vcpus.iter().collect();
    sorted.sort_by_key(|v| v.index);
    let state = VmState {
        header: snapfile::StateHeader {
            name: String::from(name),
            ram_base: vm.mem.ram.base,
            ram_size: vm.mem.ram.size,
            vcpus: vm.nr_vcpus as u32,
        },
        virtual_count: vm.vtimer.virtual_count(),
        vcpus: sorted.into_iter().map(|v| vcpu_state(v)).collect(),
        devices: devices.0,
    };
    snapfile::encode_state(&state)
}

fn vcpu_state(v: &Vcpu) -> VcpuState {
    VcpuState {
        index: v.index as u32,
        on: v.power == Power::On,
        x: v.regs.x,
        pc: v.regs.pc,
        pstate: v.regs.pstate,
        el1: v.el1.to_words().to_vec(),
        q: v.fp.q,
        fpsr: v.fp.fpsr,
        fpcr: v.fp.fpcr,
    }
}

fn make_vcpu(s: &VcpuState, vm: &Arc<Vm>) -> Option<Box<Vcpu>> {
    let mut v = Box::new(Vcpu::new(vm.clone(), s.index as usize));
    v.power = if s.on { Power::On } else { Power::Off };
    v.regs = GuestRegs {
        x: s.x,
        pc: s.pc,
        pstate: s.pstate,
    };
    v.el1 = El1Regs::from_words(s.el1.as_slice().try_into().ok()?);
    v.fp = FpRegs {
        q: s.q,
        fpsr: s.fpsr,
        fpcr: s.fpcr,
    };
    Some(v)
}

/// The blob's header, and a decoder at what follows it.
pub fn header(blob: &[u8]) -> Result<(Header, Dec<'_>), PersistError> {
    let (h, rest) = snapfile::decode_header(blob).map_err(bad)?;
    let h = Header {
        name: h.name,
        ram_base: h.ram_base,
        ram_size: h.ram_size,
        vcpus: h.vcpus as usize,
    };
    Ok((h, Dec(rest)))
}

/// Gives `vm` (fresh, paused, of the blob's shape) the saved timer, vGIC
/// and UART state; returns its vCPUs to install. On an error the VM is
/// half set up: the caller stops it.
pub fn apply(blob: &[u8], vm: &Arc<Vm>) -> Result<Vec<Box<Vcpu>>, PersistError> {
    let s = snapfile::decode_state(blob, El1Regs::COUNT).map_err(bad)?;
    if s.vcpus.len() != vm.nr_vcpus {
        return Err(PersistError::BadState("vCPU count differs from the VM's"));
    }
    let vcpus = s
        .vcpus
        .iter()
        .map(|v| make_vcpu(v, vm))
        .collect::<Option<Vec<_>>>()
        .ok_or(PersistError::BadState("a vCPU's state is malformed"))?;
    let mut d = Dec(&s.devices);
    vm.vgic
        .load_state(&mut d)
        .ok_or(PersistError::BadState("the vGIC state is malformed"))?;
    let uart = Vpl011::load(&mut d).ok_or(PersistError::BadState("the UART state is malformed"))?;
    if !d.0.is_empty() {
        return Err(PersistError::BadState("the VM state has trailing bytes"));
    }
    vm.uart.lock().restore_from(uart);
    vm.vtimer.set_virtual_count(s.virtual_count);
    Ok(vcpus)
}
