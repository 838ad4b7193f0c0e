//! `memstress [mem=MiB] [secs=S] [fork=N] [zero=PCT]`: memory that must stay
//! intact while the hypervisor migrates, evacuates, reclaims and forks under
//! it. vCPU 0 first forks N children (a flat fan-out); then, in every VM, all
//! vCPUs sweep their slice of the area for S seconds: each pass checks every
//! data page holds what this vCPU wrote last pass (checksum word plus the full
//! expected contents, tagged by VM id and generation) and rewrites it for the
//! next generation; the first PCT % of each slice is never written and must
//! read as zero (zero pages for the reclaimer). The tag is this VM's id, read
//! at every pass, so a VM forked mid-run switches to its own tag and any frame
//! mix-up between VMs is caught. Pages repeat a 64-byte pattern, so they
//! compress well (overcommit through the compressed store).

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::args::Args;
use crate::dtb::{MemRange, Platform};
use crate::psci::hvc;
use crate::report::{reason, Reason};
use crate::sync::SetOnce;
use crate::{cpu, smp};
use platform::abi::{HVC_FORK, HVC_VM_ID};

const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;

static AREA: SetOnce<MemRange> = SetOnce::new();
static SECS: AtomicU64 = AtomicU64::new(10);
static ZERO_PCT: AtomicUsize = AtomicUsize::new(25);
static DONE: AtomicUsize = AtomicUsize::new(0);
static FAILED: AtomicUsize = AtomicUsize::new(0);
static PASSES: AtomicU64 = AtomicU64::new(0);

fn arg(plat: &Platform, key: &str, default: u64) -> u64 {
    plat.bootargs()
        .split_ascii_whitespace()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or(default)
}

fn vm_id() -> u64 {
    hvc(HVC_VM_ID, 0, 0, 0) as u64
}

/// The expected word `j` of data page `page` written with `tag` in `gen`.
fn word(tag: u64, gen: u64, page: u64, j: usize) -> u64 {
    match j {
        1 => (tag << 48) | (gen << 24) | page,
        _ => {
            let v = (tag ^ gen.rotate_left(17) ^ page.rotate_left(40))
                .wrapping_mul(0x9e37_79b9_7f4a_7c15);
            v ^ (j as u64 & 7)
        }
    }
}

fn checksum(p: &[u64]) -> u64 {
    p[1..].iter().enumerate().fold(0u64, |s, (j, &w)| {
        s.wrapping_add(w.wrapping_mul(2 * j as u64 + 1))
    })
}

fn page_slice(addr: usize) -> &'static mut [u64] {
    // SAFETY: a page of this vCPU's own slice of the area (guest RAM above
    // the image, identity mapped); no other vCPU touches it.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u64, WORDS) }
}

pub fn run(plat: &Platform, args: &Args) -> Result<(), Reason> {
    SECS.store(arg(plat, "secs", 10), Ordering::Relaxed);
    ZERO_PCT.store(arg(plat, "zero", 25).min(100) as usize, Ordering::Relaxed);
    let area = AREA.set(super::selftest::choose_area(plat, args.mem)?);
    for _ in 0..arg(plat, "fork", 0) {
        match hvc(HVC_FORK, 0, 0, 0) {
            0 => break, // the child runs the workload, not more forks
            c if c > 0 => {}
            err => return Err(reason!("FORK failed: {err}")),
        }
    }
    let id = vm_id();
    let vcpus = smp::bring_up(plat, work)?;
    println!(
        "GUEST: memstress vm {id}: {} MiB at {:#x}, {vcpus} vcpus, {} s",
        area.size >> 20,
        area.start,
        SECS.load(Ordering::Relaxed)
    );
    smp::release(vcpus);
    work(0, vcpus);
    while DONE.load(Ordering::Acquire) < vcpus {
        cpu::wait_for_event();
    }
    let id = vm_id();
    match FAILED.load(Ordering::Acquire) {
        0 => {
            println!(
                "GUEST: memstress vm {id}: {} passes verified on {vcpus} vcpus",
                PASSES.load(Ordering::Acquire)
            );
            Ok(())
        }
        n => Err(reason!(
            "memstress vm {id}: {n} of {vcpus} vcpus saw corrupted memory"
        )),
    }
}

fn work(vcpu: usize, vcpus: usize) {
    if let Err(e) = sweep(vcpu, vcpus) {
        println!("GUEST: memstress vcpu {vcpu} FAIL: {}", e.as_str());
        FAILED.fetch_add(1, Ordering::AcqRel);
    }
    DONE.fetch_add(1, Ordering::AcqRel);
    cpu::send_event();
}

fn sweep(vcpu: usize, vcpus: usize) -> Result<(), Reason> {
    let area = AREA.get().ok_or_else(|| reason!("no area"))?;
    let per = (area.size / vcpus) & !(PAGE - 1);
    let base = area.start + vcpu * per;
    let pages = per / PAGE;
    let zero = pages * ZERO_PCT.load(Ordering::Relaxed) / 100;
    let deadline = cpu::Deadline::after_ms(SECS.load(Ordering::Relaxed) * 1000);
    let mut prev_tag = 0;
    let mut gen = 0u64;
    loop {
        let tag = vm_id();
        for i in zero..pages {
            let p = page_slice(base + i * PAGE);
            let index = (base / PAGE + i) as u64;
            if gen > 0 {
                verify(p, prev_tag, gen - 1, index)?;
            }
            for (j, w) in p.iter_mut().enumerate().skip(1) {
                *w = word(tag, gen, index, j);
            }
            p[0] = checksum(p);
        }
        for i in 0..zero {
            let p = page_slice(base + i * PAGE);
            if let Some(j) = p.iter().position(|&w| w != 0) {
                return Err(reason!(
                    "zero page {:#x} word {j} is {:#x}",
                    base + i * PAGE,
                    p[j]
                ));
            }
        }
        prev_tag = tag;
        gen += 1;
        PASSES.fetch_add(1, Ordering::AcqRel);
        if deadline.passed() {
            return Ok(());
        }
    }
}

fn verify(p: &[u64], tag: u64, gen: u64, index: u64) -> Result<(), Reason> {
    let sum = checksum(p);
    for (j, &w) in p.iter().enumerate().skip(1) {
        let want = word(tag, gen, index, j);
        if w != want {
            return Err(reason!(
                "page {:#x} word {j} is {w:#x}, expected {want:#x} (vm tag {tag}, generation {gen})",
                index as usize * PAGE
            ));
        }
    }
    if p[0] != sum {
        return Err(reason!(
            "page {:#x} checksum {:#x}, contents sum to {sum:#x}",
            index as usize * PAGE,
            p[0]
        ));
    }
    Ok(())
}
