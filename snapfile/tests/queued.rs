//! Queued writes (`BlockDevice::write_queued`): a device that keeps batches in flight and
//! lands them only when one completes. The writer must have every batch complete before the
//! header, the flush and the commit, and a batch that fails at completion fails the save.

mod common;

use common::*;
use snapfile::{BlockDevice, DevError, Error, MemDisk, Store, BATCH, PAGE};
use std::collections::VecDeque;

/// Lands queued writes only on completion: the oldest when three are in flight, all at
/// `wait`. A flush or a read with writes in flight is refused (a virtio flush covers only
/// completed writes), and `fail_at` makes that queued write fail at its completion.
struct QueueDisk {
    disk: MemDisk,
    flight: VecDeque<(u64, Vec<u8>, bool)>,
    queued: usize,
    fail_at: Option<usize>,
    failed: Option<DevError>,
    /// The LBA of every write made at once (not queued), in order.
    direct: Vec<u64>,
}

impl QueueDisk {
    fn new(fail_at: Option<usize>) -> Self {
        QueueDisk {
            disk: MemDisk::new(1 << 16),
            flight: VecDeque::new(),
            queued: 0,
            fail_at,
            failed: None,
            direct: Vec::new(),
        }
    }

    /// Completes the oldest write in flight; its buffer.
    fn complete(&mut self) -> Vec<u8> {
        let (lba, buf, fails) = self.flight.pop_front().unwrap();
        if fails {
            self.failed.get_or_insert(DevError::Io(5));
        } else {
            self.disk.write(lba, &buf).unwrap();
        }
        buf
    }

    fn idle(&self) -> Result<(), DevError> {
        match self.flight.is_empty() {
            true => Ok(()),
            false => Err(DevError::Io(99)),
        }
    }
}

impl BlockDevice for QueueDisk {
    fn sectors(&self) -> u64 {
        self.disk.sectors()
    }

    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.idle()?;
        self.disk.read(lba, buf)
    }

    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError> {
        self.direct.push(lba);
        self.disk.write(lba, buf)
    }

    fn flush(&mut self) -> Result<(), DevError> {
        self.idle()?;
        self.disk.flush()
    }

    fn write_queued(&mut self, lba: u64, buf: Vec<u8>) -> Result<Option<Vec<u8>>, DevError> {
        assert!(buf.len() <= BATCH && buf.len().is_multiple_of(512));
        let back = (self.flight.len() >= 3).then(|| self.complete());
        self.flight
            .push_back((lba, buf, self.fail_at == Some(self.queued)));
        self.queued += 1;
        match self.failed.take() {
            Some(e) => Err(e),
            None => Ok(back),
        }
    }

    fn wait(&mut self) -> Result<(), DevError> {
        while !self.flight.is_empty() {
            self.complete();
        }
        self.failed.take().map_or(Ok(()), Err)
    }
}

/// Random pages, raw: 24 batches of page data.
fn memory() -> Mem {
    (0..24 * BATCH / PAGE)
        .map(|i| (i % 5 != 0).then(|| page_of(2, i as u64)))
        .collect()
}

#[test]
fn queued_batches_land_before_the_commit_and_read_back() {
    let mem = memory();
    let mut dev = QueueDisk::new(None);
    let mut store = Store::format(&mut dev, 1, 8).unwrap();
    let all: Vec<usize> = (0..mem.len()).collect();
    save(&mut store, &mut dev, "q", None, &mem, &all, b"state").unwrap();
    assert!(dev.queued >= 15, "{} batches queued", dev.queued);
    // Only the TOC's mirror may still be in flight: the image and the first copy are
    // durable without it (a power loss now loses only the mirror).
    assert!(
        dev.flight.len() <= 1,
        "{} writes in flight",
        dev.flight.len()
    );
    let mut lost = dev.disk.clone();
    lost.lose_unflushed(|_| false);
    let durable = Store::open(&mut lost).unwrap();
    check_restore(&durable.image(&mut lost, "q").unwrap(), &mut lost, &mem);
    dev.wait().unwrap();
    let mut disk = dev.disk;
    let store = Store::open(&mut disk).unwrap();
    assert_eq!(store.toc_copies_valid(), [true, true]);
    let img = store.image(&mut disk, "q").unwrap();
    check_restore(&img, &mut disk, &mem);
}

/// A commit's mirror is queued and may never land (or land torn): the next commit on the
/// same `Store` overwrites that slot first and leaves the flushed copy alone until the new
/// table is durable, so at every instant one copy holds the old or the new table.
#[test]
fn the_next_commit_overwrites_the_unconfirmed_mirror_first() {
    let mem = memory();
    let mut dev = QueueDisk::new(None);
    let mut store = Store::format(&mut dev, 1, 8).unwrap();
    let all: Vec<usize> = (0..mem.len()).collect();
    let mut slots = Vec::new();
    for name in ["a", "b", "c"] {
        save(
            &mut store,
            &mut dev,
            name,
            None,
            &mem,
            &all[..300],
            b"state",
        )
        .unwrap();
        // The commit's first copy is its last write made at once; the mirror is queued.
        let first = *dev.direct.last().unwrap();
        let (mirror, torn, _) = dev.flight.pop_back().expect("the mirror is queued");
        assert_ne!(first, mirror);
        // The mirror never lands whole: its first sector is garbage.
        let mut garbage = torn[..512].to_vec();
        garbage[100] ^= 0xff;
        dev.disk.write(mirror, &garbage).unwrap();
        slots.push((first, mirror));
        let mut now = dev.disk.clone();
        let s = Store::open(&mut now).unwrap();
        assert_eq!(s.list().last().map(|e| e.name.as_str()), Some(name));
    }
    // Each commit wrote first the slot the one before left unconfirmed.
    assert_eq!(slots[1].0, slots[0].1, "{slots:?}");
    assert_eq!(slots[2].0, slots[1].1, "{slots:?}");
}

#[test]
fn a_queued_batch_failing_late_fails_the_save_and_commits_nothing() {
    let mem = memory();
    for fail_at in [0, 7, 17] {
        let mut dev = QueueDisk::new(Some(fail_at));
        let mut store = Store::format(&mut dev, 1, 8).unwrap();
        let all: Vec<usize> = (0..mem.len()).collect();
        let r = save(&mut store, &mut dev, "q", None, &mem, &all, b"state");
        assert!(
            matches!(
                r,
                Err(Error::Device(DevError::Io(5))) | Err(Error::WriterFailed)
            ),
            "batch {fail_at}: {r:?}"
        );
        let mut disk = dev.disk;
        let store = Store::open(&mut disk).unwrap();
        assert_eq!(
            store.entry("q").err(),
            Some(Error::NotFound),
            "batch {fail_at}"
        );
    }
}
