//! Block migration's changes of a whole 2 MiB block leaf (`rmap::Rmap::migrate_folio`):
//! a valid block to a block-sized migration entry and back to a valid block of
//! another run, each one descriptor compare-and-swap at level 2, never split.
//!
//! Break-before-make (Arm ARM DDI 0487 D8.16.1) spans the migration: the
//! "break" (valid block → migration entry) leaves its TLB invalidation to the
//! caller's `Stage2::flush_deferred`, which rmap calls once per VM before it
//! copies the frames; the "make" (migration entry → new block) replaces an
//! invalid descriptor, which no TLB holds, so it owes no invalidation. The
//! debug-build witness (`bbm.rs`) checks the make comes after that flush.

use crate::locked::{check_transition, decode, LockedStage2, BLOCK_SIZE};
use crate::machine::Machine;
use crate::memory::{ram_attrs, Fetch};
use rmap::CasError as Refused;
use rmap::{Ipa, PageState};
use stage2::{Batch, CasError, Descriptor, LeafInfo};

/// The level of a 2 MiB block slot.
const BLOCK_LEVEL: u8 = stage2::LAST_LEVEL - 1;

/// Compare-and-swaps lost to a hardware Access-flag update before giving up.
const ATTEMPTS: u32 = 5;

impl<M: Machine> LockedStage2<'_, M> {
    /// The 2 MiB block leaf holding `ipa`, if one is there.
    fn block_leaf(&self, ipa: Ipa) -> Option<LeafInfo> {
        let leaf = self.mem.live()?.lookup(ipa)?;
        (leaf.level == BLOCK_LEVEL).then_some(leaf)
    }

    /// `Stage2Locked::lookup_block`: the first page's state of the block
    /// leaf holding `ipa`.
    pub(crate) fn block_state(&self, ipa: Ipa) -> Option<PageState> {
        self.last.set(None);
        self.block_leaf(ipa)
            .map(|leaf| decode(Some(leaf), leaf.ipa))
    }

    /// `Stage2Locked::compare_exchange_block`: `old` → `new` for the whole
    /// block holding `ipa` (`Mapped` ↔ `Migrating`), the invalidation a
    /// replaced valid block owes left to `flush_deferred`.
    pub(crate) fn replace_block(
        &mut self,
        ipa: Ipa,
        old: PageState,
        new: PageState,
    ) -> Result<(), Refused> {
        self.last.set(None);
        let changed = |this: &Self| {
            let leaf = this.mem.live().and_then(|t| t.lookup(ipa));
            Refused::Changed(decode(leaf, ipa))
        };
        for _ in 0..ATTEMPTS {
            let Some(leaf) = self.block_leaf(ipa) else {
                return Err(changed(self));
            };
            if decode(Some(leaf), leaf.ipa) != old {
                return Err(changed(self));
            }
            check_transition(old, new);
            let Some(desc) = self.block_descriptor(leaf.ipa, new) else {
                return Err(changed(self));
            };
            match self.swap_block(&leaf, desc) {
                Ok(()) => return Ok(()),
                // Only the hardware's Access-flag update races us under the lock.
                Err(CasError::Mismatch(_)) => continue,
                Err(_) => return Err(changed(self)),
            }
        }
        Err(changed(self))
    }

    /// The level-2 descriptor of `new` at the block `base`; `None` for a
    /// state no block holds here.
    fn block_descriptor(&self, base: Ipa, new: PageState) -> Option<Descriptor> {
        match new {
            PageState::Mapped { pfn, writable } => {
                // The make: the break's invalidation must have been flushed.
                self.mem.bbm_check_make(base, BLOCK_SIZE);
                // New contents: executable only after a fetch faults (`Fetch`).
                let attrs = ram_attrs(writable, Fetch::Faults);
                let enc = self.enc();
                Descriptor::leaf_encoded(pfn.pa().raw(), BLOCK_LEVEL, attrs, true, enc).ok()
            }
            PageState::Migrating { .. } => Descriptor::software(new).ok(),
            _ => None,
        }
    }

    /// One CAS of the block slot; a valid block replaced leaves its
    /// invalidation pending for `flush_deferred` (noted for the witness).
    fn swap_block(&self, leaf: &LeafInfo, desc: Descriptor) -> Result<(), CasError> {
        let table = self.mem.table();
        if leaf.desc.is_valid() && !desc.is_valid() {
            self.mem.bbm_note(leaf.ipa, BLOCK_SIZE);
        }
        let tlb = self.mem.tlb();
        let batch = Batch::new(&tlb, table.vttbr());
        let r = table.compare_exchange_leaf(leaf.ipa, BLOCK_LEVEL, leaf.desc, desc, &batch);
        // The pending VMID-wide invalidation is the caller's `flush_deferred`.
        let _ = batch.into_pending();
        r
    }

    /// Write-protects a block migration entry in place (fork during a block
    /// migration): invalid before and after, so nothing to invalidate.
    pub(crate) fn write_protect_migration_block(
        &self,
        leaf: &LeafInfo,
        old: PageState,
        new: PageState,
    ) -> bool {
        if leaf.level != BLOCK_LEVEL || decode(Some(*leaf), leaf.ipa) != old {
            return false;
        }
        check_transition(old, new);
        let Ok(desc) = Descriptor::software(new) else {
            return false;
        };
        self.swap_block(leaf, desc).is_ok()
    }
}
