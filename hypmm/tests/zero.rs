//! Merging all-zero pages into the shared zero page (`Scanner` →
//! `Rmap::merge_zero`) over the real adapter: the entries become
//! `ZeroPage` (a valid read-only leaf of the machine's zero frame) in every
//! trust group, their frames are freed, a write gets a private zeroed frame
//! while other mappers keep reading zeroes, and fork, restore, release and
//! teardown handle the entry without touching any reference.

mod common;

use common::{walk, TestVm, World, RAM_BASE, ZERO_PAGE};
use hypmm::{ScanVm, Scanner, PAGE_SIZE};
use rmap::{MergeError, MergePage, PageState, Pfn, VmId};
use std::sync::Arc;

const PAGES: u64 = 16; // below 2 MiB: page faults, no blocks

fn page(i: u64) -> rmap::Ipa {
    RAM_BASE + i * PAGE_SIZE
}

/// A VM whose page `i` holds `values[i]` (0: the demand-zero frame as is).
fn vm_with(w: &World, id: u32, values: &[u64]) -> Arc<TestVm> {
    let vm = w.vm(id, PAGES);
    for (i, &v) in values.iter().enumerate() {
        w.access(&vm, page(i as u64), true);
        if v != 0 {
            w.hw().frames.write_value(pfn(w, &vm, i as u64), v);
        }
    }
    vm
}

fn pfn(w: &World, vm: &TestVm, i: u64) -> Pfn {
    match w.entry(vm, page(i)) {
        PageState::Mapped { pfn, .. } => pfn,
        other => panic!("page {i} of vm {}: {other:?}", vm.id),
    }
}

fn scan_vm(vm: &TestVm, group: u32) -> ScanVm {
    ScanVm {
        id: VmId(vm.id),
        group,
        ram: RAM_BASE..RAM_BASE + PAGES * PAGE_SIZE,
    }
}

/// Two passes: the second merges what the first saw.
fn merge_twice(w: &World, vms: &[ScanVm]) -> hypmm::PassStats {
    let mut scanner = Scanner::new();
    scanner.pass(&w.cx(), &w.vms, vms);
    scanner.pass(&w.cx(), &w.vms, vms)
}

/// What the hardware translates `page(i)` of `vm` to (a lock-free walk).
fn hw_pa(w: &World, vm: &TestVm, i: u64) -> Option<u64> {
    walk(w.hw(), vm.root, page(i).raw())
}

#[test]
fn all_zero_pages_of_every_group_map_the_zero_page_and_free_their_frames() {
    let w = World::new(false);
    let a = vm_with(&w, 1, &[0, 5, 0]);
    let b = vm_with(&w, 2, &[0, 6]);
    // a's pages were touched (cached in the TLB model): freeing their
    // frames before the invalidation would panic.
    let used = w.hw().frames.allocated();
    let s = merge_twice(&w, &[scan_vm(&a, 1), scan_vm(&b, 2)]);
    assert_eq!((s.zero, s.merged), (3, 0), "{s:?}");
    for (vm, i) in [(&a, 0), (&a, 2), (&b, 0)] {
        assert_eq!(w.entry(vm, page(i)), PageState::ZeroPage);
        assert_eq!(
            hw_pa(&w, vm, i),
            Some(ZERO_PAGE.raw()),
            "valid, to the zero frame"
        );
    }
    assert_eq!(used - w.hw().frames.allocated(), 3, "three frames freed");
    assert!(matches!(w.entry(&a, page(1)), PageState::Mapped { .. }));
    // A read needs no fault: the leaf is valid.
    w.fault(&a, page(0), false).unwrap();
    assert_eq!(w.entry(&a, page(0)), PageState::ZeroPage);
}

#[test]
fn a_write_gets_a_private_zeroed_frame_and_others_still_read_zero() {
    let w = World::new(false);
    let a = vm_with(&w, 1, &[0]);
    let b = vm_with(&w, 2, &[0]);
    merge_twice(&w, &[scan_vm(&a, 1), scan_vm(&b, 1)]);
    let used = w.hw().frames.allocated();
    a.dirty.lock().unwrap().clear();
    w.access(&a, page(0), true);
    let (own, writable) = match w.entry(&a, page(0)) {
        PageState::Mapped { pfn, writable } => (pfn, writable),
        other => panic!("{other:?}"),
    };
    assert!(writable);
    assert_eq!(w.hw().frames.read_value(own), 0, "zeroed");
    assert_eq!(w.hw().frames.allocated(), used + 1);
    assert!(a.dirty.lock().unwrap().contains(&page(0)), "dirty-logged");
    w.hw().frames.write_value(own, 42);
    assert_eq!(w.entry(&b, page(0)), PageState::ZeroPage);
    assert_eq!(hw_pa(&w, &b, 0), Some(ZERO_PAGE.raw()));
}

#[test]
fn a_page_that_is_not_all_zero_is_refused_after_write_protect() {
    let w = World::new(false);
    let a = vm_with(&w, 1, &[9]);
    let mp = MergePage {
        vm: VmId(1),
        ipa: page(0),
        pfn: pfn(&w, &a, 0),
        group: 1,
    };
    let r = w.rmap.merge_zero(&w.vms, &hypmm::Frames(&w.m), mp);
    assert_eq!(r, Err(MergeError::Differ));
    // Left write-protected on its own frame: the next write reuses it.
    let e = w.entry(&a, page(0));
    assert_eq!(
        e,
        PageState::Mapped {
            pfn: mp.pfn,
            writable: false
        }
    );
}

#[test]
fn fork_copies_the_entry_and_restore_puts_it_back() {
    let w = World::new(false);
    let vm = vm_with(&w, 1, &[0, 0, 7]);
    merge_twice(&w, &[scan_vm(&vm, 1)]);
    let used = w.hw().frames.allocated();
    let snap = w.empty_vm(2);
    w.fork(&vm, &snap);
    assert_eq!(
        w.entry(&snap, page(0)),
        PageState::ZeroPage,
        "copied as it is"
    );
    assert_eq!(w.entry(&vm, page(0)), PageState::ZeroPage);
    // The VM writes page 0 and releases page 1; restore makes both zero
    // pages again and frees the private frame.
    w.access(&vm, page(0), true);
    w.release(&vm, page(1)..page(2)).expect("release");
    assert_eq!(w.entry(&vm, page(1)), PageState::Invalid);
    hypmm::restore_dirty(&w.cx(), &*vm, &*snap).expect("restore");
    assert_eq!(w.entry(&vm, page(0)), PageState::ZeroPage);
    assert_eq!(w.entry(&vm, page(1)), PageState::ZeroPage);
    assert_eq!(w.hw().frames.allocated(), used, "the private copy freed");
    // Teardown of both: every frame back, none freed twice, the zero page
    // never freed (it is no host frame at all here: freeing it would panic).
    w.teardown(&vm);
    w.teardown(&snap);
    assert_eq!(w.hw().frames.allocated(), 0, "no frame leaked");
    let freed = w.hw().freed.lock().unwrap().clone();
    assert!(!freed.contains(&ZERO_PAGE.raw()));
}

#[test]
fn a_fork_family_page_merges_for_every_mapper_at_once() {
    let w = World::new(false);
    let vm = vm_with(&w, 1, &[0]);
    let child = w.empty_vm(2);
    w.fork(&vm, &child);
    let frame = pfn(&w, &child, 0);
    let used = w.hw().frames.allocated();
    let s = merge_twice(&w, &[scan_vm(&vm, 1)]);
    assert_eq!(s.zero, 2, "both mappers of the shared frame: {s:?}");
    assert_eq!(w.entry(&child, page(0)), PageState::ZeroPage);
    assert_eq!(used - w.hw().frames.allocated(), 1, "frame {frame:?} freed");
}

#[test]
fn a_fetch_makes_the_zero_page_mapping_executable_and_keeps_it_a_zero_page() {
    let w = World::new(false);
    let a = vm_with(&w, 1, &[0]);
    merge_twice(&w, &[scan_vm(&a, 1)]);
    let leaf = |vm: &TestVm| common::walk_leaf(w.hw(), vm.root, page(0).raw()).unwrap().0;
    // Stage-2 XN is bits 54:53 (0b10: execute-never at EL1 and EL0).
    assert_ne!(leaf(&a) >> 53 & 3, 0, "mapped execute-never");
    assert!(a.memory.lock().make_executable(page(0)));
    assert_eq!(leaf(&a) >> 53 & 3, 0, "executable after the fetch");
    assert_eq!(
        w.entry(&a, page(0)),
        PageState::ZeroPage,
        "still the zero page"
    );
    assert_eq!(hw_pa(&w, &a, 0), Some(ZERO_PAGE.raw()));
    // A write still faults to a frame of its own.
    w.access(&a, page(0), true);
    assert!(matches!(
        w.entry(&a, page(0)),
        PageState::Mapped { writable: true, .. }
    ));
}
