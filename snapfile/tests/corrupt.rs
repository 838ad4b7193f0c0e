//! Corruption: every byte of every checksummed region, page data, truncation, versions.

mod common;

use common::*;
use snapfile::{Error, Gpn, MemDisk, Section, Store, Summary, PAGE, SECTOR};

/// A store with a full image "a" and a diff "b" on top; returns the diff's summary too.
fn setup() -> (MemDisk, Mem, Mem, Summary, Summary) {
    let mut dev = MemDisk::new(2048);
    let mut store = Store::format(&mut dev, 3, 16).unwrap();
    let a: Mem = (0..12u64)
        .map(|i| (i % 3 != 0).then(|| page_of(1 + (i % 2) as u8, i)))
        .collect();
    let sa = save(
        &mut store,
        &mut dev,
        "a",
        None,
        &a,
        &(0..12).collect::<Vec<_>>(),
        b"state of a",
    )
    .unwrap();
    let mut b = a.clone();
    b[0] = Some(page_of(2, 99));
    b[1] = None;
    b[4] = Some(page_of(1, 98));
    let sb = save(
        &mut store,
        &mut dev,
        "b",
        Some("a"),
        &b,
        &[0, 1, 4],
        b"state of b",
    )
    .unwrap();
    (dev, a, b, sa, sb)
}

fn flipped(dev: &MemDisk, byte: u64, mask: u8) -> MemDisk {
    let mut d = dev.clone();
    d.bytes_mut()[byte as usize] ^= mask;
    d
}

#[test]
fn every_superblock_byte_is_checked() {
    let (dev, ..) = setup();
    for at in 0..SECTOR as u64 {
        for mask in [0x01, 0x80] {
            let mut d = flipped(&dev, at, mask);
            assert!(
                Store::open(&mut d).is_err(),
                "superblock byte {at} ^ {mask:#x} accepted"
            );
        }
    }
}

#[test]
fn one_bad_toc_copy_is_survived_and_two_are_refused() {
    let (dev, a, b, ..) = setup();
    let mut good = dev.clone();
    let store = Store::open(&mut good).unwrap();
    // Superblock geometry for 16 entries: each copy is 5 sectors (64 + 16 * 128 bytes).
    let copy = [SECTOR as u64, 6 * SECTOR as u64];
    let used = 64 + 2 * 128;
    for at in 0..used {
        let mut one = flipped(&dev, copy[0] + at, 0x10);
        let s = Store::open(&mut one).unwrap();
        assert_eq!(s.list(), store.list());
        assert_eq!(s.toc_copies_valid(), [false, true]);
        let mut both = flipped(&one, copy[1] + at, 0x10);
        let err = Store::open(&mut both).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Checksum(Section::Toc) | Error::Corrupt(Section::Toc)
            ),
            "{err:?}"
        );
    }
    let mut one = flipped(&dev, copy[1] + 70, 0x10);
    let s = Store::open(&mut one).unwrap();
    check_restore(&s.image(&mut one, "a").unwrap(), &mut one, &a);
    check_restore(&s.image(&mut one, "b").unwrap(), &mut one, &b);
}

#[test]
fn every_header_state_index_and_touch_byte_is_checked() {
    let (dev, _, _, sa, sb) = setup();
    for (s, name) in [(sa, "a"), (sb, "b")] {
        let header = (s.start * SECTOR as u64, (s.start + 1) * SECTOR as u64);
        let [state, _, index, touch] = s.sections;
        assert!(
            index.1 > index.0 && touch.1 > touch.0 && state.1 > state.0,
            "{:?}",
            s.sections
        );
        for (i, (lo, hi)) in [header, index, state, touch].into_iter().enumerate() {
            for at in lo..hi {
                let mut d = flipped(&dev, at, 0x04);
                let store = Store::open(&mut d).unwrap();
                assert!(
                    store.image(&mut d, name).is_err(),
                    "{name}: byte {at} accepted"
                );
                // "b" reads "a"'s header and index too (not its state or touch order).
                if i < 2 {
                    assert!(
                        store.image(&mut d, "b").is_err(),
                        "b over {name}: byte {at}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_damaged_page_is_refused_alone_and_never_returned() {
    let (mut dev, _, b, ..) = setup();
    let store = Store::open(&mut dev).unwrap();
    let img = store.image(&mut dev, "b").unwrap();
    assert_eq!(img.pages().len(), b.iter().flatten().count());
    let mut out = [0u8; PAGE];
    for r in img.pages() {
        for at in (0..r.stored_len() as u64)
            .step_by(97)
            .chain([r.stored_len() as u64 - 1])
        {
            let mut d = flipped(&dev, r.device_byte() + at, 0x20);
            let err = img.read_page(&mut d, r, &mut out).unwrap_err();
            assert_eq!(err, Error::PageChecksum { page: r.gpn().0 });
            assert!(
                out.iter().all(|b| *b == 0),
                "unverified bytes left in the buffer"
            );
        }
        let mut d = flipped(&dev, r.device_byte(), 0x20);
        for o in img.pages().iter().filter(|o| o.gpn() != r.gpn()) {
            // Pages never share stored bytes, so only the damaged one fails.
            img.read_page(&mut d, o, &mut out).unwrap();
            assert!(out == read(&b, o.gpn().0 as usize));
        }
    }
}

#[test]
fn a_truncated_device_is_refused() {
    let (dev, ..) = setup();
    let total = dev.bytes().len() as u64 / SECTOR as u64;
    for keep in [0, 1, 5, 20, total / 2, total - 1] {
        let mut d = dev.clone();
        d.truncate(keep);
        let err = Store::open(&mut d).unwrap_err();
        assert!(
            matches!(err, Error::Truncated { .. }),
            "{keep} sectors: {err:?}"
        );
    }
    // A device cut short under an open store: reads fail, they do not return junk.
    let mut d = dev.clone();
    let store = Store::open(&mut d).unwrap();
    d.truncate(20);
    assert!(matches!(
        store.image(&mut d, "b").unwrap_err(),
        Error::Device(_)
    ));
}

#[test]
fn a_wrong_version_is_named() {
    let (dev, _, _, sa, _) = setup();
    let mut d = dev.clone();
    // Version 1 (XXH3 page checksums), and a newer one.
    for v in [1, 3] {
        d.bytes_mut()[8] = v;
        assert_eq!(
            Store::open(&mut d).unwrap_err(),
            Error::UnsupportedVersion {
                found: u32::from(v),
                supported: 2
            }
        );
    }
    let mut d = dev.clone();
    d.bytes_mut()[sa.start as usize * SECTOR + 8] = 9;
    let store = Store::open(&mut d).unwrap();
    assert_eq!(
        store.image(&mut d, "a").unwrap_err(),
        Error::UnsupportedVersion {
            found: 9,
            supported: 2
        }
    );
    assert_eq!(
        store.image(&mut d, "b").unwrap_err(),
        Error::UnsupportedVersion {
            found: 9,
            supported: 2
        }
    );
}

#[test]
fn a_blank_or_foreign_device_is_refused() {
    let mut d = MemDisk::new(64);
    assert_eq!(
        Store::open(&mut d).unwrap_err(),
        Error::BadMagic(Section::Superblock)
    );
    let (dev, ..) = setup();
    let mut d = dev.clone();
    let store = Store::open(&mut d).unwrap();
    let e = store.entry("a").unwrap();
    d.bytes_mut()[e.start as usize * SECTOR] ^= 1;
    assert_eq!(
        store.image(&mut d, "a").unwrap_err(),
        Error::BadMagic(Section::ImageHeader)
    );
    let _ = Gpn(0);
}
