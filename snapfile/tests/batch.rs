//! Prefetch reads: `Image::read_batch` returns what `read_page` would, in few requests.

mod common;

use common::*;
use snapfile::{Error, Gpn, Image, MemDisk, PageRef, Store, PAGE, SECTOR};

/// A store whose full image "a" was written in touch order (a fixed shuffle), and a diff "b".
fn setup() -> (MemDisk, Store, Mem, Mem, Vec<usize>) {
    let mut dev = MemDisk::new(4096);
    let mut store = Store::format(&mut dev, 2, 8).unwrap();
    let n = 96;
    let a: Mem = (0..n)
        .map(|i| (i % 5 != 0).then(|| page_of(1 + (i % 3 == 0) as u8, i as u64)))
        .collect();
    let order: Vec<usize> = (0..n).map(|i| (i * 37) % n).collect();
    save(&mut store, &mut dev, "a", None, &a, &order, b"").unwrap();
    let mut b = a.clone();
    for g in [3, 4, 50] {
        b[g] = Some(page_of(2, 1000 + g as u64));
    }
    b[7] = None;
    save(
        &mut store,
        &mut dev,
        "b",
        Some("a"),
        &b,
        &[3, 4, 7, 50],
        b"",
    )
    .unwrap();
    (dev, store, a, b, order)
}

fn batch(
    img: &Image,
    dev: &mut MemDisk,
    refs: &[PageRef],
    max: usize,
) -> Vec<(Gpn, Result<[u8; PAGE], Error>)> {
    let mut got = Vec::new();
    let mut scratch = Vec::new();
    img.read_batch(dev, refs, max, &mut scratch, |g, r| {
        got.push((g, r.copied()))
    })
    .unwrap();
    got
}

#[test]
fn a_batch_in_write_order_takes_few_requests_and_reads_right() {
    let (mut dev, store, a, _, order) = setup();
    let img = store.image(&mut dev, "a").unwrap();
    let refs: Vec<PageRef> = order
        .iter()
        .filter_map(|&g| img.locate(Gpn(g as u32)))
        .collect();
    let stored: usize = refs.iter().map(|r| r.stored_len()).sum();
    for max in [1, PAGE, 64 << 10, 1 << 20] {
        let reads = dev.reads;
        dev.largest_read = 0;
        let got = batch(&img, &mut dev, &refs, max);
        assert_eq!(got.len(), refs.len());
        for ((g, r), want) in got.iter().zip(&refs) {
            assert_eq!(*g, want.gpn());
            assert!(*r.as_ref().unwrap() == read(&a, g.0 as usize));
        }
        let requests = dev.reads - reads;
        // One request per run of at most `max` bytes (a page is always read whole).
        let bound = if max < PAGE {
            refs.len()
        } else {
            stored.div_ceil(max / 2) + 1
        };
        assert!(
            requests as usize <= bound,
            "{requests} requests at max {max}"
        );
        // No request is longer than asked (rounded out to sectors), or than one page.
        let longest = max.max(PAGE) + 2 * SECTOR;
        assert!(
            dev.largest_read <= longest,
            "{} bytes at max {max}",
            dev.largest_read
        );
    }
}

#[test]
fn scattered_pages_and_diff_chains_read_right_and_damage_stays_local() {
    let (mut dev, store, _, b, order) = setup();
    let img = store.image(&mut dev, "b").unwrap();
    let mut refs: Vec<PageRef> = order
        .iter()
        .rev()
        .filter_map(|&g| img.locate(Gpn(g as u32)))
        .collect();
    refs.rotate_left(5);
    let victim = refs[10];
    dev.bytes_mut()[victim.device_byte() as usize + 1] ^= 0x08;
    let got = batch(&img, &mut dev, &refs, 1 << 20);
    assert_eq!(got.len(), refs.len());
    assert_eq!(got.iter().filter(|(_, r)| r.is_err()).count(), 1);
    for (g, r) in got {
        match r {
            Ok(p) => assert!(g != victim.gpn() && p == read(&b, g.0 as usize)),
            Err(e) => assert_eq!((g, e), (victim.gpn(), Error::PageChecksum { page: g.0 })),
        }
    }
}
