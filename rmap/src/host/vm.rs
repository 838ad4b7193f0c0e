//! A host VM: its region list and stage 2, and the guest's own accesses (loads and stores
//! through the TLB model, faults, MEM_RELEASE).

use super::hw::{page_of, Cached, HostHw};
use super::{HostMachine, HostStage2};
use crate::backend::{CasError, PageState, Stage2, Stage2Locked};
use crate::lock::{Level, OrderedRwLock};
use crate::region::RegionList;
use crate::{Error, Fault, Ipa, Pfn, Rmap, VmId};
use alloc::format;
use alloc::sync::Arc;

/// A host VM: region list and stage-2.
pub struct HostVm {
    /// Its id.
    pub id: VmId,
    /// Region list (level 1).
    pub regions: OrderedRwLock<RegionList>,
    /// Stage-2 (level 4).
    pub s2: HostStage2,
}

impl HostVm {
    /// A VM with no regions, on hardware of its own.
    pub fn new(id: VmId) -> Self {
        Self::with_hw(id, Arc::default())
    }

    /// A VM with no regions on shared hardware (a world's budget and TLB model).
    pub fn with_hw(id: VmId, hw: Arc<HostHw>) -> Self {
        HostVm {
            id,
            regions: OrderedRwLock::new(Level::VM_REGIONS, "vm.regions", RegionList::new(id)),
            s2: HostStage2::with_hw(id, hw),
        }
    }

    /// A guest store of `value` to the page at `ipa`, faulting as the hardware would, through
    /// the TLB model ([`HostVm::access`]): a cached writable translation is used until an
    /// invalidation covers it.
    pub fn write(&self, rmap: &Rmap, m: &HostMachine, ipa: Ipa, value: u64) -> Result<(), Error> {
        loop {
            if self.access(m, ipa, true, |pfn| m.write_value(pfn, value)) {
                return Ok(());
            }
            self.fault(rmap, m, ipa, true)?;
        }
    }

    /// A guest load from the page at `ipa` (0 if never written), through the TLB model.
    pub fn read(&self, rmap: &Rmap, m: &HostMachine, ipa: Ipa) -> Result<u64, Error> {
        loop {
            let mut value = 0;
            if self.access(m, ipa, false, |pfn| value = m.read_value(pfn)) {
                return Ok(value);
            }
            // A VM destroyed under its vCPU (its tables gone) has no memory left.
            let entry = self.s2.lock().live_lookup(ipa).ok_or(Error::NoRegion)?;
            match entry {
                PageState::Mapped { .. } => continue, // mapped meanwhile
                // The shared zero page (the model keeps no frame for it) reads as zero.
                PageState::ZeroPage => return Ok(0),
                _ => {}
            }
            if entry == PageState::Invalid {
                let mapped = self.regions.read().find(ipa).is_some();
                return if mapped { Ok(0) } else { Err(Error::NoRegion) };
            }
            self.fault(rmap, m, ipa, false)?;
        }
    }

    /// What the guest would read at `ipa`, without faulting anything in (for checks at
    /// quiescent points: a swapped page is read from the store).
    pub fn peek(&self, m: &HostMachine, ipa: Ipa) -> u64 {
        match self.s2.lock().lookup(ipa) {
            PageState::Mapped { pfn, .. } => m.read_value(pfn),
            PageState::Swapped { slot } => m.swap_value(slot),
            PageState::Invalid | PageState::ZeroPage => 0,
            PageState::Migrating { .. } => panic!("migration entry at a quiescent point"),
        }
    }

    /// MEM_RELEASE of the page at `ipa` ([`HostVm::release_range`] of one page).
    pub fn release(&self, rmap: &Rmap, m: &HostMachine, ipa: Ipa) -> Result<(), Error> {
        self.release_range(rmap, m, page_of(ipa), crate::PAGE_SIZE)
    }

    /// MEM_RELEASE of `[start, start + len)`, as `hyp::mm::release` does it: under the region
    /// list's read lock only, so it races this VM's faults (and its other vCPUs' releases);
    /// each entry is cleared by CAS (an immediate invalidation) and only then its frame
    /// mapping or swap-slot reference dropped; untouched pages cost nothing. A page of a
    /// block needs the block split: `OutOfFrames` (what was released stays released) if no
    /// table page is left, as in hyp. `NoRegion` if no region covers `start` (a VM
    /// destroyed under its vCPU: its tables are gone).
    pub fn release_range(
        &self,
        rmap: &Rmap,
        m: &HostMachine,
        start: Ipa,
        len: u64,
    ) -> Result<(), Error> {
        let regions = self.regions.read();
        // Tables are freed only with the list write-locked and emptied: a region found here
        // means they are live for as long as we hold the read lock.
        regions.find(start).ok_or(Error::NoRegion)?;
        let mut from = start;
        loop {
            let next = self.s2.lock().next_entry(from, start + len);
            let Some((ipa, entry)) = next else {
                return Ok(());
            };
            if let PageState::Migrating { pfn, .. } = entry {
                rmap.wait_frame_unlocked(pfn);
                continue;
            }
            let cleared = self
                .s2
                .lock()
                .compare_exchange(ipa, entry, PageState::Invalid);
            match cleared {
                Err(CasError::NoMemory) => return Err(Error::OutOfFrames),
                Err(CasError::Changed(_)) => continue,
                Ok(()) => {}
            }
            match entry {
                PageState::Mapped { pfn, .. } => match regions.find(ipa) {
                    Some(region) => rmap.remove_rmap_at(pfn, region, ipa, m),
                    None => rmap.remove_rmap(pfn, m),
                },
                PageState::Swapped { slot } => rmap.put_swap(slot, m, m),
                PageState::Migrating { .. } | PageState::Invalid | PageState::ZeroPage => {}
            }
            from = ipa + crate::PAGE_SIZE;
        }
    }

    /// A vCPU access to the page at `ipa`: `f` gets the frame, under the TLB lock (so an
    /// invalidation waits for it, as TLBI + DSB waits for accesses in flight). A translation
    /// the VM's TLB model caches is used as it is; on a miss the stage 2 is walked and the
    /// translation cached. False if neither allows the access (the caller faults). An access
    /// through a cached translation whose frame was freed since is recorded as a failure (and
    /// not done). False too once the VM's tables are freed.
    pub fn access(&self, m: &HostMachine, ipa: Ipa, write: bool, f: impl FnOnce(Pfn)) -> bool {
        let page = page_of(ipa);
        let hw = self.s2.hw();
        {
            let mut tlbs = hw.tlb.lock();
            let cached = tlbs.get(&self.id).and_then(|t| t.get(&page)).copied();
            match cached {
                Some(c) if c.gen == m.gen(c.pfn) && (c.writable || !write) => {
                    f(c.pfn);
                    return true;
                }
                Some(c) if c.gen != m.gen(c.pfn) => {
                    let what = if write { "store to" } else { "load from" };
                    hw.record(format!(
                        "{:?}: {what} IPA {page:#x} through a stale TLB entry: frame {:#x} was \
                         freed (or reused) since it was cached",
                        self.id, c.pfn
                    ));
                    tlbs.get_mut(&self.id).map(|t| t.remove(&page));
                }
                _ => {}
            }
        }
        let table = self.s2.lock();
        // Tables freed (the VM was destroyed under this vCPU): nothing to access.
        let Some(PageState::Mapped { pfn, writable }) = table.live_lookup(page) else {
            return false;
        };
        if write && !writable {
            return false;
        }
        let gen = m.gen(pfn);
        let mut tlbs = hw.tlb.lock();
        let c = Cached { pfn, writable, gen };
        tlbs.entry(self.id).or_default().insert(page, c);
        f(pfn);
        true
    }

    /// Handles a fault. A table page missing for the fault's own change is its error
    /// (`OutOfFrames`, as hyp's fault path reports it), so a caller does not spin on a
    /// table that cannot grow; a table page refused to anyone else during the fault (a
    /// batch that could not split the block under us) counts too, so vCPUs of one VM
    /// cannot keep undoing each other's progress and retry forever.
    fn fault(&self, rmap: &Rmap, m: &HostMachine, ipa: Ipa, write: bool) -> Result<(), Error> {
        let ooms = self.s2.hw().out_of_memory_count();
        match rmap.handle_fault(&self.regions, &self.s2, m, m, ipa, write)? {
            Fault::Retry(Some(pfn)) => rmap.wait_frame_unlocked(pfn),
            Fault::Retry(None) if self.s2.hw().out_of_memory_count() != ooms => {
                return Err(Error::OutOfFrames)
            }
            Fault::Retry(None) => crate::sync::spin_loop(),
            Fault::Done => {}
        }
        Ok(())
    }
}
