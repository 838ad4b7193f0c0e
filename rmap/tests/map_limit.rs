//! A frame's mapcount is 16 bits. Forks stop at `MAP_LIMIT` mappings of one frame (or
//! references to one swap slot) with `Error::TooManyMappings`, before anything overflows, and
//! a refused fork leaves the reverse map consistent: the parent keeps running, and destroying
//! everything frees everything. Guests can drive this (HVC_SNAPSHOT in a loop), so an overflow
//! would have been a guest-reachable hypervisor panic.

use rmap::host::{HostVm, HostWorld};
use rmap::Ipa;
use rmap::{Error, Stage2, Stage2Locked, MAP_LIMIT};
use std::sync::Arc;

const RAM: Ipa = Ipa::new(0x4000_0000);
/// A lower limit than the real one, so the test forks a few hundred times, not 32,767
/// (`the_real_limit_fits_the_mapcount` checks the real one's arithmetic).
const LIMIT: u32 = 300;

fn world() -> HostWorld {
    let mut w = HostWorld::new(64, 4, 4096, 8192);
    w.rmap.limit_mappings(LIMIT);
    w
}

#[test]
fn the_real_limit_fits_the_mapcount() {
    // A swap-in maps a slot's frame once per reference on top of a fork's mappings: twice
    // the limit must still fit 16 bits.
    assert!(2 * MAP_LIMIT <= u32::from(u16::MAX));
}

/// Forks `parent` until refused; returns the children.
fn fork_until_refused(w: &HostWorld, parent: &HostVm) -> Vec<Arc<HostVm>> {
    let mut children = Vec::new();
    loop {
        match w.fork(parent) {
            Ok(c) => children.push(c),
            Err(Error::TooManyMappings) => return children,
            Err(e) => panic!("fork {}: {e:?}", children.len()),
        }
    }
}

#[test]
fn forks_stop_at_the_map_limit_of_a_frame() {
    let w = world();
    let vm = w.create_vm(&[(RAM, 2)]);
    vm.write(&w.rmap, &w.machine, RAM, 7).unwrap();
    vm.write(&w.rmap, &w.machine, RAM + 0x1000, 8).unwrap();
    let pfn = vm.s2.lock().lookup(RAM).pfn().unwrap();
    let children = fork_until_refused(&w, &vm);
    assert_eq!(children.len() as u32, LIMIT - 1, "parent plus children");
    assert_eq!(w.rmap.frames().frame(pfn).mapcount(), LIMIT);
    w.check().unwrap();
    // The parent still works after the refusal: a write takes a copy-on-write fault.
    vm.write(&w.rmap, &w.machine, RAM, 9).unwrap();
    assert_eq!(children[0].read(&w.rmap, &w.machine, RAM).unwrap(), 7);
    assert_eq!(vm.read(&w.rmap, &w.machine, RAM).unwrap(), 9);
    for c in &children {
        w.destroy(c);
    }
    w.destroy(&vm);
    w.check().unwrap();
    assert_eq!(w.machine.allocated(), 0, "every frame freed");
}

#[test]
fn forks_stop_at_the_map_limit_of_a_swap_slot() {
    let w = world();
    let vm = w.create_vm(&[(RAM, 1)]);
    vm.write(&w.rmap, &w.machine, RAM, 5).unwrap();
    let pfn = vm.s2.lock().lookup(RAM).pfn().unwrap();
    w.rmap
        .reclaim_frame(&w.vms, &w.machine, &w.machine, pfn)
        .unwrap();
    let children = fork_until_refused(&w, &vm);
    assert_eq!(children.len() as u32, LIMIT - 1);
    w.check().unwrap();
    assert_eq!(
        children
            .last()
            .unwrap()
            .read(&w.rmap, &w.machine, RAM)
            .unwrap(),
        5
    );
    for c in &children {
        w.destroy(c);
    }
    w.destroy(&vm);
    w.check().unwrap();
    assert_eq!(w.machine.allocated(), 0);
    assert!(w.machine.swap_refs().is_empty(), "every swap slot freed");
}

/// A block's forks count on its folio (one count each) up to the limit, then are refused
/// like a page's; the folio's count is the limit and every frame counts its share once.
#[test]
fn forks_of_a_block_stop_at_the_map_limit() {
    use rmap::host::BLOCK_PAGES;
    let mut w = HostWorld::new(1024, 1, 4096, 8192);
    w.rmap.limit_mappings(LIMIT);
    let vm = w.create_vm(&[(RAM, BLOCK_PAGES)]);
    assert!(w.fault_block(&vm, RAM));
    let head = vm.s2.lock().lookup(RAM).pfn().unwrap();
    let children = fork_until_refused(&w, &vm);
    assert_eq!(children.len() as u32, LIMIT - 1);
    assert_eq!(w.rmap.frames().entire_mapcount(head), LIMIT);
    assert_eq!(w.rmap.frames().mapcount(head + 7), LIMIT);
    assert_eq!(w.rmap.frames().frame(head + 7).mapcount(), 1, "one share");
    w.check().unwrap();
    for c in &children {
        w.destroy(c);
    }
    w.destroy(&vm);
    w.check().unwrap();
    assert_eq!(w.machine.allocated(), 0);
}
