//! Whole-world invariant checks for host tests, at quiescent points.

use super::HostWorld;
use crate::backend::{PageState, Stage2};
use crate::{AnonHandle, Pfn};
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

impl HostWorld {
    /// Checks, at a quiescent point, that the TLB model saw no frame freed while a VM's TLB
    /// could still reach it and no access through a stale translation, that mapcounts equal the leaves that exist, refcounts
    /// equal mapcounts, swap references equal swap entries, no frame, chain or anon_vma
    /// leaked, and anon_vmas stay within twice the regions. Returns a description of the
    /// first violation.
    pub fn check(&self) -> Result<(), String> {
        let failures = self.hw().failures();
        if !failures.is_empty() {
            return Err(format!("TLB model: {}", failures.join("; ")));
        }
        self.check_tlbs()?;
        let mut maps: BTreeMap<Pfn, u32> = BTreeMap::new();
        let mut swaps: BTreeMap<u64, u32> = BTreeMap::new();
        let (mut regions, mut chains) = (0, 0);
        let mut writable_frames = BTreeSet::new();
        for vm in self.vms.all() {
            let list = vm.regions.read();
            regions += list.len();
            chains += list.iter().map(|r| r.chains().len()).sum::<usize>();
            for (ipa, entry) in vm.s2.entries() {
                match entry {
                    PageState::Mapped { pfn, writable } => {
                        *maps.entry(pfn).or_default() += 1;
                        if writable {
                            writable_frames.insert(pfn);
                        }
                    }
                    PageState::Swapped { slot } => *swaps.entry(slot).or_default() += 1,
                    // Holds no reference: nothing to count.
                    PageState::ZeroPage => {}
                    other => return Err(format!("{:?} {ipa:#x}: stray {other:?}", vm.id)),
                }
            }
        }
        // The swap cache holds one pin on each cached frame and one reference on its slot.
        let cached = self.rmap.swap_cache_entries();
        for &(slot, _) in &cached {
            *swaps.entry(slot).or_default() += 1;
        }
        self.check_frames(&maps, &cached)?;
        self.check_merged(&writable_frames)?;
        if swaps != self.machine.swap_refs() {
            return Err(format!(
                "swap refs {:?} != entries {swaps:?}",
                self.machine.swap_refs()
            ));
        }
        if self.rmap.live_chains() != chains {
            return Err(format!(
                "{} live chains, regions hold {chains}",
                self.rmap.live_chains()
            ));
        }
        // Every live anon_vma is linked by at least one chain (none is orphaned; a merged
        // frame's item pins a root its family's regions still link).
        let anon = self.rmap.live_anon_vmas();
        if anon > chains {
            return Err(format!("{anon} anon_vmas but only {chains} chains"));
        }
        let _ = regions;
        self.check_anon_counters()
    }

    /// Linux's bound from the 2015 reuse heuristic: anon_vmas stay within twice the regions.
    /// It holds while every anon_vma without a live region has at least two children, which
    /// fork maintains; destroying a VM in the middle of a lineage leaves a one-child anon_vma
    /// behind until a later fork reuses it, so callers check this only for such histories.
    pub fn check_anon_bound(&self) -> Result<(), String> {
        let regions: usize = self
            .vms
            .all()
            .iter()
            .map(|vm| vm.regions.read().len())
            .sum();
        let anon = self.rmap.live_anon_vmas();
        if anon > 2 * regions {
            return Err(format!("{anon} anon_vmas for {regions} regions"));
        }
        Ok(())
    }

    fn check_frames(&self, maps: &BTreeMap<Pfn, u32>, cached: &[(u64, Pfn)]) -> Result<(), String> {
        let pins: BTreeMap<Pfn, u32> = cached.iter().map(|&(_, pfn)| (pfn, 1)).collect();
        for (pfn, frame) in self.rmap.frames().iter() {
            let expect = maps.get(&pfn).copied().unwrap_or(0);
            let refs = expect + pins.get(&pfn).copied().unwrap_or(0);
            if frame.mapcount() != expect || frame.refcount() != refs || frame.is_locked() {
                return Err(format!(
                    "frame {pfn:#x}: mapcount {} refcount {} locked {}, {expect} leaves, {} cache pins",
                    frame.mapcount(),
                    frame.refcount(),
                    frame.is_locked(),
                    refs - expect
                ));
            }
        }
        // A frame the reverse map holds is not on the allocator's free list, and one it does
        // not hold is (a frame freed while still counted, or never given back, shows here).
        let free = self.machine.free_frames();
        let held: Vec<_> = self
            .rmap
            .frames()
            .iter()
            .filter(|(_, f)| f.refcount() > 0)
            .collect();
        if let Some((pfn, f)) = held.iter().find(|(pfn, _)| free.contains(pfn)) {
            return Err(format!(
                "frame {pfn:#x} is on the free list with refcount {}",
                f.refcount()
            ));
        }
        if held.len() + free.len() != self.rmap.frames().len() {
            return Err(format!(
                "{} frames held by the reverse map + {} free != {} frames",
                held.len(),
                free.len(),
                self.rmap.frames().len()
            ));
        }
        let in_use = maps.keys().chain(pins.keys()).collect::<BTreeSet<_>>();
        if self.machine.allocated() != in_use.len() {
            return Err(format!(
                "{} frames allocated, {} mapped or cached",
                self.machine.allocated(),
                in_use.len()
            ));
        }
        Ok(())
    }

    /// At a quiescent point every invalidation a change owed was made: each translation a
    /// VM's TLB model caches is still its stage 2's (same frame; a read-only cached entry
    /// for a page made writable since is fine, as on hardware), and a VM that is gone
    /// caches nothing. A deferred invalidation never flushed, or a leaf changed without
    /// one, shows here even if no access used the stale entry.
    fn check_tlbs(&self) -> Result<(), String> {
        let tlbs = self.hw().tlb.lock().clone();
        for (id, cached) in tlbs.iter().filter(|(_, c)| !c.is_empty()) {
            let Some(vm) = self.vms.get(*id) else {
                return Err(format!("{id:?} is gone but its TLB caches {cached:?}"));
            };
            for (&ipa, c) in cached {
                let ok = match vm.s2.lock().live_lookup(ipa) {
                    Some(PageState::Mapped { pfn, writable }) => {
                        pfn == c.pfn && (writable || !c.writable)
                    }
                    _ => false,
                };
                if !ok {
                    return Err(format!(
                        "{id:?}: TLB caches {c:?} at IPA {ipa:#x}, stage 2 has {:?}",
                        vm.s2.lock().live_lookup(ipa)
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every anon_vma's counters, recomputed from the regions (an error path that changed a
    /// counter and did not undo it shows here, even where the arithmetic does not wrap):
    /// `num_active_regions` = regions whose own anon_vma it is, `num_children` = members of
    /// its family forked from it, its index = the chains that name it; and every anon_vma a
    /// region names has a node in its family.
    fn check_anon_counters(&self) -> Result<(), String> {
        let mut active: BTreeMap<u64, u32> = BTreeMap::new();
        let mut chains: BTreeMap<u64, usize> = BTreeMap::new();
        for vm in self.vms.all() {
            for region in vm.regions.read().iter() {
                if let Some(own) = region.anon_vma() {
                    *active.entry(own.raw()).or_default() += 1;
                }
                for &chain in region.chains() {
                    let anon_vma = self.rmap.chain_info(chain).anon_vma;
                    *chains.entry(anon_vma.raw()).or_default() += 1;
                }
            }
        }
        let mut roots = BTreeSet::new();
        for &raw in chains.keys().chain(active.keys()) {
            let member = AnonHandle::from_raw(raw);
            let anon = self.rmap.anon_vma(member);
            let anon = anon.ok_or(format!("{member:?} named by a region is free"))?;
            roots.insert(anon.root().raw());
        }
        let mut nodes = 0;
        for root in roots {
            let family = self.rmap.lock_family_read(AnonHandle::from_raw(root));
            let members: Vec<_> = family.iter().collect();
            nodes += members.len();
            for &(member, node) in &members {
                let parent_of = |c: AnonHandle| self.rmap.anon_vma(c).map(|a| a.parent());
                let children = members
                    .iter()
                    .filter(|&&(c, _)| c != member && parent_of(c) == Some(member))
                    .count() as u32;
                let expect = (
                    active.get(&member.raw()).copied().unwrap_or(0),
                    children,
                    chains.get(&member.raw()).copied().unwrap_or(0),
                );
                let got = (
                    node.num_active_regions,
                    node.num_children,
                    node.chain_count(),
                );
                if got != expect {
                    return Err(format!(
                        "{member:?}: (active regions, children, chains) {got:?}, expected {expect:?}"
                    ));
                }
            }
        }
        if nodes != chains.len() {
            return Err(format!(
                "{nodes} family nodes, {} linked anon_vmas",
                chains.len()
            ));
        }
        Ok(())
    }
}
