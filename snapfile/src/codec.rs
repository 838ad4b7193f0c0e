//! Little-endian field access, checksums and sector arithmetic. Every read of a field is
//! bounds-checked by construction (fixed offsets into fixed-size buffers) or returns an error.

use alloc::vec;
use alloc::vec::Vec;

use crate::dev::{BlockDevice, SECTOR};
use crate::error::Error;

/// The checksum of the format: XXH3, 64 bits.
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Whether a page is all zero bytes. Word-wise: the hypervisor's target has no SIMD, and
/// a byte-wise fold costs a load and an OR per byte (a save checks every present page).
/// Each 64-byte chunk is folded without branches, so the check stops early at the first
/// non-zero chunk.
pub fn is_zero_page(page: &[u8; crate::PAGE]) -> bool {
    // Aligned word loads where the page is 8-byte aligned (a guest frame, the
    // save's case): hyp's target is strict-align, so words assembled from the
    // byte slice were eight byte loads each (a third of an idle save's
    // staging time under TCG).
    if let Some(words) = crate::pagesum::words(page) {
        return words
            .chunks_exact(8)
            .all(|c| c.iter().fold(0, |acc, &w| acc | w) == 0);
    }
    page.chunks_exact(64).all(|chunk| {
        chunk.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes(w.try_into().unwrap_or([1; 8]))
        }) == 0
    })
}

/// Sectors needed for `bytes` bytes.
pub fn sectors_for(bytes: u64) -> u64 {
    bytes.div_ceil(SECTOR as u64)
}

/// Reads a little-endian integer of `N` bytes at `at` (`buf` must hold it: callers use
/// offsets inside fixed-size records).
fn le<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
    let mut a = [0; N];
    a.copy_from_slice(&buf[at..at + N]);
    a
}

pub fn get_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(le(buf, at))
}

pub fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(le(buf, at))
}

pub fn get_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(le(buf, at))
}

pub fn put_u16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

pub fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Stores in `buf[at..at + 8]` the checksum of `buf` with that field zero.
pub fn seal(buf: &mut [u8], at: usize) {
    put_u64(buf, at, 0);
    let sum = checksum(buf);
    put_u64(buf, at, sum);
}

/// Whether `buf[at..at + 8]` holds the checksum of `buf` with that field zero.
pub fn verify(buf: &[u8], at: usize) -> bool {
    let stored = get_u64(buf, at);
    let mut copy = [0u8; SECTOR];
    if buf.len() <= SECTOR {
        let c = &mut copy[..buf.len()];
        c.copy_from_slice(buf);
        put_u64(c, at, 0);
        return checksum(c) == stored;
    }
    let mut v = buf.to_vec();
    put_u64(&mut v, at, 0);
    checksum(&v) == stored
}

/// The largest single device request the crate makes when reading a section.
const CHUNK: usize = crate::BATCH;

/// Reads `len` bytes at device byte `off` (any alignment). The caller has checked the
/// range lies inside a validated extent, so `len` is bounded by the device size.
pub fn read_bytes<D: BlockDevice>(dev: &mut D, off: u64, len: usize) -> Result<Vec<u8>, Error> {
    let first = off / SECTOR as u64;
    let skip = (off % SECTOR as u64) as usize;
    let total = sectors_for((skip + len) as u64) as usize * SECTOR;
    let mut buf = vec![0u8; total];
    for (i, chunk) in buf.chunks_mut(CHUNK).enumerate() {
        dev.read(first + (i * CHUNK / SECTOR) as u64, chunk)?;
    }
    buf.drain(..skip);
    buf.truncate(len);
    Ok(buf)
}

/// Reads one sector.
pub fn read_sector<D: BlockDevice>(dev: &mut D, lba: u64) -> Result<[u8; SECTOR], Error> {
    let mut s = [0u8; SECTOR];
    dev.read(lba, &mut s)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::is_zero_page;
    use crate::PAGE;

    /// A page 8-byte aligned (the word path) and one byte past (the byte path).
    #[repr(C, align(8))]
    struct Buf([u8; PAGE + 8]);

    /// One non-zero byte anywhere (every offset, every bit) makes a page non-zero, on both
    /// the aligned word path and the unaligned byte path.
    #[test]
    fn zero_check_sees_every_byte() {
        let mut buf = Buf([0; PAGE + 8]);
        for skew in [0, 1] {
            let view = |b: &Buf| is_zero_page((&b.0[skew..skew + PAGE]).try_into().unwrap());
            assert!(view(&buf), "skew {skew}");
            for at in 0..PAGE {
                for bit in 0..8 {
                    buf.0[skew + at] = 1 << bit;
                    assert!(!view(&buf), "skew {skew} byte {at} bit {bit}");
                }
                buf.0[skew + at] = 0;
            }
            assert!(view(&buf), "skew {skew}");
        }
    }

    /// The two paths are the ones taken: the aligned view has words, the skewed one none.
    #[test]
    fn zero_check_paths() {
        let buf = Buf([0; PAGE + 8]);
        let at = |skew: usize| -> &[u8; PAGE] { (&buf.0[skew..skew + PAGE]).try_into().unwrap() };
        assert!(crate::pagesum::words(at(0)).is_some());
        assert!(crate::pagesum::words(at(1)).is_none());
    }
}
