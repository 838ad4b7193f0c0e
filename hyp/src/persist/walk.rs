//! A full image's pages: the frozen snapshot's stage 2 walked leaf by leaf
//! in windows (absent ranges skipped by the table walk). Each window's
//! mapped frames are pinned under the snapshot's stage-2 lock, then staged
//! with the lock released: zero-checked and checksummed, and either copied
//! into a batch (LZ4 on, or a short run) or, for a run of consecutive
//! non-zero frames, written to the disk where they lie, the run's pins held
//! until the device is done with it (`PinnedRun`). Guest RAM comes in 2 MiB
//! blocks of contiguous frames (the first-touch fault), so most of an idle
//! Linux image is such runs.
//!
//! The first pages go through the writer itself while LZ4 is on trial
//! (`lz4judge`); the rest is split between this CPU and another one
//! (`helper`), each staging into its own lane.

use super::lz4judge::{judge_lz4, lz4_verdict_cached, window_cap};
use super::save::{read_page, Split};
use super::{disk, PersistError};
use crate::mm::glue::{rmap, HypFrames};
use crate::mm::{frames::PAGE_SIZE, VmMemory};
use crate::vm::Vm;
use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use arrayvec::ArrayVec;
use core::ops::Range;
use rmap::{Ipa, PageState, Pfn, Stage2, Stage2Locked};
use snapfile::{Gpn, Held, Lane, Sealed, Writer};

const PAGE: usize = PAGE_SIZE as usize;

/// Most pages a window pins under one hold of the snapshot's stage-2 lock
/// and then stages with it released (fewer when the writer's batch is
/// nearer full): 1 MiB, so a run written in place is at most one device
/// request of the largest size (`snapfile::BATCH`).
pub(super) const WINDOW: u32 = 256;
const _: () = assert!(WINDOW.is_multiple_of(64), "Pinned::moved has a bit a page");
const _: () = assert!(
    WINDOW as usize * PAGE <= snapfile::BATCH,
    "a run is one request"
);

/// Fewest consecutive non-zero frames written in place (one device request
/// of their own); shorter runs are copied into the batch, where a request's
/// cost (a notify, a completion) is shared.
const MIN_RUN: usize = 8;

/// What one window's walk did: pages staged (zero ones included, which the
/// writer skips), those it could not read (swapped or migrating) for
/// `read_page`, and the first error of the staging.
#[derive(Default)]
pub(super) struct Window {
    pub staged: u32,
    pub slow: Vec<u32>,
    pub failed: Option<snapfile::Error>,
}

/// Where a window's pages are staged: the writer itself, or a lane.
pub(super) trait Stager {
    fn stage_page(&mut self, gpn: Gpn, data: &[u8; PAGE]) -> Result<(), snapfile::Error>;
    /// Whether pages are stored raw, so runs may be written in place.
    fn in_place(&self) -> bool;
    /// A run of pages written where they lie (`data`: page `i` is `gpns[i]`).
    fn stage_run(&mut self, gpns: &[Gpn], data: Box<dyn Held>) -> Result<(), snapfile::Error>;
    /// A zero page found by the walk (not stored in a full image).
    fn skip_zero(&mut self, gpn: Gpn) -> Result<(), snapfile::Error>;
    /// The timer ticks a window's staging took (a stager that does not time
    /// each page itself records them).
    fn staged_for(&mut self, _ticks: u64) {}
}

/// The writer itself as a stager, with the disk its runs are queued to.
pub(super) struct Serial<'a, 'w> {
    pub w: &'a mut Writer<'w>,
    pub dev: &'a mut disk::Dev,
}

impl Stager for Serial<'_, '_> {
    fn stage_page(&mut self, gpn: Gpn, data: &[u8; PAGE]) -> Result<(), snapfile::Error> {
        self.w.stage(gpn, data)
    }

    fn in_place(&self) -> bool {
        !self.w.compressing()
    }

    fn stage_run(&mut self, gpns: &[Gpn], data: Box<dyn Held>) -> Result<(), snapfile::Error> {
        self.w.run(self.dev, gpns, data)
    }

    fn skip_zero(&mut self, gpn: Gpn) -> Result<(), snapfile::Error> {
        self.w.absent(gpn)
    }
}

/// A lane and the batches it sealed during a window (handed on after it).
pub(super) struct LaneOut {
    pub lane: Lane,
    pub sealed: Vec<Sealed>,
}

impl Stager for LaneOut {
    fn stage_page(&mut self, gpn: Gpn, data: &[u8; PAGE]) -> Result<(), snapfile::Error> {
        let full = self.lane.stage(gpn, data)?;
        self.sealed.extend(full);
        Ok(())
    }

    fn in_place(&self) -> bool {
        !self.lane.compressing()
    }

    fn stage_run(&mut self, gpns: &[Gpn], data: Box<dyn Held>) -> Result<(), snapfile::Error> {
        let run = self.lane.run(gpns, data)?;
        self.sealed.push(run);
        Ok(())
    }

    fn skip_zero(&mut self, gpn: Gpn) -> Result<(), snapfile::Error> {
        self.lane.skip(gpn)
    }

    fn staged_for(&mut self, ticks: u64) {
        self.lane.note_staging(ticks);
    }
}

/// Every page of a full image (see the module doc).
pub(super) fn put_all(
    w: &mut Writer<'_>,
    dev: &mut disk::Dev,
    snap: &Arc<Vm>,
    ram_pages: u32,
    split: &mut Split,
) -> Result<(), PersistError> {
    let mem = &snap.mem;
    let now = crate::arch::timer::now;
    let (mut walk, mut slow) = (0, 0);
    let before = w.costs();
    if let Some(v) = lz4_verdict_cached() {
        split.lz4_verdict = Some(v);
        split.lz4_cached = true;
        w.set_compress(v.0);
    }
    let mut g = 0;
    let parallel = |g: u32, split: &Split| {
        split.lz4_verdict.is_some() && ram_pages - g >= super::helper::PARALLEL_MIN
    };
    while g < ram_pages && !parallel(g, split) {
        let room = (w.room() / PAGE).max(1) as u32;
        let cap = WINDOW.min(room).min(window_cap(w, split));
        let t0 = now();
        let mut serial = Serial { w, dev };
        let (next, win) = window(mem, g, (g + cap).min(ram_pages), ram_pages, &mut serial);
        walk += now().wrapping_sub(t0);
        if let Some(e) = win.failed {
            return Err(e.into());
        }
        slow += put_unread(w, dev, mem, &win.slow)?;
        w.write_staged(dev)?;
        judge_lz4(w, split);
        g = next;
    }
    // The rest of the walk: the time in it less the writer's own zero
    // checks, LZ4 and checksums (with their fused copies). Not timed per
    // page: under TCG each timer read is a helper call.
    let us = crate::arch::timer::ticks_to_us;
    (split.walk, split.slow) = (us(walk), us(slow));
    if g < ram_pages {
        super::helper::parallel(w, dev, snap, (g, ram_pages), split)?;
    }
    let (c, l) = (w.costs(), split.lane);
    let parts = (c.zero + c.lz4 + c.checksum + l.zero + l.lz4 + l.checksum)
        - (before.zero + before.lz4 + before.checksum);
    split.copy = split.walk.saturating_sub(us(parts));
    Ok(())
}

/// Pages no window could read (swapped or migrating): faulted into the
/// frozen VM one by one and put in the image through the writer; the timer
/// ticks it took.
pub(super) fn put_unread(
    w: &mut Writer<'_>,
    dev: &mut disk::Dev,
    mem: &VmMemory,
    pages: &[u32],
) -> Result<u64, PersistError> {
    let t0 = crate::arch::timer::now();
    let mut buf = [0u8; PAGE];
    for &gpn in pages {
        if read_page(mem, gpn, &mut buf)? {
            w.page(dev, Gpn(gpn), &buf)?;
        }
    }
    Ok(crate::arch::timer::now().wrapping_sub(t0))
}

/// Stages the window `[from, end)` of a frozen VM's mapped pages into `s`;
/// where the next window starts (past an absent range, up to `limit`).
pub(super) fn window<S: Stager>(
    mem: &VmMemory,
    from: u32,
    end: u32,
    limit: u32,
    s: &mut S,
) -> (u32, Window) {
    let win = collect(mem, from, end, s);
    let next = match win.staged == 0 && win.slow.is_empty() {
        // Nothing here: jump to the next present entry.
        true => next_present(mem, end, limit).unwrap_or(limit),
        false => end,
    };
    (next, win)
}

/// A window's mapped frames, pinned under the snapshot's stage-2 lock
/// (`Rmap::pin_frame`) so they can be read after it is released: migration,
/// reclaim and merging leave a pinned frame in place, and one unmapped
/// meanwhile is not freed before its pin goes. Unpinned when dropped, on
/// every path, except those whose pins moved to a [`PinnedRun`] (`moved`:
/// a bit a page).
#[derive(Default)]
struct Pinned {
    pages: ArrayVec<(u32, Pfn), { WINDOW as usize }>,
    moved: [u64; WINDOW as usize / 64],
}

impl Pinned {
    fn moved(&self, i: usize) -> bool {
        self.moved[i / 64] & (1 << (i % 64)) != 0
    }

    /// Pages `r`'s pins moved to a run: not this guard's to drop.
    fn move_out(&mut self, r: Range<usize>) {
        for i in r {
            self.moved[i / 64] |= 1 << (i % 64);
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        for (i, &(_, pfn)) in self.pages.iter().enumerate() {
            if !self.moved(i) {
                rmap().put_frame(pfn, &HypFrames);
            }
        }
    }
}

/// Consecutive frames written to the disk where they lie, each holding a
/// pin of [`Pinned`]'s until the device is done with them: the disk drops a
/// queued write's payload only once the write is complete (`Held`), and
/// every error path drops it unsent. So no frame the device may still read
/// is freed, moved or merged, nor written: the pins may outlive the save's
/// snapshot (torn down while the last runs are in flight), and a write by
/// the VM to a frame it alone maps again copies it while a pin is held
/// (`Rmap::fault_cow` reuses a frame only at one mapping and no pin;
/// `rmap/tests/pin.rs`).
struct PinnedRun {
    first: Pfn,
    pages: usize,
}

impl Held for PinnedRun {
    fn bytes(&self) -> &[u8] {
        // SAFETY: `pages` consecutive frames from `first`, each pinned by
        // this run until it drops: allocated and in place, identity mapped
        // (contiguous PAs are contiguous VAs), and not written (a frozen
        // VM's pages: its sharers copy on write).
        unsafe {
            core::slice::from_raw_parts(self.first.pa().raw() as *const u8, self.pages * PAGE)
        }
    }
}

impl Drop for PinnedRun {
    fn drop(&mut self) {
        for pfn in self.first.run(self.pages as u64) {
            rmap().put_frame(pfn, &HypFrames);
        }
    }
}

/// A pinned frame's bytes.
///
/// # Safety
/// `pfn` must stay pinned (allocated and in place) and unwritten while the
/// result lives: a frame of a frozen VM pinned by [`Pinned`] or a
/// [`PinnedRun`].
unsafe fn frame<'a>(pfn: Pfn) -> &'a [u8; PAGE] {
    // SAFETY: the caller's; RAM is identity mapped at EL2.
    unsafe { &*(pfn.pa().raw() as *const [u8; PAGE]) }
}

/// Stages the window `[from, end)` of a frozen VM's mapped pages into `s`.
/// The stage-2 lock is held only to pin the window's frames: the zero
/// checks, checksums and copies are done after it, so the saving CPU and its
/// helper read one snapshot without waiting for each other's copies.
fn collect<S: Stager>(mem: &VmMemory, from: u32, end: u32, s: &mut S) -> Window {
    let mut win = Window::default();
    let mut pinned = Pinned::default();
    let base = Ipa::new(mem.ram.base);
    let ipa = |g: u32| base + u64::from(g) * PAGE_SIZE;
    // A read-only walk: the visitor returns no replacement.
    mem.lock()
        .update_leaves(ipa(from), ipa(end), &mut |at, pages, entry| {
            let first = ((at.raw() - base.raw()) / PAGE_SIZE) as u32;
            for i in 0..pages {
                let gpn = first + i as u32;
                match entry.page(i) {
                    // Mapped under the lock we hold: allocated, so the pin
                    // takes. A window has at most WINDOW pages (the slow
                    // path would read any other one).
                    PageState::Mapped { pfn, .. }
                        if !pinned.pages.is_full() && rmap().pin_frame(pfn) =>
                    {
                        pinned.pages.push((gpn, pfn));
                    }
                    // Absent and the shared zero page: both read as zeroes.
                    PageState::Invalid | PageState::ZeroPage => {}
                    _ => win.slow.push(gpn),
                }
            }
            None
        });
    let t0 = crate::arch::timer::now();
    match stage_pinned(&mut pinned, s) {
        Ok(()) => win.staged = pinned.pages.len() as u32,
        Err(e) => win.failed = Some(e),
    }
    s.staged_for(crate::arch::timer::now().wrapping_sub(t0));
    win
}

/// Stages a window's pinned frames into `s`: with LZ4 off, each run of at
/// least [`MIN_RUN`] consecutive non-zero frames in place (its pins move to
/// a [`PinnedRun`]), every other page copied (or skipped if zero).
fn stage_pinned<S: Stager>(pinned: &mut Pinned, s: &mut S) -> Result<(), snapfile::Error> {
    if !s.in_place() {
        return copy(&pinned.pages, s);
    }
    let mut start = 0;
    for i in 0..pinned.pages.len() {
        let (gpn, pfn) = pinned.pages[i];
        // SAFETY: pinned by `pinned`, which outlives this use.
        let zero = snapfile::is_zero_page(unsafe { frame(pfn) });
        let joins = i > start && pinned.pages[i - 1].1 + 1 == pfn;
        if zero || !joins {
            put_run(pinned, start..i, s)?;
            start = i;
        }
        if zero {
            s.skip_zero(Gpn(gpn))?;
            start = i + 1;
        }
    }
    put_run(pinned, start..pinned.pages.len(), s)
}

/// Stages `pages` of a window's [`Pinned`] (their pins held by it
/// meanwhile) through the stager's copy.
fn copy<S: Stager>(pages: &[(u32, Pfn)], s: &mut S) -> Result<(), snapfile::Error> {
    for &(gpn, pfn) in pages {
        // SAFETY: pinned by the window's `Pinned`, which outlives this call.
        s.stage_page(Gpn(gpn), unsafe { frame(pfn) })?;
    }
    Ok(())
}

/// Pages `r` of the window, consecutive non-zero frames: in place if they
/// are at least [`MIN_RUN`], else copied.
fn put_run<S: Stager>(
    pinned: &mut Pinned,
    r: Range<usize>,
    s: &mut S,
) -> Result<(), snapfile::Error> {
    if r.len() < MIN_RUN {
        return copy(&pinned.pages[r], s);
    }
    let gpns: ArrayVec<Gpn, { WINDOW as usize }> = pinned.pages[r.clone()]
        .iter()
        .map(|&(g, _)| Gpn(g))
        .collect();
    // The pins move to the run: from here it alone drops them (when the
    // device is done, or unsent on an error).
    pinned.move_out(r.clone());
    let run = PinnedRun {
        first: pinned.pages[r.start].1,
        pages: r.len(),
    };
    s.stage_run(&gpns, Box::new(run))
}

/// The first page at or after `from` with a stage-2 entry, if any.
fn next_present(mem: &VmMemory, from: u32, ram_pages: u32) -> Option<u32> {
    let base = Ipa::new(mem.ram.base);
    let ipa = |g: u32| base + u64::from(g) * PAGE_SIZE;
    let (at, _) = mem.lock().next_entry(ipa(from), ipa(ram_pages))?;
    Some(((at.raw() - base.raw()) / PAGE_SIZE) as u32)
}
