//! Swap slots that name a page of a snapshot image on the disk (issue 17):
//! every saved page of a VM loaded from the disk becomes a swap entry
//! (`PageState::Swapped`) whose slot says "page `gpn` of loaded image
//! `image`", so the ordinary stage-2 fault path's swap-in (rmap's
//! `handle_fault` → `SwapStore::load`) reads it from the disk, and fork,
//! release, reclaim and teardown treat it as any swap entry. The entries
//! are written per 2 MiB chunk on demand ([`Lazy`]): a load does nothing
//! per page before the VM runs.
//!
//! The slot's bit 51 (the top of the 52 a stage-2 software entry holds) tags
//! this namespace; bits 32..51 are the image handle, bits 0..32 the page.
//! References are counted per image (every entry holds one; a fork dups
//! them), and the last one gone tells the image's owner (`persist`, above
//! `mm`, reached through the [`ImageSource`] it installs) to drop it.
//! `refs` answers `None` for these slots: the swap cache never shares one,
//! each faulting VM reads its own copy (as for the zero slot).
//!
//! `SwapStore::load` cannot fail, but a page whose checksum fails must never
//! reach the guest as if it were good: the frame is zero-filled and the
//! failure recorded for this CPU; the stage-2 fault's caller
//! ([`take_failure`]) stops that VM before it runs again.

use crate::mm::frames::PAGE_SIZE;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use platform::board::MAX_CPUS;
use rmap::{Ipa, PageState, Stage2, Stage2Locked};
use spin::{Mutex, Once};

/// Tags a slot as a disk-image page.
pub const IMAGE_TAG: u64 = 1 << 51;
/// Handles fit in bits 32..51.
pub const MAX_HANDLE: u32 = (1 << 19) - 1;

/// Where image pages come from: `persist`'s loaded images.
pub trait ImageSource: Sync {
    /// Reads page `gpn` of image `image` into `out`, verified; false if it
    /// cannot (device error, checksum, no such page): `out` is then zeros.
    fn read(&self, image: u32, gpn: u32, out: &mut [u8; PAGE_SIZE as usize]) -> bool;
    /// No entry names `image` any more.
    fn release(&self, image: u32);
}

static SOURCE: Once<&'static dyn ImageSource> = Once::new();
/// Entries (and in-flight faults) per image handle. Allocator level (a
/// leaf): nothing is called with it held.
static REFS: Mutex<BTreeMap<u32, u64>> = Mutex::new(BTreeMap::new());
/// Per CPU: the last failed image load here, as `slot + 1` (0: none).
static FAILED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Image pages read by faults or prefetch, ever.
pub static LOADED: AtomicU64 = AtomicU64::new(0);

/// Installs the source of image pages (once, by `persist`).
pub fn set_source(source: &'static dyn ImageSource) {
    SOURCE.call_once(|| source);
}

/// The slot naming page `gpn` of image `image`.
pub fn slot(image: u32, gpn: u32) -> u64 {
    IMAGE_TAG | (u64::from(image & MAX_HANDLE) << 32) | u64::from(gpn)
}

/// Whether `slot` names a disk-image page.
pub fn is_image(slot: u64) -> bool {
    slot & IMAGE_TAG != 0
}

fn split(slot: u64) -> (u32, u32) {
    (((slot >> 32) as u32) & MAX_HANDLE, slot as u32)
}

/// The failed image load on this CPU since the last call, as (image, gpn).
pub fn take_failure() -> Option<(u32, u32)> {
    let cpu = crate::arch::percpu::cpu_index();
    let v = FAILED.get(cpu)?.swap(0, Ordering::Relaxed);
    (v != 0).then(|| split(v - 1))
}

pub(crate) fn load(slot: u64, out: &mut [u8]) {
    LOADED.fetch_add(1, Ordering::Relaxed);
    let (image, gpn) = split(slot);
    let ok = match (SOURCE.get(), <&mut [u8; PAGE_SIZE as usize]>::try_from(out)) {
        (Some(src), Ok(page)) => {
            src.read(image, gpn, page) || {
                page.fill(0);
                false
            }
        }
        (_, Ok(page)) => {
            page.fill(0);
            false
        }
        (_, Err(_)) => false,
    };
    if !ok {
        if let Some(f) = FAILED.get(crate::arch::percpu::cpu_index()) {
            f.store(slot + 1, Ordering::Relaxed);
        }
    }
}

pub(crate) fn dup(slot: u64) -> bool {
    match REFS.lock().get_mut(&split(slot).0) {
        Some(n) => {
            *n += 1;
            true
        }
        None => false,
    }
}

pub(crate) fn put(slot: u64) {
    let image = split(slot).0;
    let gone = {
        let mut refs = REFS.lock();
        let n = refs
            .get_mut(&image)
            .unwrap_or_else(|| panic!("put of an unreferenced image slot {slot:#x}"));
        *n -= 1;
        *n == 0 && refs.remove(&image).is_some()
    };
    if gone {
        if let Some(src) = SOURCE.get() {
            src.release(image);
        }
    }
}

/// Why an install stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallError {
    /// No frame for a stage-2 table page, or heap for the count.
    NoMemory,
}

/// A loaded VM's image pages whose swap entries are not in its stage 2 yet,
/// by 2 MiB chunk of its RAM. A load only records them ([`install_lazy`]),
/// so the VM runs at once; a chunk's entries are written on the first fault
/// in it ([`ensure`], before the fault path could take the empty chunk for
/// a demand-zero first touch), by the prefetcher, or all at once before
/// anything walks or copies the whole table ([`complete`]: fork, snapshot,
/// save) or replaces it ([`drop_pending`]: restore's reset, teardown).
/// The pending set holds one reference to the image, so it stays loaded.
#[derive(Default)]
pub struct Lazy {
    /// Some chunk is pending: the one check a fault makes otherwise.
    any: AtomicBool,
    /// Lock level: above the VM's stage-2 lock and the allocators (a chunk's
    /// entries are written with it held); taken with no memory-manager lock
    /// held (faults, fork, release and teardown enter with none).
    set: Mutex<Option<Pending>>,
}

struct Pending {
    image: u32,
    /// The image's pages, ascending.
    gpns: Vec<u32>,
    /// Per chunk of RAM: its entries are not installed yet.
    bits: Vec<u64>,
    left: usize,
    /// A chunk whose install stopped half way (no memory), and the index
    /// in `gpns` it resumes from.
    resume: Option<(usize, usize)>,
}

/// Pages in a 2 MiB chunk.
const CHUNK_PAGES: u32 = (crate::mm::memory::BLOCK_SIZE / PAGE_SIZE) as u32;

/// Makes `gpns` (ascending, pages from `vm`'s RAM base) pages of `image`
/// that `vm`, a fresh VM no vCPU runs yet, reads from the disk on first
/// touch; no entry is written yet.
pub fn install_lazy(
    vm: &crate::mm::VmMemory,
    image: u32,
    gpns: Vec<u32>,
) -> Result<(), InstallError> {
    debug_assert!(gpns.windows(2).all(|w| w[0] < w[1]));
    let chunks = gpns.last().map_or(0, |&g| (g / CHUNK_PAGES) as usize + 1);
    let mut bits = Vec::new();
    bits.try_reserve_exact(chunks.div_ceil(64))
        .map_err(|_| InstallError::NoMemory)?;
    bits.resize(chunks.div_ceil(64), 0u64);
    let mut left = 0;
    for c in gpns.iter().map(|&g| (g / CHUNK_PAGES) as usize) {
        if bits[c / 64] & (1 << (c % 64)) == 0 {
            bits[c / 64] |= 1 << (c % 64);
            left += 1;
        }
    }
    {
        let mut refs = REFS.lock();
        if refs.contains_key(&image) {
            return Err(InstallError::NoMemory); // handles are never reused while live
        }
        // The pending set's own reference.
        refs.insert(image, 1);
    }
    let mut set = vm.lazy.set.lock();
    *set = Some(Pending {
        image,
        gpns,
        bits,
        left,
        resume: None,
    });
    vm.lazy.any.store(true, Ordering::Release);
    drop(set);
    if left == 0 {
        drop_pending(vm);
    }
    Ok(())
}

/// The fault path's hook: writes the entries of `ipa`'s chunk if they are
/// still pending.
pub fn ensure(vm: &crate::mm::VmMemory, ipa: Ipa) -> Result<(), InstallError> {
    if !vm.lazy.any.load(Ordering::Acquire) {
        return Ok(());
    }
    let chunk = ((ipa.raw().wrapping_sub(vm.ram.base)) / crate::mm::memory::BLOCK_SIZE) as usize;
    ensure_chunks(vm, chunk..chunk + 1)
}

/// Writes every pending chunk's entries (before fork, snapshot or save
/// walk the table).
pub fn complete(vm: &crate::mm::VmMemory) -> Result<(), InstallError> {
    ensure_chunks(vm, 0..usize::MAX)
}

/// Writes the entries of the pending chunks that `[start, start + len)`
/// touches (before a release, which must not leave a chunk that would
/// later bring back the released pages' old contents).
pub fn ensure_range(vm: &crate::mm::VmMemory, start: Ipa, len: u64) -> Result<(), InstallError> {
    if !vm.lazy.any.load(Ordering::Acquire) || len == 0 {
        return Ok(());
    }
    let off = start.raw().saturating_sub(vm.ram.base);
    let block = crate::mm::memory::BLOCK_SIZE;
    let first = (off / block) as usize;
    let last = (off.saturating_add(len - 1) / block) as usize;
    ensure_chunks(vm, first..last.saturating_add(1))
}

fn ensure_chunks(
    vm: &crate::mm::VmMemory,
    chunks: core::ops::Range<usize>,
) -> Result<(), InstallError> {
    let mut set = vm.lazy.set.lock();
    let Some(p) = set.as_mut() else {
        return Ok(());
    };
    let end = chunks.end.min(p.bits.len() * 64);
    for c in chunks.start..end {
        if p.bits[c / 64] & (1 << (c % 64)) != 0 {
            install_chunk(vm, p, c)?;
            p.bits[c / 64] &= !(1 << (c % 64));
            p.left -= 1;
        }
    }
    if p.left == 0 {
        drop(set);
        drop_pending(vm);
    }
    Ok(())
}

/// Writes chunk `c`'s entries (from where a failed attempt stopped).
fn install_chunk(vm: &crate::mm::VmMemory, p: &mut Pending, c: usize) -> Result<(), InstallError> {
    const BATCH: usize = 256;
    let lo = (c as u32).saturating_mul(CHUNK_PAGES);
    let mut from = p.gpns.partition_point(|&g| g < lo);
    if let Some((rc, ri)) = p.resume.take() {
        if rc == c {
            from = ri;
        } else {
            p.resume = Some((rc, ri));
        }
    }
    let to = p
        .gpns
        .partition_point(|&g| g < lo.saturating_add(CHUNK_PAGES));
    let mut leaves = Vec::new();
    leaves
        .try_reserve_exact(BATCH)
        .map_err(|_| InstallError::NoMemory)?;
    let base = Ipa::new(vm.ram.base);
    while from < to {
        let batch = &p.gpns[from..to.min(from + BATCH)];
        crate::mm::memory::refill_reserve();
        leaves.clear();
        leaves.extend(batch.iter().map(|&g| {
            let slot = slot(p.image, g);
            (
                base + u64::from(g) * PAGE_SIZE,
                1,
                PageState::Swapped { slot },
            )
        }));
        // References first: teardown of a half-filled VM puts each entry's.
        *REFS.lock().entry(p.image).or_insert(0) += batch.len() as u64;
        let n = vm.lock().fill_leaves(&leaves);
        from += n;
        if n < batch.len() {
            *REFS.lock().entry(p.image).or_insert(0) -= (batch.len() - n) as u64;
            p.resume = Some((c, from));
            return Err(InstallError::NoMemory);
        }
    }
    Ok(())
}

/// Forgets `vm`'s pending chunks (every chunk installed, or the VM's
/// memory is being replaced or torn down) and drops their reference.
pub fn drop_pending(vm: &crate::mm::VmMemory) {
    if !vm.lazy.any.load(Ordering::Acquire) {
        return;
    }
    let gone = {
        let mut set = vm.lazy.set.lock();
        vm.lazy.any.store(false, Ordering::Release);
        set.take()
    };
    if let Some(p) = gone {
        put(slot(p.image, 0));
    }
}

/// The image page `ipa` of `vm` still waits for, if any (the prefetcher's
/// check that it still has something to do there).
pub fn pending(vm: &crate::mm::VmMemory, ipa: Ipa) -> Option<(u32, u32)> {
    // A chunk not installed yet is installed first (None if that fails: the
    // guest's own fault tries again).
    ensure(vm, ipa).ok()?;
    match vm.lock().lookup(ipa) {
        PageState::Swapped { slot } if is_image(slot) => Some(split(slot)),
        _ => None,
    }
}
