//! Concurrency the hypervisor really has (issue 13, item 3), on the host backend: each VM runs
//! 2–4 vCPU threads faulting the same VM at once (reads, writes, CoW after a snapshot or a
//! clone, swap-ins, MEM_RELEASE, 2 MiB first touches), while per VM an event thread takes a
//! snapshot, restores to it (hyp's chunked break / flush / make sequence) or destroys the VM
//! under its running vCPUs, and two movers migrate and reclaim (single frames and batches;
//! the swap store reuses freed slot numbers at once), and a merger merges pages of any two
//! VMs (untouched pages of 2 MiB blocks are alike; most others differ) under their running
//! vCPUs, whose writes unmerge them. Frame, table-page, swap and pool
//! budgets are small or cut per round, so allocations fail at times; every failure must be
//! handled.
//!
//! The run is in rounds; after each, with every thread joined, `HostWorld::check` (TLB model
//! failures, TLB ⊆ stage 2, mapcounts = leaves, refcounts, free list, swap references, chains
//! and anon_vma counters) and the contents: each vCPU owns some pages and knows their exact
//! values; shared pages must hold 0 or a value of the VM's own lineage (a reused swap slot
//! or a stale translation shows up as another VM's value); a snapshot must still hold what
//! its VM held when it was taken. At the end everything is destroyed and nothing may leak.
//!
//! `RMAP_STRESS_ROUNDS` (default 300) and `RMAP_STRESS_SEED` select the run; the seed and
//! round are printed on failure. Thread interleavings are not reproducible, each thread's
//! sequence of operations is.

use merger::merger;
use rmap::host::{page_ipa, HostWorld, SwapOp, BLOCK_PAGES};
use rmap::Error;
use rmap::{Ipa, Pfn};
use std::sync::atomic::Ordering;
use std::sync::Barrier;
use std::thread;

const RAM: Ipa = Ipa::new(0x4000_0000);
/// A region of exactly one 2 MiB chunk, for first-touch blocks.
const BLOCK: Ipa = RAM.offset(0x40_0000);
const REGIONS: [(Ipa, u64); 3] = [(RAM, 24), (RAM.offset(0x20_0000), 12), (BLOCK, BLOCK_PAGES)];
/// Pages of the first region are owned (written by one vCPU each, `page % vcpus`); the
/// second region and a few pages of the block are shared by all vCPUs.
const OWNED: u64 = 24;
const SLOTS: usize = 2;
const OPS: usize = 300;

#[path = "stress_vcpus/merger.rs"]
mod merger;
#[path = "stress_vcpus/slot.rs"]
mod slot;
use slot::{tagged, Counters, Rng, Slot, Snapshot};

fn shared_pages() -> Vec<Ipa> {
    (0..REGIONS[1].1)
        .map(|i| page_ipa(REGIONS[1].0, i))
        .chain([0, 1, 200, 511].map(|i| page_ipa(BLOCK, i)))
        .collect()
}

fn all_pages() -> Vec<Ipa> {
    (0..OWNED)
        .map(|i| page_ipa(RAM, i))
        .chain(shared_pages())
        .collect()
}

/// The pages one vCPU uses: the owned pages it alone writes, the shared ones, all.
struct Pages {
    mine: Vec<Ipa>,
    shared: Vec<Ipa>,
    all: Vec<Ipa>,
}

/// One vCPU of `slot`: `OPS` guest operations, each with the VM's run gate held for read
/// (a snapshot or restore waits for them, as hyp quiesces the VM). Returns at once when the
/// VM was destroyed under it.
fn vcpu(w: &HostWorld, slot: &Slot, me: u64, seed: u64, c: &Counters) {
    let mut rng = Rng::new(seed);
    let (vm, n) = (&slot.vm, slot.vcpus as u64);
    let pages = Pages {
        mine: (0..OWNED)
            .filter(|i| i % n == me)
            .map(|i| page_ipa(RAM, i))
            .collect(),
        shared: shared_pages(),
        all: all_pages(),
    };
    for k in 0..OPS {
        let _run = slot.gate.read().unwrap();
        if slot.pending_restore.load(Ordering::SeqCst) {
            return; // half restored: the controller finishes it before the VM runs again
        }
        slot.ops.fetch_add(1, Ordering::Relaxed);
        // Another vCPU of this VM is inside an operation too: real same-VM concurrency.
        let busy = slot.active.fetch_add(1, Ordering::SeqCst);
        c.overlapping
            .fetch_add(u64::from(busy > 0), Ordering::Relaxed);
        let r = guest_op(w, slot, &mut rng, &pages, seed << 8 | k as u64, c);
        slot.active.fetch_sub(1, Ordering::SeqCst);
        match r {
            Ok(()) => {}
            Err(Error::NoRegion) => {
                assert!(slot.dead.load(Ordering::SeqCst), "{:?}: no region", vm.id);
                c.dead_vcpu_ops.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) => c.failed(e, &format!("{:?}: guest operation", vm.id)),
        }
    }
}

/// One guest operation: a store or load of an owned or shared page, a MEM_RELEASE, or a
/// 2 MiB first touch. Owned pages' values are exact, others' checked by tag.
/// One of `items`, chosen by `rng`.
fn pick<T: Copy>(rng: &mut Rng, items: &[T]) -> T {
    items[rng.below(items.len())]
}

fn guest_op(
    w: &HostWorld,
    slot: &Slot,
    rng: &mut Rng,
    p: &Pages,
    n: u64,
    c: &Counters,
) -> Result<(), Error> {
    let (vm, rmap, m) = (&slot.vm, &w.rmap, &w.machine);
    let op = rng.below(100);
    match op {
        0..=34 => {
            let ipa = pick(rng, &p.mine);
            let value = tagged(slot.lineage, ipa, n);
            vm.write(rmap, m, ipa, value).map(|()| slot.set(ipa, value))
        }
        35..=49 => {
            let ipa = pick(rng, &p.mine);
            let got = vm.read(rmap, m, ipa)?;
            assert_eq!(got, slot.get(ipa), "{:?} own {ipa:#x}", vm.id);
            Ok(())
        }
        50..=66 => {
            let ipa = pick(rng, &p.all);
            let got = vm.read(rmap, m, ipa)?;
            slot.assert_lineage(ipa, got);
            Ok(())
        }
        67..=79 => {
            let ipa = pick(rng, &p.shared);
            vm.write(rmap, m, ipa, tagged(slot.lineage, ipa, n))
        }
        80..=88 => {
            let ipa = pick(rng, &p.mine);
            c.releases.fetch_add(1, Ordering::Relaxed);
            vm.release(rmap, m, ipa).map(|()| slot.set(ipa, 0))
        }
        89..=94 => {
            let (ipa, pages) = (pick(rng, &p.shared), 1 + pick(rng, &[0, 1, 2, 3]));
            c.releases.fetch_add(1, Ordering::Relaxed);
            vm.release_range(rmap, m, ipa, pages * 4096)
        }
        _ => {
            c.blocks
                .fetch_add(u64::from(w.fault_block(vm, BLOCK)), Ordering::Relaxed);
            Ok(())
        }
    }
}

/// The slot's event for this round, run alongside its vCPUs.
fn event(w: &HostWorld, slot: &Slot, seed: u64, c: &Counters) {
    let mut rng = Rng::new(seed);
    // Somewhere in the middle of the vCPUs' run (they keep running around a destroy; a
    // snapshot or restore waits for the operations in flight and holds the rest off).
    let at = rng.below(OPS * slot.vcpus) as u64;
    while slot.ops.load(Ordering::Relaxed) < at && slot.finished.load(Ordering::SeqCst) < slot.vcpus
    {
        thread::yield_now();
    }
    match rng.below(10) {
        0..=2 => {
            let _quiet = slot.gate.write().unwrap();
            match w.fork(&slot.vm) {
                Ok(vm) => {
                    let model = slot.model.lock().unwrap().clone();
                    let old = slot
                        .snapshot
                        .lock()
                        .unwrap()
                        .replace(Snapshot { vm, model });
                    c.snapshots.fetch_add(1, Ordering::Relaxed);
                    if let Some(old) = old {
                        w.destroy(&old.vm);
                    }
                }
                Err(e) => c.failed(e, "snapshot"),
            }
        }
        3..=5 => restore(w, slot, c),
        6 => {
            slot.dead.store(true, Ordering::SeqCst);
            w.destroy(&slot.vm);
            if let Some(s) = slot.snapshot.lock().unwrap().take() {
                w.destroy(&s.vm);
            }
            c.destroys.fetch_add(1, Ordering::Relaxed);
        }
        7 => {
            if let Some(s) = slot.snapshot.lock().unwrap().take() {
                w.destroy(&s.vm);
            }
        }
        _ => {}
    }
}

/// Restores the slot's VM to its snapshot with its vCPUs held out; a restore that runs out
/// of table pages leaves the VM for the controller to finish before it runs again.
fn restore(w: &HostWorld, slot: &Slot, c: &Counters) {
    let _quiet = slot.gate.write().unwrap();
    let snap = slot.snapshot.lock().unwrap();
    let Some(snap) = snap.as_ref() else {
        return;
    };
    match w.restore(&slot.vm, &snap.vm) {
        Ok(()) => {
            *slot.model.lock().unwrap() = snap.model.clone();
            slot.pending_restore.store(false, Ordering::SeqCst);
            c.restores.fetch_add(1, Ordering::Relaxed);
        }
        Err(Error::OutOfFrames) => {
            slot.pending_restore.store(true, Ordering::SeqCst);
            c.restore_failures.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => panic!("restore: {e:?}"),
    }
}

/// A migrator (`reclaim` false) or reclaimer: single frames and batches of the frame table.
fn mover(w: &HostWorld, reclaim: bool, seed: u64, c: &Counters) {
    let mut rng = Rng::new(seed);
    let (frames, m) = (w.rmap.frames(), &w.machine);
    for _ in 0..OPS {
        if reclaim && rng.below(8) == 0 {
            // Widen the window in which a swap-in uses its slot (after the count is read,
            // after the contents are copied out): MEM_RELEASE and slot reuse get in there.
            let pause = std::time::Duration::from_micros(20);
            m.on_next(SwapOp::Refs, move |_| thread::sleep(pause));
            m.on_next(SwapOp::Load, move |_| thread::sleep(pause));
        }
        let start = rng.below(frames.len());
        if rng.below(3) == 0 {
            let len = 1 + rng.below(48);
            let batch: Vec<Pfn> = (start..(start + len).min(frames.len()))
                .map(|i| frames.base() + i as u64)
                .collect();
            // Every skip reason is legitimate under pressure; none may lose a page.
            let moved = if reclaim {
                let mut out = Vec::new();
                w.rmap.reclaim_frames(&w.vms, m, m, &batch, &mut out);
                out.iter().filter(|r| r.is_ok()).count()
            } else {
                let mut out = Vec::new();
                w.rmap.migrate_frames(&w.vms, m, &batch, &mut out);
                out.iter().filter(|r| r.is_ok()).count()
            };
            c.moved.fetch_add(moved as u64, Ordering::Relaxed);
            continue;
        }
        // Half the time a frame that is mapped now (most of the table is free).
        let mapped = if rng.below(2) == 0 {
            w.mapped_frames()
        } else {
            Vec::new()
        };
        let pfn = match mapped.len() {
            0 => frames.base() + start as u64,
            n => mapped[start % n],
        };
        let r = if reclaim {
            w.rmap.referenced(pfn, &w.vms);
            w.rmap.reclaim_frame(&w.vms, m, m, pfn).map(|_| ())
        } else {
            w.rmap.migrate_frame(&w.vms, m, pfn).map(|_| ())
        };
        match r {
            Ok(()) => {
                c.moved.fetch_add(1, Ordering::Relaxed);
            }
            Err(Error::NotMapped | Error::Busy) => {}
            Err(Error::OutOfFrames | Error::OutOfSwap) => {
                c.mover_failures.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => panic!("mover: {e:?}"),
        }
    }
}

/// Between rounds (nothing runs): finishes half-done restores, drops destroyed VMs and
/// fills empty slots, a new VM or a clone (fork) of another slot's.
fn refill(
    w: &HostWorld,
    slots: &mut [Option<Slot>],
    rng: &mut Rng,
    lineages: &mut u64,
    c: &Counters,
) {
    for s in slots.iter_mut().flatten() {
        if s.pending_restore.load(Ordering::SeqCst) {
            let guard = s.snapshot.lock().unwrap();
            let snap = guard
                .as_ref()
                .expect("a pending restore keeps its snapshot");
            w.restore(&s.vm, &snap.vm).expect("restore with no budget");
            *s.model.lock().unwrap() = snap.model.clone();
            drop(guard);
            s.pending_restore.store(false, Ordering::SeqCst);
        }
    }
    for slot in slots.iter_mut() {
        if slot.as_ref().is_some_and(|s| s.dead.load(Ordering::SeqCst)) {
            *slot = None;
        }
    }
    for i in 0..slots.len() {
        if slots[i].is_some() {
            continue;
        }
        // An 8-bit tag, never 0; a number comes back only after 255 newer VMs, long after
        // every VM that could hold it is gone.
        *lineages = *lineages % 255 + 1;
        // Drawn whatever happens next, so the plan does not depend on which fork failed.
        let (vcpus, clone, block) = (2 + rng.below(3), rng.below(2) == 0, rng.below(2) == 0);
        let parent = slots.iter().flatten().next().filter(|_| clone);
        let clone = parent.map(|p| (p, w.fork(&p.vm)));
        slots[i] = Some(match clone {
            Some((p, Ok(vm))) => p.clone_into(vm, *lineages, vcpus),
            _ => {
                let vm = w.create_vm(&REGIONS);
                // Half the fresh VMs start with their 2 MiB block (hyp's first touch).
                if block && w.fault_block(&vm, BLOCK) {
                    c.blocks.fetch_add(1, Ordering::Relaxed);
                }
                Slot::new(vm, *lineages, vcpus)
            }
        });
    }
}

/// One round: budgets cut at random, then every thread runs its operations concurrently.
fn round(w: &HostWorld, slots: &[Option<Slot>], seed: u64, c: &Counters) {
    let mut rng = Rng::new(seed);
    let tables = (rng.below(3) == 0).then(|| rng.below(6) as u64);
    let frames = (rng.below(4) == 0).then(|| rng.below(64) as u64);
    let swap = if rng.below(4) == 0 {
        1 + rng.below(64)
    } else {
        1024
    };
    w.hw().set_table_budget(tables);
    w.machine.set_frame_budget(frames);
    w.machine.set_swap_capacity(swap);
    let live: Vec<&Slot> = slots.iter().flatten().collect();
    let threads = live.iter().map(|s| s.vcpus + 1).sum::<usize>() + 3;
    // Everyone starts together, so the vCPUs of one VM really overlap.
    let start = &Barrier::new(threads);
    thread::scope(|s| {
        for (i, &slot) in live.iter().enumerate() {
            for me in 0..slot.vcpus {
                let seed = rng.next();
                s.spawn(move || {
                    start.wait();
                    vcpu(w, slot, me as u64, seed, c);
                    slot.finished.fetch_add(1, Ordering::SeqCst);
                });
            }
            let seed = rng.next() ^ i as u64;
            s.spawn(move || {
                start.wait();
                event(w, slot, seed, c)
            });
        }
        for reclaim in [false, true] {
            let seed = rng.next();
            s.spawn(move || {
                start.wait();
                mover(w, reclaim, seed, c)
            });
        }
        let (seed, live) = (rng.next(), &live);
        s.spawn(move || {
            start.wait();
            merger(w, live, seed, c)
        });
    });
    w.hw().set_table_budget(None);
    w.machine.set_frame_budget(None);
}

/// Prints how to reproduce if a check (or a worker) panics in this round.
struct OnFailure(u64, usize);
impl Drop for OnFailure {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "stress_vcpus failed: RMAP_STRESS_SEED={:#x}, round {}",
                self.0, self.1
            );
        }
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| {
        let v = v.trim();
        v.strip_prefix("0x")
            .map_or_else(|| v.parse(), |h| u64::from_str_radix(h, 16))
            .unwrap_or_else(|_| panic!("{name}={v}: not a number"))
    })
}

#[test]
fn vcpus_fault_one_vm_while_it_is_released_restored_destroyed_moved_and_starved() {
    let seed = env("RMAP_STRESS_SEED", 0x5eed_0013);
    let rounds = env("RMAP_STRESS_ROUNDS", 300) as usize;
    // 4096 frames: room for a few 2 MiB blocks, not for many; tight pools; swap cut per round.
    let w = HostWorld::with_swap(4096, 8, 12, 26, 1024);
    let c = Counters::default();
    let mut rng = Rng::new(seed);
    let mut slots: Vec<Option<Slot>> = (0..SLOTS).map(|_| None).collect();
    let mut lineages = 0;
    let start = std::time::Instant::now();
    for r in 0..rounds {
        let _context = OnFailure(seed, r);
        refill(&w, &mut slots, &mut rng, &mut lineages, &c);
        round(&w, &slots, rng.next(), &c);
        if let Err(e) = w.check() {
            panic!("round {r}: {e}");
        }
        let owned: Vec<Ipa> = (0..OWNED).map(|i| page_ipa(RAM, i)).collect();
        for s in slots.iter().flatten() {
            s.check_contents(&w, &owned, &shared_pages());
        }
        for s in slots.iter_mut().flatten() {
            s.next_round();
        }
    }
    let _context = OnFailure(seed, rounds);
    for s in slots.into_iter().flatten() {
        s.destroy(&w);
    }
    w.check().unwrap();
    println!(
        "{rounds} rounds in {:?}: {c:?}; frame allocations refused {}, table pages refused {}, \
         swap {:?}",
        start.elapsed(),
        w.machine.frame_failures(),
        w.hw().out_of_memory_count(),
        w.machine.swap_stats()
    );
    assert!(w.rmap.swap_cache_entries().is_empty(), "swap cache left");
    assert!(w.machine.swap_refs().is_empty(), "swap slots left");
    assert_eq!(w.machine.allocated(), 0, "frames left");
    assert_eq!(w.rmap.live_anon_vmas(), 0, "anon_vmas left");
    assert_eq!(w.rmap.live_chains(), 0, "chains left");
    assert_eq!(
        w.rmap.live_merge_objects(),
        (0, 0),
        "stable nodes or items left"
    );
    assert!(w.hw().failures().is_empty());
    // The run did what it is for (all fixed by the seed's plan, not by the interleaving).
    assert!(c.snapshots.load(Ordering::Relaxed) > 0 && c.destroys.load(Ordering::Relaxed) > 0);
    assert!(w.machine.frame_failures() > 0, "frame budget never bit");
    assert!(
        c.pool_failures.load(Ordering::Relaxed) > 0,
        "pools never ran out"
    );
    let swap = w.machine.swap_stats();
    assert!(swap.reused > 0 && swap.loads > 0, "{swap:?}");
    assert!(c.merged.load(Ordering::Relaxed) > 0 && c.merge_differ.load(Ordering::Relaxed) > 0);
}
