//! The pools' segment directory: where segment `i` of a [`crate::pool::Pool`] lives.
//!
//! A flat array with one word per possible segment would cost 128 MiB for a pool of 2^32 slots,
//! so the directory has two levels, like a page table: a small top level (one word per
//! [`PER_BLOCK`] segments, allocated with the pool and sized by its cap) whose entries point to
//! blocks of [`PER_BLOCK`] segment words, each allocated the first time a segment in it is
//! built. A pool of a few hundred slots costs one 8 KiB block and a top level sized by its cap
//! (the hypervisor's cap for a 64 GiB host, 2^31 slots, takes 64 KiB); each further block
//! serves 262,144 slots.
//!
//! Entries only ever go from 0 to an address and stay until the pool is dropped, which is what
//! lets a lockless reader look a segment up through a stale handle with two Acquire loads.

use crate::sync::atomic::{AtomicUsize, Ordering};
use alloc::boxed::Box;
use alloc::vec::Vec;

/// Segment words per directory block (8 KiB of addresses).
pub const PER_BLOCK: usize = 1024;

/// One block: the addresses of [`PER_BLOCK`] consecutive segments (0: not built).
type Block = [AtomicUsize];

/// A two-level map from segment number to segment address.
pub struct SegmentDirectory {
    /// Entry `b` is the address of a leaked boxed [`Block`] of [`PER_BLOCK`] words, or 0.
    top: Box<[AtomicUsize]>,
}

impl SegmentDirectory {
    /// A directory with room for `segments` segments.
    pub fn new(segments: usize) -> Self {
        SegmentDirectory {
            top: (0..segments.div_ceil(PER_BLOCK))
                .map(|_| AtomicUsize::new(0))
                .collect(),
        }
    }

    /// The address of segment `seg`, or 0 if it is not built (or beyond the directory).
    pub fn get(&self, seg: usize) -> usize {
        match self.block(seg / PER_BLOCK) {
            Some(block) => block[seg % PER_BLOCK].load(Ordering::Acquire),
            None => 0,
        }
    }

    /// Publishes `addr` as segment `seg` (Release: the segment's slots were built before).
    /// False, changing nothing, if the block that would hold it could not be allocated.
    /// Segment numbers are claimed by one caller each, so the word itself is never contended;
    /// a block may be, and the loser of that race frees its copy.
    pub fn set(&self, seg: usize, addr: usize) -> bool {
        let Some(entry) = self.top.get(seg / PER_BLOCK) else {
            return false;
        };
        let block = match self.block(seg / PER_BLOCK) {
            Some(block) => block,
            None => {
                let mut words: Vec<AtomicUsize> = Vec::new();
                if words.try_reserve_exact(PER_BLOCK).is_err() {
                    return false;
                }
                words.extend((0..PER_BLOCK).map(|_| AtomicUsize::new(0)));
                let fresh = Box::leak(words.into_boxed_slice()).as_mut_ptr() as usize;
                if let Err(_won) =
                    entry.compare_exchange(0, fresh, Ordering::AcqRel, Ordering::Acquire)
                {
                    // SAFETY: `fresh` is the slice leaked just above, never published.
                    drop(unsafe { Self::unleak(fresh) });
                }
                self.block(seg / PER_BLOCK).expect("published above")
            }
        };
        block[seg % PER_BLOCK].store(addr, Ordering::Release);
        true
    }

    /// Every built segment's address (for the pool's drop).
    pub fn built(&mut self) -> impl Iterator<Item = usize> + '_ {
        self.top
            .iter()
            .map(|b| b.load(Ordering::Acquire))
            .filter(|&b| b != 0)
            // SAFETY: a non-zero top entry is a published block (see `block`), alive while
            // `self` is.
            .flat_map(|b| unsafe { Self::as_block(b) }.iter())
            .map(|s| s.load(Ordering::Acquire))
            .filter(|&s| s != 0)
    }

    fn block(&self, b: usize) -> Option<&Block> {
        let addr = self.top.get(b)?.load(Ordering::Acquire);
        // SAFETY: a non-zero top entry is a leaked boxed slice of PER_BLOCK words, published
        // with a CAS after it was initialised and freed only by `drop`, so it outlives `&self`.
        (addr != 0).then(|| unsafe { Self::as_block(addr) })
    }

    /// # Safety
    /// `addr` is a leaked boxed slice of [`PER_BLOCK`] words that outlives `'a`.
    unsafe fn as_block<'a>(addr: usize) -> &'a Block {
        // SAFETY: by the contract.
        unsafe { &*core::ptr::slice_from_raw_parts(addr as *const AtomicUsize, PER_BLOCK) }
    }

    /// # Safety
    /// `addr` is a leaked boxed slice of [`PER_BLOCK`] words no one else can reach.
    unsafe fn unleak(addr: usize) -> Box<Block> {
        // SAFETY: by the contract, it came from `Box::leak` of exactly this shape.
        unsafe {
            Box::from_raw(core::ptr::slice_from_raw_parts_mut(
                addr as *mut AtomicUsize,
                PER_BLOCK,
            ))
        }
    }
}

impl Drop for SegmentDirectory {
    fn drop(&mut self) {
        for entry in self.top.iter() {
            let addr = entry.swap(0, Ordering::Acquire);
            if addr != 0 {
                // SAFETY: `&mut self`: no reader is left, and the block was leaked by `set`.
                drop(unsafe { Self::unleak(addr) });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_in_far_blocks_cost_only_their_block() {
        let dir = SegmentDirectory::new(u32::MAX as usize / 256);
        assert_eq!(dir.top.len(), 16384, "2^32 slots: a 128 KiB top level");
        assert_eq!(dir.get(5), 0);
        assert!(dir.set(5, 0x1000));
        let far = 3 * PER_BLOCK + 7;
        assert_eq!(dir.get(far), 0, "its block is not built");
        assert!(dir.set(far, 0x2000));
        assert_eq!(
            (dir.get(5), dir.get(far), dir.get(far + 1)),
            (0x1000, 0x2000, 0)
        );
        let built = dir
            .top
            .iter()
            .filter(|b| b.load(Ordering::Relaxed) != 0)
            .count();
        assert_eq!(built, 2, "two blocks, not four");
    }

    #[test]
    fn beyond_the_directory_is_nothing_and_cannot_be_set() {
        let dir = SegmentDirectory::new(10);
        assert_eq!(dir.get(PER_BLOCK), 0);
        assert!(!dir.set(PER_BLOCK, 0x1000));
    }
}
