//! A save's walk on two CPUs: the saving CPU and a helper, background work
//! that an idle CPU (or a guest's WFI) picks up.
//!
//! Under QEMU's TCG a save's time is mostly the walk's loads and stores
//! (zero checks, the copies with their checksums: 35-60 ms of a 100 ms idle
//! save), while the second CPU idles with the saved guest. So the pages
//! left after the LZ4 trial are split in chunks that either CPU claims
//! (an atomic cursor: a CPU that never gets round to helping leaves all of
//! them to the saving CPU). Each stages its chunks into its own `Lane`.
//!
//! Both CPUs read the save's one frozen snapshot: a window holds its
//! stage-2 lock only to pin the window's frames (`walk`), and stages them
//! after releasing it, so neither CPU waits for the other's copies. (The
//! helper used to fork a snapshot of its own, to have a lock of its own:
//! 1-20 ms before it could start, and a second snapshot to destroy.)
//!
//! Only the saving CPU touches the writer and the disk: the helper's sealed
//! batches (and the pages it could not read, swapped or migrating) come to
//! it through [`Shared`], at most [`MAX_QUEUED`] batches ahead, and it
//! appends them between its own windows. The save returns only once the
//! helper has let go of everything ([`Helping`]'s drop), on every path.

use super::save::Split;
use super::walk::{put_unread, window, LaneOut, WINDOW};
use super::{disk, PersistError};
use crate::vm::sched::Background;
use crate::vm::Vm;
use alloc::collections::VecDeque;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use snapfile::{Lane, Sealed, Writer};
use spin::Mutex;

/// Pages a CPU claims at a time: 2 MiB, 128 chunks of a 256 MiB VM (a claim
/// is one atomic add; the smaller the chunk, the less the saving CPU waits
/// for the helper's last one).
const CHUNK: u64 = 512;
/// Fewest pages left after the trial worth a helper: a large VM (64 MiB and
/// more; the test guest's 32 MiB stays on one CPU). Set when the helper
/// forked a snapshot of its own first; not measured again since it reads the
/// save's.
pub(super) const PARALLEL_MIN: u32 = 16384;
/// Sealed batches the helper may have waiting for the saving CPU (runs
/// written in place among them: those cost no memory, only their pins).
const MAX_QUEUED: usize = 8;

/// Longest a CPU sleeps waiting for the other one (the helper for room
/// among the sealed batches, the saving CPU for the helper's last ones).
const NAP_US: u64 = 50;

/// Waits a little for the other CPU, asleep rather than spinning: under
/// QEMU's TCG a spinning CPU keeps a host core busy, and the save is bound
/// by the host's cores (the device's writes are host threads' copies). In
/// WFI for at most [`NAP_US`], only the urgent interrupts (the EL2 timer,
/// the disk) ending it: a pending kick would end it at once.
fn nap() {
    crate::arch::gic::urgent_only(|| crate::arch::timer::wfi_for(NAP_US));
}

/// What the two CPUs share during one save. Its locks are leaves: each is
/// held for a push or a pop, never across a walk or a device request.
pub(super) struct Shared {
    /// The next chunk's first page, and the end of the pages to split.
    cursor: AtomicU64,
    end: u64,
    /// The helper's sealed batches, and pages it could not read.
    sealed: Mutex<VecDeque<Sealed>>,
    queued: AtomicUsize,
    slow: Mutex<Vec<u32>>,
    /// The saving CPU gave up (an error): the helper stops at its next window.
    cancel: AtomicBool,
    /// The helper let go of everything.
    done: AtomicBool,
    /// Timer ticks the helper slept waiting for room in `sealed`.
    full: AtomicU64,
    /// The helper's result: its first error, its pages, the timer ticks it
    /// spent, and those between the job's posting and a CPU taking it.
    report: Mutex<(Option<PersistError>, u64, u64, u64)>,
}

impl Shared {
    fn new(from: u32, to: u32) -> Self {
        Shared {
            cursor: AtomicU64::new(u64::from(from)),
            end: u64::from(to),
            sealed: Mutex::new(VecDeque::new()),
            queued: AtomicUsize::new(0),
            slow: Mutex::new(Vec::new()),
            cancel: AtomicBool::new(false),
            done: AtomicBool::new(false),
            full: AtomicU64::new(0),
            report: Mutex::new((None, 0, 0, 0)),
        }
    }

    /// The next chunk `[first, end)`, if any is left.
    fn claim(&self) -> Option<(u32, u32)> {
        let first = self.cursor.fetch_add(CHUNK, Ordering::AcqRel);
        // Both below `end`, a page count of the VM (`u32`).
        (first < self.end).then(|| (first as u32, (first + CHUNK).min(self.end) as u32))
    }
}

/// The helper's job, waiting for a CPU: the save's snapshot, a lane, and
/// when it was posted (timer ticks).
struct Job {
    snap: Arc<Vm>,
    shared: Arc<Shared>,
    lane: Lane,
    posted: u64,
}

/// The job of the save in progress (saves are console commands: one at a
/// time). Lock level: a leaf.
static JOB: Mutex<Option<Job>> = Mutex::new(None);
/// Whether `JOB` holds one (asked at guest exits, without the lock).
static WAITING: AtomicBool = AtomicBool::new(false);

static WORK: Background = Background {
    ready: || WAITING.load(Ordering::Relaxed),
    step,
};

/// The job back from `JOB` if no CPU took it.
fn withdraw() -> Option<Job> {
    let job = JOB.lock().take();
    WAITING.store(false, Ordering::Relaxed);
    job
}

/// The saving CPU's side of one parallel walk. Dropped before the helper is
/// done (an error), it stops the helper and waits until it let go of the
/// save's snapshot, its own and its batches, so the save never returns with
/// a helper still reading (or pinning) the snapshot.
struct Helping {
    shared: Arc<Shared>,
    finished: bool,
}

impl Drop for Helping {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.shared.cancel.store(true, Ordering::Release);
        if withdraw().is_some() {
            return;
        }
        while !self.shared.done.load(Ordering::Acquire) {
            self.shared.sealed.lock().clear();
            self.shared.queued.store(0, Ordering::Release);
            core::hint::spin_loop();
        }
    }
}

/// Stages the pages `[from, to)` of `snap` into `w` on this CPU and, if one
/// comes, a helper CPU.
pub(super) fn parallel(
    w: &mut Writer<'_>,
    dev: &mut disk::Dev,
    snap: &Arc<Vm>,
    (from, to): (u32, u32),
    split: &mut Split,
) -> Result<(), PersistError> {
    let shared = Arc::new(Shared::new(from, to));
    let mut helping = Helping {
        shared: shared.clone(),
        finished: false,
    };
    *JOB.lock() = Some(Job {
        snap: snap.clone(),
        shared: shared.clone(),
        lane: untimed_lane(w),
        posted: crate::arch::timer::now(),
    });
    WAITING.store(true, Ordering::Relaxed);
    crate::vm::sched::set_background(&WORK);
    let mut out = LaneOut {
        lane: untimed_lane(w),
        sealed: Vec::new(),
    };
    let mut me = Saver {
        w,
        dev,
        snap,
        walk: 0,
        slow: 0,
        waited: 0,
    };
    while let Some((first, end)) = shared.claim() {
        me.chunk(&shared, &mut out, first, end)?;
    }
    out.sealed.extend(out.lane.seal());
    me.append(&mut out.sealed)?;
    me.wait_helper(&shared)?;
    helping.finished = true;
    let (err, pages, ticks, start_ticks) = core::mem::take(&mut *shared.report.lock());
    let us = crate::arch::timer::ticks_to_us;
    (split.helper_pages, split.helper_us) = (pages, us(ticks));
    split.helper_start_us = us(start_ticks);
    split.naps = (us(shared.full.load(Ordering::Relaxed)), us(me.waited));
    (split.walk, split.slow) = (split.walk + us(me.walk), split.slow + us(me.slow));
    split.lane = out.lane.costs();
    err.map_or(Ok(()), Err)
}

/// The saving CPU during a parallel walk, and the timer ticks it spent in
/// windows, on pages they could not read, and waiting for the helper.
struct Saver<'a, 'w, 's> {
    w: &'a mut Writer<'w>,
    dev: &'a mut disk::Dev,
    snap: &'s Arc<Vm>,
    walk: u64,
    slow: u64,
    /// Asleep waiting for the helper's last batches.
    waited: u64,
}

impl Saver<'_, '_, '_> {
    /// No chunk is left: takes the job back if no CPU picked it up, else
    /// takes in the helper's batches until it is done.
    fn wait_helper(&mut self, shared: &Shared) -> Result<(), PersistError> {
        if withdraw().is_none() {
            while !shared.done.load(Ordering::Acquire) {
                self.drain(shared)?;
                let t0 = crate::arch::timer::now();
                nap();
                self.waited += crate::arch::timer::now().wrapping_sub(t0);
            }
        }
        self.drain(shared)
    }

    /// Stages chunk `[first, end)` window by window, appending its sealed
    /// batches and the helper's between windows.
    fn chunk(
        &mut self,
        shared: &Shared,
        out: &mut LaneOut,
        first: u32,
        end: u32,
    ) -> Result<(), PersistError> {
        let now = crate::arch::timer::now;
        let mut g = first;
        while g < end {
            let t0 = now();
            let (next, win) = window(&self.snap.mem, g, (g + WINDOW).min(end), end, out);
            self.walk += now().wrapping_sub(t0);
            if let Some(e) = win.failed {
                return Err(e.into());
            }
            self.slow(&win.slow)?;
            self.append(&mut out.sealed)?;
            self.drain(shared)?;
            g = next;
        }
        Ok(())
    }

    /// Appends sealed batches to the image (queued to the disk).
    fn append(&mut self, sealed: &mut Vec<Sealed>) -> Result<(), PersistError> {
        for b in sealed.drain(..) {
            self.w.append(self.dev, b)?;
        }
        Ok(())
    }

    /// Takes in what the helper has ready: its batches and unread pages.
    fn drain(&mut self, shared: &Shared) -> Result<(), PersistError> {
        loop {
            let next = shared.sealed.lock().pop_front();
            let Some(b) = next else { break };
            shared.queued.fetch_sub(1, Ordering::AcqRel);
            self.w.append(self.dev, b)?;
        }
        let slow = core::mem::take(&mut *shared.slow.lock());
        self.slow(&slow)
    }

    /// Pages no window could read, through the writer (`put_unread`).
    fn slow(&mut self, pages: &[u32]) -> Result<(), PersistError> {
        self.slow += put_unread(self.w, self.dev, &self.snap.mem, pages)?;
        Ok(())
    }
}

/// The helper: takes the job (one CPU) and stages chunks of the save's
/// snapshot until none is left or the save gives up.
fn step() {
    let Some(Job {
        snap,
        shared,
        lane,
        posted,
    }) = withdraw()
    else {
        return;
    };
    let t0 = crate::arch::timer::now();
    let mut pages = 0;
    let mut out = LaneOut {
        lane,
        sealed: Vec::new(),
    };
    let err = help(&snap, &shared, &mut out, &mut pages).err();
    // Let go of the snapshot before saying so: the save hands it to the
    // reaper once the helper is done.
    drop(snap);
    let ticks = crate::arch::timer::now().wrapping_sub(t0);
    *shared.report.lock() = (err, pages, ticks, t0.wrapping_sub(posted));
    shared.done.store(true, Ordering::Release);
}

/// The helper's chunks, staged from the save's snapshot into `out`.
fn help(
    snap: &Vm,
    shared: &Shared,
    out: &mut LaneOut,
    pages: &mut u64,
) -> Result<(), PersistError> {
    'chunks: while let Some((first, end)) = shared.claim() {
        let mut g = first;
        while g < end {
            if shared.cancel.load(Ordering::Acquire) {
                break 'chunks;
            }
            let (next, win) = window(&snap.mem, g, (g + WINDOW).min(end), end, out);
            if let Some(e) = win.failed {
                return Err(e.into());
            }
            *pages += u64::from(win.staged);
            shared.slow.lock().extend(win.slow);
            hand_over(shared, &mut out.sealed);
            g = next;
        }
    }
    out.sealed.extend(out.lane.seal());
    hand_over(shared, &mut out.sealed);
    Ok(())
}

/// Queues the helper's sealed batches for the saving CPU, waiting (asleep)
/// while it has [`MAX_QUEUED`] unappended (or not at all once it gave up).
fn hand_over(shared: &Shared, sealed: &mut Vec<Sealed>) {
    for b in sealed.drain(..) {
        while shared.queued.load(Ordering::Acquire) >= MAX_QUEUED {
            if shared.cancel.load(Ordering::Acquire) {
                return;
            }
            let t0 = crate::arch::timer::now();
            nap();
            let slept = crate::arch::timer::now().wrapping_sub(t0);
            shared.full.fetch_add(slept, Ordering::Relaxed);
        }
        shared.sealed.lock().push_back(b);
        shared.queued.fetch_add(1, Ordering::AcqRel);
    }
}

/// A lane for one CPU's share of the walk, its pages not timed one by one:
/// `walk::collect` times each window's staging instead (three timer reads a
/// page were a tenth of a raw page's staging under TCG).
fn untimed_lane(w: &Writer<'_>) -> Lane {
    let mut lane = w.lane();
    lane.set_clock(None);
    lane
}
