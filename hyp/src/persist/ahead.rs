//! Read-ahead for the prefetch: a page's read (snapfile's `read_page`, one
//! device read of at most 9 sectors) that misses the image's window, made
//! on behalf of the prefetcher, brings in [`AHEAD_SECTORS`] from there in
//! one request, and later reads inside the window are served from memory.
//! The prefetch walks the image in page order, which is the order the page
//! data was written in, so one request serves about a hundred pages: under
//! TCG a request costs about the same whatever its size, and per-page
//! requests made the prefetch of an idle Linux take 13,600 of them.
//!
//! A guest's own fault uses the window when it covers the page and reads
//! just its page otherwise (no extra latency on the fault). Every page is
//! still verified against its checksum after this, as before: a stale or
//! wrong window could only fail a page, never give the guest bad data.

use super::disk::Dev;
use alloc::vec::Vec;
use snapfile::{BlockDevice, DevError};
use spin::Mutex;

/// Sectors one read-ahead brings in (256 KiB).
const AHEAD_SECTORS: u64 = 512;
const SECTOR: usize = 512;

/// The sectors of an image last read ahead. Lock level: above the disk's
/// driver lock only (a read-ahead is made with it held); nothing else is
/// taken under it, and it is taken with no lock the disk could meet.
#[derive(Default)]
pub struct Window {
    lba: u64,
    data: Vec<u8>,
}

impl Window {
    fn covers(&self, lba: u64, sectors: u64) -> bool {
        let have = (self.data.len() / SECTOR) as u64;
        lba >= self.lba && lba.saturating_add(sectors) <= self.lba.saturating_add(have)
    }
}

/// The disk seen through an image's window; `fill`: a miss reads ahead.
pub struct Ahead<'a> {
    pub dev: Dev,
    pub window: &'a Mutex<Window>,
    pub fill: bool,
}

impl BlockDevice for Ahead<'_> {
    fn sectors(&self) -> u64 {
        self.dev.sectors()
    }

    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        let n = (buf.len() / SECTOR) as u64;
        if !buf.len().is_multiple_of(SECTOR) {
            return self.dev.read(lba, buf);
        }
        let mut w = self.window.lock();
        if !w.covers(lba, n) {
            let len = AHEAD_SECTORS.min(self.dev.sectors().saturating_sub(lba));
            if !self.fill || len < n || !refill(&mut w, &mut self.dev, lba, len) {
                drop(w);
                return self.dev.read(lba, buf);
            }
        }
        let off = ((lba - w.lba) as usize) * SECTOR;
        buf.copy_from_slice(&w.data[off..off + buf.len()]);
        Ok(())
    }

    fn write(&mut self, _lba: u64, _buf: &[u8]) -> Result<(), DevError> {
        Err(DevError::ReadOnly) // reads only: the image is loaded, not written
    }

    fn flush(&mut self) -> Result<(), DevError> {
        Ok(())
    }
}

/// Reads `len` sectors from `lba` into the window; false (window empty) if
/// the heap or the device says no.
fn refill(w: &mut Window, dev: &mut Dev, lba: u64, len: u64) -> bool {
    let bytes = len as usize * SECTOR;
    w.data.clear();
    if w.data.try_reserve_exact(bytes).is_err() {
        return false;
    }
    w.data.resize(bytes, 0);
    if dev.read(lba, &mut w.data).is_err() {
        w.data.clear();
        return false;
    }
    w.lba = lba;
    true
}
