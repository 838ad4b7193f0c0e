//! Random sequences of operations against a reference model (IPA page -> state), checked after
//! every step with the independent oracle of `common`: translations, table-page accounting
//! (no leak, no double link), statistics, and the TLB invalidations each step made.
//! This file generates the sequences and drives them; `model_world/` runs one operation
//! against the table and the model, and checks the two agree.

mod common;
mod model_world;

use model_world::{Model, Op, Setup, World, WINDOW_PAGES};
use proptest::prelude::*;
use stage2::*;

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
