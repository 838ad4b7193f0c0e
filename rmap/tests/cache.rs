//! Cache maintenance to the point of coherency (issue 14, part 1): every frame the hypervisor
//! writes (demand-zero, CoW copy, swap-in, migration copy, first-touch block) is cleaned to the
//! PoC before a guest can map it, once per frame written and not per mapping, unless the CPU
//! has FEAT_S2FWB. The host cache model (`rmap::host`, module `cache`) fails a world whose
//! stage 2 installs a frame written and not cleaned; these tests prove it notices a clean
//! missing from each write path.

use rmap::host::{page_ipa, HostVm, HostWorld, BLOCK_PAGES};
use rmap::Ipa;
use rmap::{Pfn, Stage2, Stage2Locked};
use std::sync::Arc;

const RAM: Ipa = Ipa::new(0x4000_0000);
const PAGES: u64 = 1024;

fn world(fwb: bool) -> HostWorld {
    let w = HostWorld::new(2048, 2, 64, 256);
    w.hw().set_fwb(fwb);
    w
}

fn pfn_at(vm: &HostVm, ipa: Ipa) -> Pfn {
    vm.s2.lock().lookup(ipa).pfn().expect("mapped")
}

/// A VM whose first page was written (one demand-zero fault).
fn vm_with_page(w: &HostWorld) -> Arc<HostVm> {
    let vm = w.create_vm(&[(RAM, PAGES)]);
    vm.write(&w.rmap, &w.machine, RAM, 0x1234).unwrap();
    vm
}

/// The failures recorded since the last call: exactly one, about a frame not cleaned.
fn one_unclean_failure(w: &HostWorld, what: &str) {
    let failures = w.hw().take_failures();
    assert!(
        failures.len() == 1 && failures[0].contains("point of coherency"),
        "{what}: {failures:?}"
    );
}

/// Each write path cleans the frame it wrote, once; mapping a frame again (fork, a read of a
/// shared frame) cleans nothing more.
#[test]
fn each_frame_written_is_cleaned_once() {
    let w = world(false);
    let a = vm_with_page(&w);
    assert_eq!(w.hw().frames_cleaned(), 1, "demand-zero");
    let b = w.fork(&a).unwrap();
    assert_eq!(b.read(&w.rmap, &w.machine, RAM).unwrap(), 0x1234);
    assert_eq!(
        w.hw().frames_cleaned(),
        1,
        "fork and a shared read write nothing"
    );
    b.write(&w.rmap, &w.machine, RAM, 0x5678).unwrap();
    assert_eq!(w.hw().frames_cleaned(), 2, "CoW copy");
    let pfn = pfn_at(&b, RAM);
    w.rmap
        .reclaim_frame(&w.vms, &w.machine, &w.machine, pfn)
        .unwrap();
    assert_eq!(b.read(&w.rmap, &w.machine, RAM).unwrap(), 0x5678);
    assert_eq!(w.hw().frames_cleaned(), 3, "swap-in");
    w.rmap
        .migrate_frame(&w.vms, &w.machine, pfn_at(&a, RAM))
        .unwrap();
    assert_eq!(w.hw().frames_cleaned(), 4, "migration copy");
    assert!(w.fault_block(&a, page_ipa(RAM, BLOCK_PAGES)));
    assert_eq!(w.hw().frames_cleaned(), 4 + BLOCK_PAGES, "a block");
    assert!(w.hw().unclean_frames().is_empty());
    w.check().unwrap();
}

/// With FEAT_S2FWB nothing is cleaned, and nothing is owed.
#[test]
fn with_fwb_nothing_is_cleaned() {
    let w = world(true);
    let a = vm_with_page(&w);
    let b = w.fork(&a).unwrap();
    b.write(&w.rmap, &w.machine, RAM, 0x5678).unwrap();
    assert!(w.fault_block(&a, page_ipa(RAM, BLOCK_PAGES)));
    assert_eq!(w.hw().frames_cleaned(), 0);
    assert!(!w.hw().unclean_frames().is_empty());
    w.check().unwrap();
}

#[test]
fn a_missing_clean_after_zeroing_is_caught() {
    let w = world(false);
    w.hw().skip_next_cleans(1);
    let a = vm_with_page(&w);
    assert_eq!(w.hw().unclean_frames(), vec![pfn_at(&a, RAM)]);
    one_unclean_failure(&w, "demand-zero");
    w.hw().skip_next_cleans(1);
    assert!(w.fault_block(&a, page_ipa(RAM, BLOCK_PAGES)));
    one_unclean_failure(&w, "block");
}

#[test]
fn a_missing_clean_after_a_cow_copy_is_caught() {
    let w = world(false);
    let a = vm_with_page(&w);
    let b = w.fork(&a).unwrap();
    w.hw().skip_next_cleans(1);
    b.write(&w.rmap, &w.machine, RAM, 0x5678).unwrap();
    one_unclean_failure(&w, "CoW");
}

#[test]
fn a_missing_clean_after_a_swap_in_is_caught() {
    let w = world(false);
    let a = vm_with_page(&w);
    let pfn = pfn_at(&a, RAM);
    w.rmap
        .reclaim_frame(&w.vms, &w.machine, &w.machine, pfn)
        .unwrap();
    w.hw().skip_next_cleans(1);
    assert_eq!(a.read(&w.rmap, &w.machine, RAM).unwrap(), 0x1234);
    one_unclean_failure(&w, "swap-in");
}

#[test]
fn a_missing_clean_after_a_migration_copy_is_caught() {
    let w = world(false);
    let a = vm_with_page(&w);
    w.hw().skip_next_cleans(1);
    let new = w
        .rmap
        .migrate_frame(&w.vms, &w.machine, pfn_at(&a, RAM))
        .unwrap();
    assert_eq!(pfn_at(&a, RAM), new);
    one_unclean_failure(&w, "migration");
    // The check a world runs at the end reports it too.
    w.hw().skip_next_cleans(1);
    w.rmap.migrate_frame(&w.vms, &w.machine, new).unwrap();
    assert!(w.check().unwrap_err().contains("point of coherency"));
}
