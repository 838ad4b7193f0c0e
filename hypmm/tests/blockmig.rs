//! Block migration (`Rmap::migrate_folio`, issue 18) over the real stage-2 tables: a block
//! forked into three VMs moves whole, each VM's level-2 slot changed once to a migration
//! entry and once to the new block (no split, no table page), one VMID-wide invalidation per
//! VM and all of them before the old run is freed (the TLB model panics on a frame freed
//! while a guest may cache it); a page of a block migration entry reads as its own frame's
//! entry and a fault on it waits for that frame; a fork write-protects such an entry in
//! place.

mod common;

use common::{walk, World, BLOCK_PAGES, RAM_BASE, RAM_PAGES};
use hypmm::{Frames, PAGE_SIZE};
use rmap::{Fault, Ipa, PageState, Pfn, Stage2, Stage2Locked};
use stage2::host::TlbCall;

const SAMPLE: [u64; 4] = [0, 3, 256, 511];

fn page(i: u64) -> Ipa {
    RAM_BASE + i * PAGE_SIZE
}

/// A first-touch block in VM 1 with `SAMPLE` written, forked into VMs 2 and 3; every VM
/// has touched the sample pages (its TLB may cache them). Returns the folio's head.
fn forked_block(w: &World) -> Pfn {
    let a = w.vm(1, RAM_PAGES);
    w.access(&a, page(3), true);
    assert_eq!(w.level(&a, page(3)), Some(2), "a first-touch block");
    let head = w.entry(&a, RAM_BASE).pfn().unwrap();
    for &i in &SAMPLE {
        w.hw().frames.write_value(head + i, 1000 + i);
    }
    for id in [2, 3] {
        let child = w.empty_vm(id);
        w.fork(&a, &child);
    }
    for id in 1..=3 {
        let vm = w.vms.0.lock().unwrap()[&id].clone();
        for &i in &SAMPLE {
            w.access(&vm, page(i), false);
        }
    }
    head
}

#[test]
fn a_forked_block_moves_whole_over_the_real_tables() {
    let w = World::new(false);
    let head = forked_block(&w);
    let vms: Vec<_> = w.vms.0.lock().unwrap().values().cloned().collect();
    let tables: Vec<u64> = vms
        .iter()
        .map(|vm| vm.memory.lock().table().stats().table_pages)
        .collect();
    w.hw().tlb.take();
    w.hw().freed.lock().unwrap().clear();
    let new = w.rmap.migrate_folio(&w.vms, &Frames(&w.m), head).unwrap();
    assert_ne!(new, head);
    // One VMID-wide invalidation per VM (the deferred break), nothing per page.
    let calls = w.hw().tlb.take();
    let vmids: Vec<u16> = calls
        .iter()
        .filter_map(|c| match *c {
            TlbCall::Vmid { vmid } => Some(vmid),
            _ => None,
        })
        .collect();
    let mut want: Vec<u16> = vms.iter().map(|vm| vm.vmid).collect();
    want.sort_unstable();
    let mut got = vmids.clone();
    got.sort_unstable();
    assert_eq!(got, want, "{calls:?}");
    assert!(!calls.iter().any(|c| matches!(c, TlbCall::Ipa { .. })));
    // The old run went back, each frame on its own (after the invalidations: the TLB
    // model would have panicked otherwise).
    let freed = w.hw().freed.lock().unwrap().clone();
    assert!(head.run(BLOCK_PAGES).all(|p| freed.contains(&p.pa().raw())));
    for (vm, pages) in vms.iter().zip(tables) {
        assert_eq!(w.level(vm, page(100)), Some(2), "still one block");
        assert_eq!(vm.memory.lock().table().stats().table_pages, pages);
        let ro = PageState::Mapped {
            pfn: new + 256,
            writable: false,
        };
        assert_eq!(w.entry(vm, page(256)), ro);
        for &i in &SAMPLE {
            let pa = walk(w.hw(), vm.root, page(i).raw()).unwrap();
            assert_eq!(pa, (new + i).pa().raw(), "the hardware's view");
            assert_eq!(w.hw().frames.read_value(new + i), 1000 + i);
        }
    }
    assert_eq!(w.rmap.frames().entire_mapcount(new), 3);
    for vm in &vms {
        w.teardown(vm);
    }
    assert_eq!(w.hw().frames.allocated(), 0);
}

#[test]
fn a_page_of_a_block_migration_entry_is_its_frames_entry() {
    let w = World::new(true);
    let a = w.vm(1, RAM_PAGES);
    w.access(&a, page(3), true);
    let head = w.entry(&a, RAM_BASE).pfn().unwrap();
    let mapped = PageState::Mapped {
        pfn: head,
        writable: true,
    };
    let migrating = PageState::Migrating {
        pfn: head,
        writable: true,
    };
    assert_eq!(a.lock().lookup_block(page(7)), Some(mapped));
    a.lock()
        .compare_exchange_block(page(7), mapped, migrating)
        .unwrap();
    assert_eq!(w.level(&a, page(9)), Some(2));
    assert_eq!(a.lock().lookup_block(page(9)), Some(migrating));
    assert_eq!(w.entry(&a, page(9)), migrating.page(9));
    assert_eq!(walk(w.hw(), a.root, page(9).raw()), None, "it faults");
    // A fault waits for page 9's own frame (which a migration holds locked).
    let frames = Frames(&w.m);
    let fault = w
        .rmap
        .handle_fault(&a.regions, &*a, &frames, &w.hw().frames, page(9), true);
    assert_eq!(fault, Ok(Fault::Retry(Some(head + 9))));
    // A fork write-protects it in place (one block entry, read-only); the child gets its
    // pages' entries.
    let b = w.empty_vm(2);
    w.fork(&a, &b);
    let ro = PageState::Migrating {
        pfn: head,
        writable: false,
    };
    assert_eq!(a.lock().lookup_block(RAM_BASE), Some(ro));
    assert_eq!(w.entry(&b, page(9)), ro.page(9));
    assert_eq!(w.level(&b, page(9)), Some(3));
    // Back (the break's invalidation flushed first, as the witness checks).
    a.flush_deferred();
    let back = PageState::Mapped {
        pfn: head,
        writable: false,
    };
    a.lock().compare_exchange_block(RAM_BASE, ro, back).unwrap();
    assert_eq!(
        walk(w.hw(), a.root, page(9).raw()),
        Some((head + 9).pa().raw())
    );
    // Not a block: refused, with what the page holds.
    let r = b.lock().compare_exchange_block(RAM_BASE, ro, back);
    assert_eq!(r, Err(rmap::CasError::Changed(ro)));
}
