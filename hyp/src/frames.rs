//! Physical frame allocator over all RAM the hypervisor does not itself use
//! (its image, stacks and heap, and the host DTB). A bitmap per RAM bank:
//! O(1) free, next-fit allocation, and exact "is this frame free" answers for
//! leak checks. Lock level: frame allocator (innermost, DESIGN.md).

use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};
use platform::{Board, MemRange};
use spin::{Mutex, Once};

pub const PAGE_SIZE: u64 = 4096;

struct Bank {
    range: MemRange,
    /// One bit per frame, set = in use (or reserved).
    used: Vec<u64>,
    cursor: usize,
}

impl Bank {
    fn frames(&self) -> usize {
        (self.range.size / PAGE_SIZE) as usize
    }

    fn find_free(&mut self) -> Option<usize> {
        let words = self.used.len();
        for step in 0..=words {
            let w = (self.cursor / 64 + step) % words;
            let free = !self.used[w];
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
    free: AtomicUsize,
    total: AtomicUsize,
}

static FRAMES: Once<FrameAllocator> = Once::new();

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
            cursor: 0,
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
    FRAMES.call_once(|| FrameAllocator {
        banks: Mutex::new(banks),
        free: AtomicUsize::new(free),
        total: AtomicUsize::new(total),
    });
}

impl FrameAllocator {
    /// A frame, contents undefined.
    pub fn alloc(&self) -> Option<u64> {
        let mut banks = self.banks.lock();
        for bank in banks.iter_mut() {
            if let Some(idx) = bank.find_free() {
                bank.set(idx, true);
                self.free.fetch_sub(1, Ordering::Relaxed);
                return Some(bank.range.base + idx as u64 * PAGE_SIZE);
            }
        }
        None
    }

    /// `n` (a power of two) zeroed contiguous frames aligned to `n` frames,
    /// e.g. concatenated stage-2 root tables.
    pub fn alloc_contiguous_zeroed(&self, n: usize) -> Option<u64> {
        let mut banks = self.banks.lock();
        for bank in banks.iter_mut() {
            let first = (bank.range.base / PAGE_SIZE) as usize;
            let align = (n - first % n) % n;
            let mut idx = align;
            while idx + n <= bank.frames() {
                if (idx..idx + n).all(|i| bank.used[i / 64] & (1 << (i % 64)) == 0) {
                    (idx..idx + n).for_each(|i| {
                        bank.set(i, true);
                    });
                    self.free.fetch_sub(n, Ordering::Relaxed);
                    let pa = bank.range.base + idx as u64 * PAGE_SIZE;
                    (0..n as u64).for_each(|i| zero_frame(pa + i * PAGE_SIZE));
                    return Some(pa);
                }
                idx += n;
            }
        }
        None
    }

    /// A zeroed frame: nothing of a previous owner reaches the next one.
    pub fn alloc_zeroed(&self) -> Option<u64> {
        let pa = self.alloc()?;
        zero_frame(pa);
        Some(pa)
    }

    /// Returns a frame. Freeing a frame that is not allocated is a
    /// hypervisor bug and panics (it would hand one frame to two owners).
    pub fn free(&self, pa: u64) {
        let mut banks = self.banks.lock();
        let bank = banks
            .iter_mut()
            .find(|b| b.range.contains(pa))
            .expect("free of a non-RAM frame");
        let idx = ((pa - bank.range.base) / PAGE_SIZE) as usize;
        assert!(bank.set(idx, false), "double free of frame {pa:#x}");
        self.free.fetch_add(1, Ordering::Relaxed);
    }

    /// Turns `count` frames from `pa` that were reserved since boot (a boot
    /// image QEMU's loader put in RAM) into allocated frames owned by the
    /// caller, freed with `free` like any other. The caller must not also
    /// `release_reserved` them.
    pub fn take_reserved(&self, pa: u64, count: u64) {
        let banks = self.banks.lock();
        for i in 0..count {
            let frame = pa + i * PAGE_SIZE;
            let held = banks.iter().any(|b| {
                let idx = ((frame - b.range.base) / PAGE_SIZE) as usize;
                b.range.contains(frame) && b.used[idx / 64] & (1 << (idx % 64)) != 0
            });
            assert!(
                held,
                "take_reserved of frame {frame:#x}, which is not reserved"
            );
        }
        self.total.fetch_add(count as usize, Ordering::Relaxed);
    }

    /// Hands reserved frames in `range` (boot images already copied into a
    /// VM) to the allocator for good.
    pub fn release_reserved(&self, range: MemRange) {
        let mut banks = self.banks.lock();
        for bank in banks.iter_mut() {
            for i in 0..bank.frames() {
                let pa = bank.range.base + i as u64 * PAGE_SIZE;
                if pa >= range.base && pa + PAGE_SIZE <= range.end() && bank.set(i, false) {
                    self.free.fetch_add(1, Ordering::Relaxed);
                    self.total.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    pub fn free_count(&self) -> usize {
        self.free.load(Ordering::Relaxed)
    }

    pub fn total_count(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

/// Zeroes a frame through the hypervisor's identity map.
pub fn zero_frame(pa: u64) {
    // SAFETY: `pa` is a RAM frame this caller owns exclusively (just
    // allocated), identity mapped at EL2 as normal memory.
    unsafe { core::ptr::write_bytes(pa as *mut u8, 0, PAGE_SIZE as usize) };
}
