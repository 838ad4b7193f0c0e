//! A swap-in racing MEM_RELEASE (issue 12, item 3). The fault reads `Swap { slot }` under the
//! stage-2 lock and uses the slot after unlocking; MEM_RELEASE holds only the region list's
//! read lock, so it can clear the entry and drop the entry's slot reference in that gap, and
//! the store may then free the slot and hand its number to another page. The fault must hold
//! a slot reference of its own (Linux's swap-in does), or it loads a free slot (a panic),
//! installs a stale page over a newer one, or caches a page of one VM for another.
//!
//! Each test makes the race happen deterministically: a one-shot store hook
//! (`HostMachine::on_next`) runs the release (and the slot's reuse) at the moment the fault
//! uses the slot, on another thread (the fault holds the VM's region list).

use rmap::host::{HostVm, HostWorld, SwapOp};
use rmap::Ipa;
use rmap::{Error, PageState, Pfn, Stage2, Stage2Locked};
use std::sync::Arc;
use std::thread;

const RAM: Ipa = Ipa::new(0x4000_0000);

fn world() -> Arc<HostWorld> {
    Arc::new(HostWorld::new(64, 8, 64, 256))
}

fn pfn_at(vm: &HostVm, ipa: Ipa) -> Pfn {
    vm.s2.lock().lookup(ipa).pfn().expect("mapped")
}

fn reclaim(w: &HostWorld, vm: &HostVm, ipa: Ipa) -> u64 {
    let pfn = pfn_at(vm, ipa);
    let slot = w.rmap.reclaim_frame(&w.vms, &w.machine, &w.machine, pfn);
    let slot = slot.expect("reclaimed");
    assert_eq!(vm.s2.lock().lookup(ipa), PageState::Swapped { slot });
    slot
}

/// Runs `f` on another thread at the next `op` of the store, and waits for it.
fn at_next(w: &Arc<HostWorld>, op: SwapOp, f: impl FnOnce(&HostWorld, u64) + Send + 'static) {
    let world = Arc::downgrade(w);
    w.machine.on_next(op, move |slot| {
        let w = world.upgrade().expect("world alive");
        thread::spawn(move || f(&w, slot)).join().expect("hook");
    });
}

/// The entry is released (and its slot freed) between the fault's lookup and its load.
/// Before the fix: "load of a free swap slot".
#[test]
fn release_during_swap_in_does_not_free_the_slot() {
    let w = world();
    let a = w.create_vm(&[(RAM, 4)]);
    a.write(&w.rmap, &w.machine, RAM, 0x1111).unwrap();
    let slot = reclaim(&w, &a, RAM);
    let a2 = a.clone();
    at_next(&w, SwapOp::Refs, move |w, s| {
        assert_eq!(s, slot);
        a2.release(&w.rmap, &w.machine, RAM).unwrap();
    });
    assert_eq!(a.read(&w.rmap, &w.machine, RAM).unwrap(), 0, "released");
    assert!(w.machine.swap_refs().is_empty(), "slot freed once");
    w.check().unwrap();
    w.destroy(&a);
    assert_eq!(w.machine.allocated(), 0);
}

/// The fault has read the slot when the entry is released, the guest writes the page again
/// and reclaim pushes that out: the freed slot number would come back for it. Before the fix
/// the fault's CAS saw the same `Swap { slot }` and installed the stale contents (a lost
/// write).
#[test]
fn slot_reused_at_the_same_page_is_not_installed_stale() {
    let w = world();
    let a = w.create_vm(&[(RAM, 4)]);
    a.write(&w.rmap, &w.machine, RAM, 0x1111).unwrap();
    let slot = reclaim(&w, &a, RAM);
    let a2 = a.clone();
    at_next(&w, SwapOp::Load, move |w, s| {
        assert_eq!(s, slot);
        a2.release(&w.rmap, &w.machine, RAM).unwrap();
        a2.write(&w.rmap, &w.machine, RAM, 0x2222).unwrap();
        reclaim(w, &a2, RAM);
    });
    assert_eq!(a.read(&w.rmap, &w.machine, RAM).unwrap(), 0x2222);
    w.check().unwrap();
    w.destroy(&a);
    assert!(w.machine.swap_refs().is_empty());
    assert_eq!(w.machine.allocated(), 0);
}

/// A slot two VMs share goes through the swap cache. While the fault reads it, both entries
/// are released and an unrelated VM's page is reclaimed: before the fix it got the same slot
/// number, the fault cached VM A's contents under it (homed in A's family), and VM B's own
/// swap-in then mapped A's page: a cross-VM leak.
#[test]
fn slot_reused_by_another_vm_is_not_cached_for_it() {
    let w = world();
    let a = w.create_vm(&[(RAM, 4)]);
    a.write(&w.rmap, &w.machine, RAM, 0xa5ec_2e7a).unwrap();
    let c = w.fork(&a).unwrap();
    let b = w.create_vm(&[(RAM, 4)]);
    b.write(&w.rmap, &w.machine, RAM, 0xb0b0).unwrap();
    let slot = reclaim(&w, &a, RAM);
    assert_eq!(w.machine.swap_refs()[&slot], 2, "A's and C's entries");
    let (a2, b2, c2) = (a.clone(), b.clone(), c.clone());
    at_next(&w, SwapOp::Load, move |w, s| {
        assert_eq!(s, slot);
        a2.release(&w.rmap, &w.machine, RAM).unwrap();
        c2.release(&w.rmap, &w.machine, RAM).unwrap();
        reclaim(w, &b2, RAM);
    });
    assert_eq!(a.read(&w.rmap, &w.machine, RAM).unwrap(), 0, "released");
    assert_eq!(
        b.read(&w.rmap, &w.machine, RAM).unwrap(),
        0xb0b0,
        "B's own page"
    );
    assert!(
        w.rmap.swap_cache_entries().is_empty(),
        "no entry refers to it"
    );
    let mappers = w.rmap.mappers(pfn_at(&b, RAM), &w.vms);
    assert_eq!(mappers.len(), 1);
    assert_eq!(
        (mappers[0].vm, mappers[0].ipa),
        (b.id, RAM),
        "found by rmap"
    );
    assert_eq!(c.read(&w.rmap, &w.machine, RAM).unwrap(), 0, "released");
    w.check().unwrap();
    for vm in [a, b, c] {
        w.destroy(&vm);
    }
    assert!(w.machine.swap_refs().is_empty());
    assert_eq!(w.machine.allocated(), 0);
}

/// A swap-in that fails (no frame) drops its own slot reference too.
#[test]
fn failed_swap_in_drops_its_reference() {
    let w = world();
    let a = w.create_vm(&[(RAM, 4)]);
    a.write(&w.rmap, &w.machine, RAM, 0x1111).unwrap();
    let slot = reclaim(&w, &a, RAM);
    let mut taken = Vec::new();
    while let Ok(pfn) = w.rmap.alloc_frame(&w.machine) {
        taken.push(pfn);
    }
    assert_eq!(a.read(&w.rmap, &w.machine, RAM), Err(Error::OutOfFrames));
    assert_eq!(w.machine.swap_refs()[&slot], 1, "only the entry's");
    taken
        .into_iter()
        .for_each(|pfn| w.rmap.put_frame(pfn, &w.machine));
    w.check().unwrap();
    assert_eq!(a.read(&w.rmap, &w.machine, RAM).unwrap(), 0x1111);
    w.destroy(&a);
    assert_eq!(w.machine.allocated(), 0);
}

/// The host store reuses freed slot numbers, lowest first, like the hypervisor's.
#[test]
fn host_store_reuses_the_lowest_free_slot() {
    let w = world();
    let a = w.create_vm(&[(RAM, 4)]);
    let ipas = [RAM, RAM + 0x1000, RAM + 0x2000];
    for (i, &ipa) in ipas.iter().enumerate() {
        a.write(&w.rmap, &w.machine, ipa, i as u64 + 1).unwrap();
    }
    let slots: Vec<u64> = ipas.iter().map(|&ipa| reclaim(&w, &a, ipa)).collect();
    a.release(&w.rmap, &w.machine, ipas[1]).unwrap();
    a.release(&w.rmap, &w.machine, ipas[0]).unwrap();
    a.write(&w.rmap, &w.machine, RAM + 0x3000, 9).unwrap();
    assert_eq!(reclaim(&w, &a, RAM + 0x3000), slots[0]);
    w.check().unwrap();
    w.destroy(&a);
}
