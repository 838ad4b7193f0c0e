//! The reverse-map walk: from a frame to every (VM, IPA) that maps it.
//!
//! Lesson 4 (the `page_lock_anon_vma` race): a frame's anon_vma handle read without a lock is
//! only "maybe relevant". The walker pins it with increment-if-not-zero plus a generation check
//! ([`Rmap::get_anon_vma`]), or, on the fast path, try-locks the family root and re-checks that
//! the frame is still mapped and still points at the same live anon_vma. Then, for each chain
//! whose range covers the frame's page offset, it computes the IPA, locks that VM's stage-2 and
//! verifies that the leaf there really is this frame before the caller may act on it.
//! Temporary regions are skipped (lesson 3).

use crate::anon_vma::{AnonHandle, Family};
use crate::backend::{PageState, Stage2, Stage2Locked, VmSet};
use crate::chain::ChainHandle;
use crate::lock::OrderedReadGuard;
use crate::region::RegionFlags;
use crate::{Frame, Ipa, Pfn, Rmap, VmId};
use core::ops::ControlFlow;

/// One verified mapping found by a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapper {
    /// The VM.
    pub vm: VmId,
    /// Where the frame is mapped.
    pub ipa: Ipa,
    /// The chain that led here (for `rmap <pa>` on the console).
    pub chain: ChainHandle,
    /// The leaf as found under the VM's stage-2 lock.
    pub entry: PageState,
}

/// A reference on an anon_vma (Linux's `get_anon_vma`), dropped with `put_anon_vma`.
pub struct AnonRef<'a> {
    rmap: &'a Rmap,
    anon_vma: AnonHandle,
}

impl AnonRef<'_> {
    /// The pinned anon_vma.
    pub fn handle(&self) -> AnonHandle {
        self.anon_vma
    }
}

impl Drop for AnonRef<'_> {
    fn drop(&mut self) {
        self.rmap.put_anon_vma(self.anon_vma);
    }
}

/// A frame's family, read-locked for a walk (Linux's `folio_lock_anon_vma_read`).
pub struct AnonReadLock<'a> {
    // Field order is drop order: unlock before dropping the pin, as a pin may free the slot.
    family: OrderedReadGuard<'a, Family>,
    anon_vma: AnonHandle,
    _pin: Option<AnonRef<'a>>,
}

impl AnonReadLock<'_> {
    /// The anon_vma whose chains the walk visits.
    pub fn handle(&self) -> AnonHandle {
        self.anon_vma
    }

    /// The locked family.
    pub fn family(&self) -> &Family {
        &self.family
    }
}

impl Rmap {
    /// The anon_vma a frame names now: its slot's object under the slot's current generation.
    /// Exact while the caller holds the frame lock of an anonymous frame (which keeps its
    /// anon_vma); a snapshot otherwise (see [`Rmap::get_anon_vma`] for the lockless way).
    pub fn frame_anon_vma(&self, frame: &Frame) -> Option<AnonHandle> {
        self.anon_pool.current(frame.anon_slot()?)
    }

    /// Pins the anon_vma of a frame read without its lock (Linux's `folio_get_anon_vma`):
    /// mapped check, increment-if-not-zero on the slot's object with a generation check, then
    /// the re-check that the frame is still mapped and still names that slot. `None` if the
    /// frame is not (or no longer) a mapped anonymous frame.
    pub fn get_anon_vma(&self, pfn: Pfn) -> Option<AnonRef<'_>> {
        let frame = self.frames.get(pfn)?;
        let slot = frame.anon_slot()?;
        if !frame.is_mapped() {
            return None;
        }
        let anon_vma = self.anon_pool.current(slot)?;
        self.anon_pool
            .try_get(anon_vma, |reused| self.put_stale(reused))?;
        let pin = AnonRef {
            rmap: self,
            anon_vma,
        };
        // Mapped after we pinned, and still naming the slot whose object we pinned (which
        // cannot be replaced while pinned): that object is the frame's anon_vma, the one its
        // mappers are linked to (a mapped frame's anon_vma is not freed).
        (frame.is_mapped() && frame.anon_slot() == Some(slot)).then_some(pin)
    }

    /// Our accidental reference on a reused slot was its last: finish freeing it.
    fn put_stale(&self, reused: AnonHandle) {
        if let Some(root) = self.free_anon_vma(reused) {
            self.put_anon_vma(root);
        }
    }

    /// Read-locks a frame's family for a walk: try-lock the root without a reference, and if
    /// that fails fall back to a pinned reference and a blocking lock.
    pub fn lock_anon_vma_read(&self, pfn: Pfn) -> Option<AnonReadLock<'_>> {
        let frame = self.frames.get(pfn)?;
        let index = frame.anon_slot()?;
        if !frame.is_mapped() {
            return None;
        }
        let anon_vma = self.anon_pool.current(index)?;
        let slot = self.anon_pool.slot(anon_vma);
        if slot.is(anon_vma) {
            let root = slot.value.root();
            if let Some(family) = self.anon(root).family().try_read() {
                // Generations only grow: still equal means the slot was never freed in between,
                // so `root` was this anon_vma's root; mapped and still naming the slot means it
                // is the frame's anon_vma, which chains (unlinked only under the write lock we
                // now block) keep alive.
                #[cfg(not(feature = "mutate-anon-vma-recheck"))]
                let still =
                    frame.is_mapped() && slot.is(anon_vma) && frame.anon_slot() == Some(index);
                // Broken variant (lesson 4): the fast path trusts what it read before locking.
                #[cfg(feature = "mutate-anon-vma-recheck")]
                let still = true;
                if still {
                    return Some(AnonReadLock {
                        family,
                        anon_vma,
                        _pin: None,
                    });
                }
            }
        }
        let pin = self.get_anon_vma(pfn)?;
        let family = self.lock_family_read(pin.anon_vma);
        Some(AnonReadLock {
            family,
            anon_vma: pin.anon_vma,
            _pin: Some(pin),
        })
    }

    /// Walks every verified mapping of `pfn`, calling `f` under that VM's stage-2 lock. For
    /// callers that do not hold the frame lock (access-bit scans); returns false if the frame
    /// is not a mapped anonymous or merged frame. A merged frame is walked item by item,
    /// each family root pinned from its stable node (`Rmap::walk_merged`).
    pub fn walk<V: VmSet>(
        &self,
        pfn: Pfn,
        vms: &V,
        mut f: impl FnMut(&Mapper, &mut dyn Stage2Locked) -> ControlFlow<()>,
    ) -> bool {
        let Some(locked) = self.lock_anon_vma_read(pfn) else {
            return self.walk_merged(pfn, vms, |_, m, s2| f(m, s2));
        };
        let index = self.frames.frame(pfn).index();
        let _ = self.walk_family(&locked.family, locked.anon_vma, index, pfn, vms, &mut f);
        true
    }

    /// Walks with an anon_vma the caller pinned (migration and reclaim hold the frame lock and
    /// a reference across several walks, since the frame is unmapped in between), looking for
    /// leaves that refer to `target`.
    pub fn walk_pinned<V: VmSet>(
        &self,
        pin: &AnonRef<'_>,
        index: u64,
        target: Pfn,
        vms: &V,
        mut f: impl FnMut(&Mapper, &mut dyn Stage2Locked) -> ControlFlow<()>,
    ) {
        let family = self.lock_family_read(pin.anon_vma);
        let _ = self.walk_family(&family, pin.anon_vma, index, target, vms, &mut f);
    }

    pub(crate) fn walk_family<V: VmSet>(
        &self,
        family: &Family,
        anon_vma: AnonHandle,
        index: u64,
        target: Pfn,
        vms: &V,
        f: &mut impl FnMut(&Mapper, &mut dyn Stage2Locked) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let Some(node) = family.node(anon_vma) else {
            return ControlFlow::Continue(());
        };
        node.chains.stab(index, &mut |chain| {
            let info = self.chain_info(chain);
            if info.flags.contains(RegionFlags::TEMPORARY) {
                return ControlFlow::Continue(());
            }
            let Some(ipa) = info.ipa_of(index) else {
                return ControlFlow::Continue(());
            };
            let visit = |vm: &V::Vm| {
                let mut s2 = vm.lock();
                let entry = s2.lookup(ipa);
                if entry.pfn() != Some(target) {
                    return ControlFlow::Continue(()); // not mapped here: not relevant
                }
                let mapper = Mapper {
                    vm: info.vm,
                    ipa,
                    chain,
                    entry,
                };
                f(&mapper, &mut s2)
            };
            // A VM being destroyed is skipped: its own teardown zaps its entries.
            vms.with_vm(info.vm, visit)
                .unwrap_or(ControlFlow::Continue(()))
        })
    }

    /// Changes the mappings of many frames of one anon_vma at once (batched migration and
    /// reclaim): `items` are `(page offset, frame)` pairs sorted by offset, all pinned members
    /// of `anon_vma`. Each chain overlapping the batch is visited once, so each mapping VM is
    /// looked up and its stage-2 locked once per batch instead of once per frame, and all the
    /// pages it maps of the batch are changed in one [`Stage2Locked::update_pages`]. Under
    /// that lock every leaf is verified (it refers to the item's frame) before
    /// `decide(item, mapper)` may name its replacement; `applied(item, mapper, new)` follows
    /// each change made. Chains are visited in index order, as [`Rmap::walk_pinned`] does, so
    /// for any one frame a fork child is still visited after its parent.
    pub(crate) fn walk_batch<V: VmSet>(
        &self,
        anon_vma: AnonHandle,
        items: &[(u64, Pfn)],
        vms: &V,
        mut decide: impl FnMut(usize, &Mapper) -> Option<PageState>,
        mut applied: impl FnMut(usize, &Mapper, PageState),
    ) {
        let (Some(first), Some(last)) = (items.first(), items.last()) else {
            return;
        };
        debug_assert!(
            items.windows(2).all(|w| w[0].0 <= w[1].0),
            "sorted by offset"
        );
        let family = self.lock_family_read(anon_vma);
        let Some(node) = family.node(anon_vma) else {
            return;
        };
        let mut ipas = alloc::vec::Vec::with_capacity(items.len());
        let _ = node
            .chains
            .overlapping::<()>(first.0, last.0 + 1, &mut |chain| {
                let info = self.chain_info(chain);
                if info.flags.contains(RegionFlags::TEMPORARY) {
                    return ControlFlow::Continue(());
                }
                let lo = items.partition_point(|&(index, _)| index < info.pgoff);
                let hi = items.partition_point(|&(index, _)| index < info.pgoff + info.pages);
                if lo == hi {
                    return ControlFlow::Continue(());
                }
                ipas.clear();
                ipas.extend(
                    items[lo..hi]
                        .iter()
                        .map(|&(index, _)| info.ipa_of(index).expect("chain covers the item")),
                );
                let mapper = |k: usize, entry| Mapper {
                    vm: info.vm,
                    ipa: ipas[k],
                    chain,
                    entry,
                };
                // A VM being destroyed is skipped: its own teardown zaps its entries.
                let _ = vms.with_vm(info.vm, |vm| {
                    vm.lock().update_pages(
                        &ipas,
                        &mut |k, entry| {
                            if entry.pfn() != Some(items[lo + k].1) {
                                return None; // not this item's frame: not relevant
                            }
                            decide(lo + k, &mapper(k, entry))
                        },
                        &mut |k, old, new| applied(lo + k, &mapper(k, old), new),
                    )
                });
                ControlFlow::Continue(())
            });
    }

    /// Every verified mapping of `pfn` (for the console's `rmap <pa>` and for tests).
    pub fn mappers<V: VmSet>(&self, pfn: Pfn, vms: &V) -> alloc::vec::Vec<Mapper> {
        let mut out = alloc::vec::Vec::new();
        self.walk(pfn, vms, |m, _| {
            out.push(*m);
            ControlFlow::Continue(())
        });
        out
    }

    /// Access-bit clock step: clears the access flag in every mapping of `pfn` and returns how
    /// many had it set (Linux's `folio_referenced`).
    pub fn referenced<V: VmSet>(&self, pfn: Pfn, vms: &V) -> u32 {
        let mut young = 0;
        self.walk(pfn, vms, |m, s2| {
            young += u32::from(s2.test_and_clear_young(m.ipa));
            ControlFlow::Continue(())
        });
        young
    }
}
