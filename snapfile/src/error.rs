//! The one error type: every check on what is read from the disk ends in one of these.

use core::fmt;

/// What a block device reports when a request fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevError {
    /// The request reaches past the device's last sector.
    OutOfRange,
    /// The buffer is not a whole number of sectors.
    BadLength,
    /// The device does not accept writes.
    ReadOnly,
    /// The device failed the request (driver-specific code).
    Io(u32),
}

/// A region of the store, named in checksum and consistency errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// The superblock (LBA 0).
    Superblock,
    /// The table of contents (both copies, when neither is usable).
    Toc,
    /// An image's header sector.
    ImageHeader,
    /// An image's opaque VM-state blob.
    State,
    /// An image's page index.
    Index,
    /// An image's touch-order list.
    TouchOrder,
}

/// Everything that can go wrong, typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The superblock or an image header does not start with its magic number.
    BadMagic(Section),
    /// The format version is not one this code reads.
    UnsupportedVersion {
        /// The version on the disk.
        found: u32,
        /// The version this code reads and writes.
        supported: u32,
    },
    /// A checksum does not match the bytes it covers.
    Checksum(Section),
    /// A checksummed region holds values that cannot be right (extents overlapping or off
    /// the device, unsorted index, dangling parent...): a bug in a writer, or a forged
    /// checksum. Never silently accepted.
    Corrupt(Section),
    /// The device is smaller than the store recorded, or too small to hold a store.
    Truncated {
        /// Sectors the store needs.
        expected: u64,
        /// Sectors the device has.
        found: u64,
    },
    /// A page's stored bytes do not decompress to, or do not hash to, what its index says.
    PageChecksum {
        /// The guest page number.
        page: u32,
    },
    /// Not enough free space for the snapshot; the store is unchanged.
    NoSpace {
        /// Sectors the snapshot needs (at least).
        needed: u64,
        /// Sectors of the largest free gap.
        free: u64,
    },
    /// No snapshot has this name.
    NotFound,
    /// A snapshot with this name exists.
    NameExists,
    /// A name is longer than [`crate::NAME_MAX`] bytes.
    NameTooLong,
    /// A name is empty or holds a NUL byte.
    BadName,
    /// The named parent of a diff does not exist.
    ParentMissing,
    /// A snapshot to delete is the parent of another.
    IsParent,
    /// A shape with no RAM or vCPUs, an unaligned RAM base, or RAM past the end of the
    /// address space.
    BadShape,
    /// A diff's shape (RAM base, size, vCPUs) differs from its parent's.
    ShapeMismatch,
    /// A diff chain would be, or is, deeper than [`crate::MAX_CHAIN`].
    ChainTooDeep,
    /// The table of contents has no free entry.
    TocFull,
    /// A page number is outside the shape's RAM.
    PageOutOfRange {
        /// The guest page number.
        page: u32,
    },
    /// The writer was handed the same page twice.
    DuplicatePage {
        /// The guest page number.
        page: u32,
    },
    /// The writer was handed more pages than it was told at `begin`.
    TooManyPages,
    /// A run of pages written in place (`Writer::run`) whose bytes are not its pages.
    RunLength {
        /// Pages the run names.
        pages: usize,
        /// Bytes it holds.
        bytes: usize,
    },
    /// A value (state blob, touch list) is larger than the format allows.
    TooLarge,
    /// An earlier call on this writer failed; it writes nothing more.
    WriterFailed,
    /// The block device failed.
    Device(DevError),
}

impl From<DevError> for Error {
    fn from(e: DevError) -> Self {
        Error::Device(e)
    }
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Section::Superblock => "superblock",
            Section::Toc => "table of contents",
            Section::ImageHeader => "image header",
            Section::State => "VM state",
            Section::Index => "page index",
            Section::TouchOrder => "touch order",
        })
    }
}

impl fmt::Display for DevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DevError::OutOfRange => f.write_str("request past the end of the device"),
            DevError::BadLength => f.write_str("buffer is not a whole number of sectors"),
            DevError::ReadOnly => f.write_str("the device is read-only"),
            DevError::Io(code) => write!(f, "I/O error {code}"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadMagic(s) => write!(f, "bad magic number in the {s}"),
            Error::UnsupportedVersion { found, supported } => {
                write!(f, "format version {found} (this build reads {supported})")
            }
            Error::Checksum(s) => write!(f, "checksum mismatch in the {s}"),
            Error::Corrupt(s) => write!(f, "inconsistent {s}"),
            Error::Truncated { expected, found } => {
                write!(f, "device truncated: {found} sectors, {expected} needed")
            }
            Error::PageChecksum { page } => write!(f, "page {page:#x} is corrupt"),
            Error::NoSpace { needed, free } => {
                write!(f, "no space: {needed} sectors needed, {free} free")
            }
            Error::NotFound => f.write_str("no such snapshot"),
            Error::NameExists => f.write_str("a snapshot with this name exists"),
            Error::NameTooLong => write!(f, "name longer than {} bytes", crate::NAME_MAX),
            Error::BadName => f.write_str("name is empty or holds a NUL byte"),
            Error::ParentMissing => f.write_str("the parent snapshot does not exist"),
            Error::IsParent => f.write_str("the snapshot is the parent of another"),
            Error::BadShape => f.write_str("the VM's shape is not valid"),
            Error::ShapeMismatch => f.write_str("the VM's shape differs from the parent's"),
            Error::ChainTooDeep => write!(f, "diff chain deeper than {}", crate::MAX_CHAIN),
            Error::TocFull => f.write_str("the table of contents is full"),
            Error::PageOutOfRange { page } => write!(f, "page {page:#x} is outside the VM's RAM"),
            Error::DuplicatePage { page } => write!(f, "page {page:#x} saved twice"),
            Error::TooManyPages => f.write_str("more pages than announced"),
            Error::RunLength { pages, bytes } => {
                write!(f, "a run of {pages} pages holds {bytes} bytes")
            }
            Error::TooLarge => f.write_str("value larger than the format allows"),
            Error::WriterFailed => f.write_str("an earlier write of this snapshot failed"),
            Error::Device(e) => write!(f, "device: {e}"),
        }
    }
}
