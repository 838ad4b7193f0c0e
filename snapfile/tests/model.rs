//! Proptest against a reference model: random guest memories and writes, full saves and
//! chains of diffs, deletes, reopenings; after every step every snapshot restores to
//! exactly the memory it was saved from, and space is accounted for.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use proptest::prelude::*;
use snapfile::{Error, MemDisk, Store, MAX_CHAIN, PAGE, SECTOR};

#[derive(Clone, Debug)]
enum Op {
    /// Page, kind (0 zero, 1 text, 2 random, 3 copy of another page, 4 release), seed.
    Write(usize, u8, u64),
    SaveFull,
    SaveDiff,
    Delete(usize),
    Reopen,
}

fn op(diff: u32) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<usize>(), 0u8..5, any::<u64>()).prop_map(|(p, k, s)| Op::Write(p, k, s)),
        1 => Just(Op::SaveFull),
        diff => Just(Op::SaveDiff),
        1 => any::<usize>().prop_map(Op::Delete),
        1 => Just(Op::Reopen),
    ]
}

/// Small, so long runs also fill the table of contents.
const TOC_ENTRIES: u32 = 48;

struct Snap {
    mem: Mem,
    parent: Option<String>,
    depth: usize,
}

struct World {
    dev: MemDisk,
    store: Store,
    mem: Mem,
    snaps: BTreeMap<String, Snap>,
    /// The snapshot the next diff is relative to, and the pages written since it.
    last: Option<(String, BTreeSet<usize>)>,
    counter: usize,
    total: u64,
}

impl World {
    fn save(&mut self, diff: bool) {
        let name = format!("s{}", self.counter);
        self.counter += 1;
        let (parent, pages, depth) = match (&self.last, diff) {
            (Some((p, dirty)), true) => (
                Some(p.clone()),
                dirty.iter().copied().collect(),
                self.snaps[p].depth + 1,
            ),
            _ => (None, (0..self.mem.len()).collect::<Vec<_>>(), 1),
        };
        let fixed = SECTOR + 1 + pages.len() * 4;
        let bound = (fixed + pages.len() * (PAGE + 24)).div_ceil(SECTOR) as u64;
        let largest = self.store.gaps().iter().map(|g| g.1).max().unwrap_or(0);
        let before = self.store.list().to_vec();
        let r = save(
            &mut self.store,
            &mut self.dev,
            &name,
            parent.as_deref(),
            &self.mem,
            &pages,
            &[depth as u8],
        );
        match r {
            Ok(_) => {
                assert!(depth <= MAX_CHAIN);
                self.snaps.insert(
                    name.clone(),
                    Snap {
                        mem: self.mem.clone(),
                        parent,
                        depth,
                    },
                );
                self.last = Some((name, BTreeSet::new()));
            }
            Err(Error::ChainTooDeep) => assert!(depth > MAX_CHAIN),
            Err(Error::TocFull) => assert_eq!(before.len(), TOC_ENTRIES as usize),
            Err(Error::NoSpace { needed, free }) => {
                assert!(
                    largest < bound,
                    "NoSpace with a gap of {largest} for a bound of {bound}"
                );
                assert!(needed > free);
                assert_eq!(self.store.list(), &before[..]);
            }
            Err(e) => panic!("save {name}: {e}"),
        }
    }

    fn delete(&mut self, i: usize) {
        let Some(name) = self.snaps.keys().nth(i % self.snaps.len().max(1)).cloned() else {
            return;
        };
        let is_parent = self
            .snaps
            .values()
            .any(|s| s.parent.as_deref() == Some(&name));
        match self.store.delete(&mut self.dev, &name) {
            Ok(()) => {
                assert!(!is_parent);
                self.snaps.remove(&name);
                if self.last.as_ref().is_some_and(|l| l.0 == name) {
                    self.last = None;
                }
            }
            Err(e) => assert!(is_parent && e == Error::IsParent, "delete {name}: {e}"),
        }
    }

    fn check(&mut self) {
        let listed: BTreeSet<String> = self
            .store
            .list()
            .iter()
            .map(|e| e.name.as_str().to_string())
            .collect();
        assert_eq!(listed, self.snaps.keys().cloned().collect());
        let used: u64 = self.store.list().iter().map(|e| e.sectors).sum();
        assert_eq!(used + self.store.free_sectors(), self.total);
        for (name, s) in &self.snaps {
            let img = self.store.image(&mut self.dev, name).unwrap();
            assert_eq!((img.depth(), img.state()), (s.depth, &[s.depth as u8][..]));
            check_restore(&img, &mut self.dev, &s.mem);
        }
    }
}

fn run(pages: usize, sectors: u64, ops: Vec<Op>) {
    let mut dev = MemDisk::new(sectors);
    let store = Store::format(&mut dev, 9, TOC_ENTRIES).unwrap();
    let total = store.free_sectors();
    let mem = vec![None; pages];
    let mut w = World {
        dev,
        store,
        mem,
        snaps: BTreeMap::new(),
        last: None,
        counter: 0,
        total,
    };
    for op in ops {
        match op {
            Op::Write(p, k, seed) => {
                let p = p % pages;
                w.mem[p] = match k {
                    3 => w.mem[seed as usize % pages].clone(),
                    4 => None,
                    _ => Some(page_of(k, seed)),
                };
                if let Some(l) = w.last.as_mut() {
                    l.1.insert(p);
                }
            }
            Op::SaveFull => w.save(false),
            Op::SaveDiff => w.save(true),
            Op::Delete(i) => w.delete(i),
            Op::Reopen => {
                let s = Store::open(&mut w.dev).unwrap();
                assert_eq!(s.list(), w.store.list());
                w.store = s;
            }
        }
        w.check();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Mixed: fills the disk (`NoSpace`), fragments it, deletes parents.
    #[test]
    fn every_snapshot_restores_what_was_saved(
        pages in 4usize..40,
        sectors in 60u64..700,
        ops in prop::collection::vec(op(3), 1..80),
    ) {
        run(pages, sectors, ops);
    }

    /// Mostly diffs: chains up to and past `MAX_CHAIN`.
    #[test]
    fn long_diff_chains_restore_what_was_saved(
        pages in 4usize..16,
        ops in prop::collection::vec(op(12), 20..100),
    ) {
        run(pages, 2000, ops);
    }
}
