//! Swap slots that name a page of a snapshot image on the disk (issue 17):
//! a VM loaded from the disk starts with every saved page as a swap entry
//! (`PageState::Swapped`) whose slot says "page `gpn` of loaded image
//! `image`", so the ordinary stage-2 fault path's swap-in (rmap's
//! `handle_fault` → `SwapStore::load`) reads it from the disk, and fork,
//! release, reclaim and teardown treat it as any swap entry.
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
use core::sync::atomic::{AtomicU64, Ordering};
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

/// Why [`install`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallError {
    /// No frame for a stage-2 table page, or heap for the count.
    NoMemory,
}

/// Makes each of `gpns` (pages from `vm`'s RAM base) a swap entry naming
/// that page of `image`, in `vm`'s empty stage 2 (a fresh VM no vCPU runs).
/// Returns the pages installed; on an error those installed stay (the
/// caller tears the VM down, which drops their references).
pub fn install(vm: &crate::mm::VmMemory, image: u32, gpns: &[u32]) -> Result<u64, InstallError> {
    const BATCH: usize = 256;
    {
        let mut refs = REFS.lock();
        if refs.contains_key(&image) {
            return Err(InstallError::NoMemory); // handles are never reused while live
        }
        // The count starts at one for the caller, so an install that fails
        // half way cannot release the image under it.
        refs.insert(image, 1);
    }
    let mut done = 0u64;
    let mut leaves = alloc::vec::Vec::new();
    if leaves.try_reserve_exact(BATCH).is_err() {
        return Err(InstallError::NoMemory);
    }
    let base = Ipa::new(vm.ram.base);
    for chunk in gpns.chunks(BATCH) {
        crate::mm::memory::refill_reserve();
        leaves.clear();
        leaves.extend(chunk.iter().map(|&g| {
            let ipa = base + u64::from(g) * PAGE_SIZE;
            (
                ipa,
                1,
                PageState::Swapped {
                    slot: slot(image, g),
                },
            )
        }));
        // References first: teardown of a half-filled VM puts each entry's.
        *REFS.lock().entry(image).or_insert(0) += chunk.len() as u64;
        let n = vm.lock().fill_leaves(&leaves);
        done += n as u64;
        if n < chunk.len() {
            *REFS.lock().entry(image).or_insert(0) -= (chunk.len() - n) as u64;
            return Err(InstallError::NoMemory);
        }
    }
    Ok(done)
}

/// Drops the caller's own reference [`install`] took (once the VM holds its
/// entries, or is gone).
pub fn release_install(image: u32) {
    put(slot(image, 0));
}

/// The image page `ipa` of `vm` still waits for, if any (the prefetcher's
/// check that it still has something to do there).
pub fn pending(vm: &crate::mm::VmMemory, ipa: Ipa) -> Option<(u32, u32)> {
    match vm.lock().lookup(ipa) {
        PageState::Swapped { slot } if is_image(slot) => Some(split(slot)),
        _ => None,
    }
}
