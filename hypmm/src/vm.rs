//! A VM's memory as the generic operations see it ([`GuestVm`]), what they
//! work with ([`MemCtx`]), and the whole-VM operations: fork and teardown.

use crate::frames::Frames;
use crate::locked::LockedStage2;
use crate::machine::Machine;
use core::ops::Range;
use rmap::lock::OrderedRwLock;
use rmap::{Ipa, RegionList, Rmap, Stage2, SwapStore};

/// A VM's memory (hyp's `VmMemory`, or a host test's VM): rmap's `Stage2`
/// over the adapter, its region list, its RAM and its dirty log. `'static`:
/// rmap's `Stage2::Locked<'a>` asks `Self: 'a` for every `'a`.
pub trait GuestVm<M: Machine>: 'static + for<'a> Stage2<Locked<'a> = LockedStage2<'a, M>> {
    /// The VM's region list (DESIGN level 1).
    fn regions(&self) -> &OrderedRwLock<RegionList>;
    /// Guest RAM in the VM's IPA space.
    fn ram(&self) -> Range<Ipa>;
    /// The first page at or after `from` whose entry may differ from the
    /// VM's latest snapshot (the dirty log), if any.
    fn next_dirty(&self, from: Ipa) -> Option<Ipa>;
    /// The page at `ipa` is its snapshot's again.
    fn clear_dirty(&self, ipa: Ipa);
}

/// What the memory operations work with: the reverse map, the machine (its
/// frames), and the swap store.
pub struct MemCtx<'a, M, W> {
    /// The one reverse map over every guest frame.
    pub rmap: &'a Rmap,
    /// The machine: frames, TLB, caches.
    pub machine: &'a M,
    /// Where reclaimed pages live.
    pub swap: &'a W,
}

impl<M: Machine, W: SwapStore> MemCtx<'_, M, W> {
    /// rmap's frame allocator over the machine's frames.
    pub fn frames(&self) -> Frames<'_, M> {
        Frames(self.machine)
    }
}

/// An open batch of a VM's stage-2 changes: their TLB invalidations wait
/// for one VMID-wide flush when it drops. Takes the stage-2 lock (level 4)
/// briefly now and at the drop: neither may happen with it held.
#[must_use = "the batch ends (one flush) when the guard drops"]
pub struct BatchGuard<'a, M: Machine, V: GuestVm<M>>(&'a V, core::marker::PhantomData<M>);

impl<'a, M: Machine, V: GuestVm<M>> BatchGuard<'a, M, V> {
    /// Opens a batch on `vm`.
    pub fn new(vm: &'a V) -> Self {
        vm.lock().mem.begin_batch();
        BatchGuard(vm, core::marker::PhantomData)
    }
}

impl<M: Machine, V: GuestVm<M>> Drop for BatchGuard<'_, M, V> {
    fn drop(&mut self) {
        self.0.lock().mem.end_batch();
    }
}

/// Tears down a VM's memory: zap every entry, unlink its regions from the
/// reverse map, and only then free its stage-2 tables (DESIGN lesson 5).
pub fn teardown<M: Machine, V: GuestVm<M>, W: SwapStore>(cx: &MemCtx<'_, M, W>, vm: &V) {
    // No vCPU of the VM runs again, so one VMID-wide invalidation after the
    // zap covers every entry (destroy() flushes the VMID again before it is
    // reused); frames freed meanwhile are unreachable through this VM.
    let batch = BatchGuard::new(vm);
    let proof = cx
        .rmap
        .destroy_vm(&mut vm.regions().write(), vm, &cx.frames(), cx.swap);
    drop(batch);
    vm.free_tables(proof);
}

/// Shares every page of `parent` copy-on-write with the empty `child`:
/// regions cloned and linked into the reverse map, parent entries made
/// read-only with one batched TLB invalidation, child entries filled from the
/// parent's. Both VMs must be stopped (no vCPU on a CPU).
pub fn fork_memory<M: Machine, V: GuestVm<M>, W: SwapStore>(
    cx: &MemCtx<'_, M, W>,
    parent: &V,
    child: &V,
) -> Result<(), rmap::Error> {
    let mut parent_regions = parent.regions().write();
    let mut child_regions = child.regions().write_nested(1);
    let _batch = BatchGuard::new(parent);
    cx.rmap.fork_vm(
        &mut parent_regions,
        parent,
        &mut child_regions,
        child,
        cx.swap,
    )
}
