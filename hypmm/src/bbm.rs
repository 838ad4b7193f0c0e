//! A debug-build witness of break-before-make, per VM (kept under the VM's
//! stage-2 lock, inside `GuestMemory`).
//!
//! The Arm ARM requires break-before-make whenever a valid translation is
//! replaced by one with another output address: write an invalid entry,
//! invalidate the TLB entries it may have left (and wait for the
//! invalidation with a DSB), and only then write the new valid entry. Batched
//! paths (migration, reclaim, teardown, restore) clear many leaves and leave
//! the invalidation pending for one VMID-wide flush; this records which IPAs
//! are in that state, and a new valid entry written into one of them before
//! the flush is a bug: a debug hypervisor panics on it, so every QEMU test
//! checks it. Release builds carry none of this. (The old fast restore did exactly this: clear, then install the
//! snapshot's frame at once, with the invalidation still deferred.)

use arrayvec::ArrayVec;

/// IPAs whose leaves were made invalid while their TLB invalidation is still
/// pending, as exact ranges (adjacent ones merged), so only a make at one of
/// them trips the check. Past [`RANGES`] distinct ranges the rest is not
/// recorded (fewer checks until the flush, never a false alarm).
#[derive(Debug, Default)]
pub struct Unflushed {
    ranges: ArrayVec<(u64, u64), RANGES>,
}

/// Ranges remembered between two flushes (a restore chunk is 64 leaves).
const RANGES: usize = 64;

impl Unflushed {
    /// `[ipa, ipa + len)` was made invalid; its invalidation is deferred.
    pub fn note(&mut self, ipa: u64, len: u64) {
        let end = ipa.saturating_add(len);
        if let Some(r) = self.ranges.iter_mut().find(|r| ipa <= r.1 && end >= r.0) {
            *r = (r.0.min(ipa), r.1.max(end));
        } else {
            let _ = self.ranges.try_push((ipa, end));
        }
    }

    /// A VMID-wide invalidation covered everything pending.
    pub fn flushed(&mut self) {
        self.ranges.clear();
    }

    /// A valid entry is about to be written over `[ipa, ipa + len)`.
    pub fn check_make(&self, ipa: u64, len: u64) {
        let end = ipa.saturating_add(len);
        for &(lo, hi) in &self.ranges {
            assert!(
                end <= lo || ipa >= hi,
                "break-before-make: a valid entry at {ipa:#x} while the invalidation of {lo:#x}..{hi:#x} is still pending"
            );
        }
    }
}
