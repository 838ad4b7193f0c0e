//! Crashes at every sector of a save and of a delete (torn writes included), and a second
//! crash in the next commit: the store always opens, keeps every snapshot acknowledged
//! before, and every snapshot it lists restores exactly.

mod common;

use std::collections::BTreeMap;

use common::*;
use snapfile::{MemDisk, Store};

type Model = BTreeMap<String, Mem>;

fn mem(n: usize, salt: u64) -> Mem {
    (0..n)
        .map(|i| (i % 4 != 1).then(|| page_of(1 + (i % 2) as u8, i as u64 + salt)))
        .collect()
}

/// A store with "a" (full) and "b" (diff on a), and the model of both.
fn base() -> (MemDisk, Model) {
    let mut dev = MemDisk::new(1024);
    let mut store = Store::format(&mut dev, 5, 8).unwrap();
    let a = mem(10, 0);
    save(
        &mut store,
        &mut dev,
        "a",
        None,
        &a,
        &(0..10).collect::<Vec<_>>(),
        b"a",
    )
    .unwrap();
    let mut b = a.clone();
    b[2] = Some(page_of(2, 77));
    b[3] = None;
    save(&mut store, &mut dev, "b", Some("a"), &b, &[2, 3], b"b").unwrap();
    let mut model = Model::from([("a".into(), a), ("b".into(), b)]);
    // More entries than fit one sector, so a torn TOC write is possible.
    for x in ["x1", "x2", "x3"] {
        let m = mem(2, x.len() as u64 * 31);
        save(&mut store, &mut dev, x, None, &m, &[0, 1], b"x").unwrap();
        model.insert(x.into(), m);
    }
    (dev, model)
}

/// The operations crashed in: each changes the model only if it succeeds.
#[derive(Clone, Copy, Debug)]
enum Op {
    SaveDiff,
    SaveFull,
    Delete,
}

fn run(op: Op, dev: &mut MemDisk, model: &mut Model) -> bool {
    let Ok(mut store) = Store::open(dev) else {
        return false;
    };
    let (name, m) = match op {
        Op::SaveDiff => {
            let mut c = model["b"].clone();
            c[5] = Some(page_of(2, 55));
            if save(&mut store, dev, "c", Some("b"), &c, &[5], b"c").is_err() {
                return false;
            }
            ("c", c)
        }
        Op::SaveFull => {
            let d = mem(10, 1000);
            let all: Vec<usize> = (0..10).collect();
            if save(&mut store, dev, "d", None, &d, &all, b"d").is_err() {
                return false;
            }
            ("d", d)
        }
        Op::Delete => return store.delete(dev, "b").is_ok() && model.remove("b").is_some(),
    };
    model.insert(name.into(), m);
    true
}

/// What the power loss did to the writes no flush had made durable.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// All of them reached the media.
    None,
    /// None did.
    All,
    /// Every other sector did (torn writes).
    Alternate,
    /// Only the superblock's and TOC copies' sectors did (a table ahead of its images).
    TocOnly,
}

const LOSSES: [Loss; 4] = [Loss::None, Loss::All, Loss::Alternate, Loss::TocOnly];

/// The first sector after the base store's two TOC copies.
const DATA_START: u64 = 1 + 2 * TOC_SECTORS;

/// What a reboot sees after the crash and `loss`: the bytes, no crash budget. Everything
/// acknowledged is listed and everything listed restores exactly as saved.
fn check_after_crash(dev: &MemDisk, acked: &Model, maybe: &Model, loss: Loss) -> MemDisk {
    let mut lost = dev.clone();
    lost.lose_unflushed(|lba| match loss {
        Loss::None => true,
        Loss::All => false,
        Loss::Alternate => lba % 2 == 0,
        Loss::TocOnly => lba < DATA_START,
    });
    let mut d = MemDisk::from_bytes(lost.bytes().to_vec());
    let store = Store::open(&mut d)
        .unwrap_or_else(|e| panic!("a crash ({loss:?} unflushed lost) left no store: {e:?}"));
    for name in acked.keys() {
        assert!(store.entry(name).is_ok(), "acknowledged {name} lost");
    }
    for e in store.list() {
        let m = maybe.get(e.name.as_str()).expect("a snapshot nobody saved");
        let img = store.image(&mut d, e.name.as_str()).unwrap();
        check_restore(&img, &mut d, m);
    }
    d
}

/// Sectors `op` writes on the base store, and the model after it succeeds.
fn uncrashed(op: Op) -> (u64, Model) {
    let (mut dev, mut model) = base();
    let before = dev.sectors_written;
    assert!(run(op, &mut dev, &mut model));
    (dev.sectors_written - before, model)
}

#[test]
fn a_crash_at_any_sector_of_one_operation() {
    for op in [Op::SaveDiff, Op::SaveFull, Op::Delete] {
        let (total, done) = uncrashed(op);
        for k in 0..=total {
            let (mut dev, mut model) = base();
            // Not acknowledged: either state may be listed (a crash after the first TOC
            // copy is durable keeps the operation).
            let mut maybe = model.clone();
            maybe.extend(done.clone());
            dev.crash_after(k);
            let ok = run(op, &mut dev, &mut model);
            assert_eq!(ok, k == total, "{op:?} at {k}/{total}");
            // Acknowledged: what the operation leaves in place either way.
            let mut must = model.clone();
            must.retain(|n, _| done.contains_key(n));
            for loss in LOSSES {
                let mut after = check_after_crash(&dev, &must, &maybe, loss);
                // Once the first TOC copy is written and flushed (the last TOC_SECTORS
                // sectors are the second), the operation is kept: SNAPSHOT-FORMAT.md's
                // crash table.
                if k >= total - TOC_SECTORS {
                    let store = Store::open(&mut after).unwrap();
                    let mut names: Vec<&str> =
                        store.list().iter().map(|e| e.name.as_str()).collect();
                    let want: Vec<&str> = done.keys().map(String::as_str).collect();
                    names.sort_unstable();
                    assert_eq!(names, want, "{op:?} at {k}/{total}, {loss:?} lost");
                }
            }
        }
    }
}

/// Sectors of one TOC copy for the base store's 8 entries: 64 + 8 × 128 bytes.
const TOC_SECTORS: u64 = 3;

#[test]
fn a_crash_in_the_next_commit_after_a_torn_one() {
    let (first, mut maybe) = uncrashed(Op::SaveDiff);
    maybe.extend(uncrashed(Op::SaveFull).1);
    let second = uncrashed(Op::SaveFull).0 + 4;
    for k1 in 0..first {
        for k2 in 0..=second {
            let (mut dev, mut model) = base();
            dev.crash_after(k1);
            assert!(!run(Op::SaveDiff, &mut dev, &mut model));
            let loss = LOSSES[(k1 + k2) as usize % LOSSES.len()];
            let mut dev = check_after_crash(&dev, &model, &maybe, loss);
            dev.crash_after(k2);
            let mut after = model.clone();
            if run(Op::SaveFull, &mut dev, &mut after) {
                model = after;
            }
            for loss in LOSSES {
                check_after_crash(&dev, &model, &maybe, loss);
            }
        }
    }
}
