//! Folio counts of 2 MiB blocks (`rmap::folio`): a forked block costs one count on its folio,
//! not 512; a split moves one mapper's count to the pages; the last block entry's teardown
//! frees what nothing else maps; copy-on-write never reuses a frame another VM maps as part
//! of a block. `HostWorld::check` compares every folio's count with the block leaves.

use rmap::folio::{ENTIRE_MAX, FOLIO_PAGES};
use rmap::host::{page_ipa, HostVm, HostWorld, BLOCK_PAGES};
use rmap::{Ipa, Pfn, Stage2, Stage2Locked};
use std::sync::Arc;

const RAM: Ipa = Ipa::new(0x4000_0000);

fn world() -> HostWorld {
    HostWorld::new(2048, 1, 8192, 16384)
}

/// A VM whose RAM is one first-touch block; returns it and the folio's first frame.
fn block_vm(w: &HostWorld) -> (Arc<HostVm>, Pfn) {
    let vm = w.create_vm(&[(RAM, BLOCK_PAGES)]);
    assert!(w.fault_block(&vm, RAM));
    let head = vm.s2.lock().lookup(RAM).pfn().unwrap();
    (vm, head)
}

/// Own mapcount and refcount of every frame of the folio (each the same).
fn own_counts(w: &HostWorld, head: Pfn) -> (u32, u32) {
    let f = w.rmap.frames().frame(head);
    let counts = (f.mapcount(), f.refcount());
    for p in head.run(FOLIO_PAGES) {
        let g = w.rmap.frames().frame(p);
        assert_eq!((g.mapcount(), g.refcount()), counts, "frame {p:#x}");
    }
    counts
}

#[test]
fn a_forked_block_costs_one_count_on_its_folio() {
    let w = world();
    let (a, head) = block_vm(&w);
    assert_eq!(w.rmap.frames().entire_mapcount(head), 1);
    let b = w.fork(&a).unwrap();
    let c = w.fork(&b).unwrap();
    assert_eq!(c.s2.blocks(), vec![RAM], "a block stays a block");
    assert_eq!(w.rmap.frames().entire_mapcount(head + 300), 3);
    assert_eq!(own_counts(&w, head), (1, 1), "only the folio's share");
    assert_eq!(w.rmap.frames().mapcount(head + 300), 3);
    w.check().unwrap();
    w.destroy(&b);
    assert_eq!(w.rmap.frames().entire_mapcount(head), 2);
    w.check().unwrap();
    w.destroy(&a);
    w.destroy(&c);
    w.check().unwrap();
    assert_eq!(w.machine.allocated(), 0);
}

#[test]
fn a_split_moves_one_mappers_count_to_the_pages() {
    let w = world();
    let (a, head) = block_vm(&w);
    let b = w.fork(&a).unwrap();
    // B's write splits B's block (a copy: A maps the frame as a block).
    b.write(&w.rmap, &w.machine, page_ipa(RAM, 5), 55).unwrap();
    assert_eq!(b.s2.blocks(), vec![]);
    assert_eq!(w.rmap.frames().entire_mapcount(head), 1);
    assert_eq!(w.rmap.frames().mapcount(head + 5), 1, "A's block only");
    assert_eq!(w.rmap.frames().mapcount(head + 6), 2);
    assert_eq!(
        w.rmap.frames().frame(head + 6).mapcount(),
        2,
        "B's page + the share"
    );
    w.check().unwrap();
    // A's write splits the last block: its share becomes A's page counts.
    a.write(&w.rmap, &w.machine, page_ipa(RAM, 6), 66).unwrap();
    assert_eq!(w.rmap.frames().entire_mapcount(head), 0);
    assert_eq!(w.rmap.frames().mapcount(head + 6), 1, "B's page");
    assert_eq!(b.read(&w.rmap, &w.machine, page_ipa(RAM, 6)).unwrap(), 0);
    assert_eq!(a.read(&w.rmap, &w.machine, page_ipa(RAM, 5)).unwrap(), 0);
    w.check().unwrap();
    w.destroy(&a);
    w.destroy(&b);
    w.check().unwrap();
    assert_eq!(w.machine.allocated(), 0);
}

/// The sole block mapper's write reuses its frame in place; with another VM mapping the
/// folio as a block, it copies (the frame's own count is 1 there: only the folio counts the
/// other VM), and the other VM still reads the old value.
#[test]
fn copy_on_write_counts_the_other_block_mappers() {
    let w = world();
    let (a, head) = block_vm(&w);
    let ipa = page_ipa(RAM, 9);
    a.write(&w.rmap, &w.machine, ipa, 1).unwrap();
    let b = w.fork(&a).unwrap();
    let c = w.fork(&a).unwrap();
    w.destroy(&c);
    a.write(&w.rmap, &w.machine, ipa, 2).unwrap();
    assert_ne!(a.s2.lock().lookup(ipa).pfn(), Some(head + 9), "copied");
    assert_eq!(b.read(&w.rmap, &w.machine, ipa).unwrap(), 1);
    w.destroy(&b);
    // Now A alone maps the folio (page by page after its split): reuse.
    let ipa = page_ipa(RAM, 10);
    a.write(&w.rmap, &w.machine, ipa, 3).unwrap();
    assert_eq!(a.s2.lock().lookup(ipa).pfn(), Some(head + 10), "reused");
    w.check().unwrap();
    w.destroy(&a);
    w.check().unwrap();
    assert_eq!(w.machine.allocated(), 0);
}

/// The last block entry's teardown drops the folio's share: frames only it mapped are freed,
/// frames another VM maps page by page stay.
#[test]
fn the_last_block_entry_frees_what_nothing_else_maps() {
    let w = world();
    let (a, head) = block_vm(&w);
    let b = w.fork(&a).unwrap();
    b.write(&w.rmap, &w.machine, page_ipa(RAM, 5), 55).unwrap();
    assert_eq!(
        w.machine.allocated(),
        513,
        "the folio and B's copy of page 5"
    );
    w.destroy(&a);
    assert_eq!(w.rmap.frames().entire_mapcount(head), 0);
    assert_eq!(
        w.machine.allocated(),
        512,
        "page 5's old frame went with A's block"
    );
    assert_eq!(b.read(&w.rmap, &w.machine, page_ipa(RAM, 5)).unwrap(), 55);
    w.check().unwrap();
    w.destroy(&b);
    w.check().unwrap();
    assert_eq!(w.machine.allocated(), 0);
}

/// Past [`ENTIRE_MAX`] block entries a fork child maps the folio page by page, counted on
/// each frame; everything still adds up and goes.
#[test]
fn past_the_folio_limit_a_child_maps_pages() {
    let w = world();
    let (a, head) = block_vm(&w);
    let mut children = Vec::new();
    for _ in 1..ENTIRE_MAX {
        children.push(w.fork(&a).unwrap());
    }
    assert_eq!(w.rmap.frames().entire_mapcount(head), ENTIRE_MAX);
    let pages = w.fork(&a).unwrap();
    assert!(pages.s2.blocks().is_empty());
    assert_eq!(w.rmap.frames().frame(head + 1).mapcount(), 2);
    assert_eq!(w.rmap.frames().mapcount(head + 1), ENTIRE_MAX + 1);
    w.check().unwrap();
    for c in children.iter().chain([&pages, &a]) {
        w.destroy(c);
    }
    w.check().unwrap();
    assert_eq!(w.machine.allocated(), 0);
}
