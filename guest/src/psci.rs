//! PSCI (CPU_ON, CPU_OFF, SYSTEM_OFF) and the hypervisor's vendor calls, all
//! SMCCC: function id in x0, arguments in x1..x3, result in x0.

use core::arch::asm;

use platform::abi::HVC_EXIT;

use crate::{cpu, dtb};

const PSCI_CPU_OFF: u32 = 0x8400_0002;
const PSCI_CPU_ON_64: u32 = 0xC400_0003;
const PSCI_SYSTEM_OFF: u32 = 0x8400_0008;

/// An SMCCC call through HVC: how a guest reaches its hypervisor (and how
/// bare QEMU without EL2/EL3 offers PSCI).
pub fn hvc(fid: u32, a1: u64, a2: u64, a3: u64) -> i64 {
    let r: i64;
    // SAFETY: an SMCCC call changes no memory of ours; SMCCC 1.0 lets the
    // callee corrupt x0-x17, which clobber_abi("C") covers.
    unsafe {
        asm!("hvc #0", inlateout("x0") u64::from(fid) => r, in("x1") a1, in("x2") a2, in("x3") a3,
             clobber_abi("C"), options(nostack));
    }
    r
}

/// An SMCCC call through SMC, for a DTB whose /psci says `method = "smc"`.
fn smc(fid: u32, a1: u64, a2: u64, a3: u64) -> i64 {
    let r: i64;
    // SAFETY: as for `hvc`.
    unsafe {
        asm!("smc #0", inlateout("x0") u64::from(fid) => r, in("x1") a1, in("x2") a2, in("x3") a3,
             clobber_abi("C"), options(nostack));
    }
    r
}

fn psci(fid: u32, a1: u64, a2: u64, a3: u64) -> i64 {
    match dtb::PLATFORM.get() {
        Some(p) if p.psci_smc => smc(fid, a1, a2, a3),
        _ => hvc(fid, a1, a2, a3),
    }
}

/// Starts the vCPU with MPIDR affinity `mpidr` at physical address `entry`
/// (MMU off), with `context` in its x0. Err holds the PSCI error code.
pub fn cpu_on(mpidr: u64, entry: usize, context: u64) -> Result<(), i64> {
    match psci(PSCI_CPU_ON_64, mpidr, entry as u64, context) {
        0 => Ok(()),
        err => Err(err),
    }
}

pub fn cpu_off() -> ! {
    psci(PSCI_CPU_OFF, 0, 0, 0);
    cpu::halt()
}

/// Ends the VM with `status` (0 = success): HVC_EXIT under our hypervisor,
/// else (or if that returns) PSCI SYSTEM_OFF, else park.
pub fn power_off(status: u64) -> ! {
    if dtb::PLATFORM.get().is_some_and(|p| p.hypervisor) {
        hvc(HVC_EXIT, status, 0, 0);
    }
    psci(PSCI_SYSTEM_OFF, 0, 0, 0);
    cpu::halt()
}

/// Names of the PSCI error codes, for messages.
pub fn error_name(code: i64) -> &'static str {
    match code {
        -1 => "NOT_SUPPORTED",
        -2 => "INVALID_PARAMETERS",
        -3 => "DENIED",
        -4 => "ALREADY_ON",
        -5 => "ON_PENDING",
        -6 => "INTERNAL_FAILURE",
        -7 => "NOT_PRESENT",
        -8 => "DISABLED",
        -9 => "INVALID_ADDRESS",
        _ => "?",
    }
}
