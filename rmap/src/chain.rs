//! `AnonVmaChain`: one link between a region and one anon_vma of its lineage (Linux's
//! `anon_vma_chain`). A region holds its chains oldest-first (the root's first, its own last,
//! new ones appended at the tail); each anon_vma indexes the chains by page-offset range.

use crate::anon_vma::{AnonHandle, Family};
use crate::pool::Handle;
use crate::region::{Region, RegionFlags};
use crate::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use crate::{Error, Ipa, Rmap, VmId};
use alloc::vec::Vec;

/// A generation-checked handle to a chain.
pub type ChainHandle = Handle<Chain>;

/// One chain slot. Its fields are written before the chain is inserted into its anon_vma's
/// index (under the root's write lock) and are immutable while linked, so a walker holding the
/// root's read lock reads a consistent region geometry.
#[derive(Default)]
pub struct Chain {
    anon_vma: AtomicU64,
    vm: AtomicU32,
    start: AtomicU64,
    pgoff: AtomicU64,
    pages: AtomicU64,
    flags: AtomicU32,
}

/// What a chain says about its region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainInfo {
    /// The anon_vma end of the link.
    pub anon_vma: AnonHandle,
    /// The VM owning the region.
    pub vm: VmId,
    /// First IPA of the region.
    pub start: Ipa,
    /// Page offset of the region's first page.
    pub pgoff: u64,
    /// Length in pages.
    pub pages: u64,
    /// Region flags.
    pub flags: RegionFlags,
}

impl ChainInfo {
    /// The IPA at which a frame with page offset `index` would be mapped, if in range.
    pub fn ipa_of(&self, index: u64) -> Option<Ipa> {
        let page = index.checked_sub(self.pgoff)?;
        (page < self.pages).then(|| self.start + page * crate::PAGE_SIZE)
    }
}

impl Chain {
    fn info(&self) -> ChainInfo {
        ChainInfo {
            anon_vma: AnonHandle::from_raw(self.anon_vma.load(Ordering::Relaxed)),
            vm: VmId(self.vm.load(Ordering::Relaxed)),
            start: Ipa::new(self.start.load(Ordering::Relaxed)),
            pgoff: self.pgoff.load(Ordering::Relaxed),
            pages: self.pages.load(Ordering::Relaxed),
            flags: RegionFlags::from_bits(self.flags.load(Ordering::Relaxed)),
        }
    }
}

impl Rmap {
    /// What a linked chain describes (caller holds its family's lock or its region's lock).
    pub fn chain_info(&self, chain: ChainHandle) -> ChainInfo {
        self.chain_pool.slot(chain).value.info()
    }

    /// Links `region` (of `vm`) to `anon_vma`: a new chain at the tail of the region's list and
    /// of the anon_vma's index for that range. Needs the family's write lock.
    pub(crate) fn link(
        &self,
        family: &mut Family,
        anon_vma: AnonHandle,
        vm: VmId,
        region: &mut Region,
    ) -> Result<ChainHandle, Error> {
        let chain = self
            .chain_pool
            .alloc(|_, c| {
                c.anon_vma.store(anon_vma.raw(), Ordering::Relaxed);
                c.vm.store(vm.0, Ordering::Relaxed);
                c.start.store(region.start().raw(), Ordering::Relaxed);
                c.pgoff.store(region.pgoff(), Ordering::Relaxed);
                c.pages.store(region.pages(), Ordering::Relaxed);
                c.flags.store(region.flags().bits(), Ordering::Relaxed);
            })
            .map_err(|_| Error::OutOfChains)?;
        let (start, end) = (region.pgoff(), region.pgoff() + region.pages());
        family.node_mut(anon_vma).chains.insert(start, end, chain);
        region.chains.push(chain);
        Ok(chain)
    }

    /// Unlinks every chain of `region` (Linux's `unlink_anon_vmas`): newest first, so a child
    /// anon_vma whose index empties is dropped (and its parent's `num_children` decremented)
    /// before its parent is looked at. Anon_vmas left without chains lose their node and the
    /// reference their chains held; that may free them and, through them, their root.
    pub(crate) fn unlink_region(&self, region: &mut Region) {
        let Some(&first) = region.chains.first() else {
            return;
        };
        let mut emptied = Vec::new();
        {
            let mut family = self.lock_family_write(self.chain_info(first).anon_vma);
            if let Some(own) = region.anon_vma.take() {
                family.node_mut(own).num_active_regions -= 1;
            }
            for chain in region.chains.drain(..).rev() {
                let anon_vma = self.chain_info(chain).anon_vma;
                if self.unlink_chain(&mut family, anon_vma, chain) {
                    emptied.push(anon_vma);
                }
            }
        }
        for anon_vma in emptied {
            self.put_anon_vma(anon_vma);
        }
    }

    /// Removes one chain; true if its anon_vma has no chains left (its node is gone then).
    fn unlink_chain(&self, family: &mut Family, anon_vma: AnonHandle, chain: ChainHandle) -> bool {
        let node = family.node_mut(anon_vma);
        let removed = node.chains.remove(chain);
        debug_assert!(removed, "chain {chain:?} not in its anon_vma");
        if self.chain_pool.put(chain) {
            self.chain_pool.recycle(chain);
        }
        if !node.chains.is_empty() {
            return false;
        }
        debug_assert_eq!(node.num_active_regions, 0);
        debug_assert_eq!(node.num_children, 0);
        family.remove(anon_vma);
        let parent = self.anon(anon_vma).parent();
        if parent != anon_vma {
            if let Some(parent) = family.try_node_mut(parent) {
                parent.num_children -= 1;
            }
        }
        true
    }

    /// Live chains.
    pub fn live_chains(&self) -> usize {
        self.chain_pool.live()
    }
}
