//! `snapsteal`: a snapshot belongs to the VM it was taken of. The root forks
//! a thief, then writes a secret marker and snapshots itself (so the
//! snapshots are not the thief's); the thief tries RESTORE with every id up
//! to its own + 300 and some edge ids, each with a cookie naming it. Every
//! one must be refused with INVALID_PARAMETER and change nothing. If one
//! succeeds, the thief resumes at the root's snapshot point holding the
//! root's memory: that code sees the thief's cookie and fails the run. At
//! the end the root restores its own snapshot (which must still work).
//!
//! Run it on one vCPU (a restore gives the caller the snapshot's state of
//! its own vCPU index).

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};

use crate::dtb::Platform;
use crate::report::{reason, Reason};
use crate::{cpu, psci};
use platform::abi::{Stat, HVC_FORK, HVC_RESTORE, HVC_SNAPSHOT, HVC_STATS, HVC_VM_ID};
use platform::abi::{SMCCC_INVALID_PARAMETER, SMCCC_NO_MEMORY};

const SNAPSHOTS: usize = 3;
const ROOT_TAG: u64 = 0x0000_0000_5AFE_0000;
const THIEF_TAG: u64 = 0x7E1E_F000_0000_0000;
const TAG_MASK: u64 = 0xffff_ffff_ffff_0000;
const WAIT_MS: u64 = 120_000;

/// The root's secret, written after the fork: only the root's memory (and
/// its snapshots') holds it.
static MARKER: AtomicU64 = AtomicU64::new(0);

fn vm_id() -> u64 {
    psci::hvc(HVC_VM_ID, 0, 0, 0) as u64
}

fn live_vms() -> u64 {
    psci::hvc(HVC_STATS, Stat::LiveVms as u64, 0, 0) as u64
}

/// HVC returning x0 and x1 (a SNAPSHOT resumes with x1 = the restore cookie).
fn hvc2(fid: u32, a1: u64, a2: u64) -> (i64, u64) {
    let (r0, r1): (i64, u64);
    // SAFETY: an SMCCC call changes no memory of ours (a RESTORE replaces all
    // of it and the registers together); clobber_abi("C") covers x0-x17.
    unsafe {
        asm!("hvc #0", inlateout("x0") u64::from(fid) => r0, inlateout("x1") a1 => r1,
             in("x2") a2, clobber_abi("C"), options(nostack));
    }
    (r0, r1)
}

fn wait_until(what: &str, done: impl Fn() -> bool) -> Result<(), Reason> {
    let deadline = cpu::Deadline::after_ms(WAIT_MS);
    while !done() {
        if deadline.passed() {
            return Err(reason!("timed out waiting for {what}"));
        }
        // SAFETY: WFE only waits (at most until the next event or trap); it
        // lets another vCPU run while this one polls memory (a WFI would
        // sleep until an interrupt).
        unsafe { asm!("wfe", options(nomem, nostack)) };
    }
    Ok(())
}

pub fn run(_plat: &Platform) -> Result<(), Reason> {
    let root = vm_id();
    let thief = match psci::hvc(HVC_FORK, 0, 0, 0) {
        0 => return thief(),
        id if id > 0 => id as u64,
        err => return Err(reason!("FORK of the thief failed: {err}")),
    };
    let secret = 0x5EC2_E700_0000_0000 | (root << 16) | thief;
    MARKER.store(secret, SeqCst);
    let mut ids = [0u64; SNAPSHOTS];
    for slot in ids.iter_mut() {
        match hvc2(HVC_SNAPSHOT, 0, 0) {
            (0, cookie) => return resumed(root, cookie),
            (id, _) if id > 0 => *slot = id as u64,
            (err, _) => return Err(reason!("SNAPSHOT failed: {err}")),
        }
    }
    println!("snapsteal: root vm {root} wrote its marker, snapshots {ids:?}; thief is vm {thief}");
    // The root, its snapshots and the thief; then the thief is gone.
    let alone = 1 + SNAPSHOTS as u64;
    wait_until("the thief to finish", || live_vms() <= alone)?;
    MARKER.store(0, SeqCst); // the restore must bring the secret back
    let (err, _) = hvc2(HVC_RESTORE, ids[0], ROOT_TAG | ids[0]);
    Err(reason!(
        "the root's RESTORE of its own snapshot {} returned {err}",
        ids[0]
    ))
}

/// Execution resumed at one of the root's snapshots: in the root (its own
/// final restore) or in a thief that got in.
fn resumed(root: u64, cookie: u64) -> Result<(), Reason> {
    let me = vm_id();
    let marker = MARKER.load(SeqCst);
    if cookie & TAG_MASK == THIEF_TAG || me != root {
        println!(
            "SNAPSTEAL: thief restored into a foreign snapshot, saw marker {marker:#x} (vm {me}, cookie {cookie:#x}, root vm {root})"
        );
        return Err(reason!(
            "vm {me} restored itself into vm {root}'s snapshot and read its memory"
        ));
    }
    if cookie & TAG_MASK != ROOT_TAG || marker >> 40 != 0x5E_C2E7 {
        return Err(reason!(
            "root resumed with cookie {cookie:#x}, marker {marker:#x}"
        ));
    }
    println!(
        "snapsteal: root vm {root} restored its own snapshot {}, marker {marker:#x} intact",
        cookie & 0xffff
    );
    Ok(())
}

/// The thief: waits for the root's snapshots, then tries to restore into
/// every id it can name.
fn thief() -> Result<(), Reason> {
    let me = vm_id();
    let all_there = 2 + SNAPSHOTS as u64;
    wait_until("the root's snapshots", || live_vms() >= all_there)?;
    let edges = [
        u64::MAX,
        1 << 32,
        (1 << 32) + 1,
        u64::from(u32::MAX),
        i64::MAX as u64,
        1 << 63,
    ];
    // Refused calls change nothing: this must still read back afterwards.
    let mine = 0x7E1E_F000_0000_0000 | me;
    MARKER.store(mine, SeqCst);
    let mut refused = 0;
    for id in (0..=me + 300).chain(edges) {
        let (r, _) = hvc2(HVC_RESTORE, id, THIEF_TAG | me);
        match r {
            SMCCC_INVALID_PARAMETER => refused += 1,
            SMCCC_NO_MEMORY => return Err(reason!("RESTORE({id}) ran out of memory")),
            r => return Err(reason!("RESTORE({id}) returned {r}, not INVALID_PARAMETER")),
        }
    }
    let (seen, id) = (MARKER.load(SeqCst), vm_id());
    if seen != mine || id != me {
        return Err(reason!(
            "refused restores changed the thief: marker {seen:#x} (wrote {mine:#x}), id {id} (was {me})"
        ));
    }
    println!("snapsteal: {refused} foreign ids refused (thief vm {me})");
    Ok(())
}
