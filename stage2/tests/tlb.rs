//! TLB and I-cache maintenance: what is invalidated, when, and batching. The order of
//! maintenance against the table writes (break-before-make, I-cache first, invalidate before
//! freeing) is checked in `tlb_order.rs`.

mod tlb_common;

use stage2::*;
use tlb_common::{cfg, new_table, IPA, MIB2, PA};

fn ipas(calls: &[TlbCall]) -> usize {
    calls
        .iter()
        .filter(|c| matches!(c, TlbCall::Ipa { .. }))
        .count()
}

fn vmids(calls: &[TlbCall]) -> usize {
    calls
        .iter()
        .filter(|c| matches!(c, TlbCall::Vmid { vmid: 0x1234 }))
        .count()
}

#[test]
fn map_into_holes_needs_no_invalidation() {
    let mem = HostMemory::new(64);
    let t = new_table(&mem);
    let tlb = RecordingTlb::new();
    t.map(
        Ipa::new(IPA),
        Pa::new(PA),
        4 * MIB2,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    assert_eq!(tlb.take(), vec![]);
}

#[test]
fn few_changes_invalidate_per_ipa_many_invalidate_the_vmid() {
    let mem = HostMemory::new(64);
    let t = new_table(&mem);
    let tlb = RecordingTlb::new();
    t.map_pages(
        Ipa::new(IPA),
        Pa::new(PA),
        64 * 4096,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    t.protect(Ipa::new(IPA), 3 * 4096, Perm::RO, &tlb).unwrap();
    let calls = tlb.take();
    assert_eq!(
        calls,
        (0..3)
            .map(|i| TlbCall::Ipa {
                vmid: 0x1234,
                ipa: IPA + i * 4096,
                level: 3
            })
            .collect::<Vec<_>>()
    );
    t.protect(Ipa::new(IPA), 64 * 4096, Perm::RX, &tlb).unwrap();
    let icache = (0..64).map(|i| TlbCall::Icache {
        pa: PA + i * 4096,
        len: 4096,
    });
    assert_eq!(
        tlb.take(),
        icache
            .chain([TlbCall::Vmid { vmid: 0x1234 }])
            .collect::<Vec<_>>()
    );
    // Nothing changes: nothing to invalidate.
    t.protect(Ipa::new(IPA), 64 * 4096, Perm::RX, &tlb).unwrap();
    assert_eq!(ipas(&tlb.calls()) + vmids(&tlb.take()), 0);
}

#[test]
fn a_batch_flushes_once() {
    let mem = HostMemory::new(256);
    let t = new_table(&mem);
    let tlb = RecordingTlb::new();
    t.map_pages(
        Ipa::new(IPA),
        Pa::new(PA),
        4 * MIB2,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    t.map(
        Ipa::new(IPA + 64 * MIB2),
        Pa::new(PA),
        8 * MIB2,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    tlb.take();
    let batch = t.batch(&tlb);
    // Fork-like: write-protect everything, a page at a time and as ranges.
    for i in 0..8 {
        t.protect(Ipa::new(IPA + i * 4096), 4096, Perm::RO, &batch)
            .unwrap();
    }
    t.protect(Ipa::new(IPA), 4 * MIB2, Perm::RO, &batch)
        .unwrap();
    t.protect(Ipa::new(IPA + 64 * MIB2), 8 * MIB2, Perm::RO, &batch)
        .unwrap();
    t.set_software(
        Ipa::new(IPA + 4096),
        stage2::PageState::Swapped { slot: 0 },
        &batch,
    )
    .unwrap();
    assert!(batch.pending());
    assert_eq!(
        tlb.calls(),
        vec![],
        "nothing is invalidated while the batch is open"
    );
    batch.finish();
    assert_eq!(tlb.take(), vec![TlbCall::Vmid { vmid: 0x1234 }]);
    // A batch handed over to the caller does not flush.
    let batch = t.batch(&tlb);
    t.protect(Ipa::new(IPA), 4096, Perm::RW, &batch).unwrap();
    assert!(batch.into_pending());
    assert_eq!(tlb.take(), vec![]);
    // An empty batch flushes nothing.
    t.batch(&tlb).finish();
    assert_eq!(tlb.take(), vec![]);
}

#[test]
fn a_batch_does_not_defer_break_before_make_or_table_frees() {
    let mem = HostMemory::new(64);
    let t = new_table(&mem);
    let tlb = RecordingTlb::new();
    t.map(
        Ipa::new(IPA),
        Pa::new(PA),
        MIB2,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    t.map_pages(
        Ipa::new(IPA + MIB2),
        Pa::new(PA),
        4096,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    let batch = t.batch(&tlb);
    t.split_block(Ipa::new(IPA), &batch).unwrap();
    assert_eq!(
        tlb.take(),
        vec![TlbCall::Ipa {
            vmid: 0x1234,
            ipa: IPA,
            level: 2
        }]
    );
    t.unmap(Ipa::new(IPA + MIB2), 4096, &batch, |_| {}).unwrap();
    assert_eq!(
        tlb.take(),
        vec![TlbCall::Vmid { vmid: 0x1234 }],
        "table freed after an immediate flush"
    );
    assert!(!batch.pending());
    drop(batch);
    assert_eq!(tlb.take(), vec![]);
}

#[test]
fn a_batch_of_another_vm_defers_nothing() {
    let mem = HostMemory::new(64);
    let a = new_table(&mem);
    let b = Stage2Table::new(cfg(), 9, &mem).unwrap();
    let tlb = RecordingTlb::new();
    b.map_pages(
        Ipa::new(IPA),
        Pa::new(PA),
        4096,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    let batch = a.batch(&tlb);
    b.protect(Ipa::new(IPA), 4096, Perm::RO, &batch).unwrap();
    assert_eq!(
        tlb.take(),
        vec![TlbCall::Ipa {
            vmid: 9,
            ipa: IPA,
            level: 3
        }]
    );
    batch.finish();
    assert_eq!(tlb.take(), vec![]);
}

#[test]
fn young_clear_does_not_invalidate_mkyoung_neither() {
    let mem = HostMemory::new(64);
    let t = new_table(&mem);
    let tlb = RecordingTlb::new();
    t.map(
        Ipa::new(IPA),
        Pa::new(PA),
        MIB2,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    assert!(t.test_and_clear_young(Ipa::new(IPA + 0x3000)));
    assert!(
        !t.test_and_clear_young(Ipa::new(IPA)),
        "the whole block was aged"
    );
    assert!(t.mkyoung(Ipa::new(IPA + 0x1000)));
    assert!(t.test_and_clear_young(Ipa::new(IPA)));
    assert!(!t.test_and_clear_young(Ipa::new(IPA + MIB2)), "hole");
    assert_eq!(tlb.take(), vec![]);
}

#[test]
fn destroy_invalidates_the_vmid() {
    let mem = HostMemory::new(64);
    let t = new_table(&mem);
    let tlb = RecordingTlb::new();
    t.map_pages(
        Ipa::new(IPA),
        Pa::new(PA),
        4096,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    t.destroy(&tlb);
    assert_eq!(tlb.take(), vec![TlbCall::Vmid { vmid: 0x1234 }]);
    assert_eq!(mem.allocated_pages(), 0);
}

/// The table of `update_pages_changes_many_pages_with_one_flush_and_no_icache`: four executable
/// pages at `IPA` and an executable 2 MiB block at `IPA + MIB2`, the recorder emptied.
fn four_pages_and_a_block(mem: &HostMemory) -> (Stage2Table<&HostMemory>, RecordingTlb) {
    let t = new_table(mem);
    let tlb = RecordingTlb::new();
    t.map_pages(
        Ipa::new(IPA),
        Pa::new(PA),
        4 * 4096,
        S2Attrs::normal(Perm::RWX),
        &tlb,
    )
    .unwrap();
    t.map(
        Ipa::new(IPA + MIB2),
        Pa::new(PA + MIB2),
        MIB2,
        S2Attrs::normal(Perm::RWX),
        &tlb,
    )
    .unwrap();
    tlb.take();
    (t, tlb)
}

#[test]
fn update_pages_changes_many_pages_with_one_flush_and_no_icache() {
    let mem = HostMemory::new(64);
    let (t, tlb) = four_pages_and_a_block(&mem);
    // Pages 0 and 2 become migration entries, the hole at page 3 + 1 is skipped, the page
    // inside the block is reported for the caller to split.
    let targets = [IPA, IPA + 2 * 4096, IPA + 5 * 4096, IPA + MIB2 + 4096].map(Ipa::new);
    let mut outcome = Vec::new();
    t.update_pages(
        &targets,
        &mut |k, leaf| {
            assert_ne!(k, 2, "an empty slot is not offered");
            let Leaf::Mapped(m) = leaf.leaf else {
                panic!("{leaf:?}")
            };
            Descriptor::software(stage2::PageState::Migrating {
                pfn: m.pa.pfn(),
                writable: true,
            })
            .ok()
        },
        &mut |k, r| outcome.push((k, r.is_ok())),
        &tlb,
    );
    assert_eq!(outcome, vec![(0, true), (1, true), (3, false)]);
    let calls = tlb.take();
    assert_eq!(ipas(&calls), 2, "{calls:?}");
    assert_eq!(calls.len(), 2, "no I-cache maintenance: {calls:?}");
    // Back to valid, executable pages of other frames: no invalidation, no I-cache work.
    let mut outcome = Vec::new();
    t.update_pages(
        &targets[..2],
        &mut |k, leaf| {
            assert!(matches!(leaf.leaf, Leaf::Software(_)));
            let pa = PA + 0x10_0000 + k as u64 * 4096;
            Descriptor::page(pa, S2Attrs::normal(Perm::RWX)).ok()
        },
        &mut |k, r| outcome.push((k, r.is_ok())),
        &tlb,
    );
    assert_eq!(outcome, vec![(0, true), (1, true)]);
    assert_eq!(tlb.take(), vec![]);
    let pa = |ipa| {
        let ipa = Ipa::new(ipa);
        t.lookup(ipa).and_then(|l| l.pa_of(ipa)).map(Pa::raw)
    };
    assert_eq!(pa(IPA + 2 * 4096), Some(PA + 0x10_0000 + 4096));
    assert_eq!(pa(IPA + 4096), Some(PA + 4096), "untouched page");
}
