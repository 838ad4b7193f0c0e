//! The checks of `model.rs` after each step: the oracle's reading of the table memory must be
//! the model (with table-page accounting and statistics), and every live entry a step changed
//! must have been invalidated.

use super::{World, PAGE};
use crate::common::{self, PageState, RawLeaf};
use stage2::*;
use std::collections::BTreeMap;

impl World<'_> {
    /// The oracle's view of the window must be the model, and nothing may be mapped outside it.
    pub fn check(&self) -> BTreeMap<u64, (RawLeaf, PageState)> {
        let oracle = self.oracle();
        let (pages, tables) = oracle.pages();
        assert_eq!(
            tables,
            self.mem.allocated_pages(),
            "table pages leaked or lost"
        );
        let stats = self.table.stats();
        assert_eq!(stats.table_pages as usize, tables);
        assert_eq!(pages, self.model, "tables disagree with the model");
        let (leaves, _) = oracle.dump();
        let count = |level: u8, valid: bool| {
            leaves
                .iter()
                .filter(|l| l.level == level && (l.raw & 1 == 1) == valid)
                .count() as u64
        };
        assert_eq!(stats.mapped_pages, count(3, true));
        assert_eq!(stats.mapped_blocks_2m, count(2, true));
        assert_eq!(stats.mapped_blocks_1g, count(1, true));
        assert_eq!(stats.software_entries, count(3, false));
        // Spot-check translate() on a few pages against the dump.
        for (&ipa, st) in pages.iter().step_by(97) {
            assert_eq!(oracle.translate(ipa), Some(*st));
        }
        let mut by_page = BTreeMap::new();
        for l in leaves {
            for p in
                (l.ipa..l.ipa + (1u64 << (12 + 9 * (3 - l.level as u32)))).step_by(PAGE as usize)
            {
                by_page.insert(p, (l, common::decode_page(l, p)));
            }
        }
        by_page
    }

    /// Every page whose live (valid) entry changed must have been invalidated: an IPA
    /// invalidation of this VMID covering it, or a VMID-wide one.
    pub fn check_invalidations(
        &self,
        before: &BTreeMap<u64, (RawLeaf, PageState)>,
        after: &BTreeMap<u64, (RawLeaf, PageState)>,
        calls: &[TlbCall],
        af_clear_ok: bool,
    ) {
        let vmid = self.table.vmid();
        for c in calls {
            match c {
                TlbCall::Ipa { vmid: v, .. } | TlbCall::Vmid { vmid: v } => assert_eq!(*v, vmid),
                TlbCall::Icache { .. } => {}
                TlbCall::All => panic!("no operation needs invalidate_all"),
                // Cleaning to the PoC is owed once per frame by whoever wrote it, never by a
                // mapping operation (publish_frames).
                TlbCall::CleanPoc { .. } => panic!("a stage-2 operation cleaned to the PoC"),
            }
        }
        let whole = calls.iter().any(|c| matches!(c, TlbCall::Vmid { .. }));
        for (&p, (old, _)) in before {
            if old.raw & 1 == 0 {
                continue;
            }
            let unchanged = match after.get(&p) {
                Some((new, _)) if new.level == old.level => {
                    let diff = old.raw ^ new.raw;
                    let ignorable = (0xF << 55)
                        | if new.raw & (1 << 10) != 0 || af_clear_ok {
                            1 << 10
                        } else {
                            0
                        };
                    diff & !ignorable == 0
                }
                _ => false,
            };
            if unchanged || whole {
                continue;
            }
            let covered = calls.iter().any(|c| match *c {
                TlbCall::Ipa { ipa, level, .. } => {
                    let size = 1u64 << (12 + 9 * (3 - level as u32));
                    ipa & !(size - 1) <= p && p < (ipa & !(size - 1)) + size
                }
                _ => false,
            });
            assert!(covered, "live entry for IPA {p:#x} changed without invalidation: {old:x?} -> {:x?}; calls {calls:?}", after.get(&p));
        }
    }
}
