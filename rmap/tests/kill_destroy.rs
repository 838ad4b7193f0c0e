//! Teardown's `zap` when `clear_leaf` fails (mutants of `rmap/src/destroy.rs`'s failure arms,
//! see docs/TESTING.md): a leaf that changed under the walk (the hardware set its access flag)
//! is looked at again and freed; a leaf that cannot be cleared (a block across the region's
//! end with no table page to split it) is skipped, its frame left referenced rather than freed
//! while mapped, and every other leaf is still freed. The host tables never fail on their own;
//! `HostStage2::inject_clear_fault` makes them.

use rmap::host::{ClearFault, HostWorld};
use rmap::Ipa;
use rmap::{Stage2, Stage2Locked};

const RAM: Ipa = Ipa::new(0x4000_0000);
const PAGES: u64 = 4;

/// A world with one VM whose `PAGES` pages are all written (one frame each).
fn world() -> (HostWorld, std::sync::Arc<rmap::host::HostVm>) {
    let w = HostWorld::new(64, 4, 16, 32);
    let vm = w.create_vm(&[(RAM, PAGES)]);
    for i in 0..PAGES {
        vm.write(&w.rmap, &w.machine, RAM + i * 0x1000, i + 1)
            .unwrap();
    }
    assert_eq!(w.machine.allocated(), PAGES as usize);
    (w, vm)
}

#[test]
fn a_leaf_changed_under_the_zap_is_looked_at_again_and_freed() {
    for page in 0..PAGES {
        let (w, vm) = world();
        vm.s2
            .inject_clear_fault(RAM + page * 0x1000, ClearFault::Changed);
        w.destroy(&vm);
        assert_eq!(w.machine.allocated(), 0, "page {page}: every frame freed");
        w.check().unwrap();
    }
}

#[test]
fn a_leaf_that_cannot_be_cleared_is_skipped_and_the_rest_freed() {
    for page in 0..PAGES {
        let (w, vm) = world();
        let ipa = RAM + page * 0x1000;
        vm.s2.inject_clear_fault(ipa, ClearFault::Stuck);
        let pfn = vm.s2.lock().lookup(ipa).pfn().unwrap();
        w.destroy(&vm);
        // Only the stuck leaf's frame stays: still referenced, never freed while mapped.
        assert_eq!(
            w.machine.allocated(),
            1,
            "page {page}: only the stuck frame left"
        );
        assert_eq!(w.rmap.frames().frame(pfn).mapcount(), 1, "page {page}");
    }
}
