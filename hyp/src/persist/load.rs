//! `load <name>` (and the `restore=` bootarg): a VM from a saved image,
//! running before any of its memory is read.
//!
//! The image's header, index and state are read and verified (snapfile);
//! the VM is created with the image's shape, given its vCPU, vGIC, timer
//! and UART state, and every stored page is to become a swap entry naming
//! that page of the loaded image (`mm::diskpages`): recorded per 2 MiB
//! chunk, whose entries are written on the first fault in it (or by the
//! prefetch, or before a fork), so the load does no per-page work before
//! its vCPUs are queued.
//! A guest access to a page not yet loaded is an ordinary stage-2 fault
//! whose swap-in reads the page from the disk here ([`Source::read`]),
//! verified against its checksum; a page that fails stops the VM (the
//! fault path's `take_failure`), never reaching the guest.
//!
//! The order in which the VM first faults its pages is recorded (REAP's
//! working set) and saved with its next image, for the prefetcher
//! (`prefetch`) of the next load.

use super::{disk, state, PersistError};
use crate::mm::diskpages;
use crate::mm::frames::PAGE_SIZE;
use crate::vm::Vm;
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use platform::board::MAX_CPUS;
use snapfile::{Gpn, Image};
use spin::Mutex;

/// A loaded image: what faults of its VM (and the VM's forks) read.
pub struct Loaded {
    pub handle: u32,
    pub image: Image,
    /// The VM it was loaded into.
    pub vm: u32,
    pub prefetch: bool,
    /// When the image's header had been read, and when every page had been
    /// read (0: not yet).
    pub opened: u64,
    pub all_loaded_at: AtomicU64,
    /// Pages read from the disk, and those that failed.
    pub read: AtomicU64,
    pub failed: AtomicU64,
    /// The prefetcher's position in `prefetch::order`, and its steps.
    pub cursor: AtomicU64,
    pub steps: AtomicU64,
    touch: Mutex<Touch>,
    /// The prefetch's read-ahead of the image's page data.
    window: Mutex<super::ahead::Window>,
}

/// Pages in the order the VM first faulted them, and which those are.
#[derive(Default)]
struct Touch {
    order: Vec<u32>,
    seen: Vec<u64>,
}

/// Loaded images by handle, while any entry names them.
static IMAGES: Mutex<BTreeMap<u32, Arc<Loaded>>> = Mutex::new(BTreeMap::new());
/// The touch order of each VM loaded from the disk, kept once its image is
/// released (every page loaded), for its next save.
static TOUCHED: Mutex<BTreeMap<u32, Vec<u32>>> = Mutex::new(BTreeMap::new());
static NEXT_HANDLE: AtomicU32 = AtomicU32::new(1);
/// A load whose VM has not entered its guest yet, for `first_entry`.
struct AwaitEntry {
    vm: u32,
    name: alloc::string::String,
    /// The counter when the image's header had been read.
    opened: u64,
    prefetch: bool,
}

static AWAIT_ENTRY: Mutex<Vec<AwaitEntry>> = Mutex::new(Vec::new());
/// Per CPU: a page read now is the prefetcher's, not the guest's touch.
pub static PREFETCHING: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// What a load did.
pub struct LoadReport {
    pub vm: u32,
    pub pages: u64,
    pub vcpus: usize,
    pub ram: u64,
    /// Hypervisor time from the image's header being read (and verified,
    /// with its index and state) to the vCPUs queued, and in all.
    pub ready_us: u64,
    pub total_us: u64,
}

/// The loaded image `handle`, if it is still in use.
pub fn get(handle: u32) -> Option<Arc<Loaded>> {
    IMAGES.lock().get(&handle).cloned()
}

/// Every loaded image still in use.
pub fn all() -> Vec<Arc<Loaded>> {
    IMAGES.lock().values().cloned().collect()
}

/// A VM that may still read pages from sectors `lba..lba + sectors` (they
/// hold an image of the chain it was loaded from, which is not all in yet),
/// and that image's name: a write there would feed it wrong bytes, which
/// its page checksums would catch by stopping it.
pub fn reader_of_sectors(lba: u64, sectors: u64) -> Option<(u32, alloc::string::String)> {
    let end = lba.saturating_add(sectors);
    all().into_iter().find_map(|l| {
        let hit = l
            .image
            .extents()
            .iter()
            .any(|&(start, n)| start < end && lba < start.saturating_add(n));
        hit.then(|| (l.vm, alloc::string::String::from(l.image.name())))
    })
}

/// The order in which VM `vm` first touched its pages since it was loaded
/// (empty for a VM not loaded from the disk).
pub fn touch_order_of(vm: u32) -> Vec<u32> {
    if let Some(l) = all().into_iter().find(|l| l.vm == vm) {
        return l.touch.lock().order.clone();
    }
    TOUCHED.lock().get(&vm).cloned().unwrap_or_default()
}

/// `mm::diskpages`' source of image pages.
struct Source;

impl diskpages::ImageSource for Source {
    fn read(&self, image: u32, gpn: u32, out: &mut [u8; PAGE_SIZE as usize]) -> bool {
        let Some(l) = get(image) else {
            return false;
        };
        let Some(r) = l.image.locate(Gpn(gpn)) else {
            return false;
        };
        let Ok(dev) = disk::dev() else {
            return false;
        };
        let cpu = crate::arch::percpu::cpu_index();
        let prefetching = PREFETCHING
            .get(cpu)
            .is_some_and(|p| p.load(Ordering::Relaxed));
        let mut dev = super::ahead::Ahead {
            dev,
            window: &l.window,
            fill: prefetching,
        };
        if l.image.read_page(&mut dev, &r, out).is_err() {
            l.failed.fetch_add(1, Ordering::Relaxed);
            crate::println!(
                "[hyp] image '{}': page {gpn} failed its checksum (or the disk failed)",
                l.image.name()
            );
            return false;
        }
        if !prefetching {
            l.touch.lock().note(gpn);
        }
        l.read.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The last entry naming the image is gone: for a VM with no forks,
    /// every page has been loaded.
    fn release(&self, image: u32) {
        let Some(l) = IMAGES.lock().remove(&image) else {
            return;
        };
        let now = crate::arch::timer::now();
        l.all_loaded_at.store(now, Ordering::Relaxed);
        crate::println!(
            "[hyp] vm {}: all {} pages of '{}' loaded ({} reads), {} ms after its header was read ({}, {} steps)",
            l.vm,
            l.image.pages().len(),
            l.image.name(),
            l.read.load(Ordering::Relaxed),
            crate::arch::timer::ticks_to_us(now.wrapping_sub(l.opened)) / 1000,
            if l.prefetch { "prefetch" } else { "no prefetch" },
            l.steps.load(Ordering::Relaxed)
        );
        let order = core::mem::take(&mut l.touch.lock().order);
        TOUCHED.lock().insert(l.vm, order);
    }
}

impl Touch {
    fn note(&mut self, gpn: u32) {
        let (w, b) = ((gpn / 64) as usize, gpn % 64);
        if self.seen.len() <= w {
            self.seen.resize(w + 1, 0);
        }
        if self.seen[w] & (1 << b) == 0 {
            self.seen[w] |= 1 << b;
            self.order.push(gpn);
        }
    }
}

static SOURCE: Source = Source;

/// Loads snapshot `name` into a new VM and starts it.
pub fn load(name: &str, prefetch: bool) -> Result<LoadReport, PersistError> {
    diskpages::set_source(&SOURCE);
    let t0 = crate::arch::timer::now();
    let (store, mut dev) = disk::open(false)?;
    let seq = store.entry(name)?.seq;
    let image = store.image(&mut dev, name)?;
    store.keep(&dev);
    let opened = crate::arch::timer::now();
    let (h, _) = state::header(image.state())?;
    check_shape(&h, &image)?;
    let vm = Vm::create(&h.name, h.vcpus, h.ram_size)?;
    let created = crate::arch::timer::now();
    vm.pause();
    let vcpus = match state::apply(image.state(), &vm) {
        Ok(v) => v,
        Err(e) => {
            vm.stop(crate::vm::STATUS_FAULT);
            return Err(e);
        }
    };
    vm.replace_parked_vcpus(vcpus);
    crate::vm::devices::update_irq(&vm);
    let stated = crate::arch::timer::now();
    let pages = install(&vm, image, prefetch, opened)?;
    let installed = crate::arch::timer::now();
    vm.mem.dirty.lock().reset(Some(vm.id));
    super::save::note_saved(&vm, name, seq);
    crate::vm::set_first_entry_hook(first_entry);
    AWAIT_ENTRY.lock().push(AwaitEntry {
        vm: vm.id,
        name: alloc::string::String::from(name),
        opened,
        prefetch,
    });
    vm.resume();
    // The vCPUs are queued (and the CPUs kicked): the guest may run now.
    // The prefetch starts at its first guest entry (`first_entry`): started
    // here, a CPU woken by the kick took a prefetch step (2 ms and a disk
    // read) before it looked at the run queue.
    let now = crate::arch::timer::now();
    let us = |a: u64, b: u64| crate::arch::timer::ticks_to_us(b.wrapping_sub(a));
    crate::println!(
        "[hyp] load '{name}': header+index+state read {} us, vm created {} us, state {} us, pages installed {} us, resumed {} us",
        us(t0, opened),
        us(opened, created),
        us(created, stated),
        us(stated, installed),
        us(installed, now)
    );
    Ok(LoadReport {
        vm: vm.id,
        pages,
        vcpus: h.vcpus,
        ram: h.ram_size,
        ready_us: crate::arch::timer::ticks_to_us(now.wrapping_sub(opened)),
        total_us: crate::arch::timer::ticks_to_us(now.wrapping_sub(t0)),
    })
}

/// `vm::Vm::note_entry`'s hook, on the CPU about to enter the guest: a
/// loaded VM's first guest entry, timed from its image's header (what the
/// guest's first instruction waited for, whichever CPU runs it); its
/// prefetch starts now, on the other CPUs.
fn first_entry(vm: &Vm, at: u64) {
    let waiting = {
        let mut w = AWAIT_ENTRY.lock();
        let i = w.iter().position(|e| e.vm == vm.id);
        i.map(|i| w.swap_remove(i))
    };
    let Some(e) = waiting else { return };
    crate::println!(
        "[hyp] load '{}': first guest entry {} us after the header",
        e.name,
        crate::arch::timer::ticks_to_us(at.wrapping_sub(e.opened))
    );
    if e.prefetch {
        super::prefetch::start();
    }
}

/// The state's shape must be the image's, and one this hypervisor makes.
fn check_shape(h: &state::Header, image: &Image) -> Result<(), PersistError> {
    let s = image.shape();
    let same = h.ram_base == s.ram_base.raw()
        && h.ram_size == u64::from(s.ram_pages) * PAGE_SIZE
        && h.vcpus == s.vcpus as usize;
    if !same {
        return Err(PersistError::BadState(
            "the VM state's shape differs from the image's",
        ));
    }
    if h.ram_base != crate::vm::GUEST_RAM_BASE || h.ram_size == 0 {
        return Err(PersistError::BadState(
            "guest RAM is not where this hypervisor puts it",
        ));
    }
    if !crate::mm::heap::guest_may_allocate(s.ram_pages as usize / 8 + 64 * 1024) {
        return Err(crate::vm::VmError::NoMemory.into());
    }
    Ok(())
}

/// Registers the image and makes its pages `vm`'s, read from the disk on
/// first touch; on an error `vm` is stopped.
fn install(vm: &Arc<Vm>, image: Image, prefetch: bool, opened: u64) -> Result<u64, PersistError> {
    let gpns: Vec<u32> = image.pages().iter().map(|p| p.gpn().0).collect();
    let handle = NEXT_HANDLE.fetch_add(1, Ordering::Relaxed);
    if handle > diskpages::MAX_HANDLE {
        vm.stop(crate::vm::STATUS_FAULT);
        return Err(PersistError::Refused("too many images loaded in this boot"));
    }
    let loaded = Arc::new(Loaded {
        handle,
        image,
        vm: vm.id,
        prefetch,
        opened,
        all_loaded_at: AtomicU64::new(0),
        read: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        cursor: AtomicU64::new(0),
        steps: AtomicU64::new(0),
        touch: Mutex::new(Touch::default()),
        window: Mutex::new(Default::default()),
    });
    IMAGES.lock().insert(handle, loaded);
    let pages = gpns.len() as u64;
    // The VM's pending chunks hold the image now; their entries are written
    // on first touch (or by the prefetch).
    if diskpages::install_lazy(&vm.mem, handle, gpns).is_err() {
        IMAGES.lock().remove(&handle);
        vm.stop(crate::vm::STATUS_FAULT);
        return Err(PersistError::Vm(crate::vm::VmError::NoMemory));
    }
    Ok(pages)
}
