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

/// A save's run written in place keeps its frames pinned until the disk has read them,
/// which may be after the save's snapshot is gone. A write by the VM then must copy, not
/// reuse the frame it alone maps again (Linux's `do_wp_page` checks the page count for the
/// same reason): the disk would read the new bytes against the old checksum.
#[test]
fn a_pinned_frame_is_copied_not_reused_once_its_snapshot_is_gone() {
    let w = HostWorld::new(64, 8, 64, 256);
    let a = w.create_vm(&[(RAM, 4)]);
    a.write(&w.rmap, &w.machine, RAM, 0x11).unwrap();
    let snap = w.fork(&a).unwrap();
    let pfn = pfn_at(&snap, RAM);
    assert!(w.rmap.pin_frame(pfn));
    w.destroy(&snap);
    a.write(&w.rmap, &w.machine, RAM, 0x22).unwrap();
    assert_ne!(pfn_at(&a, RAM), pfn, "reused under a pin");
    assert_eq!(w.machine.read_value(pfn), 0x11, "the pinned bytes changed");
    w.rmap.put_frame(pfn, &w.machine);
    assert!(w.machine.is_free(pfn), "the pin was the last reference");
    // Unpinned, a sole mapper's write reuses its frame again.
    let q = pfn_at(&a, RAM);
    let snap = w.fork(&a).unwrap();
    w.destroy(&snap);
    a.write(&w.rmap, &w.machine, RAM, 0x33).unwrap();
    assert_eq!(pfn_at(&a, RAM), q, "copied with no pin");
    w.check().unwrap();
}

/// The same for a frame of a 2 MiB block (the first-touch fault's, what an idle Linux
/// image's runs are made of): the write splits the block and copies the pinned page.
#[test]
fn a_pinned_frame_of_a_block_is_copied_not_reused() {
    use rmap::host::{page_ipa, BLOCK_PAGES};
    let w = HostWorld::new(2048, 1, 8192, 16384);
    let a = w.create_vm(&[(RAM, BLOCK_PAGES)]);
    assert!(w.fault_block(&a, RAM));
    let ipa = page_ipa(RAM, 7);
    a.write(&w.rmap, &w.machine, ipa, 0x44).unwrap();
    let snap = w.fork(&a).unwrap();
    let pfn = pfn_at(&snap, ipa);
    assert!(w.rmap.pin_frame(pfn));
    w.destroy(&snap);
    a.write(&w.rmap, &w.machine, ipa, 0x55).unwrap();
    assert_ne!(pfn_at(&a, ipa), pfn, "reused under a pin");
    assert_eq!(w.machine.read_value(pfn), 0x44, "the pinned bytes changed");
    w.rmap.put_frame(pfn, &w.machine);
    // Its neighbour, not pinned, is reused in place.
    let next = page_ipa(RAM, 8);
    let q = pfn_at(&a, next);
    a.write(&w.rmap, &w.machine, next, 0x66).unwrap();
    assert_eq!(pfn_at(&a, next), q);
    w.check().unwrap();
    w.destroy(&a);
    w.check().unwrap();
    assert_eq!(w.machine.allocated(), 0);
}
