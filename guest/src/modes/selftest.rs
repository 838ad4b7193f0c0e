//! `selftest`: every vCPU at once fills and verifies its own slice of a test
//! area with two patterns distinct per vCPU and pass, while holding distinct
//! FP/SIMD state that must survive the work (`fpsimd.rs`).
//!
//! The area starts 2 MiB aligned above the image, avoids the DTB, and keeps a
//! margin below the end of RAM; `mem=<MiB>` sizes it (default 64 MiB),
//! `mem=max` takes all of it.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::args::{Args, MemSize};
use crate::dtb::{MemRange, Platform};
use crate::fpsimd::{FpMismatch, Pass};
use crate::report::{reason, Reason};
use crate::sync::SetOnce;
use crate::{cpu, entry, smp};

const MIB: usize = 1 << 20;
const DEFAULT_MIB: usize = 64;
const AREA_ALIGN: usize = 2 * MIB;
/// RAM left alone at the top (where a loader may have put things).
const TOP_MARGIN: usize = 2 * MIB;
const PAGE: usize = 4096;
const PASSES: usize = 2;
/// Generous: under a hypervisor every first touch of a page is a fault.
const DONE_TIMEOUT_MS: u64 = 600_000;

static AREA: SetOnce<MemRange> = SetOnce::new();
static DONE: AtomicUsize = AtomicUsize::new(0);
static FAILED: AtomicUsize = AtomicUsize::new(0);
/// Wrapping sum of every word read back by every vCPU.
static CHECKSUM: AtomicU64 = AtomicU64::new(0);

pub fn run(plat: &Platform, args: &Args) -> Result<(), Reason> {
    let area = AREA.set(choose_area(plat, args.mem)?);
    println!(
        "GUEST: selftest area {:#x}..{:#x} ({} MiB)",
        area.start,
        area.end(),
        area.size / MIB
    );
    let vcpus = smp::bring_up(plat, vcpu_work)?;
    println!("GUEST: {vcpus} vcpus up");

    let start = cpu::ticks();
    smp::release(vcpus);
    vcpu_work(0, vcpus);
    wait_all_done(vcpus)?;
    println!(
        "GUEST: selftest done in {} ms: {vcpus} vcpus, {} MiB x {PASSES} passes, checksum={:#018x}",
        cpu::ms_since(start),
        area.size / MIB,
        CHECKSUM.load(Ordering::Acquire),
    );
    match FAILED.load(Ordering::Acquire) {
        0 => Ok(()),
        n => Err(reason!(
            "{n} of {vcpus} vcpus failed the memory/FP-SIMD self-check"
        )),
    }
}

pub(crate) fn choose_area(plat: &Platform, mem: Option<MemSize>) -> Result<MemRange, Reason> {
    let free =
        free_ram(plat).ok_or_else(|| reason!("no free RAM above the image for the selftest"))?;
    let want = match mem {
        None => DEFAULT_MIB * MIB,
        Some(MemSize::MiB(m)) => m.saturating_mul(MIB),
        Some(MemSize::Max) => usize::MAX,
    };
    if matches!(mem, Some(MemSize::MiB(_))) && want > free.size {
        println!(
            "GUEST: only {} MiB free for the selftest; using that",
            free.size / MIB
        );
    }
    Ok(MemRange {
        start: free.start,
        size: want.min(free.size) & !(PAGE - 1),
    })
}

/// The largest free, 2 MiB aligned stretch of the RAM range holding the image.
fn free_ram(plat: &Platform) -> Option<MemRange> {
    let image = entry::image_range();
    let ram = plat.ram().iter().find(|r| r.contains(image.start))?;
    let lo = image.end.next_multiple_of(AREA_ALIGN);
    let hi = ram.end().checked_sub(TOP_MARGIN)? & !(AREA_ALIGN - 1);
    let dtb = plat.dtb;
    let (dtb_lo, dtb_hi) = (
        dtb.start & !(AREA_ALIGN - 1),
        dtb.end().next_multiple_of(AREA_ALIGN),
    );
    let pieces = if dtb.size == 0 || dtb_hi <= lo || dtb_lo >= hi {
        [(lo, hi), (0, 0)]
    } else {
        [(lo, dtb_lo.max(lo)), (dtb_hi.min(hi), hi)]
    };
    let (start, end) = pieces
        .into_iter()
        .max_by_key(|(s, e)| e.saturating_sub(*s))?;
    (end > start).then(|| MemRange {
        start,
        size: end - start,
    })
}

/// Runs on every vCPU: its slice of the area, all passes.
fn vcpu_work(vcpu: usize, vcpus: usize) {
    let ok = match AREA.get() {
        Some(area) => {
            let per = (area.size / vcpus) & !(PAGE - 1);
            (0..PASSES).all(|pass| check_pass(vcpu, pass, area.start + vcpu * per, per))
        }
        None => false,
    };
    if !ok {
        FAILED.fetch_add(1, Ordering::AcqRel);
    }
    DONE.fetch_add(1, Ordering::AcqRel);
    cpu::send_event();
}

fn check_pass(vcpu: usize, pass: usize, base: usize, len: usize) -> bool {
    let mut p = Pass::new(base, len, vcpu, pass);
    let start = cpu::ticks();
    p.run();
    let ms = cpu::ms_since(start);
    CHECKSUM.fetch_add(p.sum, Ordering::AcqRel);
    if p.bad_words != 0 {
        println!(
            "GUEST: vcpu {vcpu} pass {pass} FAIL: {} bad words, first at {:#x}: read {:#x}, wrote {:#x}",
            p.bad_words, p.first_bad_addr, p.first_bad_value, p.first_bad_expected
        );
        return false;
    }
    if let Some(m) = p.fp_mismatch() {
        report_fp_mismatch(vcpu, pass, &m);
        return false;
    }
    println!(
        "GUEST: vcpu {vcpu} pass {pass} ok: {} KiB at {base:#x} in {ms} ms, fp/simd intact, checksum={:#018x}",
        len / 1024,
        p.sum
    );
    true
}

fn report_fp_mismatch(vcpu: usize, pass: usize, m: &FpMismatch) {
    match *m {
        FpMismatch::Vreg { index, want, got } => {
            println!(
                "GUEST: vcpu {vcpu} pass {pass} FAIL: v{index} was {want:#034x}, is {got:#034x}"
            )
        }
        FpMismatch::Fpcr { want, got } => {
            println!("GUEST: vcpu {vcpu} pass {pass} FAIL: FPCR was {want:#x}, is {got:#x}")
        }
        FpMismatch::Fpsr { want, got } => {
            println!("GUEST: vcpu {vcpu} pass {pass} FAIL: FPSR was {want:#x}, is {got:#x}")
        }
    }
}

fn wait_all_done(vcpus: usize) -> Result<(), Reason> {
    let deadline = cpu::Deadline::after_ms(DONE_TIMEOUT_MS);
    while DONE.load(Ordering::Acquire) < vcpus {
        if deadline.passed() {
            let n = DONE.load(Ordering::Acquire);
            return Err(reason!("only {n} of {vcpus} vcpus finished the selftest"));
        }
        cpu::wait_for_event();
    }
    Ok(())
}
