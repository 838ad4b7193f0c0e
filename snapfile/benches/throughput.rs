//! Save and restore throughput on an in-memory device, next to a raw write of the same
//! bytes (so the numbers are the format's CPU cost: checksums, LZ4, copies).
//! `cargo bench -p snapfile --bench throughput` (`SNAPFILE_BENCH_MIB`, default 64).

use std::time::Instant;

use mmtypes::Ipa;
use snapfile::{Gpn, MemDisk, SaveSpec, Shape, Store, BATCH, PAGE, SECTOR};

fn page(kind: u32, seed: u64) -> [u8; PAGE] {
    let mut p = [0u8; PAGE];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for (i, b) in p.iter_mut().enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = match kind {
            0 => 0,
            // Text-like: a small alphabet with runs, as kernel and page-cache pages often are.
            1 => b"the quick brown fox "[(i / 3 + (x as usize & 1)) % 20],
            _ => x as u8,
        };
    }
    p
}

/// A guest of `pages` pages; `mix(i)` picks each page's kind.
fn guest(pages: usize, mix: impl Fn(usize) -> u32) -> Vec<[u8; PAGE]> {
    (0..pages).map(|i| page(mix(i), i as u64)).collect()
}

fn mib_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / (1 << 20) as f64
}

/// A device whose memory is already faulted in, so neither the save nor the raw write
/// pays the host's first-touch page faults inside the timing.
fn faulted(sectors: usize) -> MemDisk {
    let mut dev = MemDisk::new(sectors as u64);
    dev.bytes_mut().fill(0xa5);
    dev
}

/// Seconds to write `bytes` in `BATCH` requests to a fresh device: the best of three, as
/// the machine is shared.
fn raw_write(bytes: usize) -> f64 {
    let once = || {
        let mut dev = faulted(bytes / SECTOR + 1);
        let chunk = vec![0x5au8; BATCH];
        let t = Instant::now();
        for i in 0..bytes.div_ceil(BATCH) {
            let lba = (i * BATCH / SECTOR) as u64;
            let n = BATCH.min(bytes - i * BATCH) / SECTOR * SECTOR;
            snapfile::BlockDevice::write(&mut dev, lba, &chunk[..n]).unwrap();
        }
        t.elapsed().as_secs_f64()
    };
    (0..3).map(|_| once()).fold(f64::MAX, f64::min)
}

fn run(label: &str, mem: &[[u8; PAGE]], compress: bool) {
    let bytes = mem.len() * PAGE;
    let mut dev = faulted(bytes / SECTOR * 2 + 4096);
    let mut store = Store::format(&mut dev, 1, 16).unwrap();
    let shape = Shape {
        ram_base: Ipa::new(0x4000_0000),
        ram_pages: mem.len() as u32,
        vcpus: 1,
    };
    let touch: Vec<Gpn> = (0..mem.len() as u32).map(Gpn).collect();
    let spec = SaveSpec {
        name: "b",
        parent: None,
        shape,
        state: &[0; 4096],
        touch: &touch,
        max_pages: mem.len() as u32,
        compress,
    };
    let t = Instant::now();
    let mut w = store.begin(&mut dev, &spec).unwrap();
    for (i, p) in mem.iter().enumerate() {
        w.page(&mut dev, Gpn(i as u32), p).unwrap();
    }
    let s = w.finish(&mut dev).unwrap();
    let save = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let img = store.image(&mut dev, "b").unwrap();
    let open = t.elapsed().as_secs_f64();
    let mut out = [0u8; PAGE];
    let t = Instant::now();
    for g in touch.iter() {
        if let Some(r) = img.locate(*g) {
            img.read_page(&mut dev, &r, &mut out).unwrap();
        }
    }
    let load = t.elapsed().as_secs_f64();
    let image = s.sectors as usize * SECTOR;
    let raw = raw_write(image);
    println!("{label}:");
    println!(
        "  save {:.0} MiB/s of guest RAM, {:.0} MiB/s of image; raw write of as many bytes {:.0} MiB/s (save/raw {:.2})",
        mib_s(bytes, save),
        mib_s(image, save),
        mib_s(image, raw),
        raw / save,
    );
    println!(
        "  image {:.1}% of RAM ({} lz4, {} raw, {} zero skipped); open {:.2} ms; restore every page {:.0} MiB/s",
        100.0 * image as f64 / bytes as f64,
        s.lz4,
        s.raw,
        s.skipped,
        open * 1000.0,
        mib_s(bytes, load),
    );
}

fn main() {
    let mib: usize = std::env::var("SNAPFILE_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let pages = mib << 8;
    let x = page(2, 1);
    let t = Instant::now();
    let mut acc = 0u64;
    for i in 0..100_000u64 {
        acc = acc.wrapping_add(snapfile::page_checksum(&x) ^ i);
    }
    println!(
        "xxh3 of a 4 KiB page: {:.0} ns ({acc:x})",
        t.elapsed().as_secs_f64() * 1e9 / 100_000.0
    );
    println!("guest: {mib} MiB");
    run("random (incompressible)", &guest(pages, |_| 2), true);
    let text = guest(pages, |_| 1);
    run("text-like (compressible)", &text, true);
    run("text-like, compression off", &text, false);
    run(
        "50% zero/30% text/20% rnd",
        &guest(pages, |i| match i % 10 {
            0..=4 => 0,
            5..=7 => 1,
            _ => 2,
        }),
        true,
    );
}
