//! The stress test's merger thread (issue 16).

use super::slot::{Counters, Rng, Slot};
use super::{all_pages, pick, BLOCK, OPS};
use rmap::host::{page_ipa, HostWorld, BLOCK_PAGES};
use rmap::{MergeError, MergePage, PageState, Stage2};
use std::sync::atomic::Ordering;

/// Same-page merging under the vCPUs: two pages of two live VMs (or one), block pages (the
/// untouched ones are all zero, so alike) or any of the pages the vCPUs use. Every refusal
/// is legitimate while the vCPUs run; a merge must never lose or leak a value (the round's
/// content checks).
pub fn merger(w: &HostWorld, slots: &[&Slot], seed: u64, c: &Counters) {
    let mut rng = Rng::new(seed);
    let pages = all_pages();
    for _ in 0..OPS * usize::from(!slots.is_empty()) {
        let side = |rng: &mut Rng| {
            let slot = pick(rng, slots);
            let ipa = if rng.below(2) == 0 {
                page_ipa(BLOCK, rng.below(BLOCK_PAGES as usize) as u64)
            } else {
                pick(rng, &pages)
            };
            // As hyp's scanner: the frame mapped there now, read where the tables are
            // known live (a VM destroyed under its vCPUs has none).
            match slot.vm.s2.lock().live_lookup(ipa) {
                Some(PageState::Mapped { pfn, .. }) => Some(MergePage {
                    vm: slot.vm.id,
                    ipa,
                    pfn,
                    group: 0,
                }),
                _ => None,
            }
        };
        let (Some(a), Some(b)) = (side(&mut rng), side(&mut rng)) else {
            continue;
        };
        match w.rmap.merge(&w.vms, &w.machine, a, b) {
            Ok(_) => c.merged.fetch_add(1, Ordering::Relaxed),
            Err(MergeError::Differ) => c.merge_differ.fetch_add(1, Ordering::Relaxed),
            Err(MergeError::OtherGroup) => panic!("one group"),
            Err(_) => 0,
        };
    }
}
