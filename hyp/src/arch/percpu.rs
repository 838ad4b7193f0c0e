//! Per-physical-CPU state. TPIDR_EL2 points at this CPU's block; its first
//! word is read by the guest-exit assembly (vectors.S, PCPU_GUEST_REGS).

use crate::arch::GuestRegs;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use platform::board::MAX_CPUS;

#[repr(C)]
pub struct PerCpu {
    /// Registers of the vCPU running on this CPU (offset 0: used by vectors.S).
    guest_regs: AtomicPtr<GuestRegs>,
    /// Set once this CPU runs Rust with its MMU on.
    pub online: AtomicBool,
    /// Guest exits handled on this CPU.
    pub exits: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const OFFLINE: PerCpu = PerCpu {
    guest_regs: AtomicPtr::new(core::ptr::null_mut()),
    online: AtomicBool::new(false),
    exits: AtomicU64::new(0),
};

static PERCPU: [PerCpu; MAX_CPUS] = [OFFLINE; MAX_CPUS];

/// Points TPIDR_EL2 at CPU `index`'s block. First thing each CPU does in Rust.
pub fn init(index: usize) {
    // SAFETY: TPIDR_EL2 must point at a PerCpu that lives forever (the guest
    // exit path stores through it); PERCPU is static.
    unsafe { crate::arch::write_el2_sysreg!("tpidr_el2", &PERCPU[index] as *const PerCpu as u64) };
}

/// This CPU's index (0 before `init`).
pub fn cpu_index() -> usize {
    let p = crate::arch::read_sysreg!("tpidr_el2") as usize;
    let base = PERCPU.as_ptr() as usize;
    let size = core::mem::size_of::<PerCpu>();
    if p < base || p >= base + MAX_CPUS * size {
        return 0;
    }
    (p - base) / size
}

pub fn this_cpu() -> &'static PerCpu {
    &PERCPU[cpu_index()]
}

pub fn get(index: usize) -> &'static PerCpu {
    &PERCPU[index]
}

impl PerCpu {
    /// Makes `regs` the registers `__guest_exit` saves into.
    pub fn set_guest_regs(&self, regs: *mut GuestRegs) {
        self.guest_regs.store(regs, Ordering::Relaxed);
    }
}
