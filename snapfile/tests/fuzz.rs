//! Nothing read from the disk panics the reader: random devices, random damage to a valid
//! store (whose verified reads must still be exact), and damage behind forged checksums
//! (so the structural checks behind each checksum are exercised too).

mod common;

use common::forge::{self, reforge_image};
use common::*;
use proptest::prelude::*;
use snapfile::{BlockDevice, MemDisk, Store, PAGE, SECTOR};

/// A store with a full image "a" and a diff "b", and their memories.
fn valid() -> (MemDisk, Vec<(&'static str, Mem)>) {
    // Enough data that a forged length mostly stays inside the data section and so
    // reaches the page reader's own checks.
    let mut dev = MemDisk::new(600);
    let mut store = Store::format(&mut dev, 11, 8).unwrap();
    let a: Mem = (0..48u64)
        .map(|i| (i % 3 != 0).then(|| page_of(1 + (i % 2) as u8, i)))
        .collect();
    save(
        &mut store,
        &mut dev,
        "a",
        None,
        &a,
        &(0..48).collect::<Vec<_>>(),
        b"aaaa",
    )
    .unwrap();
    let mut b = a.clone();
    b[1] = None;
    b[3] = Some(page_of(2, 33));
    save(&mut store, &mut dev, "b", Some("a"), &b, &[1, 3], b"bb").unwrap();
    (dev, vec![("a", a), ("b", b)])
}

/// Opens, lists, resolves and reads everything; with `models`, every page that reads
/// without error must be the one saved.
fn exercise<D: BlockDevice>(dev: &mut D, models: Option<&[(&str, Mem)]>) {
    let Ok(store) = Store::open(dev) else { return };
    let _ = store.gaps();
    let names: Vec<String> = store
        .list()
        .iter()
        .map(|e| e.name.as_str().to_string())
        .collect();
    let mut out = [0u8; PAGE];
    for n in names {
        let Ok(img) = store.image(dev, &n) else {
            continue;
        };
        let _ = (img.state(), img.touch_order(), img.present_pages().count());
        let want = models.and_then(|m| m.iter().find(|(mn, _)| *mn == n));
        for r in img.pages() {
            if img.read_page(dev, r, &mut out).is_ok() {
                if let Some((_, m)) = want {
                    assert!(
                        out == read(m, r.gpn().0 as usize),
                        "{n}: page {} wrong",
                        r.gpn().0
                    );
                }
            }
        }
    }
}

/// Damage at `spots` inside image `which`'s header and index (offsets modulo their joint
/// length), and at `toc_spots` in its TOC copies, every checksum over them re-forged.
fn forge(dev: &mut MemDisk, which: usize, spots: &[(u16, u8)], toc_spots: &[(u16, u8)]) {
    let (_, toc_len) = forge::toc_geometry(8, 2);
    let index_len = {
        let (copies, _) = forge::toc_geometry(8, 2);
        let b = dev.bytes();
        let start = forge::u64_at(b, copies[0] + 64 + which * 128 + 88) as usize * SECTOR;
        forge::u64_at(b, start + 176) as usize
    };
    let spot = |o: u16| o as usize % (SECTOR + index_len);
    reforge_image(
        dev,
        (8, 2),
        which,
        |index| {
            for &(o, x) in spots.iter().filter(|(o, _)| spot(*o) >= SECTOR) {
                index[spot(o) - SECTOR] ^= x;
            }
        },
        |header| {
            for &(o, x) in spots.iter().filter(|(o, _)| spot(*o) < SECTOR) {
                header[spot(o)] ^= x;
            }
        },
        |_| {},
    );
    // TOC damage is relative to the start of each copy's checksummed bytes.
    let (copies, _) = forge::toc_geometry(8, 2);
    for c in copies {
        for &(o, x) in toc_spots {
            dev.bytes_mut()[c + o as usize % toc_len] ^= x;
        }
        forge::seal(&mut dev.bytes_mut()[c..c + toc_len], 56);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn random_devices_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..24 * SECTOR),
        magic in any::<bool>(),
    ) {
        let mut bytes = bytes;
        if magic && bytes.len() >= 8 {
            bytes[..8].copy_from_slice(b"MHVSNAPS");
        }
        exercise(&mut MemDisk::from_bytes(bytes), None);
    }

    #[test]
    fn random_damage_never_gives_wrong_bytes(
        spots in prop::collection::vec((0usize..600 * SECTOR, 1u8..=255), 1..24),
        cut in prop::option::of(0u64..600),
    ) {
        let (mut dev, models) = valid();
        for (at, x) in spots {
            dev.bytes_mut()[at] ^= x;
        }
        if let Some(c) = cut {
            dev.truncate(c);
        }
        exercise(&mut dev, Some(&models));
    }

    #[test]
    fn forged_checksums_never_panic(
        which in 0usize..2,
        // Half the spots in the index (the header's own fields mostly stop at the first).
        spots in prop::collection::vec(
            (prop_oneof![any::<u16>(), (0u16..800).prop_map(|o| 512 + o)], 1u8..=255),
            0..4,
        ),
        toc_spots in prop::collection::vec((any::<u16>(), 1u8..=255), 0..3),
    ) {
        let (mut dev, _) = valid();
        forge(&mut dev, which, &spots, &toc_spots);
        exercise(&mut dev, None);
    }
}

/// The forger is right: with no damage the store still verifies, and damage behind forged
/// checksums reaches the structural checks (not the checksum ones).
#[test]
fn forged_damage_reaches_the_checks_behind_the_checksums() {
    use snapfile::{Error, Section};
    let (mut dev, models) = valid();
    forge(&mut dev, 1, &[], &[]);
    let store = Store::open(&mut dev).unwrap();
    check_restore(&store.image(&mut dev, "b").unwrap(), &mut dev, &models[1].1);
    // Index record 0's kind and padding bytes; the header's parent-name length and a byte
    // of its own name's padding.
    let spots = [
        (SECTOR + 4, Section::Index),
        (SECTOR + 5, Section::Index),
        (73, Section::ImageHeader),
        (58, Section::ImageHeader),
    ];
    for (spot, want) in spots {
        let (mut dev, _) = valid();
        forge(&mut dev, 1, &[(spot as u16, 0x40)], &[]);
        let store = Store::open(&mut dev).unwrap();
        assert_eq!(
            store.image(&mut dev, "b").err(),
            Some(Error::Corrupt(want)),
            "spot {spot}"
        );
    }
    // A TOC entry's extent moved off the device.
    let (mut dev, _) = valid();
    forge(&mut dev, 0, &[], &[(64 + 88 + 5, 0x10)]);
    assert_eq!(
        Store::open(&mut dev).unwrap_err(),
        Error::Corrupt(Section::Toc)
    );
}
