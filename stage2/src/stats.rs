//! Counters of a stage-2 table.

use crate::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A snapshot of a table's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Table pages in use, including the (possibly concatenated) root pages.
    pub table_pages: u64,
    /// Valid 4 KiB page descriptors.
    pub mapped_pages: u64,
    /// Valid 2 MiB block descriptors.
    pub mapped_blocks_2m: u64,
    /// Valid 1 GiB block descriptors.
    pub mapped_blocks_1g: u64,
    /// Software entries (migration, swap, zero, locked).
    pub software_entries: u64,
}

impl Stats {
    /// Bytes of guest IPA space mapped by valid leaves.
    pub fn mapped_bytes(&self) -> u64 {
        (self.mapped_pages << 12) + (self.mapped_blocks_2m << 21) + (self.mapped_blocks_1g << 30)
    }
}

/// The live counters.
#[derive(Default)]
pub(crate) struct Counters {
    pub table_pages: AtomicU64,
    /// Indexed by level (1, 2, 3 used).
    pub leaves: [AtomicU64; 4],
    pub software: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> Stats {
        Stats {
            table_pages: self.table_pages.load(Relaxed),
            mapped_pages: self.leaves[3].load(Relaxed),
            mapped_blocks_2m: self.leaves[2].load(Relaxed),
            mapped_blocks_1g: self.leaves[1].load(Relaxed),
            software_entries: self.software.load(Relaxed),
        }
    }

    /// Accounts for a slot at `level` changing from `old` to `new`.
    pub fn account(&self, level: u8, old: crate::Descriptor, new: crate::Descriptor) {
        let (from, to) = (self.counter(level, old), self.counter(level, new));
        if from.is_some_and(|f| to.is_some_and(|t| core::ptr::eq(f, t))) {
            return; // the same kind of slot before and after (a remap, a permission change)
        }
        if let Some(c) = from {
            c.fetch_sub(1, Relaxed);
        }
        if let Some(c) = to {
            c.fetch_add(1, Relaxed);
        }
    }

    /// The counter a slot holding `d` at `level` counts in, if any.
    fn counter(&self, level: u8, d: crate::Descriptor) -> Option<&AtomicU64> {
        use crate::DescriptorKind::*;
        match d.kind(level) {
            Leaf { .. } => Some(&self.leaves[level as usize]),
            Software(_) | Locked => Some(&self.software),
            Empty | Table { .. } | Unknown(_) => None,
        }
    }
}
