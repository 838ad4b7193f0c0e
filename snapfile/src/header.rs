//! An image's header sector and its page-index records.

use mmtypes::Ipa;

use crate::codec::{get_u16, get_u32, get_u64, put_u16, put_u32, put_u64, seal, verify};
use crate::dev::SECTOR;
use crate::error::{Error, Section};
use crate::types::{get_name_field, put_name_field, Gpn, Name, PageKind, Shape, PAGE};
use crate::VERSION;

/// "MHVSIMG" and a NUL.
const IMG_MAGIC: [u8; 8] = *b"MHVSIMG\0";
const CHECKSUM_AT: usize = SECTOR - 8;
/// Bytes per page-index record.
pub const INDEX_LEN: usize = 24;
/// Bytes per touch-order record (a `u32` page number).
pub const TOUCH_LEN: usize = 4;

/// A section of an image: byte offset from the extent's start, length, checksum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    /// Offset in bytes from the first byte of the extent.
    pub off: u64,
    /// Length in bytes.
    pub len: u64,
    /// XXH3 of the section's bytes (0 for the page data, whose pages carry their own).
    pub sum: u64,
}

/// The decoded header sector of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The snapshot's own name (checked against its TOC entry).
    pub name: Name,
    /// The creation sequence number (checked against its TOC entry).
    pub seq: u64,
    /// The VM's RAM and vCPUs.
    pub shape: Shape,
    /// For a diff: the parent's name and sequence number.
    pub parent: Option<(Name, u64)>,
    /// The opaque VM-state blob.
    pub state: Span,
    /// The packed page data.
    pub data: Span,
    /// The page index ([`INDEX_LEN`] bytes a record).
    pub index: Span,
    /// The touch order ([`TOUCH_LEN`] bytes a record).
    pub touch: Span,
}

fn put_span(s: &mut [u8], at: usize, sp: &Span) {
    put_u64(s, at, sp.off);
    put_u64(s, at + 8, sp.len);
    put_u64(s, at + 16, sp.sum);
}

fn get_span(s: &[u8], at: usize) -> Span {
    Span {
        off: get_u64(s, at),
        len: get_u64(s, at + 8),
        sum: get_u64(s, at + 16),
    }
}

impl Header {
    /// The sector as written at the start of the extent.
    pub fn encode(&self) -> [u8; SECTOR] {
        let mut s = [0u8; SECTOR];
        s[..8].copy_from_slice(&IMG_MAGIC);
        put_u32(&mut s, 8, VERSION);
        put_u32(&mut s, 12, u32::from(self.parent.is_some()));
        put_u64(&mut s, 16, self.seq);
        put_u64(&mut s, 24, self.shape.ram_base.raw());
        put_u32(&mut s, 32, self.shape.ram_pages);
        put_u32(&mut s, 36, self.shape.vcpus);
        put_name_field(&mut s, 40, Some(&self.name));
        put_name_field(&mut s, 73, self.parent.as_ref().map(|p| &p.0));
        put_u64(&mut s, 112, self.parent.map_or(0, |p| p.1));
        put_span(&mut s, 120, &self.state);
        put_span(&mut s, 144, &self.data);
        put_span(&mut s, 168, &self.index);
        put_span(&mut s, 192, &self.touch);
        seal(&mut s, CHECKSUM_AT);
        s
    }

    /// Magic, version, checksum, then the layout rule: state, data, index and touch order
    /// follow the header sector back to back, and end inside the extent of `extent_bytes`.
    pub fn decode(s: &[u8; SECTOR], extent_bytes: u64) -> Result<Self, Error> {
        if s[..8] != IMG_MAGIC {
            return Err(Error::BadMagic(Section::ImageHeader));
        }
        let version = get_u32(s, 8);
        if version != VERSION {
            return Err(Error::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        if !verify(s, CHECKSUM_AT) {
            return Err(Error::Checksum(Section::ImageHeader));
        }
        let parent = get_name_field(s, 73)
            .ok_or(Error::Corrupt(Section::ImageHeader))?
            .map(|p| (p, get_u64(s, 112)));
        let h = Self {
            name: get_name_field(s, 40)
                .ok_or(Error::Corrupt(Section::ImageHeader))?
                .ok_or(Error::Corrupt(Section::ImageHeader))?,
            seq: get_u64(s, 16),
            shape: Shape {
                ram_base: Ipa::new(get_u64(s, 24)),
                ram_pages: get_u32(s, 32),
                vcpus: get_u32(s, 36),
            },
            parent,
            state: get_span(s, 120),
            data: get_span(s, 144),
            index: get_span(s, 168),
            touch: get_span(s, 192),
        };
        let flags_ok = get_u32(s, 12) == u32::from(parent.is_some());
        if !flags_ok || !h.shape.is_valid() || !h.layout_ok(extent_bytes) {
            return Err(Error::Corrupt(Section::ImageHeader));
        }
        Ok(h)
    }

    fn layout_ok(&self, extent_bytes: u64) -> bool {
        let chain = [&self.state, &self.data, &self.index, &self.touch];
        let mut at = SECTOR as u64;
        for sp in chain {
            if sp.off != at {
                return false;
            }
            match at.checked_add(sp.len) {
                Some(end) => at = end,
                None => return false,
            }
        }
        at <= extent_bytes
            && self.index.len.is_multiple_of(INDEX_LEN as u64)
            && self.touch.len.is_multiple_of(TOUCH_LEN as u64)
            && self.state.len <= crate::MAX_STATE as u64
    }
}

/// One page-index record as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexRec {
    /// The guest page.
    pub gpn: Gpn,
    /// How it is stored.
    pub kind: PageKind,
    /// Stored bytes (0 for `ZeroNow`).
    pub len: u16,
    /// Offset of the stored bytes from the start of the data section.
    pub off: u64,
    /// The page checksum (XXH64, `pagesum`) of its 4 KiB as the guest sees them (0 for `ZeroNow`).
    pub sum: u64,
}

impl IndexRec {
    /// Writes the record into `b` ([`INDEX_LEN`] bytes).
    pub fn encode(&self, b: &mut [u8]) {
        put_u32(b, 0, self.gpn.0);
        b[4] = self.kind.code();
        b[5] = 0;
        put_u16(b, 6, self.len);
        put_u64(b, 8, self.off);
        put_u64(b, 16, self.sum);
    }

    /// Reads a record and checks it against the image it belongs to.
    pub fn decode(b: &[u8], h: &Header) -> Result<Self, Error> {
        let bad = Err(Error::Corrupt(Section::Index));
        let Some(kind) = PageKind::from_code(b[4]) else {
            return bad;
        };
        let r = Self {
            gpn: Gpn(get_u32(b, 0)),
            kind,
            len: get_u16(b, 6),
            off: get_u64(b, 8),
            sum: get_u64(b, 16),
        };
        let len_ok = match kind {
            PageKind::Raw => usize::from(r.len) == PAGE,
            PageKind::Lz4 => r.len > 0 && usize::from(r.len) < PAGE,
            PageKind::ZeroNow => r.len == 0 && r.off == 0 && r.sum == 0 && h.parent.is_some(),
        };
        let in_data = r
            .off
            .checked_add(u64::from(r.len))
            .is_some_and(|e| e <= h.data.len);
        if b[5] != 0 || !len_ok || !in_data || r.gpn.0 >= h.shape.ram_pages {
            return bad;
        }
        Ok(r)
    }
}
