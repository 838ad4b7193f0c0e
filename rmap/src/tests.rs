//! Unit tests of each operation on the host backend.

extern crate std;

use crate::host::{page_ipa, HostVm, HostWorld};
use crate::region::RegionFlags;
use crate::{AnonHandle, Error, Ipa, PageState, Pfn, Stage2, Stage2Locked, VmId};
use alloc::vec;
use alloc::vec::Vec;
use core::ops::ControlFlow;

const RAM: Ipa = Ipa::new(0x4000_0000);

fn world() -> HostWorld {
    HostWorld::new(512, 4, 256, 1024)
}

fn pfn_at(vm: &HostVm, ipa: Ipa) -> Pfn {
    vm.s2.lock().lookup(ipa).pfn().expect("mapped")
}

fn own_anon(vm: &HostVm, ipa: Ipa) -> AnonHandle {
    vm.regions.read().find(ipa).unwrap().anon_vma().unwrap()
}

fn mapper_vms(w: &HostWorld, pfn: Pfn) -> Vec<VmId> {
    w.rmap.mappers(pfn, &w.vms).iter().map(|m| m.vm).collect()
}

#[test]
fn prepare_allocates_then_is_idempotent() {
    let w = world();
    let vm = w.create_vm(&[(RAM, 16)]);
    let mut list = vm.regions.write();
    let a = w.rmap.anon_vma_prepare(&mut list, RAM).unwrap();
    assert_eq!(w.rmap.anon_vma_prepare(&mut list, RAM + 0x1000).unwrap(), a);
    let region = list.find(RAM).unwrap();
    assert_eq!(region.chains().len(), 1);
    let family = w.rmap.lock_family_read(a);
    assert_eq!(family.node(a).unwrap().num_active_regions, 1);
    assert_eq!(w.rmap.anon_vma(a).unwrap().root(), a);
    assert_eq!(
        w.rmap.anon_vma_prepare(&mut list, Ipa::ZERO),
        Err(Error::NoRegion)
    );
}

#[test]
fn prepare_adopts_a_compatible_neighbour() {
    let w = world();
    let vm = w.create_vm(&[(RAM, 4), (RAM + 0x4000, 4), (RAM + 0x10000, 4)]);
    let mut list = vm.regions.write();
    let a = w.rmap.anon_vma_prepare(&mut list, RAM).unwrap();
    assert_eq!(w.rmap.anon_vma_prepare(&mut list, RAM + 0x4000).unwrap(), a);
    assert_ne!(
        w.rmap.anon_vma_prepare(&mut list, RAM + 0x10000).unwrap(),
        a,
        "not adjacent"
    );
    let family = w.rmap.lock_family_read(a);
    assert_eq!(family.node(a).unwrap().num_active_regions, 2);
    assert_eq!(family.node(a).unwrap().chain_count(), 2);
}

#[test]
fn fresh_frame_goes_to_own_anon_vma_and_is_found() {
    let w = world();
    let vm = w.create_vm(&[(RAM, 16)]);
    vm.write(&w.rmap, &w.machine, page_ipa(RAM, 3), 42).unwrap();
    let pfn = pfn_at(&vm, page_ipa(RAM, 3));
    let frame = w.rmap.frames().frame(pfn);
    assert_eq!(w.rmap.frame_anon_vma(frame), Some(own_anon(&vm, RAM)));
    assert_eq!(frame.index(), RAM.page_index() + 3);
    assert_eq!(frame.mapcount(), 1);
    let mappers = w.rmap.mappers(pfn, &w.vms);
    assert_eq!(mappers.len(), 1);
    assert_eq!((mappers[0].vm, mappers[0].ipa), (vm.id, page_ipa(RAM, 3)));
    assert_eq!(vm.read(&w.rmap, &w.machine, page_ipa(RAM, 3)).unwrap(), 42);
    w.check().unwrap();
}

#[test]
fn shared_frame_goes_to_the_root() {
    let w = world();
    let parent = w.create_vm(&[(RAM, 4)]);
    parent.write(&w.rmap, &w.machine, RAM, 1).unwrap();
    let child = w.fork(&parent).unwrap();
    let root = own_anon(&parent, RAM);
    let list = child.regions.read();
    let region = list.find(RAM).unwrap();
    let pfn = w.rmap.alloc_frame(&w.machine).unwrap();
    w.rmap.add_new_anon_rmap(pfn, region, RAM + 0x1000, false);
    assert_eq!(
        w.rmap.frame_anon_vma(w.rmap.frames().frame(pfn)),
        Some(root)
    );
    w.rmap.remove_rmap(pfn, &w.machine);
    w.rmap.put_frame(pfn, &w.machine);
}

#[test]
fn fork_links_every_ancestor_oldest_first_and_own_last() {
    let w = world();
    let p = w.create_vm(&[(RAM, 8)]);
    p.write(&w.rmap, &w.machine, RAM, 7).unwrap();
    let c = w.fork(&p).unwrap();
    let g = w.fork(&c).unwrap();
    let expect = [own_anon(&p, RAM), own_anon(&c, RAM), own_anon(&g, RAM)];
    let list = g.regions.read();
    let region = list.find(RAM).unwrap();
    let order: Vec<_> = region
        .chains()
        .iter()
        .map(|&ch| w.rmap.chain_info(ch).anon_vma)
        .collect();
    assert_eq!(order, expect);
    let pfn = pfn_at(&p, RAM);
    assert_eq!(
        mapper_vms(&w, pfn),
        [p.id, c.id, g.id],
        "walk: parent before children"
    );
    assert_eq!(w.rmap.frames().frame(pfn).mapcount(), 3);
    drop(list);
    w.check().unwrap();
}

#[test]
fn cow_copy_goes_to_the_writers_own_anon_vma() {
    let w = world();
    let p = w.create_vm(&[(RAM, 8)]);
    p.write(&w.rmap, &w.machine, RAM, 7).unwrap();
    let c = w.fork(&p).unwrap();
    let shared = pfn_at(&p, RAM);
    c.write(&w.rmap, &w.machine, RAM, 8).unwrap();
    let copy = pfn_at(&c, RAM);
    assert_ne!(copy, shared);
    assert_eq!(
        w.rmap.frame_anon_vma(w.rmap.frames().frame(copy)),
        Some(own_anon(&c, RAM))
    );
    assert_eq!(w.rmap.frames().frame(shared).mapcount(), 1);
    assert_eq!(p.read(&w.rmap, &w.machine, RAM).unwrap(), 7);
    assert_eq!(c.read(&w.rmap, &w.machine, RAM).unwrap(), 8);
    assert_eq!(mapper_vms(&w, copy), [c.id]);
    w.check().unwrap();
}

#[test]
fn sole_owner_after_fork_is_rehomed_not_copied() {
    let w = world();
    let p = w.create_vm(&[(RAM, 8)]);
    p.write(&w.rmap, &w.machine, RAM, 7).unwrap();
    let c = w.fork(&p).unwrap();
    let pfn = pfn_at(&p, RAM);
    w.destroy(&p);
    let before = w.machine.allocated();
    c.write(&w.rmap, &w.machine, RAM, 9).unwrap();
    assert_eq!(pfn_at(&c, RAM), pfn, "reused in place");
    assert_eq!(w.machine.allocated(), before, "no copy");
    assert_eq!(
        w.rmap.frame_anon_vma(w.rmap.frames().frame(pfn)),
        Some(own_anon(&c, RAM))
    );
    assert_eq!(mapper_vms(&w, pfn), [c.id]);
    w.check().unwrap();
}

#[test]
fn reuse_needs_no_live_region_and_fewer_than_two_children() {
    let w = world();
    let p = w.create_vm(&[(RAM, 4)]);
    p.write(&w.rmap, &w.machine, RAM, 1).unwrap();
    let a = own_anon(&p, RAM);
    let c1 = w.fork(&p).unwrap();
    let c2 = w.fork(&p).unwrap();
    w.destroy(&p);
    // `a` has no live region but two children: a grandchild must not reuse it.
    let g = w.fork(&c1).unwrap();
    assert_ne!(own_anon(&g, RAM), a);
    assert_ne!(own_anon(&g, RAM), own_anon(&c1, RAM));
    w.destroy(&c2);
    // Now `a` has one child left and no live region: the next fork reuses it.
    let g2 = w.fork(&c1).unwrap();
    assert_eq!(own_anon(&g2, RAM), a);
    let family = w.rmap.lock_family_read(a);
    assert_eq!(family.node(a).unwrap().num_active_regions, 1);
    drop(family);
    w.check().unwrap();
}

#[test]
fn fork_generations_do_not_grow_chains() {
    let w = world();
    let mut vm = w.create_vm(&[(RAM, 4)]);
    vm.write(&w.rmap, &w.machine, RAM, 1).unwrap();
    for generation in 0..200u64 {
        let child = w.fork(&vm).unwrap();
        w.destroy(&vm);
        child.write(&w.rmap, &w.machine, RAM, generation).unwrap();
        vm = child;
        assert!(vm.regions.read().find(RAM).unwrap().chains().len() <= 3);
        assert!(w.rmap.live_anon_vmas() <= 2);
    }
    w.check().unwrap();
}

#[test]
fn walk_verifies_the_mapping_and_skips_temporary_regions() {
    let w = world();
    let vm = w.vms.create();
    {
        let mut list = vm.regions.write();
        w.rmap
            .region_create(&mut list, RAM, 4, RegionFlags::TEMPORARY)
            .unwrap();
    }
    vm.write(&w.rmap, &w.machine, RAM, 5).unwrap();
    let pfn = pfn_at(&vm, RAM);
    assert!(
        w.rmap.mappers(pfn, &w.vms).is_empty(),
        "temporary region skipped"
    );
    assert_eq!(
        w.rmap.migrate_frame(&w.vms, &w.machine, pfn),
        Err(Error::Busy)
    );
    assert_eq!(vm.read(&w.rmap, &w.machine, RAM).unwrap(), 5);
    w.check().unwrap();

    // A forked child covers the same offset but has not mapped anything there yet.
    let p = w.create_vm(&[(RAM, 4)]);
    p.write(&w.rmap, &w.machine, RAM, 1).unwrap();
    let c = w.fork(&p).unwrap();
    let proof_pfn = pfn_at(&p, RAM);
    c.s2.lock()
        .compare_exchange(
            RAM,
            PageState::Mapped {
                pfn: proof_pfn,
                writable: false,
            },
            PageState::Invalid,
        )
        .unwrap();
    w.rmap.remove_rmap(proof_pfn, &w.machine);
    assert_eq!(
        mapper_vms(&w, proof_pfn),
        [p.id],
        "candidate not mapping it is not reported"
    );
}

#[test]
fn migrate_moves_every_mapping_and_frees_the_old_frame() {
    let w = world();
    let p = w.create_vm(&[(RAM, 4)]);
    p.write(&w.rmap, &w.machine, RAM, 77).unwrap();
    let c = w.fork(&p).unwrap();
    let old = pfn_at(&p, RAM);
    let new = w.rmap.migrate_frame(&w.vms, &w.machine, old).unwrap();
    assert_ne!(new, old);
    assert_eq!(pfn_at(&p, RAM), new);
    assert_eq!(pfn_at(&c, RAM), new);
    assert_eq!(w.rmap.frames().frame(old).refcount(), 0);
    assert_eq!(w.rmap.frames().frame(new).mapcount(), 2);
    assert_eq!(c.read(&w.rmap, &w.machine, RAM).unwrap(), 77);
    assert_eq!(mapper_vms(&w, new), [p.id, c.id]);
    w.check().unwrap();
}

#[test]
fn reclaim_then_fault_back_in() {
    let w = world();
    let p = w.create_vm(&[(RAM, 4)]);
    p.write(&w.rmap, &w.machine, RAM, 31).unwrap();
    let c = w.fork(&p).unwrap();
    let pfn = pfn_at(&p, RAM);
    let slot = w
        .rmap
        .reclaim_frame(&w.vms, &w.machine, &w.machine, pfn)
        .unwrap();
    assert_eq!(p.s2.lock().lookup(RAM), PageState::Swapped { slot });
    assert_eq!(w.rmap.frames().frame(pfn).refcount(), 0, "frame freed");
    assert_eq!(w.machine.swap_refs()[&slot], 2);
    w.check().unwrap();
    assert_eq!(c.read(&w.rmap, &w.machine, RAM).unwrap(), 31);
    // The first fault left the frame in the swap cache, holding the slot for the parent.
    let cached = w.rmap.swap_cache_entries();
    assert_eq!(cached, vec![(slot, pfn_at(&c, RAM))]);
    assert_eq!(
        w.machine.swap_refs()[&slot],
        2,
        "parent's entry and the cache"
    );
    w.check().unwrap();
    assert_eq!(p.read(&w.rmap, &w.machine, RAM).unwrap(), 31);
    assert_eq!(pfn_at(&p, RAM), pfn_at(&c, RAM), "one frame shared again");
    assert_eq!(w.rmap.frames().frame(pfn_at(&p, RAM)).mapcount(), 2);
    assert!(
        w.machine.swap_refs().is_empty() && w.rmap.swap_cache_entries().is_empty(),
        "slot and cache entry freed after both faulted in"
    );
    w.check().unwrap();
    // Still copy-on-write.
    p.write(&w.rmap, &w.machine, RAM, 32).unwrap();
    assert_eq!(c.read(&w.rmap, &w.machine, RAM).unwrap(), 31);
    assert_ne!(pfn_at(&p, RAM), pfn_at(&c, RAM));
    w.check().unwrap();
}

#[test]
fn swap_cache_lets_go_when_the_last_entry_goes() {
    let w = world();
    let p = w.create_vm(&[(RAM, 4)]);
    p.write(&w.rmap, &w.machine, RAM, 7).unwrap();
    let c1 = w.fork(&p).unwrap();
    let c2 = w.fork(&p).unwrap();
    let pfn = pfn_at(&p, RAM);
    w.rmap
        .reclaim_frame(&w.vms, &w.machine, &w.machine, pfn)
        .unwrap();
    assert_eq!(c1.read(&w.rmap, &w.machine, RAM).unwrap(), 7);
    let cached = pfn_at(&c1, RAM);
    // A frame in the swap cache is pinned: migration and reclaim leave it.
    assert_eq!(
        w.rmap.migrate_frame(&w.vms, &w.machine, cached),
        Err(Error::Busy)
    );
    let mut out = Vec::new();
    w.rmap
        .migrate_frames(&w.vms, &w.machine, &[cached], &mut out);
    assert_eq!(out, vec![Err(crate::Skip::Pinned)]);
    // The other two never fault it in: destroying them drops the slot and the cache entry.
    w.destroy(&p);
    assert_eq!(w.rmap.swap_cache_entries().len(), 1);
    w.destroy(&c2);
    assert!(w.rmap.swap_cache_entries().is_empty());
    assert!(w.machine.swap_refs().is_empty());
    w.check().unwrap();
    w.destroy(&c1);
    assert_eq!(w.machine.allocated(), 0);
    w.check().unwrap();
}

#[test]
fn referenced_clears_access_flags() {
    let w = world();
    let p = w.create_vm(&[(RAM, 4)]);
    p.write(&w.rmap, &w.machine, RAM, 1).unwrap();
    let _c = w.fork(&p).unwrap();
    let pfn = pfn_at(&p, RAM);
    assert_eq!(w.rmap.referenced(pfn, &w.vms), 2);
    assert_eq!(w.rmap.referenced(pfn, &w.vms), 0);
}

#[test]
fn destroy_unlinks_before_tables_go_and_frees_everything() {
    let w = world();
    let p = w.create_vm(&[(RAM, 8), (RAM + 0x100000, 8)]);
    for i in 0..8 {
        p.write(&w.rmap, &w.machine, page_ipa(RAM, i), i).unwrap();
    }
    let c = w.fork(&p).unwrap();
    let pfn = pfn_at(&p, RAM);
    w.destroy(&c);
    // The child's tables are freed; a walk must not reach them.
    assert_eq!(mapper_vms(&w, pfn), [p.id]);
    w.destroy(&p);
    assert_eq!(w.machine.allocated(), 0);
    assert_eq!(w.rmap.live_anon_vmas(), 0);
    assert_eq!(w.rmap.live_chains(), 0);
    w.check().unwrap();
}

#[test]
#[should_panic(expected = "reached freed stage-2 tables")]
fn walker_reaching_freed_tables_is_detected() {
    // The broken order (tables freed before unlink) is caught by the host stage-2.
    let w = world();
    let p = w.create_vm(&[(RAM, 4)]);
    p.write(&w.rmap, &w.machine, RAM, 1).unwrap();
    let g = w.fork(&p).unwrap();
    let pfn = pfn_at(&p, RAM);
    // The bug: tables freed while the region is still linked (a forged proof).
    g.s2.free_tables(crate::UnlinkProof::forged_for_test(g.id));
    let _ = w.rmap.mappers(pfn, &w.vms);
}

#[test]
fn stale_handles_are_detected_by_generation() {
    let w = world();
    let vm = w.create_vm(&[(RAM, 4)]);
    vm.write(&w.rmap, &w.machine, RAM, 1).unwrap();
    let a = own_anon(&vm, RAM);
    let pfn = pfn_at(&vm, RAM);
    w.destroy(&vm);
    assert!(w.rmap.anon_vma(a).is_none());
    assert!(
        w.rmap.get_anon_vma(pfn).is_none(),
        "unmapped frame: not relevant"
    );
    let vm2 = w.create_vm(&[(RAM, 4)]);
    vm2.write(&w.rmap, &w.machine, RAM, 2).unwrap();
    let b = own_anon(&vm2, RAM);
    assert_eq!(a.index(), b.index(), "slot reused");
    assert_ne!(a, b, "with a new generation");
    assert!(w.rmap.anon_vma(a).is_none());
}

#[test]
fn walk_callback_can_stop_early() {
    let w = world();
    let p = w.create_vm(&[(RAM, 4)]);
    p.write(&w.rmap, &w.machine, RAM, 1).unwrap();
    let _c = w.fork(&p).unwrap();
    let mut seen = 0;
    w.rmap
        .walk(pfn_at(&p, RAM), &w.vms, |_, _: &mut dyn Stage2Locked| {
            seen += 1;
            ControlFlow::Break(())
        });
    assert_eq!(seen, 1);
}

#[test]
fn batched_migration_and_reclaim_move_every_mapping() {
    let w = world();
    let p = w.create_vm(&[(RAM, 8)]);
    for i in 0..8 {
        p.write(&w.rmap, &w.machine, page_ipa(RAM, i), 100 + i)
            .unwrap();
    }
    let c = w.fork(&p).unwrap();
    c.write(&w.rmap, &w.machine, page_ipa(RAM, 1), 7).unwrap();
    let old: Vec<Pfn> = (0..4).map(|i| pfn_at(&p, page_ipa(RAM, i))).collect();
    // A frame locked by someone else and a free frame are skipped with their reasons.
    let busy = pfn_at(&p, page_ipa(RAM, 5));
    let guard = w.rmap.frames().lock(busy);
    let mut batch = old.clone();
    batch.push(busy);
    batch.push(w.rmap.frames().base() + 500);
    let mut out = Vec::new();
    w.rmap.migrate_frames(&w.vms, &w.machine, &batch, &mut out);
    drop(guard);
    assert_eq!(out.len(), 6);
    assert_eq!(out[4], Err(crate::Skip::Locked));
    assert_eq!(out[5], Err(crate::Skip::NotMapped));
    for (i, r) in out[..4].iter().enumerate() {
        let new = r.unwrap();
        assert_eq!(pfn_at(&p, page_ipa(RAM, i as u64)), new);
        assert_eq!(
            w.rmap.frames().frame(old[i]).refcount(),
            0,
            "old frame freed"
        );
    }
    assert_eq!(
        pfn_at(&c, RAM),
        pfn_at(&p, RAM),
        "shared frame still shared"
    );
    w.check().unwrap();

    let resident: Vec<Pfn> = (0..8).map(|i| pfn_at(&p, page_ipa(RAM, i))).collect();
    let mut out = Vec::new();
    w.rmap
        .reclaim_frames(&w.vms, &w.machine, &w.machine, &resident, &mut out);
    assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
    w.check().unwrap();
    for i in 0..8 {
        let want = 100 + i;
        assert_eq!(p.read(&w.rmap, &w.machine, page_ipa(RAM, i)).unwrap(), want);
        let child = if i == 1 { 7 } else { want };
        assert_eq!(
            c.read(&w.rmap, &w.machine, page_ipa(RAM, i)).unwrap(),
            child
        );
    }
    w.check().unwrap();
}
