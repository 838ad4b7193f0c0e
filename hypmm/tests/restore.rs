//! The memory half of snapshot restore (`hypmm::restore_dirty`, and the
//! slow path `reset_memory` + `fork_memory`) on a host machine, through
//! rmap's real reverse map.

mod common;

use common::{TestVm, World, BLOCK_PAGES, RAM_BASE, RAM_PAGES};
use hypmm::{RestoreError, PAGE_SIZE};
use rmap::Ipa;
use rmap::{PageState, Stage2, Stage2Locked};

/// Every page of `vm`'s RAM as rmap sees it.
fn entries(vm: &TestVm) -> Vec<PageState> {
    let s2 = vm.lock();
    (0..RAM_PAGES)
        .map(|i| s2.lookup(RAM_BASE + i * PAGE_SIZE))
        .collect()
}

/// The snapshot's entries as the restored VM maps them: read-only.
fn read_only(list: Vec<PageState>) -> Vec<PageState> {
    let ro = |e| match e {
        PageState::Mapped { pfn, .. } => PageState::Mapped {
            pfn,
            writable: false,
        },
        e => e,
    };
    list.into_iter().map(ro).collect()
}

/// A VM with two 2 MiB blocks, snapshotted, then changed: a copy-on-write
/// page in the first block, a released page and a fresh page in the second.
fn changed_vm(w: &World) -> (std::sync::Arc<TestVm>, std::sync::Arc<TestVm>) {
    let vm = w.vm(1, RAM_PAGES);
    w.access(&vm, RAM_BASE, true);
    w.access(&vm, RAM_BASE + BLOCK_PAGES * PAGE_SIZE, true);
    let snap = w.empty_vm(2);
    w.fork(&vm, &snap);
    assert!(vm.dirty.lock().unwrap().is_empty());
    w.access(&vm, RAM_BASE + 3 * PAGE_SIZE, true);
    let second = RAM_BASE + BLOCK_PAGES * PAGE_SIZE;
    let hole = second + 10 * PAGE_SIZE;
    w.release(&vm, hole..hole + PAGE_SIZE).expect("release");
    w.access(&vm, hole, true);
    w.access(&vm, second + 20 * PAGE_SIZE, true);
    (vm, snap)
}

/// Makes a writable page of `vm` read-only (as a fork or a merge pass would).
fn write_protect(vm: &TestVm, ipa: Ipa) {
    let mut s2 = vm.lock();
    if let PageState::Mapped {
        pfn,
        writable: true,
    } = s2.lookup(ipa)
    {
        let ro = PageState::Mapped {
            pfn,
            writable: false,
        };
        s2.compare_exchange(
            ipa,
            PageState::Mapped {
                pfn,
                writable: true,
            },
            ro,
        )
        .expect("write-protect");
    }
}

#[test]
fn restore_dirty_makes_every_logged_page_the_snapshots_again() {
    let w = World::new(false);
    let (vm, snap) = changed_vm(&w);
    let want = read_only(entries(&snap));
    assert_ne!(entries(&vm), want, "the VM changed");
    let logged = vm.dirty.lock().unwrap().len();
    assert!(logged >= 3, "{logged} pages logged");

    // The VM's own writable pages are refilled in place (restore_inplace.rs);
    // write-protected, they take the ordinary path this test is about.
    for ipa in vm.dirty.lock().unwrap().clone() {
        write_protect(&vm, ipa);
    }
    hypmm::restore_dirty(&w.cx(), &*vm, &*snap).expect("restore");

    assert_eq!(entries(&vm), want);
    assert!(
        vm.dirty.lock().unwrap().is_empty(),
        "every logged page done"
    );
    // Only the snapshot's two blocks are left: every private copy freed
    // (after the flush: the TLB model would have panicked otherwise).
    assert_eq!(w.hw().frames.allocated(), 2 * BLOCK_PAGES as usize);
    w.teardown(&vm);
    w.teardown(&snap);
    assert_eq!(w.hw().frames.allocated(), 0);
    assert_eq!(w.hw().tables.allocated_pages(), 0);
}

#[test]
fn restore_from_a_torn_down_snapshot_is_refused() {
    let w = World::new(false);
    let (vm, snap) = changed_vm(&w);
    w.teardown(&snap);
    let r = hypmm::restore_dirty(&w.cx(), &*vm, &*snap);
    assert_eq!(r, Err(RestoreError::SnapshotGone));
}

#[test]
fn reset_then_fork_is_the_slow_path_to_the_same_memory() {
    let w = World::new(false);
    let (vm, snap) = changed_vm(&w);
    let want = read_only(entries(&snap));
    hypmm::reset_memory(&w.cx(), &*vm);
    assert!(entries(&vm).iter().all(|e| *e == PageState::Invalid));
    assert!(vm.memory.lock().is_live(), "the table and VMID are kept");
    w.fork(&snap, &vm);
    assert_eq!(entries(&vm), want);
}
