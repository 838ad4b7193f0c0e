//! The per-page checksum (format version 2): XXH64, seed 0, of the page's 4 KiB, with
//! aligned word loads and, when a page is stored raw, fused with its one copy into the
//! writer's buffer (each word is loaded once, stored, and hashed in registers).
//!
//! Why: a save checksums and copies every stored page. Under QEMU's TCG every guest memory
//! access is a software TLB lookup, so passes over a page cost more than the arithmetic:
//! scalar XXH3 (a secret word loaded per data word) took as long as writing the page, and
//! the CRC32 instructions are helper calls there (24 µs a page for CRC-32C and CRC-32).
//! XXH64 needs one load per word and two multiplies, and rides on the copy's load. hyp's
//! target is `strict-align`, so words assembled from byte slices would be byte loads: the
//! fast paths need 8-byte aligned pages (a guest frame; a raw page in the buffer, which the
//! writer aligns) and fall back to `xxhash-rust`'s XXH64 otherwise, which the tests hold
//! this code to.

use alloc::vec::Vec;
use core::mem::MaybeUninit;

use crate::PAGE;

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;

/// Words in a page.
const WORDS: usize = PAGE / 8;

fn round(acc: u64, w: u64) -> u64 {
    acc.wrapping_add(w.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

/// XXH64's lanes at seed 0.
fn lanes() -> [u64; 4] {
    [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)]
}

/// XXH64's end for a 4096-byte input (a multiple of 32: no tail bytes).
fn digest(v: [u64; 4]) -> u64 {
    let mut h = v[0]
        .rotate_left(1)
        .wrapping_add(v[1].rotate_left(7))
        .wrapping_add(v[2].rotate_left(12))
        .wrapping_add(v[3].rotate_left(18));
    for lane in v {
        h = (h ^ round(0, lane)).wrapping_mul(P1).wrapping_add(P4);
    }
    h = h.wrapping_add(PAGE as u64);
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

/// The page as aligned words, if it is 8-byte aligned.
pub(crate) fn words(page: &[u8; PAGE]) -> Option<&[u64]> {
    // SAFETY: every bit pattern is a valid u64, and `align_to` hands out only aligned,
    // in-bounds words of the borrowed page.
    let (head, words, _) = unsafe { page.align_to::<u64>() };
    (head.is_empty() && words.len() == WORDS).then_some(words)
}

/// The checksum of a page.
pub fn page_sum(page: &[u8; PAGE]) -> u64 {
    let Some(words) = words(page) else {
        return xxhash_rust::xxh64::xxh64(page, 0);
    };
    let mut v = lanes();
    for s in words.as_chunks::<4>().0 {
        for (lane, &w) in v.iter_mut().zip(s) {
            *lane = round(*lane, u64::from_le(w));
        }
    }
    digest(v)
}

/// Appends `page` to `buf` and returns its checksum, reading each word of it once when
/// both the page and the end of `buf` are 8-byte aligned.
pub fn extend_summed(buf: &mut Vec<u8>, page: &[u8; PAGE]) -> u64 {
    buf.reserve(PAGE);
    let at = buf.len();
    let spare = &mut buf.spare_capacity_mut()[..PAGE];
    // SAFETY: `MaybeUninit<u64>` may hold any bytes (initialised or not), and `align_to_mut`
    // hands out only aligned, in-bounds words of the borrowed spare capacity.
    let (head, dst, _) = unsafe { spare.align_to_mut::<MaybeUninit<u64>>() };
    let (Some(src), true) = (words(page), head.is_empty() && dst.len() == WORDS) else {
        buf.extend_from_slice(page);
        return page_sum(page);
    };
    let mut v = lanes();
    for (s, d) in src
        .as_chunks::<4>()
        .0
        .iter()
        .zip(dst.as_chunks_mut::<4>().0)
    {
        for ((lane, &w), out) in v.iter_mut().zip(s).zip(d) {
            out.write(w);
            *lane = round(*lane, u64::from_le(w));
        }
    }
    // SAFETY: the loop wrote all `WORDS` words, i.e. the `PAGE` bytes after `at`, which
    // `reserve` made room for.
    unsafe { buf.set_len(at + PAGE) };
    digest(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn page(seed: u64) -> alloc::boxed::Box<[u8; PAGE]> {
        let mut p = alloc::boxed::Box::new([0u8; PAGE]);
        let mut x = seed | 1;
        for b in p.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        p
    }

    /// The word code is XXH64 (the reference crate's), aligned or not, fused or not, and
    /// the copy is exact wherever the buffer ends.
    #[test]
    fn fused_and_aligned_paths_are_xxh64() {
        for seed in 0..8 {
            let p = page(seed);
            let want = xxhash_rust::xxh64::xxh64(&p[..], 0);
            assert_eq!(page_sum(&p), want);
            // A misaligned copy of the page takes the fallback.
            let mut shifted = vec![0u8; PAGE + 1];
            shifted[1..].copy_from_slice(&p[..]);
            let mis: &[u8; PAGE] = shifted[1..].try_into().unwrap();
            assert_eq!(page_sum(mis), want);
            for lead in [0usize, 3, 8, 4095] {
                let mut buf = Vec::with_capacity(lead + PAGE);
                buf.resize(lead, 0xa5);
                assert_eq!(extend_summed(&mut buf, &p), want, "lead {lead}");
                assert_eq!(buf.len(), lead + PAGE);
                assert!(buf[..lead].iter().all(|&b| b == 0xa5));
                assert_eq!(&buf[lead..], &p[..], "lead {lead}");
            }
        }
    }
}
