//! The walker's two phases (issue 15): the prepare of every structural operation counts
//! exactly the table pages its commit takes. Over random operation sequences, each operation
//! is run with a table-page budget of 0, 1, 2, ... pages: every budget below the count fails
//! with `NoMemory` and changes nothing (tables, leaves, statistics, allocations, TLB); the
//! first that succeeds is the count, and the commit then linked exactly that many new table
//! pages (read from raw memory by the independent oracle of `common`), so the prepare neither
//! under- nor over-counted.

mod common;

use common::{Oracle, RawLeaf};
use proptest::prelude::*;
use stage2::*;
use std::collections::BTreeSet;

const BASE: u64 = 0x4000_0000; // a 1 GiB-aligned IPA
const FRAMES: u64 = 0x1_0000_0000; // a 1 GiB-aligned PA
const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;
const WINDOW_PAGES: u64 = 1024; // the first 4 MiB: two 2 MiB blocks' worth

#[derive(Clone, Copy, Debug)]
enum Op {
    Map {
        page: u64,
        npages: u64,
        blocks: bool,
    },
    MapGiga,
    Unmap {
        page: u64,
        npages: u64,
    },
    Protect {
        page: u64,
        npages: u64,
        write: bool,
    },
    Split {
        page: u64,
    },
    SetSoftware {
        page: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let page = 0..WINDOW_PAGES;
    let npages = prop_oneof![1..4u64, 500..700u64, Just(512u64)];
    prop_oneof![
        3 => (page.clone(), npages.clone(), any::<bool>())
            .prop_map(|(page, npages, blocks)| Op::Map { page, npages, blocks }),
        // 2 MiB-aligned maps, so that blocks are used.
        2 => (0..2u64, 1..3u64).prop_map(|(b, n)| Op::Map { page: b * 512, npages: n * 512, blocks: true }),
        1 => Just(Op::MapGiga),
        2 => (page.clone(), npages.clone()).prop_map(|(page, npages)| Op::Unmap { page, npages }),
        2 => (page.clone(), npages, any::<bool>())
            .prop_map(|(page, npages, write)| Op::Protect { page, npages, write }),
        1 => page.clone().prop_map(|page| Op::Split { page }),
        1 => page.prop_map(|page| Op::SetSoftware { page }),
    ]
}

struct World<'m> {
    mem: &'m HostMemory,
    t: Stage2Table<&'m HostMemory>,
    tlb: RecordingTlb,
}

/// Everything an operation could change.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    leaves: Vec<RawLeaf>,
    tables: BTreeSet<u64>,
    stats: Stats,
    allocated: usize,
}

impl<'m> World<'m> {
    /// A 40-bit IPA table (level 1 start, two root pages) in `mem`.
    fn new(mem: &'m HostMemory) -> Self {
        let cfg = S2Config::new(2, 40, VmidBits::Sixteen).unwrap();
        World {
            mem,
            t: Stage2Table::new(cfg, 1, mem).unwrap(),
            tlb: RecordingTlb::new(),
        }
    }

    fn oracle(&self) -> Oracle<'_> {
        Oracle::new(self.mem, self.t.vtcr(), self.t.vttbr().raw())
    }

    fn snapshot(&self) -> Snapshot {
        let (leaves, tables) = self.oracle().tree();
        Snapshot {
            leaves,
            tables,
            stats: self.t.stats(),
            allocated: self.mem.allocated_pages(),
        }
    }

    fn apply(&self, op: Op) -> Result<(), Error> {
        let (t, tlb) = (&self.t, &self.tlb);
        let at = |page: u64| Ipa::new(BASE + page * PAGE);
        let len = |page: u64, npages: u64| npages.min(WINDOW_PAGES - page) * PAGE;
        let attrs = S2Attrs::normal(Perm::RWX);
        match op {
            Op::Map {
                page,
                npages,
                blocks,
            } => {
                let pa = Pa::new(FRAMES + page * PAGE);
                t.map_coherent(at(page), pa, len(page, npages), attrs, blocks, tlb)
            }
            Op::MapGiga => t.map(Ipa::new(BASE), Pa::new(FRAMES), GIB, attrs, tlb),
            Op::Unmap { page, npages } => t
                .unmap(at(page), len(page, npages), tlb, |_| {})
                .map(|_| ()),
            Op::Protect {
                page,
                npages,
                write,
            } => {
                let perm = if write { Perm::RW } else { Perm::RO };
                t.protect(at(page), len(page, npages), perm, tlb)
            }
            Op::Split { page } => t.split_block(at(page), tlb),
            Op::SetSoftware { page } => t
                .set_software(at(page), PageState::Swapped { slot: page }, tlb)
                .map(|_| ()),
        }
    }

    /// Runs `op` with budgets 0, 1, ... until it does not fail for memory; returns the
    /// budget it needed and its result.
    fn apply_with_least_budget(&self, op: Op) -> (usize, Result<(), Error>) {
        let before = self.snapshot();
        self.tlb.take();
        for budget in 0..=8 {
            self.mem.fail_after(Some(budget));
            let r = self.apply(op);
            self.mem.fail_after(None);
            if r != Err(Error::NoMemory) {
                return (budget, r);
            }
            assert_eq!(
                self.snapshot(),
                before,
                "{op:?} failed with {budget} pages but changed something"
            );
            assert_eq!(
                self.tlb.take(),
                vec![],
                "{op:?} failed with {budget} pages but did maintenance"
            );
        }
        panic!("{op:?} needs more than 8 table pages");
    }
}

fn run(ops: Vec<Op>) {
    let mem = HostMemory::new(256);
    let w = World::new(&mem);
    for op in ops {
        let before = w.oracle().tree().1;
        let (counted, r) = w.apply_with_least_budget(op);
        w.tlb.take();
        let linked = w.oracle().tree().1.difference(&before).count();
        assert_eq!(
            linked, counted,
            "{op:?} ({r:?}): prepared {counted} table pages, commit linked {linked}"
        );
        // Every page the budget gave was linked; none was left to return.
        assert!(
            r.is_ok() || counted == 0,
            "{op:?} failed with {r:?} after reserving {counted} pages"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn prepare_counts_exactly_the_pages_commit_takes(ops in prop::collection::vec(op(), 1..30)) {
        run(ops);
    }
}

/// The counts of a few known cases, so the property above is not vacuous: a page in an empty
/// 40-bit table needs two tables (levels 2 and 3); splitting a 1 GiB block down to one page
/// needs two (the 2 MiB blocks, then the pages of one); a 2 MiB block needs one.
#[test]
fn known_counts() {
    let mem = HostMemory::new(64);
    let w = World::new(&mem);
    let map = |page, npages, blocks| Op::Map {
        page,
        npages,
        blocks,
    };
    assert_eq!(w.apply_with_least_budget(map(3, 1, false)), (2, Ok(())));
    assert_eq!(w.apply_with_least_budget(map(512, 512, true)), (0, Ok(())));
    assert_eq!(
        w.apply_with_least_budget(Op::Unmap {
            page: 0,
            npages: 1024
        }),
        (0, Ok(()))
    );
    assert_eq!(w.apply_with_least_budget(Op::MapGiga), (0, Ok(())));
    assert_eq!(
        w.apply_with_least_budget(Op::Split { page: 700 }),
        (2, Ok(()))
    );
    assert_eq!(
        w.apply_with_least_budget(Op::Unmap {
            page: 100,
            npages: 1
        }),
        (1, Ok(()))
    );
    assert_eq!(w.apply_with_least_budget(map(100, 1, false)), (0, Ok(())));
    assert_eq!(
        w.apply_with_least_budget(map(100, 1, false)),
        (0, Err(Error::AlreadyMapped))
    );
}
