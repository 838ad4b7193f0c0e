//! `snapvcpu` (2 vCPUs): RESTORE from a vCPU other than the one that took
//! the snapshot. vCPU 1 spins in a loop holding canaries in x0 and x1;
//! vCPU 0 snapshots the VM (parking vCPU 1 somewhere in that loop), then
//! vCPU 1 leaves the loop and restores the snapshot with a cookie.
//!
//! The ABI says execution continues where the snapshot was taken (vCPU 0,
//! after its SNAPSHOT) with x0 = 0 and x1 = the cookie. So vCPU 0 must see
//! the cookie, and vCPU 1 must come back in its loop with its canaries
//! intact. A refused RESTORE (an error, nothing changed) is fine too.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};

use crate::dtb::Platform;
use crate::report::{reason, Reason};
use crate::{cpu, psci, smp};
use platform::abi::{HVC_RESTORE, HVC_SNAPSHOT};

const C0: u64 = 0xC0C0_0000_0000_0C0C;
const C1: u64 = 0xC1C1_0000_0000_1C1C;
const COOKIE: u64 = 0x00C0_0C1E_5EED_0001;
const WAIT_MS: u64 = 60_000;

/// vCPU 1's loop runs while this is 0; 1: go and restore; 2: report.
static FLAG: AtomicU64 = AtomicU64::new(0);
static SPINNING: AtomicU64 = AtomicU64::new(0);
static SNAP: AtomicU64 = AtomicU64::new(0);
/// vCPU 1's report: what it saw, and that it is done.
static SEEN: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
static DONE: AtomicU64 = AtomicU64::new(0);

const REFUSED: u64 = 1;
const RESUMED: u64 = 2;

pub fn run(plat: &Platform) -> Result<(), Reason> {
    let vcpus = smp::bring_up(plat, vcpu1)?;
    if vcpus < 2 {
        return Err(reason!("snapvcpu needs 2 vCPUs"));
    }
    smp::release(vcpus);
    wait("vCPU 1 to spin", || SPINNING.load(SeqCst) != 0)?;
    let t = cpu::Deadline::after_ms(50); // well inside its loop
    while !t.passed() {}
    let (r, x1) = snapshot();
    match r {
        id if id > 0 => {
            SNAP.store(id as u64, SeqCst);
            FLAG.store(1, SeqCst);
            wait("vCPU 1's RESTORE", || DONE.load(SeqCst) != 0)?;
            // Only a refused RESTORE comes back here.
            match SEEN[0].load(SeqCst) {
                REFUSED => {
                    let r = SEEN[1].load(SeqCst) as i64;
                    println!("snapvcpu: RESTORE from vCPU 1 refused ({r}), nothing changed");
                    Ok(())
                }
                other => Err(reason!("vCPU 1 reported {other} without a restore")),
            }
        }
        0 => resumed(x1),
        err => Err(reason!("SNAPSHOT failed: {err}")),
    }
}

/// vCPU 0 after the restore: at its SNAPSHOT, with the cookie in x1.
fn resumed(x1: u64) -> Result<(), Reason> {
    FLAG.store(2, SeqCst);
    wait("vCPU 1 to report", || DONE.load(SeqCst) != 0)?;
    let (kind, r0, r1) = (
        SEEN[0].load(SeqCst),
        SEEN[1].load(SeqCst),
        SEEN[2].load(SeqCst),
    );
    let taker_ok = x1 == COOKIE;
    let spinner_ok = kind == RESUMED && r0 == C0 && r1 == C1;
    println!(
        "snapvcpu: after vCPU 1's RESTORE: vCPU 0 (the snapshot's taker) has x1 = {x1:#x} (cookie {COOKIE:#x}); vCPU 1 came back in its loop with x0 = {r0:#x}, x1 = {r1:#x} (canaries {C0:#x}, {C1:#x})"
    );
    if taker_ok && spinner_ok {
        return Ok(());
    }
    println!("SNAPVCPU: a RESTORE from another vCPU corrupts registers");
    Err(reason!(
        "taker x1 {x1:#x}, vCPU 1 x0 {r0:#x} x1 {r1:#x} ({kind})"
    ))
}

fn vcpu1(index: usize, _vcpus: usize) {
    if index != 1 {
        return;
    }
    SPINNING.store(1, SeqCst);
    let (r0, r1, flag) = spin();
    if flag == 1 {
        let r = psci::hvc(HVC_RESTORE, SNAP.load(SeqCst), COOKIE, 0);
        // Back here only if refused.
        SEEN[1].store(r as u64, SeqCst);
        SEEN[0].store(REFUSED, SeqCst);
    } else {
        SEEN[1].store(r0, SeqCst);
        SEEN[2].store(r1, SeqCst);
        SEEN[0].store(RESUMED, SeqCst);
    }
    DONE.store(1, SeqCst);
}

/// Spins while FLAG is 0 with C0/C1 in x0/x1; returns x0, x1 and FLAG.
fn spin() -> (u64, u64, u64) {
    let (r0, r1, flag): (u64, u64, u64);
    // SAFETY: reads one static; x0/x1 are plain operands.
    unsafe {
        asm!("2:", "ldr {f}, [{p}]", "cbz {f}, 2b",
             p = in(reg) FLAG.as_ptr(), f = out(reg) flag,
             inout("x0") C0 => r0, inout("x1") C1 => r1, options(nostack, readonly));
    }
    (r0, r1, flag)
}

/// SNAPSHOT: (x0, x1).
fn snapshot() -> (i64, u64) {
    let (r0, r1): (i64, u64);
    // SAFETY: an SMCCC call changes no memory of ours (a RESTORE resuming
    // here replaces memory and registers together); clobber_abi covers x0-x17.
    unsafe {
        asm!("hvc #0", inlateout("x0") u64::from(HVC_SNAPSHOT) => r0,
             inlateout("x1") 0u64 => r1, clobber_abi("C"), options(nostack));
    }
    (r0, r1)
}

fn wait(what: &str, done: impl Fn() -> bool) -> Result<(), Reason> {
    let deadline = cpu::Deadline::after_ms(WAIT_MS);
    while !done() {
        if deadline.passed() {
            return Err(reason!("timed out waiting for {what}"));
        }
        core::hint::spin_loop();
    }
    Ok(())
}
