//! The table of contents: one entry per snapshot, kept in two mirrored copies.

use alloc::vec;
use alloc::vec::Vec;

use crate::codec::{get_u32, get_u64, put_u32, put_u64, seal, verify};
use crate::dev::SECTOR;
use crate::error::{Error, Section};
use crate::superblock::Superblock;
use crate::types::{get_name_field, put_name_field, Name};

/// "MHVSTOC" and a NUL.
const TOC_MAGIC: [u8; 8] = *b"MHVSTOC\0";
/// Bytes of the TOC header before the entries.
pub const TOC_HEADER_LEN: usize = 64;
/// Bytes per entry.
pub const ENTRY_LEN: usize = 128;
const CHECKSUM_AT: usize = 56;

/// One snapshot in the table of contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The snapshot's name.
    pub name: Name,
    /// For a diff, the parent's name and creation sequence number.
    pub parent: Option<(Name, u64)>,
    /// Creation sequence number, unique in the store and increasing: a parent's is smaller.
    pub seq: u64,
    /// First sector of the image's extent.
    pub start: u64,
    /// Sectors of the extent.
    pub sectors: u64,
    /// The image header's checksum: ties the entry to the image it was committed with.
    pub header_sum: u64,
}

/// A decoded TOC copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Toc {
    /// Increases with every commit; the newer valid copy wins.
    pub generation: u64,
    /// The next snapshot's sequence number.
    pub next_seq: u64,
    /// Entries in creation order.
    pub entries: Vec<Entry>,
}

impl Entry {
    fn encode(&self, e: &mut [u8]) {
        put_name_field(e, 0, Some(&self.name));
        put_name_field(e, 33, self.parent.as_ref().map(|p| &p.0));
        put_u64(e, 72, self.seq);
        put_u64(e, 80, self.parent.map_or(0, |p| p.1));
        put_u64(e, 88, self.start);
        put_u64(e, 96, self.sectors);
        put_u64(e, 104, self.header_sum);
    }

    fn decode(e: &[u8]) -> Result<Self, Error> {
        let name = get_name_field(e, 0)
            .ok_or(Error::Corrupt(Section::Toc))?
            .ok_or(Error::Corrupt(Section::Toc))?;
        let parent = get_name_field(e, 33)
            .ok_or(Error::Corrupt(Section::Toc))?
            .map(|p| (p, get_u64(e, 80)));
        Ok(Self {
            name,
            parent,
            seq: get_u64(e, 72),
            start: get_u64(e, 88),
            sectors: get_u64(e, 96),
            header_sum: get_u64(e, 104),
        })
    }
}

impl Toc {
    /// The copy as written, padded to the superblock's TOC size.
    pub fn encode(&self, sb: &Superblock) -> Vec<u8> {
        let mut b = vec![0u8; sb.toc_sectors as usize * SECTOR];
        b[..8].copy_from_slice(&TOC_MAGIC);
        put_u64(&mut b, 8, sb.store_id);
        put_u64(&mut b, 16, self.generation);
        put_u64(&mut b, 24, self.next_seq);
        put_u32(&mut b, 32, self.entries.len() as u32);
        for (i, e) in self.entries.iter().enumerate() {
            let at = TOC_HEADER_LEN + i * ENTRY_LEN;
            e.encode(&mut b[at..at + ENTRY_LEN]);
        }
        let used = TOC_HEADER_LEN + self.entries.len() * ENTRY_LEN;
        // The checksum covers the header and the used entries: unused space is not read.
        let (covered, _) = b.split_at_mut(used);
        seal(covered, CHECKSUM_AT);
        b
    }

    /// Decodes and checks a copy read from its area (`b.len()` = the superblock's TOC size).
    pub fn decode(b: &[u8], sb: &Superblock) -> Result<Self, Error> {
        if b.len() < TOC_HEADER_LEN || b[..8] != TOC_MAGIC || get_u64(b, 8) != sb.store_id {
            return Err(Error::Corrupt(Section::Toc));
        }
        let count = get_u32(b, 32);
        if count > sb.max_entries {
            return Err(Error::Corrupt(Section::Toc));
        }
        let used = TOC_HEADER_LEN + count as usize * ENTRY_LEN;
        if used > b.len() {
            return Err(Error::Corrupt(Section::Toc));
        }
        if !verify(&b[..used], CHECKSUM_AT) {
            return Err(Error::Checksum(Section::Toc));
        }
        let entries = b[TOC_HEADER_LEN..used]
            .chunks_exact(ENTRY_LEN)
            .map(Entry::decode)
            .collect::<Result<Vec<_>, _>>()?;
        let toc = Self {
            generation: get_u64(b, 16),
            next_seq: get_u64(b, 24),
            entries,
        };
        toc.check(sb)?;
        Ok(toc)
    }

    /// What a checksum cannot promise: unique names and sequence numbers, extents inside the
    /// data area and disjoint, each parent present with a smaller sequence number (so a
    /// chain strictly descends and cannot loop).
    fn check(&self, sb: &Superblock) -> Result<(), Error> {
        let bad = Err(Error::Corrupt(Section::Toc));
        let mut extents: Vec<(u64, u64)> = Vec::with_capacity(self.entries.len());
        for (i, e) in self.entries.iter().enumerate() {
            let end = e.start.checked_add(e.sectors);
            let inside = e.start >= sb.data_start() && end.is_some_and(|x| x <= sb.device_sectors);
            if !inside || e.sectors == 0 || e.seq >= self.next_seq {
                return bad;
            }
            let earlier = &self.entries[..i];
            if earlier.iter().any(|o| o.name == e.name || o.seq == e.seq) {
                return bad;
            }
            if let Some((p, pseq)) = e.parent {
                if !self
                    .entries
                    .iter()
                    .any(|o| o.name == p && o.seq == pseq && pseq < e.seq)
                {
                    return bad;
                }
            }
            extents.push((e.start, e.start + e.sectors));
        }
        extents.sort_unstable();
        if extents.windows(2).any(|w| w[0].1 > w[1].0) {
            return bad;
        }
        Ok(())
    }

    /// The entry named `name`.
    pub fn find(&self, name: &Name) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == *name)
    }
}
