//! `bench migrate` and `bench reclaim`: migration next to a memcpy of the
//! same frames, reclaim next to an LZ4 compression of the same pages, in
//! interleaved pairs (`pairs`) on the same machine in the same run.

use crate::arch::timer::ticks_to_us as us;
use crate::console::error::CmdError;
use crate::console::pairs::{interleave, median, PAIRS};
use crate::console::reply::Reply;
use crate::mm::frames::{self, PAGE_SIZE};
use crate::mm::glue::{rmap, HypFrames, HypVms, STORE};
use crate::mm::memctl::{self, Report};
use crate::vm::Vm;
use alloc::sync::Arc;
use alloc::vec::Vec;
use rmap::{Ipa, Pa, Pfn};

/// The warm-up migration's batch: less than a folio's 512 frames.
const SPLIT_BATCH: usize = 256;

/// MiB/s for `pages` in `ticks`.
fn mibs(pages: u64, ticks: u64) -> u64 {
    ((pages * PAGE_SIZE * crate::arch::timer::frequency()) / ticks.max(1)) >> 20
}

/// A bench VM with `pages` touched: page i holds a compressible pattern
/// (a per-page 16-byte value repeated, plus a counter every 64 bytes). Its
/// first touches map 2 MiB blocks; unless `blocks`, they are split first.
fn bench_vm(pages: u64, blocks: bool) -> Result<Arc<Vm>, CmdError> {
    let size = (pages * PAGE_SIZE).next_multiple_of(2 << 20);
    let vm = Vm::create("bench", 1, size)?;
    let mut page = [0u64; PAGE_SIZE as usize / 8];
    for i in 0..pages {
        for (j, w) in page.iter_mut().enumerate() {
            *w = if j % 8 == 0 {
                (i << 20) | j as u64
            } else {
                i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (j as u64 & 1)
            };
        }
        // SAFETY: any u64 array is valid as bytes.
        let bytes = unsafe { core::slice::from_raw_parts(page.as_ptr().cast::<u8>(), 4096) };
        let ipa = Ipa::new(vm.mem.ram.base) + i * PAGE_SIZE;
        if crate::mm::glue::write_guest(&vm.mem, ipa, bytes).is_err() {
            vm.stop(0);
            return Err(CmdError::Bench("out of memory filling the bench VM"));
        }
    }
    if !blocks {
        // Split every block mapping (not part of what is measured): rmap
        // moves a folio whole only when one batch holds all of it, so
        // batches smaller than a folio (and not `memctl::migrate_pfns`,
        // which gives whole folios batches of their own) move its frames
        // one by one, splitting each block.
        let mut out = Vec::new();
        for chunk in frames_of(&vm, pages).chunks(SPLIT_BATCH) {
            rmap().migrate_frames(&HypVms, &HypFrames, chunk, &mut out);
        }
    }
    Ok(vm)
}

/// The frames of the bench VM's first `pages` pages, now.
fn frames_of(vm: &Vm, pages: u64) -> Vec<Pfn> {
    let start = Ipa::new(vm.mem.ram.base);
    memctl::vm_frames(&vm.mem, start, start + pages * PAGE_SIZE, usize::MAX)
}

/// Fresh frames for the copy of `n` pages, taken as the migration takes its
/// own: aligned 2 MiB runs when it moves blocks, single frames otherwise.
/// (Under TCG the two kinds were not equally fast to write: in one run a
/// copy into single frames took 40 us a page, into runs 6.)
fn copy_targets(n: usize, blocks: bool) -> Vec<Pa> {
    let run = rmap::folio::FOLIO_PAGES as usize;
    if !blocks {
        return (0..n).map_while(|_| frames::get().alloc()).collect();
    }
    let mut dst = Vec::with_capacity(n);
    while dst.len() < n {
        let Some(pa) = frames::get().alloc_contiguous(run) else {
            break;
        };
        dst.extend((0..run as u64).map(|i| pa + i * PAGE_SIZE));
    }
    dst
}

/// Ticks to copy `pfns` into fresh frames with the copy migration uses.
fn time_copy(pfns: &[Pfn], blocks: bool) -> Result<u64, CmdError> {
    let dst = copy_targets(pfns.len(), blocks);
    let release = |dst: Vec<Pa>| dst.into_iter().for_each(|pa| frames::get().free(pa));
    if dst.len() < pfns.len() {
        release(dst);
        return Err(CmdError::Bench("no frames for the memcpy"));
    }
    let t0 = crate::arch::timer::now();
    for (&src, &d) in pfns.iter().zip(&dst) {
        // SAFETY: `src` is a frame of the idle bench VM (nothing writes it),
        // `d` one we allocated.
        unsafe { frames::copy_frame(d, src.pa()) };
    }
    let ticks = crate::arch::timer::now() - t0;
    release(dst);
    Ok(ticks)
}

/// Ticks to migrate every frame of the bench VM's `pages`, in `batch`es.
fn time_migrate(vm: &Vm, pages: u64, batch: usize) -> Result<u64, CmdError> {
    let pfns = frames_of(vm, pages);
    let mut r = Report::default();
    let t0 = crate::arch::timer::now();
    memctl::migrate_pfns(&pfns, batch, &mut r);
    let ticks = crate::arch::timer::now() - t0;
    if r.done != pfns.len() as u64 {
        return Err(CmdError::BenchShort {
            what: "migrated",
            done: r.done,
            of: pfns.len() as u64,
        });
    }
    Ok(ticks)
}

/// Writes and frees the lowest `frames` free frames, where the copy's and
/// the migration's new frames come from: a frame the host (QEMU) never
/// touched costs a host page fault on its first write, which must not land
/// in one side of a pair (it made the copy 10x slower in one run).
fn warm_free_frames(frames: usize) {
    let taken: Vec<Pa> = (0..frames).map_while(|_| frames::get().alloc()).collect();
    for &pa in &taken {
        // SAFETY: a frame we just allocated; nothing else can reach it.
        unsafe { frames::zero_frame(pa) };
    }
    taken.into_iter().for_each(|pa| frames::get().free(pa));
}

/// Frames warmed before `bench migrate`: the copy's, the migration's new
/// runs and room for the allocator's alignment (32 MiB).
const WARM_FRAMES: usize = 8192;

/// `bench migrate <mappers> <pages> <batch> [blocks]`.
pub fn migrate(
    mappers: u64,
    pages: u64,
    batch: usize,
    blocks: bool,
    out: &mut Reply,
) -> Result<(), CmdError> {
    let vm = bench_vm(pages, blocks)?;
    warm_free_frames(WARM_FRAMES.max(4 * pages as usize));
    let mut snaps = Vec::new();
    let result = (|| {
        for _ in 1..mappers {
            let kind = crate::vm::fork::ForkKind::Snapshot;
            snaps.push(crate::vm::fork::fork(&vm, None, kind)?);
        }
        let p = interleave(
            PAIRS,
            || time_copy(&frames_of(&vm, pages), blocks),
            || time_migrate(&vm, pages, batch),
        )?;
        let first = frames_of(&vm, 1);
        let first = first
            .first()
            .ok_or(CmdError::Bench("the bench VM has no frames"))?;
        let mapcount = rmap().frames().mapcount(*first);
        let (copy, mig) = (median(&p.base), median(&p.subject));
        let ratio = p.ratio();
        crate::say!(
            out,
            "bench migrate: mappers {mappers} (mapcount {mapcount}), batch {batch}, {pages} pages{}, medians: migrate {} us ({} MiB/s), memcpy {} us ({} MiB/s), migrate/memcpy throughput = {ratio}",
            if blocks { " in blocks" } else { "" },
            us(mig),
            mibs(pages, mig),
            us(copy),
            mibs(pages, copy),
        );
        out.set("ratio_x100", ratio.median);
        Ok(())
    })();
    snaps.into_iter().for_each(|s| s.stop(0));
    vm.stop(0);
    result
}

/// Ticks to compress every page of `pfns` with the store's LZ4; sets
/// `bytes` to the compressed size.
fn time_lz4(pfns: &[Pfn], bytes: &mut usize) -> u64 {
    let mut buf = [0u8; crate::mm::store::MAX_COMPRESSED];
    let mut total = 0;
    let t0 = crate::arch::timer::now();
    for &pfn in pfns {
        // SAFETY: a frame of the idle bench VM, identity mapped.
        let data =
            unsafe { core::slice::from_raw_parts(pfn.pa().raw() as *const u8, PAGE_SIZE as usize) };
        total += crate::mm::store::compress(data, &mut buf);
    }
    let ticks = crate::arch::timer::now() - t0;
    *bytes = total;
    ticks
}

/// Ticks to reclaim every frame of the bench VM's `pages`, then faults them
/// back in (timed into `fault`) so the next pair has frames to reclaim.
fn time_reclaim(vm: &Vm, pages: u64, batch: usize, fault: &mut Vec<u64>) -> Result<u64, CmdError> {
    let pfns = frames_of(vm, pages);
    let mut out = Vec::with_capacity(batch);
    let mut done = 0;
    let t0 = crate::arch::timer::now();
    for chunk in pfns.chunks(batch) {
        out.clear();
        rmap().reclaim_frames(&HypVms, &HypFrames, &STORE, chunk, &mut out);
        done += out.iter().filter(|r| r.is_ok()).count();
    }
    let ticks = crate::arch::timer::now() - t0;
    if done != pfns.len() {
        return Err(CmdError::BenchShort {
            what: "reclaimed",
            done: done as u64,
            of: pfns.len() as u64,
        });
    }
    fault.push(time_fault_in(vm, pages)?);
    Ok(ticks)
}

/// Counter ticks to fault `pages` reclaimed pages of `vm` back in (swap-ins).
fn time_fault_in(vm: &Vm, pages: u64) -> Result<u64, CmdError> {
    let t0 = crate::arch::timer::now();
    for i in 0..pages {
        crate::mm::glue::fault(
            &vm.mem,
            Ipa::new(vm.mem.ram.base) + i * PAGE_SIZE,
            crate::mm::glue::Access::Read,
            crate::mm::glue::FaultKind::Translation,
        )
        .map_err(|_| CmdError::Bench("fault-in failed"))?;
    }
    Ok(crate::arch::timer::now() - t0)
}

/// `bench reclaim <pages> <batch>`.
pub fn reclaim(pages: u64, batch: usize, reply: &mut Reply) -> Result<(), CmdError> {
    let vm = bench_vm(pages, false)?;
    let result = (|| {
        let (mut bytes, mut fault) = (0, Vec::new());
        let p = interleave(
            PAIRS,
            || Ok(time_lz4(&frames_of(&vm, pages), &mut bytes)),
            || time_reclaim(&vm, pages, batch, &mut fault),
        )?;
        let (lz4, rec) = (median(&p.base), median(&p.subject));
        let ratio = p.ratio();
        crate::say!(
            reply,
            "bench reclaim: batch {batch}, {pages} pages ({bytes} bytes compressed), medians: reclaim {} us ({} MiB/s), lz4 {} us ({} MiB/s), reclaim/lz4 throughput = {ratio}; fault-in {} ns/page",
            us(rec),
            mibs(pages, rec),
            us(lz4),
            mibs(pages, lz4),
            us(median(&fault)) * 1000 / pages
        );
        reply.set("ratio_x100", ratio.median);
        Ok(())
    })();
    vm.stop(0);
    result
}
