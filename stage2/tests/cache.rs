//! Cache maintenance owed for frames the hypervisor writes, and the FEAT_S2FWB encoding.

mod tlb_common;

use stage2::*;
use tlb_common::*;

/// Linux KVM with FWB (`MT_S2_FWB_NORMAL` = 6, `MT_S2_FWB_DEVICE_nGnRE` = 1): MemAttr of
/// Normal is `0b0110`, of Device `0b0001`; every other bit as without FWB.
#[test]
fn page_encoding_with_fwb() {
    let fwb = AttrEncoding::ForceWriteBack;
    let d = Descriptor::leaf_encoded(0x4000_1000, 3, S2Attrs::normal(Perm::RW), true, fwb);
    let d = d.unwrap();
    assert_eq!(d.raw(), 0x0040_0000_4000_17db);
    assert_eq!(d.attrs(), S2Attrs::normal(Perm::RW));
    let plain = Descriptor::page(0x4000_1000, S2Attrs::normal(Perm::RW)).unwrap();
    assert_eq!(d.raw() ^ plain.raw(), (0b0110 ^ 0b1111) << 2);
    let dev = S2Attrs::device(Perm::RW);
    let d = Descriptor::leaf_encoded(0x0900_0000, 3, dev, true, fwb).unwrap();
    assert_eq!(d.raw(), Descriptor::page(0x0900_0000, dev).unwrap().raw());
    assert_eq!(d.attrs(), dev);
}

/// Without FWB a frame the hypervisor wrote is cleaned to the PoC once when published; with
/// FWB nothing is owed. Mapping never cleans (the frame's writer does, once).
#[test]
fn publishing_frames_cleans_to_poc_only_without_fwb() {
    let tlb = RecordingTlb::new();
    publish_frames(&cfg(), &tlb, PA, 3 * 4096);
    assert_eq!(
        tlb.take(),
        vec![TlbCall::CleanPoc {
            pa: PA,
            len: 3 * 4096
        }]
    );
    publish_frames(&cfg().with_fwb(true), &tlb, PA, 3 * 4096);
    assert_eq!(tlb.take(), vec![]);
    let mem = HostMemory::new(64);
    let t = new_table(&mem);
    t.map_pages(
        Ipa::new(IPA),
        Pa::new(PA),
        4 * 4096,
        S2Attrs::normal(Perm::RWX),
        &tlb,
    )
    .unwrap();
    assert!(tlb
        .take()
        .iter()
        .all(|c| !matches!(c, TlbCall::CleanPoc { .. })));
}

/// A table configured for FWB writes forced-Write-Back leaves (MemAttr `0b0110`) and keeps
/// Device as `0b0001`; pages and blocks alike, and a split block keeps its encoding.
#[test]
fn fwb_table_encodes_forced_write_back() {
    let mem = HostMemory::new(64);
    let t = Stage2Table::new(cfg().with_fwb(true), 0x1234, &mem).unwrap();
    let tlb = RecordingTlb::new();
    t.map(
        Ipa::new(IPA),
        Pa::new(PA),
        MIB2,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    let dev = IPA + 4 * MIB2;
    t.map_pages(
        Ipa::new(dev),
        Pa::new(0x0900_0000),
        4096,
        S2Attrs::device(Perm::RW),
        &tlb,
    )
    .unwrap();
    let memattr = |ipa: u64| {
        let leaf = t.lookup(Ipa::new(ipa)).expect("mapped");
        (leaf.desc.raw() >> 2) & 0xf
    };
    assert_eq!(memattr(IPA), 0b0110);
    assert_eq!(memattr(dev), 0b0001);
    t.protect(Ipa::new(IPA + 4096), 4096, Perm::RO, &tlb)
        .unwrap();
    assert_eq!(memattr(IPA), 0b0110);
    assert_eq!(memattr(IPA + 4096), 0b0110);
    assert_eq!(
        t.lookup(Ipa::new(IPA)).unwrap().desc.attrs().mem,
        MemType::Normal
    );
}
