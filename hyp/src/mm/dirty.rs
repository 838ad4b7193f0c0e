//! The dirty log: which guest pages' stage-2 entries may differ from the VM's
//! latest snapshot, so a restore undoes exactly those (fuzzing-style reset).
//!
//! One bit per page of the VM's RAM, allocated (fallibly) when the VM gets a
//! snapshot to be relative to. A guest's fault only sets a bit, so the fault
//! path never allocates: the tree this replaces inserted a heap node per
//! first write, and a guest could run the hypervisor's heap dry with it. If
//! the bitmap cannot be allocated the log "overflows" and a restore re-forks
//! the VM from its snapshot instead.
//!
//! A restore clears a page's bit only once that page is the snapshot's again,
//! so a restore that fails partway leaves every unrestored page logged.

use crate::mm::frames::PAGE_SIZE;
use alloc::vec::Vec;
use platform::MemRange;
use rmap::Ipa;

pub struct DirtyLog {
    /// The snapshot the log is relative to.
    pub base: Option<u32>,
    /// The log cannot say what changed (no bitmap): restore re-forks.
    pub overflow: bool,
    ram: MemRange,
    bits: Vec<u64>,
}

impl DirtyLog {
    /// An empty log relative to nothing, for a VM with `ram`.
    pub const fn new(ram: MemRange) -> DirtyLog {
        DirtyLog {
            base: None,
            overflow: false,
            ram,
            bits: Vec::new(),
        }
    }

    fn words(&self) -> usize {
        (self.ram.size / PAGE_SIZE).div_ceil(64) as usize
    }

    /// From now on, log relative to snapshot `base` (None: log nothing).
    /// Allocates the bitmap on first use; without heap for it the log
    /// overflows, which only makes the next restore a full one.
    pub fn reset(&mut self, base: Option<u32>) {
        self.base = base;
        self.overflow = false;
        if base.is_none() {
            self.bits = Vec::new();
            return;
        }
        let words = self.words();
        if self.bits.len() != words {
            self.bits.clear();
            if self.bits.try_reserve_exact(words).is_err() {
                self.overflow = true;
                return;
            }
            self.bits.resize(words, 0);
        } else {
            self.bits.fill(0);
        }
    }

    /// The bit of `page`, if it is a page of RAM.
    fn bit(&self, page: u64) -> Option<(usize, u64)> {
        if !self.ram.contains(page) {
            return None;
        }
        let i = (page - self.ram.base) / PAGE_SIZE;
        Some(((i / 64) as usize, 1 << (i % 64)))
    }

    /// Logs guest page `page` (page aligned) as changed. Never allocates.
    pub fn note(&mut self, page: Ipa) {
        let page = page.raw();
        if self.base.is_none() || self.overflow {
            return;
        }
        if let Some((w, m)) = self.bit(page) {
            if let Some(word) = self.bits.get_mut(w) {
                *word |= m;
            }
        }
    }

    /// The page is the snapshot's again.
    pub fn clear(&mut self, page: Ipa) {
        let page = page.raw();
        if let Some((w, m)) = self.bit(page) {
            if let Some(word) = self.bits.get_mut(w) {
                *word &= !m;
            }
        }
    }

    /// The first logged page at or above `from`.
    pub fn next_from(&self, from: Ipa) -> Option<Ipa> {
        let start = from.raw().max(self.ram.base);
        if start >= self.ram.end() {
            return None;
        }
        let first = (start - self.ram.base) / PAGE_SIZE;
        let mut w = (first / 64) as usize;
        let mut word = *self.bits.get(w)? & (!0u64 << (first % 64));
        loop {
            if word != 0 {
                let i = w as u64 * 64 + u64::from(word.trailing_zeros());
                return Some(Ipa::new(self.ram.base + i * PAGE_SIZE));
            }
            w += 1;
            word = *self.bits.get(w)?;
        }
    }
}
