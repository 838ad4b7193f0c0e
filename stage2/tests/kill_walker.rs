//! Tests written to kill mutants that `cargo xtask mutants` found surviving in the walker's
//! files (`stage2/src/ops/{driver,commit,update}.rs`, docs/TESTING.md "Mutation score"). Each
//! names the mutants it kills and checks a documented property.

use stage2::*;

const IPA: u64 = 0x4000_0000;
const PA: u64 = 0x1_0000_0000;
const MIB2: u64 = 2 << 20;

/// `update.rs`, `update_pages`: `replace += with -=` / `*=` on the page index after a page out
/// of the IPA space (an endless loop or a page answered twice), and `replace < with >` / `<=`
/// and `replace >= with <` in the bounds of a run (a page past the IPA space walked, or a
/// page out of order left unanswered). Every page gets exactly one answer, in order: pages
/// past the IPA space `OutOfRange`, the others the outcome of their update, wherever they
/// stand in the list.
#[test]
fn update_pages_answers_every_page_once_out_of_range_or_out_of_order() {
    let mem = HostMemory::new(64);
    let cfg = S2Config::new(2, 40, VmidBits::Sixteen).unwrap();
    let t = Stage2Table::new(cfg, 1, &mem).unwrap();
    let tlb = RecordingTlb::new();
    let limit = cfg.ipa_limit();
    for ipa in [IPA, IPA + 4096, IPA + MIB2] {
        let (at, pa) = (Ipa::new(ipa), Pa::new(PA + (ipa - IPA)));
        t.map_pages(at, pa, 4096, S2Attrs::normal(Perm::RW), &tlb)
            .unwrap();
    }
    let ipas = [
        IPA + MIB2,
        IPA,
        IPA + 4096,
        IPA + 4096,
        limit - 8192, // holes: skipped, no answer
        limit + 4096,
        limit - 4096,
        limit,
    ]
    .map(Ipa::new);
    let mut offered = vec![];
    let mut answers = vec![];
    t.update_pages(
        &ipas,
        &mut |k, info| {
            offered.push((k, info.ipa));
            Some(info.desc.with_perm(Perm::RO))
        },
        &mut |k, r| answers.push((k, r)),
        &tlb,
    );
    let range = Err(CasError::Invalid(Error::OutOfRange));
    assert_eq!(
        answers,
        [
            (0, Ok(())),
            (1, Ok(())),
            (2, Ok(())),
            (3, Ok(())),
            (5, range),
            (7, range)
        ]
    );
    let want = [(0, IPA + MIB2), (1, IPA), (2, IPA + 4096), (3, IPA + 4096)]
        .map(|(k, a)| (k, Ipa::new(a)));
    assert_eq!(offered, want);
    for ipa in [IPA, IPA + 4096, IPA + MIB2] {
        let m = t.lookup(Ipa::new(ipa)).unwrap().mapping().unwrap();
        assert_eq!(m.attrs.perm, Perm::RO, "{ipa:#x}");
    }
}

/// `walk.rs`, `ReadOnly::table_post`: `delete match arm WalkAction::Stop` (a visitor's stop
/// after a subtree ignored). `Stop` from `table_post` ends the walk: nothing after that
/// table is visited.
#[test]
fn a_stop_after_a_subtree_ends_the_walk() {
    struct FirstTable {
        leaves: Vec<Ipa>,
        posts: usize,
    }
    impl Visitor for FirstTable {
        fn leaf(&mut self, leaf: &LeafInfo) -> WalkAction {
            self.leaves.push(leaf.ipa);
            WalkAction::Continue
        }
        fn table_post(&mut self, _: u64, _: u8, _: u64) -> WalkAction {
            self.posts += 1;
            WalkAction::Stop
        }
    }
    let mem = HostMemory::new(64);
    let cfg = S2Config::new(2, 40, VmidBits::Sixteen).unwrap();
    let t = Stage2Table::new(cfg, 1, &mem).unwrap();
    let tlb = RecordingTlb::new();
    for ipa in [IPA, IPA + MIB2] {
        let (at, pa) = (Ipa::new(ipa), Pa::new(PA + (ipa - IPA)));
        t.map_pages(at, pa, 4096, S2Attrs::normal(Perm::RW), &tlb)
            .unwrap();
    }
    let mut v = FirstTable {
        leaves: vec![],
        posts: 0,
    };
    t.walk(Ipa::new(IPA), 2 * MIB2, &mut v).unwrap();
    assert_eq!((v.leaves, v.posts), (vec![Ipa::new(IPA)], 1));
}
