use stage2::*;
#[test]
fn smoke() {
    let mem = HostMemory::new(64);
    let cfg = S2Config::new(2, 40, VmidBits::Eight).unwrap();
    let t = Stage2Table::new(cfg, 1, &mem).unwrap();
    let tlb = RecordingTlb::new();
    t.map(
        0x4000_0000,
        0x1_0000_0000,
        0x40_0000,
        S2Attrs::normal(Perm::RW),
        &tlb,
    )
    .unwrap();
    let l = t.lookup(0x4020_1000).unwrap();
    assert_eq!(l.level, 2);
    assert_eq!(l.pa_of(0x4020_1000), Some(0x1_0020_1000));
    t.destroy(&tlb);
    assert_eq!(mem.allocated_pages(), 0);
}
