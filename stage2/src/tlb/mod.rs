//! TLB and cache maintenance behind a trait, and batching.
//!
//! Operations of [`crate::Stage2Table`] take a [`Flusher`]: either any [`TlbMaintenance`]
//! (each operation then finishes its own invalidation before returning) or a [`Batch`] (the
//! final invalidations of many operations on one VM become one `invalidate_vmid` when the
//! batch ends — what fork uses to write-protect a whole VM with one flush).

use crate::Vttbr;
use core::cell::Cell;

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub mod aarch64;

/// TLB and cache maintenance for stage-2 changes and for frames the hypervisor hands to guests.
/// Every method is complete (the invalidation or clean is finished and visible to all CPUs of
/// the inner-shareable domain) on return.
pub trait TlbMaintenance {
    /// Invalidates the stage-2 and combined stage-1&2 TLB entries that may translate `ipa` in the
    /// VM of `vttbr` (its VMID), on all CPUs. `level` is the level of the descriptor that changed
    /// (a hint: 1 for a 1 GiB block, 2 for 2 MiB, 3 for a page).
    fn invalidate_ipa(&self, vttbr: Vttbr, ipa: u64, level: u8);

    /// Invalidates every stage-1 and stage-2 TLB entry of the VMID of `vttbr`, and the walk
    /// caches, on all CPUs.
    fn invalidate_vmid(&self, vttbr: Vttbr);

    /// Makes instructions written to physical `pa..pa + len` visible to instruction fetch on all
    /// CPUs (clean the D-cache to the point of unification, invalidate the I-cache).
    fn invalidate_icache(&self, pa: u64, len: u64);

    /// Invalidates every EL1&0 TLB entry of every VMID (VMID generation rollover).
    fn invalidate_all(&self);

    /// Cleans the data cache over physical `pa..pa + len` to the point of coherency (and
    /// invalidates it: `DC CIVAC` by line, then `DSB SY`, as KVM does), so that a *non-cacheable* access — a guest running with its
    /// MMU or data cache off, or one mapping the frame as Device at stage 1 — reads what the
    /// hypervisor wrote through its cacheable map, not the stale DRAM beneath (Arm ARM D7,
    /// "Data cache maintenance for data seen by non-cacheable accesses"). Owed once per frame
    /// the hypervisor writes and a guest may then map, *unless* stage 2 forces Write-Back
    /// ([`crate::S2Config::fwb`]); see [`publish_frames`].
    fn clean_dcache_poc(&self, pa: u64, len: u64);
}

/// Makes `pa..pa + len`, just written by the hypervisor through its cacheable map, safe to
/// show to a guest of configuration `cfg` whatever attributes the guest's stage 1 uses: with
/// FEAT_S2FWB (`cfg.fwb()`) every guest access is Write-Back cacheable and coherent already,
/// so nothing is owed; otherwise the range is cleaned to the point of coherency.
///
/// Call it once per frame handed out (after zeroing, copying, swapping in or loading it), not
/// per mapping: a frame mapped again (fork, CoW sharing, remap) holds nothing new.
pub fn publish_frames(cfg: &crate::S2Config, tlb: &dyn TlbMaintenance, pa: u64, len: u64) {
    if !cfg.fwb() {
        tlb.clean_dcache_poc(pa, len);
    }
}

/// How a [`crate::Stage2Table`] operation invalidates what it changed. Implemented by every
/// [`TlbMaintenance`] (immediate) and by [`Batch`] (deferred).
pub trait Flusher {
    /// The maintenance used for immediate invalidations (the "break" of a break-before-make, the
    /// invalidation before freeing table pages).
    fn maintenance(&self) -> &dyn TlbMaintenance;

    /// An operation on the VM of `vttbr` has changed live entries. Returns `true` if this flusher
    /// takes over their invalidation (a batch for that VM); `false` makes the operation invalidate
    /// them itself before it returns.
    fn defer(&self, vttbr: Vttbr) -> bool {
        let _ = vttbr;
        false
    }

    /// A VMID-wide invalidation of `vttbr` was just done by an operation.
    fn vmid_flushed(&self, vttbr: Vttbr) {
        let _ = vttbr;
    }
}

impl<T: TlbMaintenance> Flusher for T {
    fn maintenance(&self) -> &dyn TlbMaintenance {
        self
    }
}

/// Defers the final invalidations of many operations on one VM to a single
/// [`TlbMaintenance::invalidate_vmid`] when the batch ends ([`Batch::finish`], or drop).
///
/// While a batch is open, changed entries may still be cached in TLBs: frames that an `unmap`
/// reported, or whose mapping was replaced, must not be reused until the batch has ended.
/// Break-before-make invalidations and those before freeing table pages are not deferred.
/// A batch used with another VM's table does not defer anything for that VM.
pub struct Batch<'a, T: TlbMaintenance> {
    tlb: &'a T,
    vttbr: Vttbr,
    pending: Cell<bool>,
}

impl<'a, T: TlbMaintenance> Batch<'a, T> {
    /// A batch for the VM of `vttbr` (see [`crate::Stage2Table::batch`]).
    pub fn new(tlb: &'a T, vttbr: Vttbr) -> Self {
        Batch {
            tlb,
            vttbr,
            pending: Cell::new(false),
        }
    }

    /// Whether changes wait for the final invalidation.
    pub fn pending(&self) -> bool {
        self.pending.get()
    }

    /// Issues the pending invalidation now (if any); the batch stays open.
    pub fn flush(&self) {
        if self.pending.replace(false) {
            self.tlb.invalidate_vmid(self.vttbr);
        }
    }

    /// Ends the batch with at most one VMID-wide invalidation.
    pub fn finish(self) {
        // Drop does the flush.
    }

    /// Ends the batch *without* invalidating, returning whether an invalidation is owed: the
    /// caller takes over the duty to call [`TlbMaintenance::invalidate_vmid`] (for a batch
    /// kept across several calls, e.g. in state guarded by the VM's stage-2 lock).
    #[must_use = "the caller owes a VMID-wide invalidation when this is true"]
    pub fn into_pending(self) -> bool {
        let pending = self.pending.replace(false);
        drop(self);
        pending
    }
}

impl<T: TlbMaintenance> Drop for Batch<'_, T> {
    fn drop(&mut self) {
        self.flush();
    }
}

impl<T: TlbMaintenance> Flusher for Batch<'_, T> {
    fn maintenance(&self) -> &dyn TlbMaintenance {
        self.tlb
    }

    fn defer(&self, vttbr: Vttbr) -> bool {
        if vttbr != self.vttbr {
            return false;
        }
        self.pending.set(true);
        true
    }

    fn vmid_flushed(&self, vttbr: Vttbr) {
        if vttbr == self.vttbr {
            self.pending.set(false);
        }
    }
}
