//! Why a disk operation failed (`blk`'s errors, apart so the driver fits
//! its file).

use super::blk::SECTOR_SIZE;
use core::fmt;

/// Why a disk operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskError {
    /// The device does not accept writes (QEMU `readonly=on`).
    ReadOnly,
    /// The buffer is not a whole number of sectors.
    NotSectors {
        /// The buffer's length in bytes.
        len: usize,
    },
    /// The request reaches past the last sector.
    PastEnd {
        /// First sector of the request.
        lba: u64,
        /// Its length in sectors.
        sectors: u64,
        /// The disk's capacity in sectors.
        capacity: u64,
    },
    /// The device (or the driver's queue) reported an error.
    Device(virtio_drivers::Error),
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskError::ReadOnly => f.write_str("the disk is read-only"),
            DiskError::NotSectors { len } => {
                write!(
                    f,
                    "{len} bytes is not a whole number of {SECTOR_SIZE}-byte sectors"
                )
            }
            DiskError::PastEnd {
                lba,
                sectors,
                capacity,
            } => write!(
                f,
                "sectors {lba}..{} are past the end of the disk ({capacity} sectors)",
                lba.saturating_add(*sectors)
            ),
            DiskError::Device(e) => write!(f, "disk device error: {e}"),
        }
    }
}
