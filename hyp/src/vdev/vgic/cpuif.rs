//! The hardware virtual CPU interface: list registers (ICH_LR<n>_EL2), the
//! active-priority and control registers, and KVM's flush/sync around each
//! guest entry. Every operation names its vCPU by index.

use super::*;
use crate::arch::{read_sysreg, write_sysreg};
use core::sync::atomic::AtomicU64;

static VTR: AtomicU64 = AtomicU64::new(u64::MAX);

/// ICH_VTR_EL2, read once.
fn vtr() -> u64 {
    let v = VTR.load(Ordering::Relaxed);
    if v != u64::MAX {
        return v;
    }
    let v = read_sysreg!("ich_vtr_el2");
    VTR.store(v, Ordering::Relaxed);
    v
}

fn nr_lrs() -> usize {
    ((vtr() & 0x1f) as usize + 1).min(MAX_LRS)
}

/// Active-priority registers per group: 1, 2 or 4 for 5, 6 or 7 priority bits.
fn nr_aprs() -> usize {
    let pribits = ((vtr() >> 29) & 7) + 1;
    1 << pribits.saturating_sub(5).min(2)
}

/// Indexed access to a family of system registers (list registers, APRs).
macro_rules! sysreg_array {
    ($read:ident, $write:ident, $($n:literal => $reg:literal),*) => {
        fn $read(n: usize) -> u64 {
            match n {
                $($n => read_sysreg!($reg),)*
                _ => 0,
            }
        }

        fn $write(n: usize, v: u64) {
            match n {
                $($n => write_sysreg!($reg, v),)*
                _ => {}
            }
        }
    };
}
sysreg_array!(read_lr, write_lr, 0 => "ich_lr0_el2", 1 => "ich_lr1_el2", 2 => "ich_lr2_el2", 3 => "ich_lr3_el2", 4 => "ich_lr4_el2", 5 => "ich_lr5_el2", 6 => "ich_lr6_el2", 7 => "ich_lr7_el2", 8 => "ich_lr8_el2", 9 => "ich_lr9_el2", 10 => "ich_lr10_el2", 11 => "ich_lr11_el2", 12 => "ich_lr12_el2", 13 => "ich_lr13_el2", 14 => "ich_lr14_el2", 15 => "ich_lr15_el2");
sysreg_array!(read_ap0r, write_ap0r, 0 => "ich_ap0r0_el2", 1 => "ich_ap0r1_el2", 2 => "ich_ap0r2_el2", 3 => "ich_ap0r3_el2");
sysreg_array!(read_ap1r, write_ap1r, 0 => "ich_ap1r0_el2", 1 => "ich_ap1r1_el2", 2 => "ich_ap1r2_el2", 3 => "ich_ap1r3_el2");

impl Vgic {
    /// Whether `flush` has work for vCPU `me`: the caller brings device state
    /// that must follow (the UART's register image) up to date first, outside
    /// the vGIC lock, since that takes the UART and stage-2 locks.
    pub fn needs_flush(&self, me: usize) -> bool {
        self.flags
            .get(me)
            .is_some_and(|f| f.load(Ordering::Acquire) & F_DIRTY != 0)
    }

    /// vCPU `me` (loaded, in a WFI with nothing to take) is about to sleep
    /// in the run queue until an interrupt may be deliverable to it: from
    /// now on whatever may make one deliverable wakes the other CPUs
    /// (`touch`). False, and it must not sleep, if something already may
    /// have (`needs_flush` then holds, the run queue's test for waking it).
    pub fn sleep(&self, me: usize) -> bool {
        let Some(f) = self.flags.get(me) else {
            return false;
        };
        if f.fetch_or(F_ASLEEP, Ordering::AcqRel) & F_DIRTY == 0 {
            return true;
        }
        f.fetch_and(!F_ASLEEP, Ordering::AcqRel);
        false
    }

    /// vCPU `me` was taken off the run queue to run: it sleeps no more.
    pub fn wake(&self, me: usize) {
        if let Some(f) = self.flags.get(me) {
            f.fetch_and(!F_ASLEEP, Ordering::AcqRel);
        }
    }

    /// Installs vCPU `me`'s CPU interface on this physical CPU (vcpu load).
    pub fn load(&self, me: usize) {
        let mut st = self.state.lock();
        let Some(cpu) = st.cpus.get_mut(me) else {
            return;
        };
        write_sysreg!("ich_vmcr_el2", cpu.vmcr);
        for i in 0..nr_aprs() {
            write_ap0r(i, cpu.ap0r[i]);
            write_ap1r(i, cpu.ap1r[i]);
        }
        for i in 0..nr_lrs() {
            write_lr(i, cpu.lrs[i]);
        }
        write_sysreg!("ich_hcr_el2", hcr(false));
        cpu.running_on = Some(crate::arch::percpu::cpu_index());
        st.touch(me);
        let cpu = &st.cpus[me];
        // A timer interrupt the guest has not finished with keeps the physical
        // PPI active on whichever CPU the vCPU runs, so it cannot fire again
        // until the guest deactivates it (KVM does the same).
        let timer = &cpu.private[VTIMER_INTID as usize];
        if timer.hw && timer.level {
            crate::arch::gic::set_private_active(VTIMER_INTID, true);
        }
    }

    /// Saves vCPU `me`'s CPU interface and turns the virtual interface off (vcpu put).
    pub fn put(&self, me: usize) {
        let mut st = self.state.lock();
        let Some(cpu) = st.cpus.get_mut(me) else {
            return;
        };
        cpu.vmcr = read_sysreg!("ich_vmcr_el2");
        for i in 0..nr_aprs() {
            cpu.ap0r[i] = read_ap0r(i);
            cpu.ap1r[i] = read_ap1r(i);
        }
        write_sysreg!("ich_hcr_el2", 0);
        cpu.running_on = None;
        let timer = &cpu.private[VTIMER_INTID as usize];
        if timer.hw && timer.level {
            crate::arch::gic::set_private_active(VTIMER_INTID, false);
        }
    }

    /// Before entering the guest: re-pend edges that fired again while in a
    /// list register, then fill free list registers with the best pending
    /// interrupts. If some do not fit, ask for an underflow maintenance
    /// interrupt so they get their turn.
    pub fn flush(&self, me: usize) {
        let flags = &self.flags;
        if flags
            .get(me)
            .is_none_or(|f| f.load(Ordering::Acquire) & F_DIRTY == 0)
        {
            // Nothing changed since the last flush found nothing to add; sync
            // left ICH_HCR_EL2 enabled.
            return;
        }
        let mut st = self.state.lock();
        let st = &mut *st;
        // Cleared under the lock: a change from now on sets it again.
        flags[me].fetch_and(!F_DIRTY, Ordering::AcqRel);
        let Some(cpu) = st.cpus.get_mut(me) else {
            return;
        };
        let lrs = nr_lrs();
        repend_edges(cpu, lrs);
        let mut overflow = false;
        while let Some(intid) = best_pending(st, me) {
            let cpu = &mut st.cpus[me];
            let Some(slot) = (0..lrs).find(|&i| cpu.lr_intid[i] == u32::MAX) else {
                overflow = true;
                break;
            };
            let irq = if intid < 32 {
                &mut cpu.private[intid as usize]
            } else {
                &mut st.spis[intid as usize - 32]
            };
            let mut fields = ICH_LR0_EL2::State::Pending
                + ICH_LR0_EL2::vINTID.val(u64::from(intid))
                + ICH_LR0_EL2::Priority.val(u64::from(irq.priority));
            if irq.group1 {
                fields += ICH_LR0_EL2::Group::SET;
            }
            if irq.hw {
                fields += ICH_LR0_EL2::HW::SET + ICH_LR0_EL2::pINTID.val(u64::from(intid));
            } else if !irq.edge {
                // Level: a maintenance interrupt on deactivation samples the line again.
                fields += ICH_LR0_EL2::EOI::SET;
            }
            let lr = fields.value;
            irq.pending = false;
            irq.lr = slot as u8;
            cpu.lrs[slot] = lr;
            cpu.lr_intid[slot] = intid;
            write_lr(slot, lr);
            flags[me].fetch_or(F_LRS, Ordering::Release);
        }
        if overflow {
            // The next flush must look again.
            st.touch(me);
        }
        write_sysreg!("ich_hcr_el2", hcr(overflow));
    }

    /// After an exit: note what the guest did with its list registers, and
    /// retire those it has deactivated.
    pub fn sync(&self, me: usize) {
        let flags = &self.flags;
        // No list register in use: nothing to retire, and no underflow
        // interrupt was asked for (that needs them all full).
        if flags
            .get(me)
            .is_none_or(|f| f.load(Ordering::Acquire) & F_LRS == 0)
        {
            return;
        }
        let mut st = self.state.lock();
        let st = &mut *st;
        let Some(cpu) = st.cpus.get_mut(me) else {
            return;
        };
        let mut retired = false;
        for i in 0..nr_lrs() {
            let intid = cpu.lr_intid[i];
            if intid == u32::MAX {
                continue;
            }
            let lr = read_lr(i);
            cpu.lrs[i] = lr;
            if lr_live(lr) {
                continue;
            }
            write_lr(i, 0);
            cpu.lrs[i] = 0;
            cpu.lr_intid[i] = u32::MAX;
            retired = true;
            let irq = if intid < 32 {
                &mut cpu.private[intid as usize]
            } else {
                &mut st.spis[intid as usize - 32]
            };
            irq.lr = NO_LR;
            if irq.hw {
                // The physical timer interrupt was deactivated with it; if the
                // timer still fires it interrupts EL2 again.
                irq.level = false;
            }
        }
        if retired {
            // A level still high, or an edge that came meanwhile, is due again.
            st.touch(me);
            if st.cpus[me].lr_intid.iter().all(|&i| i == u32::MAX) {
                flags[me].fetch_and(!F_LRS, Ordering::AcqRel);
            }
        }
        write_sysreg!("ich_hcr_el2", hcr(false));
    }

    /// Whether vCPU `me` has an interrupt to take (its WFI should end).
    pub fn has_pending(&self, me: usize) -> bool {
        let st = self.state.lock();
        let Some(cpu) = st.cpus.get(me) else {
            return false;
        };
        cpu.lrs.iter().any(|&lr| lr_pending(lr)) || best_pending(&st, me).is_some()
    }
}

/// SGIs and PPIs that fired again while their list register still holds
/// them (active): pending again in the same list register.
fn repend_edges(cpu: &mut CpuIf, lrs: usize) {
    for i in 0..lrs {
        let intid = cpu.lr_intid[i];
        if intid < 32 && cpu.private[intid as usize].pending && !lr_pending(cpu.lrs[i]) {
            cpu.private[intid as usize].pending = false;
            cpu.lrs[i] = lr_repend(cpu.lrs[i]);
            write_lr(i, cpu.lrs[i]);
        }
    }
}

/// The highest-priority interrupt (lowest value) waiting for vCPU `me`.
fn best_pending(st: &State, me: usize) -> Option<u32> {
    let private = st.cpus[me]
        .private
        .iter()
        .enumerate()
        .map(|(i, irq)| (i as u32, irq));
    let spis = st
        .spis
        .iter()
        .enumerate()
        .map(|(i, irq)| (i as u32 + 32, irq))
        .filter(|(_, irq)| irq.target == me);
    private
        .chain(spis)
        .filter(|(_, irq)| irq.wants_delivery(st.ctlr))
        .min_by_key(|(_, irq)| irq.priority)
        .map(|(intid, _)| intid)
}

/// A physical interrupt taken while vCPU `me` of `loaded` was loaded on this CPU. Returns
/// true if it now belongs to the guest (the caller must not deactivate it).
pub fn host_irq(loaded: Option<(&Vgic, usize)>, intid: u32) -> bool {
    let Some((vgic, me)) = loaded else {
        return false;
    };
    if intid != VTIMER_INTID {
        return false;
    }
    // Priority drop only: the guest's deactivation of the HW-backed virtual
    // interrupt deactivates the physical one.
    crate::arch::gic::priority_drop(intid);
    let mut st = vgic.state.lock();
    if let Some(irq) = st.irq(me, intid) {
        irq.hw = true;
        irq.level = true;
    }
    st.touch(me);
    true
}
