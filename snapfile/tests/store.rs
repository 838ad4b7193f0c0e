//! Scenarios: save and restore, diffs, names, deletion and first fit, space, batching.

mod common;

use common::*;
use snapfile::{Error, Gpn, MemDisk, PageKind, SaveSpec, Store, BATCH, MAX_CHAIN, PAGE, SECTOR};

fn mem_of(kinds: &[u8]) -> Mem {
    kinds
        .iter()
        .enumerate()
        .map(|(i, &k)| (k != 0).then(|| page_of(k, i as u64)))
        .collect()
}

fn all(mem: &Mem) -> Vec<usize> {
    (0..mem.len()).collect()
}

fn fresh(sectors: u64) -> (MemDisk, Store) {
    let mut dev = MemDisk::new(sectors);
    let store = Store::format(&mut dev, 7, 64).unwrap();
    (dev, store)
}

#[test]
fn full_image_restores_and_skips_zero_pages() {
    let (mut dev, mut store) = fresh(4096);
    let mem = mem_of(&[1, 0, 2, 0, 0, 1, 2, 0]);
    let s = save(
        &mut store,
        &mut dev,
        "a",
        None,
        &mem,
        &all(&mem),
        b"vcpu state",
    )
    .unwrap();
    assert_eq!((s.lz4, s.raw, s.skipped, s.zero_now), (2, 2, 4, 0));
    let mut store = Store::open(&mut dev).unwrap();
    let img = store.image(&mut dev, "a").unwrap();
    assert_eq!((img.name(), img.state()), ("a", &b"vcpu state"[..]));
    let listed: Vec<u32> = img.pages().iter().map(|r| r.gpn().0).collect();
    assert_eq!(listed, [0, 2, 5, 6]);
    assert_eq!(
        img.present_pages().map(|g| g.0).collect::<Vec<_>>(),
        [0, 2, 5, 6]
    );
    assert_eq!(img.locate(Gpn(2)).unwrap().kind(), PageKind::Raw);
    assert!(img.locate(Gpn(0)).unwrap().stored_len() < PAGE);
    // The touch order is stored as given (common::save passes the pages reversed).
    assert_eq!(img.touch_order().first(), Some(&Gpn(7)));
    check_restore(&img, &mut dev, &mem);
    // Names are unique, bounded and not empty.
    let again = save(&mut store, &mut dev, "a", None, &mem, &[], b"");
    assert_eq!(again.unwrap_err(), Error::NameExists);
    let long = "x".repeat(33);
    assert_eq!(
        save(&mut store, &mut dev, &long, None, &mem, &[], b"").unwrap_err(),
        Error::NameTooLong
    );
    assert_eq!(
        save(&mut store, &mut dev, "", None, &mem, &[], b"").unwrap_err(),
        Error::BadName
    );
    assert_eq!(store.image(&mut dev, "b").unwrap_err(), Error::NotFound);
}

#[test]
fn a_chain_of_diffs_restores_each_save_exactly() {
    let (mut dev, mut store) = fresh(8192);
    let mut mem = mem_of(&[1, 2, 1, 0, 2, 0, 1, 1, 0, 2]);
    let mut saved = vec![mem.clone()];
    save(&mut store, &mut dev, "s0", None, &mem, &all(&mem), b"0").unwrap();
    for step in 1..4usize {
        // Dirty pages: one rewritten, one zeroed, one released, one new.
        let dirty = [step, step + 3, step + 5, step + 6];
        mem[dirty[0]] = Some(page_of(2, 100 + step as u64));
        mem[dirty[1]] = Some(Box::new(zero_page()));
        mem[dirty[2]] = None;
        mem[dirty[3]] = Some(page_of(1, 200 + step as u64));
        let name = format!("s{step}");
        let parent = format!("s{}", step - 1);
        let s = save(
            &mut store,
            &mut dev,
            &name,
            Some(&parent),
            &mem,
            &dirty,
            b"d",
        )
        .unwrap();
        assert_eq!(s.zero_now, 2);
        saved.push(mem.clone());
    }
    let store = Store::open(&mut dev).unwrap();
    for (i, m) in saved.iter().enumerate() {
        let img = store.image(&mut dev, &format!("s{i}")).unwrap();
        assert_eq!(img.depth(), i + 1);
        check_restore(&img, &mut dev, m);
    }
}

#[test]
fn diffs_check_parent_shape_and_depth() {
    let (mut dev, mut store) = fresh(8192);
    let mem = mem_of(&[1, 2]);
    assert_eq!(
        save(&mut store, &mut dev, "d", Some("none"), &mem, &[0], b"").unwrap_err(),
        Error::ParentMissing
    );
    save(&mut store, &mut dev, "s0", None, &mem, &all(&mem), b"").unwrap();
    let bigger = mem_of(&[1, 2, 1]);
    assert_eq!(
        save(&mut store, &mut dev, "d", Some("s0"), &bigger, &[2], b"").unwrap_err(),
        Error::ShapeMismatch
    );
    for i in 1..MAX_CHAIN {
        save(
            &mut store,
            &mut dev,
            &format!("s{i}"),
            Some(&format!("s{}", i - 1)),
            &mem,
            &[i % 2],
            b"",
        )
        .unwrap();
    }
    let top = format!("s{}", MAX_CHAIN - 1);
    assert_eq!(store.image(&mut dev, &top).unwrap().depth(), MAX_CHAIN);
    assert_eq!(
        save(&mut store, &mut dev, "deep", Some(&top), &mem, &[0], b"").unwrap_err(),
        Error::ChainTooDeep
    );
    // A parent cannot go; its newest descendant can, then it can.
    assert_eq!(store.delete(&mut dev, "s0").unwrap_err(), Error::IsParent);
    store.delete(&mut dev, &top).unwrap();
    assert_eq!(store.delete(&mut dev, &top).unwrap_err(), Error::NotFound);
}

#[test]
fn deleting_frees_space_and_first_fit_reuses_it() {
    let (mut dev, mut store) = fresh(2048);
    let mem = mem_of(&[2; 8]);
    let ex = |store: &Store, n: &str| {
        let e = store.entry(n).unwrap();
        (e.start, e.sectors)
    };
    for n in ["a", "b", "c"] {
        save(&mut store, &mut dev, n, None, &mem, &all(&mem), b"").unwrap();
    }
    let (a, b, c) = (ex(&store, "a"), ex(&store, "b"), ex(&store, "c"));
    assert_eq!((a.0 + a.1, b.0 + b.1), (b.0, c.0), "packed in order");
    let free = store.free_sectors();
    store.delete(&mut dev, "b").unwrap();
    assert_eq!(store.free_sectors(), free + b.1);
    // A smaller image goes into b's hole (the first that fits), not after c.
    let small = mem_of(&[2, 2, 0, 0, 0, 0, 0, 0]);
    save(&mut store, &mut dev, "d", None, &small, &[0, 1], b"").unwrap();
    assert_eq!(ex(&store, "d").0, b.0);
    // A bigger one does not fit there and goes after c.
    let big = mem_of(&[2; 12]);
    save(&mut store, &mut dev, "e", None, &big, &all(&big), b"").unwrap();
    assert_eq!(ex(&store, "e").0, c.0 + c.1);
    let store = Store::open(&mut dev).unwrap();
    for (n, m) in [("a", &mem), ("c", &mem), ("d", &small), ("e", &big)] {
        check_restore(&store.image(&mut dev, n).unwrap(), &mut dev, m);
    }
}

#[test]
fn a_save_bigger_than_the_disk_is_refused_and_changes_nothing() {
    let (mut dev, mut store) = fresh(600);
    let mem = mem_of(&[2; 20]);
    save(&mut store, &mut dev, "a", None, &mem, &all(&mem), b"").unwrap();
    let before = Store::open(&mut dev).unwrap();
    let huge = mem_of(&[2; 200]);
    let err = save(&mut store, &mut dev, "big", None, &huge, &all(&huge), b"").unwrap_err();
    let Error::NoSpace { needed, free } = err else {
        panic!("{err:?}")
    };
    assert!(needed > free, "{needed} > {free}");
    let after = Store::open(&mut dev).unwrap();
    assert_eq!(after.list(), before.list());
    assert_eq!(store.list(), before.list());
    check_restore(&after.image(&mut dev, "a").unwrap(), &mut dev, &mem);
    // Compressible pages whose worst case does not fit still go in (the gap is grown into).
    let text = mem_of(&[1; 200]);
    save(&mut store, &mut dev, "text", None, &text, &all(&text), b"").unwrap();
    check_restore(&store.image(&mut dev, "text").unwrap(), &mut dev, &text);
}

#[test]
fn the_writer_refuses_what_it_was_not_told() {
    let (mut dev, mut store) = fresh(4096);
    let mem = mem_of(&[2; 4]);
    let spec = SaveSpec {
        name: "w",
        parent: None,
        shape: shape(4),
        state: b"",
        touch: &[],
        max_pages: 2,
        compress: true,
    };
    let p = page_of(2, 1);
    let mut w = store.begin(&mut dev, &spec).unwrap();
    assert_eq!(
        w.page(&mut dev, Gpn(4), &p).unwrap_err(),
        Error::PageOutOfRange { page: 4 }
    );
    assert_eq!(
        w.page(&mut dev, Gpn(0), &p).unwrap_err(),
        Error::WriterFailed
    );
    let mut w = store.begin(&mut dev, &spec).unwrap();
    w.page(&mut dev, Gpn(1), &p).unwrap();
    w.page(&mut dev, Gpn(1), &p).unwrap();
    assert_eq!(
        w.finish(&mut dev).unwrap_err(),
        Error::DuplicatePage { page: 1 }
    );
    let mut w = store.begin(&mut dev, &spec).unwrap();
    w.page(&mut dev, Gpn(1), &p).unwrap();
    w.page(&mut dev, Gpn(2), &p).unwrap();
    assert_eq!(
        w.page(&mut dev, Gpn(3), &p).unwrap_err(),
        Error::TooManyPages
    );
    let bad_touch = SaveSpec {
        touch: &[Gpn(9)],
        ..spec
    };
    assert_eq!(
        store.begin(&mut dev, &bad_touch).err(),
        Some(Error::PageOutOfRange { page: 9 })
    );
    assert!(store.list().is_empty());
    save(&mut store, &mut dev, "w", None, &mem, &all(&mem), b"").unwrap();
}

#[test]
fn the_toc_fills_up() {
    let mut dev = MemDisk::new(4096);
    let mut store = Store::format(&mut dev, 1, 3).unwrap();
    let mem = mem_of(&[1]);
    for n in ["a", "b", "c"] {
        save(&mut store, &mut dev, n, None, &mem, &[0], b"").unwrap();
    }
    assert_eq!(
        save(&mut store, &mut dev, "d", None, &mem, &[0], b"").unwrap_err(),
        Error::TocFull
    );
    // A full table still opens (count = max_entries is valid).
    assert_eq!(Store::open(&mut dev).unwrap().list().len(), 3);
}

#[test]
fn page_data_leaves_in_large_writes() {
    let pages = 2048; // 8 MiB of incompressible pages
    let mut dev = MemDisk::new(40_000);
    let mut store = Store::format(&mut dev, 1, 16).unwrap();
    let mem: Mem = (0..pages).map(|i| Some(page_of(2, i as u64))).collect();
    let w0 = dev.writes;
    let s = save(&mut store, &mut dev, "big", None, &mem, &all(&mem), b"").unwrap();
    let writes = dev.writes - w0;
    // Data writes of >= BATCH, plus the tail, the header and two TOC copies.
    let data_writes = s.data_bytes / BATCH as u64;
    assert!(
        writes <= data_writes + 5,
        "{writes} writes for {} bytes",
        s.data_bytes
    );
    assert!(s.sectors * SECTOR as u64 >= s.data_bytes);
}

#[test]
fn a_state_blob_bigger_than_the_disk_is_refused_at_begin() {
    let (mut dev, mut store) = fresh(200);
    let mem = mem_of(&[1]);
    let state = vec![7u8; 200 * SECTOR];
    let err = save(&mut store, &mut dev, "s", None, &mem, &[0], &state).unwrap_err();
    let Error::NoSpace { needed, free } = err else {
        panic!("{err:?}")
    };
    assert!(needed > free);
    let written = dev.sectors_written;
    assert!(store.list().is_empty());
    save(&mut store, &mut dev, "s", None, &mem, &[0], b"small").unwrap();
    assert!(dev.sectors_written > written);
}

#[test]
fn a_shape_that_cannot_be_is_refused() {
    use mmtypes::Ipa;
    use snapfile::Shape;
    let (mut dev, mut store) = fresh(400);
    let good = shape(4);
    let bad = [
        Shape {
            ram_pages: 0,
            ..good
        },
        Shape { vcpus: 0, ..good },
        Shape {
            ram_base: Ipa::new(0x4000_0800),
            ..good
        },
        Shape {
            ram_base: Ipa::new(u64::MAX - 0xfff),
            ..good
        },
    ];
    for shape in bad {
        let spec = SaveSpec {
            name: "s",
            parent: None,
            shape,
            state: b"",
            touch: &[],
            max_pages: 0,
            compress: true,
        };
        assert_eq!(
            store.begin(&mut dev, &spec).err(),
            Some(Error::BadShape),
            "{shape:?}"
        );
    }
    assert_eq!(Gpn(3).ipa(&good), Ipa::new(0x4000_3000));
}

#[test]
fn an_image_of_nothing_is_one_sector() {
    let (mut dev, mut store) = fresh(400);
    let zero: Mem = vec![None; 8];
    let s = save(&mut store, &mut dev, "empty", None, &zero, &[], b"").unwrap();
    assert_eq!(s.sectors, 1);
    let all_pages: Vec<usize> = (0..8).collect();
    let s2 = save(&mut store, &mut dev, "zeros", None, &zero, &all_pages, b"").unwrap();
    // No page data; the touch order (8 pages) takes a sector.
    assert_eq!((s2.skipped, s2.data_bytes, s2.sectors), (8, 0, 2));
    let store = Store::open(&mut dev).unwrap();
    for n in ["empty", "zeros"] {
        let img = store.image(&mut dev, n).unwrap();
        assert_eq!((img.present_pages().count(), img.state().len()), (0, 0));
        check_restore(&img, &mut dev, &zero);
    }
}

#[test]
fn compression_off_stores_raw_pages_that_restore() {
    let (mut dev, mut store) = fresh(4096);
    let mem = mem_of(&[1, 0, 1, 2]);
    let touch = [Gpn(2)];
    let spec = SaveSpec {
        name: "raw",
        parent: None,
        shape: shape(4),
        state: b"",
        touch: &touch,
        max_pages: 4,
        compress: false,
    };
    let mut w = store.begin(&mut dev, &spec).unwrap();
    for (g, p) in mem.iter().enumerate() {
        match p {
            Some(p) => w.page(&mut dev, Gpn(g as u32), p).unwrap(),
            None => w.absent(Gpn(g as u32)).unwrap(),
        }
    }
    let s = w.finish(&mut dev).unwrap();
    assert_eq!((s.lz4, s.raw, s.skipped), (0, 3, 1));
    let img = store.image(&mut dev, "raw").unwrap();
    assert!(img.pages().iter().all(|r| r.kind() == PageKind::Raw));
    check_restore(&img, &mut dev, &mem);
}

#[test]
fn format_refuses_what_cannot_be_a_store() {
    let mut dev = MemDisk::new(4096);
    for n in [0, snapfile::MAX_ENTRIES + 1] {
        assert_eq!(
            Store::format(&mut dev, 1, n).err(),
            Some(Error::TooLarge),
            "{n} entries"
        );
    }
    // 16 entries: two 5-sector TOC copies and the superblock leave no data sector in 11.
    let mut small = MemDisk::new(11);
    let err = Store::format(&mut small, 1, 16).err();
    assert!(matches!(err, Some(Error::Truncated { .. })), "{err:?}");
    assert!(Store::format(&mut MemDisk::new(12), 1, 16).is_ok());
    assert!(Store::format(&mut dev, 1, snapfile::MAX_ENTRIES).is_ok());
}
