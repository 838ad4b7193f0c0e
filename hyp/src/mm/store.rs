//! The compressed page store: where reclaimed guest pages go (rmap's
//! `SwapStore`). Each page is compressed with LZ4 (`lz4_flex`, block format)
//! into a heap slot; a page that does not compress is kept raw; an all-zero
//! page is not stored at all but counted on the one shared zero slot
//! ([`ZERO_SLOT`]), and faults back in as a fresh zeroed frame (a "zero
//! marker", not a shared read-only zero frame: rmap's swap-in allocates a
//! frame per faulting VM anyway).
//!
//! Slots are reference-counted: reclaim of a frame mapped by N VMs stores it
//! once and all N swap entries point at that one slot (rmap takes one
//! reference per entry; a fork duplicates them). Swap-in takes a reference
//! of its own while its stage-2 lock still shows the entry (`try_dup`), so a
//! concurrent MEM_RELEASE cannot free the slot (and its number cannot be
//! reused for another page) while the fault reads it; it copies the slot into
//! a new frame (or the swap cache's), drops that entry's reference, then its
//! own. The last reference frees the slot.
//!
//! Lock level: allocator (innermost). Compression runs before the lock is
//! taken; the lock covers only the slot table (and the copy out on load).

use crate::mm::frames::PAGE_SIZE;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use rmap::{Pfn, SwapStore};
use spin::Mutex;

/// The slot every all-zero page shares. Its reference count is the number of
/// zero-marker entries in all stage-2 tables.
pub const ZERO_SLOT: u64 = 0;
/// Most bytes of page data the store keeps (the hypervisor heap is 64 MiB).
pub const STORE_BUDGET: u64 = 32 << 20;
const PAGE: usize = PAGE_SIZE as usize;
/// The output room `lz4_flex` wants for a 4 KiB input.
pub const MAX_COMPRESSED: usize = lz4_flex::block::get_maximum_output_size(PAGE);

enum Slot {
    Free,
    /// `data` is LZ4-compressed, or the raw page when `data.len() == PAGE`.
    Page {
        data: Box<[u8]>,
        refs: u32,
    },
}

struct Slots {
    slots: Vec<Slot>,
    free: Vec<u32>,
    zero_refs: u64,
}

pub struct PageStore {
    inner: Mutex<Slots>,
    /// Pages written compressed (or raw) into a slot, ever.
    pub stored: AtomicU64,
    /// All-zero pages reclaimed onto the zero slot, ever.
    pub zero_mapped: AtomicU64,
    /// Pages brought back by a fault (or a load), ever.
    pub swapped_in: AtomicU64,
    /// Bytes of slot data now held.
    pub bytes: AtomicU64,
}

pub static STORE: PageStore = PageStore {
    inner: Mutex::new(Slots {
        slots: Vec::new(),
        free: Vec::new(),
        zero_refs: 0,
    }),
    stored: AtomicU64::new(0),
    zero_mapped: AtomicU64::new(0),
    swapped_in: AtomicU64::new(0),
    bytes: AtomicU64::new(0),
};

/// The contents of frame `pfn`.
///
/// # Safety
///
/// `pfn` is a RAM frame (identity mapped at EL2) that nothing writes while
/// the returned slice lives: the caller holds it locked for reclaim with
/// every mapping replaced by a migration entry, or owns it.
unsafe fn page<'a>(pfn: Pfn) -> &'a [u8] {
    // SAFETY: this function's contract.
    unsafe { core::slice::from_raw_parts(pfn.pa().raw() as *const u8, PAGE) }
}

/// Frame `pfn` to fill.
///
/// # Safety
///
/// `pfn` is a RAM frame (identity mapped at EL2) the caller owns exclusively
/// while the returned slice lives: freshly allocated and not yet mapped.
unsafe fn page_mut<'a>(pfn: Pfn) -> &'a mut [u8] {
    // SAFETY: this function's contract.
    unsafe { core::slice::from_raw_parts_mut(pfn.pa().raw() as *mut u8, PAGE) }
}

/// Whether a page is all zero (word at a time).
pub fn is_zero(data: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any bit pattern is a valid u64; align_to only reinterprets
        // the aligned middle part.
        unsafe { data.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// LZ4-compresses `data` into `out`; returns the compressed length, or
/// `PAGE` if it did not get smaller (then `out` holds the raw page).
pub fn compress(data: &[u8], out: &mut [u8; MAX_COMPRESSED]) -> usize {
    match lz4_flex::block::compress_into(data, out) {
        Ok(n) if n < PAGE => n,
        _ => {
            out[..PAGE].copy_from_slice(data);
            PAGE
        }
    }
}

impl PageStore {
    /// Slots in use (the zero slot counts once while any entry refers to it).
    pub fn used_slots(&self) -> usize {
        let s = self.inner.lock();
        // Slot 0 (the zero slot) is never on the free list.
        s.slots.len().saturating_sub(s.free.len() + 1) + usize::from(s.zero_refs > 0)
    }

    /// Entries now pointing at the zero slot.
    pub fn zero_refs(&self) -> u64 {
        self.inner.lock().zero_refs
    }

    /// Decompresses (or copies) slot `slot` into `out`.
    fn copy_out(&self, slot: u64, out: &mut [u8]) {
        let s = self.inner.lock();
        let Some(Slot::Page { data, .. }) = s.slots.get(slot as usize) else {
            panic!("load of a free store slot {slot}");
        };
        if data.len() == PAGE {
            out.copy_from_slice(data);
        } else {
            let n = lz4_flex::block::decompress_into(data, out).expect("store slot corrupted");
            assert_eq!(n, PAGE, "store slot {slot} decompressed short");
        }
    }

    /// None if the slot table cannot grow (heap full): never panics.
    fn insert(&self, data: Box<[u8]>) -> Option<u64> {
        let mut s = self.inner.lock();
        // Room for the slot, and for its index on the free list when it is
        // released, so `put` never allocates.
        let (slots, free) = (s.slots.len(), s.free.len());
        if s.slots.try_reserve(2).is_err() || s.free.try_reserve(slots + 2 - free).is_err() {
            return None;
        }
        if s.slots.is_empty() {
            s.slots.push(Slot::Free); // slot 0 is the zero slot
        }
        let slot = Slot::Page { data, refs: 1 };
        Some(match s.free.pop() {
            Some(i) => {
                s.slots[i as usize] = slot;
                u64::from(i)
            }
            None => {
                s.slots.push(slot);
                s.slots.len() as u64 - 1
            }
        })
    }
}

impl SwapStore for PageStore {
    fn store(&self, pfn: Pfn) -> Option<u64> {
        // SAFETY: rmap stores only a frame its reclaim holds locked with
        // every mapping replaced by a migration entry: nothing writes it.
        let data = unsafe { page(pfn) };
        if is_zero(data) {
            let mut s = self.inner.lock();
            if s.slots.is_empty() {
                s.slots.push(Slot::Free);
            }
            s.zero_refs += 1;
            self.zero_mapped.fetch_add(1, Ordering::Relaxed);
            return Some(ZERO_SLOT);
        }
        let mut buf = [0u8; MAX_COMPRESSED];
        let n = compress(data, &mut buf);
        // The store lives on the hypervisor heap, which everything else
        // needs too: past its budget, a frame stays resident.
        if self.bytes.load(Ordering::Relaxed) + n as u64 > STORE_BUDGET {
            return None;
        }
        let mut boxed = Vec::new();
        if boxed.try_reserve_exact(n).is_err() {
            return None; // heap full: the frame stays resident
        }
        boxed.extend_from_slice(&buf[..n]);
        let slot = self.insert(boxed.into_boxed_slice())?;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.stored.fetch_add(1, Ordering::Relaxed);
        Some(slot)
    }

    fn load(&self, slot: u64, pfn: Pfn) {
        self.swapped_in.fetch_add(1, Ordering::Relaxed);
        // SAFETY: rmap loads only into a frame it just allocated for a
        // swap-in and maps only after the load returns.
        let out = unsafe { page_mut(pfn) };
        if crate::mm::diskpages::is_image(slot) {
            crate::mm::diskpages::load(slot, out);
        } else if slot == ZERO_SLOT {
            out.fill(0);
            // rmap's contract: clean to the PoC on return.
            crate::mm::memory::publish(pfn.pa(), PAGE_SIZE);
            return;
        } else {
            self.copy_out(slot, out);
        }
        // rmap's contract: clean to the PoC on return. The swapped-in page
        // is mapped execute-never; a fetch from it maintains the I-cache
        // then (`hypmm::Fetch`).
        crate::mm::memory::publish(pfn.pa(), PAGE_SIZE);
    }

    fn dup(&self, slot: u64) {
        assert!(self.try_dup(slot), "dup of a free store slot {slot}");
    }

    fn try_dup(&self, slot: u64) -> bool {
        if crate::mm::diskpages::is_image(slot) {
            return crate::mm::diskpages::dup(slot);
        }
        let mut s = self.inner.lock();
        if slot == ZERO_SLOT {
            // Live while any zero-marker entry refers to it.
            if s.zero_refs == 0 {
                return false;
            }
            s.zero_refs += 1;
            return true;
        }
        match s.slots.get_mut(slot as usize) {
            Some(Slot::Page { refs, .. }) => {
                *refs += 1;
                true
            }
            _ => false,
        }
    }

    fn refs(&self, slot: u64) -> Option<u32> {
        // Image pages too: each faulting VM reads its own copy.
        if slot == ZERO_SLOT || crate::mm::diskpages::is_image(slot) {
            return None; // a marker shared by every zero page, never cached
        }
        match self.inner.lock().slots.get(slot as usize) {
            Some(Slot::Page { refs, .. }) => Some(*refs),
            _ => Some(0),
        }
    }

    fn put(&self, slot: u64) {
        if crate::mm::diskpages::is_image(slot) {
            return crate::mm::diskpages::put(slot);
        }
        let mut s = self.inner.lock();
        if slot == ZERO_SLOT {
            assert!(s.zero_refs > 0, "put of the unreferenced zero slot");
            s.zero_refs -= 1;
            return;
        }
        let freed = match s.slots.get_mut(slot as usize) {
            Some(Slot::Page { refs, .. }) => {
                *refs -= 1;
                *refs == 0
            }
            _ => panic!("put of a free store slot {slot}"),
        };
        if freed {
            let old = core::mem::replace(&mut s.slots[slot as usize], Slot::Free);
            s.free.push(slot as u32);
            drop(s);
            if let Slot::Page { data, .. } = old {
                self.bytes.fetch_sub(data.len() as u64, Ordering::Relaxed);
            }
        }
    }
}
