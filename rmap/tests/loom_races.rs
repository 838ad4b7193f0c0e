//! loom models of the five seed races and of the swap-in / MEM_RELEASE race, each with the
//! fix and with the fix removed.
//!
//! Each model is the crate's protocol in miniature, with loom's atomics, locks and
//! `UnsafeCell` (which reports unsynchronised access) in place of ours; the comment on each
//! names the crate code it mirrors. `*_fixed` tests must pass for every explored interleaving;
//! `*_broken_is_caught` tests run the same model with the fix removed (`Variant::Broken`) and
//! assert that loom finds a violating interleaving, so each model is known to be able to fail.
//!
//! Bounded runs (preemption bound 3) are part of `cargo test -p rmap`; the unbounded ones are
//! `#[ignore]`d: `cargo test -p rmap --release --test loom_races -- --ignored`.
#![deny(clippy::undocumented_unsafe_blocks)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use loom::sync::{Arc, Mutex, RwLock};
use loom::thread;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Appends to a chain index. loom's `UnsafeCell` tracks every access: an access that is not
/// ordered by a lock against a concurrent one is reported, which is what the broken variants
/// provoke.
fn push(cell: &UnsafeCell<Vec<u32>>, value: u32) {
    // SAFETY: the models' protocol (or, in a broken variant, loom's race detector before any
    // real overlap can happen: loom runs one thread at a time) makes this access exclusive.
    cell.with_mut(|c| unsafe { (*c).push(value) });
}

/// Reads a chain index's length (see [`push`]).
fn len(cell: &UnsafeCell<Vec<u32>>) -> usize {
    // SAFETY: as in `push`; writers are excluded by the lock or reported by loom.
    cell.with(|c| unsafe { (*c).len() })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Fixed,
    Broken,
}
use Variant::{Broken, Fixed};

fn explore(bound: Option<usize>, model: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = bound;
    builder.check(model);
}

fn holds(model: fn(Variant)) {
    explore(Some(3), move || model(Fixed));
}

/// Runs the broken variant; loom must report a violation whose message contains `expect`
/// (our assertion, or loom's own "Causality violation" for an unsynchronised access).
fn caught(model: fn(Variant), expect: &str) {
    let found = catch_unwind(AssertUnwindSafe(|| explore(Some(3), move || model(Broken))));
    let payload = found.expect_err("loom found no violation in the broken variant");
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(message.contains(expect), "unexpected failure: {message}");
}

// ---------------------------------------------------------------------------------------
// 1. Publish of a new anon_vma vs a lockless walker (lesson 1; `Rmap::prepare_new`,
//    `Rmap::anon_vma_fork`). The walker holds a stale handle to a slot that is being reused:
//    type-stable memory lets it lock that slot. The new owner must hold the (root) lock while
//    it fills the chain index and publishes the anon_vma, or the walker reads a half-built
//    index. The fix is structural in the crate (the index lives inside the lock).

struct AnonSlot {
    lock: RwLock<()>,
    chains: UnsafeCell<Vec<u32>>,
    published: AtomicBool,
}

fn publish_model(variant: Variant) {
    let slot = Arc::new(AnonSlot {
        lock: RwLock::new(()),
        chains: UnsafeCell::new(Vec::new()),
        published: AtomicBool::new(false),
    });
    let walker = {
        let slot = slot.clone();
        thread::spawn(move || {
            // Stale handle: lock the slot, walk whatever index it has.
            let _g = slot.lock.read().unwrap();
            len(&slot.chains)
        })
    };
    let link = |slot: &AnonSlot| {
        push(&slot.chains, 1);
        slot.published.store(true, Ordering::Release);
    };
    match variant {
        Fixed => {
            let _g = slot.lock.write().unwrap();
            link(&slot);
        }
        Broken => link(&slot),
    }
    let seen = walker.join().unwrap();
    assert!(seen <= 1);
}

#[test]
fn publish_fixed() {
    holds(publish_model);
}

#[test]
fn publish_broken_is_caught() {
    caught(publish_model, "Causality violation");
}

// ---------------------------------------------------------------------------------------
// 2. Adopting a neighbour's anon_vma vs a concurrent link into it (lesson 2; `Rmap::adopt`
//    vs `Rmap::anon_vma_fork`). Both insert into the same anon_vma's chain index; the adopter
//    must take that family's lock like everyone else (the 2010 anon_vma list locking bug).

fn adopt_model(variant: Variant) {
    let family = Arc::new((Mutex::new(()), UnsafeCell::new(Vec::<u32>::new())));
    let forker = {
        let family = family.clone();
        thread::spawn(move || {
            let _g = family.0.lock().unwrap();
            push(&family.1, 2);
        })
    };
    let adopt = || push(&family.1, 1);
    match variant {
        Fixed => {
            let _g = family.0.lock().unwrap();
            adopt();
        }
        Broken => adopt(),
    }
    forker.join().unwrap();
    let len = len(&family.1);
    assert_eq!(len, 2, "a chain was lost");
}

#[test]
fn adopt_fixed() {
    holds(adopt_model);
}

#[test]
fn adopt_broken_is_caught() {
    caught(adopt_model, "Causality violation");
}

// ---------------------------------------------------------------------------------------
// 3. Walker vs free and reuse of the anon_vma (lesson 4; `Pool::try_get`,
//    `Rmap::get_anon_vma`). The frame's handle is read without a lock. The unmapper zaps the
//    last mapping and unlinks, freeing the anon_vma; the slot is immediately reused by a new
//    owner. The walker must pin with increment-if-not-zero and verify the generation (and that
//    the frame is still mapped) before trusting what it pinned.

const OLD: u32 = 1;
const NEW: u32 = 2;

struct Reuse {
    gen: AtomicU32,
    refs: AtomicU32,
    owner: AtomicU32,
    frame_handle: AtomicU32,
    frame_mapped: AtomicBool,
}

impl Reuse {
    fn put(&self) {
        if self.refs.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Free, then the pool hands the slot to a new owner (type-stable: same memory).
            self.gen.fetch_add(1, Ordering::Release);
            self.owner.store(NEW, Ordering::Relaxed);
            self.refs.store(1, Ordering::Release);
        }
    }

    fn inc_not_zero(&self) -> bool {
        let mut refs = self.refs.load(Ordering::Relaxed);
        while refs != 0 {
            match self
                .refs
                .compare_exchange(refs, refs + 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(seen) => refs = seen,
            }
        }
        false
    }
}

fn reuse_model(variant: Variant) {
    let s = Arc::new(Reuse {
        gen: AtomicU32::new(1),
        refs: AtomicU32::new(1),
        owner: AtomicU32::new(OLD),
        frame_handle: AtomicU32::new(1),
        frame_mapped: AtomicBool::new(true),
    });
    let walker = {
        let s = s.clone();
        thread::spawn(move || {
            let handle = s.frame_handle.load(Ordering::Acquire);
            if !s.frame_mapped.load(Ordering::Acquire) {
                return;
            }
            let pinned = match variant {
                Fixed => {
                    s.inc_not_zero()
                        && if s.gen.load(Ordering::Acquire) == handle
                            && s.frame_mapped.load(Ordering::Acquire)
                        {
                            true
                        } else {
                            s.put();
                            false
                        }
                }
                Broken => {
                    s.refs.fetch_add(1, Ordering::Acquire);
                    true
                }
            };
            if pinned {
                let owner = s.owner.load(Ordering::Relaxed);
                assert_eq!(owner, OLD, "walker acted on a reused anon_vma");
                s.put();
            }
        })
    };
    // Unmapper: zap the last mapping, unlink (drops the chains' reference: frees).
    s.frame_mapped.store(false, Ordering::Release);
    s.put();
    walker.join().unwrap();
}

#[test]
fn reuse_fixed() {
    holds(reuse_model);
}

#[test]
fn reuse_broken_is_caught() {
    caught(reuse_model, "walker acted on a reused anon_vma");
}

// ---------------------------------------------------------------------------------------
// 4. Unlink vs a walker reaching freed stage-2 tables (lesson 5; `Rmap::destroy_vm` returning
//    `UnlinkProof`, `Stage2::free_tables`). The walker finds the region through its chain under
//    the root's read lock, then locks the VM's stage-2. Tables may be freed only after the
//    region was unlinked under the root's write lock.

fn unlink_model(variant: Variant) {
    let root = Arc::new(RwLock::new(true)); // chain linked?
    let tables_freed = Arc::new(Mutex::new(false)); // the VM's stage-2 lock and its state
    let walker = {
        let (root, tables) = (root.clone(), tables_freed.clone());
        thread::spawn(move || {
            let linked = root.read().unwrap();
            if *linked {
                let freed = tables.lock().unwrap();
                assert!(!*freed, "walker reached freed stage-2 tables");
            }
        })
    };
    let unlink = || *root.write().unwrap() = false;
    let free_tables = || *tables_freed.lock().unwrap() = true;
    match variant {
        Fixed => {
            unlink();
            free_tables();
        }
        Broken => {
            free_tables();
            unlink();
        }
    }
    walker.join().unwrap();
}

#[test]
fn unlink_fixed() {
    holds(unlink_model);
}

#[test]
fn unlink_broken_is_caught() {
    caught(unlink_model, "walker reached freed stage-2 tables");
}

// ---------------------------------------------------------------------------------------
// 5. Fork vs walk (lesson 3, "new chains at the tail"; `IntervalIndex::insert`,
//    `Rmap::fork_vm`, `Rmap::remove_migration_entries`). The parent holds a migration entry.
//    Fork links the child's chain, then copies the parent's entry under both stage-2 locks.
//    The migration walk replaces every migration entry it finds, visiting chains in index
//    order. With the child at the tail, an entry copied after the walk passed the parent is
//    already the new page, and one copied before is found when the walk reaches the child.

const MIGRATION: u32 = 1;
const NEW_PAGE: u32 = 2;
const INVALID: u32 = 0;

fn fork_walk_model(variant: Variant) {
    let chains = Arc::new(RwLock::new(vec![0usize])); // region 0 = parent
    let tables = Arc::new([Mutex::new(MIGRATION), Mutex::new(INVALID)]);
    let walker = {
        let (chains, tables) = (chains.clone(), tables.clone());
        thread::spawn(move || {
            let order = chains.read().unwrap();
            for &region in order.iter() {
                let mut entry = tables[region].lock().unwrap();
                if *entry == MIGRATION {
                    *entry = NEW_PAGE;
                }
            }
        })
    };
    {
        let mut order = chains.write().unwrap();
        match variant {
            Fixed => order.push(1),
            Broken => order.insert(0, 1),
        }
    }
    {
        let parent = tables[0].lock().unwrap();
        let mut child = tables[1].lock().unwrap();
        *child = *parent;
    }
    walker.join().unwrap();
    for table in tables.iter() {
        assert_ne!(
            *table.lock().unwrap(),
            MIGRATION,
            "a migration entry was left behind"
        );
    }
}

#[test]
fn fork_walk_fixed() {
    holds(fork_walk_model);
}

#[test]
fn fork_walk_broken_is_caught() {
    caught(fork_walk_model, "a migration entry was left behind");
}

// ---------------------------------------------------------------------------------------
// 6. Swap-in vs MEM_RELEASE and slot reuse (issue 12, item 3; `Rmap::fault_locked`,
//    `SwapStore::try_dup`, hyp `mm::release`). The fault reads `Swap(1)` under the stage-2
//    lock, loads slot 1 unlocked, then installs with a CAS on `Swap(1)`. MEM_RELEASE clears
//    the entry and drops its slot reference; the guest writes the page again and reclaim
//    stores it, reusing the lowest free slot number. The fault must hold its own reference
//    (taken while the lock shows the entry), or it loads a free slot or installs the stale
//    page over the newer one (the CAS sees `Swap(1)` again: ABA).

const SWAP_1: u32 = 1;
const SWAP_2: u32 = 2;
const PAGE: u32 = 100; // PAGE + contents
const OLD_DATA: u32 = 10;
const NEW_DATA: u32 = 20;

/// Slot 1's references and contents (the store's lock, innermost); slot 2 always holds
/// NEW_DATA once used.
struct Slot1 {
    refs: u32,
    data: u32,
}

/// The fault of model 6: with the fix, its own slot reference is taken under the table lock.
fn swap_in(table: &Mutex<u32>, store: &Mutex<Slot1>, variant: Variant) {
    let held = {
        let entry = table.lock().unwrap();
        let mut slot = store.lock().unwrap();
        let take = variant == Fixed && *entry == SWAP_1 && slot.refs > 0;
        slot.refs += u32::from(take);
        take
    };
    if variant == Fixed && !held {
        return;
    }
    let data = {
        let slot = store.lock().unwrap();
        assert!(
            slot.refs > 0,
            "slot reused under the fault: load of a free slot"
        );
        slot.data
    };
    let installed = {
        let mut entry = table.lock().unwrap();
        let same = *entry == SWAP_1;
        if same {
            *entry = PAGE + data;
        }
        same
    };
    let puts = u32::from(installed) + u32::from(held);
    store.lock().unwrap().refs -= puts;
}

fn swap_release_model(variant: Variant) {
    let table = Arc::new(Mutex::new(SWAP_1));
    let store = Arc::new(Mutex::new(Slot1 {
        refs: 1,
        data: OLD_DATA,
    }));
    let fault = {
        let (table, store) = (table.clone(), store.clone());
        thread::spawn(move || swap_in(&table, &store, variant))
    };
    // MEM_RELEASE, then the guest's store to the page and its reclaim.
    let dropped = std::mem::replace(&mut *table.lock().unwrap(), INVALID) == SWAP_1;
    store.lock().unwrap().refs -= u32::from(dropped);
    let reused = {
        let mut slot = store.lock().unwrap();
        let free = slot.refs == 0;
        if free {
            *slot = Slot1 {
                refs: 1,
                data: NEW_DATA,
            };
        }
        free
    };
    *table.lock().unwrap() = if reused { SWAP_1 } else { SWAP_2 };
    fault.join().unwrap();
    let entry = *table.lock().unwrap();
    let slot = store.lock().unwrap();
    let data = match entry {
        SWAP_1 => slot.data,
        SWAP_2 => NEW_DATA,
        page => page - PAGE,
    };
    assert_eq!(
        data, NEW_DATA,
        "slot reused under the fault: stale page installed"
    );
    assert_eq!(slot.refs, u32::from(entry == SWAP_1), "slot references");
}

#[test]
fn swap_release_fixed() {
    holds(swap_release_model);
}

#[test]
fn swap_release_broken_is_caught() {
    caught(swap_release_model, "slot reused under the fault");
}

// ---------------------------------------------------------------------------------------
// Unbounded (exhaustive) runs of the fixed models.

#[test]
#[ignore = "exhaustive: cargo test -p rmap --release --test loom_races -- --ignored"]
fn all_fixed_models_exhaustive() {
    for model in [
        publish_model,
        adopt_model,
        reuse_model,
        unlink_model,
        fork_walk_model,
        swap_release_model,
    ] {
        explore(None, move || model(Fixed));
    }
}
