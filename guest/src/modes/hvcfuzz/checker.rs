//! The VMs that did nothing wrong: the checker (forked by the root before
//! any fuzzing) rewrites and verifies a pattern for the whole run, and the
//! root keeps one area it never releases, verified now and then. Whatever
//! the fuzzers do to themselves, neither may ever see a wrong word.

use core::sync::atomic::{AtomicU64, Ordering::SeqCst};

use super::{layout, vm_id, yield_cpu, END};
use crate::report::{reason, Reason};
use crate::{cpu, psci};
use platform::abi::{HVC_FORK, HVC_RESTORE, HVC_SNAPSHOT};

/// The checker's VM id (0 until forked).
static CHECKER_ID: AtomicU64 = AtomicU64::new(0);
/// Pages of the checker area written once and only ever verified (cold
/// pages that chaos may migrate or reclaim under it).
const STILL_PAGES: usize = 256;
const PAGE_WORDS: usize = 512;
/// The checker goes on this long after the root's end.
const CHECKER_EXTRA_MS: u64 = 1000;
/// The moving area's pattern in the checker's snapshot.
const SNAP_TAG: u64 = 0x5a5;
const RESTORE_EVERY: u64 = 8;
const COOKIE_TAG: u64 = 0xC4;

fn words(start: u64, pages: usize) -> &'static mut [u64] {
    // SAFETY: the hvcfuzz areas (mod.rs `set_layout`) are guest RAM outside
    // the image, its stacks and the DTB, identity mapped; each is used by one
    // vCPU at a time (the root area by the root's vCPU 0 only, the checker
    // area by the checker VM's only vCPU).
    unsafe { core::slice::from_raw_parts_mut(start as *mut u64, pages * PAGE_WORDS) }
}

fn word(tag: u64, i: usize) -> u64 {
    (tag << 44) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x0c0f_fee0
}

fn fill(area: &mut [u64], tag: u64) {
    for (i, w) in area.iter_mut().enumerate() {
        // SAFETY: a valid &mut u64; volatile so every round really writes.
        unsafe { core::ptr::write_volatile(w, word(tag, i)) };
    }
}

/// The first wrong word: (index, read, expected).
fn first_bad(area: &[u64], tag: u64) -> Option<(usize, u64, u64)> {
    area.iter().enumerate().find_map(|(i, w)| {
        // SAFETY: a valid &u64; volatile so every round really reads.
        let v = unsafe { core::ptr::read_volatile(w) };
        (v != word(tag, i)).then_some((i, v, word(tag, i)))
    })
}

pub fn fill_root_area() {
    fill(words(layout(4), STILL_PAGES), 0x7001);
}

pub fn verify_root_area() -> Result<(), Reason> {
    let start = layout(4);
    match first_bad(words(start, STILL_PAGES), 0x7001) {
        None => Ok(()),
        Some((i, v, want)) => {
            println!(
                "hvcfuzz: ROOT MISMATCH in vm {} at {:#x}: read {v:#x}, wrote {want:#x}",
                vm_id(),
                start + 8 * i as u64
            );
            Err(reason!("the root's own area changed under it"))
        }
    }
}

/// Forks the checker; returns in the root only.
pub fn fork_checker(secs: u64) -> Result<(), Reason> {
    match psci::hvc(HVC_FORK, 0, 0, 0) {
        0 => checker(secs),
        id if id > 0 => {
            CHECKER_ID.store(id as u64, SeqCst);
            println!("hvcfuzz: checker is vm {id}");
            Ok(())
        }
        err => Err(reason!("FORK of the checker failed: {err}")),
    }
}

/// The checker's life: one area written once and verified every round,
/// another rewritten with a new pattern and verified every round; every
/// `RESTORE_EVERY` rounds it restores its own snapshot (taken with the
/// moving area at `SNAP_TAG`) and checks it sees exactly that again.
fn checker(_secs: u64) -> ! {
    let me = vm_id();
    CHECKER_ID.store(me, SeqCst);
    let (still, moving) = areas();
    fill(words(still, STILL_PAGES), me);
    fill(words(moving, STILL_PAGES), SNAP_TAG);
    let end = END.load(SeqCst) + CHECKER_EXTRA_MS * cpu::ticks_per_sec() / 1000;
    // The round count lives in the cookie: a restore resets our memory.
    let (snap, mut rounds, restores) = match snapshot() {
        (id, _) if id > 0 => (id as u64, 0, 0),
        (0, cookie) if cookie >> 56 == COOKIE_TAG => {
            check(SNAP_TAG, cookie & 0xff_ffff, "after a restore");
            (
                cookie >> 24 & 0xffff,
                cookie & 0xff_ffff,
                cookie >> 40 & 0xffff,
            )
        }
        _ => (0, 0, 0),
    };
    while cpu::ticks() < end {
        let tag = 0x100 + rounds;
        fill(words(moving, STILL_PAGES), tag);
        yield_cpu();
        check(tag, rounds, "");
        rounds += 1;
        let may = !super::NO_RESTORE.load(SeqCst) && vm_id() == CHECKER_ID.load(SeqCst);
        if snap != 0 && rounds % RESTORE_EVERY == 0 && may {
            let cookie = COOKIE_TAG << 56 | (restores + 1) << 40 | snap << 24 | rounds;
            let r = psci::hvc(HVC_RESTORE, snap, cookie, 0);
            // A console fork between the check and the call is refused, rightly.
            if vm_id() != CHECKER_ID.load(SeqCst) {
                continue;
            }
            println!(
                "hvcfuzz checker: WRONG ANSWER: RESTORE of its own snapshot {snap} returned {r}"
            );
        }
    }
    if vm_id() == CHECKER_ID.load(SeqCst) {
        println!("hvcfuzz checker: {rounds} rounds ok ({restores} restores)");
    } else {
        // A console (chaos) fork of the checker: it checked as much.
        println!("hvcfuzz checker clone vm {}: {rounds} rounds ok", vm_id());
    }
    crate::report::pass()
}

fn areas() -> (u64, u64) {
    (layout(5), layout(5) + (STILL_PAGES * PAGE_WORDS * 8) as u64)
}

/// SNAPSHOT: (x0, x1).
fn snapshot() -> (i64, u64) {
    let (r0, r1): (i64, u64);
    // SAFETY: an SMCCC call changes no memory of ours (a RESTORE resuming
    // here replaces memory and registers together); clobber_abi covers x0-x17.
    unsafe {
        core::arch::asm!("hvc #0", inlateout("x0") u64::from(HVC_SNAPSHOT) => r0,
            inlateout("x1") 0u64 => r1, clobber_abi("C"), options(nostack));
    }
    (r0, r1)
}

/// Both areas hold what the checker last wrote, or it fails the run.
fn check(tag: u64, round: u64, when: &str) {
    let (still, moving) = areas();
    let me = CHECKER_ID.load(SeqCst);
    let bad = [(still, me), (moving, tag)]
        .into_iter()
        .find_map(|(a, t)| first_bad(words(a, STILL_PAGES), t).map(|b| (a, b)));
    if let Some((area, (i, v, want))) = bad {
        println!(
            "hvcfuzz checker: MISMATCH in vm {} round {round} {when} at {:#x}: read {v:#x}, wrote {want:#x}",
            vm_id(),
            area + 8 * i as u64
        );
        crate::report::fail(format_args!("the checker's memory changed under it"));
    }
}
