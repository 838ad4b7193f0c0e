//! The memory half of restoring a VM to its snapshot.
//!
//! Fast path (`restore_dirty`): only the pages the VM's dirty log names are
//! touched, in chunks of [`CHUNK`] leaves, each in three steps:
//! 1. *break*: every leaf that differs from the snapshot is cleared under the
//!    VM's stage-2 lock (a 2 MiB block as one entry: restore never splits,
//!    so it needs no table page for what it removes);
//! 2. one VMID-wide TLB invalidation (`Stage2::flush_deferred`);
//! 3. *make*: the frames and swap slots the cleared leaves held are let go,
//!    and the snapshot's entries are installed read-only and shared.
//!
//! This is the Arm ARM's break-before-make sequence (DDI 0487, "Translation
//! table entry updates: break-before-make", required whenever the output
//! address of a valid entry changes): a new valid entry for an IPA is written
//! only after the old one was made invalid and its TLB entries invalidated, and (the hypervisor's own rule) a frame is
//! freed only once no stage-2 entry and no TLB entry can reach it.
//!
//! A page's dirty bit is cleared only once that page is the snapshot's
//! again, so a restore that fails partway leaves the log naming every page
//! still to do.
//!
//! Slow path (`reset_memory`, then `fork_memory`): every region is zapped
//! and unlinked, but the VM keeps its stage-2 table and VMID, so nothing has
//! to be allocated before the fork and the caller's loaded VTTBR stays valid.
//!
//! Generic over the VM ([`GuestVm`]) and the machine, so the host tests run
//! it; hyp's `mm::restore` instantiates it.

use crate::machine::Machine;
use crate::vm::{GuestVm, MemCtx};
use crate::PAGE_SIZE;
use arrayvec::ArrayVec;
use rmap::CasError as Refused;
use rmap::{Ipa, PageState, Stage2Locked, SwapStore};

/// Leaves cleared between two TLB invalidations (kept on the stack).
const CHUNK: usize = 64;

/// Why a restore's memory step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreError {
    /// The snapshot was destroyed before or while the restore began.
    SnapshotGone,
    /// A snapshot entry could not be installed (no stage-2 table page).
    Memory,
}

/// A leaf of the VM cleared by a chunk's break step: its first IPA, its page
/// count, and the entry its first page had.
type Cleared = (Ipa, u64, PageState);

/// Makes every logged page of `vm` its snapshot's again. The caller holds
/// `vm` quiesced; `snap` is frozen.
pub fn restore_dirty<M: Machine, V: GuestVm<M>, W: SwapStore>(
    cx: &MemCtx<'_, M, W>,
    vm: &V,
    snap: &V,
) -> Result<(), RestoreError> {
    let _regions = vm.regions().write();
    // The snapshot's teardown write-locks its region list to zap it: holding
    // it for read keeps every snapshot entry alive until we are done. A
    // target VM is never frozen and a snapshot never restored into, so this
    // (VM, then snapshot) nesting never meets the opposite one.
    let snap_regions = snap.regions().read_nested(1);
    if snap_regions.is_empty() || !snap.lock().is_live() {
        return Err(RestoreError::SnapshotGone);
    }
    let mut from = Some(vm.ram().start);
    let mut refilled = false;
    while let Some(start) = from {
        let mut cleared = ArrayVec::<Cleared, CHUNK>::new();
        let next = break_chunk(cx, vm, snap, start, &mut cleared, &mut refilled);
        if !cleared.is_empty() {
            // No TLB may still hold a cleared leaf before a frame it mapped
            // can be freed, or before a new valid entry is written at its IPA.
            vm.flush_deferred();
            make_chunk(cx, vm, snap, &cleared)?;
        }
        from = next?;
    }
    if refilled {
        // A refilled page's execute permission, taken away, must be gone from
        // every TLB before a vCPU runs again (`ready_refill`).
        vm.flush_deferred();
    }
    Ok(())
}

/// Rewrites the VM's own writable frame `pfn` at `ipa` with the snapshot's
/// page, in place: the mapping, its permission to write and its dirty bit
/// stay, so the guest's next write to the page does not fault (a fuzzer's
/// cycle rewrites the same pages after every restore). Linux has no such
/// path; fuzzing hypervisors reset dirty pages this way (Nyx, kAFL). The
/// cost is memory: the VM keeps a private frame where the ordinary path
/// would share the snapshot's, until merging or reclaim takes it. False if
/// the page is not the VM's alone and writable, as a 4 KiB page, or the
/// snapshot's entry (`target`, as last seen) is not a frame or not that frame
/// any more: the ordinary path handles it.
fn refill_in_place<M: Machine, V: GuestVm<M>, W: SwapStore>(
    cx: &MemCtx<'_, M, W>,
    vm: &V,
    snap: &V,
    ipa: Ipa,
    pfn: rmap::Pfn,
    target: PageState,
) -> bool {
    let PageState::Mapped { pfn: src, .. } = target else {
        return false;
    };
    // The snapshot's frame locked (level 2) keeps it from moving or being
    // freed while it is read; then the VM's stage-2 lock (level 4).
    let _frame = cx.rmap.frames().lock(src);
    if snapshot_entry_now(snap, ipa).pfn() != Some(src) {
        return false;
    }
    let mut s2 = vm.lock();
    // A writable mapping is its frame's only one (fork, merging and the swap
    // cache share frames read-only), so the frame is this VM's alone.
    if !s2.ready_refill(ipa, pfn) {
        return false;
    }
    // SAFETY: `pfn` is mapped writable by this VM only, which is quiesced,
    // and we hold its stage-2 lock, which migration, reclaim and merging
    // take before they read a mapped frame's contents; `src` is locked and
    // distinct (a writable frame is never the snapshot's).
    unsafe { crate::frames::refill(cx.machine, pfn.pa(), src.pa()) };
    drop(s2);
    true
}

/// The entry `snap` has at `ipa`, as the restored VM maps it (read-only);
/// a migration entry is returned as it is.
fn snapshot_entry_now<M: Machine, V: GuestVm<M>>(snap: &V, ipa: Ipa) -> PageState {
    // Bound first: the stage-2 guard must be gone before anyone waits.
    let entry = snap.lock().lookup(ipa);
    match entry {
        PageState::Mapped { pfn, .. } => PageState::Mapped {
            pfn,
            writable: false,
        },
        other => other,
    }
}

/// `snapshot_entry_now` once no migration of it is in flight. The wait for
/// the frame lock holds no stage-2 lock: the migrator or reclaimer that owns
/// the frame needs the snapshot's stage-2 lock to finish (lock order: frame,
/// then stage 2). A guard kept alive through a `match` on `snap.lock()` once
/// deadlocked exactly so (found by hvcfuzz under chaos).
fn snapshot_entry<M: Machine, V: GuestVm<M>>(rmap: &rmap::Rmap, snap: &V, ipa: Ipa) -> PageState {
    loop {
        match snapshot_entry_now(snap, ipa) {
            PageState::Migrating { pfn, .. } => rmap.wait_frame_unlocked(pfn),
            other => return other,
        }
    }
}

/// Step 1: clears up to CHUNK leaves of logged pages that differ from the
/// snapshot, from `from` on. Returns where the next chunk starts (None: the
/// log is done). What was cleared so far is in `cleared` even on an error.
fn break_chunk<M: Machine, V: GuestVm<M>, W: SwapStore>(
    cx: &MemCtx<'_, M, W>,
    vm: &V,
    snap: &V,
    mut from: Ipa,
    cleared: &mut ArrayVec<Cleared, CHUNK>,
    refilled: &mut bool,
) -> Result<Option<Ipa>, RestoreError> {
    // The page whose in-place refill was tried: if it failed, the page takes
    // the ordinary path.
    let mut tried = None;
    while !cleared.is_full() {
        let Some(ipa) = vm.next_dirty(from) else {
            return Ok(None);
        };
        let target = snapshot_entry(cx.rmap, snap, ipa);
        let mut s2 = vm.lock();
        let have = s2.lookup(ipa);
        match have {
            PageState::Mapped {
                pfn,
                writable: true,
            } if target.pfn().is_some() && tried != Some(ipa) => {
                drop(s2);
                tried = Some(ipa);
                if refill_in_place(cx, vm, snap, ipa, pfn, target) {
                    *refilled = true;
                    from = ipa + PAGE_SIZE;
                }
            }
            _ if have == target => {
                drop(s2);
                vm.clear_dirty(ipa);
                from = ipa + PAGE_SIZE;
            }
            PageState::Migrating { pfn, .. } => {
                drop(s2);
                cx.rmap.wait_frame_unlocked(pfn);
            }
            PageState::Invalid => {
                cleared.push((ipa, 1, PageState::Invalid));
                from = ipa + PAGE_SIZE;
            }
            _ => match s2.clear_leaf(ipa, have, vm.ram()) {
                Ok((start, pages, first)) => {
                    cleared.push((start, pages, first));
                    from = (start + pages * PAGE_SIZE).max(ipa + PAGE_SIZE);
                }
                // It cannot be cleared (a block that would need splitting;
                // never for RAM, whose blocks lie inside it).
                Err(Refused::NoMemory) => return Err(RestoreError::Memory),
                Err(Refused::Changed(found)) if found == have => return Err(RestoreError::Memory),
                // Changed since the lookup (a migration or reclaim of the
                // frame got in between): look again.
                Err(_) => {}
            },
        }
    }
    Ok(Some(from))
}

/// Step 3: lets go of what the cleared leaves held (their TLB entries are
/// gone), then installs the snapshot's entries and clears the pages' dirty
/// bits. All references are dropped before the first install, so a failed
/// install leaks nothing: its pages stay invalid and logged.
fn make_chunk<M: Machine, V: GuestVm<M>, W: SwapStore>(
    cx: &MemCtx<'_, M, W>,
    vm: &V,
    snap: &V,
    cleared: &[Cleared],
) -> Result<(), RestoreError> {
    for &(_, pages, first) in cleared {
        for i in 0..pages {
            match first.page(i) {
                PageState::Mapped { pfn, .. } => cx.rmap.remove_rmap(pfn, &cx.frames()),
                PageState::Swapped { slot } => cx.rmap.put_swap(slot, cx.swap, &cx.frames()),
                // The zero page holds no reference.
                PageState::Migrating { .. } | PageState::Invalid | PageState::ZeroPage => {}
            }
        }
    }
    for &(start, pages, _) in cleared {
        for i in 0..pages {
            let ipa = start + i * PAGE_SIZE;
            install_from_snapshot(cx, vm, snap, ipa).map_err(|_| RestoreError::Memory)?;
            vm.clear_dirty(ipa);
        }
    }
    Ok(())
}

/// Maps the snapshot's entry at `ipa` into `vm`'s (cleared) slot, read-only
/// and shared, as fork would have. The snapshot's frame is locked meanwhile,
/// so migration or reclaim cannot move it between our lookup and the new
/// mapping's reference.
fn install_from_snapshot<M: Machine, V: GuestVm<M>, W: SwapStore>(
    cx: &MemCtx<'_, M, W>,
    vm: &V,
    snap: &V,
    ipa: Ipa,
) -> Result<(), rmap::Error> {
    loop {
        let target = snapshot_entry(cx.rmap, snap, ipa);
        let _frame = target.pfn().map(|pfn| cx.rmap.frames().lock(pfn));
        // Under the frame lock the entry cannot become a migration entry
        // of this frame; if it changed otherwise, start over (no waiting
        // while the frame is locked).
        if snapshot_entry_now(snap, ipa) != target {
            continue;
        }
        return install_shared(cx, vm, ipa, target);
    }
}

/// Maps an entry another VM holds into `vm`'s empty slot at `ipa` (one more
/// reference on the frame or swap slot).
fn install_shared<M: Machine, V: GuestVm<M>, W: SwapStore>(
    cx: &MemCtx<'_, M, W>,
    vm: &V,
    ipa: Ipa,
    entry: PageState,
) -> Result<(), rmap::Error> {
    match entry {
        PageState::Mapped { pfn, .. } => cx.rmap.add_anon_rmap(pfn),
        PageState::Swapped { slot } => cx.swap.dup(slot),
        // Installed as it is: counted nowhere, as fork copies it.
        PageState::ZeroPage => {}
        _ => return Ok(()),
    }
    let installed = {
        let mut s2 = vm.lock();
        s2.compare_exchange(ipa, PageState::Invalid, entry)
    };
    if installed.is_ok() {
        return Ok(());
    }
    match entry {
        PageState::Mapped { pfn, .. } => cx.rmap.remove_rmap(pfn, &cx.frames()),
        PageState::Swapped { slot } => cx.rmap.put_swap(slot, cx.swap, &cx.frames()),
        _ => {}
    }
    Err(rmap::Error::OutOfFrames)
}

/// Slow-path first half: zaps and unlinks every region of `vm` (chunked, as
/// teardown does) but keeps its stage-2 table and VMID for the fork that
/// refills it. The tables hold only the VM's own non-RAM entries (the UART
/// image) afterwards, and every TLB entry of a zapped leaf was invalidated.
pub fn reset_memory<M: Machine, V: GuestVm<M>, W: SwapStore>(cx: &MemCtx<'_, M, W>, vm: &V) {
    let regions = &mut vm.regions().write();
    let proof = cx.rmap.destroy_vm(regions, vm, &cx.frames(), cx.swap);
    // The proof would let us free the tables; we keep them, and the VM
    // keeps its VMID, so nothing is freed that a TLB could still reach.
    let _ = proof;
}
