//! Each structural check behind a checksum, one forged field at a time (checksums
//! recomputed, so only that check can refuse it), and the layout pinned to
//! docs/SNAPSHOT-FORMAT.md.

mod common;

use common::forge::{put_u64, reforge_image, reforge_superblock, seal, toc_geometry, u64_at};
use common::*;
use snapfile::{Error, MemDisk, Section, Store, SECTOR};

const GEOMETRY: (u32, usize) = (8, 2);

/// "a": 48 pages, full (index record 0 = page 1 raw, record 1 = page 2 LZ4);
/// "b": a diff of "a" (record 0 = page 1 zero-now, record 1 = page 3 raw).
fn setup() -> (MemDisk, Mem) {
    let mut dev = MemDisk::new(600);
    let mut store = Store::format(&mut dev, 4, GEOMETRY.0).unwrap();
    let a: Mem = (0..48u64)
        .map(|i| (i % 3 != 0).then(|| page_of(1 + (i % 2) as u8, i)))
        .collect();
    let all: Vec<usize> = (0..48).collect();
    save(&mut store, &mut dev, "a", None, &a, &all, b"state").unwrap();
    let mut b = a.clone();
    b[1] = None;
    b[3] = Some(page_of(2, 3333));
    save(&mut store, &mut dev, "b", Some("a"), &b, &[1, 3], b"").unwrap();
    (dev, a)
}

fn image_err(dev: &mut MemDisk, name: &str) -> Option<Error> {
    let store = Store::open(dev).unwrap();
    store.image(dev, name).err()
}

fn rec(index: &mut [u8], i: usize) -> &mut [u8] {
    &mut index[i * 24..(i + 1) * 24]
}

type Edit = fn(&mut [u8]);

#[test]
fn forged_index_records_are_refused() {
    let cases: [(&str, usize, Edit); 11] = [
        ("lz4 of length 0", 0, |x| {
            rec(x, 1)[6..8].copy_from_slice(&0u16.to_le_bytes())
        }),
        ("lz4 of a full page", 0, |x| {
            rec(x, 1)[6..8].copy_from_slice(&4096u16.to_le_bytes())
        }),
        ("raw shorter than a page", 0, |x| {
            rec(x, 0)[6..8].copy_from_slice(&4095u16.to_le_bytes())
        }),
        ("zero-now with a length", 1, |x| rec(x, 0)[6] = 1),
        ("zero-now with an offset", 1, |x| rec(x, 0)[8] = 1),
        ("zero-now with a checksum", 1, |x| rec(x, 0)[16] = 1),
        ("zero-now in a full image", 0, |x| {
            let r = rec(x, 0);
            r[4] = 3;
            r[6..].fill(0);
        }),
        ("padding byte", 0, |x| rec(x, 0)[5] = 1),
        ("page past RAM", 0, |x| {
            let last = x.len() / 24 - 1;
            rec(x, last)[..4].copy_from_slice(&48u32.to_le_bytes());
        }),
        ("not sorted", 0, |x| {
            rec(x, 1)[..4].copy_from_slice(&1u32.to_le_bytes())
        }),
        ("bytes past the data", 0, |x| {
            let last = x.len() / 24 - 1;
            rec(x, last)[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        }),
    ];
    for (what, which, edit) in cases {
        let (mut dev, _) = setup();
        reforge_image(&mut dev, GEOMETRY, which, edit, |_| {}, |_| {});
        let name = ["a", "b"][which];
        assert_eq!(
            image_err(&mut dev, name),
            Some(Error::Corrupt(Section::Index)),
            "{what}"
        );
    }
    // The forger itself changes nothing when it edits nothing.
    let (mut dev, a) = setup();
    reforge_image(&mut dev, GEOMETRY, 0, |_| {}, |_| {}, |_| {});
    let store = Store::open(&mut dev).unwrap();
    check_restore(&store.image(&mut dev, "a").unwrap(), &mut dev, &a);
}

#[test]
fn forged_headers_are_refused() {
    let cases: [(&str, usize, Edit); 9] = [
        ("diff flag on a full image", 0, |h| h[12] = 1),
        ("no diff flag on a diff", 1, |h| h[12] = 0),
        ("no RAM", 0, |h| h[32..36].fill(0)),
        ("index length not whole records", 0, |h| {
            put_u64(h, 176, u64_at(h, 176) - 1);
            put_u64(h, 192, u64_at(h, 192) - 1);
        }),
        ("touch length not whole records", 0, |h| {
            put_u64(h, 200, u64_at(h, 200) - 1)
        }),
        ("touch order past the extent", 0, |h| {
            put_u64(h, 200, u64_at(h, 200) + 4096)
        }),
        // Valid headers that are not the one their entry was committed with.
        ("another name", 0, |h| h[41] = b'c'),
        ("another sequence number", 0, |h| {
            put_u64(h, 16, u64_at(h, 16) + 7)
        }),
        ("another parent", 1, |h| put_u64(h, 112, u64_at(h, 112) + 7)),
    ];
    for (what, which, edit) in cases {
        let (mut dev, _) = setup();
        reforge_image(&mut dev, GEOMETRY, which, |_| {}, edit, |_| {});
        let name = ["a", "b"][which];
        let want = Some(Error::Corrupt(Section::ImageHeader));
        assert_eq!(image_err(&mut dev, name), want, "{what}");
    }
    // An entry naming another header checksum than its image's.
    let (mut dev, _) = setup();
    let other = |e: &mut [u8]| put_u64(e, 104, u64_at(e, 104) ^ 1);
    reforge_image(&mut dev, GEOMETRY, 0, |_| {}, |_| {}, other);
    assert_eq!(
        image_err(&mut dev, "a"),
        Some(Error::Corrupt(Section::ImageHeader))
    );
}

#[test]
fn forged_superblocks_are_refused() {
    let cases: [(&str, Edit); 6] = [
        ("sector size", |s| {
            s[12..16].copy_from_slice(&1024u32.to_le_bytes())
        }),
        ("too many entries", |s| {
            // A self-consistent geometry for 5000 entries: only the limit is wrong.
            let toc = (64 + 5000 * 128u64).div_ceil(512);
            s[40..44].copy_from_slice(&5000u32.to_le_bytes());
            put_u64(s, 32, toc);
            put_u64(s, 48, 1 + 2 * toc);
            put_u64(s, 16, 1 << 20);
        }),
        ("TOC size", |s| put_u64(s, 32, u64_at(s, 32) + 1)),
        ("data start", |s| put_u64(s, 48, u64_at(s, 48) + 1)),
        ("device smaller than the TOCs", |s| {
            put_u64(s, 16, u64_at(s, 48) - 1)
        }),
        ("device bytes past 2^64", |s| {
            put_u64(s, 16, u64::MAX / 512 + 1)
        }),
    ];
    for (what, edit) in cases {
        let (mut dev, _) = setup();
        reforge_superblock(&mut dev, edit);
        let err = Store::open(&mut dev).err();
        assert_eq!(err, Some(Error::Corrupt(Section::Superblock)), "{what}");
    }
}

/// The page checksum as docs/SNAPSHOT-FORMAT.md defines it: XXH64, seed 0, of the 4 KiB.
fn page_sum_reference(page: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(page, 0)
}

#[test]
fn the_layout_is_the_documented_one() {
    let (dev, a) = setup();
    let b = dev.bytes();
    let mut sb = b[..SECTOR].to_vec();
    assert_eq!(
        (&sb[..8], u64_at(&sb, 8) as u32, u64_at(&sb, 12) as u32),
        (&b"MHVSNAPS"[..], 2, 512)
    );
    seal(&mut sb, 504);
    assert_eq!(
        sb,
        b[..SECTOR],
        "superblock checksum at 504 over the sector"
    );
    let (copies, used) = toc_geometry(GEOMETRY.0, GEOMETRY.1);
    for c in copies {
        let mut toc = b[c..c + used].to_vec();
        assert_eq!(&toc[..8], b"MHVSTOC\0");
        seal(&mut toc, 56);
        assert_eq!(
            toc,
            b[c..c + used],
            "TOC checksum at 56 over header and entries"
        );
        assert_eq!(&toc[64..66], &[1, b'a']);
    }
    let start = u64_at(b, copies[0] + 64 + 88) as usize * SECTOR;
    let mut h = b[start..start + SECTOR].to_vec();
    assert_eq!((&h[..8], &h[40..42]), (&b"MHVSIMG\0"[..], &[1, b'a'][..]));
    assert_eq!(
        u64_at(&h, 504),
        u64_at(b, copies[0] + 64 + 104),
        "entry holds the header sum"
    );
    seal(&mut h, 504);
    assert_eq!(h, b[start..start + SECTOR]);
    let (data, index) = (
        start + u64_at(&h, 144) as usize,
        start + u64_at(&h, 168) as usize,
    );
    let r = &b[index + 24..index + 48];
    let page = read(&a, 2);
    assert_eq!(
        (u64_at(r, 0) as u32, r[4], u64_at(r, 16)),
        (2, 1, page_sum_reference(&page))
    );
    let (off, len) = (
        u64_at(r, 8) as usize,
        u16::from_le_bytes([r[6], r[7]]) as usize,
    );
    let stored = &b[data + off..data + off + len];
    let mut out = [0u8; 4096];
    assert_eq!(
        lz4_flex::block::decompress_into(stored, &mut out).unwrap(),
        4096
    );
    assert!(out == page, "LZ4 block format");
}

#[test]
fn forged_tables_of_contents_are_refused() {
    const E: usize = 64; // entry 0 ("a"); entry 1 ("b", the diff of "a") is at E + 128
    let cases: [(&str, Edit); 13] = [
        ("duplicate name", |t| t[E + 129] = b'a'),
        ("duplicate sequence number", |t| {
            put_u64(t, E + 128 + 72, u64_at(t, E + 72))
        }),
        ("sequence number not below next", |t| {
            put_u64(t, E + 128 + 72, u64_at(t, 24))
        }),
        ("parent missing", |t| t[E + 128 + 34] = b'z'),
        ("parent sequence number", |t| {
            put_u64(t, E + 128 + 80, u64_at(t, E + 128 + 80) + 1)
        }),
        ("parent newer than child", |t| {
            put_u64(t, E + 72, 100);
            put_u64(t, 24, 101);
            put_u64(t, E + 128 + 80, 100);
        }),
        ("overlapping extents", |t| {
            put_u64(t, E + 128 + 88, u64_at(t, E + 88))
        }),
        ("extent over the TOC", |t| put_u64(t, E + 88, 1)),
        ("extent past the device", |t| put_u64(t, E + 96, 1 << 30)),
        ("empty extent", |t| put_u64(t, E + 128 + 96, 0)),
        ("more entries than the TOC holds", |t| t[32] = 9),
        ("name padding", |t| t[E + 10] = b'x'),
        ("another store's TOC", |t| t[8] ^= 1),
    ];
    let (copies, used) = toc_geometry(GEOMETRY.0, GEOMETRY.1);
    for (what, edit) in cases {
        let (mut dev, _) = setup();
        for c in copies {
            let toc = &mut dev.bytes_mut()[c..c + used];
            edit(toc);
            seal(toc, 56);
        }
        assert_eq!(
            Store::open(&mut dev).err(),
            Some(Error::Corrupt(Section::Toc)),
            "{what}"
        );
    }
}
