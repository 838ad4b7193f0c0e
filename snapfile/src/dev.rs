//! The block device the store lives on, and an in-memory one for tests and self-tests.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;

use crate::error::DevError;

/// Bytes per sector: the unit of every device request.
pub const SECTOR: usize = 512;

/// Page data a device may read where it lies after [`BlockDevice::write_held`] returns (hyp:
/// a run of guest frames, pinned for the write), kept alive until the write is complete:
/// dropping it is what lets the memory go (hyp: the frames' pins).
pub trait Held: Send {
    /// The bytes to write: whole sectors, at the same address for as long as this lives,
    /// and unchanged meanwhile.
    fn bytes(&self) -> &[u8];
}

/// A block device of 512-byte sectors. hyp implements it over its virtio-blk driver.
///
/// Every buffer is a whole number of sectors. A write is durable only after a `flush` that
/// follows it returns; a crash may leave any subset of the sectors of unflushed writes
/// written (the format assumes nothing more, see docs/SNAPSHOT-FORMAT.md).
pub trait BlockDevice {
    /// The device's size in sectors.
    fn sectors(&self) -> u64;
    /// Reads `buf.len() / 512` sectors starting at `lba`.
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError>;
    /// Writes `buf.len() / 512` sectors starting at `lba`.
    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<(), DevError>;
    /// Writes `buf` (whole sectors, at most [`crate::BATCH`] bytes) at `lba`, possibly
    /// returning before the write is done: a device with a request queue keeps a few in
    /// flight while the writer fills the next buffer. Returns the buffer of a write that has
    /// completed, for the caller to reuse. A queued write is complete, and its error
    /// reported, by [`BlockDevice::wait`]; until then the writer neither reads nor flushes
    /// what it wrote (hyp's driver also completes queued writes before any other request).
    /// The default writes at once.
    fn write_queued(&mut self, lba: u64, buf: Vec<u8>) -> Result<Option<Vec<u8>>, DevError> {
        self.write(lba, &buf)?;
        Ok(Some(buf))
    }
    /// [`BlockDevice::write_queued`] of bytes the device reads where they lie, with no copy
    /// (whole sectors, at most [`crate::BATCH`] bytes): `data` is dropped once the write is
    /// complete (by this call, a later queued one or [`BlockDevice::wait`]), never before.
    /// The default writes at once.
    fn write_held(&mut self, lba: u64, data: Box<dyn Held>) -> Result<(), DevError> {
        self.write(lba, data.bytes())
    }
    /// Waits for every queued write; the first error of any of them.
    fn wait(&mut self) -> Result<(), DevError> {
        Ok(())
    }
}

/// A device in a `Vec<u8>`, with fault injection: a crash after a number of written sectors
/// (later sectors are dropped and their writes fail), the loss of writes no flush has made
/// durable ([`MemDisk::lose_unflushed`]), and counters of requests.
#[derive(Clone, Debug)]
pub struct MemDisk {
    bytes: Vec<u8>,
    /// Sectors written since the last flush, with what they held before (their durable
    /// contents, which a power loss may bring back).
    unflushed: BTreeMap<u64, Vec<u8>>,
    /// Sectors that may still be written before the simulated crash (`None`: no crash).
    crash_budget: Option<u64>,
    /// Set when a write found the budget spent: the simulated machine is down.
    crashed: bool,
    /// Read requests served.
    pub reads: u64,
    /// The longest read request served, in bytes.
    pub largest_read: usize,
    /// Write requests served (counted whether or not a crash dropped them).
    pub writes: u64,
    /// Sectors written.
    pub sectors_written: u64,
    /// Flushes served.
    pub flushes: u64,
}

impl MemDisk {
    /// A zeroed device of `sectors` sectors.
    pub fn new(sectors: u64) -> Self {
        Self::from_bytes(vec![0; sectors as usize * SECTOR])
    }

    /// A device holding `bytes` (rounded down to whole sectors).
    pub fn from_bytes(mut bytes: Vec<u8>) -> Self {
        bytes.truncate(bytes.len() / SECTOR * SECTOR);
        Self {
            bytes,
            unflushed: BTreeMap::new(),
            crash_budget: None,
            crashed: false,
            reads: 0,
            largest_read: 0,
            writes: 0,
            sectors_written: 0,
            flushes: 0,
        }
    }

    /// The device's contents.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The device's contents, to corrupt in tests.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// Simulates a crash after `sectors` more sectors are written: a write that crosses the
    /// point lands its first sectors only (a torn write), and it and every later write and
    /// flush fail.
    pub fn crash_after(&mut self, sectors: u64) {
        self.crash_budget = Some(sectors);
    }

    /// What a power loss does to writes no flush has made durable: each such sector for
    /// which `keep(lba)` is false gets back what it held at the last flush (a volatile
    /// write cache lost; any subset, so torn multi-sector writes too). Then every write is
    /// durable, as after a reboot.
    pub fn lose_unflushed(&mut self, keep: impl Fn(u64) -> bool) {
        for (lba, old) in core::mem::take(&mut self.unflushed) {
            if !keep(lba) {
                let at = lba as usize * SECTOR;
                self.bytes[at..at + SECTOR].copy_from_slice(&old);
            }
        }
    }

    /// Drops the last sectors (a truncated image file).
    pub fn truncate(&mut self, sectors: u64) {
        self.bytes.truncate(sectors as usize * SECTOR);
    }

    fn range(&self, lba: u64, len: usize) -> Result<core::ops::Range<usize>, DevError> {
        if !len.is_multiple_of(SECTOR) {
            return Err(DevError::BadLength);
        }
        let start = usize::try_from(lba)
            .ok()
            .and_then(|l| l.checked_mul(SECTOR))
            .ok_or(DevError::OutOfRange)?;
        let end = start.checked_add(len).ok_or(DevError::OutOfRange)?;
        if end > self.bytes.len() {
            return Err(DevError::OutOfRange);
        }
        Ok(start..end)
    }
}

impl BlockDevice for MemDisk {
    fn sectors(&self) -> u64 {
        (self.bytes.len() / SECTOR) as u64
    }

    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        let r = self.range(lba, buf.len())?;
        self.reads += 1;
        self.largest_read = self.largest_read.max(buf.len());
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }

    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError> {
        let r = self.range(lba, buf.len())?;
        self.writes += 1;
        let n = (buf.len() / SECTOR) as u64;
        let landed = match self.crash_budget {
            None => n,
            Some(budget) => n.min(budget),
        };
        let bytes = landed as usize * SECTOR;
        for i in 0..landed {
            let at = r.start + i as usize * SECTOR;
            let before = &self.bytes[at..at + SECTOR];
            self.unflushed
                .entry(lba + i)
                .or_insert_with(|| before.to_vec());
        }
        self.bytes[r.start..r.start + bytes].copy_from_slice(&buf[..bytes]);
        self.sectors_written += landed;
        if let Some(budget) = self.crash_budget.as_mut() {
            *budget -= landed;
            if landed < n {
                self.crashed = true;
                return Err(DevError::Io(0xdead));
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DevError> {
        if self.crashed {
            return Err(DevError::Io(0xdead));
        }
        self.flushes += 1;
        self.unflushed.clear();
        Ok(())
    }
}
