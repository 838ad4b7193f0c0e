//! Tests written to kill mutants that `cargo xtask mutants` found surviving in
//! `stage2/src/ops/` (docs/TESTING.md, "Mutation score"). Each names the mutants it kills; each
//! checks a documented property the other tests happened not to pin down. The functions and
//! lines they name are those of the code before the walker (issue 15) replaced the hand-written
//! descents; the properties still hold and are still checked. The walker's own kill tests are
//! in `kill_walker.rs`.

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
    let leaf = t.lookup(Ipa::new(ipa)).expect("mapped");
    t.compare_exchange_leaf(Ipa::new(ipa), leaf.level, leaf.desc, change(leaf.desc), tlb)
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
    t.map_pages(
        Ipa::new(IPA),
        Pa::new(PA),
        4096,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    assert!(t.test_and_clear_young(Ipa::new(IPA)));
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
    assert_eq!(
        cas_calls(&t, &tlb, IPA, |d| d.with_perm(Perm::RO)),
        this_page
    );
    let leaf = t.lookup(Ipa::new(IPA)).unwrap();
    assert!(!leaf.desc.young());
    assert_eq!(leaf.desc, leaf.desc.with_sw(0xa), "software bits kept");
}

const MIB2: u64 = 2 << 20;

/// Per page: the (level, output address) `update_pages` offered it, and how it ended.
type Offered = (Vec<Option<(u8, u64)>>, Vec<Option<Result<(), CasError>>>);

/// Runs `update_pages` over `ipas`, write-protecting every leaf it is offered; returns, per
/// page, the (level, output address) it was offered and how it ended.
fn protect_pages(t: &Stage2Table<&HostMemory>, tlb: &RecordingTlb, ipas: &[u64]) -> Offered {
    let mut offered = vec![None; ipas.len()];
    let mut ended = vec![None; ipas.len()];
    let ipas: Vec<Ipa> = ipas.iter().copied().map(Ipa::new).collect();
    t.update_pages(
        &ipas,
        &mut |k, info| {
            offered[k] = Some((info.level, info.desc.output_address(info.level)));
            Some(info.desc.with_perm(Perm::RO))
        },
        &mut |k, r| ended[k] = Some(r),
        tlb,
    );
    (offered, ended)
}

/// `leaf.rs`, `update_pages`: the last-level table it keeps between pages is keyed by the 2 MiB
/// span a page lies in (`delete !`, `&` → `|`, `- 1` → `+ 1` and `/ 1` in the key's mask). Two
/// pages at the same offset of neighbouring 2 MiB spans have different tables: each page is
/// offered its own leaf and changed in its own table.
#[test]
fn update_pages_looks_up_each_2m_span_in_its_own_table() {
    let mem = HostMemory::new(64);
    let t = Stage2Table::new(cfg(), VMID, &mem).unwrap();
    let tlb = RecordingTlb::new();
    let base = 4 * MIB2; // 4 MiB-aligned: the neighbour differs in bit 21
    let ipas = [base, base + MIB2, base + 2 * MIB2 + 4096];
    for (i, &ipa) in ipas.iter().enumerate() {
        t.map_pages(
            Ipa::new(ipa),
            Pa::new(PA + i as u64 * 0x10_0000),
            4096,
            S2Attrs::normal(Perm::RW),
            &tlb,
        )
        .unwrap();
    }
    let (offered, ended) = protect_pages(&t, &tlb, &ipas);
    for (i, &ipa) in ipas.iter().enumerate() {
        assert_eq!(offered[i], Some((3, PA + i as u64 * 0x10_0000)), "page {i}");
        assert_eq!(ended[i], Some(Ok(())), "page {i}");
        assert_eq!(
            t.lookup(Ipa::new(ipa)).unwrap().desc.perm(),
            Perm::RO,
            "page {i}"
        );
    }
}

/// `leaf.rs`, `leaf_table`: `==` → `!=`. Only a last-level table is kept for the next page: a
/// page inside a 2 MiB block is offered the block (and left to the caller to split), never a
/// descriptor of the level-2 table read as if it were a page table.
#[test]
fn update_pages_offers_each_page_of_a_block_the_block() {
    let mem = HostMemory::new(64);
    let t = Stage2Table::new(cfg(), VMID, &mem).unwrap();
    let tlb = RecordingTlb::new();
    let base = 4 * MIB2;
    t.map(
        Ipa::new(base),
        Pa::new(PA),
        MIB2,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    // The next slot of the same level-2 table points at a page table.
    t.map_pages(
        Ipa::new(base + MIB2),
        Pa::new(PA + MIB2),
        4096,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    assert_eq!(t.lookup(Ipa::new(base)).unwrap().level, 2);
    let (offered, ended) = protect_pages(&t, &tlb, &[base, base + 4096]);
    assert_eq!(offered, vec![Some((2, PA)); 2]);
    for r in ended {
        assert!(
            matches!(r, Some(Err(CasError::NoSlot { level: 2, .. }))),
            "{r:?}"
        );
    }
    assert_eq!(
        t.lookup(Ipa::new(base + 4096)).unwrap().desc.perm(),
        Perm::RW
    );
}

const GIB: u64 = 1 << 30;

/// `split.rs`, `split_cost`: `-> 1`, `&&` → `||`, `<` → `==` / `>` / `<=`, `delete !`, `+` → `-`.
/// Changing part of a 1 GiB block reserves exactly the table pages the split takes: one for a
/// whole 2 MiB inside it, two for a single page (the 1 GiB table and one 2 MiB table). Too few
/// would panic halfway; too many would fail with `NoMemory` when memory is tight.
#[test]
fn splitting_a_1g_block_reserves_exactly_the_pages_it_takes() {
    for (len, pages) in [(MIB2, 1), (4096, 2)] {
        let mem = HostMemory::new(64);
        let t = Stage2Table::new(cfg(), VMID, &mem).unwrap();
        let tlb = RecordingTlb::new();
        t.map(
            Ipa::new(GIB),
            Pa::new(PA),
            GIB,
            S2Attrs::normal(Perm::RW),
            &tlb,
        )
        .unwrap();
        let before = mem.allocated_pages();
        mem.fail_after(Some(pages));
        let at = GIB + 5 * MIB2;
        assert_eq!(
            t.unmap(Ipa::new(at), len, &tlb, |_| {}),
            Ok(len),
            "{len:#x}"
        );
        assert_eq!(mem.allocated_pages(), before + pages, "{len:#x}");
        assert!(t.lookup(Ipa::new(at)).is_none());
        assert_eq!(t.lookup(Ipa::new(at + len)).unwrap().desc.perm(), Perm::RW);
    }
}

/// `map.rs`, `map`: `>` → `>=` in the physical-range check. A mapping may end exactly at the
/// top of the physical address space (40 bits here), not one byte past it.
#[test]
fn a_mapping_may_end_at_the_top_of_the_pa_space() {
    let mem = HostMemory::new(64);
    let t = Stage2Table::new(cfg(), VMID, &mem).unwrap();
    let tlb = RecordingTlb::new();
    let top = 1u64 << 40;
    let attrs = S2Attrs::normal(Perm::RW);
    assert_eq!(
        t.map_pages(Ipa::new(GIB), Pa::new(top - 4096), 8192, attrs, &tlb),
        Err(Error::OutOfRange)
    );
    t.map_pages(Ipa::new(GIB), Pa::new(top - 4096), 4096, attrs, &tlb)
        .unwrap();
    assert_eq!(
        t.lookup(Ipa::new(GIB)).unwrap().desc.output_address(3),
        top - 4096
    );
}

/// `split.rs`, `path_cost`: `-` → `+`. Giving one page of a 2 MiB block its own slot reserves
/// one table page (`LAST_LEVEL - level`), so it succeeds with only one page left.
#[test]
fn splitting_a_2m_block_needs_one_table_page() {
    let mem = HostMemory::new(64);
    let t = Stage2Table::new(cfg(), VMID, &mem).unwrap();
    let tlb = RecordingTlb::new();
    t.map(
        Ipa::new(GIB),
        Pa::new(PA),
        MIB2,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    assert_eq!(t.lookup(Ipa::new(GIB)).unwrap().level, 2);
    mem.fail_after(Some(1));
    t.split_block(Ipa::new(GIB + 4096), &tlb).unwrap();
    assert_eq!(t.lookup(Ipa::new(GIB + 4096)).unwrap().level, 3);
    assert_eq!(
        t.set_software(
            Ipa::new(GIB + 8192),
            stage2::PageState::Swapped { slot: 0 },
            &tlb
        )
        .map(|_| ()),
        Ok(())
    );
}

/// Changes `ipa`'s leaf the way the hardware's Access-flag update would, between
/// `update_pages`' read of the slot and its compare-and-swap.
fn race_access_flag(t: &Stage2Table<&HostMemory>, ipa: u64) {
    if !t.test_and_clear_young(Ipa::new(ipa)) {
        assert!(t.mkyoung(Ipa::new(ipa)), "a valid leaf");
    }
}

/// `leaf.rs`, `update_pages`' bound on retrying a compare-and-swap that lost to an
/// Access-flag update: `<` → `==`, `>`, `<=` in `tries < 4`, and `+=` → `-=`, `*=` on the
/// count. A lost race is retried (the update still lands), and a race lost every time gives
/// up after exactly five tries with the mismatch (not a livelock, not a silent success).
#[test]
fn update_pages_retries_a_lost_race_a_bounded_number_of_times() {
    let mem = HostMemory::new(64);
    let t = Stage2Table::new(cfg(), VMID, &mem).unwrap();
    let tlb = RecordingTlb::new();
    t.map_pages(
        Ipa::new(IPA),
        Pa::new(PA),
        4096,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    let read_only = Descriptor::page(PA, S2Attrs::normal(Perm::RO)).unwrap();
    for (lose, tries, lands) in [(1, 2, true), (usize::MAX, 5, false)] {
        let mut calls = 0;
        let mut result = None;
        t.update_pages(
            &[Ipa::new(IPA)],
            &mut |_, _| {
                calls += 1;
                if calls <= lose {
                    race_access_flag(&t, IPA);
                }
                (calls < 100).then_some(read_only)
            },
            &mut |_, r| result = Some(r),
            &tlb,
        );
        assert_eq!(calls, tries, "losing {lose} races");
        match result {
            Some(Ok(())) if lands => {}
            Some(Err(CasError::Mismatch(_))) if !lands => {}
            other => panic!("losing {lose} races: {other:?}"),
        }
    }
    match t.lookup(Ipa::new(IPA)).unwrap().leaf {
        Leaf::Mapped(m) => assert!(!m.attrs.perm.write, "the first update landed"),
        other => panic!("{other:?}"),
    }
}
