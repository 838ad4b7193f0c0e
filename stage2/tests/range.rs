//! Fork's range operations: `update_leaves` (every leaf of a range changed in one walk) and
//! `fill_leaves` (a list of leaves installed in empty slots in one walk).

use stage2::*;

const IPA: u64 = 0x4000_0000;
const PA: u64 = 0x1_0000_0000;
const MIB2: u64 = 2 << 20;
const PAGE: u64 = 4096;

fn new_table(mem: &HostMemory) -> Stage2Table<&HostMemory> {
    Stage2Table::new(
        S2Config::new(2, 40, VmidBits::Sixteen).unwrap(),
        0x1234,
        mem,
    )
    .unwrap()
}

/// Two writable blocks and three writable pages after them.
fn mapped(mem: &HostMemory) -> Stage2Table<&HostMemory> {
    let t = new_table(mem);
    let tlb = RecordingTlb::new();
    let rw = S2Attrs::normal(Perm::RW);
    t.map(Ipa::new(IPA), Pa::new(PA), 2 * MIB2, rw, &tlb)
        .unwrap();
    let pages = IPA + 2 * MIB2;
    t.map_pages(Ipa::new(pages), Pa::new(PA + 2 * MIB2), 3 * PAGE, rw, &tlb)
        .unwrap();
    t
}

fn perm_at(t: &Stage2Table<&HostMemory>, ipa: u64) -> (u8, Perm) {
    let leaf = t.lookup(Ipa::new(ipa)).expect("mapped");
    (leaf.level, leaf.desc.perm())
}

#[test]
fn update_leaves_write_protects_blocks_and_pages_in_place() {
    let mem = HostMemory::new(64);
    let t = mapped(&mem);
    let before = t.stats();
    let tlb = RecordingTlb::new();
    let mut seen = Vec::new();
    t.update_leaves(
        Ipa::new(IPA),
        2 * MIB2 + 4 * PAGE,
        &mut |leaf, whole| {
            seen.push((leaf.ipa.raw(), leaf.level, whole));
            Some(leaf.desc.with_perm(Perm::RO))
        },
        &mut |leaf, _| panic!("nothing races: {leaf:?}"),
        &tlb,
    )
    .unwrap();
    let pages = IPA + 2 * MIB2;
    let expected = vec![
        (IPA, 2, true),
        (IPA + MIB2, 2, true),
        (pages, 3, true),
        (pages + PAGE, 3, true),
        (pages + 2 * PAGE, 3, true),
    ];
    assert_eq!(seen, expected, "each leaf once, ascending; holes skipped");
    for (ipa, level, _) in expected {
        assert_eq!(perm_at(&t, ipa), (level, Perm::RO));
    }
    // Blocks stay blocks: nothing split, no table page taken.
    assert_eq!(t.stats(), before);
    // A permission change: each entry invalidated, no break-before-make's extra.
    let calls = tlb.take();
    let ipas = calls
        .iter()
        .filter(|c| matches!(c, TlbCall::Ipa { .. }))
        .count();
    assert_eq!((ipas, calls.len()), (5, 5), "{calls:?}");
}

#[test]
fn update_leaves_never_writes_a_block_only_partly_inside() {
    let mem = HostMemory::new(64);
    let t = mapped(&mem);
    let tlb = RecordingTlb::new();
    let mut seen = Vec::new();
    // From the middle of the first block to the middle of the second.
    t.update_leaves(
        Ipa::new(IPA + MIB2 / 2),
        MIB2,
        &mut |leaf, whole| {
            seen.push((leaf.ipa.raw(), whole));
            Some(leaf.desc.with_perm(Perm::RO))
        },
        &mut |leaf, _| panic!("{leaf:?}"),
        &tlb,
    )
    .unwrap();
    assert_eq!(seen, vec![(IPA, false), (IPA + MIB2, false)]);
    assert_eq!(perm_at(&t, IPA), (2, Perm::RW));
    assert_eq!(perm_at(&t, IPA + MIB2), (2, Perm::RW));
    assert_eq!(tlb.take(), vec![]);
}

#[test]
fn update_leaves_reports_a_lost_compare_and_swap_without_asking_again() {
    let mem = HostMemory::new(64);
    let t = mapped(&mem);
    let tlb = RecordingTlb::new();
    let page = IPA + 2 * MIB2 + PAGE;
    let (mut asked, mut missed) = (Vec::new(), Vec::new());
    t.update_leaves(
        Ipa::new(page),
        PAGE,
        &mut |leaf, _| {
            asked.push(leaf.ipa.raw());
            // A racing Access-flag update between the load and the compare-and-swap.
            assert!(t.test_and_clear_young(leaf.ipa));
            Some(leaf.desc.with_perm(Perm::RO))
        },
        &mut |leaf, found| missed.push((leaf.ipa.raw(), leaf.desc.young(), found.young())),
        &tlb,
    )
    .unwrap();
    assert_eq!(asked, vec![page]);
    assert_eq!(missed, vec![(page, true, false)]);
    assert_eq!(perm_at(&t, page), (3, Perm::RW), "not written");
    assert_eq!(tlb.take(), vec![]);
}

/// Two read-only blocks, two pages and a software entry, as a fork child gets them.
fn items() -> Vec<(Ipa, u8, Descriptor)> {
    let ro = S2Attrs::normal(Perm::RO);
    let enc = AttrEncoding::Combine;
    let block = |i: u64| Descriptor::leaf_encoded(PA + i * MIB2, 2, ro, true, enc).unwrap();
    let page = |i: u64| Descriptor::page(PA + 4 * MIB2 + i * PAGE, ro).unwrap();
    let swapped = Descriptor::software(PageState::Swapped { slot: 9 }).unwrap();
    let pages = IPA + 4 * MIB2;
    vec![
        (Ipa::new(IPA), 2, block(0)),
        (Ipa::new(IPA + MIB2), 2, block(1)),
        (Ipa::new(pages), 3, page(0)),
        (Ipa::new(pages + 2 * PAGE), 3, page(2)),
        (Ipa::new(pages + 3 * PAGE), 3, swapped),
    ]
}

#[test]
fn fill_leaves_installs_a_list_as_the_same_maps_one_by_one_would() {
    let (mem, one_by_one) = (HostMemory::new(64), HostMemory::new(64));
    let (t, u) = (new_table(&mem), new_table(&one_by_one));
    let tlb = RecordingTlb::new();
    t.fill_leaves(&items(), &tlb).unwrap();
    assert_eq!(
        tlb.take(),
        vec![],
        "empty slots filled: nothing to invalidate"
    );
    for (ipa, level, desc) in items() {
        match desc.kind(level) {
            DescriptorKind::Leaf { pa, attrs, .. } => {
                let len = 1 << (12 + 9 * (3 - level as u32));
                u.map(ipa, Pa::new(pa), len, attrs, &tlb).unwrap();
            }
            DescriptorKind::Software(e) => drop(u.set_software(ipa, e, &tlb).unwrap()),
            k => panic!("{k:?}"),
        }
        let leaf = t.lookup(ipa).expect("installed");
        assert_eq!((leaf.level, leaf.desc), (level, desc));
    }
    assert_eq!(t.stats(), u.stats());
    assert_eq!(mem.allocated_pages(), one_by_one.allocated_pages());
    assert_eq!(t.lookup(Ipa::new(IPA + 4 * MIB2 + PAGE)), None, "a gap");
}

#[test]
fn fill_leaves_changes_nothing_when_it_cannot_install_them_all() {
    let mem = HostMemory::new(64);
    let t = new_table(&mem);
    let tlb = RecordingTlb::new();
    let (stats, pages) = (t.stats(), mem.allocated_pages());
    let unchanged = |t: &Stage2Table<&HostMemory>| {
        assert_eq!((t.stats(), mem.allocated_pages()), (stats, pages));
        assert_eq!(t.lookup(Ipa::new(IPA)), None);
    };
    let mut reversed = items();
    reversed.swap(0, 1);
    assert_eq!(t.fill_leaves(&reversed, &tlb), Err(Error::Misaligned));
    unchanged(&t);
    let mut unaligned = items();
    unaligned[1].0 = Ipa::new(IPA + MIB2 + PAGE);
    assert_eq!(t.fill_leaves(&unaligned, &tlb), Err(Error::Misaligned));
    unchanged(&t);
    mem.fail_after(Some(1));
    assert_eq!(t.fill_leaves(&items(), &tlb), Err(Error::NoMemory));
    unchanged(&t);
    mem.fail_after(None);
    // A slot already taken: refused before anything is written.
    let taken = IPA + 4 * MIB2 + 2 * PAGE;
    let rw = S2Attrs::normal(Perm::RW);
    t.map(Ipa::new(taken), Pa::new(PA), PAGE, rw, &tlb).unwrap();
    let (stats, pages) = (t.stats(), mem.allocated_pages());
    assert_eq!(t.fill_leaves(&items(), &tlb), Err(Error::AlreadyMapped));
    assert_eq!((t.stats(), mem.allocated_pages()), (stats, pages));
    assert_eq!(t.lookup(Ipa::new(IPA)), None);
    assert_eq!(tlb.take(), vec![]);
}
