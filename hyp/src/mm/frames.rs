//! Physical frame allocator over all RAM the hypervisor does not itself use
//! (its image, stacks and heap, and the host DTB). A bitmap per RAM bank:
//! O(1) free, next-fit allocation, and exact "is this frame free" answers for
//! leak checks. Lock level: frame allocator (innermost, DESIGN.md).
//!
//! Movable and unmovable frames are kept apart (Linux's migratetypes, in
//! miniature): guest frames, which the reverse map can migrate, come from the
//! bottom of RAM upwards; stage-2 tables and other hypervisor frames, which
//! nothing can move, from the top downwards. So `evacuate` of a low range
//! finds guest frames, not tables. An "offline" bitmap keeps the allocator out
//! of an evacuated range until it is put online again.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};
use platform::{Board, MemRange};
use rmap::Pa;

pub use super::frameops::{copy_frame, frame_hash, frames_equal, zero_frame};
use spin::{Mutex, Once};

pub const PAGE_SIZE: u64 = 4096;

struct Bank {
    range: MemRange,
    /// One bit per frame, set = in use (or reserved).
    used: Vec<u64>,
    /// One bit per frame, set = offline: never handed out (evacuated range).
    offline: Vec<u64>,
    cursor: usize,
    /// Next-fit cursor of unmovable allocations, going down.
    top: usize,
}

impl Bank {
    fn frames(&self) -> usize {
        (self.range.size / PAGE_SIZE) as usize
    }

    fn find_free(&mut self) -> Option<usize> {
        let words = self.used.len();
        for step in 0..=words {
            let w = (self.cursor / 64 + step) % words;
            let free = !(self.used[w] | self.offline[w]);
            if free == 0 {
                continue;
            }
            let bit = free.trailing_zeros() as usize;
            let idx = w * 64 + bit;
            if idx < self.frames() {
                self.cursor = idx;
                return Some(idx);
            }
        }
        None
    }

    /// The first free run of `n` frames at `skip` plus a multiple of `align`,
    /// highest first if `top`: frame by frame.
    fn find_run(&self, n: usize, align: usize, skip: usize, top: bool) -> Option<usize> {
        if self.frames() < skip + n {
            return None;
        }
        let runs = (self.frames() - skip - n) / align + 1;
        (0..runs)
            .map(|r| skip + align * if top { runs - 1 - r } else { r })
            .find(|&idx| (idx..idx + n).all(|i| !self.is_used(i) && !self.is_offline(i)))
    }

    /// [`Bank::find_run`] where every candidate run lies inside one bitmap
    /// word (`n` <= `align`, `align` divides 64, `skip` 0): the same run,
    /// found a word at a time, so the used frames at the top of RAM (the
    /// heap, other VMs' tables), which every stage-2 root allocation passes
    /// over, cost one test per 64 frames, not one per candidate (a fork spent
    /// ~31,000 instructions here).
    fn find_run_in_words(&self, n: usize, align: usize, top: bool) -> Option<usize> {
        let words = self.used.len();
        let mask = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
        let per_word = 64 / align;
        for step in 0..words {
            let w = if top { words - 1 - step } else { step };
            let busy = self.used[w] | self.offline[w];
            if busy == u64::MAX {
                continue;
            }
            for k in 0..per_word {
                let off = align * if top { per_word - 1 - k } else { k };
                let idx = w * 64 + off;
                if busy & (mask << off) == 0 && idx + n <= self.frames() {
                    return Some(idx);
                }
            }
        }
        None
    }

    /// Like `find_free`, from the top of the bank downwards (unmovable frames).
    fn find_free_top(&mut self) -> Option<usize> {
        let words = self.used.len();
        for step in 0..=words {
            let w = (self.top / 64 + words - step % words) % words;
            let mut free = !(self.used[w] | self.offline[w]);
            while free != 0 {
                let bit = 63 - free.leading_zeros() as usize;
                let idx = w * 64 + bit;
                if idx < self.frames() {
                    self.top = idx;
                    return Some(idx);
                }
                free &= !(1 << bit);
            }
        }
        None
    }

    fn is_used(&self, idx: usize) -> bool {
        self.used[idx / 64] & (1 << (idx % 64)) != 0
    }

    fn is_offline(&self, idx: usize) -> bool {
        self.offline[idx / 64] & (1 << (idx % 64)) != 0
    }

    fn set_offline(&mut self, idx: usize, offline: bool) -> bool {
        let (w, b) = (idx / 64, idx % 64);
        let was = self.offline[w] & (1 << b) != 0;
        if offline {
            self.offline[w] |= 1 << b;
        } else {
            self.offline[w] &= !(1 << b);
        }
        was
    }

    /// Frame indices of this bank inside `[base, end)`.
    fn indices(&self, base: u64, end: u64) -> core::ops::Range<usize> {
        let lo = base.clamp(self.range.base, self.range.end());
        let hi = end.clamp(self.range.base, self.range.end());
        let first = (lo - self.range.base).div_ceil(PAGE_SIZE) as usize;
        let last = ((hi - self.range.base) / PAGE_SIZE) as usize;
        first..last.max(first)
    }

    fn set(&mut self, idx: usize, used: bool) -> bool {
        let (w, b) = (idx / 64, idx % 64);
        let was = self.used[w] & (1 << b) != 0;
        if used {
            self.used[w] |= 1 << b;
        } else {
            self.used[w] &= !(1 << b);
        }
        was
    }
}

pub struct FrameAllocator {
    banks: Mutex<Vec<Bank>>,
    /// The lowest frame free at boot (above the hypervisor's own memory).
    first_free: u64,
    free: AtomicUsize,
    total: AtomicUsize,
}

static FRAMES: Once<FrameAllocator> = Once::new();

/// The frame allocator, once `init` has run (the heap grows from it).
pub fn try_get() -> Option<&'static FrameAllocator> {
    FRAMES.get()
}

pub fn get() -> &'static FrameAllocator {
    FRAMES.get().expect("frame allocator not initialised")
}

/// Builds the allocator over the board's RAM minus `reserved` ranges.
pub fn init(board: &Board, reserved: &[MemRange]) {
    let mut banks = Vec::new();
    let mut free = 0;
    for range in &board.ram {
        let n = (range.size / PAGE_SIZE) as usize;
        let mut bank = Bank {
            range: *range,
            used: alloc::vec![0; n.div_ceil(64)],
            offline: alloc::vec![0; n.div_ceil(64)],
            cursor: 0,
            top: n.saturating_sub(1),
        };
        for i in 0..n {
            let pa = range.base + i as u64 * PAGE_SIZE;
            if reserved
                .iter()
                .any(|r| pa + PAGE_SIZE > r.base && pa < r.end())
            {
                bank.set(i, true);
            } else {
                free += 1;
            }
        }
        banks.push(bank);
    }
    let total = free;
    // The start of the longest free run at boot (past the hypervisor).
    let mut first_free = 0;
    let mut best = 0;
    for b in &banks {
        let mut run_start = 0;
        for i in 0..=b.frames() {
            if i == b.frames() || b.is_used(i) {
                if i - run_start > best {
                    best = i - run_start;
                    first_free = b.range.base + run_start as u64 * PAGE_SIZE;
                }
                run_start = i + 1;
            }
        }
    }
    FRAMES.call_once(|| FrameAllocator {
        banks: Mutex::new(banks),
        first_free,
        free: AtomicUsize::new(free),
        total: AtomicUsize::new(total),
    });
}

impl FrameAllocator {
    /// A movable frame (guest memory), contents undefined.
    pub fn alloc(&self) -> Option<Pa> {
        let mut banks = self.banks.lock();
        for bank in banks.iter_mut() {
            if let Some(idx) = bank.find_free() {
                bank.set(idx, true);
                self.free.fetch_sub(1, Ordering::Relaxed);
                return Some(Pa::new(bank.range.base + idx as u64 * PAGE_SIZE));
            }
        }
        None
    }

    /// An unmovable frame (stage-2 table, hypervisor object), contents
    /// undefined: taken from the top of RAM, away from guest frames.
    pub fn alloc_unmovable(&self) -> Option<Pa> {
        let mut banks = self.banks.lock();
        for bank in banks.iter_mut().rev() {
            if let Some(idx) = bank.find_free_top() {
                bank.set(idx, true);
                self.free.fetch_sub(1, Ordering::Relaxed);
                return Some(Pa::new(bank.range.base + idx as u64 * PAGE_SIZE));
            }
        }
        None
    }

    /// `n` (a power of two) zeroed contiguous movable frames aligned to `n`
    /// frames (a guest's 2 MiB block), lowest first.
    pub fn alloc_contiguous_zeroed(&self, n: usize) -> Option<Pa> {
        self.alloc_run_zeroed(n, n, false)
    }

    /// `n` (a power of two) contiguous movable frames aligned to `n` frames,
    /// lowest first, contents undefined: a block migration's target, which
    /// the copy overwrites whole (zeroing it first would double the work).
    pub fn alloc_contiguous(&self, n: usize) -> Option<Pa> {
        self.take_run(n, n, false)
    }

    /// `n` (a power of two) zeroed contiguous unmovable frames aligned to `n`
    /// frames (concatenated stage-2 root tables), highest first.
    pub fn alloc_contiguous_zeroed_unmovable(&self, n: usize) -> Option<Pa> {
        self.alloc_run_zeroed(n, n, true)
    }

    /// `n` zeroed contiguous unmovable frames whose first is aligned to
    /// `align` frames (a power of two), highest first: the heap's growth.
    pub fn alloc_run_zeroed_unmovable(&self, n: usize, align: usize) -> Option<Pa> {
        self.alloc_run_zeroed(n, align, true)
    }

    fn alloc_run_zeroed(&self, n: usize, align: usize, top: bool) -> Option<Pa> {
        let pa = self.take_run(n, align, top)?;
        // SAFETY: the run was free and is now marked used, so these frames
        // are this caller's alone.
        (0..n as u64).for_each(|i| unsafe { zero_frame(pa + i * PAGE_SIZE) });
        Some(pa)
    }

    /// Marks a free run of `n` frames, the first aligned to `align`, used.
    fn take_run(&self, n: usize, align: usize, top: bool) -> Option<Pa> {
        let mut banks = self.banks.lock();
        let count = banks.len();
        for b in 0..count {
            let bank = &mut banks[if top { count - 1 - b } else { b }];
            let first = (bank.range.base / PAGE_SIZE) as usize;
            let skip = (align - first % align) % align;
            let found = if skip == 0 && n <= align && 64 % align == 0 {
                bank.find_run_in_words(n, align, top)
            } else {
                bank.find_run(n, align, skip, top)
            };
            let Some(idx) = found else {
                continue;
            };
            (idx..idx + n).for_each(|i| {
                bank.set(i, true);
            });
            self.free.fetch_sub(n, Ordering::Relaxed);
            return Some(Pa::new(bank.range.base + idx as u64 * PAGE_SIZE));
        }
        None
    }

    /// A zeroed unmovable frame (stage-2 tables): nothing of a previous
    /// owner reaches the next one.
    pub fn alloc_zeroed(&self) -> Option<Pa> {
        let pa = self.alloc_unmovable()?;
        // SAFETY: just allocated: nothing else has this frame.
        unsafe { zero_frame(pa) };
        Some(pa)
    }

    /// Returns a frame. Freeing a frame that is not allocated is a
    /// hypervisor bug and panics (it would hand one frame to two owners).
    pub fn free(&self, pa: Pa) {
        let (pa, mut banks) = (pa.raw(), self.banks.lock());
        let bank = banks
            .iter_mut()
            .find(|b| b.range.contains(pa))
            .expect("free of a non-RAM frame");
        let idx = ((pa - bank.range.base) / PAGE_SIZE) as usize;
        assert!(bank.set(idx, false), "double free of frame {pa:#x}");
        if !bank.is_offline(idx) {
            self.free.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Returns `n` contiguous frames from `pa` under one lock hold (a folio
    /// that moved whole), as `free` returns one.
    pub fn free_run(&self, pa: Pa, n: usize) {
        let (pa, mut banks) = (pa.raw(), self.banks.lock());
        let bank = banks
            .iter_mut()
            .find(|b| b.range.contains(pa) && b.range.contains(pa + (n as u64 - 1) * PAGE_SIZE))
            .expect("free of a run not inside one RAM bank");
        let first = ((pa - bank.range.base) / PAGE_SIZE) as usize;
        let mut online = 0;
        for idx in first..first + n {
            let at = pa + (idx - first) as u64 * PAGE_SIZE;
            assert!(bank.set(idx, false), "double free of frame {at:#x}");
            online += usize::from(!bank.is_offline(idx));
        }
        self.free.fetch_add(online, Ordering::Relaxed);
    }

    /// Takes the frames of `[base, end)` away from allocation (freed frames
    /// in it stay out too) until `online`. Returns (frames now offline,
    /// of which still in use).
    pub fn offline(&self, base: u64, end: u64) -> (usize, usize) {
        let mut banks = self.banks.lock();
        let (mut total, mut used) = (0, 0);
        for bank in banks.iter_mut() {
            for i in bank.indices(base, end) {
                total += 1;
                if bank.is_used(i) {
                    used += 1;
                }
                if !bank.set_offline(i, true) && !bank.is_used(i) {
                    self.free.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        (total, used)
    }

    /// Gives the frames of `[base, end)` back to the allocator. Returns how
    /// many were offline.
    pub fn online(&self, base: u64, end: u64) -> usize {
        let mut banks = self.banks.lock();
        let mut count = 0;
        for bank in banks.iter_mut() {
            for i in bank.indices(base, end) {
                if bank.set_offline(i, false) {
                    count += 1;
                    if !bank.is_used(i) {
                        self.free.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        count
    }

    /// The frames of `[base, end)` in use, as physical addresses (at most
    /// `max` of them).
    pub fn used_in(&self, base: u64, end: u64, max: usize) -> Vec<u64> {
        // Sized before the lock: the heap may grow from frames, so nothing
        // may allocate while this allocator's lock is held.
        let span = (end.saturating_sub(base) / PAGE_SIZE) as usize;
        let mut out = Vec::with_capacity(span.min(max));
        let banks = self.banks.lock();
        for bank in banks.iter() {
            for i in bank.indices(base, end) {
                if bank.is_used(i) && out.len() < max {
                    out.push(bank.range.base + i as u64 * PAGE_SIZE);
                }
            }
        }
        out
    }

    /// Where the longest run of frames free at boot starts: guest
    /// (movable) frames are allocated upwards from here.
    pub fn first_free(&self) -> u64 {
        self.first_free
    }

    /// Whether `pa` is a RAM frame this allocator manages.
    pub fn is_ram(&self, pa: u64) -> bool {
        self.banks.lock().iter().any(|b| b.range.contains(pa))
    }

    /// Frames currently offline: (all, of which free).
    pub fn offline_count(&self) -> (usize, usize) {
        let banks = self.banks.lock();
        let mut all = 0;
        let mut free = 0;
        for b in banks.iter() {
            for (o, u) in b.offline.iter().zip(&b.used) {
                all += o.count_ones() as usize;
                free += (o & !u).count_ones() as usize;
            }
        }
        (all, free)
    }

    pub fn free_count(&self) -> usize {
        self.free.load(Ordering::Relaxed)
    }

    pub fn total_count(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}
