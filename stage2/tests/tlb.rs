//! TLB and I-cache maintenance: what is invalidated, when, and batching.

mod common;

use common::Oracle;
use stage2::*;
use std::sync::{Arc, Mutex};

const IPA: u64 = 0x4000_0000;
const PA: u64 = 0x1_0000_0000;
const MIB2: u64 = 2 << 20;

fn cfg() -> S2Config {
    S2Config::new(2, 40, VmidBits::Sixteen).unwrap()
}

fn new_table(mem: &HostMemory) -> Stage2Table<&HostMemory> {
    Stage2Table::new(cfg(), 0x1234, mem).unwrap()
}

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

type Seen = Arc<Mutex<Vec<(TlbCall, Option<u64>)>>>;

/// At each invalidation the hook records what the oracle sees at the IPA.
fn hooked(
    mem: &'static HostMemory,
    t: &Stage2Table<&'static HostMemory>,
    tlb: &RecordingTlb,
) -> Seen {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (vtcr, vttbr, s) = (t.vtcr(), t.vttbr().raw(), seen.clone());
    tlb.set_hook(move |c| {
        let ipa = match *c {
            TlbCall::Ipa { ipa, .. } => ipa,
            _ => IPA,
        };
        let raw = Oracle::new(mem, vtcr, vttbr).leaf(ipa).map(|l| l.raw);
        s.lock().unwrap().push((*c, raw));
    });
    seen
}

#[test]
fn split_breaks_before_it_makes() {
    let mem: &'static HostMemory = Box::leak(Box::new(HostMemory::new(64)));
    let t = new_table(mem);
    let tlb = RecordingTlb::new();
    t.map(
        Ipa::new(IPA),
        Pa::new(PA),
        MIB2,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    let seen = hooked(mem, &t, &tlb);
    t.split_block(Ipa::new(IPA + 0x5000), &tlb).unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    // At the invalidation the block slot held the Locked (invalid) entry, not the block nor the table.
    assert_eq!(
        seen[0],
        (
            TlbCall::Ipa {
                vmid: 0x1234,
                ipa: IPA,
                level: 2
            },
            Some(Descriptor::LOCKED.raw())
        )
    );
    assert_eq!(
        t.lookup(Ipa::new(IPA + 0x5000))
            .unwrap()
            .pa_of(Ipa::new(IPA + 0x5000)),
        Some(Pa::new(PA + 0x5000))
    );
}

#[test]
fn remap_by_cas_breaks_before_it_makes_and_syncs_the_icache_first() {
    let mem: &'static HostMemory = Box::leak(Box::new(HostMemory::new(64)));
    let t = new_table(mem);
    let tlb = RecordingTlb::new();
    t.map_pages(
        Ipa::new(IPA),
        Pa::new(PA),
        4096,
        S2Attrs::normal(Perm::RX),
        &tlb,
    )
    .unwrap();
    tlb.take();
    let seen = hooked(mem, &t, &tlb);
    let old = t.lookup(Ipa::new(IPA)).unwrap();
    let new = Descriptor::page(PA + 0x10_0000, S2Attrs::normal(Perm::RWX)).unwrap();
    t.compare_exchange_leaf(Ipa::new(IPA), 3, old.desc, new, &tlb)
        .unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    // I-cache first, while the old mapping is still there; then the invalidation, while Locked.
    assert_eq!(
        seen[0],
        (
            TlbCall::Icache {
                pa: PA + 0x10_0000,
                len: 4096
            },
            Some(old.desc.raw())
        )
    );
    assert_eq!(
        seen[1],
        (
            TlbCall::Ipa {
                vmid: 0x1234,
                ipa: IPA,
                level: 3
            },
            Some(Descriptor::LOCKED.raw())
        )
    );
    assert_eq!(t.lookup(Ipa::new(IPA)).unwrap().desc, new);
}

#[test]
fn executable_map_syncs_the_icache_before_entries_appear() {
    let mem: &'static HostMemory = Box::leak(Box::new(HostMemory::new(64)));
    let t = new_table(mem);
    let tlb = RecordingTlb::new();
    let seen = hooked(mem, &t, &tlb);
    t.map(
        Ipa::new(IPA),
        Pa::new(PA),
        3 * 4096,
        S2Attrs::normal(Perm::RWX),
        &tlb,
    )
    .unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(
            TlbCall::Icache {
                pa: PA,
                len: 3 * 4096
            },
            None
        )]
    );
}

#[test]
fn coherent_map_skips_the_icache_and_needs_no_invalidation() {
    let mem: &'static HostMemory = Box::leak(Box::new(HostMemory::new(64)));
    let t = new_table(mem);
    let tlb = RecordingTlb::new();
    let seen = hooked(mem, &t, &tlb);
    t.map_coherent(
        Ipa::new(IPA),
        Pa::new(PA),
        3 * 4096,
        S2Attrs::normal(Perm::RWX),
        false,
        &tlb,
    )
    .unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![]);
    assert_eq!(
        t.lookup(Ipa::new(IPA + 2 * 4096))
            .and_then(|l| l.pa_of(Ipa::new(IPA + 2 * 4096))),
        Some(Pa::new(PA + 2 * 4096))
    );
}

#[test]
fn unmap_invalidates_before_freeing_tables() {
    let mem: &'static HostMemory = Box::leak(Box::new(HostMemory::new(64)));
    let t = new_table(mem);
    let tlb = RecordingTlb::new();
    t.map_pages(
        Ipa::new(IPA),
        Pa::new(PA),
        4 * 4096,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    let tables = mem.allocated_pages();
    let at_flush = Arc::new(Mutex::new(None));
    let a = at_flush.clone();
    tlb.set_hook(move |c| {
        if matches!(c, TlbCall::Vmid { .. }) {
            *a.lock().unwrap() = Some(mem.allocated_pages());
        }
    });
    let mut frames = vec![];
    assert_eq!(
        t.unmap(Ipa::new(IPA), 4 * 4096, &tlb, |l| frames
            .push(l.pa_of(l.ipa).unwrap().raw()))
            .unwrap(),
        4 * 4096
    );
    assert_eq!(frames, vec![PA, PA + 4096, PA + 8192, PA + 12288]);
    assert_eq!(
        *at_flush.lock().unwrap(),
        Some(tables),
        "tables still allocated at the flush"
    );
    assert_eq!(
        mem.allocated_pages(),
        cfg().root_pages(),
        "level-2 and level-3 tables freed"
    );
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

#[test]
fn update_pages_changes_many_pages_with_one_flush_and_no_icache() {
    let mem = HostMemory::new(64);
    let t = new_table(&mem);
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
