//! Same-page merging on the host backend: merge, stable hits, unmerge on write, fork
//! families, trust groups, migration, reclaim and teardown of merged frames.

use rmap::host::{HostVm, HostWorld};
use rmap::{Ipa, MergeError, MergePage, PageState, Pfn};
use std::sync::Arc;

const RAM: Ipa = Ipa::new(0x4000_0000);

fn world() -> HostWorld {
    HostWorld::new(64, 4, 64, 256)
}

/// Page `i` of `vm` as a merge names it: with the frame mapped there now (an unmapped page
/// names no frame of the table).
fn page(vm: &HostVm, i: u64) -> MergePage {
    MergePage {
        vm: vm.id,
        ipa: RAM + i * 4096,
        pfn: frame_of(vm, i).pfn().unwrap_or(Pfn::new(0)),
        group: 0,
    }
}

fn frame_of(vm: &HostVm, i: u64) -> PageState {
    use rmap::Stage2;
    use rmap::Stage2Locked;
    vm.s2.lock().lookup(RAM + i * 4096)
}

fn pfn_of(vm: &HostVm, i: u64) -> Pfn {
    frame_of(vm, i).pfn().expect("mapped")
}

fn vm_with(w: &HostWorld, values: &[u64]) -> Arc<HostVm> {
    let vm = w.create_vm(&[(RAM, 8)]);
    for (i, &v) in values.iter().enumerate() {
        vm.write(&w.rmap, &w.machine, RAM + i as u64 * 4096, v)
            .unwrap();
    }
    vm
}

fn read(w: &HostWorld, vm: &HostVm, i: u64) -> u64 {
    vm.read(&w.rmap, &w.machine, RAM + i * 4096).unwrap()
}

fn teardown(w: &HostWorld, vms: &[&Arc<HostVm>]) {
    for vm in vms {
        w.destroy(vm);
        w.check().unwrap();
    }
    assert_eq!(w.machine.allocated(), 0);
    assert_eq!(w.rmap.live_merge_objects(), (0, 0));
    assert_eq!(w.rmap.live_anon_vmas(), 0);
}

#[test]
fn two_vms_merge_and_a_write_unmerges() {
    let w = world();
    let (a, b) = (vm_with(&w, &[7]), vm_with(&w, &[7]));
    let before = w.machine.allocated();
    let merged = w
        .rmap
        .merge(&w.vms, &w.machine, page(&a, 0), page(&b, 0))
        .unwrap();
    assert_eq!(w.machine.allocated(), before - 1, "b's frame is freed");
    assert_eq!(pfn_of(&a, 0), merged);
    assert_eq!(pfn_of(&b, 0), merged);
    assert_eq!(
        frame_of(&b, 0),
        PageState::Mapped {
            pfn: merged,
            writable: false
        }
    );
    let stats = w.rmap.merge_stats();
    assert_eq!(
        (
            stats.merged_frames,
            stats.items,
            stats.mappings,
            stats.saved
        ),
        (1, 2, 2, 1)
    );
    assert_eq!(w.rmap.mappers(merged, &w.vms).len(), 2);
    w.check().unwrap();
    // A write is copy-on-write: the other mapper keeps the old contents.
    b.write(&w.rmap, &w.machine, RAM, 9).unwrap();
    assert_eq!((read(&w, &a, 0), read(&w, &b, 0)), (7, 9));
    assert_ne!(pfn_of(&b, 0), merged);
    assert_eq!(
        w.rmap.stable_info(merged).unwrap().items.len(),
        1,
        "b's item went"
    );
    w.check().unwrap();
    // The last mapper writing copies too, and the merged frame and its node go.
    a.write(&w.rmap, &w.machine, RAM, 8).unwrap();
    assert_eq!(read(&w, &a, 0), 8);
    assert_eq!(w.rmap.live_merge_objects(), (0, 0));
    w.check().unwrap();
    teardown(&w, &[&a, &b]);
}

#[test]
fn a_page_joins_an_existing_merged_frame() {
    let w = world();
    let vms: Vec<_> = (0..4).map(|_| vm_with(&w, &[5, 6])).collect();
    let merged = w
        .rmap
        .merge(&w.vms, &w.machine, page(&vms[0], 1), page(&vms[1], 1))
        .unwrap();
    for vm in &vms[2..] {
        // Either side may be the merged one.
        let got = w
            .rmap
            .merge(&w.vms, &w.machine, page(vm, 1), page(&vms[0], 1));
        assert_eq!(got, Ok(merged));
    }
    let stats = w.rmap.merge_stats();
    assert_eq!(
        (
            stats.merged_frames,
            stats.items,
            stats.mappings,
            stats.saved
        ),
        (1, 4, 4, 3)
    );
    assert_eq!(
        w.rmap
            .merge(&w.vms, &w.machine, page(&vms[2], 1), page(&vms[3], 1)),
        Err(MergeError::Same)
    );
    w.check().unwrap();
    for (k, vm) in vms.iter().enumerate() {
        vm.write(&w.rmap, &w.machine, RAM + 4096, 100 + k as u64)
            .unwrap();
        w.check().unwrap();
    }
    for (k, vm) in vms.iter().enumerate() {
        assert_eq!((read(&w, vm, 0), read(&w, vm, 1)), (5, 100 + k as u64));
    }
    teardown(&w, &vms.iter().collect::<Vec<_>>());
}

#[test]
fn different_contents_and_groups_are_refused() {
    let w = world();
    let (a, b) = (vm_with(&w, &[1, 2]), vm_with(&w, &[1, 3]));
    let r = w.rmap.merge(&w.vms, &w.machine, page(&a, 1), page(&b, 1));
    assert_eq!(r, Err(MergeError::Differ));
    // Left write-protected: a write takes a fault that reuses the frame in place.
    assert_eq!(frame_of(&a, 1).pfn(), Some(pfn_of(&a, 1)));
    w.check().unwrap();
    let other = MergePage {
        group: 1,
        ..page(&b, 0)
    };
    let r = w.rmap.merge(&w.vms, &w.machine, page(&a, 0), other);
    assert_eq!(r, Err(MergeError::OtherGroup));
    // A merged frame keeps its group: a page of another group cannot join it.
    let merged = w
        .rmap
        .merge(&w.vms, &w.machine, page(&a, 0), page(&b, 0))
        .unwrap();
    let c = vm_with(&w, &[1]);
    let (in1, c1) = (
        MergePage {
            group: 1,
            ..page(&a, 0)
        },
        MergePage {
            group: 1,
            ..page(&c, 0)
        },
    );
    assert_eq!(
        w.rmap.merge(&w.vms, &w.machine, c1, in1),
        Err(MergeError::OtherGroup)
    );
    assert_eq!(w.rmap.stable_info(merged).unwrap().group, 0);
    let r = w.rmap.merge(&w.vms, &w.machine, page(&a, 5), page(&b, 0));
    assert_eq!(r, Err(MergeError::NotMapped));
    a.write(&w.rmap, &w.machine, RAM + 4096, 4).unwrap();
    assert_eq!((read(&w, &a, 1), read(&w, &b, 1)), (4, 3));
    w.check().unwrap();
    teardown(&w, &[&a, &b, &c]);
}

#[test]
fn a_page_shared_by_a_fork_family_merges_for_every_mapper() {
    let w = world();
    let parent = vm_with(&w, &[3, 4]);
    let child = w.fork(&parent).unwrap();
    let other = vm_with(&w, &[4, 3]);
    let shared = pfn_of(&parent, 0);
    assert_eq!(pfn_of(&child, 0), shared);
    let merged = w
        .rmap
        .merge(&w.vms, &w.machine, page(&other, 1), page(&child, 0))
        .unwrap();
    for vm in [&parent, &child] {
        assert_eq!(pfn_of(vm, 0), merged);
    }
    assert!(w.machine.is_free(shared));
    let info = w.rmap.stable_info(merged).unwrap();
    assert_eq!(
        info.items.iter().map(|i| i.maps).collect::<Vec<_>>(),
        [1, 2]
    );
    w.check().unwrap();
    // A fork of a mapper counts in its family's item.
    let grandchild = w.fork(&child).unwrap();
    let info = w.rmap.stable_info(merged).unwrap();
    assert_eq!(
        info.items.iter().map(|i| i.maps).collect::<Vec<_>>(),
        [1, 3]
    );
    w.check().unwrap();
    child.write(&w.rmap, &w.machine, RAM, 30).unwrap();
    assert_eq!(read(&w, &parent, 0), 3);
    assert_eq!(read(&w, &grandchild, 0), 3);
    assert_eq!(read(&w, &other, 1), 3);
    w.check().unwrap();
    // Destroying any mapper releases its share.
    w.destroy(&other);
    w.check().unwrap();
    assert_eq!(w.rmap.stable_info(merged).unwrap().items.len(), 1);
    teardown(&w, &[&parent, &child, &grandchild]);
}

#[test]
fn migration_rewrites_every_mapper_and_reclaim_splits_by_family() {
    let w = HostWorld::with_swap(64, 4, 64, 256, 64);
    let a = vm_with(&w, &[11]);
    let a2 = w.fork(&a).unwrap();
    let b = vm_with(&w, &[11]);
    let merged = w
        .rmap
        .merge(&w.vms, &w.machine, page(&a, 0), page(&b, 0))
        .unwrap();
    let moved = w.rmap.migrate_frame(&w.vms, &w.machine, merged).unwrap();
    for vm in [&a, &a2, &b] {
        assert_eq!(pfn_of(vm, 0), moved);
    }
    assert!(w.machine.is_free(merged));
    w.check().unwrap();
    let mut out = Vec::new();
    w.rmap
        .migrate_frames(&w.vms, &w.machine, &[moved], &mut out);
    let moved = out[0].unwrap();
    assert_eq!(pfn_of(&b, 0), moved);
    w.check().unwrap();
    let slot = w
        .rmap
        .reclaim_frame(&w.vms, &w.machine, &w.machine, moved)
        .unwrap();
    assert!(w.machine.is_free(moved));
    assert_eq!(w.rmap.live_merge_objects(), (0, 0));
    assert_eq!(frame_of(&a, 0), PageState::Swapped { slot });
    w.check().unwrap();
    // Swap-in: the fork family shares one frame again; the other family has its own.
    for vm in [&a, &a2, &b] {
        assert_eq!(read(&w, vm, 0), 11);
    }
    assert_eq!(pfn_of(&a, 0), pfn_of(&a2, 0));
    assert_ne!(pfn_of(&a, 0), pfn_of(&b, 0));
    w.check().unwrap();
    teardown(&w, &[&a, &a2, &b]);
}

#[test]
fn release_and_restore_drop_their_share() {
    let w = world();
    let (a, b) = (vm_with(&w, &[2]), vm_with(&w, &[2]));
    let snap = w.fork(&a).unwrap();
    let merged = w
        .rmap
        .merge(&w.vms, &w.machine, page(&a, 0), page(&b, 0))
        .unwrap();
    assert_eq!(pfn_of(&snap, 0), merged);
    a.write(&w.rmap, &w.machine, RAM, 12).unwrap();
    w.restore(&a, &snap).unwrap();
    assert_eq!(read(&w, &a, 0), 2);
    assert_eq!(pfn_of(&a, 0), merged);
    w.check().unwrap();
    b.release(&w.rmap, &w.machine, RAM).unwrap();
    assert_eq!(read(&w, &b, 0), 0);
    w.check().unwrap();
    teardown(&w, &[&a, &b, &snap]);
}

#[test]
fn a_region_blind_unmap_marks_the_counts_inexact_until_a_migration_recounts() {
    use rmap::{Stage2, Stage2Locked};
    let w = world();
    let (a, b) = (vm_with(&w, &[6]), vm_with(&w, &[6]));
    let merged = w
        .rmap
        .merge(&w.vms, &w.machine, page(&a, 0), page(&b, 0))
        .unwrap();
    // As hypmm's restore drops a mapping: leaf cleared, then `remove_rmap` without region.
    let ro = PageState::Mapped {
        pfn: merged,
        writable: false,
    };
    b.s2.lock()
        .compare_exchange(RAM, ro, PageState::Invalid)
        .unwrap();
    w.rmap.remove_rmap(merged, &w.machine);
    let info = w.rmap.stable_info(merged).unwrap();
    assert!(info.dirty);
    assert_eq!(
        info.items.len(),
        2,
        "b's item cannot be told apart: it stays"
    );
    w.check().unwrap();
    // A migration unmaps every mapping, so it can count them all again.
    let moved = w.rmap.migrate_frame(&w.vms, &w.machine, merged).unwrap();
    let info = w.rmap.stable_info(moved).unwrap();
    assert!(!info.dirty);
    assert_eq!(info.items.iter().map(|i| i.maps).collect::<Vec<_>>(), [1]);
    w.check().unwrap();
    assert_eq!(read(&w, &a, 0), 6);
    teardown(&w, &[&a, &b]);
}
