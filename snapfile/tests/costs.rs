//! The writer's costs and switching LZ4 off mid-image: a caller measures what compressing
//! buys, stops it, and the image mixes LZ4 and raw pages that all read back.

mod common;

use common::*;
use snapfile::{Gpn, MemDisk, PageKind, SaveSpec, Store, BATCH, PAGE};
use std::sync::atomic::{AtomicU64, Ordering};

/// A clock that advances one tick per reading: every timed part gets a known, non-zero time.
static TICKS: AtomicU64 = AtomicU64::new(0);

fn tick() -> u64 {
    TICKS.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn compression_switched_off_midway_mixes_kinds_and_reports_costs() {
    // Compressible and random pages in turn, enough for a full batch before the switch.
    let n = 2 * BATCH / PAGE;
    let mem: Mem = (0..2 * n)
        .map(|i| Some(page_of(1 + (i % 2) as u8, i as u64)))
        .collect();
    let mut dev = MemDisk::new(1 << 16);
    let mut store = Store::format(&mut dev, 9, 8).unwrap();
    let spec = SaveSpec {
        name: "mixed",
        parent: None,
        shape: shape(mem.len() as u32),
        state: b"s",
        touch: &[],
        max_pages: mem.len() as u32,
        compress: true,
    };
    let mut w = store.begin(&mut dev, &spec).unwrap();
    w.set_clock(tick);
    for (g, p) in mem.iter().enumerate().take(n) {
        w.page(&mut dev, Gpn(g as u32), p.as_ref().unwrap())
            .unwrap();
    }
    let c = w.costs();
    assert_eq!(c.lz4_pages, n as u64);
    assert!(c.lz4_saved > (n * PAGE / 4) as u64, "{c:?}");
    assert!(c.device_bytes >= BATCH as u64 && c.device > 0, "{c:?}");
    assert!(c.zero > 0 && c.lz4 > 0 && c.checksum > 0, "{c:?}");
    w.set_compress(false);
    for (g, p) in mem.iter().enumerate().skip(n) {
        w.page(&mut dev, Gpn(g as u32), p.as_ref().unwrap())
            .unwrap();
    }
    assert_eq!(
        w.costs().lz4_pages,
        n as u64,
        "LZ4 ran after it was switched off"
    );
    let sum = w.finish(&mut dev).unwrap();
    assert_eq!((sum.lz4, sum.raw), (n as u64 / 2, n as u64 * 3 / 2));
    let store = Store::open(&mut dev).unwrap();
    let img = store.image(&mut dev, "mixed").unwrap();
    assert_eq!(img.locate(Gpn(0)).unwrap().kind(), PageKind::Lz4);
    // A compressible page after the switch is stored raw.
    assert_eq!(img.locate(Gpn(n as u32)).unwrap().kind(), PageKind::Raw);
    check_restore(&img, &mut dev, &mem);
}
