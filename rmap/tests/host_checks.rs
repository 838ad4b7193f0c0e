//! The host backend's own checks can fail (each one the stress tests rely on, shown failing
//! on a small deterministic case and clean once the mistake is undone): a translation left
//! in the TLB model at a quiescent point, a mapped frame on the allocator's free list, and a
//! frame copied or filled while a vCPU's TLB can still reach it.

use rmap::host::{page_ipa, HostWorld};
use rmap::Ipa;

const RAM: Ipa = Ipa::new(0x4000_0000);
const REGIONS: [(Ipa, u64); 1] = [(RAM, 24)];

/// The quiescent TLB check can fail: a MEM_RELEASE whose invalidation is deferred and never
/// flushed leaves the VM's TLB holding a translation its stage 2 no longer has. The frame is
/// not freed (a snapshot still maps it), so only this check sees it; after the flush the
/// same world is clean.
#[test]
fn a_translation_left_in_the_tlb_is_caught_at_a_quiescent_point() {
    use rmap::{PageState, Stage2, Stage2Locked};
    let w = HostWorld::new(64, 2, 8, 16);
    let vm = w.create_vm(&REGIONS);
    let ipa = page_ipa(RAM, 3);
    vm.write(&w.rmap, &w.machine, ipa, 7).unwrap();
    let snap = w.fork(&vm).unwrap();
    assert_eq!(vm.read(&w.rmap, &w.machine, ipa), Ok(7)); // cached in the TLB model
    w.check().unwrap();
    let entry = vm.s2.lock().lookup(ipa);
    let PageState::Mapped { pfn, .. } = entry else {
        panic!("{entry:?}");
    };
    vm.s2
        .lock()
        .compare_exchange_deferred(ipa, entry, PageState::Invalid)
        .unwrap();
    w.rmap.remove_rmap(pfn, &w.machine);
    let err = w.check().expect_err("stale translation");
    assert!(err.contains("TLB caches"), "{err}");
    vm.s2.flush_deferred();
    w.check().unwrap();
    w.destroy(&vm);
    w.destroy(&snap);
    w.check().unwrap();
    assert_eq!(w.machine.allocated(), 0);
}

/// The free-list check can fail: a frame handed back to the allocator while a leaf still maps
/// it (and rmap still counts it) is reported even when its counts agree with the leaves and
/// no TLB caches it.
#[test]
fn a_mapped_frame_on_the_free_list_is_caught() {
    use rmap::{FrameAllocator, Stage2, Stage2Locked};
    let w = HostWorld::new(64, 2, 8, 16);
    let vm = w.create_vm(&REGIONS);
    let ipa = page_ipa(RAM, 5);
    vm.write(&w.rmap, &w.machine, ipa, 9).unwrap();
    vm.s2.flush_deferred(); // the TLB model forgets it: only the free list can tell
    let pfn = vm.s2.lock().lookup(ipa).pfn().unwrap();
    w.machine.free(pfn);
    let err = w.check().expect_err("a held frame on the free list");
    assert!(err.contains("on the free list"), "{err}");
    assert_eq!(w.machine.alloc(), Some(pfn), "the allocator is a stack");
    w.check().unwrap();
    w.destroy(&vm);
    assert_eq!(w.machine.allocated(), 0);
}

/// The TLB model's copy checks can fail: copying a frame a vCPU can still write through its
/// TLB (a migration that copies before the flush), and filling one a vCPU can still reach
/// (a frame mapped before it was filled), are each recorded.
#[test]
fn copying_or_filling_a_frame_a_tlb_reaches_is_caught() {
    use rmap::{FrameAllocator, Stage2, Stage2Locked};
    let w = HostWorld::new(64, 2, 8, 16);
    let vm = w.create_vm(&REGIONS);
    let ipa = page_ipa(RAM, 2);
    vm.write(&w.rmap, &w.machine, ipa, 3).unwrap(); // cached writable
    let pfn = vm.s2.lock().lookup(ipa).pfn().unwrap();
    let spare = w.rmap.alloc_frame(&w.machine).unwrap();
    w.machine.copy(spare, pfn);
    let failures = w.hw().take_failures();
    assert!(
        failures.len() == 1 && failures[0].contains("copied while"),
        "{failures:?}"
    );
    w.machine.zero(pfn);
    let failures = w.hw().take_failures();
    assert!(
        failures.len() == 1 && failures[0].contains("filled while"),
        "{failures:?}"
    );
    vm.s2.flush_deferred();
    w.machine.copy(spare, pfn);
    w.machine.zero(pfn);
    assert!(w.hw().take_failures().is_empty(), "clean once flushed");
    w.rmap.put_frame(spare, &w.machine);
    w.destroy(&vm);
    w.check().unwrap();
    assert_eq!(w.machine.allocated(), 0);
}

/// The transition check can fail: every change of a host stage-2 leaf is checked against
/// `PageState`'s transition table. A mapping turned straight into a swap entry (reclaim
/// skipping the migration entry a fault waits on) and a read-only page remapped writable
/// under another frame are refused; the rows they skip are accepted.
#[test]
fn a_change_outside_the_transition_table_is_caught() {
    use rmap::{PageState, Stage2, Stage2Locked};
    let w = HostWorld::new(64, 2, 8, 16);
    let vm = w.create_vm(&REGIONS);
    let ipa = page_ipa(RAM, 1);
    vm.write(&w.rmap, &w.machine, ipa, 7).unwrap();
    let mapped = vm.s2.lock().lookup(ipa);
    let PageState::Mapped { pfn, writable } = mapped else {
        panic!("{mapped:?}");
    };
    let swapped = PageState::Swapped { slot: 1 };
    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = vm.s2.lock().compare_exchange(ipa, mapped, swapped);
    }));
    let message = refused.expect_err("Mapped -> Swapped accepted");
    let text = message.downcast_ref::<String>().expect("a formatted panic");
    assert!(text.contains("not in the table"), "{text}");
    // The check runs before any change: the table still holds the mapping, and the rows
    // through a migration entry are accepted.
    let migrating = PageState::Migrating { pfn, writable };
    let mut s2 = vm.s2.lock();
    assert_eq!(s2.lookup(ipa), mapped);
    assert_eq!(s2.compare_exchange(ipa, mapped, migrating), Ok(()));
    assert_eq!(s2.compare_exchange(ipa, migrating, mapped), Ok(()));
}
