//! What a save wrote, and where the writer's time went.

#[cfg(doc)]
use crate::Writer;

/// What `finish` wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// The new snapshot's sequence number.
    pub seq: u64,
    /// First sector of its extent.
    pub start: u64,
    /// Sectors of its extent.
    pub sectors: u64,
    /// Pages stored LZ4-compressed.
    pub lz4: u64,
    /// Pages stored raw.
    pub raw: u64,
    /// Of `raw`, pages the device read where they lay, with no copy ([`Writer::run`]).
    pub in_place: u64,
    /// The runs those came in (one device request each).
    pub runs: u64,
    /// Zero pages recorded as `ZeroNow` (diffs).
    pub zero_now: u64,
    /// Zero pages skipped (full images).
    pub skipped: u64,
    /// Bytes of page data.
    pub data_bytes: u64,
    /// Where the state blob, the page data, the index and the touch order are, as device
    /// byte ranges `[start, end)` (for tools and corruption tests).
    pub sections: [(u64, u64); 4],
    /// Where the writer's time went, in the caller's clock (times all zero without
    /// [`Writer::set_clock`]).
    pub costs: Costs,
}

/// Where a save's time went inside the writer, in the ticks of the clock given to
/// [`Writer::set_clock`] (the caller profiles its save without the crate knowing its
/// timer), and what LZ4 bought: enough for a caller to judge whether compressing pays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Costs {
    /// Checking pages for zero.
    pub zero: u64,
    /// LZ4 compression.
    pub lz4: u64,
    /// Page checksums (XXH64; for raw pages, their copy into the buffer too).
    pub checksum: u64,
    /// Device writes (page data, index, header, flush and the TOC commit).
    pub device: u64,
    /// Of `device`, in `finish`: waiting for the queued writes.
    pub drain: u64,
    /// Of `device`, in `finish`: the header's write and flush and the TOC commit (what makes
    /// the image durable and listed).
    pub commit: u64,
    /// Pages given to LZ4, and the bytes it saved on them against storing them raw.
    pub lz4_pages: u64,
    /// Bytes LZ4 saved (raw size minus stored size, over `lz4_pages`).
    pub lz4_saved: u64,
    /// Bytes written to the device.
    pub device_bytes: u64,
}
