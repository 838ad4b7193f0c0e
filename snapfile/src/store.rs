//! The store: superblock, the two TOC copies, space allocation, commit and delete.

use alloc::vec::Vec;

use crate::codec::{read_bytes, read_sector};
use crate::dev::{BlockDevice, SECTOR};
use crate::error::{Error, Section};
use crate::superblock::Superblock;
use crate::toc::{Entry, Toc};
use crate::types::Name;

/// An open store: its geometry and the current table of contents, in memory. It does not
/// own the device: each call that touches the disk takes it, so the caller decides how the
/// device is shared (hyp: behind its driver's lock).
#[derive(Clone, Debug)]
pub struct Store {
    pub(crate) sb: Superblock,
    pub(crate) toc: Toc,
    /// The generation each TOC copy holds, `None` where a copy did not decode.
    copies: [Option<u64>; 2],
}

impl Store {
    /// Formats `dev` as an empty store with room for `max_entries` snapshots (at most
    /// [`crate::MAX_ENTRIES`]). `store_id` should differ from any earlier format of the same
    /// device (hyp: the counter at boot), so stale TOC copies of an older store are refused.
    /// The superblock is written last: a crash before it leaves the old one (or none).
    pub fn format<D: BlockDevice>(
        dev: &mut D,
        store_id: u64,
        max_entries: u32,
    ) -> Result<Self, Error> {
        if max_entries == 0 || max_entries > crate::MAX_ENTRIES {
            return Err(Error::TooLarge);
        }
        let sb = Superblock::new(dev.sectors(), store_id, max_entries);
        if sb.data_start() >= sb.device_sectors {
            return Err(Error::Truncated {
                expected: sb.data_start() + 1,
                found: sb.device_sectors,
            });
        }
        let toc = Toc {
            generation: 1,
            next_seq: 1,
            entries: Vec::new(),
        };
        let buf = toc.encode(&sb);
        dev.write(sb.toc_lba(0), &buf)?;
        dev.write(sb.toc_lba(1), &buf)?;
        dev.flush()?;
        dev.write(0, &sb.encode())?;
        dev.flush()?;
        Ok(Self {
            sb,
            toc,
            copies: [Some(1), Some(1)],
        })
    }

    /// Opens the store on `dev`: the superblock, then both TOC copies; the valid copy with
    /// the higher generation is current. Reads only.
    pub fn open<D: BlockDevice>(dev: &mut D) -> Result<Self, Error> {
        let found = dev.sectors();
        if found == 0 {
            return Err(Error::Truncated { expected: 1, found });
        }
        let sb = Superblock::decode(&read_sector(dev, 0)?)?;
        if found < sb.device_sectors {
            return Err(Error::Truncated {
                expected: sb.device_sectors,
                found,
            });
        }
        let len = sb.toc_sectors as usize * SECTOR;
        let mut copies = [None, None];
        let mut best: Option<Toc> = None;
        let mut first_err = None;
        for (slot, gen) in copies.iter_mut().enumerate() {
            let decoded = read_bytes(dev, sb.toc_lba(slot) * SECTOR as u64, len)
                .and_then(|b| Toc::decode(&b, &sb));
            match decoded {
                Ok(t) => {
                    *gen = Some(t.generation);
                    if best.as_ref().is_none_or(|b| t.generation > b.generation) {
                        best = Some(t);
                    }
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match best {
            Some(toc) => Ok(Self { sb, toc, copies }),
            None => Err(first_err.unwrap_or(Error::Corrupt(Section::Toc))),
        }
    }

    /// Every snapshot, oldest first.
    pub fn list(&self) -> &[Entry] {
        &self.toc.entries
    }

    /// Whether each TOC copy decoded at open (or was written since). One bad copy loses
    /// nothing (the other is a mirror, or the older state a crash legitimately left); the
    /// next commit rewrites it.
    pub fn toc_copies_valid(&self) -> [bool; 2] {
        [self.copies[0].is_some(), self.copies[1].is_some()]
    }

    /// The first sector after the superblock and both TOC copies: what [`Store::open`]
    /// reads lies below it, and no image does (a cache of an open store is stale only once
    /// something writes there).
    pub fn metadata_end(&self) -> u64 {
        self.sb.data_start()
    }

    /// The device size the store uses, in sectors.
    pub fn device_sectors(&self) -> u64 {
        self.sb.device_sectors
    }

    /// The entry named `name`.
    pub fn entry(&self, name: &str) -> Result<&Entry, Error> {
        self.toc.find(&Name::new(name)?).ok_or(Error::NotFound)
    }

    /// The free gaps between extents, as (first sector, sectors), in disk order.
    pub fn gaps(&self) -> Vec<(u64, u64)> {
        let mut used: Vec<(u64, u64)> = self
            .toc
            .entries
            .iter()
            .map(|e| (e.start, e.sectors))
            .collect();
        used.sort_unstable();
        let mut gaps = Vec::new();
        let mut at = self.sb.data_start();
        for (start, len) in used
            .into_iter()
            .chain(core::iter::once((self.sb.device_sectors, 0)))
        {
            if start > at {
                gaps.push((at, start - at));
            }
            at = at.max(start + len);
        }
        gaps
    }

    /// Free sectors in all.
    pub fn free_sectors(&self) -> u64 {
        self.gaps().iter().map(|g| g.1).sum()
    }

    /// The gap to write an image of at most `bound` sectors into: the first that holds it;
    /// else the largest (the writer fails with `NoSpace` if the image outgrows it).
    pub(crate) fn place(&self, bound: u64) -> (u64, u64) {
        let gaps = self.gaps();
        let largest = gaps.iter().copied().max_by_key(|g| (g.1, u64::MAX - g.0));
        gaps.iter()
            .copied()
            .find(|g| g.1 >= bound)
            .or(largest)
            .unwrap_or((0, 0))
    }

    /// Deletes `name`, freeing its extent. Refused for a parent of another snapshot.
    pub fn delete<D: BlockDevice>(&mut self, dev: &mut D, name: &str) -> Result<(), Error> {
        let e = *self.entry(name)?;
        if self
            .toc
            .entries
            .iter()
            .any(|o| o.parent.is_some_and(|p| p.1 == e.seq))
        {
            return Err(Error::IsParent);
        }
        let mut toc = self.toc.clone();
        toc.entries.retain(|o| o.seq != e.seq);
        // The previous commit's mirror may be unflushed: `commit` needs it durable.
        dev.flush()?;
        self.commit(dev, toc)
    }

    /// Makes `toc` current: the copy not known to hold the newest generation is written
    /// and flushed, then the other is written as its mirror, queued and not waited for
    /// (the writer's next request completes it, the next flush makes it durable). At every
    /// instant one copy decodes to the old or the new table, so a crash loses at most this
    /// commit; one flush per commit, and the commit returns once the table is durable.
    ///
    /// The mirror's slot is not known valid until the store is opened again: its write may
    /// still be in flight, or fail later. So the next commit on this `Store` overwrites
    /// that slot first and leaves the flushed one alone until the new table is durable.
    ///
    /// The caller has flushed since its last write (the writer's image flush, `delete`'s):
    /// on a store just opened, both copies may decode, one of them possibly an earlier
    /// commit's unflushed mirror; that flush makes the copy this commit does not overwrite
    /// first durable, so it survives a crash during the first write.
    pub(crate) fn commit<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        mut toc: Toc,
    ) -> Result<(), Error> {
        toc.generation = self.toc.generation + 1;
        let buf = toc.encode(&self.sb);
        let first = match self.copies {
            [Some(a), Some(b)] => usize::from(a > b),
            [None, _] => 0,
            [Some(_), None] => 1,
        };
        // Until the write and flush complete the copy may be torn: forget it.
        self.copies[first] = None;
        dev.write(self.sb.toc_lba(first), &buf)?;
        dev.flush()?;
        self.copies[first] = Some(toc.generation);
        // The new table is durable: it is current whatever becomes of the mirror.
        self.toc = toc;
        let mirror = 1 - first;
        self.copies[mirror] = None;
        let lba = self.sb.toc_lba(mirror);
        match buf.len() <= crate::BATCH {
            true => drop(dev.write_queued(lba, buf)?),
            false => dev.write(lba, &buf)?,
        }
        Ok(())
    }
}
