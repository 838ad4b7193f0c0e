//! The hypervisor's disk (issue 17): the first virtio-blk device of the host
//! DTB, driven with `virtio_drivers`' `VirtIOBlk` over virtio-mmio, for the
//! hypervisor's own use (snapshots that outlive the machine). A small block
//! API: capacity in 512-byte sectors, [`Disk::read`] and [`Disk::write`] of
//! whole sectors at an LBA, [`Disk::flush`]. Failures are [`DiskError`]
//! values, never a panic.
//!
//! No guest ever sees this device: a guest DTB is built from scratch
//! (`boot::guest_dtb` writes only memory, CPUs, GIC, timer and the emulated
//! UART, no virtio node), and a guest's stage 2 maps only its RAM, never the
//! device window below RAM, so a guest access to the virtio-mmio window is
//! an unmapped IPA (`vm::abort`: an injected external abort).
//!
//! Polled, no interrupt: a request is submitted and its completion waited
//! for by the calling CPU (`add_notify_wait_pop`), one request at a time.
//! QEMU completes a virtio-blk request asynchronously, in its I/O thread, so
//! the CPU spins for the device's time. Except for queued writes
//! ([`Disk::write_queued`], a save's page data): up to [`MAX_QUEUED`] are in
//! flight at once while the caller prepares the next, each completed when
//! the queue is full, at [`Disk::wait`], or before any other request (which
//! would otherwise find their completions in the used ring before its own).
//! A queued write's bytes are a buffer it owns, or bytes in place
//! ([`Disk::write_held`]: a save's run of pinned guest frames, no copy),
//! whose owner is dropped only once the device has completed the write.
//!
//! Buffers: callers pass any byte buffer (heap, stack, a frame), and the
//! driver hands it to the device in place: `HypHal::share` gives the device
//! the buffer's virtual address as its physical one. That is sound because
//! the EL2 stage-1 map is an identity map of all RAM (`arch::mmu`): a buffer
//! contiguous in VA (every Rust slice is) is contiguous in PA, heap memory
//! included (the heap is the link map's area plus frame runs, all RAM).
//! DMA is coherent (`hal`), so no cache maintenance is needed around a
//! request.

pub use super::blkerr::DiskError;
use super::hal::HypHal;
use super::virtio::{self, Claimed};
use alloc::boxed::Box;
use alloc::vec::Vec;
use arrayvec::ArrayVec;
use core::sync::atomic::{AtomicU64, Ordering};
use platform::Board;
use spin::{Mutex, Once};
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk};
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::DeviceType;

/// Bytes in a sector, the unit of every address and length here.
pub const SECTOR_SIZE: usize = virtio_drivers::device::blk::SECTOR_SIZE;

/// Most bytes one virtio request carries; longer reads and writes are split.
/// 1 MiB: large enough that the per-request cost (a notify, QEMU's
/// coroutine, the completion) is small next to the copy, small enough that
/// the disk lock is not held for long by one caller.
pub const MAX_REQUEST: usize = 1 << 20;

/// Most queued writes in flight at once, of at most [`MAX_REQUEST`] each:
/// the device writes while the caller prepares the next, and the rest
/// absorbs the jitter of QEMU's I/O thread and a save's shorter runs
/// written in place (three were enough for whole 1 MiB batches; with runs,
/// five made an idle Linux save's device waits 20-28 ms instead of 40-51).
/// Each takes at most 3 of the queue's 16 descriptors (1 with indirect
/// descriptors).
pub const MAX_QUEUED: usize = 5;

/// Longest a wait for the device sleeps before it looks at the used ring
/// again, should the device's interrupt not come (a request takes 0.3-1 ms
/// under QEMU).
const WAIT_POLL_US: u64 = 1000;

type Blk = VirtIOBlk<HypHal, MmioTransport<'static>>;

/// Bytes a queued write reads where they lie, kept until the write is
/// complete (a save's run of pinned guest frames): dropped only after the
/// device is done with them, and after the disk's lock (its drop may free
/// memory: unpinned frames).
pub trait InPlace: Send {
    /// The bytes: whole sectors, put and unchanged while this lives.
    fn bytes(&self) -> &[u8];
}

/// What a queued write writes: a buffer of its own, or bytes in place.
enum Payload {
    Buf(Vec<u8>),
    InPlace(Box<dyn InPlace>),
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Buf(b) => b,
            Payload::InPlace(p) => p.bytes(),
        }
    }

    fn into_buf(self) -> Option<Vec<u8>> {
        match self {
            Payload::Buf(b) => Some(b),
            Payload::InPlace(_) => None,
        }
    }
}

/// A queued write: the device reads `data` (and writes `resp`) until its
/// completion is popped. Boxed, so they stay put while this moves.
struct Queued {
    token: u16,
    req: Box<BlkReq>,
    resp: Box<BlkResp>,
    data: Payload,
}

/// The driver and its queued writes.
struct Inner {
    blk: Blk,
    /// Writes in flight, and those completed whose memory is not freed yet
    /// (freed by the next `write_queued` or `wait`, after the lock): together
    /// at most [`MAX_QUEUED`], so nothing is allocated or freed under the
    /// lock.
    queued: ArrayVec<Queued, MAX_QUEUED>,
    done: ArrayVec<Queued, MAX_QUEUED>,
    /// The first error of a queued write completed by another request's
    /// caller, for the writer's next `write_queued` or `wait`.
    failed: Option<DiskError>,
    /// The device's SPI, if the DTB names one the GIC takes: a wait for a
    /// queued write sleeps in WFI until it (`wait_used`).
    irq: Option<u32>,
    /// WFIs of those waits ended by something else (the device's
    /// interrupt: the only other one signalled meanwhile), and by the poll.
    woken: u64,
    polled: u64,
}

/// The hypervisor's disk.
pub struct Disk {
    /// The driver. Lock level: a leaf. Nothing else is taken while it is
    /// held, except the frame allocator's lock inside the driver's DMA calls
    /// (which happen only in `VirtIOBlk::new`, before the lock exists): a
    /// queued write's memory is allocated before it and freed after it.
    dev: Mutex<Inner>,
    /// Write calls so far that start below `watched` (each `write` and
    /// `write_queued`), so a cache of those sectors can tell whether anything
    /// wrote them since.
    writes: AtomicU64,
    /// The end of the sectors a cache holds (all of them until told).
    watched: AtomicU64,
    capacity: u64,
    readonly: bool,
    /// Where its registers are (for messages).
    base: u64,
}

static DISK: Once<Disk> = Once::new();

/// Claims the first virtio-blk device, if any, as the hypervisor's disk.
/// Boot CPU, once, after the frame allocator is up.
pub fn init(board: &Board) {
    let Some(Claimed { transport, at }) = virtio::claim(board, DeviceType::Block) else {
        crate::println!("[hyp] no disk (no virtio-blk device)");
        return;
    };
    let base = at.regs.base;
    let irq = at.intid.filter(|&i| crate::arch::gic::spi_setup(board, i));
    match Blk::new(transport) {
        Ok(dev) => {
            let disk = DISK.call_once(|| Disk {
                capacity: dev.capacity(),
                readonly: dev.readonly(),
                writes: AtomicU64::new(0),
                watched: AtomicU64::new(u64::MAX),
                dev: Mutex::new(Inner {
                    blk: dev,
                    queued: ArrayVec::new(),
                    done: ArrayVec::new(),
                    failed: None,
                    irq,
                    woken: 0,
                    polled: 0,
                }),
                base,
            });
            crate::println!(
                "[hyp] disk: {} MiB{} (virtio-blk at {base:#x})",
                (disk.capacity_sectors() * SECTOR_SIZE as u64) >> 20,
                if disk.readonly { ", read-only" } else { "" }
            );
        }
        Err(e) => crate::println!("[hyp] disk: virtio-blk at {base:#x} failed: {e}"),
    }
}

/// The disk, if one was found at boot.
pub fn get() -> Option<&'static Disk> {
    DISK.get()
}

impl Disk {
    /// Capacity in [`SECTOR_SIZE`]-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity
    }

    /// Whether the device refuses writes.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Write calls so far ([`Disk::write`], [`Disk::write_queued`]) that
    /// start below the watched end ([`Disk::watch_below`]), counted before
    /// the request is made: a cache of those sectors that saw the same count
    /// when it was filled and when it is used knows nobody wrote them since.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Acquire)
    }

    /// Counts only writes starting below `end` from now on (the sectors a
    /// cache holds; a write that starts below `end` counts whatever its
    /// length, and one starting above cannot reach below).
    pub fn watch_below(&self, end: u64) {
        self.watched.store(end, Ordering::Release);
    }

    /// Counts a write at `lba` if it starts in the watched sectors.
    fn count_write(&self, lba: u64) {
        if lba < self.watched.load(Ordering::Acquire) {
            self.writes.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The waits for the device so far that ended in its interrupt, and
    /// those ended by the [`WAIT_POLL_US`] poll (`None`: the device has no
    /// interrupt, and waits spin).
    pub fn waits(&self) -> Option<(u64, u64)> {
        let d = self.dev.lock();
        d.irq.map(|_| (d.woken, d.polled))
    }

    /// Physical address of the device's registers.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Reads `buf.len() / SECTOR_SIZE` sectors from `lba` on into `buf`.
    pub fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check(lba, buf.len())?;
        for (i, chunk) in buf.chunks_mut(MAX_REQUEST).enumerate() {
            let at = chunk_lba(lba, i);
            let mut d = self.dev.lock();
            d.settle();
            // The buffer is shared with the device in place: see "Buffers"
            // in the module doc.
            d.blk.read_blocks(at, chunk).map_err(DiskError::Device)?;
        }
        Ok(())
    }

    /// Writes `buf` (whole sectors) to the disk from `lba` on. Not durable
    /// until [`Disk::flush`].
    pub fn write(&self, lba: u64, buf: &[u8]) -> Result<(), DiskError> {
        if self.readonly {
            return Err(DiskError::ReadOnly);
        }
        self.check(lba, buf.len())?;
        self.count_write(lba);
        for (i, chunk) in buf.chunks(MAX_REQUEST).enumerate() {
            let at = chunk_lba(lba, i);
            let mut d = self.dev.lock();
            d.settle();
            d.blk.write_blocks(at, chunk).map_err(DiskError::Device)?;
        }
        Ok(())
    }

    /// Starts writing `buf` (whole sectors, at most [`MAX_REQUEST`]) at
    /// `lba` and returns once the device has it, without waiting for the
    /// write: with [`MAX_QUEUED`] in flight, the oldest is waited for first.
    /// Returns the buffer of a completed queued write, for reuse. The write
    /// is done (and its error, if any, reported) by the next `write_queued`
    /// or [`Disk::wait`]; a flush or any other request waits for it first.
    pub fn write_queued(&self, lba: u64, buf: Vec<u8>) -> Result<Option<Vec<u8>>, DiskError> {
        self.enqueue(lba, Payload::Buf(buf))
    }

    /// [`Disk::write_queued`] of bytes the device reads where they lie, with
    /// no copy: `data` is dropped once the write is complete (by a later
    /// queued write, a [`Disk::wait`], or here on an error), never before.
    pub fn write_held(&self, lba: u64, data: Box<dyn InPlace>) -> Result<(), DiskError> {
        self.enqueue(lba, Payload::InPlace(data)).map(drop)
    }

    /// Queues `data` (see [`Disk::write_queued`]); the buffer of a write
    /// completed meanwhile, if any, for reuse (the other payloads are dropped
    /// here, after the lock).
    fn enqueue(&self, lba: u64, data: Payload) -> Result<Option<Vec<u8>>, DiskError> {
        if self.readonly {
            return Err(DiskError::ReadOnly);
        }
        let len = data.bytes().len();
        self.check(lba, len)?;
        if len == 0 || len > MAX_REQUEST {
            // Counted by `write`.
            self.write(lba, data.bytes())?;
            return Ok(data.into_buf());
        }
        self.count_write(lba);
        // Allocated before the lock and freed after it: the lock is a leaf.
        let q = Queued {
            token: 0,
            req: Box::default(),
            resp: Box::default(),
            data,
        };
        let (done, unsent, result) = {
            let mut d = self.dev.lock();
            let completed = match d.queued.is_full() {
                true => d.complete_one(),
                false => Ok(()),
            };
            let (unsent, sent) = match d.submit(lba, q) {
                Ok(()) => (None, Ok(())),
                Err((q, e)) => (q, Err(e)),
            };
            let failed = d.failed.take().map_or(Ok(()), Err);
            let result = completed.and(sent).and(failed);
            (core::mem::take(&mut d.done), unsent, result)
        };
        drop(unsent);
        result?;
        Ok(done.into_iter().find_map(|q| q.data.into_buf()))
    }

    /// Waits for every queued write; the first error of any of them since
    /// the last `write_queued` or `wait`.
    pub fn wait(&self) -> Result<(), DiskError> {
        self.wait_returning().1
    }

    /// [`Disk::wait`], giving back the buffers of the writes it completed
    /// (a caller that queued buffers it must keep: `bench disk`'s backup).
    pub fn wait_returning(&self) -> (ArrayVec<Vec<u8>, MAX_QUEUED>, Result<(), DiskError>) {
        let (done, result) = {
            let mut d = self.dev.lock();
            d.settle();
            let failed = d.failed.take().map_or(Ok(()), Err);
            (core::mem::take(&mut d.done), failed)
        };
        (
            done.into_iter().filter_map(|q| q.data.into_buf()).collect(),
            result,
        )
    }

    /// Makes every completed write durable (a no-op on a device without
    /// `VIRTIO_BLK_F_FLUSH`, whose writes are durable on completion).
    /// Queued writes are completed first: a virtio flush covers only those.
    pub fn flush(&self) -> Result<(), DiskError> {
        let mut d = self.dev.lock();
        d.settle();
        d.blk.flush().map_err(DiskError::Device)
    }

    /// `len` bytes at `lba` are whole sectors inside the disk. The driver
    /// asserts whole sectors, so this is what keeps a bad request an error
    /// rather than a panic.
    fn check(&self, lba: u64, len: usize) -> Result<(), DiskError> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::NotSectors { len });
        }
        let sectors = (len / SECTOR_SIZE) as u64;
        match lba.checked_add(sectors) {
            Some(end) if end <= self.capacity => Ok(()),
            _ => Err(DiskError::PastEnd {
                lba,
                sectors,
                capacity: self.capacity,
            }),
        }
    }
}

impl Inner {
    /// Hands `q` to the device (the queue has room); `q` back if it refused.
    fn submit(&mut self, lba: u64, mut q: Queued) -> Result<(), (Option<Queued>, DiskError)> {
        // SAFETY: `req`, `data` and `resp` are moved into `self.queued`
        // below and neither read nor written (nor freed) until `complete_one`
        // pops this token with the same three; boxes, a Vec's heap data and
        // in-place bytes (`InPlace`: put while they live) do not move when
        // their owner does. The bytes are RAM, identity mapped (see
        // "Buffers").
        let token = unsafe {
            self.blk
                .write_blocks_nb(lba as usize, &mut q.req, q.data.bytes(), &mut q.resp)
        };
        match token {
            Ok(t) => {
                q.token = t;
                // Room: the caller completed one if the queue was full. If
                // not, the device has the request: forgotten, never freed.
                if let Err(full) = self.queued.try_push(q) {
                    core::mem::forget(full.element());
                    return Err((None, DiskError::Device(virtio_drivers::Error::QueueFull)));
                }
                Ok(())
            }
            Err(e) => Err((Some(q), DiskError::Device(e))),
        }
    }

    /// Waits for the next queued write to complete and moves it to `done`;
    /// its error, if any.
    fn complete_one(&mut self) -> Result<(), DiskError> {
        let token = match self.blk.peek_used() {
            Some(t) => t,
            None => self.wait_used(),
        };
        // Only queued writes are ever left in the used ring: every other
        // request is waited for by its caller, under this lock.
        let Some(i) = self.queued.iter().position(|q| q.token == token) else {
            // A broken queue: nothing queued can be known complete. Their
            // memory leaks rather than be freed while the device may still
            // read it.
            self.queued.drain(..).for_each(core::mem::forget);
            return Err(DiskError::Device(virtio_drivers::Error::WrongToken));
        };
        let mut q = self.queued.swap_remove(i);
        // SAFETY: the same `req`, `data` and `resp` that `write_blocks_nb`
        // returned this token for, untouched since.
        let r = unsafe {
            self.blk
                .complete_write_blocks(token, &q.req, q.data.bytes(), &mut q.resp)
        };
        // `queued` and `done` hold at most MAX_QUEUED together: room.
        if let Err(full) = self.done.try_push(q) {
            core::mem::forget(full.element());
        }
        r.map_err(DiskError::Device)
    }

    /// Waits until the device has completed a request; its token. Asleep in
    /// WFI until the device's interrupt (routed here and enabled for the
    /// wait only; never taken: interrupts stay masked at EL2, and a pending
    /// one ends the WFI), so the waiting CPU leaves its core to whatever
    /// does the device's work (under QEMU, the host threads writing the
    /// file); polled again after [`WAIT_POLL_US`] in case it never comes.
    /// Spins without an interrupt.
    fn wait_used(&mut self) -> u16 {
        let Some(intid) = self.irq else {
            loop {
                if let Some(t) = self.blk.peek_used() {
                    return t;
                }
                core::hint::spin_loop();
            }
        };
        let board = crate::arch::el2::board();
        crate::arch::gic::spi_enable_here(board, intid);
        let token = crate::arch::gic::urgent_only(|| loop {
            // Acknowledged before the ring is read: a completion after the
            // read raises the line again, and the WFI ends at once.
            self.blk.ack_interrupt();
            if let Some(t) = self.blk.peek_used() {
                break t;
            }
            match crate::arch::timer::wfi_for(WAIT_POLL_US) {
                true => self.polled += 1,
                false => self.woken += 1,
            }
        });
        crate::arch::gic::spi_disable(board, intid);
        token
    }

    /// Completes every queued write (before another request, or a flush),
    /// keeping the first error for the writer.
    fn settle(&mut self) {
        while !self.queued.is_empty() {
            if let Err(e) = self.complete_one() {
                self.failed.get_or_insert(e);
            }
        }
    }
}

/// The LBA of chunk `i` of a request starting at `lba` (in range: `check`
/// bounded the whole request by the capacity).
fn chunk_lba(lba: u64, i: usize) -> usize {
    (lba + (i * MAX_REQUEST / SECTOR_SIZE) as u64) as usize
}
