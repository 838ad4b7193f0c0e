//! The store on the hypervisor's disk: `dev::blk::Disk` as snapfile's
//! `BlockDevice`, and the store opened for each command (formatted first if
//! the disk holds none).
//!
//! The store is opened afresh by every save and load (its superblock and two
//! table-of-contents copies: a few sectors): nothing is cached that a `disk
//! fill` could make stale, and a TOC damaged since the last command is
//! found by the next. Commands run one at a time (the console's CPU 0);
//! faults and the prefetcher only read page data of committed images,
//! which nothing overwrites while they are in the TOC.

use super::PersistError;
use crate::dev::blk::{self, Disk, DiskError};
use core::sync::atomic::{AtomicU64, Ordering};
use snapfile::{BlockDevice, DevError, Error, Section, Store};

/// Snapshots a store formatted here has room for.
pub const MAX_SNAPSHOTS: u32 = 256;

/// The hypervisor's disk as a snapfile device.
#[derive(Clone, Copy)]
pub struct Dev(pub &'static Disk);

fn dev_error(e: DiskError) -> DevError {
    match e {
        DiskError::NotSectors { .. } => DevError::BadLength,
        DiskError::PastEnd { .. } => DevError::OutOfRange,
        DiskError::ReadOnly => DevError::ReadOnly,
        // The device or its queue failed.
        DiskError::Device(_) => DevError::Io(2),
    }
}

impl BlockDevice for Dev {
    fn sectors(&self) -> u64 {
        self.0.capacity_sectors()
    }

    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.0.read(lba, buf).map_err(dev_error)
    }

    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError> {
        self.0.write(lba, buf).map_err(dev_error)
    }

    fn flush(&mut self) -> Result<(), DevError> {
        self.0.flush().map_err(dev_error)
    }

    fn write_queued(
        &mut self,
        lba: u64,
        buf: alloc::vec::Vec<u8>,
    ) -> Result<Option<alloc::vec::Vec<u8>>, DevError> {
        self.0.write_queued(lba, buf).map_err(dev_error)
    }

    fn wait(&mut self) -> Result<(), DevError> {
        self.0.wait().map_err(dev_error)
    }
}

/// The disk, or why there is none to use.
pub fn dev() -> Result<Dev, PersistError> {
    blk::get().map(Dev).ok_or(PersistError::NoDisk)
}

/// Stores formatted by this boot (the next format's `store_id` differs).
static FORMATS: AtomicU64 = AtomicU64::new(0);

/// Opens the store. A disk whose first sector is not a superblock (a new
/// disk file) is formatted first if `format` (saves) and writable; a
/// superblock of another version is refused (`UnsupportedVersion`), never
/// formatted over.
pub fn open(format: bool) -> Result<(Store, Dev), PersistError> {
    let mut d = dev()?;
    match Store::open(&mut d) {
        Ok(s) => Ok((s, d)),
        Err(Error::BadMagic(Section::Superblock)) if format && !d.0.readonly() => {
            // The boot counter and the formats of this boot: a stale TOC copy
            // of an earlier store on the same disk never matches.
            let id = crate::arch::timer::now() ^ (FORMATS.fetch_add(1, Ordering::Relaxed) << 48);
            crate::println!(
                "[hyp] the disk holds no snapshot store: formatting it ({} MiB, room for {MAX_SNAPSHOTS} snapshots)",
                d.sectors() >> 11
            );
            let s = Store::format(&mut d, id, MAX_SNAPSHOTS)?;
            Ok((s, d))
        }
        Err(e) => Err(e.into()),
    }
}
