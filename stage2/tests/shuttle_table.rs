//! The stage-2 table's own code under shuttle (feature `shuttle`, which makes the crate's
//! atomics and spin-waits shuttle's: `src/sync.rs`): racing remaps that go through
//! break-before-make (the slot `Locked` for a moment) and a "hardware" Access-flag updater
//! lose nothing, under the randomised and the PCT scheduler. With feature
//! `mutate-bbm-blind-lock` (the break takes the slot by a blind store instead of a CAS) the
//! checker must find the lost update.
//!
//! Iterations: `STAGE2_SHUTTLE_ITERS` (default 2000 per scheduler).
//! Run: `cargo test -p stage2 --features shuttle --test shuttle_table` (and with
//! `--features mutate-bbm-blind-lock` for the broken variant; `cargo xtask test` runs both).
#![cfg(feature = "shuttle")]

use shuttle::sync::Arc;
use shuttle::thread;
use stage2::*;

const IPA: u64 = 0x4000_0000;
const PA: u64 = 0x1_0000_0000;
const WORKERS: u64 = 2;
const REMAPS: u64 = 2;

fn iterations() -> usize {
    std::env::var("STAGE2_SHUTTLE_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// One remap of the page to the next frame, as a lockless fault handler does it: wait out
/// a `Locked` slot, retry on a mismatch.
fn remap_once(t: &Stage2Table<&'static HostMemory>, tlb: &RecordingTlb) {
    loop {
        let Some(l) = t.lookup(Ipa::new(IPA)) else {
            thread::yield_now();
            continue;
        };
        let Some(m) = l.mapping() else {
            thread::yield_now(); // another remap's break-before-make owns the slot
            continue;
        };
        let new = Descriptor::page((m.pa + 4096).raw(), m.attrs)
            .unwrap()
            .with_young(m.young);
        match t.compare_exchange_leaf(Ipa::new(IPA), l.level, l.desc, new, tlb) {
            Ok(()) => return,
            Err(CasError::Mismatch(_)) => thread::yield_now(),
            Err(e) => panic!("{e:?}"),
        }
    }
}

fn scenario() {
    let mem: &'static HostMemory = Box::leak(Box::new(HostMemory::new(16)));
    let cfg = S2Config::new(2, 40, VmidBits::Eight).unwrap();
    let t = Arc::new(Stage2Table::new(cfg, 3, mem).unwrap());
    let tlb = Arc::new(RecordingTlb::new());
    t.map_pages(
        Ipa::new(IPA),
        Pa::new(PA),
        4096,
        S2Attrs::normal(Perm::RW),
        &*tlb,
    )
    .unwrap();
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (t, tlb) = (t.clone(), tlb.clone());
            thread::spawn(move || (0..REMAPS).for_each(|_| remap_once(&t, &tlb)))
        })
        .collect();
    // The hardware side: clears then sets the Access flag by its own CAS, so the remaps'
    // compare-and-swaps keep losing races and retrying. (The flag's final value is not
    // checked: setting it on a slot that a break-before-make holds `Locked` finds no valid
    // leaf and does nothing, as the hardware would fault instead.)
    let aging = {
        let t = t.clone();
        thread::spawn(move || {
            t.test_and_clear_young(Ipa::new(IPA));
            t.mkyoung(Ipa::new(IPA));
        })
    };
    workers.into_iter().for_each(|w| w.join().unwrap());
    aging.join().unwrap();
    let m = t.lookup(Ipa::new(IPA)).unwrap().mapping().unwrap();
    assert_eq!(m.pa.raw(), PA + WORKERS * REMAPS * 4096, "a remap was lost");
}

#[test]
#[cfg_attr(feature = "mutate-bbm-blind-lock", should_panic(expected = "was lost"))]
fn racing_remaps_and_access_flag_updates_random() {
    shuttle::check_random(scenario, iterations());
}

#[test]
#[cfg_attr(feature = "mutate-bbm-blind-lock", should_panic(expected = "was lost"))]
fn racing_remaps_and_access_flag_updates_pct() {
    shuttle::check_pct(scenario, iterations(), 3);
}
