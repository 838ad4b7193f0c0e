//! The disk commands (issue 17): `disk` (what the disk is), `disk sum` (a
//! checksum of sectors read from it, so a test can check the read path
//! against the host's own computation), `disk fill` (a seeded pattern the
//! host can recompute, to check the write path) and `bench disk` (raw
//! sequential throughput, the baseline a snapshot save is compared with).
//! The device is `dev::blk`.

use crate::arch::timer;
use crate::console::error::CmdError;
use crate::console::pairs::median;
use crate::console::reply::Reply;
use crate::dev::blk::{self, Disk, MAX_REQUEST, SECTOR_SIZE};
use alloc::vec::Vec;
use hypcmd::Command;

/// Sectors in one virtio request (`bench disk` issues exactly these).
const CHUNK_SECTORS: u64 = (MAX_REQUEST / SECTOR_SIZE) as u64;
/// Sectors per `Disk` call of `disk sum` and `disk fill`: several virtio
/// requests, so these commands also exercise the driver's splitting.
const CALL_SECTORS: u64 = 4 * CHUNK_SECTORS;

/// Runs a disk command.
pub fn run(cmd: Command, r: &mut Reply) -> Result<(), CmdError> {
    let disk = blk::get().ok_or(CmdError::NoDisk)?;
    match cmd {
        Command::Disk => info(disk, r),
        Command::DiskSum { lba, sectors } => return sum(disk, lba, sectors, r),
        Command::DiskFill { lba, sectors, seed } => return fill(disk, lba, sectors, seed, r),
        Command::BenchDisk { mib, passes, at } => return bench(disk, mib, passes, at, r),
        other => return Err(CmdError::NotHere(other)),
    }
    Ok(())
}

fn info(disk: &Disk, r: &mut Reply) {
    let sectors = disk.capacity_sectors();
    let bytes = sectors * SECTOR_SIZE as u64;
    crate::say!(
        r,
        "disk: {sectors} sectors of {SECTOR_SIZE} bytes ({} MiB), {}, virtio-blk at {:#x}",
        bytes >> 20,
        if disk.readonly() {
            "read-only"
        } else {
            "read-write"
        },
        disk.base()
    );
    r.set("sectors", sectors);
    r.set("sector_size", SECTOR_SIZE as u64);
    r.set("bytes", bytes);
    r.set("readonly", disk.readonly());
    match disk.waits() {
        Some((woken, polled)) => {
            crate::say!(
                r,
                "  waits for the device: {woken} ended by its interrupt, {polled} by the poll"
            );
            r.set("waits_woken", woken);
            r.set("waits_polled", polled);
        }
        None => crate::say!(r, "  waits for the device: it has no interrupt (they spin)"),
    }
}

/// A zeroed buffer of `bytes`, or an error instead of the heap's abort.
fn buffer(bytes: usize) -> Result<Vec<u8>, CmdError> {
    let mut buf = Vec::new();
    buf.try_reserve_exact(bytes)
        .map_err(|_| CmdError::Bench("out of heap for a disk buffer"))?;
    buf.resize(bytes, 0);
    Ok(buf)
}

/// The pieces covering `sectors` from `lba`: (first sector, sectors), at
/// most `size` each.
fn chunks(lba: u64, sectors: u64, size: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..sectors.div_ceil(size)).map(move |i| {
        let at = i * size;
        (lba + at, size.min(sectors - at))
    })
}

/// Refuses a write over sectors a loaded VM may still read pages from (its
/// image's, or a parent's): the bytes it would read meanwhile fail their
/// checksums, and that VM stops. `bench disk` puts its region back, but not
/// before such a read. Checked after [`check_range`].
fn check_unread(lba: u64, sectors: u64) -> Result<(), CmdError> {
    match crate::persist::load::reader_of_sectors(lba, sectors) {
        Some((vm, name)) => Err(CmdError::DiskInUse { vm, name }),
        None => Ok(()),
    }
}

/// Refuses a range past the end before any I/O (and before `lba + sectors`
/// can overflow in `chunks`).
fn check_range(disk: &Disk, lba: u64, sectors: u64) -> Result<(), CmdError> {
    let capacity = disk.capacity_sectors();
    match lba.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(CmdError::Disk(blk::DiskError::PastEnd {
            lba,
            sectors,
            capacity,
        })),
    }
}

/// FNV-1a, 64-bit: simple enough for a test to recompute independently.
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash = (hash ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    hash
}

/// FNV-1a 64's offset basis (its hash of nothing).
const FNV_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

fn sum(disk: &Disk, lba: u64, sectors: u64, r: &mut Reply) -> Result<(), CmdError> {
    check_range(disk, lba, sectors)?;
    let mut buf = buffer(CALL_SECTORS as usize * SECTOR_SIZE)?;
    let mut hash = FNV_BASIS;
    for (at, n) in chunks(lba, sectors, CALL_SECTORS) {
        let part = &mut buf[..n as usize * SECTOR_SIZE];
        disk.read(at, part)?;
        hash = fnv1a(hash, part);
    }
    crate::say!(r, "disk sum {lba} {sectors}: fnv1a64 = {hash:#018x}");
    r.set("fnv1a64", alloc::format!("{hash:#018x}"));
    Ok(())
}

/// The fill pattern: the little-endian `u64` at byte `8 * k` of the disk is
/// `splitmix64(seed ^ k)` (docs/TESTING.md), so any sector's bytes depend on
/// where it is.
fn pattern_word(seed: u64, k: u64) -> u64 {
    let mut z = (seed ^ k).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill(disk: &Disk, lba: u64, sectors: u64, seed: u64, r: &mut Reply) -> Result<(), CmdError> {
    check_range(disk, lba, sectors)?;
    check_unread(lba, sectors)?;
    let mut buf = buffer(CALL_SECTORS as usize * SECTOR_SIZE)?;
    for (at, n) in chunks(lba, sectors, CALL_SECTORS) {
        let part = &mut buf[..n as usize * SECTOR_SIZE];
        let first_word = at * (SECTOR_SIZE as u64 / 8);
        for (k, word) in part.chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&pattern_word(seed, first_word + k as u64).to_le_bytes());
        }
        disk.write(at, part)?;
    }
    disk.flush()?;
    crate::say!(r, "disk fill {lba} {sectors} {seed}: written and flushed");
    Ok(())
}

/// `bench disk <mib> [passes] [at <lba>]`: `passes` (default 5) passes of a
/// sequential write of `mib` MiB from `lba`, or of the disk's last `mib` MiB
/// ([`region`]; then a flush: a save flushes
/// too) and a sequential read of it, in [`MAX_REQUEST`] requests, as a save
/// would write. One pass is the raw half of a pair that `bench persist`
/// interleaves with saves. Loses no data: the region is read first and
/// written back at the end, whatever happened.
///
/// What a pass writes is that backup, each word XORed with a pattern naming
/// its sector, pass and place (so a misplaced, stale or torn sector shows
/// when it is read back), and XORed back after: `mib` MiB of distinct bytes
/// at rest in memory, as a VM's pages are when it is saved, and no more
/// heap than the backup. They are written as a save writes, [`blk::MAX_QUEUED`]
/// requests in flight. (One 1 MiB buffer rewritten `mib` times, one request
/// at a time, is served from the host's CPU caches: on this host it
/// measured up to twice the rate of the same bytes from distinct memory.)
fn bench(
    disk: &Disk,
    mib: u64,
    passes: u32,
    at: Option<u64>,
    r: &mut Reply,
) -> Result<(), CmdError> {
    let sectors = mib * (1 << 20) / SECTOR_SIZE as u64;
    let base = region(disk, sectors, at)?;
    check_unread(base, sectors)?;
    if disk.readonly() {
        return Err(CmdError::Disk(blk::DiskError::ReadOnly));
    }
    // The original bytes, in request-sized pieces (no large heap run).
    let mut saved = Vec::new();
    for (at, _) in chunks(base, sectors, CHUNK_SECTORS) {
        let mut piece = buffer(MAX_REQUEST)?;
        disk.read(at, &mut piece)?;
        saved
            .try_reserve(1)
            .map_err(|_| CmdError::Bench("out of heap for the disk backup"))?;
        saved.push(piece);
    }
    let result = run_passes(disk, base, &mut saved, passes);
    // Put the data back even when a pass failed (it may have written).
    let restored = chunks(base, sectors, CHUNK_SECTORS)
        .zip(&saved)
        .try_for_each(|((at, _), piece)| disk.write(at, piece))
        .and_then(|()| disk.flush());
    let lost = saved.iter().any(|p| p.len() != MAX_REQUEST);
    let (write, read) = result?;
    restored?;
    if lost {
        return Err(CmdError::Bench(
            "the device refused a request holding part of the disk's backup: that part was not put back",
        ));
    }
    let (w, rd) = (median(&write), median(&read));
    crate::say!(
        r,
        "bench disk: {mib} MiB in {} KiB requests: disk write = {w} MiB/s, read = {rd} MiB/s (medians of {passes} passes, write includes the flush; min/max write {}/{}, read {}/{})",
        MAX_REQUEST >> 10,
        write.iter().min().unwrap_or(&0),
        write.iter().max().unwrap_or(&0),
        read.iter().min().unwrap_or(&0),
        read.iter().max().unwrap_or(&0),
    );
    r.set("write_mibs", w);
    r.set("read_mibs", rd);
    Ok(())
}

/// MiB/s of each write pass and each read pass over the region `saved`
/// was read from; `saved` is as it was when this returns, on every path.
fn run_passes(
    disk: &Disk,
    base: u64,
    saved: &mut [Vec<u8>],
    passes: u32,
) -> Result<(Vec<u64>, Vec<u64>), CmdError> {
    let mut scratch = buffer(MAX_REQUEST)?;
    let (mut write, mut read) = (Vec::new(), Vec::new());
    for pass in 0..u64::from(passes) {
        stamp_all(saved, pass);
        let rates = run_pass(disk, base, saved, &mut scratch);
        stamp_all(saved, pass);
        let (w, rd) = rates?;
        write.push(w);
        read.push(rd);
    }
    Ok((write, read))
}

/// One timed write pass of the pieces (then the flush) and one timed read
/// pass that checks each piece came back; their MiB/s.
fn run_pass(
    disk: &Disk,
    base: u64,
    pieces: &mut [Vec<u8>],
    scratch: &mut [u8],
) -> Result<(u64, u64), CmdError> {
    let bytes = (pieces.len() * MAX_REQUEST) as u64;
    let write = mibs(bytes, write_pass(disk, base, pieces)?);
    let lbas = chunks(base, pieces.len() as u64 * CHUNK_SECTORS, CHUNK_SECTORS);
    let mut ticks = 0;
    for ((at, _), piece) in lbas.zip(pieces.iter()) {
        scratch.fill(0);
        let t0 = timer::now();
        disk.read(at, scratch)?;
        ticks += timer::now() - t0;
        if let Some(i) = (0..MAX_REQUEST / SECTOR_SIZE).find(|&i| {
            let sector = i * SECTOR_SIZE..(i + 1) * SECTOR_SIZE;
            scratch[sector.clone()] != piece[sector]
        }) {
            return Err(CmdError::DiskVerify { lba: at + i as u64 });
        }
    }
    Ok((write, mibs(bytes, ticks)))
}

/// Writes each piece to its place as a save writes its page data: queued,
/// up to [`blk::MAX_QUEUED`] in flight; then the flush. Its timer ticks. The
/// pieces are back in their slots (matched by address) when this returns,
/// but for one whose request the device refused, which is left empty.
fn write_pass(disk: &Disk, base: u64, pieces: &mut [Vec<u8>]) -> Result<u64, CmdError> {
    let addrs: Vec<usize> = pieces.iter().map(|p| p.as_ptr() as usize).collect();
    let mut back = Vec::new();
    back.try_reserve_exact(pieces.len())
        .map_err(|_| CmdError::Bench("out of heap for the disk bench"))?;
    let lbas = chunks(base, pieces.len() as u64 * CHUNK_SECTORS, CHUNK_SECTORS);
    let t0 = timer::now();
    let mut result = Ok(());
    for ((at, _), piece) in lbas.zip(pieces.iter_mut()) {
        match disk.write_queued(at, core::mem::take(piece)) {
            Ok(done) => back.extend(done),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let (rest, waited) = disk.wait_returning();
    back.extend(rest);
    let result = result.and(waited).and_then(|()| disk.flush());
    let ticks = timer::now() - t0;
    for buf in back {
        if let Some(i) = addrs.iter().position(|&a| a == buf.as_ptr() as usize) {
            pieces[i] = buf;
        }
    }
    result?;
    Ok(ticks)
}

/// Where `bench disk` writes `sectors`: from `at`, or else the end of the
/// disk, 4 KiB aligned. Not the start, where the snapshot store keeps its
/// superblock and TOC: a pass over them would make the next save read them
/// again (`persist::disk` caches them while nothing writes there).
/// `bench persist` passes `at`, the sector its saves' images start at, so
/// the raw half of each pair writes the very sectors the save wrote.
fn region(disk: &Disk, sectors: u64, at: Option<u64>) -> Result<u64, CmdError> {
    let base = at.unwrap_or(disk.capacity_sectors().saturating_sub(sectors) & !7);
    check_range(disk, base, sectors)?;
    Ok(base)
}

/// The bench pattern of a request at `lba` in `pass`: every `u64` names its
/// sector, pass and place, so a misplaced, stale or torn sector shows.
fn bench_word(lba: u64, pass: u64, k: usize) -> u64 {
    (lba << 16) ^ (pass << 8) ^ k as u64 ^ 0x5a5a_0000_0000_0000
}

/// XORs pass `pass`'s pattern into each piece (a second call undoes it).
fn stamp_all(pieces: &mut [Vec<u8>], pass: u64) {
    let lbas = chunks(0, pieces.len() as u64 * CHUNK_SECTORS, CHUNK_SECTORS);
    for ((lba, _), buf) in lbas.zip(pieces.iter_mut()) {
        for (i, sector) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            for (k, word) in sector.chunks_exact_mut(8).enumerate() {
                let w = u64::from_le_bytes((&*word).try_into().unwrap_or_default());
                let x = w ^ bench_word(lba + i as u64, pass, k);
                word.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// MiB/s for `bytes` in `ticks`.
fn mibs(bytes: u64, ticks: u64) -> u64 {
    ((bytes as u128 * timer::frequency() as u128 / ticks.max(1) as u128) >> 20) as u64
}
