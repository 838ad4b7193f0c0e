//! Random sequences of operations against a reference model (IPA page -> state), checked after
//! every step with the independent oracle of `common`: translations, table-page accounting
//! (no leak, no double link), statistics, and the TLB invalidations each step made.

mod common;

use common::{Oracle, PageState, RawLeaf};
use proptest::prelude::*;
use stage2::*;
use std::collections::BTreeMap;

const WINDOW_PAGES: u64 = 2048; // 8 MiB: four 2 MiB blocks
const PAGE: u64 = 4096;

#[derive(Clone, Copy, Debug)]
struct Setup {
    parange: u8,
    ipa_bits: u8,
    base: u64,
    frames: u64,
}

fn setups() -> impl Strategy<Value = Setup> {
    prop_oneof![
        // 40-bit IPA: level 1 start, 2 concatenated roots; a window crossing a 1 GiB boundary,
        // and one crossing the boundary between the two root pages (512 GiB).
        Just(Setup {
            parange: 2,
            ipa_bits: 40,
            base: 0x4000_0000,
            frames: 0x1_0000_0000
        }),
        Just(Setup {
            parange: 2,
            ipa_bits: 40,
            base: 0x8000_0000 - 0x40_0000,
            frames: 0x1_0000_0000
        }),
        Just(Setup {
            parange: 2,
            ipa_bits: 40,
            base: (1 << 39) - 0x40_0000,
            frames: 0x1_0000_0000
        }),
        // 48-bit IPA: level 0 start.
        Just(Setup {
            parange: 5,
            ipa_bits: 48,
            base: (1 << 39) - 0x40_0000,
            frames: 0x10_0000_0000
        }),
        // 32-bit IPA: level 2 start, 4 concatenated roots, crossing a 1 GiB boundary.
        Just(Setup {
            parange: 0,
            ipa_bits: 32,
            base: 0x8000_0000 - 0x40_0000,
            frames: 0xC000_0000
        }),
    ]
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Map {
        page: u64,
        npages: u64,
        frame: u64,
        perm: Perm,
        device: bool,
        blocks: bool,
    },
    MapBlock {
        block: u64,
        frame_block: u64,
        perm: Perm,
    },
    Unmap {
        page: u64,
        npages: u64,
    },
    Protect {
        page: u64,
        npages: u64,
        perm: Perm,
    },
    Split {
        page: u64,
    },
    SetSoftware {
        page: u64,
        entry: stage2::PageState,
    },
    CasPerm {
        page: u64,
        perm: Perm,
    },
    CasRemap {
        page: u64,
        frame: u64,
    },
    /// `update_pages` remapping every other page of a run to consecutive frames.
    UpdateRemap {
        page: u64,
        npages: u64,
        frame: u64,
    },
    CasStale {
        page: u64,
    },
    ClearYoung {
        page: u64,
    },
    MkYoung {
        page: u64,
    },
}

fn perm() -> impl Strategy<Value = Perm> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(r, w, x)| Perm::new(r, w, x))
}

fn page() -> impl Strategy<Value = u64> {
    0..WINDOW_PAGES
}

fn sw_entry() -> impl Strategy<Value = stage2::PageState> {
    prop_oneof![
        (0..1u64 << 30, any::<bool>()).prop_map(|(pfn, writable)| {
            stage2::PageState::Migrating {
                pfn: Pfn::new(pfn),
                writable,
            }
        }),
        (0..1u64 << 40).prop_map(|slot| stage2::PageState::Swapped { slot }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (page(), 1..700u64, 0..4096u64, perm(), prop::bool::weighted(0.1), any::<bool>())
            .prop_map(|(page, npages, frame, perm, device, blocks)| Op::Map { page, npages, frame, perm, device, blocks }),
        2 => (0..4u64, 0..8u64, perm()).prop_map(|(block, frame_block, perm)| Op::MapBlock { block, frame_block, perm }),
        3 => (page(), 1..1100u64).prop_map(|(page, npages)| Op::Unmap { page, npages }),
        2 => (page(), 1..1100u64, perm()).prop_map(|(page, npages, perm)| Op::Protect { page, npages, perm }),
        1 => page().prop_map(|page| Op::Split { page }),
        2 => (page(), sw_entry()).prop_map(|(page, entry)| Op::SetSoftware { page, entry }),
        2 => (page(), perm()).prop_map(|(page, perm)| Op::CasPerm { page, perm }),
        1 => (page(), 0..4096u64).prop_map(|(page, frame)| Op::CasRemap { page, frame }),
        1 => (page(), 1..1100u64, 0..4096u64)
            .prop_map(|(page, npages, frame)| Op::UpdateRemap { page, npages, frame }),
        1 => page().prop_map(|page| Op::CasStale { page }),
        1 => page().prop_map(|page| Op::ClearYoung { page }),
        1 => page().prop_map(|page| Op::MkYoung { page }),
    ]
}

/// An op, and optionally a limit on table-page allocations for it.
#[derive(Clone, Copy, Debug)]
struct Step {
    op: Op,
    budget: Option<usize>,
}

fn step() -> impl Strategy<Value = Step> {
    (op(), prop::option::weighted(0.15, 0..3usize)).prop_map(|(op, budget)| Step { op, budget })
}

type Model = BTreeMap<u64, PageState>;

struct World<'m> {
    setup: Setup,
    mem: &'m HostMemory,
    table: Stage2Table<&'m HostMemory>,
    tlb: RecordingTlb,
    model: Model,
}

fn mapped(pa: u64, perm: Perm, device: bool) -> PageState {
    PageState::Mapped {
        pa,
        read: perm.read,
        write: perm.write,
        exec: perm.exec && !device,
        device,
        young: true,
        sw: 0,
    }
}

impl World<'_> {
    fn ipa(&self, page: u64) -> u64 {
        self.setup.base + page * PAGE
    }

    fn frame(&self, frame: u64) -> u64 {
        self.setup.frames + frame * PAGE
    }

    fn oracle(&self) -> Oracle<'_> {
        Oracle::new(self.mem, self.table.vtcr(), self.table.vttbr().raw())
    }

    /// Clamps `[page, page + npages)` to the window; returns (ipa, len).
    fn range(&self, page: u64, npages: u64) -> (u64, u64) {
        let n = npages.min(WINDOW_PAGES - page);
        (self.ipa(page), n * PAGE)
    }

    fn pages_in(&self, ipa: u64, len: u64) -> impl Iterator<Item = u64> {
        (ipa..ipa + len).step_by(PAGE as usize)
    }

    /// The pages of the leaf holding `ipa`, per the crate's lookup.
    fn leaf_pages(&self, ipa: u64) -> Vec<u64> {
        match self.table.lookup(Ipa::new(ipa)) {
            Some(l) => self.pages_in(l.ipa.raw(), l.size()).collect(),
            None => vec![],
        }
    }

    /// Runs one op against the table and the model. Returns whether the op may leave AF
    /// cleared without an invalidation.
    fn apply(&mut self, op: Op) -> Result<bool, Error> {
        let tlb = &self.tlb;
        match op {
            Op::Map {
                page,
                npages,
                frame,
                perm,
                device,
                blocks,
            } => {
                let (ipa, len) = self.range(page, npages);
                let attrs = S2Attrs {
                    perm: Perm {
                        exec: perm.exec && !device,
                        ..perm
                    },
                    mem: if device {
                        MemType::Device
                    } else {
                        MemType::Normal
                    },
                    sw: 0,
                };
                let pa = self.frame(frame);
                let occupied = self.pages_in(ipa, len).any(|p| self.model.contains_key(&p));
                let r = if blocks {
                    self.table.map(Ipa::new(ipa), Pa::new(pa), len, attrs, tlb)
                } else {
                    self.table
                        .map_pages(Ipa::new(ipa), Pa::new(pa), len, attrs, tlb)
                };
                if occupied {
                    assert_eq!(r, Err(Error::AlreadyMapped));
                }
                r?;
                for (i, p) in self.pages_in(ipa, len).enumerate() {
                    self.model
                        .insert(p, mapped(pa + i as u64 * PAGE, attrs.perm, device));
                }
            }
            Op::MapBlock {
                block,
                frame_block,
                perm,
            } => {
                let ipa = self.ipa(block * 512);
                let pa = self.frame(frame_block * 512);
                let occupied = self
                    .pages_in(ipa, 512 * PAGE)
                    .any(|p| self.model.contains_key(&p));
                let r = self.table.map(
                    Ipa::new(ipa),
                    Pa::new(pa),
                    512 * PAGE,
                    S2Attrs::normal(perm),
                    tlb,
                );
                assert_eq!(r.is_err(), occupied || r == Err(Error::NoMemory));
                r?;
                if ipa.is_multiple_of(2 << 20) {
                    assert_eq!(
                        self.table.lookup(Ipa::new(ipa)).unwrap().level,
                        2,
                        "2 MiB block expected"
                    );
                }
                for (i, p) in self.pages_in(ipa, 512 * PAGE).enumerate() {
                    self.model
                        .insert(p, mapped(pa + i as u64 * PAGE, perm, false));
                }
            }
            Op::Unmap { page, npages } => {
                let (ipa, len) = self.range(page, npages);
                let mut reported = BTreeMap::new();
                let removed = self.table.unmap(Ipa::new(ipa), len, tlb, |l: &LeafInfo| {
                    let start = l.ipa.raw();
                    assert!(
                        start >= ipa && start + l.size() <= ipa + len,
                        "reported leaf outside the range"
                    );
                    for (i, p) in (start..start + l.size()).step_by(PAGE as usize).enumerate() {
                        let pa = l.pa_of(Ipa::new(start + i as u64 * PAGE));
                        reported.insert(p, pa.map(Pa::raw));
                    }
                })?;
                let mut expect_removed = 0;
                for p in self.pages_in(ipa, len) {
                    let old = self.model.remove(&p);
                    match old {
                        Some(PageState::Mapped { pa, .. }) => {
                            expect_removed += PAGE;
                            assert_eq!(reported.remove(&p), Some(Some(pa)));
                        }
                        Some(PageState::Software(_)) => assert_eq!(reported.remove(&p), Some(None)),
                        None => {}
                    }
                }
                assert!(
                    reported.is_empty(),
                    "reported pages that were not mapped: {reported:?}"
                );
                assert_eq!(removed, expect_removed);
            }
            Op::Protect { page, npages, perm } => {
                let (ipa, len) = self.range(page, npages);
                self.table.protect(Ipa::new(ipa), len, perm, tlb)?;
                for p in self.pages_in(ipa, len) {
                    match self.model.get_mut(&p) {
                        Some(PageState::Mapped {
                            read,
                            write,
                            exec,
                            device,
                            ..
                        }) => {
                            (*read, *write, *exec) = (perm.read, perm.write, perm.exec && !*device);
                        }
                        // A migration entry put back must not be writable either.
                        Some(PageState::Software(stage2::PageState::Migrating {
                            writable,
                            ..
                        })) => *writable &= perm.write,
                        Some(PageState::Software(_)) | None => {}
                    }
                }
            }
            Op::Split { page } => {
                let ipa = self.ipa(page);
                let r = self.table.split_block(Ipa::new(ipa), tlb);
                match self.model.get(&ipa) {
                    Some(PageState::Mapped { .. }) => {
                        r?;
                        assert_eq!(self.table.lookup(Ipa::new(ipa)).unwrap().level, 3);
                    }
                    _ => assert_eq!(r, Err(Error::NotMapped)),
                }
            }
            Op::SetSoftware { page, entry } => {
                let ipa = self.ipa(page);
                let old = self.table.set_software(Ipa::new(ipa), entry, tlb)?;
                let was = self.model.insert(ipa, PageState::Software(entry));
                match (old, was) {
                    (None, None) => {}
                    (Some(l), Some(PageState::Mapped { pa, .. })) => {
                        assert_eq!((l.level, l.pa_of(Ipa::new(ipa))), (3, Some(Pa::new(pa))))
                    }
                    (Some(l), Some(PageState::Software(e))) => assert_eq!(l.software(), Some(e)),
                    other => panic!("set_software returned {other:?}"),
                }
            }
            Op::CasPerm { page, perm } => self.cas_perm(self.ipa(page), perm)?,
            Op::CasRemap { page, frame } => {
                let ipa = self.ipa(page);
                let Some(l) = self.table.lookup(Ipa::new(ipa)) else {
                    return Ok(false);
                };
                let Some(m) = l.mapping().filter(|_| l.level == 3) else {
                    return Ok(false);
                };
                let pa = self.frame(frame);
                let new = Descriptor::page(pa, m.attrs).unwrap();
                self.table
                    .compare_exchange_leaf(Ipa::new(ipa), 3, l.desc, new, tlb)
                    .unwrap();
                if let Some(PageState::Mapped { pa: p, young, .. }) = self.model.get_mut(&ipa) {
                    (*p, *young) = (pa, true);
                }
            }
            Op::UpdateRemap {
                page,
                npages,
                frame,
            } => {
                let (ipa, len) = self.range(page, npages);
                let ipas: Vec<Ipa> = (ipa..ipa + len)
                    .step_by(2 * PAGE as usize)
                    .map(Ipa::new)
                    .collect();
                let frames = self.setup.frames;
                let new_pa = |k: usize| frames + (frame + k as u64) % 4096 * PAGE;
                let mut changed = Vec::new();
                self.table.update_pages(
                    &ipas,
                    &mut |k, l| {
                        let m = l.mapping()?;
                        Descriptor::page(new_pa(k), m.attrs).ok()
                    },
                    &mut |k, r| {
                        if r.is_ok() {
                            changed.push(k);
                        }
                    },
                    tlb,
                );
                for k in changed {
                    if let Some(PageState::Mapped { pa: p, young, .. }) =
                        self.model.get_mut(&ipas[k].raw())
                    {
                        (*p, *young) = (new_pa(k), true);
                    }
                }
            }
            Op::CasStale { page } => {
                let ipa = self.ipa(page);
                if let Some(l) = self.table.lookup(Ipa::new(ipa)) {
                    let stale = Descriptor::from_raw(l.desc.raw() ^ (1 << 20));
                    let r = self.table.compare_exchange_leaf(
                        Ipa::new(ipa),
                        l.level,
                        stale,
                        Descriptor::EMPTY,
                        tlb,
                    );
                    assert_eq!(r, Err(CasError::Mismatch(l.desc)));
                }
            }
            Op::ClearYoung { page } => {
                let ipa = self.ipa(page);
                let pages = self.leaf_pages(ipa);
                let want = matches!(
                    self.model.get(&ipa),
                    Some(PageState::Mapped { young: true, .. })
                );
                assert_eq!(self.table.test_and_clear_young(Ipa::new(ipa)), want);
                self.set_young(&pages, false);
                return Ok(true);
            }
            Op::MkYoung { page } => {
                let ipa = self.ipa(page);
                let pages = self.leaf_pages(ipa);
                let want = matches!(self.model.get(&ipa), Some(PageState::Mapped { .. }));
                assert_eq!(self.table.mkyoung(Ipa::new(ipa)), want);
                self.set_young(&pages, true);
            }
        }
        Ok(false)
    }

    fn set_young(&mut self, pages: &[u64], to: bool) {
        for p in pages {
            if let Some(PageState::Mapped { young, .. }) = self.model.get_mut(p) {
                *young = to;
            }
        }
    }

    fn cas_perm(&mut self, ipa: u64, perm: Perm) -> Result<(), Error> {
        let tlb = &self.tlb;
        let Some(l) = self.table.lookup(Ipa::new(ipa)) else {
            // A hole: fill it with a page (we hold the "stage-2 lock": single-threaded).
            let new = Descriptor::page(self.setup.frames, S2Attrs::normal(Perm::RW)).unwrap();
            match self
                .table
                .compare_exchange_leaf(Ipa::new(ipa), 3, Descriptor::EMPTY, new, tlb)
            {
                Ok(()) => {
                    self.model
                        .insert(ipa, mapped(self.setup.frames, Perm::RW, false));
                }
                Err(CasError::NoSlot { level, found }) => assert!(level < 3 && found.is_empty()),
                Err(e) => panic!("{e:?}"),
            }
            return Ok(());
        };
        match l.leaf {
            Leaf::Mapped(m) => {
                let perm = Perm {
                    exec: perm.exec && m.attrs.mem == MemType::Normal,
                    ..perm
                };
                self.table
                    .compare_exchange_leaf(
                        Ipa::new(ipa),
                        l.level,
                        l.desc,
                        l.desc.with_perm(perm),
                        tlb,
                    )
                    .unwrap();
                for p in self.pages_in(l.ipa.raw(), l.size()) {
                    if let Some(PageState::Mapped {
                        read, write, exec, ..
                    }) = self.model.get_mut(&p)
                    {
                        (*read, *write, *exec) = (perm.read, perm.write, perm.exec);
                    }
                }
            }
            Leaf::Software(_) => {
                // A migration entry keeps the permission it was given.
                let e = stage2::PageState::Migrating {
                    pfn: Pfn::new(ipa >> 12),
                    writable: perm.write,
                };
                let new = Descriptor::software(e).unwrap();
                self.table
                    .compare_exchange_leaf(Ipa::new(ipa), 3, l.desc, new, tlb)
                    .unwrap();
                self.model.insert(ipa, PageState::Software(e));
            }
        }
        Ok(())
    }

    /// The oracle's view of the window must be the model, and nothing may be mapped outside it.
    fn check(&self) -> BTreeMap<u64, (RawLeaf, PageState)> {
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
    fn check_invalidations(
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

fn run(setup: Setup, steps: Vec<Step>) {
    let mem = HostMemory::new(1024);
    let cfg = S2Config::new(setup.parange, setup.ipa_bits, VmidBits::Eight).unwrap();
    let table = Stage2Table::new(cfg, 7, &mem).unwrap();
    let mut w = World {
        setup,
        mem: &mem,
        table,
        tlb: RecordingTlb::new(),
        model: Model::new(),
    };
    let mut before = w.check();
    for s in steps {
        let model_before = w.model.clone();
        let allocated = mem.allocated_pages();
        mem.fail_after(s.budget);
        let r = w.apply(s.op);
        mem.fail_after(None);
        let calls = w.tlb.take();
        if let Err(e) = r {
            assert!(
                matches!(e, Error::NoMemory | Error::AlreadyMapped),
                "{:?}: {e:?}",
                s.op
            );
            w.model = model_before;
            assert_eq!(
                mem.allocated_pages(),
                allocated,
                "a failed op must return its reserve"
            );
            assert!(
                calls.iter().all(|c| matches!(c, TlbCall::Icache { .. })),
                "a failed op changed live entries: {calls:?}"
            );
        }
        let after = w.check();
        w.check_invalidations(&before, &after, &calls, matches!(r, Ok(true)));
        before = after;
    }
    // Unmapping everything frees every table but the root; destroy frees the rest.
    w.table
        .unmap(Ipa::new(0), w.table.config().ipa_limit(), &w.tlb, |_| {})
        .unwrap();
    assert_eq!(
        mem.allocated_pages(),
        cfg.root_pages(),
        "table pages leaked after unmapping everything"
    );
    assert_eq!(
        w.table.stats(),
        Stats {
            table_pages: cfg.root_pages() as u64,
            ..Stats::default()
        }
    );
    w.table.destroy(&w.tlb);
    assert_eq!(mem.allocated_pages(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_ops_agree_with_model_and_oracle(setup in setups(), steps in prop::collection::vec(step(), 1..40)) {
        run(setup, steps);
    }
}
