//! Shared by the integration tests: guest memories, saving them, checking restores.
#![allow(dead_code)]

pub mod forge;

use mmtypes::Ipa;
use snapfile::{BlockDevice, Error, Gpn, Image, SaveSpec, Shape, Store, Summary, PAGE};

/// A guest memory: `None` is a page never touched (reads as zero).
pub type Mem = Vec<Option<Box<[u8; PAGE]>>>;

pub fn shape(pages: u32) -> Shape {
    Shape {
        ram_base: Ipa::new(0x4000_0000),
        ram_pages: pages,
        vcpus: 2,
    }
}

/// Contents of kind `k` from `seed`: 0 zero, 1 compressible text-like, 2 random.
pub fn page_of(k: u8, seed: u64) -> Box<[u8; PAGE]> {
    let mut p = Box::new([0u8; PAGE]);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    match k {
        0 => {}
        1 => {
            for (i, b) in p.iter_mut().enumerate() {
                *b = b"snapshot page "[(i + seed as usize) % 14] ^ ((i / 512) as u8);
            }
        }
        _ => {
            for b in p.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
    }
    p
}

pub fn zero_page() -> [u8; PAGE] {
    [0; PAGE]
}

pub fn read(mem: &Mem, g: usize) -> [u8; PAGE] {
    mem[g].as_deref().copied().unwrap_or_else(zero_page)
}

/// Saves `pages` of `mem` (all pages for a full image; for a diff the dirty ones).
pub fn save<D: BlockDevice>(
    store: &mut Store,
    dev: &mut D,
    name: &str,
    parent: Option<&str>,
    mem: &Mem,
    pages: &[usize],
    state: &[u8],
) -> Result<Summary, Error> {
    let touch: Vec<Gpn> = pages.iter().rev().map(|&g| Gpn(g as u32)).collect();
    let spec = SaveSpec {
        name,
        parent,
        shape: shape(mem.len() as u32),
        state,
        touch: &touch,
        max_pages: pages.len() as u32,
        compress: true,
    };
    let mut w = store.begin(dev, &spec)?;
    for &g in pages {
        match &mem[g] {
            Some(p) => w.page(dev, Gpn(g as u32), p)?,
            None => w.absent(Gpn(g as u32))?,
        }
    }
    w.finish(dev)
}

/// Every page of `img` reads back as `mem` (zero where it has no page), verified.
pub fn check_restore<D: BlockDevice>(img: &Image, dev: &mut D, mem: &Mem) {
    assert_eq!(img.shape().ram_pages as usize, mem.len());
    let mut out = [0u8; PAGE];
    for g in 0..mem.len() {
        let want = read(mem, g);
        match img.locate(Gpn(g as u32)) {
            None => assert!(
                want.iter().all(|b| *b == 0),
                "page {g} missing from the image"
            ),
            Some(r) => {
                img.read_page(dev, &r, &mut out).unwrap();
                assert!(out == want, "page {g} differs");
                assert!(want.iter().any(|b| *b != 0), "zero page {g} stored");
            }
        }
    }
}
