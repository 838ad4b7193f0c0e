//! `Region`: a range of a VM's IPA space (Linux's `vm_area_struct`), and the per-VM list of them
//! that the VM's region-list lock (level 1) protects.

use crate::anon_vma::AnonHandle;
use crate::chain::ChainHandle;
use crate::{Error, Ipa, Rmap, VmId, PAGE_SIZE};
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// Region flag bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RegionFlags(u32);

impl RegionFlags {
    /// No flags.
    pub const NONE: RegionFlags = RegionFlags(0);
    /// A temporary region (Linux's exec-time temporary stack): its stage-2 entries may be moved
    /// without the reverse map's knowledge, so rmap walks skip it and migration never trusts it.
    pub const TEMPORARY: RegionFlags = RegionFlags(1 << 0);

    /// From raw bits.
    pub const fn from_bits(bits: u32) -> Self {
        RegionFlags(bits)
    }

    /// Raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether all of `other` is set.
    pub const fn contains(self, other: RegionFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

/// One region of guest IPA space.
#[derive(Debug)]
pub struct Region {
    vm: VmId,
    start: Ipa,
    pages: u64,
    pgoff: u64,
    flags: RegionFlags,
    pub(crate) anon_vma: Option<AnonHandle>,
    pub(crate) chains: Vec<ChainHandle>,
}

impl Region {
    /// The owning VM.
    pub fn vm(&self) -> VmId {
        self.vm
    }

    /// First IPA.
    pub fn start(&self) -> Ipa {
        self.start
    }

    /// One past the last IPA.
    pub fn end(&self) -> Ipa {
        self.start + self.pages * PAGE_SIZE
    }

    /// Length in pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Page offset of the first page in the region's linear space (like `vm_pgoff`).
    pub fn pgoff(&self) -> u64 {
        self.pgoff
    }

    /// Flags.
    pub fn flags(&self) -> RegionFlags {
        self.flags
    }

    /// The region's own anon_vma (where its fresh exclusive frames go), once prepared.
    pub fn anon_vma(&self) -> Option<AnonHandle> {
        self.anon_vma
    }

    /// Chains, oldest (root) first, own anon_vma's last.
    pub fn chains(&self) -> &[ChainHandle] {
        &self.chains
    }

    /// The page offset of `ipa` (which must be inside the region): a frame mapped there has
    /// this as its index.
    pub fn index_of(&self, ipa: Ipa) -> u64 {
        debug_assert!(self.contains(ipa));
        self.pgoff + (ipa - self.start) / PAGE_SIZE
    }

    /// Whether `ipa` is inside.
    pub fn contains(&self, ipa: Ipa) -> bool {
        (self.start..self.end()).contains(&ipa)
    }

    fn clone_geometry(&self, vm: VmId) -> Region {
        Region {
            vm,
            start: self.start,
            pages: self.pages,
            pgoff: self.pgoff,
            flags: self.flags,
            anon_vma: None,
            chains: Vec::new(),
        }
    }
}

/// A VM's regions, keyed by start IPA. Put it behind an `OrderedRwLock` at
/// [`Level::VM_REGIONS`](crate::lock::Level::VM_REGIONS): read for faults, write for region
/// changes, fork and destroy.
#[derive(Debug)]
pub struct RegionList {
    vm: VmId,
    regions: BTreeMap<Ipa, Region>,
}

impl RegionList {
    /// An empty list for VM `vm`.
    pub fn new(vm: VmId) -> Self {
        RegionList {
            vm,
            regions: BTreeMap::new(),
        }
    }

    /// The owning VM.
    pub fn vm(&self) -> VmId {
        self.vm
    }

    /// The region containing `ipa`.
    pub fn find(&self, ipa: Ipa) -> Option<&Region> {
        let (_, region) = self.regions.range(..=ipa).next_back()?;
        region.contains(ipa).then_some(region)
    }

    pub(crate) fn find_mut(&mut self, ipa: Ipa) -> Option<&mut Region> {
        let (_, region) = self.regions.range_mut(..=ipa).next_back()?;
        region.contains(ipa).then_some(region)
    }

    /// All regions in IPA order.
    pub fn iter(&self) -> impl Iterator<Item = &Region> {
        self.regions.values()
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    fn overlaps(&self, start: Ipa, end: Ipa) -> bool {
        let before = self.regions.range(..end).next_back();
        before.is_some_and(|(_, r)| r.end() > start)
    }

    pub(crate) fn insert(&mut self, region: Region) {
        self.regions.insert(region.start, region);
    }

    pub(crate) fn take(&mut self, start: Ipa) -> Option<Region> {
        self.regions.remove(&start)
    }

    pub(crate) fn starts(&self) -> Vec<Ipa> {
        self.regions.keys().copied().collect()
    }

    /// The neighbour whose anon_vma a new region at `region` may adopt (Linux's
    /// `find_mergeable_anon_vma` / `reusable_anon_vma`): adjacent in IPA, contiguous in page
    /// offset, same flags, and linked to exactly one anon_vma (no fork history), so every frame
    /// of that anon_vma maps at the offsets the merged range implies.
    fn mergeable_neighbour(&self, region: &Region) -> Option<AnonHandle> {
        let prev = self
            .regions
            .range(..region.start)
            .next_back()
            .map(|(_, r)| r);
        let next = self.regions.range(region.end()..).next().map(|(_, r)| r);
        let fits = |n: &Region, adjacent: bool| {
            adjacent && n.flags == region.flags && n.chains.len() == 1 && n.anon_vma.is_some()
        };
        if let Some(p) = prev.filter(|p| {
            fits(
                p,
                p.end() == region.start && p.pgoff + p.pages == region.pgoff,
            )
        }) {
            return p.anon_vma;
        }
        next.filter(|n| {
            fits(
                n,
                n.start == region.end() && region.pgoff + region.pages == n.pgoff,
            )
        })
        .and_then(|n| n.anon_vma)
    }
}

impl Rmap {
    /// Creates a region of `pages` pages at `start` in `list` (write-locked). Like an
    /// anonymous `mmap`, its page offset is `start / 4 KiB` and it has no anon_vma until its
    /// first fault ([`Rmap::anon_vma_prepare`]).
    pub fn region_create(
        &self,
        list: &mut RegionList,
        start: Ipa,
        pages: u64,
        flags: RegionFlags,
    ) -> Result<(), Error> {
        let end = pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| start.checked_add(len))
            .ok_or(Error::BadRange)?;
        if !start.is_aligned(PAGE_SIZE) || pages == 0 || list.overlaps(start, end) {
            return Err(Error::BadRange);
        }
        list.insert(Region {
            vm: list.vm,
            start,
            pages,
            pgoff: start.page_index(),
            flags,
            anon_vma: None,
            chains: Vec::new(),
        });
        Ok(())
    }

    /// Makes sure the region containing `ipa` has an anon_vma (Linux's `anon_vma_prepare`):
    /// adopts a compatible neighbour's, under that family's lock (lesson 2), or allocates one
    /// and holds its lock while it is linked and published in the region (lesson 1: a lockless
    /// walker may already hold a stale handle to the recycled slot).
    pub fn anon_vma_prepare(&self, list: &mut RegionList, ipa: Ipa) -> Result<AnonHandle, Error> {
        let vm = list.vm;
        let region = list.find(ipa).ok_or(Error::NoRegion)?;
        if let Some(anon_vma) = region.anon_vma {
            return Ok(anon_vma);
        }
        let adopt = list.mergeable_neighbour(region);
        let region = list.find_mut(ipa).ok_or(Error::NoRegion)?;
        match adopt {
            Some(neighbour) => self.adopt(region, vm, neighbour),
            None => self.prepare_new(region, vm),
        }
    }

    fn adopt(
        &self,
        region: &mut Region,
        vm: VmId,
        neighbour: AnonHandle,
    ) -> Result<AnonHandle, Error> {
        let mut family = self.lock_family_write(neighbour);
        self.link(&mut family, neighbour, vm, region)?;
        family.node_mut(neighbour).num_active_regions += 1;
        region.anon_vma = Some(neighbour);
        Ok(neighbour)
    }

    fn prepare_new(&self, region: &mut Region, vm: VmId) -> Result<AnonHandle, Error> {
        let anon_vma = self.alloc_anon_vma(None)?;
        let mut family = self.anon(anon_vma).family().write();
        family.insert(anon_vma);
        if let Err(e) = self.link(&mut family, anon_vma, vm, region) {
            family.remove(anon_vma);
            drop(family);
            self.put_anon_vma(anon_vma);
            return Err(e);
        }
        family.node_mut(anon_vma).num_active_regions += 1;
        region.anon_vma = Some(anon_vma);
        Ok(anon_vma)
    }

    /// A child VM's copy of `parent`'s geometry, not yet linked anywhere.
    pub(crate) fn region_clone(&self, parent: &Region, vm: VmId) -> Region {
        parent.clone_geometry(vm)
    }
}
