//! A VM set over a world's VMs that calls a hook before each VM's deferred flush
//! (`Stage2::flush_deferred`), for tests that count a batch's flushes or stop it there.

use super::{HostStage2Guard, HostVm, HostWorld};
use crate::backend::{Stage2, VmSet};
use crate::{UnlinkProof, VmId};
use alloc::sync::Arc;

/// Runs `hook(vm)` before each deferred flush of a VM reached through it.
pub struct FlushHooked<'a> {
    world: &'a HostWorld,
    hook: &'a (dyn Fn(VmId) + Sync),
}

impl<'a> FlushHooked<'a> {
    /// `world`'s VMs, with `hook` before their deferred flushes (the world's own do not
    /// call it).
    pub fn new(world: &'a HostWorld, hook: &'a (dyn Fn(VmId) + Sync)) -> Self {
        FlushHooked { world, hook }
    }
}

/// One VM of a [`FlushHooked`].
pub struct HookedVm<'a> {
    vm: Arc<HostVm>,
    hook: &'a (dyn Fn(VmId) + Sync),
}

impl Stage2 for HookedVm<'_> {
    type Locked<'b>
        = HostStage2Guard<'b>
    where
        Self: 'b;
    fn lock(&self) -> HostStage2Guard<'_> {
        self.vm.s2.lock()
    }
    fn lock_nested(&self) -> HostStage2Guard<'_> {
        self.vm.s2.lock_nested()
    }
    fn flush_deferred(&self) {
        (self.hook)(self.vm.id);
        self.vm.s2.flush_deferred();
    }
    fn free_tables(&self, proof: UnlinkProof) {
        self.vm.s2.free_tables(proof);
    }
}

impl<'a> VmSet for FlushHooked<'a> {
    type Vm = HookedVm<'a>;
    fn with_vm<R>(&self, id: VmId, f: impl FnOnce(&HookedVm<'a>) -> R) -> Option<R> {
        let vm = self.world.vms.get(id)?;
        Some(f(&HookedVm {
            vm,
            hook: self.hook,
        }))
    }
}
