//! A host stage 2 that can hurt (issue 13, item 2): 2 MiB blocks that must be split (taking a
//! table page from a bounded budget) before one page changes, and a TLB model that remembers
//! what vCPU accesses cached until an invalidation covers it, so teardown and invalidation
//! mistakes that a plain map hides fail here.

use rmap::host::{page_ipa, HostVm, HostWorld, BLOCK_PAGES, BLOCK_SIZE};
use rmap::{CasError, FrameAllocator, PageState, Stage2, Stage2Locked};
use rmap::{Ipa, Pfn};
use std::collections::BTreeMap;
use std::sync::Arc;

const RAM: Ipa = Ipa::new(0x4000_0000);
/// Three block-sized chunks and a 16-page tail that only takes pages.
const BLOCKS: u64 = 3;
const TAIL: u64 = 16;
const REGION: [(Ipa, u64); 1] = [(RAM, BLOCKS * BLOCK_PAGES + TAIL)];

fn world() -> HostWorld {
    HostWorld::new(2048, 2, 64, 256)
}

/// A VM with `BLOCKS` first-touch blocks, a value written in a few pages of each, and the
/// tail written page by page; returns it with what it should read.
fn blocky_vm(w: &HostWorld) -> (Arc<HostVm>, BTreeMap<Ipa, u64>) {
    let vm = w.create_vm(&REGION);
    let mut model = BTreeMap::new();
    for b in 0..BLOCKS {
        assert!(w.fault_block(&vm, RAM + b * BLOCK_SIZE), "block {b}");
        for i in [0, 1, 255, 511] {
            let ipa = page_ipa(RAM + b * BLOCK_SIZE, i);
            vm.write(&w.rmap, &w.machine, ipa, ipa.page_index())
                .unwrap();
            model.insert(ipa, ipa.page_index());
        }
    }
    for i in 0..TAIL {
        let ipa = page_ipa(RAM + BLOCKS * BLOCK_SIZE, i);
        vm.write(&w.rmap, &w.machine, ipa, ipa.page_index())
            .unwrap();
        model.insert(ipa, ipa.page_index());
    }
    assert_eq!(vm.s2.blocks().len(), BLOCKS as usize, "still blocks");
    (vm, model)
}

fn assert_reads(w: &HostWorld, vm: &HostVm, model: &BTreeMap<Ipa, u64>) {
    for (&ipa, &value) in model {
        assert_eq!(
            vm.read(&w.rmap, &w.machine, ipa).unwrap(),
            value,
            "{ipa:#x}"
        );
    }
}

/// Isolation issue, item 4: teardown under memory pressure. A maps blocks, B is forked from
/// it (sharing every block as a block), both read (their TLBs cache translations), A writes
/// pages of every block (splitting its own), then no table page is left and B is destroyed:
/// no panic, nothing still mapped freed, no frame freed while a TLB may hold it; then A goes
/// too and nothing leaks. The page-by-page zap of 1447395 needs a split for B's first block
/// page and panics (`stage-2 locked`).
#[test]
fn teardown_under_memory_pressure() {
    let w = world();
    let (a, mut model) = blocky_vm(&w);
    let b = w.fork(&a).unwrap();
    assert_eq!(b.s2.blocks().len(), BLOCKS as usize, "B shares every block");
    assert_eq!(
        a.s2.blocks().len(),
        BLOCKS as usize,
        "A's stay blocks (read-only)"
    );
    assert_reads(&w, &b, &model);
    assert_reads(&w, &a, &model);
    assert!(!w.hw().cached_pages(b.id).is_empty());
    for blk in 0..BLOCKS {
        for i in [1, 7, 300] {
            let ipa = page_ipa(RAM + blk * BLOCK_SIZE, i);
            a.write(&w.rmap, &w.machine, ipa, 0xa000 + i).unwrap();
            model.insert(ipa, 0xa000 + i);
        }
    }
    assert!(a.s2.blocks().is_empty(), "A's writes split its blocks");
    assert_eq!(b.s2.blocks().len(), BLOCKS as usize);
    w.hw().set_table_budget(Some(0));
    let ooms = w.hw().out_of_memory_count();
    w.destroy(&b);
    w.check().unwrap();
    assert_eq!(
        w.hw().out_of_memory_count(),
        ooms,
        "teardown allocated nothing"
    );
    assert_reads(&w, &a, &model);
    w.destroy(&a);
    w.check().unwrap();
    assert_eq!(w.machine.allocated(), 0);
    assert_eq!(w.rmap.live_anon_vmas(), 0);
    assert_eq!(w.rmap.live_chains(), 0);
}

/// A fake teardown that drops the frames before the deferred invalidation: the TLB model
/// reports each frame freed while the VM's TLB still caches it, and a later load through
/// such a stale translation after the frame was reused. The same teardown with the flush
/// first is clean. (The check can fail.)
#[test]
fn freeing_before_the_flush_is_caught() {
    for flush_first in [false, true] {
        let w = world();
        let (vm, model) = blocky_vm(&w);
        assert_reads(&w, &vm, &model);
        let (start, end) = (RAM, RAM + REGION[0].1 * 4096);
        let mut cleared = Vec::new();
        {
            let mut s2 = vm.s2.lock();
            while let Some((ipa, entry)) = s2.next_entry(start, end) {
                cleared.push(s2.clear_leaf(ipa, entry, start..end).unwrap());
            }
        }
        if flush_first {
            vm.s2.flush_deferred();
        }
        for &(_, pages, first) in &cleared {
            (0..pages).for_each(|i| w.rmap.remove_rmap(first.page(i).pfn().unwrap(), &w.machine));
        }
        // Reuse the frames (another VM's first touches), then load through the old TLB.
        let other = w.create_vm(&REGION);
        assert!(w.fault_block(&other, RAM));
        let ipa = page_ipa(RAM, 255);
        let mut through_tlb = false;
        vm.access(&w.machine, ipa, false, |_| through_tlb = true);
        let failures = w.hw().take_failures();
        if flush_first {
            assert!(failures.is_empty(), "{failures:?}");
            assert!(
                !through_tlb,
                "the flushed TLB holds nothing, the table nothing"
            );
        } else {
            let freed = failures
                .iter()
                .filter(|f| f.contains("freed while"))
                .count();
            assert_eq!(freed, model.len(), "{failures:?}");
            assert!(
                failures
                    .iter()
                    .any(|f| f.contains("through a stale TLB entry")),
                "{failures:?}"
            );
        }
        vm.s2.flush_deferred();
        w.destroy(&vm);
        w.destroy(&other);
        w.check().unwrap();
        assert_eq!(w.machine.allocated(), 0);
    }
}

/// Blocks as rmap sees them: pages inside a block are reported page by page (a block
/// starting before `from` from `from` on); a CAS on one page splits the block, taking a
/// table page, and fails (recording out of memory) when none is left; `clear_leaf` clears a
/// block inside `within` whole with no table page, and must split one that is not.
#[test]
fn blocks_split_only_with_a_table_page() {
    let w = world();
    let vm = w.create_vm(&REGION);
    assert!(w.fault_block(&vm, RAM));
    let pfn = vm.s2.lock().lookup(RAM).pfn().unwrap();
    let page = |i: u64| PageState::Mapped {
        pfn: pfn + i,
        writable: true,
    };
    let mut s2 = vm.s2.lock();
    assert_eq!(s2.lookup(page_ipa(RAM, 5)), page(5));
    let mid = page_ipa(RAM, 9);
    assert_eq!(s2.next_entry(mid, RAM + BLOCK_SIZE), Some((mid, page(9))));
    w.hw().set_table_budget(Some(0));
    let ro = PageState::Mapped {
        pfn: pfn + 9,
        writable: false,
    };
    // Out of memory is the change's own answer, not a flag read later.
    assert_eq!(
        s2.compare_exchange(mid, page(9), ro),
        Err(CasError::NoMemory)
    );
    assert_eq!(w.hw().out_of_memory_count(), 1);
    // Partly outside `within`: only the page would go, which needs a split.
    let within = RAM..RAM + 4096 * 16;
    assert_eq!(s2.clear_leaf(mid, page(9), within), Err(CasError::NoMemory));
    w.hw().set_table_budget(Some(1));
    assert_eq!(s2.compare_exchange(mid, page(9), ro), Ok(()));
    assert_eq!(s2.lookup(page_ipa(RAM, 10)), page(10));
    assert_eq!(w.hw().tables_allocated(), 1);
    drop(s2);
    assert!(vm.s2.blocks().is_empty());
    update_leaves_reports_a_block_once(&w);
    // Put it back writable so the world's accounting stays exact, then tear down.
    vm.s2.lock().compare_exchange(mid, ro, page(9)).unwrap();
    w.destroy(&vm);
    w.check().unwrap();
    assert_eq!(w.machine.allocated(), 0);
}

/// `update_leaves` reports a block once (512 pages); a write-protect keeps it one block
/// entry, with no table page.
fn update_leaves_reports_a_block_once(w: &HostWorld) {
    let vm = w.create_vm(&REGION);
    assert!(w.fault_block(&vm, RAM));
    let pfn = vm.s2.lock().lookup(RAM).pfn().unwrap();
    let ro = |writable| PageState::Mapped { pfn, writable };
    let tables = w.hw().tables_allocated();
    let mut seen = Vec::new();
    vm.s2
        .lock()
        .update_leaves(RAM, RAM + BLOCK_SIZE, &mut |ipa, pages, e| {
            seen.push((ipa, pages, e));
            Some(ro(false))
        });
    assert_eq!(seen, [(RAM, BLOCK_PAGES, ro(true))]);
    assert_eq!(vm.s2.blocks(), [RAM]);
    assert_eq!(vm.s2.lock().lookup(RAM + 4096), ro(false).page(1));
    assert_eq!(w.hw().tables_allocated(), tables, "no split");
    w.destroy(&vm);
}

/// A page needs a last-level table: with no table page left a first touch outside a block
/// fails as out of memory (no spinning), and the write succeeds once one is allowed.
#[test]
fn a_page_outside_any_table_needs_a_table_page() {
    let w = world();
    let vm = w.create_vm(&REGION);
    let ipa = page_ipa(RAM + BLOCKS * BLOCK_SIZE, 3);
    w.hw().set_table_budget(Some(0));
    let r = vm.write(&w.rmap, &w.machine, ipa, 7);
    assert_eq!(r, Err(rmap::Error::OutOfFrames));
    w.check().unwrap();
    w.hw().set_table_budget(Some(1));
    vm.write(&w.rmap, &w.machine, ipa, 7).unwrap();
    vm.write(&w.rmap, &w.machine, ipa + 4096, 8).unwrap();
    assert_eq!(w.hw().tables_allocated(), 1, "one table for the chunk");
    w.destroy(&vm);
    w.check().unwrap();
}

/// Fork keeps blocks blocks on both sides with no table page (the parent's write-protect and
/// the child's fill), fails cleanly when the child's pages need a table that is not there,
/// and a sole owner's write to a read-only block page that cannot be split reports out of
/// memory instead of spinning.
#[test]
fn fork_and_cow_on_blocks_under_pressure() {
    let w = world();
    let (a, model) = blocky_vm(&w);
    let frames = w.machine.allocated();
    w.hw().set_table_budget(Some(0));
    assert_eq!(
        w.fork(&a).err(),
        Some(rmap::Error::OutOfFrames),
        "tail pages need a table"
    );
    w.check().unwrap();
    assert_eq!(w.machine.allocated(), frames);
    w.hw().set_table_budget(Some(1));
    let b = w.fork(&a).unwrap();
    assert_eq!(b.s2.blocks().len(), BLOCKS as usize);
    w.hw().set_table_budget(Some(0));
    w.destroy(&b);
    let ipa = page_ipa(RAM, 3);
    let r = a.write(&w.rmap, &w.machine, ipa, 1);
    assert_eq!(
        r,
        Err(rmap::Error::OutOfFrames),
        "sole owner, block cannot split"
    );
    w.check().unwrap();
    assert_reads(&w, &a, &model);
    w.hw().set_table_budget(None);
    a.write(&w.rmap, &w.machine, ipa, 1).unwrap();
    w.destroy(&a);
    w.check().unwrap();
    assert_eq!(w.machine.allocated(), 0);
}

/// Batched migration and reclaim of block frames under pressure: a block that cannot be split
/// stays as it was (its frames are skipped), and nothing is lost or freed while cached.
#[test]
fn batches_leave_an_unsplittable_block_alone() {
    let w = world();
    let (a, model) = blocky_vm(&w);
    assert_reads(&w, &a, &model);
    w.hw().set_table_budget(Some(0));
    let pfn = a.s2.lock().lookup(RAM).pfn().unwrap();
    let batch: Vec<Pfn> = pfn.run(8).collect();
    for reclaim in [false, true] {
        // Reclaim reports slots, migration frames: only the skips are compared.
        let skipped: Vec<_> = if reclaim {
            let mut out = Vec::new();
            w.rmap
                .reclaim_frames(&w.vms, &w.machine, &w.machine, &batch, &mut out);
            out.iter().map(|r| r.err()).collect()
        } else {
            let mut out = Vec::new();
            w.rmap.migrate_frames(&w.vms, &w.machine, &batch, &mut out);
            out.iter().map(|r| r.err()).collect()
        };
        assert!(skipped.iter().all(|r| r.is_some()), "{skipped:?}");
        w.check().unwrap();
        assert_reads(&w, &a, &model);
    }
    w.hw().set_table_budget(None);
    let mut out = Vec::new();
    w.rmap.migrate_frames(&w.vms, &w.machine, &batch, &mut out);
    assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
    w.check().unwrap();
    assert_reads(&w, &a, &model);
    w.destroy(&a);
    w.check().unwrap();
    assert_eq!(w.machine.allocated(), 0);
}

/// Single-frame migration of a page inside a block that cannot be split (no table page):
/// `unmap_to_migration` does `compare_exchange(..).expect("stage-2 locked")`, which a
/// backend may refuse for exactly this reason (hyp: "a persistent failure such as an
/// unsplittable block is reported"), so the migrator panics instead of backing off (Busy).
/// The hypervisor keeps a table-page reserve, so this needs the reserve exhausted there.
#[test]
fn migrating_a_block_frame_without_a_table_page_backs_off() {
    let w = world();
    let (a, model) = blocky_vm(&w);
    w.hw().set_table_budget(Some(0));
    let pfn = a.s2.lock().lookup(RAM).pfn().unwrap();
    let r = w.rmap.migrate_frame(&w.vms, &w.machine, pfn);
    assert!(r.is_err(), "{r:?}");
    let r = w.rmap.reclaim_frame(&w.vms, &w.machine, &w.machine, pfn);
    assert!(r.is_err(), "{r:?}");
    w.check().unwrap();
    assert_reads(&w, &a, &model);
    w.destroy(&a);
}

/// The frame allocator is the machine's: a free of a frame no VM caches is not a failure.
#[test]
fn a_free_frame_nobody_cached_is_fine() {
    let w = world();
    let pfn = w.machine.alloc().unwrap();
    w.machine.free(pfn);
    assert!(w.hw().failures().is_empty());
}

/// A fork child gets a block only for a parent's block (counted once on its folio), never
/// for a run of page entries, even of consecutive frames (a sole owner's CoW reuse split the
/// parent's block but kept the frames): those count page by page, so the child maps pages;
/// its teardown with no table page left clears them all.
#[test]
fn a_split_run_of_consecutive_frames_forks_as_pages() {
    let w = world();
    let (a, mut model) = blocky_vm(&w);
    let b = w.fork(&a).unwrap();
    w.destroy(&b);
    let ipa = page_ipa(RAM, 3);
    a.write(&w.rmap, &w.machine, ipa, 3).unwrap();
    model.insert(ipa, 3);
    assert!(!a.s2.blocks().contains(&RAM), "split by the reuse");
    let c = w.fork(&a).unwrap();
    assert!(!c.s2.blocks().contains(&RAM), "{:?}", c.s2.blocks());
    let pfn = c.s2.lock().lookup(RAM).pfn().unwrap();
    assert_eq!(w.rmap.frames().entire_mapcount(pfn), 0);
    assert_eq!(w.rmap.frames().mapcount(pfn), 2);
    w.check().unwrap();
    assert_reads(&w, &c, &model);
    w.hw().set_table_budget(Some(0));
    w.destroy(&c);
    w.check().unwrap();
    assert_reads(&w, &a, &model);
    w.destroy(&a);
    w.check().unwrap();
    assert_eq!(w.machine.allocated(), 0);
}

/// Break-before-make (as hyp's `bbm.rs` witness): a valid entry installed where the VM's TLB
/// may still hold another translation, its invalidation deferred and not yet flushed, is a
/// failure; after the flush the same change is clean.
#[test]
fn a_valid_entry_over_a_pending_invalidation_is_caught() {
    let w = world();
    let vm = w.create_vm(&REGION);
    let ipa = page_ipa(RAM, 1);
    vm.write(&w.rmap, &w.machine, ipa, 1).unwrap();
    let pfn = vm.s2.lock().lookup(ipa).pfn().unwrap();
    let entry = |writable| PageState::Mapped { pfn, writable };
    {
        let mut s2 = vm.s2.lock();
        s2.compare_exchange_deferred(ipa, entry(true), PageState::Invalid)
            .unwrap();
        s2.compare_exchange(ipa, PageState::Invalid, entry(false))
            .unwrap();
    }
    let failures = w.hw().take_failures();
    assert!(
        failures.len() == 1 && failures[0].contains("break-before-make"),
        "{failures:?}"
    );
    vm.s2.flush_deferred();
    {
        let mut s2 = vm.s2.lock();
        s2.compare_exchange_deferred(ipa, entry(false), PageState::Invalid)
            .unwrap();
        drop(s2);
        vm.s2.flush_deferred();
        let mut s2 = vm.s2.lock();
        s2.compare_exchange(ipa, PageState::Invalid, entry(true))
            .unwrap();
    }
    w.check().unwrap();
    assert_eq!(vm.read(&w.rmap, &w.machine, ipa).unwrap(), 1);
    w.destroy(&vm);
    w.check().unwrap();
}

/// A fault whose own change needs a table page the table cannot get says so in its result
/// (`OutOfFrames`, which hyp answers by reclaiming), not through a flag read afterwards; the
/// frame it took goes back. With a table page the same fault succeeds.
#[test]
fn a_fault_without_a_table_page_is_out_of_frames() {
    let w = world();
    let vm = w.create_vm(&[(RAM, 4)]);
    w.hw().set_table_budget(Some(0));
    let fault = || {
        let m = &w.machine;
        w.rmap.handle_fault(&vm.regions, &vm.s2, m, m, RAM, true)
    };
    // The region's first fault only prepares its anon_vma.
    assert_eq!(fault(), Ok(rmap::Fault::Retry(None)));
    assert_eq!(fault(), Err(rmap::Error::OutOfFrames));
    assert_eq!(vm.s2.lock().lookup(RAM), PageState::Invalid);
    w.check().unwrap();
    w.hw().set_table_budget(None);
    assert_eq!(fault(), Ok(rmap::Fault::Done));
    w.check().unwrap();
}
