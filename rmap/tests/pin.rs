//! `Rmap::pin_frame`: a reader that found a frame under a stage-2 lock and reads it after
//! unlocking (a save reading a frozen snapshot on two CPUs) pins it. Migration and reclaim
//! must then leave the frame where it is, and a frame whose last mapping goes while it is
//! pinned must stay allocated, with its bytes, until the pin is dropped.

use rmap::host::{HostVm, HostWorld};
use rmap::{Error, Ipa, Pfn, Stage2, Stage2Locked};

const RAM: Ipa = Ipa::new(0x4000_0000);

fn pfn_at(vm: &HostVm, ipa: Ipa) -> Pfn {
    vm.s2.lock().lookup(ipa).pfn().expect("mapped")
}

#[test]
fn a_pinned_frame_is_neither_migrated_nor_reclaimed() {
    let w = HostWorld::new(64, 8, 64, 256);
    let a = w.create_vm(&[(RAM, 4)]);
    a.write(&w.rmap, &w.machine, RAM, 0x5a5a).unwrap();
    let snap = w.fork(&a).unwrap();
    let pfn = pfn_at(&snap, RAM);
    assert!(w.rmap.pin_frame(pfn));
    assert_eq!(
        w.rmap.migrate_frame(&w.vms, &w.machine, pfn),
        Err(Error::Busy)
    );
    assert_eq!(
        w.rmap.reclaim_frame(&w.vms, &w.machine, &w.machine, pfn),
        Err(Error::Busy)
    );
    assert_eq!(pfn_at(&snap, RAM), pfn, "still mapped where it was");
    w.rmap.put_frame(pfn, &w.machine);
    // Unpinned, it moves again.
    let moved = w.rmap.migrate_frame(&w.vms, &w.machine, pfn).unwrap();
    assert_ne!(moved, pfn);
    assert_eq!(snap.read(&w.rmap, &w.machine, RAM).unwrap(), 0x5a5a);
    w.check().unwrap();
}

#[test]
fn a_pinned_frame_outlives_its_last_mapping() {
    let w = HostWorld::new(64, 8, 64, 256);
    let a = w.create_vm(&[(RAM, 4)]);
    a.write(&w.rmap, &w.machine, RAM, 0x77).unwrap();
    let snap = w.fork(&a).unwrap();
    let pfn = pfn_at(&snap, RAM);
    assert!(w.rmap.pin_frame(pfn));
    w.destroy(&snap);
    w.destroy(&a);
    assert!(!w.machine.is_free(pfn), "freed under a pin");
    assert_eq!(w.machine.read_value(pfn), 0x77, "its bytes kept");
    w.rmap.put_frame(pfn, &w.machine);
    assert!(w.machine.is_free(pfn), "the pin was the last reference");
    assert_eq!(w.machine.allocated(), 0);
    // A free frame cannot be pinned.
    assert!(!w.rmap.pin_frame(pfn));
}
