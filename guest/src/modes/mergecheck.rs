//! `mergecheck [pages=N] [zeros=Z] [churn=C] [secs=S]`: memory the
//! same-page merger (issue 16) may merge with other VMs' must keep reading
//! as written.
//!
//! N data pages hold a pattern that depends only on the page's index (so it
//! is identical in every VM running this mode: mergeable across VMs), and Z
//! pages after them are all zero. Then, round after round: every page is
//! checked word by word; every 8th round one window of 16 of the first C
//! data pages (default 64) is rewritten with this VM's own content (a CoW
//! write on a merged page: unmerge), checked, and written back to the
//! shared pattern (mergeable again). The other data pages are never written
//! again, so they stay merged for as long as the hypervisor keeps them so. Between rounds the vCPU waits (WFE) for about `PAUSE_MS` so the
//! hypervisor's console and the other VMs get the host CPUs.
//!
//! Every second or so it prints `GUEST: mergecheck vm V csum ok round=K`;
//! the first wrong word prints `GUEST: mergecheck vm V FAIL ...` and ends the
//! VM with `GUEST RESULT: FAIL`. With S > 0 it stops after S seconds and
//! passes; with S = 0 (the default) it runs until destroyed.

use crate::args::{Args, MemSize};
use crate::cpu::{ticks, ticks_per_sec, wait_for_event, Deadline};
use crate::dtb::Platform;
use crate::psci::hvc;
use crate::report::{reason, Reason};
use platform::abi::HVC_VM_ID;

const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;
/// Data pages rewritten together every `REWRITE_EVERY` rounds.
const WINDOW: usize = 16;
const REWRITE_EVERY: u64 = 8;
/// The wait between rounds.
const PAUSE_MS: u64 = 20;

fn arg(plat: &Platform, key: &str, default: u64) -> u64 {
    plat.bootargs()
        .split_ascii_whitespace()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or(default)
}

/// Word `j` of data page `page`: the same in every VM; `own` (a VM id, or 0
/// for the shared pattern) makes a VM's private rewrite differ from it.
fn word(page: usize, j: usize, own: u64) -> u64 {
    let x = ((page as u64) << 20) ^ (j as u64) ^ own.rotate_left(44);
    x.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x6d65_7267_6521
}

fn page_words(base: usize, page: usize) -> &'static mut [u64] {
    // SAFETY: a page of the area chosen by `choose_area` (guest RAM above
    // the image and the DTB, identity mapped); only this vCPU runs and only
    // this mode touches it.
    unsafe { core::slice::from_raw_parts_mut((base + page * PAGE) as *mut u64, WORDS) }
}

/// Fills data page `page` with its pattern (`own` = 0) or a private one.
fn fill(base: usize, page: usize, own: u64) {
    for (j, w) in page_words(base, page).iter_mut().enumerate() {
        // Volatile: the compiler must not merge the fill with the check.
        // SAFETY: `w` is a valid, aligned word of the page.
        unsafe { core::ptr::write_volatile(w, word(page, j, own)) };
    }
}

/// Checks one page against `want(j)`: the first wrong word, if any.
fn check(words: &[u64], want: impl Fn(usize) -> u64) -> Option<(usize, u64, u64)> {
    words.iter().enumerate().find_map(|(j, w)| {
        // SAFETY: `w` is a valid, aligned word of guest RAM.
        let got = unsafe { core::ptr::read_volatile(w) };
        (got != want(j)).then_some((j, got, want(j)))
    })
}

struct Area {
    base: usize,
    pages: usize,
    zeros: usize,
    /// Data pages `0..churn` are rewritten in turn.
    churn: usize,
    vm: u64,
}

impl Area {
    /// Every data page against `own`'s pattern (only `only` if given) and
    /// every zero page against 0.
    fn verify(&self, round: u64, own: u64, only: Option<usize>) -> Result<(), Reason> {
        for page in 0..self.pages + self.zeros {
            let data = page < self.pages;
            let mine = only.is_none_or(|w| data && page / WINDOW == w);
            let own = if mine { own } else { 0 };
            let bad = match data {
                true => check(page_words(self.base, page), |j| word(page, j, own)),
                false => check(page_words(self.base, page), |_| 0),
            };
            if let Some((j, got, want)) = bad {
                println!(
                    "GUEST: mergecheck vm {} FAIL round={round} page {page} at {:#x} word {j}: got {got:#x}, want {want:#x}",
                    self.vm,
                    self.base + page * PAGE
                );
                return Err(reason!("mergecheck: page {page} word {j} corrupted"));
            }
        }
        Ok(())
    }

    /// Rewrites window `w` with this VM's own content, checks everything,
    /// and writes the shared pattern back.
    fn rewrite(&self, round: u64, w: usize) -> Result<(), Reason> {
        let pages = w * WINDOW..((w + 1) * WINDOW).min(self.churn);
        pages.clone().for_each(|p| fill(self.base, p, self.vm));
        self.verify(round, self.vm, Some(w))?;
        pages.for_each(|p| fill(self.base, p, 0));
        Ok(())
    }
}

pub fn run(plat: &Platform, _args: &Args) -> Result<(), Reason> {
    let pages = arg(plat, "pages", 256).max(1) as usize;
    let zeros = arg(plat, "zeros", 64) as usize;
    let churn = (arg(plat, "churn", 64) as usize).min(pages);
    let secs = arg(plat, "secs", 0);
    let mib = ((pages + zeros) * PAGE).div_ceil(1 << 20);
    let area = super::selftest::choose_area(plat, Some(MemSize::MiB(mib)))?;
    if area.size < (pages + zeros) * PAGE {
        return Err(reason!("mergecheck: only {} bytes free", area.size));
    }
    let a = Area {
        base: area.start,
        pages,
        zeros,
        churn,
        vm: hvc(HVC_VM_ID, 0, 0, 0) as u64,
    };
    (0..pages).for_each(|p| fill(a.base, p, 0));
    for z in pages..pages + zeros {
        // Written, so the frames exist (and are mergeable zero pages).
        page_words(a.base, z).iter_mut().for_each(|w| {
            // SAFETY: as in `fill`.
            unsafe { core::ptr::write_volatile(w, 0) }
        });
    }
    println!(
        "GUEST: mergecheck vm {}: {pages} pattern pages ({churn} rewritten in turn) and {zeros} zero pages at {:#x}, filled",
        a.vm, a.base
    );
    rounds(&a, secs)
}

fn rounds(a: &Area, secs: u64) -> Result<(), Reason> {
    let (start, second) = (ticks(), ticks_per_sec());
    let (mut round, mut next_report) = (0u64, start);
    let windows = a.churn.div_ceil(WINDOW);
    loop {
        round += 1;
        a.verify(round, 0, None)?;
        if windows > 0 && round % REWRITE_EVERY == 0 {
            a.rewrite(round, (round / REWRITE_EVERY) as usize % windows)?;
        }
        if ticks() >= next_report {
            println!("GUEST: mergecheck vm {} csum ok round={round}", a.vm);
            next_report = ticks() + second;
        }
        if secs > 0 && ticks() - start >= secs * second {
            println!("GUEST: mergecheck vm {}: {round} rounds verified", a.vm);
            return Ok(());
        }
        let pause = Deadline::after_ms(PAUSE_MS);
        while !pause.passed() {
            wait_for_event();
        }
    }
}
