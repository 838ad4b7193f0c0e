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
