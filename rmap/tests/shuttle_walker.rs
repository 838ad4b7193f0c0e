//! Lesson 4 again, with reuse: a lockless walker'starts `lock_anon_vma_read` on VM 1's frame
//! while VM 1 is destroyed and VM 2's first fault takes the same frame (one frame in the
//! machine) and an anon_vma in the same pool slot (one slot). The walker's try-lock fast path
//! must notice, after it has the lock, that the frame's anon_vma is not the one it read: only
//! the full recheck (mapped, same slot generation, same anon_vma) does. Weakened rechecks that
//! trust "still mapped" (the two `||` mutants of `walk.rs`, docs/TESTING.md) return a lock of
//! a family that does not hold the handle they claim. Runs under both schedulers; with
//! `mutate-anon-vma-recheck` the checker must find the failure.
//!
//! Run: `cargo test -p rmap --features shuttle --test shuttle_walker`
//! (`RMAP_SHUTTLE_ITERS` raises the iterations, as for `shuttle_seeds`).
#![cfg(feature = "shuttle")]

mod shuttle_common;

use rmap::host::{HostVm, HostWorld};
use rmap::{Error, Pfn};
use shuttle::thread;
use shuttle_common::{check, frame_at, holds_unless_mutated, read, world, write, RAM};
use std::sync::Arc;

const DEFAULT: usize = 4000;

/// VM 2's first store, retried while VM 1 still holds the frame or the anon_vma slot it needs.
fn write_when_free(w: &HostWorld, vm: &HostVm, value: u64) {
    loop {
        match vm.write(&w.rmap, &w.machine, RAM, value) {
            Ok(()) => return,
            Err(Error::OutOfFrames | Error::OutOfAnonVmas) => thread::yield_now(),
            Err(e) => panic!("{e:?}"),
        }
    }
}

/// A world of `frames` frames and `anon` anon_vma slots with VM 1's one page written (its
/// frame returned) and an empty VM 2.
fn two_vms(frames: usize, anon: usize) -> (Arc<HostWorld>, Arc<HostVm>, Pfn, Arc<HostVm>) {
    let w = world(frames, anon, 4);
    let vm1 = w.create_vm(&[(RAM, 1)]);
    write(&w, &vm1, RAM, 1);
    let pfn = frame_at(&vm1, RAM);
    let vm2 = w.create_vm(&[(RAM, 1)]);
    (w, vm1, pfn, vm2)
}

fn walker_meets_reuse() {
    let (w, vm1, pfn, vm2) = two_vms(1, 2);
    let walker = {
        let w = w.clone();
        thread::spawn(move || {
            if let Some(locked) = w.rmap.lock_anon_vma_read(pfn) {
                let node = locked.family().node(locked.handle()).is_some();
                assert!(
                    node,
                    "lock_anon_vma_read locked a family without the frame's anon_vma"
                );
            }
        })
    };
    let destroyer = {
        let w = w.clone();
        thread::spawn(move || w.destroy(&vm1))
    };
    // One frame in all: VM 2's fault waits for VM 1's frame; with two anon_vma slots, VM 2's
    // anon_vma (prepared before its fault finds no frame) takes the other slot, so the
    // walker's stale handle names a dead family, not a reused one.
    write_when_free(&w, &vm2, 2);
    walker.join().unwrap();
    destroyer.join().unwrap();
    assert_eq!(read(&w, &vm2, RAM), 2);
    check(&w);
    w.destroy(&vm2);
    check(&w);
}

/// `get_anon_vma`'s increment-if-not-zero can land on a slot that was freed and reused; if
/// the reuser drops its last reference before the walker's decrement, the walker's is the
/// last and it must finish freeing the reused anon_vma (`put_stale`), or the slot leaks. VM 1
/// is destroyed, VM 2 takes the same anon_vma slot (a pool of one) and is destroyed too, all
/// while the walker pins VM 1's frame's anon_vma; at the end nothing may be left.
fn pin_meets_reuse_and_release() {
    let (w, vm1, pfn, vm2) = two_vms(2, 1);
    let walker = {
        let w = w.clone();
        thread::spawn(move || drop(w.rmap.get_anon_vma(pfn)))
    };
    w.destroy(&vm1);
    write_when_free(&w, &vm2, 2);
    w.destroy(&vm2);
    walker.join().unwrap();
    check(&w);
    assert_eq!(w.rmap.live_anon_vmas(), 0, "an anon_vma slot leaked");
}

#[test]
fn a_stale_pin_that_is_last_frees_the_reused_anon_vma() {
    holds_unless_mutated(DEFAULT, pin_meets_reuse_and_release, false, &[]);
}

#[test]
fn walker_meets_frame_and_anon_vma_reuse() {
    let mutated = cfg!(feature = "mutate-anon-vma-recheck");
    holds_unless_mutated(
        DEFAULT,
        walker_meets_reuse,
        mutated,
        &["locked a family without the frame's anon_vma"],
    );
}
