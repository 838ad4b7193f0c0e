//! Several vCPUs per VM under shuttle, against the crate's real code (`rmap::host`): two vCPU
//! threads fault, store, load and MEM_RELEASE their own pages of one region of a VM, a third
//! vCPU loads every page of it, while one control thread forks the VM, lets the child take a
//! CoW copy and destroys the child, and another migrates and reclaims frames in batches. Every load must
//! see its own vCPU's last store (or, for pages of other vCPUs, a value some store put
//! there); at the end every page holds its last store and `HostWorld::check` finds every
//! counter exact and nothing leaked (also after the VM is destroyed).
//!
//! Run: `cargo test -p rmap --features shuttle --test shuttle_stress` (CI-sized: `DEFAULT`
//! iterations per scheduler, randomised then PCT). Search longer: `RMAP_SHUTTLE_ITERS=5000`
//! (per scheduler; `RMAP_SHUTTLE_SCHED=random|pct` runs one). Part of `cargo xtask test`.
//! The seed races and their mutations are in `tests/shuttle_seeds.rs`; this scenario also
//! fails under some of those mutations (run it with one to see).
#![cfg(feature = "shuttle")]

mod shuttle_common;

use rmap::host::{HostVm, HostWorld};
use rmap::Error;
use shuttle::thread;
use shuttle_common::{check, explore, migrate, read, reclaim, world, write, PAGE, RAM};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// How often, over all schedules, the control threads got a child, moved a frame and swapped
/// one out: the scenario must really exercise each (std atomics: outside the checker's view).
static FORKED: AtomicUsize = AtomicUsize::new(0);
static MIGRATED: AtomicUsize = AtomicUsize::new(0);
static RECLAIMED: AtomicUsize = AtomicUsize::new(0);

/// Iterations per scheduler in CI.
const DEFAULT: usize = 2000;
/// Pages of the VM's region: two per writing vCPU.
const PAGES: u64 = 4;

/// A value that names its page: a load of another page's value is a misplaced mapping.
fn tag(vcpu: u64, page: u64, round: u64) -> u64 {
    (vcpu + 1) << 32 | page << 8 | round
}

fn page_of_tag(value: u64) -> u64 {
    (value >> 8) & 0xff
}

/// vCPU `id` owns pages `2 id` and `2 id + 1`: two rounds of stores, each loaded back; vCPU 1
/// releases its first page in between (MEM_RELEASE) and must then read zero.
fn vcpu(w: &HostWorld, vm: &HostVm, id: u64) -> [u64; 2] {
    let pages = [2 * id, 2 * id + 1];
    let mut last = [0; 2];
    for round in 1..=2 {
        for (k, &page) in pages.iter().enumerate() {
            let ipa = RAM + page * PAGE;
            last[k] = tag(id, page, round);
            write(w, vm, ipa, last[k]);
            assert_eq!(read(w, vm, ipa), last[k], "vCPU {id}: own store lost");
        }
        if id == 1 && round == 1 {
            let ipa = RAM + pages[0] * PAGE;
            vm.release(&w.rmap, &w.machine, ipa).expect("release");
            assert_eq!(read(w, vm, ipa), 0, "a released page reads zero");
            last[0] = 0;
        }
    }
    last
}

/// Loads every page: zero or a value stored to that very page.
fn reader(w: &HostWorld, vm: &HostVm) {
    for page in 0..PAGES {
        let value = read(w, vm, RAM + page * PAGE);
        assert!(
            value == 0 || page_of_tag(value) == page,
            "page {page} holds {value:#x}, stored to another page"
        );
    }
}

/// Fork (pools may run out: then no child), a CoW store in the child, then its destruction.
fn lifecycle(w: &HostWorld, vm: &HostVm) {
    let child = match w.fork(vm) {
        Ok(child) => child,
        Err(Error::OutOfAnonVmas | Error::OutOfChains | Error::OutOfFrames) => return,
        Err(e) => panic!("fork: {e:?}"),
    };
    FORKED.fetch_add(1, Ordering::Relaxed);
    let ipa = RAM + 3 * PAGE;
    let before = read(w, &child, ipa);
    assert!(
        before == 0 || page_of_tag(before) == 3,
        "child: {before:#x}"
    );
    write(w, &child, ipa, tag(9, 3, 9));
    assert_eq!(read(w, &child, ipa), tag(9, 3, 9), "child: CoW store lost");
    w.destroy(&child);
}

/// Batched migration of every mapped frame, then reclaim of two.
fn mover(w: &HostWorld) {
    MIGRATED.fetch_add(migrate(w, &w.mapped_frames()), Ordering::Relaxed);
    let mapped = w.mapped_frames();
    let swapped = reclaim(w, &mapped[..mapped.len().min(2)]);
    RECLAIMED.fetch_add(swapped, Ordering::Relaxed);
}

fn stress() {
    let w = world(16, 6, 16);
    let vm = w.create_vm(&[(RAM, PAGES)]);
    let spawn_vcpu = |id| {
        let (w, vm) = (w.clone(), vm.clone());
        thread::spawn(move || vcpu(&w, &vm, id))
    };
    let vcpus = [spawn_vcpu(0), spawn_vcpu(1)];
    let third = {
        let (w, vm): (Arc<HostWorld>, Arc<HostVm>) = (w.clone(), vm.clone());
        thread::spawn(move || reader(&w, &vm))
    };
    let mover = {
        let w = w.clone();
        thread::spawn(move || mover(&w))
    };
    lifecycle(&w, &vm);
    mover.join().unwrap();
    let last: Vec<[u64; 2]> = vcpus.map(|v| v.join().unwrap()).to_vec();
    third.join().unwrap();
    check(&w);
    for (id, values) in last.iter().enumerate() {
        for (k, &value) in values.iter().enumerate() {
            let ipa = RAM + (2 * id as u64 + k as u64) * PAGE;
            assert_eq!(read(&w, &vm, ipa), value, "page {ipa:#x} at the end");
        }
    }
    check(&w);
    w.destroy(&vm);
    check(&w);
    assert_eq!(w.machine.allocated(), 0, "frames leaked");
    assert_eq!(
        w.rmap.live_anon_vmas() + w.rmap.live_chains(),
        0,
        "rmap objects leaked"
    );
}

#[test]
fn vcpus_fork_migrate_reclaim_release_destroy() {
    explore(DEFAULT, stress);
    let counts = [&FORKED, &MIGRATED, &RECLAIMED].map(|c| c.load(Ordering::Relaxed));
    assert!(
        counts.iter().all(|&n| n > 0),
        "(forks, moved, swapped) = {counts:?}"
    );
    eprintln!("shuttle stress: (forks, frames moved, frames swapped out) = {counts:?}");
}
