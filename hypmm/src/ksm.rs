//! The same-page merging scanner, after Linux's ksmd (`mm/ksm.c`:
//! `ksm_do_scan`, `cmp_and_merge_page`, the stable and unstable trees). It
//! visits guest pages, VM by VM, and hands pairs that look identical to the
//! reverse map's [`Rmap::merge`], which write-protects both, compares them
//! byte for byte and only then maps them to one read-only frame. The trees
//! here are hints; rmap's comparison is the truth, so a stale or colliding
//! entry costs a failed merge, never a wrong one.
//!
//! - **Checksum filter.** Each page's checksum ([`Machine::frame_hash`]) is
//!   kept from its previous visit; a page is a merge candidate only if it did
//!   not change since (Linux's `oldchecksum`): pages still being written would
//!   be merged only to be copied back at their next write.
//! - **Stable tree.** Merged frames by (trust group, checksum), each with a
//!   page that mapped it when it was made (`rmap`'s stable nodes hold the
//!   reverse map; this only finds them by content). A candidate that hits
//!   joins that frame.
//! - **Unstable tree.** Candidates of this pass by (trust group, checksum);
//!   a second page with the same key is merged with the first, and the new
//!   merged frame enters the stable tree. Rebuilt every pass, as Linux's is,
//!   since its pages stay writable and can change under it.
//! - **Trust groups.** Keys include the VM's group, and rmap refuses a merge
//!   across groups, so nothing merges across them.
//! - **Zero pages.** A candidate whose checksum is the zero page's goes to
//!   [`Rmap::merge_zero`] instead of the trees (Linux's `use_zero_pages`):
//!   rmap checks it is all zero after write-protecting it and maps the shared
//!   zero page there, freeing the frame. In any trust group: the zero page
//!   holds nothing of anyone's, so sharing it reveals nothing.
//!
//! Locks: a visit takes the VM's stage-2 lock (level 4) briefly to read the
//! entry, then none while it hashes the frame; `Rmap::merge` takes its own.

use crate::machine::Machine;
use crate::vm::MemCtx;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::ops::Range;
use rmap::{
    Ipa, MergeError, MergePage, PageState, Pfn, Stage2, Stage2Locked, SwapStore, VmId, VmSet,
};

/// A VM to scan: its id, trust group and RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanVm {
    /// The VM.
    pub id: VmId,
    /// Its trust group: pages merge only within one.
    pub group: u32,
    /// Its guest RAM.
    pub ram: Range<Ipa>,
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassStats {
    /// Mapped pages visited.
    pub scanned: u64,
    /// Pages merged into another (each saves a frame once its old one is free).
    pub merged: u64,
    /// Of those, pages that joined an existing merged frame.
    pub stable_hits: u64,
    /// Pages seen for the first time or changed since the last visit.
    pub changing: u64,
    /// Merges rmap refused (contents differed after write-protect, a frame busy).
    pub refused: u64,
    /// Mappings of all-zero pages that now map the shared zero page (each
    /// frees its frame with the frame's last mapping).
    pub zero: u64,
}

impl core::ops::AddAssign for PassStats {
    fn add_assign(&mut self, o: PassStats) {
        self.scanned += o.scanned;
        self.merged += o.merged;
        self.stable_hits += o.stable_hits;
        self.changing += o.changing;
        self.refused += o.refused;
        self.zero += o.zero;
    }
}

/// Tree key: trust group and checksum.
type Key = (u32, u64);

/// The scanner's memory between visits: the checksums, both trees, and
/// where the current round is.
#[derive(Default)]
pub struct Scanner {
    /// Per VM, each page's checksum at its previous visit (0: never visited;
    /// a checksum of 0 is stored as 1).
    seen: BTreeMap<u32, Vec<u64>>,
    /// Merged frames by key, each with a page mapping it when it was made.
    stable: BTreeMap<Key, MergePage>,
    /// This round's candidates by key.
    unstable: BTreeMap<Key, MergePage>,
    /// The next page to visit: VM id and page index.
    cursor: (u32, u64),
    /// Rounds (passes over every VM) completed.
    rounds: u64,
    /// The zero page's checksum (as a page's is kept: at least 1), read at
    /// the first visit: the machine's checksum is the scanner's only view
    /// of contents.
    zero_sum: Option<u64>,
}

/// One call's context.
struct Pass<'a, 'c, M, W, S> {
    cx: &'a MemCtx<'c, M, W>,
    set: &'a S,
    stats: PassStats,
}

impl Scanner {
    /// A scanner that has seen nothing.
    pub fn new() -> Self {
        Scanner::default()
    }

    /// One whole round over every page of `vms`, from the first VM (VMs
    /// gone since the last round are forgotten). A page must be seen
    /// unchanged on two visits before it is merged, so the first round over
    /// a VM only records its checksums.
    pub fn pass<M, W, S>(&mut self, cx: &MemCtx<'_, M, W>, set: &S, vms: &[ScanVm]) -> PassStats
    where
        M: Machine,
        W: SwapStore,
        S: VmSet,
    {
        self.restart(vms);
        let round = self.rounds;
        let mut stats = PassStats::default();
        while self.rounds == round && !vms.is_empty() {
            stats += self.scan(cx, set, vms, u64::MAX);
        }
        stats
    }

    /// Visits up to `budget` pages from where the last call stopped (the
    /// background scanner's step); a round ends after the last page of the
    /// VM with the highest id, and the step with it; the next round begins
    /// at the lowest.
    pub fn scan<M, W, S>(
        &mut self,
        cx: &MemCtx<'_, M, W>,
        set: &S,
        vms: &[ScanVm],
        budget: u64,
    ) -> PassStats
    where
        M: Machine,
        W: SwapStore,
        S: VmSet,
    {
        let mut pass = Pass {
            cx,
            set,
            stats: PassStats::default(),
        };
        let mut left = budget;
        while left > 0 {
            let next = vms
                .iter()
                .filter(|v| v.id.0 >= self.cursor.0)
                .min_by_key(|v| v.id.0);
            let Some(vm) = next else {
                self.end_round(vms);
                return pass.stats;
            };
            if vm.id.0 != self.cursor.0 {
                self.cursor = (vm.id.0, 0);
            }
            left -= self.visit_vm(&mut pass, vm, left);
        }
        pass.stats
    }

    /// Visits pages of `vm` from the cursor, at most `budget`; returns how many.
    fn visit_vm<M, W, S>(
        &mut self,
        pass: &mut Pass<'_, '_, M, W, S>,
        vm: &ScanVm,
        budget: u64,
    ) -> u64
    where
        M: Machine,
        W: SwapStore,
        S: VmSet,
    {
        let pages = (vm.ram.end - vm.ram.start) / crate::PAGE_SIZE;
        let seen = self.seen.entry(vm.id.0).or_default();
        seen.resize(pages as usize, 0);
        let from = self.cursor.1;
        let to = pages.min(from.saturating_add(budget));
        let zero = *self.zero_sum.get_or_insert_with(|| pass.zero_sum());
        for i in from..to {
            let ipa = vm.ram.start + i * crate::PAGE_SIZE;
            match pass.candidate(vm, ipa, &mut seen[i as usize]) {
                // A page with the zero page's checksum but other bytes (a
                // collision) may still match another page.
                Some((page, key)) if key.1 == zero && pass.merge_zero(page) => {}
                Some((page, key)) => pass.offer(&mut self.stable, &mut self.unstable, page, key),
                None => {}
            }
        }
        self.cursor = if to == pages {
            (vm.id.0 + 1, 0)
        } else {
            (vm.id.0, to)
        };
        // An empty VM still costs a visit, so a round always advances.
        (to - from).max(1)
    }

    /// Ends the round: the unstable tree is dropped (its pages stay
    /// writable and may have changed), VMs gone are forgotten.
    fn end_round(&mut self, vms: &[ScanVm]) {
        self.rounds += 1;
        self.restart(vms);
    }

    /// Starts a round from the first VM.
    fn restart(&mut self, vms: &[ScanVm]) {
        self.unstable.clear();
        self.cursor = (0, 0);
        self.seen.retain(|id, _| vms.iter().any(|v| v.id.0 == *id));
        let live = |p: &MergePage| vms.iter().any(|v| v.id == p.vm);
        self.stable.retain(|_, p| live(p));
    }

    /// Merged frames the scanner knows by content.
    pub fn stable_entries(&self) -> usize {
        self.stable.len()
    }

    /// Rounds completed.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }
}

impl<M: Machine, W: SwapStore, S: VmSet> Pass<'_, '_, M, W, S> {
    /// The page at `ipa` of `vm` and its key, if it is mapped, not merged
    /// yet, and its checksum is what it was at the previous visit; records
    /// the new checksum.
    fn candidate(&mut self, vm: &ScanVm, ipa: Ipa, seen: &mut u64) -> Option<(MergePage, Key)> {
        let pfn = self.mapped(vm.id, ipa)?;
        self.stats.scanned += 1;
        if self
            .cx
            .rmap
            .frames()
            .get(pfn)
            .is_some_and(|f| f.is_merged())
        {
            return None;
        }
        // SAFETY: `pfn` is a RAM frame a VM maps (it stays RAM: frames are
        // never returned to anything but the frame allocator); a guest write
        // racing the read only makes the checksum stale, which rmap's final
        // comparison after write-protecting catches.
        let sum = unsafe { self.cx.machine.frame_hash(pfn.pa()) }.max(1);
        if core::mem::replace(seen, sum) != sum {
            self.stats.changing += 1;
            return None;
        }
        let page = MergePage {
            vm: vm.id,
            ipa,
            pfn,
            group: vm.group,
        };
        Some((page, (vm.group, sum)))
    }

    /// The zero page's checksum, kept as a page's is (at least 1).
    fn zero_sum(&self) -> u64 {
        let zero = self.cx.machine.zero_page();
        // SAFETY: the zero page is a RAM frame nobody writes.
        unsafe { self.cx.machine.frame_hash(zero) }.max(1)
    }

    /// Maps the all-zero-looking `page` (and its frame's other mappings) to
    /// the shared zero page; rmap checks the contents. False if they are not
    /// all zero (the page is then offered to the trees).
    fn merge_zero(&mut self, page: MergePage) -> bool {
        match self.cx.rmap.merge_zero(self.set, &self.cx.frames(), page) {
            Ok(n) => {
                self.stats.zero += u64::from(n);
                true
            }
            Err(MergeError::Differ) => false,
            Err(_) => {
                self.stats.refused += 1;
                true
            }
        }
    }

    /// The frame mapping `ipa` in VM `id` now, if any (read while the VM is
    /// known live: rmap's merge checks it still is).
    fn mapped(&self, id: VmId, ipa: Ipa) -> Option<Pfn> {
        let state = self.set.with_vm(id, |vm| vm.lock().lookup(ipa))?;
        match state {
            PageState::Mapped { pfn, .. } => Some(pfn),
            _ => None,
        }
    }

    /// Offers a candidate to the stable tree, then to the unstable one.
    fn offer(
        &mut self,
        stable: &mut BTreeMap<Key, MergePage>,
        unstable: &mut BTreeMap<Key, MergePage>,
        page: MergePage,
        key: Key,
    ) {
        if let Some(&known) = stable.get(&key) {
            match self.merge(known, page) {
                Ok(_) => {
                    self.stats.stable_hits += 1;
                    return;
                }
                // The frame is gone or holds other bytes (a collision): forget it.
                Err(MergeError::Differ | MergeError::NotMapped | MergeError::Same) => {
                    stable.remove(&key);
                }
                Err(_) => return,
            }
        }
        match unstable.remove(&key) {
            None => {
                unstable.insert(key, page);
            }
            Some(first) => match self.merge(first, page) {
                Ok(merged) => {
                    stable.insert(
                        key,
                        MergePage {
                            pfn: merged,
                            ..page
                        },
                    );
                }
                // Keep the newer page as the one to match.
                Err(_) => {
                    unstable.insert(key, page);
                }
            },
        }
    }

    /// rmap's merge; the merged frame.
    fn merge(&mut self, a: MergePage, b: MergePage) -> Result<Pfn, MergeError> {
        match self.cx.rmap.merge(self.set, &self.cx.frames(), a, b) {
            Ok(pfn) => {
                self.stats.merged += 1;
                Ok(pfn)
            }
            Err(e) => {
                self.stats.refused += 1;
                Err(e)
            }
        }
    }
}
