//! `save <vm> <name> [--diff <parent>]`: a VM to the disk.
//!
//! A running VM is paused only for a frozen copy-on-write snapshot of it
//! (`vm::fork`, `ForkKind::Snapshot`: the VM's memory at the pause, kept
//! exact through the reverse map while the VM runs on), which is then read
//! page by page through its stage 2 and streamed into the store's writer,
//! and destroyed. An in-memory snapshot (`snapshot <vm>`) is written as it
//! is. Only present, non-zero pages are stored (snapfile skips zero pages
//! and compresses the rest).
//!
//! A diff stores the pages the VM's dirty log (`mm::dirty`) names: every
//! stage-2 entry change since the log's base, which the save's own snapshot
//! fork resets it to. So after `save vm a` the log is relative to `a`;
//! `save vm b --diff a` checks that (and refuses anything else: the log
//! knows nothing of older saves), writes exactly those pages (absent ones
//! as zero) and makes the log relative to `b`. A VM loaded from the disk
//! starts with its log relative to the image it was loaded from.

use super::{disk, PersistError};
use crate::mm::glue::{Access, FaultKind};
use crate::mm::{frames::PAGE_SIZE, VmMemory};
use crate::vm::fork::{fork, ForkKind};
use crate::vm::Vm;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use rmap::{Ipa, PageState, Stage2, Stage2Locked};
use snapfile::{Gpn, SaveSpec, Shape, Writer};
use spin::Mutex;

const PAGE: usize = PAGE_SIZE as usize;

/// A VM's last save: its name and creation sequence number (a name can be
/// deleted and saved again, by another VM: the number tells the images
/// apart), and the dirty-log base that save left.
#[derive(Clone)]
struct LastSave {
    name: String,
    seq: u64,
    base: Option<u32>,
}

/// Per VM: its last save (a diff is allowed only against that image while
/// the log still has its base).
static LAST_SAVE: Mutex<BTreeMap<u32, LastSave>> = Mutex::new(BTreeMap::new());

/// Records that `vm`'s dirty log is now relative to image `name`, number
/// `seq` in the store.
pub fn note_saved(vm: &Vm, name: &str, seq: u64) {
    let base = vm.mem.dirty.lock().base;
    let last = LastSave {
        name: String::from(name),
        seq,
        base,
    };
    LAST_SAVE.lock().insert(vm.id, last);
}

/// What a save wrote.
pub struct SaveReport {
    pub vm: u32,
    /// Pages stored (LZ4 or raw) and recorded zero (diffs).
    pub pages: u64,
    pub zero: u64,
    /// Bytes of page data, and of the whole image.
    pub data_bytes: u64,
    pub image_bytes: u64,
    /// Hypervisor time of the whole save, and of the pause (snapshot fork).
    pub us: u64,
    pub pause_us: u64,
    /// Pages in the touch order saved with it (a VM loaded from the disk:
    /// those it faulted in itself since, in order).
    pub touched: u64,
    /// Where the image is on the disk (first sector, sectors) and its page
    /// data as device bytes `[start, end)` (for tools and damage tests).
    pub extent: (u64, u64),
    pub data: (u64, u64),
    /// Guest RAM the image covers, in bytes (a diff: the dirty pages').
    pub ram_bytes: u64,
    /// Of `pages`, those the disk read from the guest's frames where they
    /// lay, with no copy, and the runs (device requests) they came in.
    pub in_place: (u64, u64),
    /// Where the save's time went.
    pub split: Split,
}

/// Where a save's time went, in microseconds of the hypervisor's timer.
#[derive(Clone, Copy, Default)]
pub struct Split {
    /// Walking the snapshot's stage 2 and staging its mapped pages into the
    /// writer (zero checks, checksums and copies of them included).
    pub walk: u64,
    /// Checking pages for zero (the writer's; of `walk`).
    pub zero: u64,
    /// The rest of `walk`: the table walk and the writer's records (`walk`
    /// less the zero checks, LZ4 and the checksums with their fused copies).
    pub copy: u64,
    /// Pages not mapped at the walk (swapped, migrating; a diff's pages):
    /// looked up one by one and faulted in.
    pub slow: u64,
    /// LZ4 compression, page checksums, and device requests (the writer's;
    /// with queued writes, the time spent waiting for the device).
    pub lz4: u64,
    pub checksum: u64,
    pub device: u64,
    /// Whether LZ4 paid once measured (`lz4_pays`): kept, and nanoseconds
    /// it took per page against those writing the bytes it saved would.
    pub lz4_verdict: Option<(bool, u64, u64)>,
    /// The verdict came from an earlier save of this boot (no trial).
    pub lz4_cached: bool,
    /// The writer's `finish` (index, header, flush, TOC commit; its device
    /// writes are in `device` too).
    pub finish: u64,
    /// Of `finish`: waiting for the queued writes, and the header's flush with
    /// the TOC commit.
    pub drain: u64,
    pub commit: u64,
    /// Handing the save's snapshot over to be destroyed (`reap`: another
    /// CPU destroys it while this one finishes).
    pub teardown: u64,
    /// Pages the helper CPU staged (`helper`), and its time from taking the
    /// job to letting go.
    pub helper_pages: u64,
    pub helper_us: u64,
    /// From posting the helper's job to a CPU taking it (a CPU busy with
    /// other background work, such as an earlier save's teardown, is late).
    pub helper_start_us: u64,
    /// Asleep waiting for each other: the helper for room among its
    /// batches the saving CPU has not taken yet, the saving CPU for the
    /// helper's last ones.
    pub naps: (u64, u64),
    /// The costs of this CPU's lane in a parallel walk (timer ticks; in
    /// `zero`, `lz4` and `checksum` once the save is done).
    pub lane: snapfile::Costs,
}

impl SaveReport {
    /// Image bytes per second of the save, in MiB/s.
    pub fn mib_s(&self) -> u64 {
        (self.image_bytes * 1_000_000 / self.us.max(1)) >> 20
    }

    /// Guest RAM bytes saved per second, in MiB/s.
    pub fn ram_mib_s(&self) -> u64 {
        (self.ram_bytes * 1_000_000 / self.us.max(1)) >> 20
    }
}

/// Saves `vm` (running, paused or a frozen snapshot) as `name`.
pub fn save(vm: &Arc<Vm>, name: &str, parent: Option<&str>) -> Result<SaveReport, PersistError> {
    let t0 = crate::arch::timer::now();
    let (mut store, mut dev) = disk::open(true)?;
    if dev.0.readonly() {
        return Err(PersistError::ReadOnly);
    }
    // Refusals the store would make anyway, before the VM pauses.
    if store.entry(name).is_ok() {
        return Err(snapfile::Error::NameExists.into());
    }
    let parent = parent
        .map(|p| store.entry(p).map(|e| (p, e.seq)))
        .transpose()?;
    let (snap, dirty, pause_us) = freeze(vm, parent)?;
    let snap = Source {
        ours: !Arc::ptr_eq(&snap, vm),
        snap,
    };
    let touched = super::load::touch_order_of(vm.id).len() as u64;
    let written = write(
        &mut store,
        &mut dev,
        vm,
        snap,
        name,
        parent.map(|p| p.0),
        dirty.as_deref(),
    );
    if written.is_err() {
        // The failed image's queued writes still pin the frames they write
        // in place: completed now, so those go with the snapshot rather
        // than at the disk's next request. Their errors are not news.
        let _ = snapfile::BlockDevice::wait(&mut dev);
    }
    let (sum, split, ram_bytes) = written?;
    store.keep(&dev);
    if !vm.is_frozen() {
        note_saved(vm, name, sum.seq);
    }
    Ok(SaveReport {
        vm: vm.id,
        pages: sum.lz4 + sum.raw,
        zero: sum.zero_now,
        data_bytes: sum.data_bytes,
        image_bytes: sum.sectors * snapfile::SECTOR as u64,
        us: crate::arch::timer::ticks_to_us(crate::arch::timer::now().wrapping_sub(t0)),
        pause_us,
        touched,
        extent: (sum.start, sum.sectors),
        data: sum.sections[1],
        ram_bytes,
        in_place: (sum.in_place, sum.runs),
        split,
    })
}

/// The frozen VM to read, the pages of a diff (`None`: all), and the pause.
type Frozen = (Arc<Vm>, Option<Vec<u32>>, u64);

/// The frozen VM a save reads. The save's own snapshot (`ours`: not an
/// in-memory snapshot the operator took) is handed to an idle CPU to
/// destroy when this drops: as soon as the walk has copied every page, or
/// on any error before.
struct Source {
    snap: Arc<Vm>,
    ours: bool,
}

impl Drop for Source {
    fn drop(&mut self) {
        if self.ours {
            super::reap::defer(self.snap.clone());
        }
    }
}

/// A frozen copy of `vm` (itself if it is a snapshot) and, for a diff, the
/// pages dirtied since `parent` (name, sequence number in the store), taken
/// in one pause so none is missed between them.
fn freeze(vm: &Arc<Vm>, parent: Option<(&str, u64)>) -> Result<Frozen, PersistError> {
    if vm.is_frozen() {
        if parent.is_some() {
            return Err(PersistError::Refused(
                "a snapshot has no dirty log: save it in full (diffs are of running VMs)",
            ));
        }
        return Ok((vm.clone(), None, 0));
    }
    let t0 = crate::arch::timer::now();
    let was_running = vm.quiesce(0).ok_or(crate::vm::fork::ForkError::Busy)?;
    // Left paused (not resumed) while the snapshot is forked below.
    let dirty = parent.map(|(p, seq)| dirty_since(vm, p, seq)).transpose();
    vm.unquiesce(false);
    let snap = dirty.and_then(|d| Ok((fork(vm, None, ForkKind::Snapshot)?, d)));
    if was_running {
        vm.resume();
    }
    let (snap, dirty) = snap?;
    let pause_us = crate::arch::timer::ticks_to_us(crate::arch::timer::now().wrapping_sub(t0));
    Ok((snap, dirty, pause_us))
}

/// The pages `vm` (quiesced) dirtied since its save `parent`, number `seq`
/// in the store.
fn dirty_since(vm: &Vm, parent: &str, seq: u64) -> Result<Vec<u32>, PersistError> {
    let log = vm.mem.dirty.lock();
    let last = LAST_SAVE.lock().get(&vm.id).cloned();
    match &last {
        Some(l) if l.name == parent && l.base == log.base && log.base.is_some() => {}
        _ => {
            return Err(PersistError::NotParent {
                asked: String::from(parent),
                last: last.map(|l| l.name),
            })
        }
    }
    if last.is_some_and(|l| l.seq != seq) {
        return Err(PersistError::Refused(
            "the image of that name on the disk is not the one this VM's dirty log is relative to (it was deleted and saved again): save the VM in full",
        ));
    }
    if log.overflow {
        return Err(PersistError::Refused(
            "the VM's dirty log overflowed (no heap for it): save it in full",
        ));
    }
    let base = Ipa::new(vm.mem.ram.base);
    let mut pages = Vec::new();
    let mut at = log.next_from(base);
    while let Some(ipa) = at {
        pages.push(((ipa.raw() - base.raw()) / PAGE_SIZE) as u32);
        at = log.next_from(ipa + PAGE_SIZE);
    }
    Ok(pages)
}

/// Streams `src`'s pages (all, or `dirty`) into a new image; what it
/// wrote, where the time went, and the guest RAM it covers. `src` is let go
/// once its pages are copied, before the image's flush and commit.
fn write(
    store: &mut snapfile::Store,
    dev: &mut disk::Dev,
    vm: &Vm,
    src: Source,
    name: &str,
    parent: Option<&str>,
    dirty: Option<&[u32]>,
) -> Result<(snapfile::Summary, Split, u64), PersistError> {
    let snap = &src.snap;
    let vcpus = snap.clone_parked_vcpus(snap);
    let state = super::state::encode(snap, &vm.name, &vcpus);
    drop(vcpus);
    let ram_pages = (snap.mem.ram.size / PAGE_SIZE) as u32;
    let touch: Vec<Gpn> = super::load::touch_order_of(vm.id)
        .into_iter()
        .map(Gpn)
        .collect();
    let spec = SaveSpec {
        name,
        parent,
        shape: Shape {
            ram_base: Ipa::new(snap.mem.ram.base),
            ram_pages,
            vcpus: snap.nr_vcpus as u32,
        },
        state: &state,
        touch: &touch,
        max_pages: dirty.map_or(ram_pages, |d| d.len() as u32),
        compress: true,
    };
    let mut w = store.begin(dev, &spec)?;
    w.set_clock(crate::arch::timer::now);
    let mut split = Split::default();
    let t0 = crate::arch::timer::now();
    match dirty {
        Some(pages) => pages
            .iter()
            .try_for_each(|&g| put_page(&mut w, dev, &snap.mem, g))?,
        None => super::walk::put_all(&mut w, dev, snap, ram_pages, &mut split)?,
    }
    let t1 = crate::arch::timer::now();
    // Every page is in the writer's buffers or pinned for its write: another
    // CPU destroys the snapshot while this one waits for the disk.
    drop(src);
    let us = crate::arch::timer::ticks_to_us;
    split.teardown = us(crate::arch::timer::now().wrapping_sub(t1));
    let t1 = crate::arch::timer::now();
    let sum = w.finish(dev)?;
    split.finish = us(crate::arch::timer::now().wrapping_sub(t1));
    if dirty.is_some() {
        let t = sum.costs;
        let total = crate::arch::timer::now().wrapping_sub(t0);
        split.slow = us(total.saturating_sub(t.zero + t.lz4 + t.checksum + t.device));
    }
    split.note_costs(&sum.costs);
    let pages = dirty.map_or(u64::from(ram_pages), |d| d.len() as u64);
    Ok((sum, split, pages * PAGE_SIZE))
}

impl Split {
    /// The writer's costs, with this CPU's lane's (timer ticks), in
    /// microseconds.
    fn note_costs(&mut self, t: &snapfile::Costs) {
        let us = crate::arch::timer::ticks_to_us;
        let l = self.lane;
        self.zero = us(t.zero + l.zero);
        self.lz4 = us(t.lz4 + l.lz4);
        self.checksum = us(t.checksum + l.checksum);
        self.device = us(t.device);
        (self.drain, self.commit) = (us(t.drain), us(t.commit));
    }
}

/// Page `gpn` of `mem` into the image: stored if present (zero pages are
/// the writer's to skip or record), absent otherwise.
fn put_page(
    w: &mut Writer<'_>,
    dev: &mut disk::Dev,
    mem: &VmMemory,
    gpn: u32,
) -> Result<(), PersistError> {
    let mut buf = [0u8; PAGE];
    if read_page(mem, gpn, &mut buf)? {
        w.page(dev, Gpn(gpn), &buf)?;
    } else {
        w.absent(Gpn(gpn))?;
    }
    Ok(())
}

/// Copies page `gpn` of a frozen VM's memory into `out`; false if nothing
/// is there. A swapped-out page (the store's, or a disk image's) is faulted
/// back in first, in the frozen VM (its own copy).
pub fn read_page(mem: &VmMemory, gpn: u32, out: &mut [u8; PAGE]) -> Result<bool, PersistError> {
    let ipa = Ipa::new(mem.ram.base) + u64::from(gpn) * PAGE_SIZE;
    loop {
        {
            let s2 = mem.lock();
            match s2.lookup(ipa) {
                PageState::Invalid => return Ok(false),
                PageState::Mapped { pfn, .. } => {
                    // SAFETY: the frame backs a page of this frozen VM: its
                    // entry, which we hold locked, keeps it (migration and
                    // reclaim change the entry, under this lock, before they
                    // touch the frame), and nothing writes a frozen VM's
                    // pages (its sharers copy on write). Identity mapped.
                    let src = unsafe { &*(pfn.pa().raw() as *const [u8; PAGE]) };
                    out.copy_from_slice(src);
                    return Ok(true);
                }
                // The shared zero page: a page of zeroes (the writer skips it).
                PageState::ZeroPage => {
                    out.fill(0);
                    return Ok(true);
                }
                PageState::Migrating { .. } | PageState::Swapped { .. } => {}
            }
        }
        // Waits out a migration, or swaps the page in.
        crate::mm::glue::fault(mem, ipa, Access::Read, FaultKind::Translation)
            .map_err(|_| PersistError::Page("out of memory reading a page of the VM"))?;
        if crate::mm::diskpages::take_failure().is_some() {
            return Err(PersistError::Page(
                "a page of the VM's own disk image failed its checksum",
            ));
        }
    }
}
