//! The on-disk snapshot store of the hypervisor (issue 17; the format is
//! docs/SNAPSHOT-FORMAT.md).
//!
//! A device of 512-byte sectors ([`BlockDevice`]) holds a [`Store`]: a superblock written
//! once at format time, two mirrored copies of a table of contents ([`Entry`] per snapshot)
//! and, in the gaps between them, images. An image is a header sector, the hypervisor's
//! opaque VM-state blob, packed page data (LZ4 or raw, each page with the XXH64 of its 4
//! KiB), a sorted page index and the touch order for prefetch. A diff image holds only the
//! pages given to it and names its parent; [`Store::image`] resolves a chain of up to
//! [`MAX_CHAIN`] images into one page table.
//!
//! - Save: [`Store::begin`] with a [`SaveSpec`] → [`Writer::page`] / [`Writer::absent`] one
//!   page at a time → [`Writer::finish`] (flush, then the TOC commit).
//! - Restore: [`Store::open`] → [`Store::image`] → [`Image::locate`] on a fault,
//!   [`Image::read_page`] (verified) and [`Image::touch_order`] for prefetch.
//!
//! Nothing read from the disk is trusted: every region is checksummed, every length and
//! offset is checked against the extent and the device before it is used (so no allocation
//! exceeds the device's size), and every failure is an [`Error`], never a panic.
#![no_std]
#![deny(
    missing_docs,
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks
)]
// Denied everywhere but `pagesum`: aligned word access to pages (the target is strict-align).
#![deny(unsafe_code)]

extern crate alloc;

mod codec;
mod dev;
mod error;
mod header;
mod image;
mod lane;
mod order;
#[allow(unsafe_code)]
mod pagesum;
mod spec;
mod state;
mod store;
mod summary;
mod superblock;
mod toc;
mod types;
mod writer;

pub use dev::{BlockDevice, Held, MemDisk, SECTOR};
pub use error::{DevError, Error, Section};
pub use image::{Image, PageRef};
pub use lane::{Lane, LaneStats, Sealed};
pub use state::{
    decode_header, decode_state, encode_state, vcpu_len, StateError, StateHeader, VcpuState,
    VmState, STATE_MAGIC, STATE_NAME_MAX, STATE_VERSION,
};
pub use store::Store;
pub use toc::Entry;
pub use types::{Gpn, Name, PageKind, Shape, PAGE};
pub use writer::{Costs, SaveSpec, Summary, Writer};

/// The format version this code reads and writes (superblock and image headers). 2: page
/// checksums are XXH64 and raw pages 8-byte aligned (1: XXH3-64, pages byte-adjacent).
pub const VERSION: u32 = 2;
/// The longest snapshot name, in bytes.
pub const NAME_MAX: usize = 32;
/// The deepest diff chain, the full image included.
pub const MAX_CHAIN: usize = 16;
/// The most snapshots a store can be formatted for (a 512 KiB TOC copy).
pub const MAX_ENTRIES: u32 = 4096;
/// The largest VM-state blob.
pub const MAX_STATE: usize = 16 << 20;
/// The writer's batch: device writes of page data are at least this long. 1 MiB, hyp's
/// virtio-blk driver's largest request (`dev::blk::MAX_REQUEST`), so a save's requests are
/// the ones its raw-throughput bench measures.
pub const BATCH: usize = 1 << 20;

/// Whether a page is all zero (what the writer skips), for callers that look before copying.
pub fn is_zero_page(page: &[u8; PAGE]) -> bool {
    codec::is_zero_page(page)
}

/// The page checksum of the format (XXH64, seed 0), for callers that verify pages
/// themselves.
pub fn page_checksum(page: &[u8; PAGE]) -> u64 {
    pagesum::page_sum(page)
}
