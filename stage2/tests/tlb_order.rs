//! The order of TLB and I-cache maintenance against the table writes, seen through the
//! independent oracle at each maintenance call: break-before-make (the slot holds the Locked
//! entry at the invalidation), I-cache maintenance before an executable entry appears, and
//! invalidation before table pages are freed.

mod common;
mod tlb_common;

use common::Oracle;
use stage2::*;
use std::sync::{Arc, Mutex};
use tlb_common::{cfg, new_table, IPA, MIB2, PA};

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
