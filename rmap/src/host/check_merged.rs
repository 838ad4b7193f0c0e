//! The merged-frame part of [`HostWorld::check`].

use super::HostWorld;
use crate::backend::PageState;
use crate::Pfn;
use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

impl HostWorld {
    /// Every merged frame: no writable mapping; its items have distinct keys, and unless the
    /// node says its counts are inexact, each item counts at least one mapping and the
    /// counts add up to the mapcount; a walk of it finds exactly its leaves, each once; and
    /// the stable-node and item pools hold exactly the merged frames' nodes and items.
    pub(super) fn check_merged(&self, writable: &BTreeSet<Pfn>) -> Result<(), String> {
        let (mut nodes, mut items) = (0, 0);
        for (pfn, frame) in self.rmap.frames().iter() {
            if !frame.is_merged() {
                continue;
            }
            nodes += 1;
            if writable.contains(&pfn) {
                return Err(format!("merged frame {pfn:#x} is mapped writable"));
            }
            let info = self.rmap.stable_info(pfn);
            let info = info.ok_or(format!("merged frame {pfn:#x} has no stable node"))?;
            items += info.items.len();
            let keys: BTreeSet<_> = info.items.iter().map(|i| (i.root.raw(), i.index)).collect();
            if keys.len() != info.items.len() {
                return Err(format!("frame {pfn:#x}: duplicate items {info:?}"));
            }
            let sum: u32 = info.items.iter().map(|i| i.maps).sum();
            let empty = info.items.iter().any(|i| i.maps == 0);
            if !info.dirty && (sum != frame.mapcount() || empty) {
                return Err(format!(
                    "frame {pfn:#x}: mapcount {} but items {info:?}",
                    frame.mapcount()
                ));
            }
            self.check_merged_walk(pfn)?;
        }
        if self.rmap.live_merge_objects() != (nodes, items) {
            return Err(format!(
                "{:?} live (stable nodes, items), merged frames hold ({nodes}, {items})",
                self.rmap.live_merge_objects()
            ));
        }
        Ok(())
    }

    /// A walk of merged `pfn` finds every leaf that maps it, once.
    fn check_merged_walk(&self, pfn: Pfn) -> Result<(), String> {
        let mut leaves = Vec::new();
        for vm in self.vms.all() {
            for (ipa, entry) in vm.s2.entries() {
                if entry.pfn() == Some(pfn) {
                    leaves.push((vm.id, ipa));
                }
            }
        }
        let mut walked: Vec<_> = self
            .rmap
            .mappers(pfn, &self.vms)
            .iter()
            .filter(|m| matches!(m.entry, PageState::Mapped { .. }))
            .map(|m| (m.vm, m.ipa))
            .collect();
        leaves.sort();
        walked.sort();
        if leaves != walked {
            return Err(format!(
                "merged frame {pfn:#x}: leaves {leaves:?}, walk finds {walked:?}"
            ));
        }
        Ok(())
    }
}
