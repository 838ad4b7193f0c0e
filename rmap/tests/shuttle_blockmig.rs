//! Block migration under shuttle, against the crate's real code (`rmap::host`): a block
//! shared by a VM and its fork child moves whole (`Rmap::migrate_folio`) while the parent's
//! vCPU loads one page (a fault on the block migration entry waits for its frame) and stores
//! to another (copy-on-write: the block is split, before or after the move, and the
//! migration backs off or the store copies the moved frame), and a control thread forks the
//! child (a fork of the block, or of its migration entry) and destroys the grandchild. Every
//! load sees the last store of its own VM; at the end `HostWorld::check` finds every count
//! exact, the blocks still counted on their folio, and after teardown nothing left.
//!
//! Run: `cargo test -p rmap --features shuttle --test shuttle_blockmig` (`DEFAULT`
//! iterations per scheduler, randomised then PCT; `RMAP_SHUTTLE_ITERS=N` searches longer).
#![cfg(feature = "shuttle")]

mod shuttle_common;

use rmap::host::BLOCK_PAGES;
use rmap::{Error, Stage2, Stage2Locked};
use shuttle::thread;
use shuttle_common::{check, explore, read, world, write, PAGE, RAM};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Schedules in which the folio moved whole, and in which the store split it first: both
/// must happen (std atomics: outside the checker's view).
static MOVED: AtomicUsize = AtomicUsize::new(0);
static BACKED_OFF: AtomicUsize = AtomicUsize::new(0);

/// Iterations per scheduler in CI.
const DEFAULT: usize = 300;

fn scenario() {
    // Two aligned runs (the block and its migration target) and room for copies.
    let w = world(2 * BLOCK_PAGES as usize + 64, 8, 32);
    let a = w.create_vm(&[(RAM, BLOCK_PAGES)]);
    assert!(w.fault_block(&a, RAM));
    let (p0, p5) = (RAM, RAM + 5 * PAGE);
    write(&w, &a, p0, 10);
    write(&w, &a, p5, 50);
    let head = a.s2.lock().lookup(RAM).pfn().unwrap();
    let b = w.fork(&a).expect("fork");
    let mover = {
        let w = w.clone();
        thread::spawn(
            move || match w.rmap.migrate_folio(&w.vms, &w.machine, head) {
                Ok(_) => MOVED.fetch_add(1, Ordering::Relaxed),
                Err(Error::Busy) => BACKED_OFF.fetch_add(1, Ordering::Relaxed),
                Err(e) => panic!("migrate_folio: {e:?}"),
            },
        )
    };
    let vcpu = {
        let (w, a) = (w.clone(), a.clone());
        thread::spawn(move || {
            assert_eq!(read(&w, &a, p5), 50, "load during the migration");
            write(&w, &a, p0, 11);
            assert_eq!(read(&w, &a, p0), 11, "own store lost");
        })
    };
    let control = {
        let (w, b) = (w.clone(), b.clone());
        thread::spawn(move || {
            let c = w.fork(&b).expect("fork of the child");
            assert_eq!(read(&w, &c, p0), 10, "grandchild");
            assert_eq!(read(&w, &c, p5), 50, "grandchild");
            w.destroy(&c);
        })
    };
    mover.join().unwrap();
    vcpu.join().unwrap();
    control.join().unwrap();
    check(&w);
    assert_eq!(read(&w, &b, p0), 10, "the parent's store showed through");
    assert_eq!(read(&w, &b, p5), 50);
    assert_eq!(read(&w, &a, p0), 11);
    check(&w);
    w.destroy(&a);
    w.destroy(&b);
    check(&w);
    assert_eq!(w.machine.allocated(), 0, "frames leaked");
}

#[test]
fn block_migration_races_fault_store_and_fork() {
    explore(DEFAULT, scenario);
    let counts = [&MOVED, &BACKED_OFF].map(|c| c.load(Ordering::Relaxed));
    assert!(
        counts.iter().all(|&n| n > 0),
        "(moved, backed off) = {counts:?}"
    );
    eprintln!("shuttle block migration: (moved whole, backed off) = {counts:?}");
}
