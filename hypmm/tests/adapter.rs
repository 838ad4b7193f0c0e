//! The real stage-2 adapter (`hypmm`) driven through rmap's real operations
//! on a host machine: first-touch faults, fork and copy-on-write, migration,
//! release and teardown, and table-page exhaustion.

mod common;

use common::{World, BLOCK_PAGES, RAM_BASE, RAM_PAGES};
use hypmm::{BLOCK_SIZE, PAGE_SIZE};
use rmap::{Ipa, Pa, PageState, Skip};
use stage2::host::TlbCall;
use std::sync::atomic::Ordering;

/// A hook check: whenever a frame is cleaned to the PoC, no VM maps it yet
/// (clean before map, not after the guest could read stale DRAM).
fn check_clean_before_map(w: &World, vms: Vec<std::sync::Arc<common::TestVm>>) {
    let hw = w.hw();
    hw.tlb.set_hook(move |call| {
        if let TlbCall::CleanPoc { pa, len } = *call {
            for vm in &vms {
                for ipa in (RAM_BASE.raw()..(RAM_BASE + RAM_PAGES * PAGE_SIZE).raw()).step_by(4096)
                {
                    let mapped = common::walk(hw, vm.root, ipa);
                    let inside = mapped.is_some_and(|p| p >= pa && p < pa + len);
                    assert!(!inside, "frame {pa:#x} cleaned after {ipa:#x} mapped it");
                }
            }
        }
        hw.on_tlb(call);
    });
}

#[test]
fn first_touch_maps_a_block_and_cleans_it_first() {
    let w = World::new(false);
    let vm = w.vm(1, RAM_PAGES);
    check_clean_before_map(&w, vec![vm.clone()]);
    let ipa = RAM_BASE + 5 * PAGE_SIZE;
    w.access(&vm, ipa, false);
    assert_eq!(w.level(&vm, ipa), Some(2), "one 2 MiB block entry");
    assert_eq!(vm.memory.lock().resident_pages(), BLOCK_PAGES);
    let pa = vm.memory.lock().pa_of(RAM_BASE).unwrap();
    assert!(pa.is_aligned(BLOCK_SIZE));
    assert_eq!(
        w.entry(&vm, ipa),
        PageState::Mapped {
            pfn: pa.pfn() + 5,
            writable: true
        }
    );
    assert_eq!(
        w.hw().cleans(),
        vec![(pa.raw(), BLOCK_SIZE)],
        "the block cleaned once"
    );
}

#[test]
fn a_page_fault_maps_one_cleaned_page_and_fwb_cleans_nothing() {
    for fwb in [false, true] {
        let w = World::new(fwb);
        // 16 pages: no whole 2 MiB chunk, so the page path.
        let vm = w.vm(1, 16);
        check_clean_before_map(&w, vec![vm.clone()]);
        let ipa = RAM_BASE + 3 * PAGE_SIZE;
        w.access(&vm, ipa, true);
        assert_eq!(w.level(&vm, ipa), Some(3));
        assert_eq!(vm.memory.lock().resident_pages(), 1);
        let pa = vm.memory.lock().pa_of(ipa).unwrap();
        let cleans = w.hw().cleans();
        if fwb {
            assert!(cleans.is_empty(), "FWB: nothing to clean, got {cleans:?}");
        } else {
            assert_eq!(cleans, vec![(pa.raw(), PAGE_SIZE)]);
        }
        let lookup = w.entry(&vm, ipa);
        let expected = PageState::Mapped {
            pfn: pa.pfn(),
            writable: true,
        };
        assert_eq!(lookup, expected);
    }
}

#[test]
fn fork_write_protects_a_block_with_one_flush_and_cow_breaks_it() {
    let w = World::new(false);
    let parent = w.vm(1, RAM_PAGES);
    w.access(&parent, RAM_BASE, true);
    let block_pfn = parent.memory.lock().pa_of(RAM_BASE).unwrap().pfn();
    w.hw().frames.write_value(block_pfn + 7, 77);
    let child = w.empty_vm(2);
    w.hw().tlb.take();
    w.fork(&parent, &child);

    // The parent's block stays one read-only entry; the child shares it.
    let calls = w.hw().tlb.take();
    let vmid = |v: u16| TlbCall::Vmid { vmid: v };
    assert_eq!(
        calls,
        vec![vmid(parent.vmid)],
        "one VMID-wide flush, no per-page"
    );
    for vm in [&parent, &child] {
        assert_eq!(w.level(vm, RAM_BASE), Some(2));
        let ro = PageState::Mapped {
            pfn: block_pfn + 7,
            writable: false,
        };
        assert_eq!(w.entry(vm, RAM_BASE + 7 * PAGE_SIZE), ro);
    }
    w.touch(&parent, RAM_BASE + 7 * PAGE_SIZE);
    w.touch(&child, RAM_BASE + 7 * PAGE_SIZE);
    // The child's block is one more count on the folio, not 512.
    let frames = w.rmap.frames();
    assert_eq!(frames.entire_mapcount(block_pfn), 2);
    assert_eq!(
        frames.frame(block_pfn + 9).mapcount(),
        1,
        "the folio's share"
    );
    assert_eq!(frames.mapcount(block_pfn + 9), 2);

    // The child's write breaks the share: its own copy, a split block.
    check_clean_before_map(&w, vec![child.clone()]);
    let ipa = RAM_BASE + 7 * PAGE_SIZE;
    w.access(&child, ipa, true);
    let PageState::Mapped {
        pfn,
        writable: true,
    } = w.entry(&child, ipa)
    else {
        panic!("child not writable after CoW");
    };
    assert_ne!(pfn, block_pfn + 7);
    assert_eq!(w.hw().frames.read_value(pfn), 77, "contents copied");
    assert_eq!(w.level(&child, ipa), Some(3), "the child's block was split");
    let neighbour = RAM_BASE + 8 * PAGE_SIZE;
    let shared = PageState::Mapped {
        pfn: block_pfn + 8,
        writable: false,
    };
    assert_eq!(w.entry(&child, neighbour), shared);
    assert_eq!(w.hw().cleans(), vec![(pfn.pa().raw(), PAGE_SIZE)]);
    let ro = PageState::Mapped {
        pfn: block_pfn + 7,
        writable: false,
    };
    assert_eq!(w.entry(&parent, ipa), ro, "the parent still shares");
    // The adapter's split moved the child's count to its pages.
    assert_eq!(frames.entire_mapcount(block_pfn), 1);
    assert_eq!(frames.mapcount(block_pfn + 7), 1, "the parent's block");
    assert_eq!(frames.mapcount(block_pfn + 8), 2);
    assert_eq!(
        frames.frame(block_pfn + 8).mapcount(),
        2,
        "child's page + share"
    );
    // Teardown: the parent's block entry is the last; then the child's pages.
    let before = w.hw().frames.allocated();
    w.teardown(&parent);
    assert_eq!(frames.entire_mapcount(block_pfn), 0);
    assert_eq!(
        w.hw().frames.allocated(),
        before - 1,
        "only page 7's old frame"
    );
    w.teardown(&child);
    assert_eq!(w.hw().frames.allocated(), before - 1 - BLOCK_PAGES as usize);
}

#[test]
fn migration_moves_a_page_and_frees_the_old_frame_after_the_flush() {
    let w = World::new(false);
    let vm = w.vm(1, 16);
    let ipa = RAM_BASE + 2 * PAGE_SIZE;
    w.access(&vm, ipa, true);
    let old = vm.memory.lock().pa_of(ipa).unwrap().pfn();
    w.hw().frames.write_value(old, 1234);
    let mut out = Vec::new();
    let frames = hypmm::Frames(&w.m);
    w.rmap.migrate_frames(&w.vms, &frames, &[old], &mut out);
    let new = match out[..] {
        [Ok(new)] => new,
        ref r => panic!("migration failed: {r:?}"),
    };
    assert_ne!(new, old);
    let moved = PageState::Mapped {
        pfn: new,
        writable: true,
    };
    assert_eq!(w.entry(&vm, ipa), moved);
    assert_eq!(w.hw().frames.read_value(new), 1234);
    assert!(w.hw().freed.lock().unwrap().contains(&old.pa().raw()));
    // A second migration of the frame now unmapped is skipped, not a panic.
    out.clear();
    w.rmap.migrate_frames(&w.vms, &frames, &[old], &mut out);
    assert!(matches!(out[..], [Err(Skip::NotMapped)]), "{out:?}");
}

#[test]
fn release_splits_a_block_and_teardown_frees_everything() {
    let w = World::new(false);
    let vm = w.vm(1, RAM_PAGES);
    let frames_before = w.hw().frames.allocated();
    w.access(&vm, RAM_BASE, true);
    w.access(&vm, RAM_BASE + 3 * PAGE_SIZE, true);
    w.access(&vm, RAM_BASE + BLOCK_SIZE + PAGE_SIZE, true);
    let block = vm.memory.lock().pa_of(RAM_BASE).unwrap();

    let range = RAM_BASE + 2 * PAGE_SIZE..RAM_BASE + 5 * PAGE_SIZE;
    let released = w.release(&vm, range).expect("release");
    let expect: Vec<Ipa> = (2..5).map(|i| RAM_BASE + i * PAGE_SIZE).collect();
    assert_eq!(released, expect);
    for &ipa in &expect {
        assert_eq!(w.entry(&vm, ipa), PageState::Invalid);
    }
    assert_eq!(w.level(&vm, RAM_BASE), Some(3), "the block was split");
    assert_eq!(
        vm.memory.lock().pa_of(RAM_BASE + 5 * PAGE_SIZE),
        Some(block + 5 * PAGE_SIZE)
    );
    let freed: Vec<Pa> = w
        .hw()
        .freed
        .lock()
        .unwrap()
        .iter()
        .map(|&p| Pa::new(p))
        .collect();
    assert_eq!(
        freed,
        vec![
            block + 2 * PAGE_SIZE,
            block + 3 * PAGE_SIZE,
            block + 4 * PAGE_SIZE
        ]
    );

    w.touch(&vm, RAM_BASE + 5 * PAGE_SIZE);
    w.teardown(&vm);
    assert_eq!(
        w.hw().frames.allocated(),
        frames_before,
        "every frame freed"
    );
    assert_eq!(w.hw().tables.allocated_pages(), 0, "every table page freed");
}

#[test]
fn table_exhaustion_is_an_error_not_a_panic() {
    let w = World::new(false);
    let vm = w.vm(1, 16);
    let frames_before = w.hw().frames.allocated();
    w.hw().tables.fail_after(Some(0));
    let r = w.fault(&vm, RAM_BASE, true);
    assert_eq!(r, Err(rmap::Error::OutOfFrames));
    assert_eq!(w.entry(&vm, RAM_BASE), PageState::Invalid);
    assert_eq!(
        w.hw().frames.allocated(),
        frames_before,
        "the fault's frame went back"
    );

    // A block cannot be split for a one-page release without a table page.
    w.hw().tables.fail_after(None);
    let big = w.vm(2, RAM_PAGES);
    w.access(&big, RAM_BASE, true);
    w.hw().tables.fail_after(Some(0));
    let range = RAM_BASE + PAGE_SIZE..RAM_BASE + 2 * PAGE_SIZE;
    assert_eq!(w.release(&big, range), Err(rmap::Error::OutOfFrames));
    assert_eq!(w.level(&big, RAM_BASE), Some(2), "the block is untouched");
}

#[test]
fn invalidations_stay_local_until_another_cpu_loads_the_vm() {
    let w = World::new(false);
    let vm = w.vm(1, 16);
    w.access(&vm, RAM_BASE, true);
    let local = || w.hw().local_flushes.load(Ordering::SeqCst);
    let before = local();
    let frames = hypmm::Frames(&w.m);
    let pfn = vm.memory.lock().pa_of(RAM_BASE).unwrap().pfn();
    let mut out = Vec::new();
    w.rmap.migrate_frames(&w.vms, &frames, &[pfn], &mut out);
    assert!(local() > before, "only CPU 0 ran the VM: a local flush");
    // CPU 1 runs it too: from now on every invalidation is broadcast.
    w.hw().cpu.store(1, Ordering::SeqCst);
    vm.memory.lock().load_here();
    w.hw().cpu.store(0, Ordering::SeqCst);
    w.touch(&vm, RAM_BASE);
    let before = local();
    let Ok(pfn) = out[0] else { panic!("{out:?}") };
    out.clear();
    w.rmap.migrate_frames(&w.vms, &frames, &[pfn], &mut out);
    assert!(matches!(out[..], [Ok(_)]), "{out:?}");
    assert_eq!(local(), before, "another CPU may hold the VM's entries");
}
