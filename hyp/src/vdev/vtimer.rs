//! The guest's virtual timer. Each VM has its own counter offset
//! (CNTVOFF_EL2); each vCPU's CNTV_CTL/CVAL are part of its EL1 state
//! (vcpu.rs). While a vCPU is loaded its timer is live in the hardware: when
//! it fires, the physical PPI 27 interrupts EL2 and is injected as virtual
//! PPI 27 with the HW bit (vgic.rs). While it is not loaded its timer is off
//! in the hardware; it is loaded again before it runs, and a timer that
//! expired meanwhile fires at once.
//!
//! A WFI blocks the physical CPU with the vCPU still loaded until its own
//! timer fires (`firing`), a kick from another CPU or at most the next
//! scheduling tick (`vm::exit`'s WFx handler, which owns that policy). A
//! vCPU that sleeps in the run queue instead (another one wants the CPU) is
//! woken at its timer's `deadline` by `vm::sched`.

use crate::arch::{read_sysreg, write_sysreg};
use core::sync::atomic::{AtomicU64, Ordering};

const CTL_ENABLE: u64 = 1 << 0;
const CTL_IMASK: u64 = 1 << 1;
const CTL_ISTATUS: u64 = 1 << 2;

/// A VM's view of time.
pub struct VTimer {
    /// CNTVOFF_EL2: the guest's virtual counter reads physical - offset.
    offset: AtomicU64,
}

impl VTimer {
    /// The guest's virtual counter starts near zero.
    pub fn new() -> VTimer {
        VTimer {
            offset: AtomicU64::new(crate::arch::timer::now()),
        }
    }

    /// The guest's virtual counter now (saved with a VM, issue 17).
    pub fn virtual_count(&self) -> u64 {
        crate::arch::timer::now().wrapping_sub(self.offset.load(Ordering::Relaxed))
    }

    /// Makes the guest's virtual counter read `count` now: a VM restored in
    /// a later boot continues its clock from where it was saved.
    pub fn set_virtual_count(&self, count: u64) {
        let offset = crate::arch::timer::now().wrapping_sub(count);
        self.offset.store(offset, Ordering::Relaxed);
    }

    /// Takes `src`'s time base (a fork continues its parent's clock).
    pub fn copy_from(&self, src: &VTimer) {
        self.offset
            .store(src.offset.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

impl Default for VTimer {
    fn default() -> Self {
        VTimer::new()
    }
}

impl VTimer {
    /// After a vCPU's EL1 state was loaded: its VM's counter offset.
    pub fn load(&self) {
        write_sysreg!("cntvoff_el2", self.offset.load(Ordering::Relaxed));
    }
}

/// After the vCPU's EL1 state was saved: its timer must not fire while
/// another vCPU (or none) runs here.
pub fn put() {
    write_sysreg!("cntv_ctl_el0", 0);
}

/// The physical counter value at which the loaded vCPU's timer fires, if it
/// is enabled and unmasked: its compare value in virtual time plus the VM's
/// offset (virtual = physical - CNTVOFF_EL2). `None` also for a compare
/// value beyond the counter's range, which never fires.
pub fn deadline() -> Option<u64> {
    let ctl = read_sysreg!("cntv_ctl_el0");
    if ctl & (CTL_ENABLE | CTL_IMASK) != CTL_ENABLE {
        return None;
    }
    read_sysreg!("cntv_cval_el0").checked_add(read_sysreg!("cntvoff_el2"))
}

/// Whether the loaded vCPU's timer condition is met and unmasked.
pub fn firing() -> bool {
    read_sysreg!("cntv_ctl_el0") & (CTL_ENABLE | CTL_IMASK | CTL_ISTATUS)
        == CTL_ENABLE | CTL_ISTATUS
}
