//! The streaming writer: pages arrive one at a time (while the VM runs again, its memory
//! kept exact by copy-on-write), are compressed into a batch buffer and leave in device
//! writes of at least [`BATCH`] bytes. Nothing is visible until `finish` commits the TOC.

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::codec::{checksum, get_u64, sectors_for};
use crate::dev::{BlockDevice, Held, SECTOR};
use crate::error::Error;
use crate::header::{Header, IndexRec, Span, INDEX_LEN, TOUCH_LEN};
use crate::lane::{held_run, Data, Lane, Sealed};
use crate::spec::fresh_header;
pub use crate::spec::SaveSpec;
use crate::store::Store;
pub use crate::summary::{Costs, Summary};
use crate::toc::Entry;
use crate::types::{Gpn, PageKind, PAGE};
use crate::BATCH;

/// Batch buffers the writer keeps for reuse (lanes bring their own, which come back
/// from the device too).
const SPARE: usize = 4;

/// A snapshot being written. Holds the store: nothing else allocates space meanwhile.
/// Dropping it without `finish` abandons the image; its sectors stay free.
pub struct Writer<'s> {
    store: &'s mut Store,
    header: Header,
    entry: Entry,
    /// Sectors of the gap the image is written into.
    limit: u64,
    /// Bytes not yet written; `buf[0]` goes to sector `buf_lba`.
    buf: Vec<u8>,
    /// Batch buffers back from the device's queue, for reuse.
    spare: Vec<Vec<u8>>,
    /// Where a page is compressed before it is copied into `buf` (LZ4's worst case).
    lz4: Vec<u8>,
    buf_lba: u64,
    recs: Vec<IndexRec>,
    touch: Vec<u8>,
    max_pages: u32,
    compress: bool,
    /// Zero bytes before raw pages (their 8-byte alignment), in the data section.
    pad: u64,
    sum: Summary,
    failed: bool,
    /// The caller's clock, for [`Summary::costs`].
    clock: Option<fn() -> u64>,
}

impl Store {
    /// Starts a snapshot. Checks the name, the parent (present, same shape, chain not too
    /// deep), the TOC's room and the space, and streams the state blob. The image goes into
    /// the first gap that holds its worst case (every page raw), else into the largest gap,
    /// and fails with `NoSpace` only if it outgrows that.
    pub fn begin<'s, D: BlockDevice>(
        &'s mut self,
        dev: &mut D,
        spec: &SaveSpec<'_>,
    ) -> Result<Writer<'s>, Error> {
        // Queued writes of an abandoned writer (its image's sectors are free): completed
        // first, whether this save is refused or not, so what they hold goes now (hyp: a
        // run's pinned frames). Their errors are not this save's.
        let _ = dev.wait();
        let (name, parent) = self.check_spec(dev, spec)?;
        let fixed = (SECTOR + spec.state.len() + spec.touch.len() * TOUCH_LEN) as u64;
        let per_page = (PAGE + INDEX_LEN) as u64;
        let bound = sectors_for(fixed + u64::from(spec.max_pages) * per_page);
        let (start, limit) = self.place(bound);
        if limit < sectors_for(fixed) {
            return Err(Error::NoSpace {
                needed: bound,
                free: limit,
            });
        }
        let seq = self.toc.next_seq;
        let entry = Entry {
            name,
            parent,
            seq,
            start,
            sectors: 0,
            header_sum: 0,
        };
        let header = fresh_header(name, seq, parent, spec);
        let touch = spec.touch.iter().flat_map(|g| g.0.to_le_bytes()).collect();
        let mut w = Writer {
            store: self,
            header,
            entry,
            limit,
            buf: Vec::with_capacity(BATCH + 2 * PAGE),
            spare: Vec::new(),
            lz4: alloc::vec![0; lz4_flex::block::get_maximum_output_size(PAGE)],
            buf_lba: start + 1,
            recs: Vec::with_capacity(spec.max_pages as usize),
            touch,
            max_pages: spec.max_pages,
            compress: spec.compress,
            pad: 0,
            sum: Summary {
                seq,
                start,
                ..Summary::default()
            },
            failed: false,
            clock: None,
        };
        w.push(dev, spec.state)?;
        Ok(w)
    }
}

impl Writer<'_> {
    /// Saves one page. A zero page is skipped in a full image and recorded as zero in a
    /// diff. The page is copied (compressed) before this returns.
    pub fn page<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        gpn: Gpn,
        data: &[u8; PAGE],
    ) -> Result<(), Error> {
        self.stage(gpn, data)?;
        self.push(dev, &[])
    }

    /// [`Writer::page`] without any device request: the page is copied (compressed) into
    /// the batch buffer, which may grow past a batch, and goes to the device at the next
    /// `page`, [`Writer::write_staged`] or `finish`. For a caller that copies pages where it
    /// must not wait for the device (hyp: straight from the guest's frames, under the
    /// stage-2 lock that keeps them in place), then writes the batches with the lock
    /// released: each page is read once, and never copied twice.
    pub fn stage(&mut self, gpn: Gpn, data: &[u8; PAGE]) -> Result<(), Error> {
        self.admit(gpn)?;
        // The buffer's first byte is at `base` in the extent (a sector's start), so a raw
        // page aligned in the buffer is aligned in the extent.
        let base = self.stream_pos() - self.buf.len() as u64;
        let clock = self.clock;
        let now = move || clock.map_or(0, |c| c());
        let lz4 = self.compress.then_some(&mut self.lz4);
        let Some(p) = crate::lane::put(&mut self.buf, base, data, lz4, &mut self.sum.costs, &now)
        else {
            return self.zero(gpn);
        };
        match p.kind {
            PageKind::Raw => self.sum.raw += 1,
            _ => self.sum.lz4 += 1,
        }
        self.pad += p.pad;
        self.recs.push(IndexRec {
            gpn,
            kind: p.kind,
            len: p.len as u16,
            off: base + p.at as u64 - self.header.data.off,
            sum: p.sum,
        });
        self.sum.data_bytes += p.len as u64;
        Ok(())
    }

    /// A lane for pages staged on another CPU, compressing as this writer does now; its
    /// sealed batches come back through [`Writer::append`].
    pub fn lane(&self) -> Lane {
        Lane::new(self.header.shape.ram_pages, self.compress, self.clock)
    }

    /// Puts a lane's sealed batch into the image: the next whole sectors of the page data
    /// (what the writer staged itself is padded to a sector and queued first), queued to
    /// the device as it is, and its pages into the index at their offsets there. Its
    /// pages count against `max_pages` as `page` calls do.
    pub fn append<D: BlockDevice>(&mut self, dev: &mut D, batch: Sealed) -> Result<(), Error> {
        let calls = self.recs.len() as u64 + self.sum.skipped + batch.pages();
        let err = match () {
            _ if self.failed => Some(Error::WriterFailed),
            _ if calls > u64::from(self.max_pages) => Some(Error::TooManyPages),
            _ => None,
        };
        if let Some(e) = err {
            self.failed = true;
            return Err(e);
        }
        self.write_buffered(dev)?;
        let base = self.stream_pos() - self.header.data.off;
        let st = batch.stats;
        self.recs.extend(batch.recs.into_iter().map(|r| IndexRec {
            off: r.off + base,
            ..r
        }));
        (self.sum.lz4, self.sum.raw) = (self.sum.lz4 + st.lz4, self.sum.raw + st.raw);
        self.sum.skipped += st.skipped;
        self.sum.data_bytes += st.data_bytes;
        (self.sum.in_place, self.sum.runs) =
            (self.sum.in_place + st.in_place, self.sum.runs + st.runs);
        self.pad += st.pad;
        match batch.data.len() {
            0 => Ok(()),
            _ => self.queue(dev, batch.data),
        }
    }

    /// A run of pages the device reads where they lie (see [`Held`]), put into the image
    /// as [`Writer::append`] puts a lane's batch: page `i` of `data` is `gpns[i]`. At most
    /// [`BATCH`] bytes (a device request).
    pub fn run<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        gpns: &[Gpn],
        data: Box<dyn Held>,
    ) -> Result<(), Error> {
        if self.failed {
            return Err(Error::WriterFailed);
        }
        let t0 = self.now();
        let sealed = held_run(self.header.shape.ram_pages, gpns, data);
        self.sum.costs.checksum += self.now().wrapping_sub(t0);
        match sealed {
            Ok(s) => self.append(dev, s),
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// Queues what the writer staged itself, padded to a whole sector (the padding is the
    /// data section's): afterwards the stream is at a sector's start.
    fn write_buffered<D: BlockDevice>(&mut self, dev: &mut D) -> Result<(), Error> {
        self.push(dev, &[])?;
        let gap = self.buf.len().next_multiple_of(SECTOR) - self.buf.len();
        self.buf.resize(self.buf.len() + gap, 0);
        self.pad += gap as u64;
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = self.spare.pop().unwrap_or_default();
        let buf = core::mem::replace(&mut self.buf, next);
        self.buf.clear();
        self.queue(dev, Data::Buf(buf))
    }

    /// Bytes the batch buffer takes before its next batch is full: a caller that stages
    /// pages in runs sizes each run to this, so no batch leaves a long tail to carry over.
    pub fn room(&self) -> usize {
        BATCH.saturating_sub(self.buf.len())
    }

    /// Queues the full batches of what [`Writer::stage`] copied.
    pub fn write_staged<D: BlockDevice>(&mut self, dev: &mut D) -> Result<(), Error> {
        self.push(dev, &[])
    }

    /// Times the writer's parts with `clock` (any monotonic counter; its ticks are
    /// reported in [`Summary::costs`]).
    pub fn set_clock(&mut self, clock: fn() -> u64) {
        self.clock = Some(clock);
    }

    /// Turns LZ4 on or off for the pages that follow (an image may mix LZ4 and raw
    /// pages): a caller that finds compressing slower than writing what it saves stops it.
    pub fn set_compress(&mut self, on: bool) {
        self.compress = on;
    }

    /// Whether pages are LZ4-compressed now (else stored raw, and a caller may write runs
    /// of them in place: [`Writer::run`]).
    pub fn compressing(&self) -> bool {
        self.compress
    }

    /// The costs so far.
    pub fn costs(&self) -> Costs {
        self.sum.costs
    }

    fn now(&self) -> u64 {
        self.clock.map_or(0, |c| c())
    }

    /// Records that a page is absent (released): a no-op in a full image, `ZeroNow` in a diff.
    pub fn absent(&mut self, gpn: Gpn) -> Result<(), Error> {
        self.admit(gpn)?;
        self.zero(gpn)
    }

    fn zero(&mut self, gpn: Gpn) -> Result<(), Error> {
        if self.header.parent.is_none() {
            self.sum.skipped += 1;
            return Ok(());
        }
        self.recs.push(IndexRec {
            gpn,
            kind: PageKind::ZeroNow,
            len: 0,
            off: 0,
            sum: 0,
        });
        self.sum.zero_now += 1;
        Ok(())
    }

    fn admit(&mut self, gpn: Gpn) -> Result<(), Error> {
        let calls = self.recs.len() as u64 + self.sum.skipped;
        let err = if self.failed {
            Error::WriterFailed
        } else if gpn.0 >= self.header.shape.ram_pages {
            Error::PageOutOfRange { page: gpn.0 }
        } else if calls >= u64::from(self.max_pages) {
            Error::TooManyPages
        } else {
            return Ok(());
        };
        self.failed = true;
        Err(err)
    }

    /// Bytes from the start of the extent to the end of what was streamed.
    fn stream_pos(&self) -> u64 {
        (self.buf_lba - self.entry.start) * SECTOR as u64 + self.buf.len() as u64
    }

    /// Appends `bytes` and queues each full batch: requests of exactly [`BATCH`] bytes,
    /// so a driver that splits at that size sends no short request after each.
    fn push<D: BlockDevice>(&mut self, dev: &mut D, bytes: &[u8]) -> Result<(), Error> {
        self.buf.extend_from_slice(bytes);
        while self.buf.len() >= BATCH {
            self.queue_batch(dev)?;
        }
        Ok(())
    }

    /// Hands the buffer's first [`BATCH`] bytes to the device's queue and goes on in
    /// another buffer with the rest, so the device writes while the next batch is
    /// prepared.
    fn queue_batch<D: BlockDevice>(&mut self, dev: &mut D) -> Result<(), Error> {
        let mut next = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BATCH + 2 * PAGE));
        next.clear();
        next.extend_from_slice(&self.buf[BATCH..]);
        self.buf.truncate(BATCH);
        let full = core::mem::replace(&mut self.buf, next);
        self.queue(dev, Data::Buf(full))
    }

    /// Queues `data` (whole sectors, at most [`BATCH`] bytes) at the end of the stream: a
    /// buffer (`write_queued`: one of a completed write comes back for reuse) or bytes the
    /// device reads where they lie (`write_held`).
    fn queue<D: BlockDevice>(&mut self, dev: &mut D, data: Data) -> Result<(), Error> {
        let len = data.len();
        let end = self.buf_lba + (len / SECTOR) as u64;
        self.check_room(end, self.buf.len())?;
        let t0 = self.now();
        let queued = match data {
            Data::Buf(buf) => dev.write_queued(self.buf_lba, buf),
            Data::Held(h) => dev.write_held(self.buf_lba, h).map(|()| None),
        };
        self.sum.costs.device += self.now().wrapping_sub(t0);
        self.sum.costs.device_bytes += len as u64;
        match queued {
            Ok(back) => self.spare.extend(back.filter(|b| b.capacity() >= BATCH)),
            Err(e) => {
                self.failed = true;
                return Err(e.into());
            }
        }
        self.spare.truncate(SPARE);
        self.buf_lba = end;
        Ok(())
    }

    /// A write ending at sector `end` stays inside the image's gap.
    /// `after`: bytes still to come behind this write before the tail (the buffer's rest),
    /// so a refusal says how many sectors the image needs at least.
    fn check_room(&mut self, end: u64, after: usize) -> Result<(), Error> {
        if end > self.entry.start + self.limit {
            self.failed = true;
            let needed = (end - self.entry.start) + sectors_for(after as u64 + self.tail_bytes());
            return Err(Error::NoSpace {
                needed,
                free: self.limit,
            });
        }
        Ok(())
    }

    /// Writes the first `n` bytes of the buffer (whole sectors), inside the gap only.
    fn write_out<D: BlockDevice>(&mut self, dev: &mut D, n: usize) -> Result<(), Error> {
        if n == 0 {
            return Ok(());
        }
        let end = self.buf_lba + (n / SECTOR) as u64;
        self.check_room(end, self.buf.len() - n)?;
        let t0 = self.now();
        let written = dev.write(self.buf_lba, &self.buf[..n]);
        self.sum.costs.device += self.now().wrapping_sub(t0);
        self.sum.costs.device_bytes += n as u64;
        if let Err(e) = written {
            self.failed = true;
            return Err(e.into());
        }
        self.buf.drain(..n);
        self.buf_lba = end;
        Ok(())
    }

    /// Bytes still to come after the page data: the index and the touch order.
    fn tail_bytes(&self) -> u64 {
        (self.recs.len() * INDEX_LEN + self.touch.len()) as u64
    }

    /// Writes the index, the touch order and the header, flushes, then commits the TOC.
    /// Until the commit's first TOC copy is durable the snapshot does not exist.
    pub fn finish<D: BlockDevice>(mut self, dev: &mut D) -> Result<Summary, Error> {
        if self.failed {
            return Err(Error::WriterFailed);
        }
        let at = self.buf.len();
        let ram_pages = self.header.shape.ram_pages;
        crate::order::append_index(&mut self.recs, ram_pages, &mut self.buf)?;
        let index = Span {
            off: self.header.data.off + self.sum.data_bytes + self.pad,
            len: (self.buf.len() - at) as u64,
            sum: checksum(&self.buf[at..]),
        };
        let h = &mut self.header;
        h.data.len = self.sum.data_bytes + self.pad;
        h.index = index;
        h.touch = Span {
            off: h.index.off + h.index.len,
            len: self.touch.len() as u64,
            sum: checksum(&self.touch),
        };
        let touch = core::mem::take(&mut self.touch);
        self.buf.extend_from_slice(&touch);
        self.buf.resize(self.buf.len().div_ceil(SECTOR) * SECTOR, 0);
        self.write_out(dev, self.buf.len())?;
        let header = self.header.encode();
        let t0 = self.now();
        // The header is queued behind the last batch: until the TOC names the image, a
        // crash leaves free sectors whatever landed. Every queued write is on the device
        // (and its error known) before the flush that makes the image durable.
        drop(dev.write_queued(self.entry.start, header.to_vec())?);
        dev.wait()?;
        let t1 = self.now();
        dev.flush()?;
        self.entry.sectors = self.buf_lba - self.entry.start;
        self.entry.header_sum = get_u64(&header, SECTOR - 8);
        let mut toc = self.store.toc.clone();
        toc.entries.push(self.entry);
        toc.next_seq += 1;
        self.store.commit(dev, toc)?;
        let t2 = self.now();
        self.sum.costs.drain += t1.wrapping_sub(t0);
        self.sum.costs.commit += t2.wrapping_sub(t1);
        self.sum.costs.device += t2.wrapping_sub(t0);
        let base = self.entry.start * SECTOR as u64;
        let h = &self.header;
        let sections =
            [h.state, h.data, h.index, h.touch].map(|s| (base + s.off, base + s.off + s.len));
        Ok(Summary {
            sectors: self.entry.sectors,
            sections,
            ..self.sum
        })
    }
}
