//! The host stage 2's whole-block change for block migration
//! ([`Stage2Locked::compare_exchange_block`]), as hyp's adapter makes it.

use super::{check_transition, chunk, HostStage2Guard, BLOCK_PAGES};
use crate::backend::{CasError, PageState, Stage2Locked};
use crate::host::hw::page_of;
use crate::{Ipa, PAGE_SIZE};

impl HostStage2Guard<'_> {
    /// As hyp: the block stays one leaf; a replaced valid leaf's invalidation is left
    /// pending (`flush_deferred`), and a valid one installed is checked against the TLB
    /// model (break-before-make: the old translations must have been flushed). Counted
    /// ([`super::HostHw::block_changes`]).
    pub(super) fn cas_block(
        &mut self,
        ipa: Ipa,
        old: PageState,
        new: PageState,
    ) -> Result<(), CasError> {
        let base = chunk(ipa);
        let Some(&(found, young)) = self.map().blocks.get(&base) else {
            return Err(CasError::Changed(self.lookup(ipa)));
        };
        if found != old {
            let page = (page_of(ipa) - base) / PAGE_SIZE;
            return Err(CasError::Changed(found.page(page)));
        }
        check_transition(old, new);
        match new {
            PageState::Invalid => {
                self.map_mut().blocks.remove(&base);
                return Ok(());
            }
            PageState::Mapped { pfn, writable } => {
                self.hw
                    .check_install(self.vm, base, BLOCK_PAGES, pfn, writable);
            }
            _ => {}
        }
        self.hw.count_block_change();
        let young = young || new.is_mapped();
        self.map_mut().blocks.insert(base, (new, young));
        Ok(())
    }
}
