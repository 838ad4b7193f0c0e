//! Damage behind valid checksums: edits a region, then recomputes every checksum over it,
//! so the structural checks behind the checksums are what must refuse it.

use snapfile::{MemDisk, SECTOR};
use xxhash_rust::xxh3::xxh3_64;

/// Re-seals a region whose checksum is the XXH3 of the region with the field zeroed.
pub fn seal(b: &mut [u8], at: usize) {
    b[at..at + 8].fill(0);
    let s = xxh3_64(b);
    b[at..at + 8].copy_from_slice(&s.to_le_bytes());
}

pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Edits LBA 0 with `f`, then re-seals it.
pub fn reforge_superblock(dev: &mut MemDisk, f: impl FnOnce(&mut [u8])) {
    let sb = &mut dev.bytes_mut()[..SECTOR];
    f(sb);
    seal(sb, SECTOR - 8);
}

/// The byte offsets of the two TOC copies and the bytes each checksum covers, for a store
/// formatted with `max_entries` holding `count` snapshots.
pub fn toc_geometry(max_entries: u32, count: usize) -> ([usize; 2], usize) {
    let sectors = (64 + max_entries as usize * 128).div_ceil(SECTOR);
    ([SECTOR, (1 + sectors) * SECTOR], 64 + count * 128)
}

/// Edits image `which` (TOC position): `index` gets its index bytes, `header` its header
/// sector (after the index checksum is updated), `entry` its TOC entry in both copies; then
/// the header seal, the entry's header checksum and both TOC seals are recomputed.
pub fn reforge_image(
    dev: &mut MemDisk,
    (max_entries, count): (u32, usize),
    which: usize,
    index: impl FnOnce(&mut [u8]),
    header: impl FnOnce(&mut [u8]),
    entry: impl Fn(&mut [u8]),
) {
    let (copies, toc_len) = toc_geometry(max_entries, count);
    let bytes = dev.bytes_mut();
    let start = u64_at(bytes, copies[0] + 64 + which * 128 + 88) as usize * SECTOR;
    let index_at = start + u64_at(bytes, start + 168) as usize;
    let index_len = u64_at(bytes, start + 176) as usize;
    index(&mut bytes[index_at..index_at + index_len]);
    let sum = xxh3_64(&bytes[index_at..index_at + index_len]);
    put_u64(bytes, start + 184, sum);
    header(&mut bytes[start..start + SECTOR]);
    seal(&mut bytes[start..start + SECTOR], SECTOR - 8);
    let header_sum = u64_at(bytes, start + SECTOR - 8);
    for c in copies {
        let e = c + 64 + which * 128;
        put_u64(bytes, e + 104, header_sum);
        entry(&mut bytes[e..e + 128]);
        seal(&mut bytes[c..c + toc_len], 56);
    }
}
