//! Runs of pages written where they lie (`Held`, `Writer::run`, `Lane::run`): mixed with
//! staged pages and lane batches they restore exactly; each is dropped once, after its
//! bytes are on the disk; a bad run, a full gap or a failing device fails the save with
//! nothing committed and no run leaked; a power loss keeps a save of runs whole or not at all.

mod common;

use std::{collections::HashSet, collections::VecDeque, ops::Range, sync::Arc, sync::Mutex};

use common::*;
use proptest::prelude::*;
use snapfile::{
    is_zero_page, BlockDevice, DevError, Error, Gpn, Held, MemDisk, PageKind, SaveSpec, Store,
    Summary, Writer, BATCH, PAGE, SECTOR,
};

type Res = Result<(), Error>;

/// What a test's runs went through, shared by its device and its runs.
#[derive(Default)]
struct Tally {
    /// Addresses of runs whose bytes the device wrote and has not dropped yet.
    landed: HashSet<usize>,
    made: usize,
    dropped: usize,
    /// Runs dropped without their bytes on the disk: refused or failed ones, else a bug.
    early: usize,
}

type Shared = Arc<Mutex<Tally>>;

/// A run of frames: a copy of pages `skew` bytes past an 8-byte boundary (hyp's frames are
/// aligned: the checksum's fast path; a skew takes the other), with no unsafe code.
struct Frames(Vec<u8>, Range<usize>, Shared);

fn frames(bytes: &[u8], skew: usize, tally: &Shared) -> Box<dyn Held> {
    let mut buf = vec![0u8; bytes.len() + 16];
    let at = (8 - buf.as_ptr() as usize % 8) % 8 + skew % 8;
    buf[at..at + bytes.len()].copy_from_slice(bytes);
    let f = Frames(buf, at..at + bytes.len(), tally.clone());
    assert_eq!(f.bytes().as_ptr() as usize % 8, skew % 8);
    tally.lock().unwrap().made += 1;
    Box::new(f)
}

impl Held for Frames {
    fn bytes(&self) -> &[u8] {
        &self.0[self.1.clone()]
    }
}

impl Drop for Frames {
    fn drop(&mut self) {
        let addr = self.bytes().as_ptr() as usize;
        let mut t = self.2.lock().unwrap();
        t.dropped += 1;
        // Removed, so a later run at the same address is not taken for landed.
        if !t.landed.remove(&addr) {
            t.early += 1;
        }
    }
}

/// Pages `r` of `mem` as a run, and their page numbers.
fn held(mem: &Mem, r: Range<usize>, skew: usize, tally: &Shared) -> (Vec<Gpn>, Box<dyn Held>) {
    let bytes: Vec<u8> = r.clone().flat_map(|g| read(mem, g)).collect();
    let gpns = r.map(|g| Gpn(g as u32)).collect();
    (gpns, frames(&bytes, skew, tally))
}

/// A device that keeps up to 3 runs in flight (`write_held`), completing the oldest when a
/// fourth comes and all of them at `wait` and before any other request, as hyp's driver
/// does. A run is marked landed once its bytes are written, then dropped. `fail`: runs to
/// come before one fails, at once or (`true`) at its completion.
struct HeldDisk {
    disk: MemDisk,
    flight: VecDeque<(u64, Box<dyn Held>, bool)>,
    tally: Shared,
    fail: Option<(usize, bool)>,
    failed: Option<DevError>,
}

impl HeldDisk {
    fn new(sectors: u64, fail: Option<(usize, bool)>) -> Self {
        let (flight, tally, failed) = (VecDeque::new(), Shared::default(), None);
        HeldDisk {
            disk: MemDisk::new(sectors),
            flight,
            tally,
            fail,
            failed,
        }
    }

    /// (runs made, dropped, dropped unwritten).
    fn counts(&self) -> (usize, usize, usize) {
        let t = self.tally.lock().unwrap();
        (t.made, t.dropped, t.early)
    }

    /// Completes the oldest runs in flight, dropping each, until `keep` are left.
    fn complete(&mut self, keep: usize) {
        while self.flight.len() > keep {
            let (lba, h, fails) = self.flight.pop_front().unwrap();
            if fails {
                self.failed.get_or_insert(DevError::Io(7));
            } else if let Err(e) = self.disk.write(lba, h.bytes()) {
                self.failed.get_or_insert(e);
            } else {
                let addr = h.bytes().as_ptr() as usize;
                self.tally.lock().unwrap().landed.insert(addr);
            }
        }
    }
}

impl BlockDevice for HeldDisk {
    fn sectors(&self) -> u64 {
        self.disk.sectors()
    }

    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.complete(0);
        self.disk.read(lba, buf)
    }

    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError> {
        self.complete(0);
        self.disk.write(lba, buf)
    }

    fn flush(&mut self) -> Result<(), DevError> {
        self.complete(0);
        self.disk.flush()
    }

    fn write_held(&mut self, lba: u64, data: Box<dyn Held>) -> Result<(), DevError> {
        let len = data.bytes().len();
        assert!(len > 0 && len <= BATCH && len.is_multiple_of(SECTOR));
        let fail = self.fail.filter(|f| f.0 == 0).map(|f| f.1);
        self.fail = self.fail.map(|(k, late)| (k.wrapping_sub(1), late));
        if fail == Some(false) {
            return Err(DevError::Io(6));
        }
        self.complete(2);
        self.flight.push_back((lba, data, fail == Some(true)));
        self.failed.take().map_or(Ok(()), Err)
    }

    fn wait(&mut self) -> Result<(), DevError> {
        self.complete(0);
        self.failed.take().map_or(Ok(()), Err)
    }
}

fn spec(name: &str, ram: usize, max: usize, compress: bool) -> SaveSpec<'_> {
    let (shape, max_pages) = (shape(ram as u32), max as u32);
    SaveSpec {
        name,
        parent: None,
        shape,
        state: b"runs",
        touch: &[],
        max_pages,
        compress,
    }
}

/// How a piece of memory is saved: staged by the writer or a lane, or as a run given to
/// the writer or sealed by a lane (their zero pages: `Writer::absent`, `Lane::skip`).
#[derive(Clone, Copy, Debug)]
enum Way {
    Stage,
    Lane,
    LaneRun,
    WriterRun,
}

const WAYS: [Way; 4] = [Way::Stage, Way::Lane, Way::LaneRun, Way::WriterRun];

/// A memory and how to save it: pieces (zero pages alone, runs of at most `cap` non-zero
/// pages) each saved the next way of `ways`, runs' bytes `skew` bytes off alignment.
struct Plan {
    mem: Mem,
    ways: Vec<Way>,
    cap: usize,
    skew: usize,
}

impl Plan {
    fn nonzero(&self, g: usize) -> bool {
        self.mem[g].as_deref().is_some_and(|p| !is_zero_page(p))
    }

    fn pieces(&self) -> impl Iterator<Item = (Way, Range<usize>)> {
        let (mut out, nz): (Vec<Range<usize>>, _) = (Vec::new(), |g| self.nonzero(g));
        for g in 0..self.mem.len() {
            match out.last_mut() {
                Some(r) if nz(g) && nz(r.start) && r.len() < self.cap => r.end += 1,
                _ => out.push(g..g + 1),
            }
        }
        self.ways.clone().into_iter().cycle().zip(out)
    }

    /// Saves the memory, each piece its way.
    fn save(&self, store: &mut Store, dev: &mut HeldDisk, name: &str, lz4: bool) -> Summary {
        let (mem, gpn, n) = (&self.mem, |g: usize| Gpn(g as u32), self.mem.len());
        let mut w = store.begin(dev, &spec(name, n, n, lz4)).unwrap();
        let mut lane = w.lane();
        let mut piece = |way, r: Range<usize>| match (way, self.nonzero(r.start)) {
            (Way::Stage, _) => {
                for g in r {
                    match &mem[g] {
                        Some(p) => w.stage(gpn(g), p)?,
                        None => w.absent(gpn(g))?,
                    }
                }
                w.write_staged(dev)
            }
            (Way::Lane, _) => r.into_iter().try_for_each(|g| {
                let full = match &mem[g] {
                    Some(p) => lane.stage(gpn(g), p)?,
                    None => lane.skip(gpn(g)).map(|()| None)?,
                };
                full.map_or(Ok(()), |b| w.append(dev, b))
            }),
            (Way::LaneRun, false) => lane.skip(gpn(r.start)),
            (Way::WriterRun, false) => w.absent(gpn(r.start)),
            (Way::LaneRun, true) => {
                let (gpns, h) = held(mem, r, self.skew, &dev.tally);
                w.append(dev, lane.run(&gpns, h)?)
            }
            (Way::WriterRun, true) => {
                let (gpns, h) = held(mem, r, self.skew, &dev.tally);
                w.run(dev, &gpns, h)
            }
        };
        for (way, r) in self.pieces() {
            piece(way, r).unwrap();
        }
        if let Some(b) = lane.seal() {
            w.append(dev, b).unwrap();
        }
        w.finish(dev).unwrap()
    }
}

/// Absent, zero, compressible and random pages, from `kinds`.
fn memory(kinds: &[u8], seed: u64) -> Mem {
    let page = |(i, &k): (usize, &u8)| match k {
        0 => None,
        1 => Some(Box::new(zero_page())),
        _ => Some(page_of(1 + u8::from(k >= 5), seed ^ i as u64)),
    };
    kinds.iter().enumerate().map(page).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Every page reads back from the reopened store as it was, from a save whose runs
    /// are aligned and one whose runs are not, LZ4 on in one and off in the other; the
    /// pages of runs are stored raw, in place; every run is dropped once, after it landed.
    #[test]
    fn a_save_mixing_runs_restores_its_memory(
        kinds in prop::collection::vec(0u8..8, 40..300),
        seed in any::<u64>(),
        ways in prop::collection::vec(prop::sample::select(&WAYS[..]), 1..12),
        (cap, skew, lz4) in (1usize..12, 1usize..8, any::<bool>()),
    ) {
        let mut plan = Plan { mem: memory(&kinds, seed), ways, cap, skew: 0 };
        let mut dev = HeldDisk::new(16_384, None);
        let mut store = Store::format(&mut dev, 1, 8).unwrap();
        let n = plan.mem.len();
        let stored = (0..n).filter(|&g| plan.nonzero(g)).count() as u64;
        let ran: Vec<usize> = plan.pieces()
            .filter(|(w, r)| matches!(w, Way::LaneRun | Way::WriterRun) && plan.nonzero(r.start))
            .flat_map(|(_, r)| r)
            .collect();
        for (name, lz4, skew) in [("a", lz4, 0), ("b", !lz4, skew)] {
            plan.skew = skew;
            let sum = plan.save(&mut store, &mut dev, name, lz4);
            prop_assert_eq!((sum.lz4 + sum.raw, sum.skipped), (stored, n as u64 - stored));
            prop_assert_eq!(sum.in_place, ran.len() as u64);
            prop_assert!(lz4 || sum.lz4 == 0);
        }
        let (made, dropped, early) = dev.counts();
        prop_assert_eq!((dropped, early), (made, 0));
        let store = Store::open(&mut dev.disk).unwrap();
        for name in ["a", "b"] {
            let img = store.image(&mut dev.disk, name).unwrap();
            check_restore(&img, &mut dev.disk, &plan.mem);
            for &g in &ran {
                let kind = img.locate(Gpn(g as u32)).map(|r| r.kind());
                prop_assert_eq!(kind, Some(PageKind::Raw));
            }
        }
    }
}

fn base_mem() -> Mem {
    (0..4).map(|i| Some(page_of(2, 1000 + i))).collect()
}

/// A store on a `HeldDisk` holding "base", and 64 pages, none zero, to save next.
fn fixture(sectors: u64, fail: Option<(usize, bool)>) -> (HeldDisk, Store, Mem) {
    let mut dev = HeldDisk::new(sectors, fail);
    let mut store = Store::format(&mut dev, 1, 8).unwrap();
    let (base, all) = (base_mem(), [0, 1, 2, 3]);
    save(&mut store, &mut dev, "base", None, &base, &all, b"").unwrap();
    let mem = (0..64).map(|i| Some(page_of(1 + (i % 2) as u8, i as u64)));
    (dev, store, mem.collect())
}

fn begin<'s>(store: &'s mut Store, dev: &mut HeldDisk, max: usize) -> Writer<'s> {
    store.begin(dev, &spec("r", 64, max, true)).unwrap()
}

fn names(store: &Store) -> Vec<&str> {
    store.list().iter().map(|e| e.name.as_str()).collect()
}

/// Pages `r` of `mem` as a run: by `Writer::run`, or (`lane`) sealed by `Lane::run`.
fn put_run(w: &mut Writer, dev: &mut HeldDisk, mem: &Mem, r: Range<usize>, lane: bool) -> Res {
    let (gpns, h) = held(mem, r, 0, &dev.tally);
    match lane {
        false => w.run(dev, &gpns, h),
        true => w.append(dev, w.lane().run(&gpns, h)?),
    }
}

/// `runs` runs of 4 pages from page 0, by the writer and lanes in turn; the most runs the
/// device held at once.
fn save_runs(w: &mut Writer, dev: &mut HeldDisk, mem: &Mem, runs: usize) -> usize {
    let held_now = |k: usize| {
        put_run(w, dev, mem, 4 * k..4 * k + 4, k % 2 == 1).unwrap();
        dev.counts().0 - dev.counts().1
    };
    (0..runs).map(held_now).max().unwrap_or(0)
}

#[test]
fn runs_are_dropped_once_and_only_after_their_bytes_land() {
    let (mut dev, mut store, mem) = fixture(4096, None);
    let mut w = begin(&mut store, &mut dev, 64);
    // The device did hold runs: one dropped too soon would have been seen.
    assert_eq!(save_runs(&mut w, &mut dev, &mem, 16), 3);
    let sum = w.finish(&mut dev).unwrap();
    assert_eq!((sum.raw, sum.in_place, sum.runs), (64, 64, 16));
    assert_eq!(dev.counts(), (16, 16, 0));
    // An abandoned writer's runs stay in flight until the next `begin` waits, even one refused.
    let mut w = store.begin(&mut dev, &spec("gone", 64, 64, true)).unwrap();
    save_runs(&mut w, &mut dev, &mem, 2);
    drop(w);
    assert_eq!(dev.counts(), (18, 16, 0));
    let refused = store.begin(&mut dev, &spec("r", 64, 64, true)).err();
    assert_eq!((refused, dev.counts().1), (Some(Error::NameExists), 18));
    let w = store.begin(&mut dev, &spec("next", 64, 64, true)).unwrap();
    w.finish(&mut dev).unwrap();
    let store = Store::open(&mut dev).unwrap();
    assert_eq!(names(&store), ["base", "r", "next"]);
    check_restore(&store.image(&mut dev, "r").unwrap(), &mut dev, &mem);
}

/// After a failed save: `finish` fails with `fin`, every run is dropped (none leaked),
/// `refused` of them unwritten, and the store on the disk lists "base" alone, which restores.
fn assert_failed(w: Writer, mut dev: HeldDisk, fin: Error, refused: usize) {
    assert_eq!(w.finish(&mut dev).err(), Some(fin));
    let _ = dev.wait();
    let (made, dropped, early) = dev.counts();
    assert_eq!((dropped, early), (made, refused));
    let store = Store::open(&mut dev.disk).unwrap();
    assert_eq!(names(&store), ["base"]);
    let img = store.image(&mut dev.disk, "base").unwrap();
    check_restore(&img, &mut dev.disk, &base_mem());
}

#[test]
fn a_bad_run_fails_the_writer() {
    // Runs whose bytes are not their pages, one past the VM's RAM, one longer than a
    // device request.
    let rl = |pages, bytes| Error::RunLength { pages, bytes };
    let odd = PAGE + SECTOR;
    let oob = Error::PageOutOfRange { page: 64 };
    let long: Vec<Gpn> = (0..BATCH / PAGE + 1).map(|g| Gpn(g as u32 % 64)).collect();
    let cases = [
        (vec![Gpn(2), Gpn(3)], PAGE, rl(2, PAGE)),
        (vec![Gpn(0)], odd, rl(1, odd)),
        (vec![Gpn(63), Gpn(64)], 2 * PAGE, oob),
        (long.clone(), long.len() * PAGE, Error::TooLarge),
    ];
    for (gpns, len, want) in cases {
        let (mut dev, mut store, mem) = fixture(4096, None);
        let mut w = begin(&mut store, &mut dev, 64);
        // A lane refuses it too, and the writer is not told (the lane is apart from it).
        let h = frames(&vec![1; len], 0, &dev.tally);
        assert_eq!(w.lane().run(&gpns, h).err(), Some(want));
        put_run(&mut w, &mut dev, &mem, 0..2, false).unwrap();
        let h = frames(&vec![1; len], 0, &dev.tally);
        assert_eq!(w.run(&mut dev, &gpns, h), Err(want));
        let r = put_run(&mut w, &mut dev, &mem, 3..5, true);
        assert_eq!(r, Err(Error::WriterFailed));
        assert_eq!(w.stage(Gpn(9), &read(&mem, 9)), Err(Error::WriterFailed));
        assert_failed(w, dev, Error::WriterFailed, 3);
    }
}

#[test]
fn runs_count_against_max_pages() {
    let (mut dev, mut store, mem) = fixture(4096, None);
    let mut w = begin(&mut store, &mut dev, 6);
    w.absent(Gpn(20)).unwrap();
    put_run(&mut w, &mut dev, &mem, 0..4, false).unwrap();
    // The sixth page: exactly the limit.
    put_run(&mut w, &mut dev, &mem, 4..5, true).unwrap();
    let r = put_run(&mut w, &mut dev, &mem, 5..7, true);
    assert_eq!(r, Err(Error::TooManyPages));
    let r = put_run(&mut w, &mut dev, &mem, 7..8, false);
    assert_eq!(r, Err(Error::WriterFailed));
    assert_failed(w, dev, Error::WriterFailed, 2);
}

#[test]
fn a_run_past_the_gap_fails_with_no_space() {
    let (mut dev, mut store, mem) = fixture(200, None);
    let gap = store.gaps().iter().map(|g| g.1).max().unwrap();
    // All 64 pages raw would not fit: the writer takes the largest gap, checks as it goes.
    let mut w = begin(&mut store, &mut dev, 64);
    let mut ok = 0;
    let err = loop {
        match put_run(&mut w, &mut dev, &mem, 2 * ok..2 * ok + 2, ok % 2 == 1) {
            Ok(()) => ok += 1,
            Err(e) => break e,
        }
    };
    // The header and a sector of state, then 16 sectors a run.
    assert_eq!(ok as u64, (gap - 2) / 16);
    assert!(matches!(err, Error::NoSpace { free, needed } if free == gap && needed > gap));
    assert_failed(w, dev, Error::WriterFailed, 1);
}

#[test]
fn a_device_failing_a_run_fails_the_save() {
    // The second run failing at once, or at its completion (reported by a later run's
    // call); the last failing at its completion (reported by `finish`'s wait).
    for (at, late) in [(1, false), (1, true), (7, true)] {
        let (mut dev, mut store, mem) = fixture(4096, Some((at, late)));
        let mut w = begin(&mut store, &mut dev, 64);
        let errors: Vec<Error> = (0..8)
            .filter_map(|k| put_run(&mut w, &mut dev, &mem, 2 * k..2 * k + 2, k % 2 == 1).err())
            .collect();
        // Reported once, then refused.
        let io = Error::Device(DevError::Io(if late { 7 } else { 6 }));
        assert_eq!(errors.first().unwrap_or(&io), &io);
        assert!(errors.iter().skip(1).all(|e| *e == Error::WriterFailed));
        let fin = if errors.is_empty() {
            io
        } else {
            Error::WriterFailed
        };
        assert_failed(w, dev, fin, errors.len().max(1));
    }
}

/// A save of `runs` runs, finished or not, then a power loss, with the runs still in
/// flight lost or landed: the store lists "r" exactly when it was finished, and restores it.
#[test]
fn a_power_loss_keeps_a_finished_save_of_runs_and_none_of_an_unfinished_one() {
    for (runs, finished) in [(0, false), (1, false), (3, false), (8, false), (5, true)] {
        let (mut dev, mut store, mem) = fixture(4096, None);
        let mut w = begin(&mut store, &mut dev, 64);
        save_runs(&mut w, &mut dev, &mem, runs);
        let want = match finished {
            true => w.finish(&mut dev).map(|_| vec!["base", "r"]).unwrap(),
            false => vec!["base"],
        };
        let mut r = mem.clone();
        r[4 * runs..].fill(None);
        let base = base_mem();
        for landed in [false, true] {
            if landed {
                dev.wait().unwrap();
                assert_eq!(dev.counts(), (runs, runs, 0));
            }
            // Every unflushed write kept, none, and either half of the sectors.
            for loss in [|_| true, |_| false, |l| l % 2 == 0, |l: u64| l % 2 == 1] {
                let mut d = dev.disk.clone();
                d.lose_unflushed(loss);
                let store = Store::open(&mut d).expect("a power loss left no store");
                assert_eq!(names(&store), want, "{runs} runs, landed: {landed}");
                check_restore(&store.image(&mut d, "base").unwrap(), &mut d, &base);
                if finished {
                    check_restore(&store.image(&mut d, "r").unwrap(), &mut d, &r);
                }
            }
        }
    }
}
