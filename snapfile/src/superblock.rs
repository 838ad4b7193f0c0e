//! The superblock: LBA 0, written once by `format` and never again, so no later crash can
//! tear it. It fixes the geometry: where the two TOC copies are and where data starts.

use crate::codec::{get_u32, get_u64, put_u32, put_u64, seal, verify};
use crate::dev::SECTOR;
use crate::error::{Error, Section};
use crate::toc::{ENTRY_LEN, TOC_HEADER_LEN};
use crate::VERSION;

/// "MHVSNAPS".
pub const SB_MAGIC: [u8; 8] = *b"MHVSNAPS";
const CHECKSUM_AT: usize = SECTOR - 8;

/// The store's geometry, as recorded at LBA 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// The device size at format time; a smaller device is a truncated store.
    pub device_sectors: u64,
    /// Tells this store's TOC copies from a previous format's.
    pub store_id: u64,
    /// Sectors of each TOC copy.
    pub toc_sectors: u64,
    /// Entries each TOC copy can hold.
    pub max_entries: u32,
}

impl Superblock {
    /// A superblock for a device of `device_sectors` with room for `max_entries` snapshots.
    pub fn new(device_sectors: u64, store_id: u64, max_entries: u32) -> Self {
        let bytes = TOC_HEADER_LEN as u64 + u64::from(max_entries) * ENTRY_LEN as u64;
        Self {
            device_sectors,
            store_id,
            toc_sectors: bytes.div_ceil(SECTOR as u64),
            max_entries,
        }
    }

    /// The first sector of TOC copy `slot` (0 or 1).
    pub fn toc_lba(&self, slot: usize) -> u64 {
        1 + slot as u64 * self.toc_sectors
    }

    /// The first sector images may use.
    pub fn data_start(&self) -> u64 {
        1 + 2 * self.toc_sectors
    }

    /// The sector as written to LBA 0.
    pub fn encode(&self) -> [u8; SECTOR] {
        let mut s = [0u8; SECTOR];
        s[..8].copy_from_slice(&SB_MAGIC);
        put_u32(&mut s, 8, VERSION);
        put_u32(&mut s, 12, SECTOR as u32);
        put_u64(&mut s, 16, self.device_sectors);
        put_u64(&mut s, 24, self.store_id);
        put_u64(&mut s, 32, self.toc_sectors);
        put_u32(&mut s, 40, self.max_entries);
        put_u64(&mut s, 48, self.data_start());
        seal(&mut s, CHECKSUM_AT);
        s
    }

    /// Checks magic, then version (so a future format is named as such, not as corrupt),
    /// then the checksum, then that the geometry is self-consistent.
    pub fn decode(s: &[u8; SECTOR]) -> Result<Self, Error> {
        if s[..8] != SB_MAGIC {
            return Err(Error::BadMagic(Section::Superblock));
        }
        let version = get_u32(s, 8);
        if version != VERSION {
            return Err(Error::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        if !verify(s, CHECKSUM_AT) {
            return Err(Error::Checksum(Section::Superblock));
        }
        let sb = Self {
            device_sectors: get_u64(s, 16),
            store_id: get_u64(s, 24),
            toc_sectors: get_u64(s, 32),
            max_entries: get_u32(s, 40),
        };
        let expect = Self::new(sb.device_sectors, sb.store_id, sb.max_entries);
        let consistent = get_u32(s, 12) == SECTOR as u32
            && sb.max_entries <= crate::MAX_ENTRIES
            && sb.toc_sectors == expect.toc_sectors
            && get_u64(s, 48) == sb.data_start()
            && sb.data_start() <= sb.device_sectors
            // Byte offsets on the device then fit a u64.
            && sb.device_sectors <= u64::MAX / SECTOR as u64;
        if !consistent {
            return Err(Error::Corrupt(Section::Superblock));
        }
        Ok(sb)
    }
}
