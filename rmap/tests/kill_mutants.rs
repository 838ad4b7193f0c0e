//! Tests written to kill mutants that `cargo xtask mutants` found surviving in rmap's core
//! files (docs/TESTING.md, "Mutation score"). Each names the mutants it kills and checks a
//! property of the crate's own functions that the other tests happened not to pin down.

use rmap::host::{FlushHooked, HostVm, HostWorld};
use rmap::Ipa;
use rmap::{Fault, PageState, Pfn, Stage2, Stage2Locked, VmId};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const RAM: Ipa = Ipa::new(0x4000_0000);

fn world() -> HostWorld {
    HostWorld::new(256, 4, 64, 256)
}

fn entry(vm: &HostVm, ipa: Ipa) -> PageState {
    vm.s2.lock().lookup(ipa)
}

fn pfn_at(vm: &HostVm, ipa: Ipa) -> Pfn {
    entry(vm, ipa).pfn().expect("mapped")
}

/// Calls the fault handler directly, as hyp's abort handler does (the host VM's own accesses
/// fault only where the TLB model says they must).
fn fault(w: &HostWorld, vm: &HostVm, ipa: Ipa, write: bool) -> Fault {
    w.rmap
        .handle_fault(&vm.regions, &vm.s2, &w.machine, &w.machine, ipa, write)
        .expect("fault handled")
}

/// `fault.rs`, `fault_locked`: the `write` match guard → `true`. A read fault on a mapped
/// read-only page (another vCPU mapped it first) is done as it is: it must not copy the
/// shared frame.
#[test]
fn a_read_fault_on_a_shared_page_changes_nothing() {
    let w = world();
    let p = w.create_vm(&[(RAM, 4)]);
    p.write(&w.rmap, &w.machine, RAM, 5).unwrap();
    let c = w.fork(&p).unwrap();
    let shared = entry(&c, RAM);
    assert_eq!(
        shared,
        PageState::Mapped {
            pfn: pfn_at(&p, RAM),
            writable: false
        }
    );
    assert_eq!(fault(&w, &c, RAM, false), Fault::Done);
    assert_eq!(
        entry(&c, RAM),
        shared,
        "still the parent's frame, read-only"
    );
    assert_eq!(w.rmap.frames().frame(pfn_at(&p, RAM)).mapcount(), 2);
    w.check().unwrap();
}

/// `fault.rs`, `fault_swap`: `>` → `>=` / `==` in the swap-cache test. A swap entry nobody
/// else refers to is read into a private, writable frame, not through the swap cache (which
/// would map it read-only, so the next write would fault again and copy it).
#[test]
fn a_sole_swap_entry_comes_back_private_and_writable() {
    let w = world();
    let vm = w.create_vm(&[(RAM, 4)]);
    vm.write(&w.rmap, &w.machine, RAM, 9).unwrap();
    let pfn = pfn_at(&vm, RAM);
    let slot = w
        .rmap
        .reclaim_frame(&w.vms, &w.machine, &w.machine, pfn)
        .unwrap();
    assert_eq!(entry(&vm, RAM), PageState::Swapped { slot });
    assert_eq!(fault(&w, &vm, RAM, false), Fault::Done);
    assert!(
        matches!(entry(&vm, RAM), PageState::Mapped { writable: true, .. }),
        "{:?}",
        entry(&vm, RAM)
    );
    assert!(w.rmap.swap_cache_entries().is_empty());
    assert!(w.machine.swap_refs().is_empty(), "the slot is free");
    assert_eq!(vm.read(&w.rmap, &w.machine, RAM).unwrap(), 9);
    w.check().unwrap();
}

/// `fault.rs`, `wait_frame_unlocked` → `()`. A vCPU that found a migration entry waits
/// until the frame's lock bit clears, instead of spinning through the fault path.
#[test]
fn waiting_for_a_frame_lasts_as_long_as_its_lock() {
    let w = world();
    let vm = w.create_vm(&[(RAM, 4)]);
    vm.write(&w.rmap, &w.machine, RAM, 1).unwrap();
    let pfn = pfn_at(&vm, RAM);
    let (started, done) = (AtomicBool::new(false), AtomicBool::new(false));
    let guard = w.rmap.frames().lock(pfn);
    std::thread::scope(|s| {
        s.spawn(|| {
            started.store(true, Ordering::SeqCst);
            w.rmap.wait_frame_unlocked(pfn);
            done.store(true, Ordering::SeqCst);
        });
        while !started.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !done.load(Ordering::SeqCst),
            "returned while the frame was locked"
        );
        drop(guard);
    });
    assert!(done.load(Ordering::SeqCst));
}

/// `fault.rs`, `fault_cow`: `&&` → `||` in the sole-owner test. A frame mapped once but also
/// held by the swap cache is not the writer's alone: a write copies it, so the VMs that
/// still have swap entries for it read the old contents.
#[test]
fn a_write_to_a_swap_cached_frame_copies_it() {
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
    assert_eq!(w.rmap.frames().frame(cached).mapcount(), 1);
    c1.write(&w.rmap, &w.machine, RAM, 8).unwrap();
    assert_ne!(pfn_at(&c1, RAM), cached, "copied");
    assert_eq!(p.read(&w.rmap, &w.machine, RAM).unwrap(), 7);
    assert_eq!(c2.read(&w.rmap, &w.machine, RAM).unwrap(), 7);
    assert_eq!(c1.read(&w.rmap, &w.machine, RAM).unwrap(), 8);
    w.check().unwrap();
}

/// `chain.rs`, `ChainInfo::ipa_of`: `<` → `<=`. A chain answers for exactly its region's page
/// offsets: the offset one past its last page is not its (the walk's interval query happens to
/// filter that offset out first, so only this public function shows it).
#[test]
fn a_chain_covers_exactly_its_regions_offsets() {
    let w = world();
    let vm = w.create_vm(&[(RAM, 4)]);
    vm.write(&w.rmap, &w.machine, RAM, 1).unwrap();
    let list = vm.regions.read();
    let region = list.find(RAM).unwrap();
    let info = w.rmap.chain_info(region.chains()[0]);
    let first = region.pgoff();
    assert_eq!(info.ipa_of(first), Some(RAM));
    assert_eq!(info.ipa_of(first + 3), Some(RAM + 3 * 4096));
    assert_eq!(info.ipa_of(first + 4), None, "one past the end");
    assert_eq!(info.ipa_of(first - 1), None, "one before the start");
}

/// `chain.rs`, `link`: `+` → `*` in the chain's interval end (`pgoff + pages`). A chain is
/// indexed over exactly its region's offsets; with `pgoff * pages` a one-page region's chain
/// gets an empty interval and the walk never finds its frames (larger regions only get an
/// interval that is too long, which `ipa_of` hides).
#[test]
fn a_one_page_region_is_found_by_the_walk() {
    let w = world();
    let vm = w.create_vm(&[(RAM, 1), (RAM + 0x10_0000, 3)]);
    for ipa in [RAM, RAM + 0x10_0000] {
        vm.write(&w.rmap, &w.machine, ipa, ipa.page_index())
            .unwrap();
        let pfn = pfn_at(&vm, ipa);
        let mappers = w.rmap.mappers(pfn, &w.vms);
        assert_eq!(mappers.len(), 1, "{mappers:?}");
        assert_eq!((mappers[0].vm, mappers[0].ipa), (vm.id, ipa));
        let new = w.rmap.migrate_frame(&w.vms, &w.machine, pfn).unwrap();
        assert_eq!(pfn_at(&vm, ipa), new);
        assert_eq!(vm.read(&w.rmap, &w.machine, ipa).unwrap(), ipa.page_index());
    }
    w.check().unwrap();
}

/// `batch.rs`, `Skip::as_str` → `""` / `"xyzzy"`. The console prints why a frame was left
/// where it is: each reason reads as itself, and no two read alike.
#[test]
fn every_skip_reason_reads_as_itself() {
    use rmap::Skip;
    let all = [
        (Skip::NotMapped, "not a mapped guest frame"),
        (Skip::Locked, "locked"),
        (Skip::Pinned, "pinned"),
        (Skip::Unreachable, "unreachable mapping"),
        (Skip::NoMemory, "no free frame"),
        (Skip::StoreFull, "store full"),
    ];
    for (skip, text) in all {
        assert_eq!(skip.as_str(), text, "{skip:?}");
    }
}

/// `anon_vma.rs`, `Family::len` → `0` / `1` (and `Family::is_empty` → `true`). A family's
/// inspection counts (the console's `rmap <pa>`) agree with its members: a VM that wrote a
/// page and a fork child that copied it on write are two members of one family.
#[test]
fn a_family_counts_its_members() {
    let w = world();
    let p = w.create_vm(&[(RAM, 4)]);
    p.write(&w.rmap, &w.machine, RAM, 1).unwrap();
    let root = p.regions.read().find(RAM).unwrap().anon_vma().unwrap();
    {
        let family = w.rmap.lock_family_read(root);
        assert_eq!((family.len(), family.is_empty()), (1, false));
    }
    let c = w.fork(&p).unwrap();
    c.write(&w.rmap, &w.machine, RAM, 2).unwrap();
    let own = c.regions.read().find(RAM).unwrap().anon_vma().unwrap();
    assert_ne!(own, root);
    let family = w.rmap.lock_family_read(own);
    let members: Vec<_> = family.iter().map(|(a, _)| a).collect();
    assert_eq!(members.len(), 2, "{members:?}");
    assert!(members.contains(&root) && members.contains(&own));
    assert_eq!((family.len(), family.is_empty()), (2, false));
}

/// `batch.rs`, `reclaim_frames` → `()`. A batched reclaim answers for every frame it was
/// given, and each reclaimed page is then a swap entry whose frame went back to the
/// allocator (the existing batch test only checked that no answer was an error, which an
/// empty answer passes).
#[test]
fn a_batched_reclaim_swaps_out_every_frame_it_answers_for() {
    let w = world();
    let vm = w.create_vm(&[(RAM, 4)]);
    let ipas: Vec<Ipa> = (0..4).map(|i| RAM + i * 4096).collect();
    for &ipa in &ipas {
        vm.write(&w.rmap, &w.machine, ipa, ipa.page_index())
            .unwrap();
    }
    let frames: Vec<Pfn> = ipas.iter().map(|&ipa| pfn_at(&vm, ipa)).collect();
    let before = w.machine.allocated();
    let mut out = Vec::new();
    w.rmap
        .reclaim_frames(&w.vms, &w.machine, &w.machine, &frames, &mut out);
    assert_eq!(out.len(), frames.len(), "{out:?}");
    for (&ipa, slot) in ipas.iter().zip(&out) {
        let slot = slot.expect("reclaimed");
        assert_eq!(entry(&vm, ipa), PageState::Swapped { slot });
    }
    assert_eq!(w.machine.allocated(), before - frames.len());
    for &ipa in &ipas {
        assert_eq!(vm.read(&w.rmap, &w.machine, ipa).unwrap(), ipa.page_index());
    }
    w.check().unwrap();
}

/// `batch.rs`, `take_frames`: `&&` → `||` in the flush list's duplicate test. A batch flushes
/// each VM that lost a mapping once, however its frames' anon_vmas interleave the VMs: here two
/// anon_vmas (two distant regions) are each mapped by a parent and its fork child, so the
/// walks meet the parent, the child, the parent again, then the child again.
#[test]
fn a_batch_flushes_each_vm_once() {
    let w = world();
    let far = RAM + 0x10_0000;
    let p = w.create_vm(&[(RAM, 2), (far, 2)]);
    for ipa in [RAM, RAM + 4096, far, far + 4096] {
        p.write(&w.rmap, &w.machine, ipa, ipa.page_index()).unwrap();
    }
    let c = w.fork(&p).unwrap();
    let frames: Vec<Pfn> = [RAM, far, RAM + 4096, far + 4096]
        .iter()
        .map(|&ipa| pfn_at(&p, ipa))
        .collect();
    let flushes = Mutex::new(BTreeMap::new());
    let count = |id: VmId| *flushes.lock().unwrap().entry(id).or_default() += 1;
    let vms = FlushHooked::new(&w, &count);
    let mut out = Vec::new();
    w.rmap.migrate_frames(&vms, &w.machine, &frames, &mut out);
    assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
    let counts = flushes.into_inner().unwrap();
    assert_eq!(counts, BTreeMap::from([(p.id, 1), (c.id, 1)]));
    for ipa in [RAM, RAM + 4096, far, far + 4096] {
        assert_eq!(pfn_at(&p, ipa), pfn_at(&c, ipa), "still shared");
        assert_eq!(c.read(&w.rmap, &w.machine, ipa).unwrap(), ipa.page_index());
    }
    w.check().unwrap();
}

/// `batch.rs`, `take_pinned`: `||` → `&&` in the not-mapped test. A frame that only the swap
/// cache still holds (its one mapping was released) is not a mapped guest frame: a batch says
/// so, rather than calling it pinned.
#[test]
fn a_batch_calls_an_unmapped_swap_cached_frame_not_mapped() {
    let w = world();
    let p = w.create_vm(&[(RAM, 4)]);
    p.write(&w.rmap, &w.machine, RAM, 3).unwrap();
    let c1 = w.fork(&p).unwrap();
    let _c2 = w.fork(&p).unwrap();
    let pfn = pfn_at(&p, RAM);
    w.rmap
        .reclaim_frame(&w.vms, &w.machine, &w.machine, pfn)
        .unwrap();
    assert_eq!(c1.read(&w.rmap, &w.machine, RAM).unwrap(), 3);
    let cached = pfn_at(&c1, RAM);
    c1.release(&w.rmap, &w.machine, RAM).unwrap();
    let frame = w.rmap.frames().frame(cached);
    assert_eq!(
        (frame.mapcount(), frame.refcount()),
        (0, 1),
        "the cache's pin"
    );
    let mut out = Vec::new();
    w.rmap
        .migrate_frames(&w.vms, &w.machine, &[cached], &mut out);
    assert_eq!(out, vec![Err(rmap::Skip::NotMapped)]);
    assert_eq!(p.read(&w.rmap, &w.machine, RAM).unwrap(), 3);
    w.check().unwrap();
}

/// `destroy.rs`, `unmap_region` → `None`. Removing one region (like `munmap`) zaps it, unlinks
/// it and returns the proof for exactly its range; the VM's other regions are untouched.
#[test]
fn unmapping_a_region_proves_its_range_and_frees_its_frames() {
    let w = world();
    let far = RAM + 0x10_0000;
    let vm = w.create_vm(&[(RAM, 4), (far, 2)]);
    for ipa in [RAM, RAM + 4096, far] {
        vm.write(&w.rmap, &w.machine, ipa, ipa.page_index())
            .unwrap();
    }
    let gone = pfn_at(&vm, RAM);
    let before = w.machine.allocated();
    let proof = w
        .rmap
        .unmap_region(&mut vm.regions.write(), RAM, &vm.s2, &w.machine, &w.machine)
        .expect("a region starts there");
    assert_eq!((proof.vm(), proof.range()), (vm.id, RAM..RAM + 4 * 4096));
    assert_eq!(w.machine.allocated(), before - 2);
    assert!(w.rmap.mappers(gone, &w.vms).is_empty());
    assert_eq!(entry(&vm, RAM), PageState::Invalid);
    assert!(vm.regions.read().find(RAM).is_none());
    assert_eq!(vm.read(&w.rmap, &w.machine, far).unwrap(), far.page_index());
    let mut list = vm.regions.write();
    let again = w
        .rmap
        .unmap_region(&mut list, RAM, &vm.s2, &w.machine, &w.machine);
    assert!(again.is_none(), "no region starts there any more");
    drop(list);
    w.check().unwrap();
}

/// `destroy.rs`, `zap`: `+` → `-` in `start + pages * PAGE_SIZE` and in `ipa + PAGE_SIZE`.
/// A region at IPA 0 is torn down like any other: where the next scan starts is computed
/// without going below zero (which panics in a debug build and, wrapped in a release build,
/// would end the scan and leak every later page).
#[test]
fn a_region_at_ipa_zero_is_torn_down_whole() {
    let w = world();
    let vm = w.create_vm(&[(Ipa::ZERO, 4)]);
    for ipa in [0, 4096, 3 * 4096].map(Ipa::new) {
        vm.write(&w.rmap, &w.machine, ipa, ipa.raw() + 1).unwrap();
    }
    assert_eq!(vm.read(&w.rmap, &w.machine, Ipa::new(4096)).unwrap(), 4097);
    w.destroy(&vm);
    assert_eq!(w.machine.allocated(), 0);
    assert_eq!(w.rmap.live_anon_vmas(), 0);
    w.check().unwrap();
}
