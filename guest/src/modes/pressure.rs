//! Modes that put the hypervisor's own paths under pressure (run on vCPU 0).
//!
//! - `uartimage [cycles=N] [churn_ms=M]`: fork a churner that forks
//!   short-lived children for M ms (stage-2 table pages come and go on the
//!   other CPU), snapshot, then N times: write a UART register (a trapped
//!   write), read the page back through the read-only register image, dirty
//!   a page, restore. The page must only ever read as this UART's image:
//!   never a freed frame reused as a table or as another VM's image.
//! - `snapflood [max=N]`: snapshots itself until the hypervisor refuses
//!   (frames, rmap pools or the heap reserve run out first): every
//!   refusal must be an error code, never a hypervisor abort, and the VM
//!   must keep working afterwards.

use crate::dtb::Platform;
use crate::psci::hvc;
use crate::report::{reason, Reason};
use platform::abi::{Stat, HVC_EXIT, HVC_FORK, HVC_RESTORE, HVC_SNAPSHOT, HVC_STATS};

const PAGE: usize = 4096;
const FILL_START: usize = 0x4100_0000;
const UART: usize = 0x0900_0000;
const UART_IMSC: usize = 0x38;

fn arg(plat: &Platform, key: &str, default: u64) -> u64 {
    plat.bootargs()
        .split_ascii_whitespace()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or(default)
}

fn stat(s: Stat) -> u64 {
    hvc(HVC_STATS, s as u64, 0, 0) as u64
}

/// Fills page `p` of the area with words that do not compress.
fn scribble(p: usize, seed: u64) {
    let mut x = crate::fpsimd::splitmix64(seed ^ p as u64);
    let page = (FILL_START + p * PAGE) as *mut u64;
    for i in 0..PAGE / 8 {
        x = crate::fpsimd::splitmix64(x);
        // SAFETY: FILL_START is guest RAM 16 MiB above the image and its
        // stacks (the tests give the VM at least 64 MiB); only vCPU 0 runs
        // these modes.
        unsafe { page.add(i).write_volatile(x) };
    }
}

fn uart_read(off: usize) -> u32 {
    // SAFETY: the emulated PL011's page, mapped as device memory by the
    // guest's boot page tables; reads have no side effect but on DR (0).
    unsafe { ((UART + off) as *const u32).read_volatile() }
}

fn uart_write(off: usize, v: u32) {
    // SAFETY: as above; IMSC writes only change the interrupt mask.
    unsafe { ((UART + off) as *mut u32).write_volatile(v) }
}

/// The UART page must read as this UART's register image: the IMSC value
/// last written, TXFE in FR, and the PL011 identification registers. A freed
/// frame reused as a stage-2 table, a zeroed guest page or another VM's
/// image reads otherwise.
fn check_uart_page(imsc: u32, round: u64) -> Result<(), Reason> {
    let seen = uart_read(UART_IMSC);
    if seen != imsc {
        return Err(reason!(
            "round {round}: UART IMSC reads {seen:#x} after writing {imsc:#x}: the page is not this UART's image"
        ));
    }
    if uart_read(0x18) & (1 << 7) == 0 {
        return Err(reason!(
            "round {round}: UART FR lost TXFE: not a UART image"
        ));
    }
    for (i, &id) in platform::pl011::ID_BYTES.iter().enumerate() {
        let w = uart_read(0xfe0 + 4 * i);
        if w != id {
            return Err(reason!(
                "round {round}: UART ID register {i} reads {w:#x}, not {id:#x}: not this UART's image"
            ));
        }
    }
    Ok(())
}

/// The churner: forks short-lived children for `ms` so that stage-2 table
/// pages (allocated like the UART image, from the top of RAM) are taken and
/// freed on the other CPU while the parent restores. A restore that freed
/// the image frame the VM still maps loses it to one of them.
fn churn(ms: u64) -> ! {
    let deadline = crate::cpu::Deadline::after_ms(ms);
    while !deadline.passed() {
        if stat(Stat::LiveVms) >= 8 {
            crate::cpu::wait_for_event();
            continue;
        }
        if hvc(HVC_FORK, 0, 0, 0) == 0 {
            break;
        }
    }
    hvc(HVC_EXIT, 0, 0, 0);
    crate::cpu::halt()
}

pub fn uart_image(plat: &Platform) -> Result<(), Reason> {
    let cycles = arg(plat, "cycles", 200);
    match hvc(HVC_FORK, 0, 0, 0) {
        0 => churn(arg(plat, "churn_ms", 20_000)),
        c if c > 0 => {}
        err => return Err(reason!("FORK of the churner failed: {err}")),
    }
    // On the stack the snapshot captures: every restore sees it again.
    let base = uart_read(UART_IMSC);
    let (r, cookie) = super::fork::hvc2(HVC_SNAPSHOT, 0, 0);
    let (snap, round) = match r {
        0 => (cookie >> 32, cookie & 0xffff_ffff),
        s if s > 0 => (s as u64, 0),
        err => return Err(reason!("SNAPSHOT failed: {err}")),
    };
    check_uart_page(base, round)?;
    if round == cycles {
        println!("GUEST: uartimage: {cycles} restores, the UART page was always its own");
        return Ok(());
    }
    // Modem-status mask bits: stored and read back, never an interrupt.
    let imsc = (round as u32 % 15) + 1;
    uart_write(UART_IMSC, imsc);
    check_uart_page(imsc, round)?;
    // Dirty a page so the restore has work, then restore.
    scribble(0, round);
    uart_write(UART_IMSC, base);
    let r = hvc(HVC_RESTORE, snap, (snap << 32) | (round + 1), 0);
    Err(reason!("RESTORE to vm {snap} returned {r}"))
}

pub fn snap_flood(plat: &Platform) -> Result<(), Reason> {
    let max = arg(plat, "max", 100_000);
    let mut taken = 0u64;
    let err = loop {
        match hvc(HVC_SNAPSHOT, 0, 0, 0) {
            s if s > 0 => taken += 1,
            0 => return Err(reason!("resumed in a snapshot nobody restored")),
            err => break err,
        }
        if taken == max {
            break 0;
        }
        if taken.is_multiple_of(1000) {
            println!("GUEST: snapflood: {taken} snapshots");
        }
    };
    println!("GUEST: snapflood: {taken} snapshots, then error {err}");
    if err != platform::abi::SMCCC_NO_MEMORY {
        return Err(reason!("the refusal was {err}, not NO_MEMORY"));
    }
    // Still alive and still able to use memory.
    scribble(0, 3);
    println!("GUEST: snapflood: still running after the refusal");
    Ok(())
}
