//! The reader: an image's diff chain resolved into one sorted page table, and page reads
//! that verify every byte they return.

use alloc::vec::Vec;

use crate::codec::{checksum, get_u32, get_u64, read_bytes, read_sector};
use crate::dev::{BlockDevice, SECTOR};
use crate::error::{Error, Section};
use crate::header::{Header, IndexRec, Span, INDEX_LEN, TOUCH_LEN};
use crate::store::Store;
use crate::toc::Entry;
use crate::types::{Gpn, Name, PageKind, Shape, PAGE};
use crate::MAX_CHAIN;

/// The longest run of sectors one stored page can touch: 4 KiB starting at the last byte
/// of a sector.
const PAGE_SPAN: usize = (PAGE + SECTOR - 1).div_ceil(SECTOR) * SECTOR;

/// Where one page's bytes are: what [`Image::locate`] answers and [`Image::read_page`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRef {
    gpn: Gpn,
    kind: PageKind,
    len: u16,
    /// Absolute byte offset on the device.
    byte: u64,
    sum: u64,
}

impl PageRef {
    /// The guest page.
    pub fn gpn(&self) -> Gpn {
        self.gpn
    }

    /// How the page is stored (`Lz4` or `Raw`: zero pages have no `PageRef`).
    pub fn kind(&self) -> PageKind {
        self.kind
    }

    /// Bytes the page occupies on the device.
    pub fn stored_len(&self) -> usize {
        usize::from(self.len)
    }

    /// The device byte its stored bytes start at (tools, tests, prefetch merging).
    pub fn device_byte(&self) -> u64 {
        self.byte
    }
}

/// A snapshot ready for lazy restore: shape, state and touch order of the newest image of
/// the chain, and every page that is not zero, newest version, sorted by page number.
#[derive(Clone, Debug)]
pub struct Image {
    name: Name,
    shape: Shape,
    depth: usize,
    state: Vec<u8>,
    touch: Vec<Gpn>,
    pages: Vec<PageRef>,
    /// Every image of the chain on the device: (first sector, sectors).
    extents: Vec<(u64, u64)>,
}

impl Image {
    /// The snapshot's name.
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// RAM base, RAM pages, vCPUs.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The sectors of every image of the chain, (first sector, sectors):
    /// what a restored VM may still read its pages from.
    pub fn extents(&self) -> &[(u64, u64)] {
        &self.extents
    }

    /// Images in the chain (1 for a full image).
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// The VM-state blob the hypervisor wrote (checksum verified).
    pub fn state(&self) -> &[u8] {
        &self.state
    }

    /// Guest pages in the order the VM first touched them after its last restore.
    pub fn touch_order(&self) -> &[Gpn] {
        &self.touch
    }

    /// The page's stored bytes, or `None`: the page is zero. `O(log n)`.
    pub fn locate(&self, gpn: Gpn) -> Option<PageRef> {
        self.pages
            .binary_search_by_key(&gpn, |p| p.gpn)
            .ok()
            .map(|i| self.pages[i])
    }

    /// Every page that is not zero, in page order.
    pub fn present_pages(&self) -> impl Iterator<Item = Gpn> + '_ {
        self.pages.iter().map(|p| p.gpn)
    }

    /// Every page that is not zero, with where it is stored, in page order.
    pub fn pages(&self) -> &[PageRef] {
        &self.pages
    }

    /// Reads the page into `out` and verifies it against its checksum. On any error `out`
    /// holds zeros or its old contents, never unverified bytes. One device read of at most
    /// 9 sectors, into a buffer on the stack.
    pub fn read_page<D: BlockDevice>(
        &self,
        dev: &mut D,
        r: &PageRef,
        out: &mut [u8; PAGE],
    ) -> Result<(), Error> {
        let first = r.byte / SECTOR as u64;
        let skip = (r.byte % SECTOR as u64) as usize;
        let len = usize::from(r.len);
        let n = (skip + len).div_ceil(SECTOR) * SECTOR;
        let mut buf = [0u8; PAGE_SPAN];
        dev.read(first, &mut buf[..n])?;
        decode(r, &buf[skip..skip + len], out)
    }

    /// Reads the pages of `refs`, in order, in as few device requests as possible: a run of
    /// pages whose stored bytes are adjacent on the device, but for a raw page's alignment
    /// padding (as they are when the writer was handed them in that order) is read in one request of at most `max_bytes` (at least
    /// one page). Each page is verified and handed to `sink` with its result, as
    /// [`Image::read_page`] would give it. For prefetch: `scratch` is reused between calls.
    /// A device error stops the batch and is returned.
    pub fn read_batch<D: BlockDevice>(
        &self,
        dev: &mut D,
        refs: &[PageRef],
        max_bytes: usize,
        scratch: &mut Vec<u8>,
        mut sink: impl FnMut(Gpn, Result<&[u8; PAGE], Error>),
    ) -> Result<(), Error> {
        let mut out = [0u8; PAGE];
        let mut rest = refs;
        while let Some(first) = rest.first() {
            let mut end = first.byte + u64::from(first.len);
            let run = 1 + rest[1..]
                .iter()
                .take_while(|r| {
                    // Adjacent first (up to the alignment padding of a raw page), so `next`
                    // is past `first.byte` when it is measured.
                    let next = r.byte + u64::from(r.len);
                    let adjacent = r.byte >= end && r.byte - end < 8;
                    let take = adjacent && next - first.byte <= max_bytes as u64;
                    if take {
                        end = next;
                    }
                    take
                })
                .count();
            let lba = first.byte / SECTOR as u64;
            let skip = (first.byte % SECTOR as u64) as usize;
            scratch.resize(
                (skip + (end - first.byte) as usize).div_ceil(SECTOR) * SECTOR,
                0,
            );
            dev.read(lba, scratch)?;
            for r in &rest[..run] {
                let at = skip + (r.byte - first.byte) as usize;
                let res = decode(r, &scratch[at..at + usize::from(r.len)], &mut out);
                sink(r.gpn, res.map(|()| &out));
            }
            rest = &rest[run..];
        }
        Ok(())
    }
}

/// Decompresses or copies a page's stored bytes into `out` and verifies its checksum;
/// zeroes `out` on failure.
fn decode(r: &PageRef, stored: &[u8], out: &mut [u8; PAGE]) -> Result<(), Error> {
    let ok = match r.kind {
        PageKind::Raw => {
            out.copy_from_slice(stored);
            true
        }
        PageKind::Lz4 => matches!(lz4_flex::block::decompress_into(stored, out), Ok(PAGE)),
        PageKind::ZeroNow => false,
    };
    if !ok || crate::pagesum::page_sum(out) != r.sum {
        out.fill(0);
        return Err(Error::PageChecksum { page: r.gpn.0 });
    }
    Ok(())
}

impl Store {
    /// Opens snapshot `name` for restore: reads and verifies the header and index of every
    /// image in its chain, and the newest one's state and touch order. No page is read.
    pub fn image<D: BlockDevice>(&self, dev: &mut D, name: &str) -> Result<Image, Error> {
        let chain = self.chain(name)?;
        let mut pages: Vec<PageRef> = Vec::new();
        let mut shape = None;
        let mut top = None;
        for e in chain.iter().rev() {
            let h = read_header(dev, e)?;
            if shape.is_some_and(|s| s != h.shape) {
                return Err(Error::ShapeMismatch);
            }
            shape = Some(h.shape);
            let recs = read_index(dev, e, &h)?;
            pages = merge(pages, &recs, e.start * SECTOR as u64 + h.data.off);
            top = Some((*e, h));
        }
        let Some((e, h)) = top else {
            return Err(Error::NotFound);
        };
        let state = read_span(dev, &e, &h.state, Section::State)?;
        let raw = read_span(dev, &e, &h.touch, Section::TouchOrder)?;
        let touch: Vec<Gpn> = raw
            .chunks_exact(TOUCH_LEN)
            .map(|c| Gpn(get_u32(c, 0)))
            .collect();
        if touch.iter().any(|g| g.0 >= h.shape.ram_pages) {
            return Err(Error::Corrupt(Section::TouchOrder));
        }
        Ok(Image {
            name: e.name,
            shape: h.shape,
            depth: chain.len(),
            state,
            touch,
            pages,
            extents: chain.iter().map(|e| (e.start, e.sectors)).collect(),
        })
    }

    /// `name`'s entry and its ancestors, newest first. The TOC check makes each parent's
    /// sequence number smaller, so the walk cannot loop; it is also cut at [`MAX_CHAIN`].
    pub(crate) fn chain(&self, name: &str) -> Result<Vec<Entry>, Error> {
        let mut chain = Vec::new();
        let mut cur = *self.entry(name)?;
        loop {
            chain.push(cur);
            let Some((pname, pseq)) = cur.parent else {
                return Ok(chain);
            };
            if chain.len() >= MAX_CHAIN {
                return Err(Error::ChainTooDeep);
            }
            // The TOC check made `pseq` smaller than `cur.seq`: the walk descends.
            let parent = self.toc.find(&pname).filter(|p| p.seq == pseq);
            cur = *parent.ok_or(Error::ParentMissing)?;
        }
    }
}

/// Reads an image's header and checks it is the one its entry was committed with.
pub(crate) fn read_header<D: BlockDevice>(dev: &mut D, e: &Entry) -> Result<Header, Error> {
    let s = read_sector(dev, e.start)?;
    let h = Header::decode(&s, e.sectors * SECTOR as u64)?;
    let same = get_u64(&s, SECTOR - 8) == e.header_sum
        && h.name == e.name
        && h.seq == e.seq
        && h.parent == e.parent;
    if !same {
        return Err(Error::Corrupt(Section::ImageHeader));
    }
    Ok(h)
}

fn read_span<D: BlockDevice>(
    dev: &mut D,
    e: &Entry,
    sp: &Span,
    what: Section,
) -> Result<Vec<u8>, Error> {
    // The header check bounded the span by the extent, and the TOC check the extent by
    // the device: this allocation is at most the device's size.
    let b = read_bytes(dev, e.start * SECTOR as u64 + sp.off, sp.len as usize)?;
    if checksum(&b) != sp.sum {
        return Err(Error::Checksum(what));
    }
    Ok(b)
}

fn read_index<D: BlockDevice>(dev: &mut D, e: &Entry, h: &Header) -> Result<Vec<IndexRec>, Error> {
    let b = read_span(dev, e, &h.index, Section::Index)?;
    let recs = b
        .chunks_exact(INDEX_LEN)
        .map(|c| IndexRec::decode(c, h))
        .collect::<Result<Vec<_>, _>>()?;
    if recs.windows(2).any(|w| w[0].gpn >= w[1].gpn) {
        return Err(Error::Corrupt(Section::Index));
    }
    Ok(recs)
}

/// The older layer's pages updated by a newer layer's records (both sorted): a newer
/// record replaces, a `ZeroNow` removes.
fn merge(old: Vec<PageRef>, new: &[IndexRec], data_byte: u64) -> Vec<PageRef> {
    let mut out = Vec::with_capacity(old.len() + new.len());
    let mut old = old.into_iter().peekable();
    for r in new {
        while let Some(o) = old.next_if(|o| o.gpn < r.gpn) {
            out.push(o);
        }
        old.next_if(|o| o.gpn == r.gpn);
        if r.kind != PageKind::ZeroNow {
            out.push(PageRef {
                gpn: r.gpn,
                kind: r.kind,
                len: r.len,
                byte: data_byte + r.off,
                sum: r.sum,
            });
        }
    }
    out.extend(old);
    out
}
