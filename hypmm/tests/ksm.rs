//! The merge scanner (`hypmm::Scanner`) over the real adapter and reverse
//! map: pages seen unchanged twice merge within a trust group and never
//! across one; a page joins an existing merged frame through the stable
//! tree; a write unmerges only the writer's page; merged frames return
//! their host frames.

mod common;

use common::{TestVm, World, RAM_BASE};
use hypmm::{ScanVm, Scanner, PAGE_SIZE};
use rmap::{Ipa, PageState, Pfn, VmId};
use std::sync::Arc;

const PAGES: u64 = 16; // below 2 MiB: page faults, no blocks

fn page(i: u64) -> Ipa {
    RAM_BASE + i * PAGE_SIZE
}

/// A VM whose page `i` holds `values[i]`.
fn vm_with(w: &World, id: u32, values: &[u64]) -> Arc<TestVm> {
    let vm = w.vm(id, PAGES);
    for (i, &v) in values.iter().enumerate() {
        w.access(&vm, page(i as u64), true);
        let pfn = vm.memory.lock().pa_of(page(i as u64)).unwrap().pfn();
        w.hw().frames.write_value(pfn, v);
    }
    vm
}

fn scan_vm(vm: &TestVm, group: u32) -> ScanVm {
    ScanVm {
        id: VmId(vm.id),
        group,
        ram: RAM_BASE..RAM_BASE + PAGES * PAGE_SIZE,
    }
}

fn frame(w: &World, vm: &TestVm, i: u64) -> (Pfn, bool) {
    match w.entry(vm, page(i)) {
        PageState::Mapped { pfn, writable } => (pfn, writable),
        other => panic!("page {i} of vm {}: {other:?}", vm.id),
    }
}

#[test]
fn unchanged_identical_pages_merge_within_a_group_only() {
    let w = World::new(false);
    let a = vm_with(&w, 1, &[10, 11, 12, 13, 14]);
    let b = vm_with(&w, 2, &[10, 11, 12, 99, 98]);
    let c = vm_with(&w, 3, &[10, 11, 12, 13, 14]);
    let vms = [scan_vm(&a, 1), scan_vm(&b, 1), scan_vm(&c, 2)];
    let mut scanner = Scanner::new();
    let used = w.hw().frames.allocated();

    let first = scanner.pass(&w.cx(), &w.vms, &vms);
    assert_eq!(
        first.merged, 0,
        "a first visit only records checksums: {first:?}"
    );
    assert_eq!(first.scanned, 15);
    let second = scanner.pass(&w.cx(), &w.vms, &vms);
    assert_eq!(second.merged, 3, "pages 0-2 of a and b: {second:?}");
    for i in 0..3 {
        let (fa, wa) = frame(&w, &a, i);
        assert_eq!(frame(&w, &b, i), (fa, false), "page {i} shared read-only");
        assert!(!wa);
        assert_ne!(frame(&w, &c, i).0, fa, "vm 3 is in another trust group");
        assert!(w.rmap.frames().get(fa).unwrap().is_merged());
    }
    assert_ne!(frame(&w, &a, 3).0, frame(&w, &b, 3).0, "different contents");
    assert_eq!(
        used - w.hw().frames.allocated(),
        3,
        "three host frames saved"
    );
    assert_eq!(w.rmap.merge_stats().saved, 3);

    // A write unmerges the writer's page alone.
    w.access(&b, page(1), true);
    let (own, writable) = frame(&w, &b, 1);
    assert!(writable && own != frame(&w, &a, 1).0);
    w.hw().frames.write_value(own, 77);
    assert_eq!(w.hw().frames.read_value(frame(&w, &a, 1).0), 11);
}

#[test]
fn a_page_joins_an_existing_merged_frame_through_the_stable_tree() {
    let w = World::new(false);
    let a = vm_with(&w, 1, &[5, 6]);
    let b = vm_with(&w, 2, &[5, 6]);
    let mut scanner = Scanner::new();
    let mut vms = vec![scan_vm(&a, 7), scan_vm(&b, 7)];
    scanner.pass(&w.cx(), &w.vms, &vms);
    assert_eq!(scanner.pass(&w.cx(), &w.vms, &vms).merged, 2);
    assert_eq!(scanner.stable_entries(), 2);

    let late = vm_with(&w, 3, &[6]);
    vms.push(scan_vm(&late, 7));
    scanner.pass(&w.cx(), &w.vms, &vms);
    let hit = scanner.pass(&w.cx(), &w.vms, &vms);
    assert_eq!((hit.merged, hit.stable_hits), (1, 1), "{hit:?}");
    assert_eq!(frame(&w, &late, 0).0, frame(&w, &a, 1).0);
    let info = w.rmap.stable_info(frame(&w, &a, 1).0).expect("merged");
    assert_eq!(info.items.len(), 3, "one item per family: {info:?}");
}

#[test]
fn a_page_that_changed_since_its_last_visit_waits() {
    let w = World::new(false);
    let a = vm_with(&w, 1, &[1]);
    let b = vm_with(&w, 2, &[2]);
    let vms = [scan_vm(&a, 1), scan_vm(&b, 1)];
    let mut scanner = Scanner::new();
    scanner.pass(&w.cx(), &w.vms, &vms);
    // b's page now equals a's, but it changed since the last visit.
    w.hw().frames.write_value(frame(&w, &b, 0).0, 1);
    let p = scanner.pass(&w.cx(), &w.vms, &vms);
    assert_eq!((p.merged, p.changing), (0, 1), "{p:?}");
    assert_eq!(scanner.pass(&w.cx(), &w.vms, &vms).merged, 1);
}

#[test]
fn destroying_every_mapper_returns_every_frame() {
    let w = World::new(false);
    let before = w.hw().frames.allocated();
    let a = vm_with(&w, 1, &[3, 4, 0]);
    let b = vm_with(&w, 2, &[3, 4, 0]);
    let vms = [scan_vm(&a, 1), scan_vm(&b, 1)];
    let mut scanner = Scanner::new();
    scanner.pass(&w.cx(), &w.vms, &vms);
    // Page 2 holds zeroes: both map the shared zero page instead.
    let p = scanner.pass(&w.cx(), &w.vms, &vms);
    assert_eq!((p.merged, p.zero), (2, 2), "{p:?}");
    w.teardown(&a);
    assert!(w.rmap.frames().get(frame(&w, &b, 0).0).unwrap().is_mapped());
    w.teardown(&b);
    assert_eq!(w.hw().frames.allocated(), before, "no frame leaked");
    assert_eq!(
        w.rmap.live_merge_objects(),
        (0, 0),
        "stable nodes and items freed"
    );
    // The next pass forgets VMs that are gone.
    assert_eq!(scanner.pass(&w.cx(), &w.vms, &[]).scanned, 0);
}

#[test]
fn the_background_scan_covers_every_page_in_budgeted_steps() {
    let w = World::new(false);
    let a = vm_with(&w, 1, &[8, 9]);
    let b = vm_with(&w, 2, &[8, 9]);
    let vms = [scan_vm(&a, 1), scan_vm(&b, 1)];
    let mut scanner = Scanner::new();
    let mut total = hypmm::PassStats::default();
    // Two rounds of 2 x 16 pages, 5 pages a step (a step stops at the end
    // of a round).
    let mut steps = 0;
    while scanner.rounds() < 2 && steps < 100 {
        total += scanner.scan(&w.cx(), &w.vms, &vms, 5);
        steps += 1;
    }
    assert_eq!(steps, 2 * (2 * PAGES).div_ceil(5) as usize, "{total:?}");
    assert_eq!(total.scanned, 2 * 2 * 2, "mapped pages, twice");
    assert_eq!(total.merged, 2, "{total:?}");
    assert_eq!(frame(&w, &a, 1).0, frame(&w, &b, 1).0);
    // No VMs: a step ends at once.
    assert_eq!(
        scanner.scan(&w.cx(), &w.vms, &[], 100),
        hypmm::PassStats::default()
    );
}
