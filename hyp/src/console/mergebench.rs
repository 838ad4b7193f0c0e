//! `bench merge <pages>` (issue 16): the same-page merger's costs next to
//! baselines, in interleaved pairs (`pairs`) in the same run.
//!
//! - **Scan throughput.** Two bench VMs of `pages` pages each, page i of
//!   one equal to page i of the other but for its last word: nothing
//!   merges, and each visit does the scanner's whole work on a page
//!   (stage-2 lookup, checksum, compare with the last visit, unstable-tree
//!   insert). The steady state of a background merger over unique memory,
//!   timed as one `merge` pass over just these VMs (the scanner's trees
//!   forget every other VM: a later pass re-learns them), next to a
//!   `frames_equal` (the memcmp `rmap::merge` uses, eight words a step) of
//!   the same page pairs, which reads the same 2 x `pages` pages.
//! - **CoW fault on a merged page** next to one on a forked page: a write
//!   fault resolved by the memory manager (`glue::fault`, as a guest's
//!   permission fault is, minus the trap itself, the same for both) on
//!   each of `min(pages, 1024)` pages that are (a) merged with another VM's,
//!   (b) shared with a snapshot of their VM. Fresh VMs for every run.

use crate::arch::timer::{now, ticks_to_us as us};
use crate::console::error::CmdError;
use crate::console::pairs::{interleave, median, PAIRS};
use crate::console::reply::Reply;
use crate::mm::frames::{frames_equal, PAGE_SIZE};
use crate::mm::glue::{fault, Access, FaultKind};
use crate::mm::memctl::{self, Report};
use crate::mm::merge::{self as merger, ScanVm};
use crate::vm::Vm;
use alloc::sync::Arc;
use alloc::vec::Vec;
use rmap::{Ipa, Pfn, VmId};

/// Most pages of the CoW comparison (each run builds and faults them):
/// enough that one run takes tens of milliseconds under TCG, well above a
/// scheduling hiccup of the host.
const COW_PAGES: u64 = 1024;
/// Pairs of the CoW comparison: more than `PAIRS`, since each run's fresh
/// VMs make it noisier than the scan's.
const COW_PAIRS: usize = 9;

/// A bench VM whose page i holds a pattern of i, its last word xor `salt`.
fn vm_with(pages: u64, salt: u64) -> Result<Arc<Vm>, CmdError> {
    let size = (pages * PAGE_SIZE).next_multiple_of(2 << 20);
    let vm = Vm::create("bench", 1, size)?;
    let mut page = [0u64; PAGE_SIZE as usize / 8];
    for i in 0..pages {
        for (j, w) in page.iter_mut().enumerate() {
            *w = ((i << 20) | j as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        page[page.len() - 1] ^= salt;
        // SAFETY: any u64 array is valid as bytes.
        let bytes = unsafe { core::slice::from_raw_parts(page.as_ptr().cast::<u8>(), 4096) };
        let ipa = Ipa::new(vm.mem.ram.base) + i * PAGE_SIZE;
        if crate::mm::glue::write_guest(&vm.mem, ipa, bytes).is_err() {
            vm.stop(0);
            return Err(CmdError::Bench("out of memory filling a bench VM"));
        }
    }
    // Split the 2 MiB block mappings of the first touch into pages, as the
    // scanner and CoW see guest memory after a while (not measured).
    memctl::migrate_pfns(&frames_of(&vm, pages), 4096, &mut Report::default());
    Ok(vm)
}

fn frames_of(vm: &Vm, pages: u64) -> Vec<Pfn> {
    let start = Ipa::new(vm.mem.ram.base);
    memctl::vm_frames(&vm.mem, start, start + pages * PAGE_SIZE, usize::MAX)
}

fn scan_vm(vm: &Vm) -> ScanVm {
    ScanVm {
        id: VmId(vm.id),
        group: vm.group(),
        ram: Ipa::new(vm.mem.ram.base)..Ipa::new(vm.mem.ram.end()),
    }
}

/// Ticks of one merger pass over `vms`; checks it visited `pages` pages
/// and merged none.
fn time_scan(vms: &[ScanVm], pages: u64) -> Result<u64, CmdError> {
    let t0 = now();
    let s = merger::pass(vms);
    let ticks = now() - t0;
    if s.scanned < pages || s.merged > 0 {
        return Err(CmdError::Bench(
            "the scan pass did not see the bench pages unchanged",
        ));
    }
    Ok(ticks)
}

/// Ticks to compare every page pair of `a` and `b` with `frames_equal`, the
/// merger's own final comparison (a word-wise memcmp: eight words a step).
fn time_memcmp(a: &[Pfn], b: &[Pfn]) -> Result<u64, CmdError> {
    let t0 = now();
    let mut equal = 0usize;
    for (x, y) in a.iter().zip(b) {
        // SAFETY: frames of the idle bench VMs, identity mapped; nothing
        // writes them while the console runs this command.
        equal += usize::from(unsafe { frames_equal(x.pa(), y.pa()) });
    }
    let ticks = now() - t0;
    match equal {
        0 => Ok(ticks),
        _ => Err(CmdError::Bench("bench pages compared equal")),
    }
}

/// Ticks of a write fault on each of `vm`'s first `pages` pages.
fn time_write_faults(vm: &Vm, pages: u64) -> Result<u64, CmdError> {
    let t0 = now();
    for i in 0..pages {
        let ipa = Ipa::new(vm.mem.ram.base) + i * PAGE_SIZE;
        fault(&vm.mem, ipa, Access::Write, FaultKind::Permission)
            .map_err(|_| CmdError::Bench("write fault failed"))?;
    }
    Ok(now() - t0)
}

/// Write faults on `pages` pages merged with another VM's.
fn merged_cow(pages: u64) -> Result<u64, CmdError> {
    let (a, b) = (vm_with(pages, 0)?, vm_with(pages, 0)?);
    b.set_group(a.group());
    let result = (|| {
        let s = merger::pass(&[scan_vm(&a), scan_vm(&b)]);
        let merged = frames_of(&a, pages);
        let all = merged.len() as u64 == pages
            && merged
                .iter()
                .all(|&p| crate::mm::glue::rmap().stable_info(p).is_some());
        if s.merged < pages || !all {
            return Err(CmdError::Bench("the CoW bench pages did not merge"));
        }
        time_write_faults(&a, pages)
    })();
    a.stop(0);
    b.stop(0);
    result
}

/// Write faults on `pages` pages shared with a snapshot of their VM.
fn forked_cow(pages: u64) -> Result<u64, CmdError> {
    let vm = vm_with(pages, 0)?;
    let result = (|| {
        let kind = crate::vm::fork::ForkKind::Snapshot;
        let snap = crate::vm::fork::fork(&vm, None, kind)?;
        let ticks = time_write_faults(&vm, pages);
        snap.stop(0);
        ticks
    })();
    vm.stop(0);
    result
}

/// Pages per second for `pages` in `ticks`.
fn rate(pages: u64, ticks: u64) -> u64 {
    pages * crate::arch::timer::frequency() / ticks.max(1)
}

/// `bench merge <pages>`.
pub fn merge(pages: u64, out: &mut Reply) -> Result<(), CmdError> {
    let (a, b) = (vm_with(pages, 0)?, vm_with(pages, 1)?);
    b.set_group(a.group());
    let vms = [scan_vm(&a), scan_vm(&b)];
    let result = (|| -> Result<(), CmdError> {
        // First sight records checksums: the pairs then see the steady state.
        merger::pass(&vms);
        let (fa, fb) = (frames_of(&a, pages), frames_of(&b, pages));
        let p = interleave(
            PAIRS,
            || time_memcmp(&fa, &fb),
            || time_scan(&vms, 2 * pages),
        )?;
        let (cmp, scan) = (median(&p.base), median(&p.subject));
        crate::say!(
            out,
            "bench merge: {} pages in 2 VMs, medians: scan pass {} us, memcmp {} us; merge scan = {} pages/s, memcmp = {} pages/s, scan/memcmp = {}",
            2 * pages,
            us(scan),
            us(cmp),
            rate(2 * pages, scan),
            rate(2 * pages, cmp),
            p.ratio()
        );
        out.set("scan_ratio_x100", p.ratio().median);
        Ok(())
    })();
    a.stop(0);
    b.stop(0);
    result?;
    let n = pages.min(COW_PAGES);
    let p = interleave(COW_PAIRS, || merged_cow(n), || forked_cow(n))?;
    let (m, f) = (median(&p.base), median(&p.subject));
    crate::say!(
        out,
        "bench merge: CoW write fault on {n} pages, medians: merged {} ns/page, forked {} ns/page; merged CoW / forked CoW = {}",
        us(m * 1000) / n,
        us(f * 1000) / n,
        p.ratio()
    );
    out.set("cow_ratio_x100", p.ratio().median);
    Ok(())
}
