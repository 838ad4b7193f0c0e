//! Tests written to kill mutants that `cargo xtask mutants` found surviving in
//! `stage2/src/ops/` (docs/TESTING.md, "Mutation score"). Each names the mutants it kills; each
//! checks a documented property the other tests happened not to pin down.

use stage2::*;

const IPA: u64 = 0x4000_0000;
const PA: u64 = 0x1_0000_0000;
const VMID: u16 = 0x1234;

fn cfg() -> S2Config {
    S2Config::new(2, 40, VmidBits::Sixteen).unwrap()
}

/// Changes `ipa`'s leaf from what `lookup` shows to `change(desc)` and returns the TLB
/// maintenance the change made.
fn cas_calls(
    t: &Stage2Table<&HostMemory>,
    tlb: &RecordingTlb,
    ipa: u64,
    change: impl Fn(Descriptor) -> Descriptor,
) -> Vec<TlbCall> {
    let leaf = t.lookup(ipa).expect("mapped");
    t.compare_exchange_leaf(ipa, leaf.level, leaf.desc, change(leaf.desc), tlb)
        .expect("nobody races this test");
    tlb.take()
}

/// `leaf.rs`, `needs_invalidation`: `-> true`, `<<` → `>>` in both masks, `!=` → `==` and
/// `&` → `|` / `^` in the Access-flag test. Setting the Access flag or changing software bits
/// of a valid leaf needs no invalidation (the TLB may keep the old value: the walk ignores
/// both); clearing the Access flag or changing a permission does.
#[test]
fn only_changes_the_walk_sees_are_invalidated() {
    let mem = HostMemory::new(64);
    let t = Stage2Table::new(cfg(), VMID, &mem).unwrap();
    let tlb = RecordingTlb::new();
    t.map_pages(IPA, PA, 4096, S2Attrs::normal(Perm::RW), &tlb)
        .unwrap();
    assert!(t.test_and_clear_young(IPA));
    tlb.take();
    let this_page = vec![TlbCall::Ipa {
        vmid: VMID,
        ipa: IPA,
        level: 3,
    }];
    assert_eq!(cas_calls(&t, &tlb, IPA, |d| d.with_young(true)), vec![]);
    assert_eq!(cas_calls(&t, &tlb, IPA, |d| d.with_sw(0x5)), vec![]);
    assert_eq!(cas_calls(&t, &tlb, IPA, |d| d.with_sw(0xa)), vec![]);
    assert_eq!(cas_calls(&t, &tlb, IPA, |d| d.with_young(false)), this_page);
    assert_eq!(cas_calls(&t, &tlb, IPA, |d| d.with_perm(Perm::RO)), this_page);
    let leaf = t.lookup(IPA).unwrap();
    assert!(!leaf.desc.young());
    assert_eq!(leaf.desc, leaf.desc.with_sw(0xa), "software bits kept");
}
