//! A visitor walk over an IPA range (like Linux's `kvm_pgtable_walker`).
//!
//! [`crate::Stage2Table::walk`] visits, in IPA order, every table descriptor (before and after
//! its subtree) and every non-empty leaf slot (valid blocks and pages, software entries)
//! overlapping the range. Leaves are reported whole, even when the range covers only part of a
//! block. The walk reads descriptors once each (atomically); concurrent changes may or may not
//! be seen, see the crate docs for what the caller must hold.

use crate::table::LeafInfo;

/// What the walk does after a callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkAction {
    /// Go on.
    Continue,
    /// From `table_pre`: do not descend into this table (its `table_post` is not called).
    /// Elsewhere the same as `Continue`.
    SkipTable,
    /// End the walk now.
    Stop,
}

/// Callbacks of [`crate::Stage2Table::walk`].
pub trait Visitor {
    /// A valid leaf or a software entry (never an empty slot).
    fn leaf(&mut self, leaf: &LeafInfo) -> WalkAction;

    /// Before descending through the table descriptor at `level` covering IPA `ipa` (aligned to
    /// that level's size), whose next-level table is at `table_pa`.
    fn table_pre(&mut self, ipa: u64, level: u8, table_pa: u64) -> WalkAction {
        let _ = (ipa, level, table_pa);
        WalkAction::Continue
    }

    /// After the subtree of that table descriptor.
    fn table_post(&mut self, ipa: u64, level: u8, table_pa: u64) -> WalkAction {
        let _ = (ipa, level, table_pa);
        WalkAction::Continue
    }
}

/// Any `FnMut(&LeafInfo)` is a leaf-only visitor that never stops.
impl<F: FnMut(&LeafInfo)> Visitor for F {
    fn leaf(&mut self, leaf: &LeafInfo) -> WalkAction {
        self(leaf);
        WalkAction::Continue
    }
}
