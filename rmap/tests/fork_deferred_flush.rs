//! A fork between a batch migration's unmap and its deferred TLB flush (the stress test's
//! failure of 3 December 2026, made repeatable). The batch turns the parent's writable
//! entry into a migration entry and leaves its invalidation for one flush per VM; the fork
//! write-protects that (invalid) entry and shares it with the child. Unless the fork's
//! caller invalidates the parent's VMID (`Rmap::fork_vm`'s requirement, hypmm's
//! `fork_memory`, `HostWorld::fork`), the parent's TLB still holds the writable
//! translation, and the parent's next store lands in the frame the batch is about to copy
//! for both: the child sees a write made after its fork.

use rmap::host::{page_ipa, FlushHooked, HostStage2, HostWorld};
use rmap::{Ipa, PageState, Stage2, Stage2Locked, VmId};
use std::sync::mpsc::channel;
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

const RAM: Ipa = Ipa::new(0x4000_0000);

fn frame_of(s2: &HostStage2, ipa: Ipa) -> rmap::Pfn {
    match Stage2::lock(s2).lookup(ipa) {
        PageState::Mapped { pfn, .. } => pfn,
        other => panic!("{ipa:#x} is {other:?}"),
    }
}

#[test]
fn a_fork_before_a_batchs_deferred_flush_keeps_the_childs_copy() {
    let world = HostWorld::new(64, 4, 64, 256);
    let (rmap, m) = (&world.rmap, &world.machine);
    let parent = world.create_vm(&[(RAM, 4)]);
    let ipa = page_ipa(RAM, 1);
    // The store maps the page writable and leaves the translation in the parent's TLB.
    parent.write(rmap, m, ipa, 1).unwrap();
    let pfn = frame_of(&parent.s2, ipa);
    let (here_tx, here_rx) = channel();
    let (go_tx, go_rx) = channel();
    // The batch's flush of the parent says it is there, then waits for a go (once).
    let gate = Mutex::new(Some((here_tx, go_rx)));
    let stop = |id: VmId| {
        if id != parent.id {
            return;
        }
        if let Some((here, go)) = gate.lock().unwrap().take() {
            here.send(()).unwrap();
            go.recv().unwrap();
        }
    };
    let vms = FlushHooked::new(&world, &stop);
    let child = thread::scope(|s| {
        let batch = s.spawn(|| {
            let mut out = Vec::new();
            rmap.migrate_frames(&vms, m, &[pfn], &mut out);
            out
        });
        // The batch has made the entry a migration entry and stopped before its flush.
        here_rx.recv().unwrap();
        let child = world.fork(&parent).unwrap();
        // The parent's store after the fork: with the fork's invalidation it faults on the
        // migration entry and waits for the batch (so it runs on its own thread); through
        // a stale writable translation it would land in the old frame at once.
        let writer = s.spawn(|| parent.write(rmap, m, ipa, 2).unwrap());
        thread::sleep(Duration::from_millis(100));
        go_tx.send(()).unwrap();
        let moved = batch.join().unwrap();
        writer.join().unwrap();
        assert!(moved[0].is_ok(), "the frame moved: {moved:?}");
        child
    });
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
