//! Unit tests of the descriptor encoding.
use super::*;

#[test]
fn page_encoding_matches_kvm_layout() {
    let d = Descriptor::page(0x4000_1000, S2Attrs::normal(Perm::RW)).unwrap();
    // valid|page, MemAttr 0xf, S2AP RW, SH inner, AF, XN = 0b10
    assert_eq!(d.raw(), 0x0040_0000_4000_17ff);
    let x = Descriptor::page(0x4000_1000, S2Attrs::normal(Perm::RX)).unwrap();
    assert_eq!(x.raw(), 0x0000_0000_4000_177f);
    let dev = Descriptor::page(0x0900_0000, S2Attrs::device(Perm::RW)).unwrap();
    assert_eq!(dev.raw(), 0x0040_0000_0900_07c7);
}

#[test]
fn block_and_table_encoding() {
    let b = Descriptor::leaf(0x8020_0000, 2, S2Attrs::normal(Perm::RO), false).unwrap();
    assert_eq!(b.raw() & 3, 1);
    assert_eq!(b.output_address(2), 0x8020_0000);
    assert!(matches!(
        b.kind(2),
        DescriptorKind::Leaf {
            pa: 0x8020_0000,
            young: false,
            ..
        }
    ));
    assert_eq!(
        Descriptor::leaf(0x8010_0000, 2, S2Attrs::normal(Perm::RO), false),
        Err(Error::Misaligned)
    );
    let t = Descriptor::table(0x1234_5000);
    assert_eq!(t.raw(), 0x1234_5003);
    assert_eq!(t.kind(1), DescriptorKind::Table { pa: 0x1234_5000 });
    // The same bits at level 3 are a page.
    assert!(matches!(
        t.kind(3),
        DescriptorKind::Leaf {
            pa: 0x1234_5000,
            ..
        }
    ));
    assert!(matches!(
        Descriptor::from_raw(1).kind(3),
        DescriptorKind::Unknown(1)
    ));
    assert!(matches!(
        Descriptor::from_raw(1).kind(0),
        DescriptorKind::Unknown(1)
    ));
}

#[test]
fn attrs_round_trip() {
    for bits in 0..8u8 {
        for mem in [MemType::Normal, MemType::Device] {
            for sw in [0u8, 5, 0xF] {
                let perm = Perm::new(bits & 1 != 0, bits & 2 != 0, bits & 4 != 0);
                let attrs = S2Attrs { perm, mem, sw };
                match Descriptor::page(0x1000, attrs) {
                    Ok(d) => assert_eq!(d.attrs(), attrs),
                    Err(e) => {
                        assert!(e == Error::BadAttrs && mem == MemType::Device && perm.exec)
                    }
                }
            }
        }
    }
    assert_eq!(
        Descriptor::page(
            0,
            S2Attrs {
                sw: 16,
                ..Default::default()
            }
        ),
        Err(Error::BadAttrs)
    );
}
