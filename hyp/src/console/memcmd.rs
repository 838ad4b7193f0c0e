//! Console commands for moving and reclaiming guest memory (`memctl.rs`),
//! their `stats` lines, and their benchmarks (`bench migrate`, `bench
//! reclaim`), run side by side with a memcpy / an LZ4 compression of the same
//! frames in the same run.

use crate::arch::timer::ticks_to_us as us;
use crate::console::error::CmdError;
use crate::mm::frames::{self, PAGE_SIZE};
use crate::mm::glue::{rmap, HypFrames, HypVms, STORE};
use crate::mm::memctl::{self, Report};
use crate::vm::Vm;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use hypcmd::{Command, PageRange};
use rmap::{Ipa, Pa, Pfn};

/// Runs a memory command (`cmd.rs` passes every command it does not run
/// itself). Arguments are already checked by `hypcmd`; what is checked here
/// is the machine: the VM exists, the range is its RAM or the host's.
pub fn run(cmd: Command) -> Result<(), CmdError> {
    match cmd {
        Command::Migrate { vm, range, batch } => {
            return migrate(crate::console::cmd::vm(vm)?, range, batch)
        }
        Command::Evacuate { range, batch } => {
            let (start, end) = ram_range(range)?;
            let (r, left) = memctl::evacuate(start, end, batch.unwrap_or(memctl::BATCH));
            crate::println!(
                "evacuate {start:#x}..{end:#x}: moved {r}; left in use: {} ({} guest frames busy, {} unmovable); offline until `online`",
                left.guest + left.unmovable,
                left.guest,
                left.unmovable
            );
        }
        Command::Online { range } => {
            let (start, end) = ram_range(range)?;
            let n = memctl::online(start, end);
            crate::println!("online {start:#x}..{end:#x}: {n} frames back in the allocator");
        }
        Command::Reclaim { pages, batch } => reclaim(pages, batch.unwrap_or(memctl::BATCH)),
        Command::Chaos {
            secs,
            seed,
            max_vms,
        } => crate::console::chaos::chaos(secs, seed, max_vms),
        Command::Wait { secs } => wait(secs),
        Command::BenchMigrate {
            mappers,
            pages,
            batch,
        } => return bench_migrate(mappers, pages, batch),
        Command::BenchReclaim { pages, batch } => return bench_reclaim(pages, batch),
        other => return Err(CmdError::NotHere(other)),
    }
    Ok(())
}

fn migrate(vm: Arc<Vm>, range: PageRange, batch: Option<usize>) -> Result<(), CmdError> {
    let (start, end) = (range.start(), range.end());
    let ram_end = vm.mem.ram.base.saturating_add(vm.mem.ram.size);
    if start < vm.mem.ram.base || end > ram_end {
        return Err(CmdError::OutsideVmRam {
            vm: vm.id,
            start,
            end,
        });
    }
    let (from, to) = (Ipa::new(start), Ipa::new(end));
    let r = memctl::migrate_vm(&vm.mem, from, to, batch.unwrap_or(memctl::BATCH));
    crate::println!("migrate vm {} {start:#x}..{end:#x}: moved {r}", vm.id);
    Ok(())
}

fn reclaim(pages: u64, batch: usize) {
    let zero0 = STORE.zero_mapped.load(Ordering::Relaxed);
    let (r, scanned, young) = memctl::reclaim(pages, batch);
    let zero = STORE
        .zero_mapped
        .load(Ordering::Relaxed)
        .wrapping_sub(zero0);
    crate::println!(
        "reclaim: reclaimed {r} ({} stored, {zero} zero); scanned {scanned}, {young} referenced kept",
        r.done.saturating_sub(zero)
    );
}

/// Waits until no runnable VM is left, at most `secs`.
fn wait(secs: u64) {
    let ticks = secs.saturating_mul(crate::arch::timer::frequency());
    let deadline = crate::arch::timer::now().saturating_add(ticks);
    while crate::vm::count_runnable() > 0 && crate::arch::timer::now() < deadline {
        core::hint::spin_loop();
    }
    match crate::vm::count_runnable() {
        0 => crate::println!("wait: no runnable VMs left"),
        n => crate::println!("wait: {n} VMs still runnable after {secs} s"),
    }
}

/// The range as `(start, end)` if its first and last pages are host RAM.
fn ram_range(range: PageRange) -> Result<(u64, u64), CmdError> {
    let (start, end) = (range.start(), range.end());
    let f = frames::get();
    if !f.is_ram(start) || !f.is_ram(range.last_page()) {
        return Err(CmdError::NotRam { start, end });
    }
    Ok((start, end))
}

/// MiB/s for `pages` in `ticks`.
fn mibs(pages: u64, ticks: u64) -> u64 {
    ((pages * PAGE_SIZE * crate::arch::timer::frequency()) / ticks.max(1)) >> 20
}

/// A bench VM with `pages` touched: page i holds a compressible pattern
/// (a per-page 16-byte value repeated, plus a counter every 64 bytes).
fn bench_vm(pages: u64) -> Result<Arc<Vm>, CmdError> {
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
        if crate::mm::glue::write_guest(&vm.mem, Ipa::new(vm.mem.ram.base) + i * PAGE_SIZE, bytes)
            .is_err()
        {
            vm.stop(0);
            return Err(CmdError::Bench("out of memory filling the bench VM"));
        }
    }
    Ok(vm)
}

/// Rounds of a side-by-side measurement; each result is the best round.
const BENCH_ROUNDS: usize = 3;

/// Time to copy `pfns` into fresh frames with the copy migration uses.
fn time_copy(pfns: &[Pfn]) -> Result<u64, CmdError> {
    let dst: Vec<Pa> = (0..pfns.len())
        .map_while(|_| frames::get().alloc())
        .collect();
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

fn bench_migrate(mappers: u64, pages: u64, batch: usize) -> Result<(), CmdError> {
    let vm = bench_vm(pages)?;
    let mut snaps = Vec::new();
    let result = (|| {
        for _ in 1..mappers {
            snaps.push(crate::vm::fork::fork(
                &vm,
                None,
                crate::vm::fork::ForkKind::Snapshot,
            )?);
        }
        let end = Ipa::new(vm.mem.ram.base) + pages * PAGE_SIZE;
        // Split any block mapping first (not part of what is measured).
        let pfns = memctl::vm_frames(&vm.mem, Ipa::new(vm.mem.ram.base), end, usize::MAX);
        let mut warm = Report::default();
        memctl::migrate_pfns(&pfns, 4096, &mut warm);
        // Best of three rounds, each a memcpy of the frames into fresh frames
        // next to their migration (QEMU's speed drifts within a run).
        let (mut copy, mut mig, mut pfns) = (u64::MAX, u64::MAX, Vec::new());
        for _ in 0..BENCH_ROUNDS {
            pfns = memctl::vm_frames(&vm.mem, Ipa::new(vm.mem.ram.base), end, usize::MAX);
            copy = copy.min(time_copy(&pfns)?);
            let mut r = Report::default();
            let t0 = crate::arch::timer::now();
            memctl::migrate_pfns(&pfns, batch, &mut r);
            mig = mig.min(crate::arch::timer::now() - t0);
            if r.done != pfns.len() as u64 {
                return Err(CmdError::BenchShort {
                    what: "migrated",
                    done: r.done,
                    of: pfns.len() as u64,
                });
            }
        }
        let first = memctl::vm_frames(&vm.mem, Ipa::new(vm.mem.ram.base), end, 1);
        let first = first
            .first()
            .ok_or(CmdError::Bench("the bench VM has no frames"))?;
        let mapcount = rmap().frames().frame(*first).mapcount();
        crate::println!(
            "bench migrate: mappers {mappers} (mapcount {mapcount}), batch {batch}, {} pages, best of {BENCH_ROUNDS}: migrate {} us ({} MiB/s), memcpy {} us ({} MiB/s), migrate/memcpy throughput = {}.{:02}x",
            pfns.len(),
            us(mig),
            mibs(pfns.len() as u64, mig),
            us(copy),
            mibs(pfns.len() as u64, copy),
            copy / mig.max(1),
            copy * 100 / mig.max(1) % 100
        );
        Ok(())
    })();
    snaps.into_iter().for_each(|s| s.stop(0));
    vm.stop(0);
    result
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

fn bench_reclaim(pages: u64, batch: usize) -> Result<(), CmdError> {
    let vm = bench_vm(pages)?;
    let result = (|| {
        let end = Ipa::new(vm.mem.ram.base) + pages * PAGE_SIZE;
        let mut warm = Report::default();
        let pfns = memctl::vm_frames(&vm.mem, Ipa::new(vm.mem.ram.base), end, usize::MAX);
        memctl::migrate_pfns(&pfns, 4096, &mut warm); // splits blocks
        let pfns = memctl::vm_frames(&vm.mem, Ipa::new(vm.mem.ram.base), end, usize::MAX);
        let mut buf = [0u8; crate::mm::store::MAX_COMPRESSED];
        let mut bytes = 0;
        let t0 = crate::arch::timer::now();
        for &pfn in &pfns {
            // SAFETY: a frame of the idle bench VM, identity mapped.
            let data = unsafe {
                core::slice::from_raw_parts(pfn.pa().raw() as *const u8, PAGE_SIZE as usize)
            };
            bytes += crate::mm::store::compress(data, &mut buf);
        }
        let lz4 = crate::arch::timer::now() - t0;
        let mut out = Vec::with_capacity(batch);
        let mut done = 0;
        let t0 = crate::arch::timer::now();
        for chunk in pfns.chunks(batch) {
            out.clear();
            rmap().reclaim_frames(&HypVms, &HypFrames, &STORE, chunk, &mut out);
            done += out.iter().filter(|r| r.is_ok()).count();
        }
        let rec = crate::arch::timer::now() - t0;
        if done != pfns.len() {
            return Err(CmdError::BenchShort {
                what: "reclaimed",
                done: done as u64,
                of: pfns.len() as u64,
            });
        }
        let fault = time_fault_in(&vm, pages)?;
        crate::println!(
            "bench reclaim: batch {batch}, {} pages ({} bytes compressed): reclaim {} us ({} MiB/s), lz4 {} us ({} MiB/s), reclaim/lz4 throughput = {}.{:02}x; fault-in {} ns/page",
            pfns.len(),
            bytes,
            us(rec),
            mibs(pfns.len() as u64, rec),
            us(lz4),
            mibs(pfns.len() as u64, lz4),
            lz4 / rec.max(1),
            lz4 * 100 / rec.max(1) % 100,
            us(fault) * 1000 / pages
        );
        Ok(())
    })();
    vm.stop(0);
    result
}
