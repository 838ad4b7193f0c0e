//! Fork and snapshot modes (run on vCPU 0 only; the hypervisor runs the
//! resulting VMs side by side on its physical CPUs).
//!
//! - `forktree [depth=D] [breadth=B]`: every VM fills a test area with a
//!   pattern tagged by its VM id; each forks B children down to depth D. A
//!   child first checks it sees its parent's pattern (copy-on-write sharing),
//!   then writes its own; every VM finally re-checks its own pattern after its
//!   children wrote theirs (isolation).
//! - `forkloop [cycles=N]`: N times fork a child that dirties some pages and
//!   exits; afterwards free frames, anon_vmas and chains must be back at
//!   their baseline.
//! - `snapshot [cycles=N]`: snapshot, then N times dirty 64 pages and restore;
//!   each restore must show the snapshot's contents again.

use crate::dtb::Platform;
use crate::psci::hvc;
use crate::report::{reason, Reason};
use core::arch::asm;
use platform::abi::{Stat, HVC_FORK, HVC_RESTORE, HVC_SNAPSHOT, HVC_STATS, HVC_VM_ID};

const PAGE: usize = 4096;
const AREA_START: usize = 0x4040_0000;
const AREA_PAGES: usize = 256; // 1 MiB
const DIRTY_PAGES: usize = 64;

/// Snapshot mode's start time (in RAM the snapshot captures).
static T0: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

fn area() -> &'static mut [u64] {
    // SAFETY: [AREA_START, +1 MiB) is guest RAM above the image and its
    // stacks (image_size < 4 MiB), identity mapped; only vCPU 0 runs in
    // these modes, so nothing else touches it.
    unsafe { core::slice::from_raw_parts_mut(AREA_START as *mut u64, AREA_PAGES * PAGE / 8) }
}

/// The pattern's multiplier (Fibonacci hashing's golden-ratio constant).
const PATTERN_K: u64 = 0x9e37_79b9_7f4a_7c15;

/// Word `i` of `tag`'s pattern: `i * K` plus the tag in the high bits (an
/// addition, so the next word is one add away; distinct tags below 2^24 give
/// different words at every index).
fn word(tag: u64, i: usize) -> u64 {
    (tag << 40).wrapping_add((i as u64).wrapping_mul(PATTERN_K))
}

fn fill(tag: u64, pages: usize) {
    let a = area();
    for (i, w) in a.iter_mut().take(pages * PAGE / 8).enumerate() {
        *w = word(tag, i);
    }
}

/// Checks every word of the area against `tag`'s pattern. The fuzzing cycle
/// (`snapshot`) runs this over the whole 1 MiB after every restore, so it is
/// the cycle's largest part: each word costs a load, an XOR, an OR and an add
/// (the pattern's next word is the last one plus [`PATTERN_K`]), and only a
/// chunk whose OR is not zero is searched for its first wrong word (for the
/// report). The loads are volatile, which also keeps the compiler from
/// vectorising the loop: this target is built with strict alignment, and its
/// 128-bit loads would become byte loads.
fn verify(tag: u64) -> Result<(), Reason> {
    const CHUNK: usize = 16;
    let mut want = word(tag, 0);
    for (c, chunk) in area().chunks_exact(CHUNK).enumerate() {
        let mut diff = 0;
        for w in chunk {
            // SAFETY: a reference to an initialised u64 of the area.
            diff |= unsafe { core::ptr::read_volatile(w) } ^ want;
            want = want.wrapping_add(PATTERN_K);
        }
        // `black_box`: otherwise the compiler turns the OR back into a
        // compare and a branch per word, and under TCG a branch ends a block.
        if core::hint::black_box(diff) != 0 {
            return Err(first_wrong(tag, c * CHUNK));
        }
    }
    Ok(())
}

/// The first word from `from` on that differs from `tag`'s pattern.
#[cold]
fn first_wrong(tag: u64, from: usize) -> Reason {
    let a = area();
    match (from..a.len()).find(|&i| a[i] != word(tag, i)) {
        Some(i) => reason!("word {i} is {:#x}, expected pattern of tag {tag}", a[i]),
        None => reason!("a word near {from} changed back while it was checked"),
    }
}

pub(crate) fn arg(plat: &Platform, key: &str, default: u64) -> u64 {
    plat.bootargs()
        .split_ascii_whitespace()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or(default)
}

fn vm_id() -> u64 {
    hvc(HVC_VM_ID, 0, 0, 0) as u64
}

fn stat(s: Stat) -> u64 {
    hvc(HVC_STATS, s as u64, 0, 0) as u64
}

/// Gives the physical CPU to other vCPUs for a moment (WFI traps to the
/// hypervisor, which reschedules).
/// Lets another vCPU run while this one polls memory: WFE, the primitive
/// for waiting on memory (the hypervisor traps it and yields when another
/// vCPU is ready). Not WFI: that waits for an interrupt, and the hypervisor
/// keeps a vCPU in WFI asleep until one is deliverable or its timer is due.
fn yield_cpu() {
    // SAFETY: WFE only waits (at most until the next event or trap).
    unsafe { asm!("wfe", options(nomem, nostack)) };
}

pub fn tree(plat: &Platform) -> Result<(), Reason> {
    let (depth, breadth) = (arg(plat, "depth", 2), arg(plat, "breadth", 2));
    let mut tag = vm_id();
    fill(tag, AREA_PAGES);
    let mut level = 0;
    'levels: while level < depth {
        for _ in 0..breadth {
            match hvc(HVC_FORK, 0, 0, 0) {
                0 => {
                    let parent = tag;
                    tag = vm_id();
                    verify(parent).map_err(|e| {
                        reason!(
                            "child vm {tag} does not see its parent's memory: {}",
                            e.as_str()
                        )
                    })?;
                    fill(tag, AREA_PAGES);
                    println!(
                        "GUEST: vm {tag} (child of vm {parent}, level {}) wrote its pattern",
                        level + 1
                    );
                    level += 1;
                    continue 'levels;
                }
                child if child > 0 => println!("GUEST: vm {tag} forked vm {child}"),
                err => return Err(reason!("FORK failed: {err}")),
            }
        }
        break;
    }
    for _ in 0..20 {
        yield_cpu();
        verify(tag).map_err(|e| reason!("vm {tag} lost its own pattern: {}", e.as_str()))?;
    }
    println!("GUEST: vm {tag} verified its own pattern");
    Ok(())
}

pub fn fork_loop(plat: &Platform) -> Result<(), Reason> {
    let cycles = arg(plat, "cycles", 1000);
    fill(1, AREA_PAGES);
    // One warm-up cycle (and a console write, which touches the same data
    // pages the later ones do) first: the first fork write-protects our 2 MiB
    // blocks and our next writes split them, which rightly costs stage-2
    // table pages that stay. Every later cycle must give back all it took.
    fork_and_reap(0)?;
    println!("GUEST: forkloop warm-up cycle done");
    let base = (
        stat(Stat::FreeFrames),
        stat(Stat::AnonVmas),
        stat(Stat::Chains),
    );
    println!(
        "GUEST: forkloop baseline: free frames {}, anon_vmas {}, chains {}",
        base.0, base.1, base.2
    );
    for i in 0..cycles {
        fork_and_reap(i)?;
    }
    verify(1)?;
    let now = (
        stat(Stat::FreeFrames),
        stat(Stat::AnonVmas),
        stat(Stat::Chains),
    );
    println!(
        "GUEST: forkloop after {cycles} cycles: free frames {}, anon_vmas {}, chains {}",
        now.0, now.1, now.2
    );
    if now != base {
        return Err(reason!(
            "resources did not return to baseline: {base:?} -> {now:?}"
        ));
    }
    Ok(())
}

/// Forks a child that dirties some pages and exits; waits until it is gone.
fn fork_and_reap(i: u64) -> Result<(), Reason> {
    match hvc(HVC_FORK, 0, 0, 0) {
        0 => {
            fill(2, DIRTY_PAGES);
            crate::psci::power_off(0);
        }
        c if c > 0 => {}
        err => return Err(reason!("FORK {i} failed: {err}")),
    }
    while stat(Stat::LiveVms) > 1 {
        yield_cpu();
    }
    Ok(())
}

/// HVC returning x0 and x1 (SNAPSHOT resumes with x1 = the restore cookie).
pub(super) fn hvc2(fid: u32, a1: u64, a2: u64) -> (i64, u64) {
    let (r0, r1): (i64, u64);
    // SAFETY: an SMCCC call changes no memory of ours; clobber_abi("C")
    // covers the registers the callee may change.
    unsafe {
        asm!("hvc #0", inlateout("x0") u64::from(fid) => r0, inlateout("x1") a1 => r1, in("x2") a2,
             clobber_abi("C"), options(nostack));
    }
    (r0, r1)
}

pub fn snapshot(plat: &Platform) -> Result<(), Reason> {
    let cycles = arg(plat, "cycles", 100);
    fill(1, AREA_PAGES);
    // The start time lives in the snapshot's memory, so every restore sees it.
    let t0 = T0.as_ptr();
    // SAFETY: a static of ours; only vCPU 0 runs this mode.
    unsafe { t0.write_volatile(crate::cpu::ticks()) };
    // Memory is reset by each restore: the snapshot id and the iteration
    // travel in the restore cookie.
    let (r, cookie) = hvc2(HVC_SNAPSHOT, 0, 0);
    let (snap, iteration) = match r {
        0 => (cookie >> 32, cookie & 0xffff_ffff),
        s if s > 0 => (s as u64, 0),
        err => return Err(reason!("SNAPSHOT failed: {err}")),
    };
    verify(1).map_err(|e| reason!("after restore {iteration}: {}", e.as_str()))?;
    if iteration == cycles {
        // SAFETY: as above.
        let start = unsafe { t0.read_volatile() };
        let ms = crate::cpu::ms_since(start).max(1);
        println!("GUEST: {cycles} restores of snapshot vm {snap} verified");
        println!(
            "GUEST: restore rate: {cycles} restores with {DIRTY_PAGES} dirtied pages each in {ms} ms = {} per second",
            cycles * 1000 / ms
        );
        // The hypervisor's own time in the restores (its counters outlive them).
        let (restores, ns) = (stat(Stat::Restores), stat(Stat::RestoreNanos).max(1));
        if restores != cycles {
            return Err(reason!(
                "STATS counts {restores} restores, we made {cycles}"
            ));
        }
        println!(
            "GUEST: restore alone: {restores} restores in {} us = {} per second ({} us each)",
            ns / 1000,
            restores * 1_000_000_000 / ns,
            ns / 1000 / restores.max(1)
        );
        return Ok(());
    }
    fill(iteration + 100, DIRTY_PAGES);
    let (err, _) = hvc2(HVC_RESTORE, snap, (snap << 32) | (iteration + 1));
    Err(reason!("RESTORE returned {err}"))
}

/// `cowbench`: the cost of a copy-on-write write fault next to a write to a
/// page that is already private, a 4 KiB copy, and a trap (a null hypercall),
/// all timed by this vCPU in one run.
pub fn cow_bench(plat: &Platform) -> Result<(), Reason> {
    let pages = (arg(plat, "pages", 128) as usize).min(AREA_PAGES / 2);
    fill(1, AREA_PAGES);
    // A snapshot keeps every page shared, so our next writes must copy.
    match hvc(HVC_SNAPSHOT, 0, 0, 0) {
        s if s > 0 => {}
        err => return Err(reason!("SNAPSHOT failed: {err}")),
    }
    let a = area();
    let words_per_page = PAGE / 8;
    let time = |f: &mut dyn FnMut()| {
        let t = crate::cpu::ticks();
        f();
        crate::cpu::ticks() - t
    };
    let cow = time(&mut || (0..pages).for_each(|p| a[p * words_per_page] = 7));
    let private = time(&mut || (0..pages).for_each(|p| a[p * words_per_page] = 8));
    // Copy into the pages just made private, from still-shared ones.
    let (dst, src) = a.split_at_mut(pages * words_per_page);
    let copy = time(&mut || dst.copy_from_slice(&src[..pages * words_per_page]));
    let trap = time(&mut || {
        (0..pages).for_each(|_| {
            vm_id();
        })
    });
    let ns = |t: u64| t * 1_000_000_000 / crate::cpu::ticks_per_sec() / pages as u64;
    let (cow, private, copy, trap) = (ns(cow), ns(private), ns(copy), ns(trap));
    println!(
        "GUEST: cowbench: {pages} pages: CoW write fault {cow} ns/page, private write {private} ns/page, 4 KiB copy {copy} ns, trap {trap} ns; CoW / (copy + trap) = {}.{:02}",
        cow / (copy + trap).max(1),
        cow * 100 / (copy + trap).max(1) % 100
    );
    Ok(())
}

/// `forkmem`: host frames each idle fork costs once it has run for a while.
pub fn fork_mem(plat: &Platform) -> Result<(), Reason> {
    let forks = arg(plat, "forks", 8);
    fill(1, AREA_PAGES);
    fork_and_reap(0)?; // settle our own block splits first (see fork_loop)
    println!("GUEST: forkmem: warm-up done");
    let before = stat(Stat::FreeFrames);
    for _ in 0..forks {
        match hvc(HVC_FORK, 0, 0, 0) {
            0 => idle_then_exit(),
            c if c > 0 => {}
            err => return Err(reason!("FORK failed: {err}")),
        }
    }
    let deadline = crate::cpu::Deadline::after_ms(1000);
    while !deadline.passed() {
        yield_cpu();
    }
    let after = stat(Stat::FreeFrames);
    let per_fork = before.saturating_sub(after) / forks.max(1);
    println!(
        "GUEST: forkmem: {forks} idle forks cost {} frames ({} KiB each)",
        before.saturating_sub(after),
        per_fork * 4
    );
    while stat(Stat::LiveVms) > 1 {
        yield_cpu();
    }
    Ok(())
}

/// A fork child that idles (touching only its stack) for 2 s, then exits.
fn idle_then_exit() -> ! {
    let deadline = crate::cpu::Deadline::after_ms(2000);
    while !deadline.passed() {
        yield_cpu();
    }
    crate::psci::power_off(0)
}

/// `release`: MEM_RELEASE gives pages back (they read as zero and the VM's
/// page count drops); bad ranges are refused with INVALID_PARAMETER.
pub fn release(_plat: &Platform) -> Result<(), Reason> {
    use platform::abi::{HVC_MEM_RELEASE, SMCCC_INVALID_PARAMETER};
    fill(1, AREA_PAGES);
    let before = stat(Stat::VmPages);
    let len = (AREA_PAGES * PAGE) as u64;
    let r = hvc(HVC_MEM_RELEASE, AREA_START as u64, len, 0);
    if r != 0 {
        return Err(reason!("MEM_RELEASE failed: {r}"));
    }
    let after = stat(Stat::VmPages);
    if before - after < AREA_PAGES as u64 {
        return Err(reason!(
            "VM pages {before} -> {after}: the area was not released"
        ));
    }
    if let Some(i) = area().iter().position(|&w| w != 0) {
        return Err(reason!(
            "released word {i} reads {:#x}, not zero",
            area()[i]
        ));
    }
    for (start, len) in [
        (AREA_START as u64 + 1, 4096),
        (AREA_START as u64, 0),
        (0x1000, 4096),
        (u64::MAX - 4095, 4096),
    ] {
        let r = hvc(HVC_MEM_RELEASE, start, len, 0);
        if r != SMCCC_INVALID_PARAMETER {
            return Err(reason!(
                "MEM_RELEASE({start:#x}, {len:#x}) returned {r}, not INVALID_PARAMETER"
            ));
        }
    }
    println!("GUEST: release: {} pages returned ({before} -> {after}), area reads zero, bad ranges refused", before - after);
    Ok(())
}

/// `badcalls`: hypercalls with garbage arguments get SMCCC/PSCI error codes
/// and change nothing.
pub fn bad_calls(_plat: &Platform) -> Result<(), Reason> {
    use platform::abi::{SMCCC_INVALID_PARAMETER, SMCCC_NOT_SUPPORTED};
    let me = vm_id();
    let cases: [(&str, u32, u64, u64, i64); 10] = [
        (
            "unknown vendor call",
            0xC600_00FF,
            1,
            2,
            SMCCC_NOT_SUPPORTED,
        ),
        ("unknown call", 0xDEAD_BEEF, 0, 0, SMCCC_NOT_SUPPORTED),
        (
            "RESTORE of vm 0",
            HVC_RESTORE,
            0,
            0,
            SMCCC_INVALID_PARAMETER,
        ),
        (
            "RESTORE of a missing vm",
            HVC_RESTORE,
            99_999,
            0,
            SMCCC_INVALID_PARAMETER,
        ),
        (
            "RESTORE of a huge id",
            HVC_RESTORE,
            u64::MAX,
            0,
            SMCCC_INVALID_PARAMETER,
        ),
        (
            "RESTORE to itself (not a snapshot)",
            HVC_RESTORE,
            me,
            0,
            SMCCC_INVALID_PARAMETER,
        ),
        (
            "STATS of an unknown counter",
            HVC_STATS,
            99,
            0,
            SMCCC_INVALID_PARAMETER,
        ),
        (
            "PSCI CPU_ON of a missing cpu",
            0xC400_0003,
            0xff00,
            0x4008_0000,
            -2,
        ),
        ("PSCI CPU_ON outside RAM", 0xC400_0003, 1, 0x10, -9),
        ("PSCI AFFINITY_INFO bad level", 0xC400_0004, 0, 7, -2),
    ];
    for (what, fid, a1, a2, want) in cases {
        let got = hvc(fid, a1, a2, 0);
        if got != want {
            return Err(reason!("{what}: got {got}, expected {want}"));
        }
    }
    if vm_id() != me {
        return Err(reason!("garbage calls changed our identity"));
    }
    println!(
        "GUEST: badcalls: {} garbage hypercalls refused with the right codes",
        cases.len()
    );
    Ok(())
}
