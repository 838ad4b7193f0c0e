//! Restore in place (`hypmm::restore_dirty`): a page the VM maps writable
//! and alone is rewritten with the snapshot's bytes and stays the VM's,
//! writable and logged, so the guest's next write does not fault; any other
//! page takes the ordinary path (cleared, then the snapshot's entry shared).

mod common;

use common::{TestVm, World, BLOCK_PAGES, RAM_BASE, RAM_PAGES};
use hypmm::{BLOCK_SIZE, PAGE_SIZE};
use rmap::{Ipa, PageState, Pfn, Stage2, Stage2Locked};
use stage2::host::TlbCall;
use stage2::Leaf;
use std::sync::Arc;

/// The frame mapping `ipa` in `vm`.
fn pfn_of(vm: &TestVm, ipa: Ipa) -> Pfn {
    vm.memory.lock().pa_of(ipa).expect("mapped").pfn()
}

/// The value the host frame behind `ipa` holds.
fn value(w: &World, vm: &TestVm, ipa: Ipa) -> u64 {
    w.hw().frames.read_value(pfn_of(vm, ipa))
}

/// The guest writes `v` to page `ipa` (faulting first if it must).
fn write(w: &World, vm: &TestVm, ipa: Ipa, v: u64) {
    if !matches!(w.entry(vm, ipa), PageState::Mapped { writable: true, .. }) {
        w.access(vm, ipa, true);
    }
    w.hw().frames.write_value(pfn_of(vm, ipa), v);
}

/// Whether the leaf mapping `ipa` allows execution.
fn executable(vm: &TestVm, ipa: Ipa) -> bool {
    let leaf = vm.memory.lock().table().lookup(ipa).expect("a leaf");
    matches!(leaf.leaf, Leaf::Mapped(m) if m.attrs.perm.exec)
}

/// A VM whose first block holds value 100 + i in page i, and its snapshot.
fn snapshotted(w: &World) -> (Arc<TestVm>, Arc<TestVm>) {
    let vm = w.vm(1, RAM_PAGES);
    w.access(&vm, RAM_BASE, true);
    for i in 0..8 {
        let ipa = RAM_BASE + i * PAGE_SIZE;
        w.hw().frames.write_value(pfn_of(&vm, ipa), 100 + i);
    }
    let snap = w.empty_vm(2);
    w.fork(&vm, &snap);
    (vm, snap)
}

#[test]
fn own_writable_pages_are_refilled_in_place_and_stay_writable() {
    let w = World::new(false);
    let (vm, snap) = snapshotted(&w);
    let page = RAM_BASE + 3 * PAGE_SIZE;
    write(&w, &vm, page, 999); // copy-on-write: the VM's own frame
    let own = pfn_of(&vm, page);
    assert_ne!(own, pfn_of(&snap, page));

    for round in 0..3 {
        hypmm::restore_dirty(&w.cx(), &*vm, &*snap).expect("restore");
        let kept = PageState::Mapped {
            pfn: own,
            writable: true,
        };
        assert_eq!(
            w.entry(&vm, page),
            kept,
            "round {round}: same frame, writable"
        );
        assert_eq!(
            value(&w, &vm, page),
            103,
            "round {round}: the snapshot's bytes"
        );
        assert!(
            vm.dirty.lock().unwrap().contains(&page),
            "a writable page stays logged: the next write will not fault"
        );
        // The guest writes again without a fault; the snapshot never sees it.
        write(&w, &vm, page, 500 + round);
        assert_eq!(pfn_of(&vm, page), own, "no fault, no new frame");
        assert_eq!(
            value(&w, &snap, page),
            103,
            "isolation: the snapshot is unchanged"
        );
    }
    // One private frame besides the snapshot's block, nothing leaked.
    assert_eq!(w.hw().frames.allocated(), BLOCK_PAGES as usize + 1);
    w.teardown(&vm);
    w.teardown(&snap);
    assert_eq!(w.hw().frames.allocated(), 0);
}

#[test]
fn a_refilled_page_loses_execute_permission_in_every_tlb() {
    let w = World::new(false);
    let (vm, snap) = snapshotted(&w);
    let page = RAM_BASE + 5 * PAGE_SIZE;
    write(&w, &vm, page, 7);
    assert!(
        vm.memory.lock().make_executable(page),
        "the guest fetched from it"
    );
    assert!(executable(&vm, page));
    w.touch(&vm, page);
    let before = w.hw().tlb.calls().len();

    hypmm::restore_dirty(&w.cx(), &*vm, &*snap).expect("restore");

    // New contents reach the I-cache only through a fetch fault.
    assert!(!executable(&vm, page), "refilled page is execute-never");
    let vmid = vm.vmid;
    let flushed = w.hw().tlb.calls()[before..].iter().any(|c| match *c {
        TlbCall::Vmid { vmid: v } => v == vmid,
        TlbCall::Ipa { vmid: v, ipa, .. } => v == vmid && ipa == page.raw(),
        TlbCall::All => true,
        _ => false,
    });
    assert!(
        flushed,
        "the executable entry was invalidated before the restore returned"
    );
    assert!(
        vm.memory.lock().make_executable(page),
        "a fetch makes it executable again"
    );
    assert_eq!(value(&w, &vm, page), 105);
}

#[test]
fn pages_the_snapshot_has_no_frame_for_take_the_ordinary_path() {
    let w = World::new(false);
    let (vm, snap) = snapshotted(&w);
    // First touched after the snapshot: a writable block the snapshot has
    // nothing for. Cleared whole (a restore never splits), not refilled.
    let second = RAM_BASE + BLOCK_SIZE;
    w.access(&vm, second, true);
    assert_eq!(w.level(&vm, second), Some(2), "a writable block");
    // A page written, then write-protected (as a fork or merge pass would):
    // not the VM's alone any more, so shared again with the snapshot's frame.
    let page = RAM_BASE + 2 * PAGE_SIZE;
    write(&w, &vm, page, 1);
    let own = pfn_of(&vm, page);
    let ro = PageState::Mapped {
        pfn: own,
        writable: false,
    };
    let rw = PageState::Mapped {
        pfn: own,
        writable: true,
    };
    vm.lock()
        .compare_exchange(page, rw, ro)
        .expect("write-protect");

    hypmm::restore_dirty(&w.cx(), &*vm, &*snap).expect("restore");

    for i in 0..BLOCK_PAGES {
        assert_eq!(w.entry(&vm, second + i * PAGE_SIZE), PageState::Invalid);
    }
    let shared = PageState::Mapped {
        pfn: pfn_of(&snap, page),
        writable: false,
    };
    assert_eq!(w.entry(&vm, page), shared);
    assert_eq!(value(&w, &vm, page), 102);
    assert!(vm.dirty.lock().unwrap().is_empty(), "nothing left writable");
    assert_eq!(w.hw().frames.allocated(), BLOCK_PAGES as usize);
}
