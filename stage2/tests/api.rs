//! Blocks of every size, the walker, lookups, errors and accounting.

mod common;

use common::{Oracle, PageState};
use stage2::*;

const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;
const PA: u64 = 0x1_0000_0000;

fn cfg() -> S2Config {
    S2Config::new(2, 40, VmidBits::Eight).unwrap()
}

#[test]
fn blocks_are_used_where_alignment_allows() {
    let mem = HostMemory::new(64);
    let t = Stage2Table::new(cfg(), 1, &mem).unwrap();
    let tlb = RecordingTlb::new();
    // [1 GiB - 4 KiB, 2 GiB + 2 MiB + 4 KiB): a page, a 1 GiB block, a 2 MiB block, a page.
    let ipa = GIB - 4096;
    t.map(
        Ipa::new(ipa),
        Pa::new(PA - 4096),
        GIB + MIB2 + 2 * 4096,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    let s = t.stats();
    assert_eq!(
        (s.mapped_pages, s.mapped_blocks_2m, s.mapped_blocks_1g),
        (2, 1, 1)
    );
    assert_eq!(s.mapped_bytes(), GIB + MIB2 + 2 * 4096);
    assert_eq!(t.lookup(Ipa::new(GIB)).unwrap().level, 1);
    assert_eq!(t.lookup(Ipa::new(2 * GIB)).unwrap().level, 2);
    assert_eq!(t.lookup(Ipa::new(2 * GIB + MIB2)).unwrap().level, 3);
    let o = Oracle::new(&mem, t.vtcr(), t.vttbr().raw());
    assert!(
        matches!(o.translate(GIB + 0x1234_5000), Some(PageState::Mapped { pa, .. }) if pa == PA + 0x1234_5000)
    );
    // Misaligned PA: no blocks possible, pages everywhere (needs 513 level-3 tables: too many
    // for this memory, so NoMemory and nothing changed).
    let before = mem.allocated_pages();
    assert_eq!(
        t.map(
            Ipa::new(4 * GIB),
            Pa::new(PA + 4096),
            GIB,
            S2Attrs::normal(Perm::RW),
            &tlb
        ),
        Err(Error::NoMemory)
    );
    assert_eq!(mem.allocated_pages(), before);
    assert_eq!(
        t.map(
            Ipa::new(ipa),
            Pa::new(PA),
            4096,
            S2Attrs::normal(Perm::RW),
            &tlb
        ),
        Err(Error::AlreadyMapped)
    );
    assert_eq!(
        t.map(
            Ipa::new(GIB + MIB2),
            Pa::new(PA),
            4096,
            S2Attrs::normal(Perm::RW),
            &tlb
        ),
        Err(Error::AlreadyMapped)
    );
}

#[test]
fn split_a_1g_block_and_unmap_part_of_it() {
    let mem = HostMemory::new(64);
    let t = Stage2Table::new(cfg(), 1, &mem).unwrap();
    let tlb = RecordingTlb::new();
    t.map(
        Ipa::new(GIB),
        Pa::new(PA),
        GIB,
        S2Attrs::normal(Perm::RWX),
        &tlb,
    )
    .unwrap();
    assert!(t.test_and_clear_young(Ipa::new(GIB)));
    t.split_block(Ipa::new(GIB + 5 * MIB2 + 0x3000), &tlb)
        .unwrap();
    let s = t.stats();
    assert_eq!(
        (s.mapped_pages, s.mapped_blocks_2m, s.mapped_blocks_1g),
        (512, 511, 0)
    );
    let l = t.lookup(Ipa::new(GIB + 5 * MIB2 + 0x3000)).unwrap();
    assert_eq!(
        (l.level, l.pa_of(Ipa::new(GIB + 5 * MIB2 + 0x3000))),
        (3, Some(Pa::new(PA + 5 * MIB2 + 0x3000)))
    );
    assert!(!l.mapping().unwrap().young, "split keeps the Access flag");
    // Unmap a range crossing 2 MiB boundaries in the middle of blocks.
    let (from, len) = (GIB + 7 * MIB2 - 0x5000, MIB2 + 0xa000);
    let mut removed = 0;
    t.unmap(Ipa::new(from), len, &tlb, |l| removed += l.size())
        .unwrap();
    assert_eq!(removed, len);
    assert!(t.lookup(Ipa::new(from)).is_none() && t.lookup(Ipa::new(from + len - 4096)).is_none());
    assert_eq!(
        t.lookup(Ipa::new(from - 4096))
            .unwrap()
            .pa_of(Ipa::new(from - 4096)),
        Some(Pa::new(PA + 7 * MIB2 - 0x6000))
    );
    assert_eq!(
        t.lookup(Ipa::new(from + len))
            .unwrap()
            .pa_of(Ipa::new(from + len)),
        Some(Pa::new(PA + 8 * MIB2 + 0x5000))
    );
    let (pages, _) = Oracle::new(&mem, t.vtcr(), t.vttbr().raw()).pages();
    assert_eq!(pages.len() as u64, GIB / 4096 - len / 4096);
    assert_eq!(t.stats().mapped_bytes(), GIB - len);
    t.unmap(Ipa::new(GIB), GIB, &tlb, |_| {}).unwrap();
    assert_eq!(mem.allocated_pages(), cfg().root_pages());
}

#[test]
fn walker_reports_tables_and_leaves_in_order() {
    #[derive(Default)]
    struct Rec {
        events: Vec<String>,
        stop_after: Option<usize>,
        skip_level: Option<u8>,
    }
    impl Visitor for Rec {
        fn leaf(&mut self, l: &LeafInfo) -> WalkAction {
            self.events.push(format!("leaf {:#x} L{}", l.ipa, l.level));
            match self.stop_after {
                Some(n) if self.events.len() >= n => WalkAction::Stop,
                _ => WalkAction::Continue,
            }
        }
        fn table_pre(&mut self, ipa: u64, level: u8, _: u64) -> WalkAction {
            self.events.push(format!("pre {ipa:#x} L{level}"));
            if self.skip_level == Some(level) {
                WalkAction::SkipTable
            } else {
                WalkAction::Continue
            }
        }
        fn table_post(&mut self, ipa: u64, level: u8, _: u64) -> WalkAction {
            self.events.push(format!("post {ipa:#x} L{level}"));
            WalkAction::Continue
        }
    }
    let mem = HostMemory::new(64);
    let t = Stage2Table::new(cfg(), 1, &mem).unwrap();
    let tlb = RecordingTlb::new();
    t.map(
        Ipa::new(GIB),
        Pa::new(PA),
        MIB2 + 4096,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    t.set_software(
        Ipa::new(GIB + MIB2 + 0x2000),
        stage2::PageState::Swapped { slot: 0 },
        &tlb,
    )
    .unwrap();
    let mut r = Rec::default();
    t.walk(Ipa::new(0), 4 * GIB, &mut r).unwrap();
    let want = [
        "pre 0x40000000 L1",
        "leaf 0x40000000 L2",
        "pre 0x40200000 L2",
        "leaf 0x40200000 L3",
        "leaf 0x40202000 L3",
        "post 0x40200000 L2",
        "post 0x40000000 L1",
    ];
    assert_eq!(r.events, want);
    let mut r = Rec {
        skip_level: Some(2),
        ..Rec::default()
    };
    t.walk(Ipa::new(GIB + 0x1000), 4096, &mut r).unwrap();
    assert_eq!(
        r.events,
        [
            "pre 0x40000000 L1",
            "leaf 0x40000000 L2",
            "post 0x40000000 L1"
        ],
        "whole leaves of a partial range"
    );
    let mut r = Rec {
        skip_level: Some(2),
        ..Rec::default()
    };
    t.walk(Ipa::new(GIB + MIB2), 4096, &mut r).unwrap();
    assert_eq!(
        r.events,
        [
            "pre 0x40000000 L1",
            "pre 0x40200000 L2",
            "post 0x40000000 L1"
        ]
    );
    let mut r = Rec {
        stop_after: Some(4),
        ..Rec::default()
    };
    t.walk(Ipa::new(0), 4 * GIB, &mut r).unwrap();
    assert_eq!(r.events, want[..4]);
    // A closure is a leaf visitor.
    let mut n = 0;
    t.walk(Ipa::new(0), 1 << 40, &mut |_: &LeafInfo| n += 1)
        .unwrap();
    assert_eq!(n, 3);
    assert_eq!(
        t.walk(Ipa::new(0), (1 << 40) + 1, &mut |_: &LeafInfo| {}),
        Err(Error::OutOfRange)
    );
}

#[test]
fn argument_errors_change_nothing() {
    let mem = HostMemory::new(64);
    let t = Stage2Table::new(cfg(), 1, &mem).unwrap();
    let tlb = RecordingTlb::new();
    let rw = S2Attrs::normal(Perm::RW);
    assert_eq!(
        t.map(Ipa::new(0x1000), Pa::new(PA), 0, rw, &tlb),
        Err(Error::EmptyRange)
    );
    assert_eq!(
        t.map(Ipa::new(0x1800), Pa::new(PA), 4096, rw, &tlb),
        Err(Error::Misaligned)
    );
    assert_eq!(
        t.map(Ipa::new(0x1000), Pa::new(PA + 8), 4096, rw, &tlb),
        Err(Error::Misaligned)
    );
    assert_eq!(
        t.map(Ipa::new((1 << 40) - 4096), Pa::new(PA), 8192, rw, &tlb),
        Err(Error::OutOfRange)
    );
    assert_eq!(
        t.map(Ipa::new(0), Pa::new((1 << 40) - 4096), 8192, rw, &tlb),
        Err(Error::OutOfRange)
    );
    assert_eq!(
        t.map(
            Ipa::new(0),
            Pa::new(PA),
            4096,
            S2Attrs::device(Perm::RWX),
            &tlb
        ),
        Err(Error::BadAttrs)
    );
    assert_eq!(t.split_block(Ipa::new(0), &tlb), Err(Error::NotMapped));
    assert_eq!(
        t.unmap(Ipa::new(0), 1 << 41, &tlb, |_| {}),
        Err(Error::OutOfRange)
    );
    assert_eq!(
        t.set_software(
            Ipa::new(1 << 40),
            stage2::PageState::Swapped { slot: 0 },
            &tlb
        ),
        Err(Error::OutOfRange)
    );
    assert_eq!(t.lookup(Ipa::new(1 << 40)), None);
    let bad = t.compare_exchange_leaf(
        Ipa::new(0),
        2,
        Descriptor::EMPTY,
        Descriptor::table(PA),
        &tlb,
    );
    assert_eq!(bad, Err(CasError::Invalid(Error::BadDescriptor)));
    let sw_block = t.compare_exchange_leaf(
        Ipa::new(0),
        2,
        Descriptor::EMPTY,
        Descriptor::software(stage2::PageState::Swapped { slot: 0 }).unwrap(),
        &tlb,
    );
    assert_eq!(sw_block, Err(CasError::Invalid(Error::BadDescriptor)));
    let no_slot = t.compare_exchange_leaf(
        Ipa::new(0),
        3,
        Descriptor::EMPTY,
        Descriptor::page(PA, rw).unwrap(),
        &tlb,
    );
    assert_eq!(
        no_slot,
        Err(CasError::NoSlot {
            level: 1,
            found: Descriptor::EMPTY
        })
    );
    // A 2 MiB block can be installed by CAS in an empty level-2 slot.
    t.map_pages(Ipa::new(0x40_0000), Pa::new(PA), 4096, rw, &tlb)
        .unwrap();
    let block = Descriptor::leaf(PA, 2, rw, true).unwrap();
    t.compare_exchange_leaf(Ipa::new(0), 2, Descriptor::EMPTY, block, &tlb)
        .unwrap();
    assert_eq!(t.lookup(Ipa::new(0x1000)).unwrap().level, 2);
    assert_eq!(tlb.take(), vec![]);
    assert_eq!(t.stats().mapped_blocks_2m, 1);
    // The level-2 slot of 0x40_0000 holds a table: not something CAS may replace.
    let table_slot = {
        let mut found = None;
        t.walk(Ipa::new(0x40_0000), 4096, &mut TablePre(&mut found))
            .unwrap();
        found.unwrap()
    };
    let r = t.compare_exchange_leaf(Ipa::new(0x40_0000), 2, table_slot, Descriptor::EMPTY, &tlb);
    assert_eq!(r, Err(CasError::Invalid(Error::BadDescriptor)));
}

/// Records the table descriptor of the level-2 slot it passes through.
struct TablePre<'a>(&'a mut Option<Descriptor>);

impl Visitor for TablePre<'_> {
    fn leaf(&mut self, _: &LeafInfo) -> WalkAction {
        WalkAction::Continue
    }
    fn table_pre(&mut self, _: u64, level: u8, table_pa: u64) -> WalkAction {
        if level == 2 {
            *self.0 = Some(Descriptor::table(table_pa));
        }
        WalkAction::Continue
    }
}

#[test]
fn vmid_and_vttbr() {
    let mem = HostMemory::new(64);
    assert_eq!(
        Stage2Table::new(cfg(), 256, &mem).err(),
        Some(Error::BadVmid)
    );
    let t = Stage2Table::new(cfg(), 5, &mem).unwrap();
    assert_eq!(
        t.root_pa() % 8192,
        0,
        "2 concatenated root pages aligned to 8 KiB"
    );
    assert_eq!(t.vttbr().raw(), (5 << 48) | t.root_pa());
    assert_eq!(t.set_vmid(300), Err(Error::BadVmid));
    t.set_vmid(77).unwrap();
    assert_eq!(t.vttbr().vmid(), 77);
    assert_eq!(t.stats().table_pages, 2);
    mem.fail_after(Some(1));
    assert_eq!(
        Stage2Table::new(cfg(), 5, &mem).err(),
        Some(Error::NoMemory)
    );
}

#[test]
fn destroy_frees_everything_even_when_mapped() {
    let mem = HostMemory::new(64);
    let tlb = RecordingTlb::new();
    for (parange, ipa_bits) in [(0, 32), (2, 40), (3, 42), (5, 48)] {
        let c = S2Config::new(parange, ipa_bits, VmidBits::Eight).unwrap();
        let t = Stage2Table::new(c, 1, &mem).unwrap();
        t.map_pages(
            Ipa::new(0x4000_0000),
            Pa::new(0x8000_0000),
            3 * MIB2,
            S2Attrs::normal(Perm::RW),
            &tlb,
        )
        .unwrap();
        t.set_software(
            Ipa::new(0x1000),
            stage2::PageState::Swapped { slot: 1 },
            &tlb,
        )
        .unwrap();
        assert_eq!(t.stats().table_pages as usize, mem.allocated_pages());
        t.destroy(&tlb);
        assert_eq!(mem.allocated_pages(), 0, "{ipa_bits}-bit");
    }
}

/// Block migration: a 2 MiB block becomes one migration entry (its invalidation left to the
/// batch) and then a block of another frame (nothing to invalidate), never split.
#[test]
fn a_block_becomes_a_migration_entry_and_back() {
    let mem = HostMemory::new(16);
    let t = Stage2Table::new(cfg(), 1, &mem).unwrap();
    let tlb = RecordingTlb::new();
    let rw = S2Attrs::normal(Perm::RW);
    let ipa = Ipa::new(MIB2);
    t.map(ipa, Pa::new(PA), MIB2, rw, &tlb).unwrap();
    let block = t.lookup(ipa).unwrap();
    assert_eq!(block.level, 2);
    let pages = t.stats().table_pages;
    let entry = |pa: u64| {
        Descriptor::software(stage2::PageState::Migrating {
            pfn: Pa::new(pa).pfn(),
            writable: true,
        })
        .unwrap()
    };
    // A migration entry's frame must be block-aligned to stand for the block's pages.
    let r = t.compare_exchange_leaf(ipa, 2, block.desc, entry(PA + 4096), &tlb);
    assert_eq!(r, Err(CasError::Invalid(Error::BadDescriptor)));
    let batch = t.batch(&tlb);
    t.compare_exchange_leaf(ipa, 2, block.desc, entry(PA), &batch)
        .unwrap();
    assert_eq!(tlb.calls(), vec![], "deferred to the batch");
    batch.finish();
    assert_eq!(tlb.take(), vec![TlbCall::Vmid { vmid: 1 }]);
    let inside = t.lookup(Ipa::new(MIB2 + 5 * 4096)).unwrap();
    assert_eq!((inside.ipa, inside.level), (ipa, 2));
    assert_eq!(
        inside.software(),
        Some(stage2::PageState::Migrating {
            pfn: Pa::new(PA).pfn(),
            writable: true,
        })
    );
    let o = Oracle::new(&mem, t.vtcr(), t.vttbr().raw());
    let faults = !matches!(o.translate(MIB2 + 5 * 4096), Some(PageState::Mapped { .. }));
    assert!(faults, "the entry faults");
    let moved = Descriptor::leaf(PA + MIB2, 2, rw, true).unwrap();
    t.compare_exchange_leaf(ipa, 2, entry(PA), moved, &tlb)
        .unwrap();
    assert_eq!(
        tlb.take(),
        vec![],
        "a new leaf over an invalid one owes no invalidation"
    );
    assert_eq!(
        t.lookup(ipa).unwrap().pa_of(ipa + 4096),
        Some(Pa::new(PA + MIB2 + 4096))
    );
    let s = t.stats();
    assert_eq!(
        (s.mapped_blocks_2m, s.table_pages),
        (1, pages),
        "never split"
    );
}
