//! A VM's memory as the memory manager owns it: its RAM range, region list,
//! stage-2 table and dirty log, and the registry through which rmap walkers
//! find a VM's memory by id (`VmSet`). `vm::Vm` holds an `Arc` of it; `mm`
//! never reaches up to the VM itself.

use crate::mm::dirty::DirtyLog;
use crate::mm::memory::{new_guest_memory, GuestMemory, HypMachine, LockedStage2};
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use platform::MemRange;
use rmap::lock::{Level, OrderedMutex, OrderedRwLock};
use rmap::{RegionList, Stage2, UnlinkProof, VmId};
use spin::Mutex;

/// Why a VM's memory could not be set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemError {
    /// No frame for the stage-2 root or the dirty log.
    NoMemory,
}

/// One VM's memory.
pub struct VmMemory {
    /// The VM's id (the same number as `vm::Vm::id`).
    pub id: u32,
    /// Guest RAM in the VM's IPA space.
    pub ram: MemRange,
    /// The VM's region list (DESIGN.md level 1): read for faults, write for
    /// fork, region changes and destroy.
    pub regions: OrderedRwLock<RegionList>,
    /// The VM's stage-2 lock (DESIGN.md level 4) and the table it guards.
    pub memory: OrderedMutex<GuestMemory>,
    /// Guest pages whose stage-2 entry may differ from this VM's latest
    /// snapshot: what a restore to that snapshot has to undo.
    pub dirty: Mutex<DirtyLog>,
    /// A VM loaded from the disk: the 2 MiB chunks whose image entries are
    /// not written yet (`mm::diskpages`).
    pub lazy: crate::mm::diskpages::Lazy,
}

/// Every VM's memory by id. A leaf lock: held only to insert, remove or
/// clone an `Arc`, never while taking another lock, so it sits outside the
/// memory manager's lock order and may be taken under any of its locks
/// (rmap walkers look VMs up while holding an anon_vma lock).
static REGISTRY: Mutex<BTreeMap<u32, Arc<VmMemory>>> = Mutex::new(BTreeMap::new());

impl VmMemory {
    /// A VM's memory with an empty region list and stage-2 table, registered
    /// under `id` until [`unregister`].
    pub fn create(id: u32, ram: MemRange) -> Result<Arc<VmMemory>, MemError> {
        let memory = new_guest_memory()?;
        let mem = Arc::new(VmMemory {
            id,
            ram,
            regions: OrderedRwLock::new(Level::VM_REGIONS, "vm.regions", RegionList::new(VmId(id))),
            memory: OrderedMutex::new(Level::STAGE2, "vm.stage2", memory),
            dirty: Mutex::new(DirtyLog::new(ram)),
            lazy: Default::default(),
        });
        REGISTRY.lock().insert(id, mem.clone());
        Ok(mem)
    }
}

/// The memory of VM `id`, if it is registered.
pub fn get(id: u32) -> Option<Arc<VmMemory>> {
    REGISTRY.lock().get(&id).cloned()
}

/// Forgets VM `id` (at its teardown, once its memory is destroyed).
pub fn unregister(id: u32) {
    REGISTRY.lock().remove(&id);
}

impl Stage2 for VmMemory {
    type Locked<'a> = LockedStage2<'a>;

    fn lock(&self) -> LockedStage2<'_> {
        LockedStage2::new(self.memory.lock())
    }

    fn lock_nested(&self) -> LockedStage2<'_> {
        LockedStage2::new(self.memory.lock_nested(1))
    }

    fn flush_deferred(&self) {
        self.memory.lock().flush_deferred();
    }

    fn free_tables(&self, proof: UnlinkProof) {
        debug_assert_eq!(proof.vm().0, self.id);
        self.memory.lock().destroy();
    }
}

impl hypmm::GuestVm<HypMachine> for VmMemory {
    fn regions(&self) -> &OrderedRwLock<RegionList> {
        &self.regions
    }

    fn ram(&self) -> core::ops::Range<rmap::Ipa> {
        rmap::Ipa::new(self.ram.base)..rmap::Ipa::new(self.ram.end())
    }

    fn next_dirty(&self, from: rmap::Ipa) -> Option<rmap::Ipa> {
        self.dirty.lock().next_from(from)
    }

    fn clear_dirty(&self, ipa: rmap::Ipa) {
        self.dirty.lock().clear(ipa);
    }
}
