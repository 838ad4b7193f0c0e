//! `merge`, `merge auto <rate>`, `merge off` (issue 16): same-page merging
//! across the VMs of each trust group (`mm::merge`), and its `stats` line.

use crate::console::error::CmdError;
use crate::console::reply::Reply;
use crate::mm::merge::{self, ScanVm};
use alloc::vec::Vec;
use rmap::{Ipa, VmId};

/// Every VM with memory, in its trust group (snapshots too: their frames
/// are shared with their VM's until either changes).
fn scan_vms() -> Vec<ScanVm> {
    crate::vm::all()
        .iter()
        .filter(|vm| vm.mem.memory.lock().is_live())
        .map(|vm| ScanVm {
            id: VmId(vm.id),
            group: vm.group(),
            ram: Ipa::new(vm.mem.ram.base)..Ipa::new(vm.mem.ram.end()),
        })
        .collect()
}

/// `merge`: one pass now; what it merged and the host frames it saved.
pub fn pass(r: &mut Reply) -> Result<(), CmdError> {
    let frames = crate::mm::frames::get();
    let used = || frames.total_count() - frames.free_count();
    let (before, start) = (used(), crate::arch::timer::now());
    let s = merge::pass(&scan_vms());
    let us = crate::arch::timer::ticks_to_us(crate::arch::timer::now().wrapping_sub(start));
    let after = used();
    crate::say!(
        r,
        "merge: {} pages scanned in {us} us, {} merged ({} into merged frames already there), {} to the zero page, {} still changing, {} refused; frames in use {before} -> {after} ({} saved)",
        s.scanned,
        s.merged,
        s.stable_hits,
        s.zero,
        s.changing,
        s.refused,
        before.saturating_sub(after),
    );
    for (key, value) in [
        ("scanned", s.scanned),
        ("merged", s.merged),
        ("stable_hits", s.stable_hits),
        ("zero", s.zero),
        ("changing", s.changing),
        ("refused", s.refused),
        ("frames_before", before as u64),
        ("frames_after", after as u64),
        ("us", us),
    ] {
        r.set(key, value);
    }
    Ok(())
}

/// `merge auto <rate>` (Some) or `merge off` (None).
pub fn auto(rate: Option<u64>, r: &mut Reply) -> Result<(), CmdError> {
    merge::set_rate(rate.unwrap_or(0));
    match rate {
        Some(rate) => crate::say!(r, "merging in the background at {rate} pages per second"),
        None => crate::say!(r, "background merging off"),
    }
    r.set("rate", rate.unwrap_or(0));
    Ok(())
}

/// The background merger's step, if one is due (console poll, CPU 0, no
/// vCPU loaded).
pub fn background() {
    let _ = merge::background(scan_vms);
}

/// The `stats` line: merged frames, their mappings, the frames they save.
pub fn stats(r: &mut Reply) {
    let m = crate::mm::glue::rmap().merge_stats();
    let rate = merge::rate();
    crate::say!(
        r,
        "merged: {} frames, {} mappings ({} family items), {} frames saved; {} pages to the zero page since boot; scanner rounds {}, background {}",
        m.merged_frames,
        m.mappings,
        m.items,
        m.saved,
        merge::zero_merged(),
        merge::rounds(),
        if rate == 0 {
            alloc::string::String::from("off")
        } else {
            alloc::format!("{rate} pages/s")
        },
    );
    r.set("merged_frames", m.merged_frames as u64);
    r.set("merged_mappings", m.mappings);
    r.set("merged_items", m.items as u64);
    r.set("merged_saved", m.saved);
    // Not the swap store's `zero_mapped` (reclaimed zero pages in its zero slot).
    r.set("merged_zero", merge::zero_merged());
    r.set("merge_rate", rate);
    r.set("merge_rounds", merge::rounds());
}
