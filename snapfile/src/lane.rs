//! Pages staged into a buffer: the one staging step the writer and its lanes share, and
//! the lanes themselves.
//!
//! A [`Lane`] stages pages away from the [`crate::Writer`] (on another CPU: the writer and
//! its store stay with the saving one) into batches of at most [`BATCH`] bytes that end on
//! a whole page. Each batch is sealed to a whole number of sectors and handed to
//! [`crate::Writer::append`], which gives it the next place in the image's page data and
//! queues it to the device as it is, without copying it again. Where the pages land in
//! the data section does not matter: the index names each page's offset. The sealing
//! costs at most a page's room and a sector's padding per batch (0.4% of a MiB).

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::codec::is_zero_page;
use crate::dev::{Held, SECTOR};
use crate::error::Error;
use crate::header::IndexRec;
use crate::summary::Costs;
use crate::types::{Gpn, PageKind, PAGE};
use crate::BATCH;

/// One staged page: where its bytes start in the buffer, how it is stored, and the
/// alignment padding put before it.
pub(crate) struct Put {
    pub at: usize,
    pub kind: PageKind,
    pub len: usize,
    pub sum: u64,
    pub pad: u64,
}

/// The staging step: `data` appended to `buf` (whose first byte is at `base` in the image,
/// for alignment), LZ4-compressed when `lz4` is given and it shrinks the page, else raw and
/// 8-byte aligned for the fused copy and checksum. `None` for a zero page, which is not
/// stored. The clock is read only around work done: under QEMU's TCG a timer read is a
/// helper call (about 140 ns).
pub(crate) fn put(
    buf: &mut Vec<u8>,
    base: u64,
    data: &[u8; PAGE],
    lz4: Option<&mut Vec<u8>>,
    costs: &mut Costs,
    now: &dyn Fn() -> u64,
) -> Option<Put> {
    let t0 = now();
    let zero = is_zero_page(data);
    let t1 = now();
    costs.zero += t1.wrapping_sub(t0);
    if zero {
        return None;
    }
    let mut lz4 = lz4;
    let (compressed, t2) = match lz4.as_deref_mut() {
        Some(out) => {
            let n = lz4_flex::block::compress_into(data, out)
                .ok()
                .filter(|&n| n < PAGE);
            let t2 = now();
            costs.lz4 += t2.wrapping_sub(t1);
            costs.lz4_pages += 1;
            costs.lz4_saved += (PAGE - n.unwrap_or(PAGE)) as u64;
            (n, t2)
        }
        None => (None, t1),
    };
    let put = match (compressed, lz4) {
        (Some(len), Some(out)) => {
            let at = buf.len();
            buf.extend_from_slice(&out[..len]);
            Put {
                at,
                kind: PageKind::Lz4,
                len,
                sum: crate::pagesum::page_sum(data),
                pad: 0,
            }
        }
        _ => {
            let pad = (base + buf.len() as u64).wrapping_neg() % 8;
            buf.resize(buf.len() + pad as usize, 0);
            let at = buf.len();
            let sum = crate::pagesum::extend_summed(buf, data);
            Put {
                at,
                kind: PageKind::Raw,
                len: PAGE,
                sum,
                pad,
            }
        }
    };
    costs.checksum += now().wrapping_sub(t2);
    Some(put)
}

/// What a lane (or one sealed batch of it) holds, merged into the image's summary by
/// [`crate::Writer::append`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaneStats {
    /// Pages stored LZ4-compressed.
    pub lz4: u64,
    /// Pages stored raw.
    pub raw: u64,
    /// Zero pages skipped.
    pub skipped: u64,
    /// Bytes of page data.
    pub data_bytes: u64,
    /// Bytes of padding (raw pages' alignment, and the sector end).
    pub pad: u64,
    /// Of `raw`, pages written where they lie ([`Lane::run`]).
    pub in_place: u64,
    /// The runs those came in.
    pub runs: u64,
}

/// A sealed batch's bytes: a buffer it was staged into, or pages that the device reads
/// where they lie ([`Held`]).
pub(crate) enum Data {
    Buf(Vec<u8>),
    Held(Box<dyn Held>),
}

/// A batch of a lane, sealed: whole sectors of page data, and the index records of its
/// pages with offsets from its first byte.
pub struct Sealed {
    pub(crate) data: Data,
    pub(crate) recs: Vec<IndexRec>,
    pub(crate) stats: LaneStats,
}

impl Data {
    pub(crate) fn len(&self) -> usize {
        match self {
            Data::Buf(b) => b.len(),
            Data::Held(h) => h.bytes().len(),
        }
    }
}

impl Sealed {
    /// Pages in it (stored ones, and the zero pages skipped while it was filled).
    pub fn pages(&self) -> u64 {
        self.stats.lz4 + self.stats.raw + self.stats.skipped
    }

    /// Whether its bytes are written where they lie, with no copy ([`Lane::run`]).
    pub fn in_place(&self) -> bool {
        matches!(self.data, Data::Held(_))
    }
}

/// A run of pages stored raw where they lie (see [`Held`]): page `i` of `data` is
/// `gpns[i]`. Each page is read once here, for its checksum; the device reads it again in
/// place, so the copy into a batch buffer is saved. A zero page in it is stored like any
/// other (callers split runs at zero pages, which a full image skips). At most [`BATCH`]
/// bytes: one device request.
pub(crate) fn held_run(ram_pages: u32, gpns: &[Gpn], data: Box<dyn Held>) -> Result<Sealed, Error> {
    let bytes = data.bytes();
    if bytes.len() > BATCH {
        return Err(Error::TooLarge);
    }
    if bytes.len() != gpns.len() * PAGE {
        return Err(Error::RunLength {
            pages: gpns.len(),
            bytes: bytes.len(),
        });
    }
    let mut recs = Vec::with_capacity(gpns.len());
    for (i, (&gpn, page)) in gpns.iter().zip(bytes.as_chunks::<PAGE>().0).enumerate() {
        if gpn.0 >= ram_pages {
            return Err(Error::PageOutOfRange { page: gpn.0 });
        }
        recs.push(IndexRec {
            gpn,
            kind: PageKind::Raw,
            len: PAGE as u16,
            off: (i * PAGE) as u64,
            sum: crate::pagesum::page_sum(page),
        });
    }
    let stats = LaneStats {
        raw: gpns.len() as u64,
        data_bytes: bytes.len() as u64,
        in_place: gpns.len() as u64,
        runs: u64::from(!gpns.is_empty()),
        ..LaneStats::default()
    };
    Ok(Sealed {
        data: Data::Held(data),
        recs,
        stats,
    })
}

/// Pages of a full image staged apart from its writer (see the module doc).
pub struct Lane {
    buf: Vec<u8>,
    recs: Vec<IndexRec>,
    stats: LaneStats,
    ram_pages: u32,
    compress: bool,
    lz4: Vec<u8>,
    costs: Costs,
    clock: Option<fn() -> u64>,
}

impl Lane {
    /// A lane for an image of `ram_pages` pages, compressing or not as its writer does
    /// now ([`crate::Writer::lane`]).
    pub(crate) fn new(ram_pages: u32, compress: bool, clock: Option<fn() -> u64>) -> Self {
        Lane {
            buf: Vec::new(),
            recs: Vec::new(),
            stats: LaneStats::default(),
            ram_pages,
            compress,
            lz4: alloc::vec![0; lz4_flex::block::get_maximum_output_size(PAGE)],
            costs: Costs::default(),
            clock,
        }
    }

    /// Times this lane's pages one by one (`Some`, as its writer does), or not at all
    /// (`None`): a caller that times whole windows of pages itself saves three timer
    /// reads a page (about 140 ns each under QEMU's TCG, a tenth of a raw page's staging)
    /// and adds its time with [`Lane::note_staging`].
    pub fn set_clock(&mut self, clock: Option<fn() -> u64>) {
        self.clock = clock;
    }

    /// Whether it compresses pages (else a caller may write runs in place: [`Lane::run`]).
    pub fn compressing(&self) -> bool {
        self.compress
    }

    /// Adds `ticks` that the caller timed around staging pages (zero checks, LZ4,
    /// checksums and copies together: [`Costs::checksum`] then holds all of them).
    pub fn note_staging(&mut self, ticks: u64) {
        self.costs.checksum += ticks;
    }

    /// Stages page `gpn` (skipped if zero). When the batch being filled has no room for
    /// another page, it is sealed first and returned, and this page starts the next.
    pub fn stage(&mut self, gpn: Gpn, data: &[u8; PAGE]) -> Result<Option<Sealed>, Error> {
        if gpn.0 >= self.ram_pages {
            return Err(Error::PageOutOfRange { page: gpn.0 });
        }
        let full = match BATCH - self.buf.len() < PAGE + 8 {
            true => self.seal(),
            false => None,
        };
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(BATCH);
        }
        let clock = self.clock;
        let now = move || clock.map_or(0, |c| c());
        let lz4 = self.compress.then_some(&mut self.lz4);
        match put(&mut self.buf, 0, data, lz4, &mut self.costs, &now) {
            None => self.stats.skipped += 1,
            Some(p) => {
                match p.kind {
                    PageKind::Raw => self.stats.raw += 1,
                    _ => self.stats.lz4 += 1,
                }
                self.stats.pad += p.pad;
                self.stats.data_bytes += p.len as u64;
                self.recs.push(IndexRec {
                    gpn,
                    kind: p.kind,
                    len: p.len as u16,
                    off: p.at as u64,
                    sum: p.sum,
                });
            }
        }
        Ok(full)
    }

    /// A run of pages the device is to read where they lie, sealed on its own
    /// (`held_run`): page `i` of `data` is `gpns[i]`. Its checksums' time counts as staging.
    pub fn run(&mut self, gpns: &[Gpn], data: Box<dyn Held>) -> Result<Sealed, Error> {
        let clock = self.clock;
        let now = move || clock.map_or(0, |c| c());
        let t0 = now();
        let sealed = held_run(self.ram_pages, gpns, data)?;
        self.costs.checksum += now().wrapping_sub(t0);
        Ok(sealed)
    }

    /// Records page `gpn` as a zero page the caller found (not stored).
    pub fn skip(&mut self, gpn: Gpn) -> Result<(), Error> {
        if gpn.0 >= self.ram_pages {
            return Err(Error::PageOutOfRange { page: gpn.0 });
        }
        self.stats.skipped += 1;
        Ok(())
    }

    /// The batch being filled, sealed (`None` if it holds nothing, not even a skipped
    /// zero page): what is left when the lane's walk is done.
    pub fn seal(&mut self) -> Option<Sealed> {
        if self.buf.is_empty() && self.stats == LaneStats::default() {
            return None;
        }
        let mut stats = core::mem::take(&mut self.stats);
        let end = self.buf.len().next_multiple_of(SECTOR);
        stats.pad += (end - self.buf.len()) as u64;
        self.buf.resize(end, 0);
        Some(Sealed {
            data: Data::Buf(core::mem::take(&mut self.buf)),
            recs: core::mem::take(&mut self.recs),
            stats,
        })
    }

    /// Where this lane's time went (its zero checks, LZ4, checksums with their copies).
    pub fn costs(&self) -> Costs {
        self.costs
    }
}
