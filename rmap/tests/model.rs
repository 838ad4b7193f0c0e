//! Model-based test: random sequences of create VM / write / read (fault back in) / release
//! (MEM_RELEASE) / fork / destroy / migrate a frame / reclaim a frame against a plain reference model of what each
//! VM should read at each page. After every step: every VM reads what it last wrote,
//! mapcounts equal the leaves that exist, nothing leaks, and anon_vmas stay within 2x regions
//! for as long as no VM with live descendants was destroyed (see `HostWorld::check_anon_bound`:
//! such a destroy leaves one-child anon_vmas that only a later fork reuses, in Linux too).
//! Same-page merging joins in: merges of pages as they are (mostly refused as different)
//! and of pages just written alike (merged, or joining a merged frame); a later write is
//! the unmerge, and the per-step read of every page checks isolation (a write through one
//! mapper never shows through another); `HostWorld::check` checks the merged frames' items
//! and counts, and the end no stable node or item left. Merging into the shared zero page
//! joins too: a page as it is (refused unless all zero) or first released and read back as
//! a demand-zero frame; it then maps `ZeroPage` for every mapper of its frame, reads 0, and a
//! later write maps a fresh frame of its own.
//! The host stage 2 hurts (`rmap::host::HostHw`): a fourth region takes 2 MiB first-touch
//! blocks (split before one page changes, taking a table page), the table-page budget is
//! sometimes cut to a few pages or none (faults and forks may then fail, which the model
//! allows; VMs are destroyed under it), and every access goes through the TLB model, whose
//! failures `HostWorld::check` reports.

use proptest::prelude::*;
use rmap::host::{page_ipa, HostVm, HostWorld, BLOCK_PAGES};
use rmap::{Error, MergeError, MergePage, PageState, Skip, Stage2, Stage2Locked, VmId};
use rmap::{Ipa, Pfn};
use std::collections::BTreeMap;
use std::sync::Arc;

const RAM: Ipa = Ipa::new(0x4000_0000);
/// Where a VM's 2 MiB first-touch block goes (a region of exactly one block).
const BLOCK: Ipa = RAM.offset(0x20_0000);
/// Two adjacent regions (the second adopts the first's anon_vma), a distant one, and a block.
const REGIONS: [(Ipa, u64); 4] = [
    (RAM, 6),
    (RAM.offset(6 * 4096), 4),
    (RAM.offset(0x10_0000), 4),
    (BLOCK, BLOCK_PAGES),
];
/// The pages of the block region the model writes and reads (the others stay zero).
const BLOCK_SAMPLE: [u64; 4] = [0, 1, 255, 511];
const MAX_VMS: usize = 6;

#[derive(Clone, Debug)]
enum Op {
    Create,
    Write {
        vm: usize,
        page: usize,
        value: u64,
    },
    Read {
        vm: usize,
        page: usize,
    },
    /// MEM_RELEASE of one page: its frame or swap slot reference goes, it reads 0 again.
    Release {
        vm: usize,
        page: usize,
    },
    Fork {
        vm: usize,
    },
    Destroy {
        vm: usize,
    },
    Migrate {
        frame: usize,
    },
    Reclaim {
        frame: usize,
    },
    /// Batched migration or reclaim of up to `len` mapped frames from `frame` on (the path
    /// the hypervisor uses: every VM visited once per anon_vma, one flush per VM).
    Batch {
        frame: usize,
        len: usize,
        reclaim: bool,
    },
    /// A 2 MiB first touch of the block region (if it is still empty and memory allows).
    Block {
        vm: usize,
    },
    /// Block migration of a VM's block (`migrate_folio`, or with `batch` a batch of its 512
    /// frames): whole exactly when only blocks map it and a free aligned run exists.
    BlockMigrate {
        vm: usize,
        batch: bool,
    },
    /// Table pages allowed from now on (`None`: unlimited).
    Budget {
        pages: Option<u64>,
    },
    /// Same-page merging of two pages as they are (often different: refused), or, with
    /// `value`, after writing it to both (merged; into an existing merged frame when the
    /// first already is one). A later write to either unmerges it (copy-on-write).
    Merge {
        a: (usize, usize),
        b: (usize, usize),
        value: Option<u64>,
    },
    /// Same-page merging of one page into the shared zero page (`Rmap::merge_zero`): as it
    /// is, or with `zero`, after releasing it and reading it back (a demand-zero frame).
    MergeZero {
        page: (usize, usize),
        zero: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Create),
        6 => (any::<usize>(), any::<usize>(), 1..1000u64)
            .prop_map(|(vm, page, value)| Op::Write { vm, page, value }),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(vm, page)| Op::Read { vm, page }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(vm, page)| Op::Release { vm, page }),
        2 => any::<usize>().prop_map(|vm| Op::Fork { vm }),
        1 => any::<usize>().prop_map(|vm| Op::Destroy { vm }),
        2 => any::<usize>().prop_map(|frame| Op::Migrate { frame }),
        2 => any::<usize>().prop_map(|frame| Op::Reclaim { frame }),
        3 => (any::<usize>(), 1..24usize, any::<bool>())
            .prop_map(|(frame, len, reclaim)| Op::Batch { frame, len, reclaim }),
        2 => any::<usize>().prop_map(|vm| Op::Block { vm }),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(vm, batch)| Op::BlockMigrate { vm, batch }),
        1 => prop::option::of(0..3u64).prop_map(|pages| Op::Budget { pages }),
        4 => (any::<(usize, usize)>(), any::<(usize, usize)>(), prop::option::of(1..4u64))
            .prop_map(|(a, b, value)| Op::Merge { a, b, value }),
        3 => (any::<(usize, usize)>(), any::<bool>())
            .prop_map(|(page, zero)| Op::MergeZero { page, zero }),
    ]
}

/// Whether `pfn` is held by the swap cache (so migration and reclaim leave it).
fn cached(w: &HostWorld, pfn: Pfn) -> bool {
    w.rmap.swap_cache_entries().iter().any(|&(_, p)| p == pfn)
}

/// Whether a block entry still maps `pfn`'s folio whole.
fn in_block(w: &HostWorld, pfn: Pfn) -> bool {
    w.rmap.frames().entire_mapcount(pfn) > 0
}

fn pages() -> Vec<Ipa> {
    REGIONS[..3]
        .iter()
        .flat_map(|&(start, n)| (0..n).map(move |i| page_ipa(start, i)))
        .chain(BLOCK_SAMPLE.iter().map(|&i| page_ipa(BLOCK, i)))
        .collect()
}

/// A VM, what it should read at each page, and its ancestors.
type ModelVm = (Arc<HostVm>, BTreeMap<Ipa, u64>, Vec<VmId>);

struct Model {
    world: HostWorld,
    /// Each VM with its expected contents and its ancestors.
    vms: Vec<ModelVm>,
    /// A VM that still had live descendants was destroyed.
    interior_destroyed: bool,
    /// The table-page budget is limited: faults and forks may fail for want of a table page.
    limited: bool,
}

impl Model {
    fn new() -> Self {
        Model {
            world: HostWorld::new(1600, 4, 256, 1024),
            vms: Vec::new(),
            interior_destroyed: false,
            limited: false,
        }
    }

    fn apply(&mut self, op: &Op) {
        let w = &self.world;
        match *op {
            Op::Create if self.vms.len() < MAX_VMS => {
                self.vms
                    .push((w.create_vm(&REGIONS), BTreeMap::new(), Vec::new()));
            }
            Op::Write { .. } | Op::Read { .. } | Op::Release { .. } if !self.vms.is_empty() => {
                self.page_op(op)
            }
            Op::Fork { vm } if !self.vms.is_empty() && self.vms.len() < MAX_VMS => {
                let (parent, model, ancestors) = &self.vms[vm % self.vms.len()];
                let child = match w.fork(parent) {
                    Ok(child) => child,
                    Err(Error::OutOfFrames) if self.limited => return,
                    Err(e) => panic!("fork: {e:?}"),
                };
                let mut lineage = ancestors.clone();
                lineage.push(parent.id);
                let model = model.clone();
                self.vms.push((child, model, lineage));
            }
            Op::Destroy { vm } if !self.vms.is_empty() => {
                let (vm, _, _) = self.vms.remove(vm % self.vms.len());
                w.destroy(&vm);
                let interior = self.vms.iter().any(|(_, _, a)| a.contains(&vm.id));
                self.interior_destroyed |= interior;
            }
            // With the budget cut, a block that cannot be split makes these back off (Busy).
            Op::Migrate { frame } => self.move_one(frame, false),
            Op::Reclaim { frame } => self.move_one(frame, true),
            Op::Batch {
                frame,
                len,
                reclaim,
            } => self.batch(frame, len, reclaim),
            Op::Block { vm } if !self.vms.is_empty() => {
                let (vm, _, _) = &self.vms[vm % self.vms.len()];
                w.fault_block(vm, BLOCK);
            }
            Op::BlockMigrate { vm, batch } if !self.vms.is_empty() => self.block_migrate(vm, batch),
            Op::Budget { pages } => {
                w.hw().set_table_budget(pages);
                self.limited = pages.is_some();
            }
            Op::Merge { a, b, value } if !self.vms.is_empty() => self.merge(a, b, value),
            Op::MergeZero { page, zero } if !self.vms.is_empty() => self.merge_zero(page, zero),
            _ => {}
        }
    }

    /// A write, read or MEM_RELEASE of one page by one VM. With a limited table budget any
    /// may fail for want of a table page (a first touch, a swap-in, a block split), changing
    /// nothing.
    fn page_op(&mut self, op: &Op) {
        let (w, pages, limited) = (&self.world, pages(), self.limited);
        let (Op::Write { vm, page, .. } | Op::Read { vm, page } | Op::Release { vm, page }) = *op
        else {
            unreachable!("a page op")
        };
        let n = self.vms.len();
        let (vm, model, _) = &mut self.vms[vm % n];
        let ipa = pages[page % pages.len()];
        let result = match *op {
            Op::Write { value, .. } => vm.write(&w.rmap, &w.machine, ipa, value).map(|()| {
                model.insert(ipa, value);
            }),
            Op::Read { .. } => vm.read(&w.rmap, &w.machine, ipa).map(|got| {
                assert_eq!(got, model.get(&ipa).copied().unwrap_or(0), "{ipa:#x}");
            }),
            _ => vm.release(&w.rmap, &w.machine, ipa).map(|()| {
                model.remove(&ipa);
            }),
        };
        match result {
            Ok(()) => {}
            Err(Error::OutOfFrames) if limited => {}
            Err(e) => panic!("{op:?}: {e:?}"),
        }
    }

    /// A single-frame migration or reclaim of the `frame`-th mapped frame.
    fn move_one(&self, frame: usize, reclaim: bool) {
        let w = &self.world;
        let frames = w.mapped_frames();
        if frames.is_empty() {
            return;
        }
        let pfn = frames[frame % frames.len()];
        let r = if reclaim {
            w.rmap
                .reclaim_frame(&w.vms, &w.machine, &w.machine, pfn)
                .map(drop)
        } else {
            w.rmap.migrate_frame(&w.vms, &w.machine, pfn).map(drop)
        };
        // Busy is also right when a block holding the frame cannot be split for want of a
        // table page: the mapping stays and the migrator backs off.
        let no_split = self.limited && matches!(r, Err(Error::Busy));
        assert!(r.is_ok() || cached(w, pfn) || no_split, "{r:?}");
    }

    /// A batched migration or reclaim of up to `len` mapped frames from `frame` on.
    fn batch(&self, frame: usize, len: usize, reclaim: bool) {
        let w = &self.world;
        let frames = w.mapped_frames();
        if frames.is_empty() {
            return;
        }
        let start = frame % frames.len();
        // Unsorted, across anon_vmas, with a duplicate and a free frame thrown in.
        let mut batch: Vec<_> = frames
            .iter()
            .cycle()
            .skip(start)
            .take(len)
            .copied()
            .collect();
        batch.reverse();
        batch.push(frames[start]);
        batch.push(w.rmap.frames().base() + w.rmap.frames().len() as u64 - 1);
        let in_cache = batch.iter().filter(|&&p| cached(w, p)).count();
        let skipped = if reclaim {
            let mut out = Vec::new();
            w.rmap
                .reclaim_frames(&w.vms, &w.machine, &w.machine, &batch, &mut out);
            out.iter().filter_map(|r| r.err()).collect::<Vec<_>>()
        } else {
            let mut out = Vec::new();
            w.rmap.migrate_frames(&w.vms, &w.machine, &batch, &mut out);
            out.iter().filter_map(|r| r.err()).collect::<Vec<_>>()
        };
        if self.limited {
            return; // a block that cannot be split is skipped too
        }
        // Nothing else runs: only the repeats (locked by this very batch) and the
        // tail frame (free unless mapped) may be skipped, and for no other reason.
        // Frames in the swap cache are pinned by it and stay where they are.
        let repeats = len - len.min(frames.len()) + 1;
        assert!(skipped.len() <= repeats + 1 + in_cache, "{skipped:?}");
        assert!(
            skipped
                .iter()
                .all(|s| matches!(s, Skip::NotMapped | Skip::Locked | Skip::Pinned)),
            "{skipped:?}"
        );
        let pinned = skipped.iter().filter(|s| **s == Skip::Pinned).count();
        assert!(pinned <= in_cache, "{skipped:?}");
    }

    /// Moves VM `vm`'s block whole if only blocks map its folio (every frame's own count
    /// the share alone, no swap-cache pin) and an aligned run is free: one block change each
    /// way per block mapper; else nothing changes at block level (a batch moves pages).
    fn block_migrate(&self, vm: usize, batch: bool) {
        let (w, frames) = (&self.world, self.world.rmap.frames());
        let vm = &self.vms[vm % self.vms.len()].0;
        let Some(head) = vm.s2.lock().lookup_block(BLOCK).and_then(PageState::pfn) else {
            return;
        };
        let e = u64::from(frames.entire_mapcount(head));
        let share_only =
            |p: Pfn| (frames.frame(p).mapcount(), frames.frame(p).refcount()) == (1, 1);
        let free = w.machine.free_frames();
        let run = (frames.base().raw()..frames.base().raw() + frames.len() as u64)
            .step_by(BLOCK_PAGES as usize)
            .any(|r| Pfn::new(r).run(BLOCK_PAGES).all(|p| free.contains(&p)));
        let whole = e > 0 && run && head.run(BLOCK_PAGES).all(share_only);
        let changes = w.hw().block_changes();
        let moved = if batch {
            let mut out = Vec::new();
            let pfns: Vec<Pfn> = head.run(BLOCK_PAGES).collect();
            w.rmap.migrate_frames(&w.vms, &w.machine, &pfns, &mut out);
            out[0].map_err(|_| Error::Busy)
        } else {
            w.rmap.migrate_folio(&w.vms, &w.machine, head)
        };
        let block_changes = w.hw().block_changes() - changes;
        if !whole {
            assert!(batch || moved.is_err(), "{moved:?}");
            assert_eq!(block_changes, 0);
            return;
        }
        let new = moved.unwrap();
        assert_eq!(block_changes, 2 * e);
        assert_eq!(
            vm.s2.lock().lookup_block(BLOCK).and_then(PageState::pfn),
            Some(new)
        );
        assert!(head.run(BLOCK_PAGES).all(|p| w.machine.is_free(p)));
    }

    /// A merge of page `a` and page `b` (VM, page indexes), after writing `value` to both.
    fn merge(&mut self, a: (usize, usize), b: (usize, usize), value: Option<u64>) {
        let (n, pages) = (self.vms.len(), pages());
        let side = |(vm, page): (usize, usize)| (vm % n, pages[page % pages.len()]);
        let (a, b) = (side(a), side(b));
        if let Some(value) = value {
            for (vm, ipa) in [a, b] {
                let op = Op::Write {
                    vm,
                    page: pages.iter().position(|&p| p == ipa).unwrap(),
                    value,
                };
                self.page_op(&op);
            }
        }
        let w = &self.world;
        let entry = |(vm, ipa): (usize, Ipa)| self.vms[vm].0.s2.lock().lookup(ipa);
        let page = |(vm, ipa): (usize, Ipa)| MergePage {
            vm: self.vms[vm].0.id,
            ipa,
            pfn: entry((vm, ipa)).pfn().unwrap_or(Pfn::new(0)),
            group: 0,
        };
        let expect = |(vm, ipa): (usize, Ipa)| self.vms[vm].1.get(&ipa).copied().unwrap_or(0);
        let same = expect(a) == expect(b);
        let r = w.rmap.merge(&w.vms, &w.machine, page(a), page(b));
        match r {
            Ok(pfn) => {
                assert!(same, "merged different pages");
                let merged = PageState::Mapped {
                    pfn,
                    writable: false,
                };
                assert_eq!((entry(a), entry(b)), (merged, merged));
            }
            Err(MergeError::Differ) => assert!(!same, "identical pages refused"),
            Err(MergeError::Same) => assert_eq!(entry(a).pfn(), entry(b).pfn()),
            Err(MergeError::NotMapped) => {
                let mapped = |p| matches!(entry(p), PageState::Mapped { .. });
                assert!(!mapped(a) || !mapped(b), "{:?} {:?}", entry(a), entry(b));
            }
            Err(MergeError::BothMerged) => {}
            // A frame the swap cache holds, a block that cannot be split, or a frame a
            // read-only block still maps whole (merged frames are pages).
            Err(MergeError::Busy) => {
                let held = |p: (usize, Ipa)| {
                    entry(p)
                        .pfn()
                        .is_some_and(|f| cached(w, f) || in_block(w, f))
                };
                assert!(self.limited || held(a) || held(b), "busy");
            }
            Err(e) => panic!("merge: {e:?}"),
        }
    }

    /// A merge of page `p` (VM, page index) into the zero page, after making it a fresh
    /// demand-zero page with `zero`.
    fn merge_zero(&mut self, p: (usize, usize), zero: bool) {
        let (n, pages) = (self.vms.len(), pages());
        let (vm, page) = (p.0 % n, p.1 % pages.len());
        if zero {
            self.page_op(&Op::Release { vm, page });
            self.page_op(&Op::Read { vm, page });
        }
        let (w, ipa) = (&self.world, pages[page]);
        let entry = || self.vms[vm].0.s2.lock().lookup(ipa);
        let before = entry();
        let mp = MergePage {
            vm: self.vms[vm].0.id,
            ipa,
            pfn: before.pfn().unwrap_or(Pfn::new(0)),
            group: 0,
        };
        let expect = self.vms[vm].1.get(&ipa).copied().unwrap_or(0);
        match w.rmap.merge_zero(&w.vms, &w.machine, mp) {
            Ok(mappings) => {
                assert_eq!(expect, 0, "a page holding {expect} went to the zero page");
                assert!(mappings >= 1);
                assert_eq!(entry(), PageState::ZeroPage);
            }
            Err(MergeError::Differ) => assert_ne!(expect, 0, "an all-zero page refused"),
            Err(MergeError::NotMapped) => {
                let merged = |f| w.rmap.frames().get(f).is_some_and(|f| f.is_merged());
                let anon = matches!(before, PageState::Mapped { pfn, .. } if !merged(pfn));
                assert!(!anon, "{before:?} refused as not mapped");
            }
            // Held by the swap cache, or still mapped whole by a (read-only) block:
            // merged frames are pages, and a block is left whole until it is split.
            Err(MergeError::Busy) => {
                let held = before.pfn().is_some_and(|f| cached(w, f) || in_block(w, f));
                assert!(self.limited || held, "busy");
            }
            Err(e) => panic!("merge_zero: {e:?}"),
        }
    }

    fn check(&self) {
        let w = &self.world;
        for (vm, model, _) in &self.vms {
            for ipa in pages() {
                let expect = model.get(&ipa).copied().unwrap_or(0);
                assert_eq!(vm.peek(&w.machine, ipa), expect, "{:?} at {ipa:#x}", vm.id);
            }
        }
        w.check().unwrap();
        if !self.interior_destroyed {
            w.check_anon_bound().unwrap();
        }
        if self.vms.is_empty() {
            assert_eq!(w.rmap.live_merge_objects(), (0, 0));
            assert_eq!(w.rmap.live_anon_vmas(), 0);
            assert_eq!(w.machine.allocated(), 0);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn rmap_matches_reference_model(ops in prop::collection::vec(op(), 1..80)) {
        let mut model = Model::new();
        for op in &ops {
            model.apply(op);
            model.check();
        }
        while let Some((vm, _, _)) = model.vms.pop() {
            model.world.destroy(&vm);
            model.check();
        }
    }
}
