//! The VM-state blob of a saved VM (snapfile stores it as is; its layout is
//! docs/SNAPSHOT-FORMAT.md's "VM state" section): a magic and version, the
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

/// The blob's first bytes.
pub const MAGIC: [u8; 8] = *b"MHVSTATE";
/// The layout version this code writes and reads.
pub const VERSION: u32 = 1;
/// The longest VM name kept.
const NAME_MAX: usize = 64;

/// What a blob says a VM looks like.
pub struct Header {
    pub name: String,
    pub ram_base: u64,
    pub ram_size: u64,
    pub vcpus: usize,
}

/// The state of `vm` (quiesced or frozen) with `vcpus` (all of them, any
/// order), named `name`.
pub fn encode(vm: &Vm, name: &str, vcpus: &[Box<Vcpu>]) -> Vec<u8> {
    let mut e = Enc::default();
    e.0.extend_from_slice(&MAGIC);
    e.u32(VERSION);
    e.u64(vm.mem.ram.base);
    e.u64(vm.mem.ram.size);
    e.u32(vm.nr_vcpus as u32);
    e.bytes(&name.as_bytes()[..name.len().min(NAME_MAX)]);
    e.u64(vm.vtimer.virtual_count());
    let mut sorted: Vec<&Box<Vcpu>> = vcpus.iter().collect();
    sorted.sort_by_key(|v| v.index);
    for v in sorted {
        put_vcpu(&mut e, v);
    }
    vm.vgic.save_state(&mut e);
    vm.uart.lock().save(&mut e);
    e.0
}

fn put_vcpu(e: &mut Enc, v: &Vcpu) {
    e.u32(v.index as u32);
    e.bool(v.power == Power::On);
    v.regs.x.iter().for_each(|&x| e.u64(x));
    e.u64(v.regs.pc);
    e.u64(v.regs.pstate);
    e.u32(El1Regs::COUNT as u32);
    v.el1.to_words().iter().for_each(|&w| e.u64(w));
    v.fp.q.iter().for_each(|&q| e.u128(q));
    e.u64(v.fp.fpsr);
    e.u64(v.fp.fpcr);
}

fn get_vcpu(d: &mut Dec, vm: &Arc<Vm>, index: usize) -> Option<Box<Vcpu>> {
    if d.u32()? as usize != index {
        return None;
    }
    let mut v = Box::new(Vcpu::new(vm.clone(), index));
    v.power = if d.bool()? { Power::On } else { Power::Off };
    let mut regs = GuestRegs::default();
    for x in regs.x.iter_mut() {
        *x = d.u64()?;
    }
    regs.pc = d.u64()?;
    regs.pstate = d.u64()?;
    if d.u32()? as usize != El1Regs::COUNT {
        return None;
    }
    let mut words = [0u64; El1Regs::COUNT];
    for w in words.iter_mut() {
        *w = d.u64()?;
    }
    let mut fp = FpRegs::default();
    for q in fp.q.iter_mut() {
        *q = d.u128()?;
    }
    fp.fpsr = d.u64()?;
    fp.fpcr = d.u64()?;
    v.regs = regs;
    v.el1 = El1Regs::from_words(words);
    v.fp = fp;
    Some(v)
}

/// The blob's header, and a decoder at what follows it.
pub fn header(blob: &[u8]) -> Result<(Header, Dec<'_>), PersistError> {
    let Some(rest) = blob.strip_prefix(&MAGIC) else {
        return Err(PersistError::BadState("no VM-state magic"));
    };
    let mut d = Dec(rest);
    let bad = PersistError::BadState("the VM state is cut short");
    let version = d
        .u32()
        .ok_or(PersistError::BadState("the VM state is cut short"))?;
    if version != VERSION {
        return Err(PersistError::BadState(
            "the VM state has another version than this hypervisor's (1)",
        ));
    }
    let (Some(ram_base), Some(ram_size), Some(vcpus)) = (d.u64(), d.u64(), d.u32()) else {
        return Err(bad);
    };
    let name = d
        .bytes(NAME_MAX)
        .ok_or(PersistError::BadState("bad VM name"))?;
    let name = core::str::from_utf8(name).map_err(|_| PersistError::BadState("bad VM name"))?;
    let h = Header {
        name: String::from(name),
        ram_base,
        ram_size,
        vcpus: vcpus as usize,
    };
    Ok((h, d))
}

/// Gives `vm` (fresh, paused, of the blob's shape) the saved timer, vGIC
/// and UART state; returns its vCPUs to install. On an error the VM is
/// half set up: the caller stops it.
pub fn apply(blob: &[u8], vm: &Arc<Vm>) -> Result<Vec<Box<Vcpu>>, PersistError> {
    let (h, mut d) = header(blob)?;
    if h.vcpus != vm.nr_vcpus {
        return Err(PersistError::BadState("vCPU count differs from the VM's"));
    }
    let bad = |what| PersistError::BadState(what);
    let vcount = d.u64().ok_or(bad("the VM state is cut short"))?;
    let mut vcpus = Vec::with_capacity(h.vcpus);
    for i in 0..h.vcpus {
        vcpus.push(get_vcpu(&mut d, vm, i).ok_or(bad("a vCPU's state is malformed"))?);
    }
    vm.vgic
        .load_state(&mut d)
        .ok_or(bad("the vGIC state is malformed"))?;
    let uart = Vpl011::load(&mut d).ok_or(bad("the UART state is malformed"))?;
    if !d.0.is_empty() {
        return Err(bad("the VM state has trailing bytes"));
    }
    vm.uart.lock().restore_from(uart);
    vm.vtimer.set_virtual_count(vcount);
    Ok(vcpus)
}
