//! Console commands for moving and reclaiming guest memory (`memctl.rs`);
//! their benchmarks are `membench`.

use crate::console::error::CmdError;
use crate::console::reply::Reply;
use crate::mm::frames;
use crate::mm::glue::STORE;
use crate::mm::memctl::{self, Report};
use crate::vm::Vm;
use alloc::sync::Arc;
use core::sync::atomic::Ordering;
use hypcmd::{Command, PageRange};

/// Runs a memory command (`cmd.rs` passes every command it does not run
/// itself). Arguments are already checked by `hypcmd`; what is checked here
/// is the machine: the VM exists, the range is its RAM or the host's.
pub fn run(cmd: Command, r: &mut Reply) -> Result<(), CmdError> {
    match cmd {
        Command::Migrate { vm, range, batch } => {
            return migrate(crate::console::cmd::vm(vm)?, range, batch, r)
        }
        Command::Evacuate { range, batch } => return evacuate(range, batch, r),
        Command::Online { range } => {
            let (start, end) = ram_range(range)?;
            let n = memctl::online(start, end);
            crate::say!(
                r,
                "online {start:#x}..{end:#x}: {n} frames back in the allocator"
            );
            r.set("frames", n);
        }
        Command::Reclaim { pages, batch } => reclaim(pages, batch.unwrap_or(memctl::BATCH), r),
        Command::Chaos {
            secs,
            seed,
            max_vms,
        } => crate::console::chaos::chaos(secs, seed, max_vms),
        Command::Wait { secs } => wait(secs, r),
        Command::BenchMigrate {
            mappers,
            pages,
            batch,
            blocks,
        } => return crate::console::membench::migrate(mappers, pages, batch, blocks, r),
        Command::BenchReclaim { pages, batch } => {
            return crate::console::membench::reclaim(pages, batch, r)
        }
        other => return Err(CmdError::NotHere(other)),
    }
    Ok(())
}

/// A memctl report as answer fields.
fn report(r: &mut Reply, rep: &Report) {
    r.set("moved", rep.done);
    r.set("skipped", rep.skipped_total());
    r.set("batches", rep.batches);
}

fn evacuate(range: PageRange, batch: Option<usize>, r: &mut Reply) -> Result<(), CmdError> {
    let (start, end) = ram_range(range)?;
    let (rep, left) = memctl::evacuate(start, end, batch.unwrap_or(memctl::BATCH));
    crate::say!(
        r,
        "evacuate {start:#x}..{end:#x}: moved {rep}; left in use: {} ({} guest frames busy, {} unmovable); offline until `online`",
        left.guest + left.unmovable,
        left.guest,
        left.unmovable
    );
    report(r, &rep);
    r.set("busy", left.guest);
    r.set("unmovable", left.unmovable);
    Ok(())
}

fn migrate(
    vm: Arc<Vm>,
    range: PageRange,
    batch: Option<usize>,
    r: &mut Reply,
) -> Result<(), CmdError> {
    let (start, end) = (range.start(), range.end());
    let ram_end = vm.mem.ram.base.saturating_add(vm.mem.ram.size);
    if start < vm.mem.ram.base || end > ram_end {
        return Err(CmdError::OutsideVmRam {
            vm: vm.id,
            start,
            end,
        });
    }
    let (from, to) = (rmap::Ipa::new(start), rmap::Ipa::new(end));
    let rep = memctl::migrate_vm(&vm.mem, from, to, batch.unwrap_or(memctl::BATCH));
    crate::say!(r, "migrate vm {} {start:#x}..{end:#x}: moved {rep}", vm.id);
    report(r, &rep);
    Ok(())
}

fn reclaim(pages: u64, batch: usize, out: &mut Reply) {
    let zero0 = STORE.zero_mapped.load(Ordering::Relaxed);
    let (r, scanned, young) = memctl::reclaim(pages, batch);
    let zero = STORE
        .zero_mapped
        .load(Ordering::Relaxed)
        .wrapping_sub(zero0);
    crate::say!(
        out,
        "reclaim: reclaimed {r} ({} stored, {zero} zero); scanned {scanned}, {young} referenced kept",
        r.done.saturating_sub(zero)
    );
    out.set("reclaimed", r.done);
    out.set("zero", zero);
    out.set("scanned", scanned);
    out.set("referenced", young);
}

/// Waits until no runnable VM is left, at most `secs`.
fn wait(secs: u64, r: &mut Reply) {
    let ticks = secs.saturating_mul(crate::arch::timer::frequency());
    let deadline = crate::arch::timer::now().saturating_add(ticks);
    while crate::vm::count_runnable() > 0 && crate::arch::timer::now() < deadline {
        core::hint::spin_loop();
    }
    match crate::vm::count_runnable() {
        0 => crate::say!(r, "wait: no runnable VMs left"),
        n => crate::say!(r, "wait: {n} VMs still runnable after {secs} s"),
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
