//! An interval index over page-offset ranges: what an `AnonVma` uses to find the chains whose
//! region covers a frame's page offset (Linux uses an augmented rbtree, `anon_vma->rb_root`).
//!
//! Entries are kept sorted by start in a vector that is read as an implicit balanced tree (node
//! = middle of a range), with each node storing the largest end in its subtree. A stabbing
//! query therefore skips subtrees that end before the offset and stops at starts beyond it:
//! `O(log n + k)`. Entries with equal starts stay in insertion order and the query visits them
//! in that order, so a region added later (a fork child) is walked after its parent: the
//! "new chains at the tail" ordering that the fork-vs-migration race relies on.
//! Insertion and removal rebuild the maxima in `O(n)`; they happen at fork and unlink, never on
//! the walk path.

use alloc::vec::Vec;
use core::ops::ControlFlow;

#[derive(Clone, Copy, Debug)]
struct Entry<V> {
    start: u64,
    end: u64,
    value: V,
}

/// Half-open ranges `[start, end)` of page offsets, each with a value.
#[derive(Debug)]
pub struct IntervalIndex<V> {
    entries: Vec<Entry<V>>,
    max_end: Vec<u64>,
}

impl<V> Default for IntervalIndex<V> {
    fn default() -> Self {
        IntervalIndex {
            entries: Vec::new(),
            max_end: Vec::new(),
        }
    }
}

impl<V: Copy + PartialEq> IntervalIndex<V> {
    /// Adds `[start, end)` after every entry with the same start.
    pub fn insert(&mut self, start: u64, end: u64, value: V) {
        #[cfg(not(feature = "mutate-chain-head-insert"))]
        let pos = self.entries.partition_point(|e| e.start <= start);
        // Broken variant (lesson 3): a new chain goes before the older ones of its start.
        #[cfg(feature = "mutate-chain-head-insert")]
        let pos = self.entries.partition_point(|e| e.start < start);
        self.entries.insert(pos, Entry { start, end, value });
        self.rebuild();
    }

    /// Removes the entry holding `value`; false if absent.
    pub fn remove(&mut self, value: V) -> bool {
        let Some(pos) = self.entries.iter().position(|e| e.value == value) else {
            return false;
        };
        self.entries.remove(pos);
        self.rebuild();
        true
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// All values in order.
    pub fn values(&self) -> impl Iterator<Item = V> + '_ {
        self.entries.iter().map(|e| e.value)
    }

    /// Visits, in order, the value of every range containing `offset`.
    pub fn stab<B>(&self, offset: u64, f: &mut impl FnMut(V) -> ControlFlow<B>) -> ControlFlow<B> {
        self.overlapping(offset, offset + 1, f)
    }

    /// Visits, in the same order as [`IntervalIndex::stab`], the value of every range that
    /// overlaps `[lo, hi)`: a batched walk visits each chain once for many offsets.
    pub fn overlapping<B>(
        &self,
        lo: u64,
        hi: u64,
        f: &mut impl FnMut(V) -> ControlFlow<B>,
    ) -> ControlFlow<B> {
        self.overlapping_in(0, self.entries.len(), lo, hi, f)
    }

    fn overlapping_in<B>(
        &self,
        from: usize,
        to: usize,
        lo: u64,
        hi: u64,
        f: &mut impl FnMut(V) -> ControlFlow<B>,
    ) -> ControlFlow<B> {
        if from >= to {
            return ControlFlow::Continue(());
        }
        let mid = from + (to - from) / 2;
        if self.max_end[mid] <= lo {
            return ControlFlow::Continue(());
        }
        self.overlapping_in(from, mid, lo, hi, f)?;
        let entry = &self.entries[mid];
        if entry.start >= hi {
            return ControlFlow::Continue(());
        }
        if lo < entry.end {
            f(entry.value)?;
        }
        self.overlapping_in(mid + 1, to, lo, hi, f)
    }

    fn rebuild(&mut self) {
        self.max_end.clear();
        self.max_end.resize(self.entries.len(), 0);
        self.fill(0, self.entries.len());
    }

    fn fill(&mut self, lo: usize, hi: usize) -> u64 {
        if lo >= hi {
            return 0;
        }
        let mid = lo + (hi - lo) / 2;
        let left = self.fill(lo, mid);
        let right = self.fill(mid + 1, hi);
        let max = self.entries[mid].end.max(left).max(right);
        self.max_end[mid] = max;
        max
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;

    fn collect(index: &IntervalIndex<u32>, offset: u64) -> Vec<u32> {
        let mut out = Vec::new();
        let _ = index.stab::<()>(offset, &mut |v| {
            out.push(v);
            ControlFlow::Continue(())
        });
        out
    }

    #[test]
    fn stab_matches_brute_force() {
        let mut index = IntervalIndex::default();
        let mut ranges = Vec::new();
        let mut seed = 12345u64;
        for value in 0..200u32 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let start = (seed >> 33) % 500;
            let len = 1 + (seed >> 20) % 60;
            index.insert(start, start + len, value);
            ranges.push((start, start + len, value));
            if value % 7 == 3 {
                let gone = ranges.remove(ranges.len() / 2);
                assert!(index.remove(gone.2));
            }
        }
        ranges.sort_by_key(|r| r.0); // stable: equal starts keep insertion order
        for offset in 0..600 {
            let expect: Vec<u32> = ranges
                .iter()
                .filter(|r| r.0 <= offset && offset < r.1)
                .map(|r| r.2)
                .collect();
            assert_eq!(collect(&index, offset), expect, "offset {offset}");
        }
    }

    #[test]
    fn overlapping_matches_brute_force() {
        let mut index = IntervalIndex::default();
        let mut ranges = Vec::new();
        let mut seed = 777u64;
        for value in 0..150u32 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let start = (seed >> 33) % 400;
            let len = 1 + (seed >> 20) % 80;
            index.insert(start, start + len, value);
            ranges.push((start, start + len, value));
        }
        ranges.sort_by_key(|r| r.0);
        for lo in (0..500).step_by(7) {
            for width in [1, 3, 40, 200] {
                let hi = lo + width;
                let expect: Vec<u32> = ranges
                    .iter()
                    .filter(|r| r.0 < hi && lo < r.1)
                    .map(|r| r.2)
                    .collect();
                let mut got = Vec::new();
                let _ = index.overlapping::<()>(lo, hi, &mut |v| {
                    got.push(v);
                    ControlFlow::Continue(())
                });
                assert_eq!(got, expect, "[{lo}, {hi})");
            }
        }
    }

    #[test]
    fn equal_starts_visit_in_insertion_order() {
        let mut index = IntervalIndex::default();
        for v in [5, 1, 9, 3] {
            index.insert(10, 20, v);
        }
        assert_eq!(collect(&index, 15), vec![5, 1, 9, 3]);
        assert!(collect(&index, 20).is_empty());
    }
}
