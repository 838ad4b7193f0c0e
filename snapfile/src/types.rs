//! The values the format talks about: page numbers, names, a VM's shape.

use mmtypes::Ipa;

use crate::error::Error;
use crate::NAME_MAX;

/// Bytes per guest page (4 KiB granule).
pub const PAGE: usize = 4096;

/// A guest page number: the page's offset from the VM's RAM base, in pages. Not an IPA
/// frame number, so an image does not change meaning if RAM moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gpn(pub u32);

impl Gpn {
    /// The IPA of this page in a VM of `shape`. Meaningful for a page below
    /// `shape.ram_pages` of a valid shape (every image's is: [`Shape::is_valid`]); never
    /// panics.
    pub fn ipa(self, shape: &Shape) -> Ipa {
        Ipa::new(
            shape
                .ram_base
                .raw()
                .wrapping_add(u64::from(self.0) * PAGE as u64),
        )
    }
}

/// What must match between a diff and its parent: where RAM is, how big, how many vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// The IPA of the first byte of guest RAM.
    pub ram_base: Ipa,
    /// Guest RAM in pages.
    pub ram_pages: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
}

impl Shape {
    /// RAM and vCPUs present, the base page-aligned and RAM not wrapping the address space.
    pub fn is_valid(&self) -> bool {
        let bytes = u64::from(self.ram_pages) * PAGE as u64;
        self.ram_pages > 0
            && self.vcpus > 0
            && self.ram_base.raw().is_multiple_of(PAGE as u64)
            && self.ram_base.raw().checked_add(bytes).is_some()
    }
}

/// A snapshot name: 1 to [`NAME_MAX`] bytes of UTF-8 without NUL, stored inline.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Name {
    len: u8,
    bytes: [u8; NAME_MAX],
}

impl Name {
    /// Checks and copies a name.
    pub fn new(s: &str) -> Result<Self, Error> {
        Self::from_bytes(s.as_bytes())
    }

    /// A name from raw bytes (as read from the disk); must be valid UTF-8.
    pub(crate) fn from_bytes(b: &[u8]) -> Result<Self, Error> {
        if b.len() > NAME_MAX {
            return Err(Error::NameTooLong);
        }
        if b.is_empty() || b.contains(&0) || core::str::from_utf8(b).is_err() {
            return Err(Error::BadName);
        }
        let mut bytes = [0; NAME_MAX];
        bytes[..b.len()].copy_from_slice(b);
        Ok(Self {
            len: b.len() as u8,
            bytes,
        })
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        // Only `from_bytes` builds a Name, and it checked UTF-8; the fallback is unreachable.
        core::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("")
    }
}

impl core::fmt::Debug for Name {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// Writes an optional name as its on-disk field: a length byte (0: none) and
/// [`NAME_MAX`] bytes, zero-padded.
pub(crate) fn put_name_field(buf: &mut [u8], at: usize, name: Option<&Name>) {
    let field = &mut buf[at..at + 1 + NAME_MAX];
    field.fill(0);
    if let Some(n) = name {
        field[0] = n.len;
        field[1..1 + NAME_MAX].copy_from_slice(&n.bytes);
    }
}

/// Reads a name field; `None` if it cannot be one (too long, not UTF-8, NUL inside,
/// padding not zero), so a field has exactly one valid encoding.
pub(crate) fn get_name_field(buf: &[u8], at: usize) -> Option<Option<Name>> {
    let field = &buf[at..at + 1 + NAME_MAX];
    let len = usize::from(field[0]);
    if len > NAME_MAX || field[1 + len..].iter().any(|b| *b != 0) {
        return None;
    }
    if len == 0 {
        return Some(None);
    }
    Name::from_bytes(&field[1..1 + len]).ok().map(Some)
}

/// How a page is stored in an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    /// LZ4 block-compressed; shorter than a page.
    Lz4,
    /// The 4 KiB as they are (compression did not make them shorter).
    Raw,
    /// Diffs only: the page is zero now (or absent), whatever the parent holds.
    ZeroNow,
}

impl PageKind {
    pub(crate) fn code(self) -> u8 {
        match self {
            PageKind::Lz4 => 1,
            PageKind::Raw => 2,
            PageKind::ZeroNow => 3,
        }
    }

    pub(crate) fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(PageKind::Lz4),
            2 => Some(PageKind::Raw),
            3 => Some(PageKind::ZeroNow),
            _ => None,
        }
    }
}
