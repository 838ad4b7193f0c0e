//! A fork between a batch migration's unmap and its deferred TLB flush (the stress test's
//! failure of 3 December 2026, made repeatable). The batch turns the parent's writable
//! entry into a migration entry and leaves its invalidation for one flush per VM; the fork
//! write-protects that (invalid) entry and shares it with the child. Unless the fork's
//! caller invalidates the parent's VMID (`Rmap::fork_vm`'s requirement, hypmm's
//! `fork_memory`, `HostWorld::fork`), the parent's TLB still holds the writable
//! translation, and the parent's next store lands in the frame the batch is about to copy
//! for both: the child sees a write made after its fork.

use rmap::host::{page_ipa, HostStage2, HostStage2Guard, HostVm, HostWorld};
use rmap::{Ipa, PageState, Stage2, Stage2Locked, UnlinkProof, VmId, VmSet};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

const RAM: Ipa = Ipa::new(0x4000_0000);

/// Where the batch's flush of the parent stops: it says it is there, then waits for a go.
type Gate = Mutex<Option<(Sender<()>, Receiver<()>)>>;

/// The world's VMs, except that the batch's deferred flush of `parent` first tells the
/// test it is there and waits for its go.
struct Hooked {
    world: Arc<HostWorld>,
    parent: VmId,
    at_flush: Gate,
}

struct HookedVm<'a> {
    vm: Arc<HostVm>,
    hook: Option<&'a Gate>,
}

impl Stage2 for HookedVm<'_> {
    type Locked<'b>
        = HostStage2Guard<'b>
    where
        Self: 'b;
    fn lock(&self) -> HostStage2Guard<'_> {
        Stage2::lock(&self.vm.s2)
    }
    fn lock_nested(&self) -> HostStage2Guard<'_> {
        Stage2::lock_nested(&self.vm.s2)
    }
    fn flush_deferred(&self) {
        if let Some((here, go)) = self.hook.and_then(|h| h.lock().unwrap().take()) {
            here.send(()).unwrap();
            go.recv().unwrap();
        }
        Stage2::flush_deferred(&self.vm.s2);
    }
    fn free_tables(&self, proof: UnlinkProof) {
        Stage2::free_tables(&self.vm.s2, proof)
    }
}

impl<'s> VmSet for &'s Hooked {
    type Vm = HookedVm<'s>;
    fn with_vm<R>(&self, id: VmId, f: impl FnOnce(&HookedVm<'s>) -> R) -> Option<R> {
        let vm = self.world.vms.get(id)?;
        let hook = (id == self.parent).then_some(&self.at_flush);
        Some(f(&HookedVm { vm, hook }))
    }
}

fn frame_of(s2: &HostStage2, ipa: Ipa) -> rmap::Pfn {
    match Stage2::lock(s2).lookup(ipa) {
        PageState::Mapped { pfn, .. } => pfn,
        other => panic!("{ipa:#x} is {other:?}"),
    }
}

#[test]
fn a_fork_before_a_batchs_deferred_flush_keeps_the_childs_copy() {
    let world = Arc::new(HostWorld::new(64, 4, 64, 256));
    let (rmap, m) = (&world.rmap, &world.machine);
    let parent = world.create_vm(&[(RAM, 4)]);
    let ipa = page_ipa(RAM, 1);
    // The store maps the page writable and leaves the translation in the parent's TLB.
    parent.write(rmap, m, ipa, 1).unwrap();
    let pfn = frame_of(&parent.s2, ipa);
    let (here_tx, here_rx) = channel();
    let (go_tx, go_rx) = channel();
    let hooked = Arc::new(Hooked {
        world: world.clone(),
        parent: parent.id,
        at_flush: Mutex::new(Some((here_tx, go_rx))),
    });
    let batch = {
        let (world, hooked) = (world.clone(), hooked.clone());
        thread::spawn(move || {
            let mut out = Vec::new();
            world
                .rmap
                .migrate_frames(&&*hooked, &world.machine, &[pfn], &mut out);
            out
        })
    };
    // The batch has made the entry a migration entry and stopped before its flush.
    here_rx.recv().unwrap();
    let child = world.fork(&parent).unwrap();
    // The parent's store after the fork: with the fork's invalidation it faults on the
    // migration entry and waits for the batch (so it runs on its own thread); through a
    // stale writable translation it would land in the old frame at once.
    let writer = {
        let (world, parent) = (world.clone(), parent.clone());
        thread::spawn(move || parent.write(&world.rmap, &world.machine, ipa, 2).unwrap())
    };
    thread::sleep(Duration::from_millis(100));
    go_tx.send(()).unwrap();
    let moved = batch.join().unwrap();
    writer.join().unwrap();
    assert!(moved[0].is_ok(), "the frame moved: {moved:?}");
    assert_eq!(
        child.read(rmap, m, ipa).unwrap(),
        1,
        "the child saw a later write"
    );
    assert_eq!(parent.read(rmap, m, ipa).unwrap(), 2);
    world.check().unwrap();
    world.destroy(&child);
    world.destroy(&parent);
    assert_eq!(world.machine.allocated(), 0);
}
