//! The store on the hypervisor's disk: `dev::blk::Disk` as snapfile's
//! `BlockDevice`, and the store opened for each command (formatted first if
//! the disk holds none).
//!
//! The store (its superblock and TOC) is read from the disk by the first
//! command that needs it, and kept in memory after each command that
//! succeeds: a save does not wait for three synchronous reads before it
//! pauses the VM. The cache is dropped whenever anything has written the
//! superblock's or TOC's sectors since (the disk counts the writes that start
//! below the store's first image sector: a `disk fill` or `bench disk` over
//! them), and after a command that failed, so a TOC damaged from the console
//! is found by the next command, as before. Image sectors are not cached:
//! every load reads its image's header and index. Commands run one at a
//! time (the console's CPU 0); faults and the prefetcher only read page data
//! of committed images, which nothing overwrites while they are in the TOC.

use super::PersistError;
use crate::dev::blk::{self, Disk, DiskError, InPlace};
use alloc::boxed::Box;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicU64, Ordering};
use snapfile::{BlockDevice, DevError, Error, Held, Section, Store};
use spin::Mutex;

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

    fn write_held(&mut self, lba: u64, data: Box<dyn Held>) -> Result<(), DevError> {
        self.0.write_held(lba, Box::new(data)).map_err(dev_error)
    }

    fn wait(&mut self) -> Result<(), DevError> {
        self.0.wait().map_err(dev_error)
    }
}

/// A save's bytes written in place (its pinned frames) are the driver's
/// in-place payload: the same contract, kept until the write completes.
impl InPlace for Box<dyn Held> {
    fn bytes(&self) -> &[u8] {
        Held::bytes(&**self)
    }
}

/// The disk, or why there is none to use.
pub fn dev() -> Result<Dev, PersistError> {
    blk::get().map(Dev).ok_or(PersistError::NoDisk)
}

/// Stores formatted by this boot (the next format's `store_id` differs).
static FORMATS: AtomicU64 = AtomicU64::new(0);

/// The store as the last successful command left it, and the disk's write
/// count then. Lock level: a leaf, held only to take or put the store.
static CACHED: Mutex<Option<(Store, u64)>> = Mutex::new(None);

/// The store, opened for one command. [`Opened::keep`] hands it to the next
/// command once this one has succeeded; dropped without it, the next reads
/// the disk again.
pub struct Opened(Store);

impl Opened {
    /// The command succeeded: the store in memory is what the disk holds.
    pub fn keep(self, dev: &Dev) {
        dev.0.watch_below(self.0.metadata_end());
        *CACHED.lock() = Some((self.0, dev.0.writes()));
    }
}

impl Deref for Opened {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.0
    }
}

impl DerefMut for Opened {
    fn deref_mut(&mut self) -> &mut Store {
        &mut self.0
    }
}

/// Opens the store: the one the last command kept, if nothing has written
/// the disk since, else read from the disk. A disk whose first sector is not
/// a superblock (a new disk file) is formatted first if `format` (saves) and
/// writable; a superblock of another version is refused
/// (`UnsupportedVersion`), never formatted over.
pub fn open(format: bool) -> Result<(Opened, Dev), PersistError> {
    let mut d = dev()?;
    let cached = CACHED.lock().take();
    if let Some((s, seen)) = cached {
        if seen == d.0.writes() {
            return Ok((Opened(s), d));
        }
    }
    match Store::open(&mut d) {
        Ok(s) => Ok((Opened(s), d)),
        Err(Error::BadMagic(Section::Superblock)) if format && !d.0.readonly() => {
            // The boot counter and the formats of this boot: a stale TOC copy
            // of an earlier store on the same disk never matches.
            let id = crate::arch::timer::now() ^ (FORMATS.fetch_add(1, Ordering::Relaxed) << 48);
            crate::println!(
                "[hyp] the disk holds no snapshot store: formatting it ({} MiB, room for {MAX_SNAPSHOTS} snapshots)",
                d.sectors() >> 11
            );
            let s = Store::format(&mut d, id, MAX_SNAPSHOTS)?;
            Ok((Opened(s), d))
        }
        Err(e) => Err(e.into()),
    }
}
