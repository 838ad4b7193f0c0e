//! A full image's pages: the frozen snapshot's stage 2 walked leaf by leaf
//! in windows (absent ranges skipped by the table walk). Each window's
//! mapped frames are pinned under the snapshot's stage-2 lock, then staged
//! in place with the lock released (zero check, checksum and the one copy),
//! and the full batches queued to the device while the next window is
//! walked.
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
use alloc::sync::Arc;
use alloc::vec::Vec;
use arrayvec::ArrayVec;
use rmap::{Ipa, PageState, Pfn, Stage2, Stage2Locked};
use snapfile::{Gpn, Lane, Sealed, Writer};

const PAGE: usize = PAGE_SIZE as usize;

/// Most pages a walk stages under one hold of the snapshot's stage-2 lock
/// (and fewer when the writer's batch is nearer full): the lock is held for
/// their copies into the batch buffer, and the device requests are made
/// with it released.
pub(super) const WINDOW: u32 = 128;

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
    /// The timer ticks a window's staging took (a stager that does not time
    /// each page itself records them).
    fn staged_for(&mut self, _ticks: u64) {}
}

impl Stager for Writer<'_> {
    fn stage_page(&mut self, gpn: Gpn, data: &[u8; PAGE]) -> Result<(), snapfile::Error> {
        self.stage(gpn, data)
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
        let (next, win) = window(mem, g, (g + cap).min(ram_pages), ram_pages, w);
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
/// every path.
#[derive(Default)]
struct Pinned(ArrayVec<(u32, Pfn), { WINDOW as usize }>);

impl Drop for Pinned {
    fn drop(&mut self) {
        for &(_, pfn) in &self.0 {
            rmap().put_frame(pfn, &HypFrames);
        }
    }
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
                        if !pinned.0.is_full() && rmap().pin_frame(pfn) =>
                    {
                        pinned.0.push((gpn, pfn));
                    }
                    // Absent and the shared zero page: both read as zeroes.
                    PageState::Invalid | PageState::ZeroPage => {}
                    _ => win.slow.push(gpn),
                }
            }
            None
        });
    let t0 = crate::arch::timer::now();
    for &(gpn, pfn) in &pinned.0 {
        // SAFETY: the frame is pinned (`Pinned`): it stays allocated, and in
        // place, until the pin drops after this loop; nothing writes a frozen
        // VM's pages (its sharers copy on write), and a frame migrated or
        // unmapped meanwhile is only read by us. Identity mapped.
        let src = unsafe { &*(pfn.pa().raw() as *const [u8; PAGE]) };
        if let Err(e) = s.stage_page(Gpn(gpn), src) {
            win.failed = Some(e);
            break;
        }
        win.staged += 1;
    }
    s.staged_for(crate::arch::timer::now().wrapping_sub(t0));
    win
}

/// The first page at or after `from` with a stage-2 entry, if any.
fn next_present(mem: &VmMemory, from: u32, ram_pages: u32) -> Option<u32> {
    let base = Ipa::new(mem.ram.base);
    let ipa = |g: u32| base + u64::from(g) * PAGE_SIZE;
    let (at, _) = mem.lock().next_entry(ipa(from), ipa(ram_pages))?;
    Some(((at.raw() - base.raw()) / PAGE_SIZE) as u32)
}
