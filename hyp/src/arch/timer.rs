//! The EL2 physical timer (CNTHP) drives time slices; guests keep the EL1
//! virtual timer for themselves.

use crate::arch::{read_sysreg, write_sysreg};

/// A scheduling time slice.
pub const SLICE_MS: u64 = 10;

pub fn frequency() -> u64 {
    read_sysreg!("cntfrq_el0")
}

pub fn now() -> u64 {
    read_sysreg!("cntpct_el0")
}

/// Arms this CPU's EL2 timer to fire after one slice.
pub fn arm_slice() {
    write_sysreg!("cnthp_tval_el2", frequency() * SLICE_MS / 1000);
    write_sysreg!("cnthp_ctl_el2", 1);
}

/// Makes this CPU's EL2 timer fire by counter value `deadline` (a sleeping
/// vCPU's timer, `vm::sched`): brought forward if it is armed for later,
/// left alone otherwise. Its interrupt is handled as a slice's end, which
/// arms the next slice.
pub fn fire_by(deadline: u64) {
    if deadline < read_sysreg!("cnthp_cval_el2") {
        write_sysreg!("cnthp_cval_el2", deadline);
        write_sysreg!("cnthp_ctl_el2", 1);
    }
}

/// Waits for an interrupt (WFI) for at most `us` microseconds, the EL2
/// timer armed for that meanwhile and put back after: a wait for a device
/// whose interrupt might not come polls again then. For code with no vCPU
/// loaded (this CPU's slice means nothing there); a slice's end that passed
/// meanwhile fires once the timer is put back. Whether the time ran out
/// (else something else ended the WFI).
pub fn wfi_for(us: u64) -> bool {
    let (cval, ctl) = (
        read_sysreg!("cnthp_cval_el2"),
        read_sysreg!("cnthp_ctl_el2"),
    );
    write_sysreg!("cnthp_cval_el2", now() + frequency() * us / 1_000_000);
    write_sysreg!("cnthp_ctl_el2", 1);
    crate::arch::isb();
    crate::arch::wfi();
    // CNTHP_CTL_EL2.ISTATUS: the timer condition is met.
    let timed_out = read_sysreg!("cnthp_ctl_el2") & (1 << 2) != 0;
    write_sysreg!("cnthp_cval_el2", cval);
    write_sysreg!("cnthp_ctl_el2", ctl);
    crate::arch::isb();
    timed_out
}

pub fn ms_to_ticks(ms: u64) -> u64 {
    frequency() * ms / 1000
}

/// Microseconds in `ticks` of the counter (saturating: a measurement, not
/// an address).
pub fn ticks_to_us(ticks: u64) -> u64 {
    let us = u128::from(ticks) * 1_000_000 / u128::from(frequency().max(1));
    u64::try_from(us).unwrap_or(u64::MAX)
}

/// Nanoseconds in `ticks` of the counter (saturating, like `ticks_to_us`).
pub fn ticks_to_ns(ticks: u64) -> u64 {
    let ns = u128::from(ticks) * 1_000_000_000 / u128::from(frequency().max(1));
    u64::try_from(ns).unwrap_or(u64::MAX)
}
