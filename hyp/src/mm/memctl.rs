//! Moving and taking back guest memory while guests run, by walking reverse
//! maps (rmap's batched `migrate_frames` / `reclaim_frames`: every frame of a
//! batch is unmapped into migration entries under each mapper's stage-2
//! lock, each VM gets one TLB invalidation, then the frames are copied or
//! stored):
//!
//! - `migrate_vm`: a VM's IPA range to new frames (console `migrate`); a
//!   2 MiB folio that only block entries map moves whole, as blocks
//!   (`migrate_pfns`);
//! - `evacuate` / `online`: every frame out of a physical range, which stays
//!   offline in the allocator until put online again;
//! - `reclaim`: an access-bit clock over all frames (rmap's `referenced`,
//!   Linux's `folio_referenced`): a frame any mapper touched since the last
//!   sweep survives; cold ones go to the compressed store (`store.rs`);
//! - watermarks: below `low` free frames a faulting vCPU reclaims before it
//!   allocates (`balance`), so guest memory can be overcommitted;
//! - `chaos`: a bounded random loop of all of the above plus fork and
//!   destroy, for the stress test.
//!
//! Lock order: callers hold no memory-manager lock; rmap takes frame
//! (try-lock) → root anon_vma (read) → stage-2 → allocator.

use crate::mm::frames::{self, PAGE_SIZE};
use crate::mm::glue::{rmap, HypFrames, HypVms, STORE};
use crate::mm::VmMemory;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use rmap::{Ipa, Pa, PageState, Pfn, Skip, Stage2, Stage2Locked};

/// Frames migrated (console, evacuate, chaos), ever.
pub static MIGRATED: AtomicU64 = AtomicU64::new(0);
/// 2 MiB folios migrated whole as blocks (counted in `MIGRATED` too), ever.
pub static FOLIOS_MIGRATED: AtomicU64 = AtomicU64::new(0);
/// Frames reclaimed into the store (compressed or zero), ever.
pub static RECLAIMED: AtomicU64 = AtomicU64::new(0);
/// Reclaim passes started by the low watermark.
pub static WATERMARK_RUNS: AtomicU64 = AtomicU64::new(0);
/// Default batch: one TLB invalidation per VM per this many frames.
pub const BATCH: usize = 512;
/// Where the clock hand is (index into the frame table).
static HAND: AtomicU64 = AtomicU64::new(0);
/// One reclaimer at a time (others go on, or wait in `reclaim_for_fault`).
static RECLAIMING: AtomicBool = AtomicBool::new(false);

const SKIPS: [Skip; 6] = [
    Skip::NotMapped,
    Skip::Locked,
    Skip::Pinned,
    Skip::Unreachable,
    Skip::NoMemory,
    Skip::StoreFull,
];

/// What a migration or reclaim did.
#[derive(Default, Clone, Copy)]
pub struct Report {
    pub done: u64,
    pub skipped: [u64; 6],
    pub batches: u64,
}

impl Report {
    fn skip(&mut self, s: Skip) {
        if let Some(i) = SKIPS.iter().position(|&k| k == s) {
            self.skipped[i] += 1;
        }
    }

    pub fn skipped_total(&self) -> u64 {
        self.skipped.iter().sum()
    }
}

impl core::fmt::Display for Report {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} in {} batches", self.done, self.batches)?;
        if self.skipped_total() > 0 {
            f.write_str(", skipped:")?;
            for (i, &n) in self.skipped.iter().enumerate() {
                if n > 0 {
                    write!(f, " {n} {}", SKIPS[i].as_str())?;
                }
            }
        }
        Ok(())
    }
}

/// Migrates `pfns` in batches of `batch`. Whole folios in `pfns` (2 MiB
/// blocks, all 512 frames listed in order) go first, each moved as a block
/// if rmap can (`Rmap::migrate_folio`: one change per mapper, not a split
/// and 512 page moves), whatever `batch` is or wherever the folio falls in
/// the list (evacuation lists only used frames, so a chunk boundary could
/// cut a folio); a folio that cannot move whole (a mapper split it, a frame
/// is busy, no free aligned run) and every other frame go in batches.
pub fn migrate_pfns(pfns: &[Pfn], batch: usize, report: &mut Report) {
    let before = report.done;
    let (folios, rest) = split_folios(pfns);
    let mut out = Vec::with_capacity(batch.max(FOLIO));
    let mut run = |chunk: &[Pfn], report: &mut Report| {
        out.clear();
        rmap().migrate_frames(&HypVms, &HypFrames, chunk, &mut out);
        report.batches += 1;
        for r in &out {
            match r {
                Ok(_) => report.done += 1,
                Err(s) => report.skip(*s),
            }
        }
    };
    for at in folios {
        if rmap().migrate_folio(&HypVms, &HypFrames, pfns[at]).is_ok() {
            report.done += FOLIO as u64;
            report.batches += 1;
            FOLIOS_MIGRATED.fetch_add(1, Ordering::Relaxed);
        } else {
            run(&pfns[at..at + FOLIO], report);
        }
    }
    rest.chunks(batch.max(1)).for_each(|c| run(c, report));
    MIGRATED.fetch_add(report.done - before, Ordering::Relaxed);
}

/// Frames in a folio (a 2 MiB block's run).
const FOLIO: usize = rmap::folio::FOLIO_PAGES as usize;

/// Where in `pfns` a whole folio that blocks map starts (its 512 frames
/// listed in order), and every frame not in one.
fn split_folios(pfns: &[Pfn]) -> (Vec<usize>, Vec<Pfn>) {
    let (mut folios, mut rest) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < pfns.len() {
        let head = pfns[i];
        let whole = head.is_aligned(rmap::folio::FOLIO_PAGES)
            && rmap().frames().entire_mapcount(head) > 0
            && pfns.len() - i >= FOLIO
            && (1..FOLIO).all(|k| pfns[i + k] == head + k as u64);
        if whole {
            folios.push(i);
            i += FOLIO;
        } else {
            rest.push(head);
            i += 1;
        }
    }
    (folios, rest)
}

/// The frames mapped by `vm` in `[start, end)` (at most `max`).
pub fn vm_frames(vm: &VmMemory, start: Ipa, end: Ipa, max: usize) -> Vec<Pfn> {
    let mut pfns = Vec::new();
    let s2 = vm.lock();
    let mut from = start;
    while pfns.len() < max {
        let Some((ipa, entry)) = s2.next_entry(from, end) else {
            break;
        };
        if let PageState::Mapped { pfn, .. } = entry {
            pfns.push(pfn);
        }
        from = ipa + PAGE_SIZE;
    }
    pfns
}

/// Moves every frame `vm` maps in `[start, end)` to a new frame.
pub fn migrate_vm(vm: &VmMemory, start: Ipa, end: Ipa, batch: usize) -> Report {
    let mut report = Report::default();
    let mut from = start;
    while from < end {
        // Collect under the stage-2 lock, migrate without it.
        let chunk_end = end.min(from + 2048 * PAGE_SIZE);
        let pfns = vm_frames(vm, from, chunk_end, usize::MAX);
        migrate_pfns(&pfns, batch, &mut report);
        from = chunk_end;
    }
    report
}

/// What is left in an evacuated range.
pub struct Left {
    /// Guest frames that could not be moved yet.
    pub guest: usize,
    /// Frames nothing can move: stage-2 tables, the hypervisor's own.
    pub unmovable: usize,
}

fn left_in(start: u64, end: u64) -> (Vec<Pfn>, Left) {
    let used = frames::get().used_in(start, end, usize::MAX);
    let mut guest = Vec::new();
    let mut unmovable = 0;
    for pa in used {
        let pfn = Pa::new(pa).pfn();
        match rmap().frames().get(pfn) {
            Some(f) if f.refcount() > 0 => guest.push(pfn),
            _ => unmovable += 1,
        }
    }
    let left = Left {
        guest: guest.len(),
        unmovable,
    };
    (guest, left)
}

/// Takes `[start, end)` offline and moves every guest frame out of it,
/// retrying busy frames a few rounds. Returns what moved and what is left.
pub fn evacuate(start: u64, end: u64, batch: usize) -> (Report, Left) {
    frames::get().offline(start, end);
    let mut report = Report::default();
    const ROUNDS: usize = 20;
    for round in 0..ROUNDS {
        let (guest, _) = left_in(start, end);
        if guest.is_empty() {
            break;
        }
        let mut r = Report::default();
        migrate_pfns(&guest, batch, &mut r);
        report.done += r.done;
        report.batches += r.batches;
        // Report the skips of the last round: what may still be left.
        report.skipped = r.skipped;
        if r.skipped_total() > 0 && round + 1 < ROUNDS {
            // Let whoever holds them (a fault, a fork) finish: 1 ms.
            let until = crate::arch::timer::now() + crate::arch::timer::frequency() / 1000;
            while crate::arch::timer::now() < until {
                core::hint::spin_loop();
            }
        }
    }
    (report, left_in(start, end).1)
}

/// Puts `[start, end)` back into the allocator.
pub fn online(start: u64, end: u64) -> usize {
    frames::get().online(start, end)
}

/// The access-bit clock: scans frames from the hand, gives referenced ones a
/// second chance (their access flags are cleared in every mapper), and
/// reclaims up to `pages` cold ones in batches of `batch`. Scans at most two
/// full rounds. Returns (report, frames scanned, referenced survivors).
pub fn reclaim(pages: u64, batch: usize) -> (Report, u64, u64) {
    let table = rmap().frames();
    let n = table.len() as u64;
    let base = table.base();
    let mut report = Report::default();
    let (mut scanned, mut young) = (0u64, 0u64);
    let mut candidates = Vec::with_capacity(batch);
    let mut out = Vec::with_capacity(batch);
    let flush = |candidates: &mut Vec<Pfn>, out: &mut Vec<_>, report: &mut Report| {
        out.clear();
        rmap().reclaim_frames(&HypVms, &HypFrames, &STORE, candidates, out);
        report.batches += 1;
        for r in out.iter() {
            match r {
                Ok(_) => report.done += 1,
                Err(s) => report.skip(*s),
            }
        }
        candidates.clear();
    };
    while report.done < pages && scanned < 2 * n {
        let want = ((pages - report.done) as usize).min(batch.max(1));
        let i = HAND.fetch_add(1, Ordering::Relaxed) % n;
        scanned += 1;
        let pfn = base + i;
        let f = table.frame(pfn);
        // A merged frame has no anon_vma (its mappers are in several
        // families) but is reclaimed like any other (`rmap`'s ksm_move.rs).
        let anon = f.anon_slot().is_some() || f.is_merged();
        if f.mapcount() == 0 || !anon || f.is_locked() {
            continue;
        }
        if rmap().referenced(pfn, &HypVms) > 0 {
            young += 1;
            continue;
        }
        candidates.push(pfn);
        if candidates.len() >= want {
            flush(&mut candidates, &mut out, &mut report);
        }
    }
    if !candidates.is_empty() {
        flush(&mut candidates, &mut out, &mut report);
    }
    RECLAIMED.fetch_add(report.done, Ordering::Relaxed);
    (report, scanned, young)
}

/// (low, high) watermarks in free frames.
pub fn watermarks() -> (usize, usize) {
    let low = (frames::get().total_count() / 64).max(256);
    (low, low * 2)
}

/// Called before a fault allocates: below the low watermark, reclaim up to
/// the high one (one CPU at a time; the others go on and use the reserve).
pub fn balance() {
    let (low, high) = watermarks();
    let free = frames::get().free_count();
    if free >= low || RECLAIMING.swap(true, Ordering::Acquire) {
        return;
    }
    WATERMARK_RUNS.fetch_add(1, Ordering::Relaxed);
    reclaim((high - free) as u64, BATCH);
    RECLAIMING.store(false, Ordering::Release);
}

/// An allocation failed: reclaim (or wait for the CPU that is reclaiming)
/// and say whether the fault should simply be retried.
pub fn reclaim_for_fault() -> bool {
    if RECLAIMING.swap(true, Ordering::Acquire) {
        while RECLAIMING.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
        return frames::get().free_count() > 0;
    }
    let (_, high) = watermarks();
    let (r, _, _) = reclaim(high as u64, BATCH);
    RECLAIMING.store(false, Ordering::Release);
    r.done > 0
}
