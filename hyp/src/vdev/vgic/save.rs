//! The vGIC's state as bytes, for a VM saved to the disk (issue 17): what
//! `Vgic::copy_from` copies between two VMs in memory, in the fixed layout
//! of docs/SNAPSHOT-FORMAT.md. A restore must keep pending SGIs, active
//! interrupts and saved list registers exactly, as a fork does.

use super::{CpuIf, Irq, Vgic, F_DIRTY, F_LRS, MAX_LRS, NO_LR, NR_SPIS};
use crate::vdev::wire::{Dec, Enc};
use core::sync::atomic::Ordering;

fn put_irq(e: &mut Enc, i: &Irq) {
    let flags = u8::from(i.enabled)
        | u8::from(i.pending) << 1
        | u8::from(i.level) << 2
        | u8::from(i.edge) << 3
        | u8::from(i.group1) << 4
        | u8::from(i.hw) << 5;
    e.u8(flags);
    e.u8(i.priority);
    e.u64(i.route);
    e.u32(i.target as u32);
    e.u8(i.lr);
}

fn get_irq(d: &mut Dec, nr_vcpus: usize) -> Option<Irq> {
    let flags = d.u8()?;
    if flags >> 6 != 0 {
        return None;
    }
    let bit = |n: u8| flags & (1 << n) != 0;
    let irq = Irq {
        enabled: bit(0),
        pending: bit(1),
        level: bit(2),
        edge: bit(3),
        group1: bit(4),
        hw: bit(5),
        priority: d.u8()?,
        route: d.u64()?,
        target: d.u32()? as usize,
        lr: d.u8()?,
    };
    let lr_ok = irq.lr == NO_LR || usize::from(irq.lr) < MAX_LRS;
    (irq.target < nr_vcpus && lr_ok).then_some(irq)
}

fn put_cpu(e: &mut Enc, c: &CpuIf) {
    c.private.iter().for_each(|i| put_irq(e, i));
    c.lrs.iter().for_each(|&v| e.u64(v));
    c.lr_intid.iter().for_each(|&v| e.u32(v));
    e.u64(c.vmcr);
    c.ap0r.iter().chain(&c.ap1r).for_each(|&v| e.u64(v));
    e.bool(c.sleeping);
}

fn get_cpu(d: &mut Dec, nr_vcpus: usize) -> Option<CpuIf> {
    let mut c = CpuIf::new();
    for i in c.private.iter_mut() {
        *i = get_irq(d, nr_vcpus)?;
    }
    for v in c.lrs.iter_mut() {
        *v = d.u64()?;
    }
    for v in c.lr_intid.iter_mut() {
        *v = d.u32()?;
    }
    c.vmcr = d.u64()?;
    for v in c.ap0r.iter_mut().chain(c.ap1r.iter_mut()) {
        *v = d.u64()?;
    }
    c.sleeping = d.bool()?;
    Some(c)
}

impl Vgic {
    /// Appends the whole state (the VM is quiesced or frozen).
    pub fn save_state(&self, e: &mut Enc) {
        let st = self.state.lock();
        e.u32(st.ctlr);
        e.u32(st.cpus.len() as u32);
        st.spis.iter().for_each(|i| put_irq(e, i));
        st.cpus.iter().for_each(|c| put_cpu(e, c));
    }

    /// Becomes the state `save` wrote (a VM not yet running); `None` (and
    /// nothing changed) if the bytes are not a state for this many vCPUs.
    pub fn load_state(&self, d: &mut Dec) -> Option<()> {
        let mut st = self.state.lock().clone();
        st.ctlr = d.u32()?;
        let nr = d.u32()? as usize;
        if nr != st.cpus.len() {
            return None;
        }
        let mut spis = [Irq::new(false); NR_SPIS];
        for i in spis.iter_mut() {
            *i = get_irq(d, nr)?;
        }
        st.spis = spis;
        for (i, cpu) in st.cpus.iter_mut().enumerate() {
            *cpu = get_cpu(d, nr)?;
            let lrs = cpu.lr_intid.iter().any(|&i| i != u32::MAX);
            let f = F_DIRTY | if lrs { F_LRS } else { 0 };
            if let Some(flag) = self.flags.get(i) {
                flag.store(f, Ordering::Release);
            }
        }
        *self.state.lock() = st;
        Some(())
    }
}
