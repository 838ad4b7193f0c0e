//! The invalidations one operation owes before it returns.

use crate::tlb::Flusher;
use crate::Vttbr;

/// Past this many changed entries an operation invalidates the whole VMID instead.
const MAX_IPA_INVALIDATIONS: usize = 16;

/// Collects the live entries an operation changed and invalidates them when dropped (or hands
/// them to a batch).
pub(crate) struct OpFlush<'f, F: Flusher + ?Sized> {
    flusher: &'f F,
    vttbr: Vttbr,
    ipas: [(u64, u8); MAX_IPA_INVALIDATIONS],
    count: usize,
    whole_vmid: bool,
    deferred: bool,
}

impl<'f, F: Flusher + ?Sized> OpFlush<'f, F> {
    pub fn new(flusher: &'f F, vttbr: Vttbr) -> Self {
        OpFlush {
            flusher,
            vttbr,
            ipas: [(0, 0); MAX_IPA_INVALIDATIONS],
            count: 0,
            whole_vmid: false,
            deferred: false,
        }
    }

    /// A live descriptor at `level` translating `ipa` was changed.
    pub fn changed(&mut self, ipa: u64, level: u8) {
        if self.deferred || self.whole_vmid {
            return;
        }
        if self.count == 0 && self.flusher.defer(self.vttbr) {
            self.deferred = true;
            return;
        }
        if self.count == MAX_IPA_INVALIDATIONS {
            self.whole_vmid = true;
            return;
        }
        self.ipas[self.count] = (ipa, level);
        self.count += 1;
    }

    /// The "break" of a break-before-make: invalidate now, whatever the flusher.
    pub fn break_now(&self, ipa: u64, level: u8) {
        self.flusher
            .maintenance()
            .invalidate_ipa(self.vttbr, ipa, level);
    }

    /// Invalidates the whole VMID now (before table pages are freed), including whatever is
    /// pending here or in a batch.
    pub fn vmid_now(&mut self) {
        self.flusher.maintenance().invalidate_vmid(self.vttbr);
        self.flusher.vmid_flushed(self.vttbr);
        self.count = 0;
        self.whole_vmid = false;
        self.deferred = false;
    }

    /// I-cache maintenance for a frame about to become executable.
    pub fn icache(&self, pa: u64, len: u64) {
        self.flusher.maintenance().invalidate_icache(pa, len);
    }
}

impl<F: Flusher + ?Sized> Drop for OpFlush<'_, F> {
    fn drop(&mut self) {
        let tlb = self.flusher.maintenance();
        if self.whole_vmid {
            tlb.invalidate_vmid(self.vttbr);
            self.flusher.vmid_flushed(self.vttbr);
        } else {
            for &(ipa, level) in &self.ipas[..self.count] {
                tlb.invalidate_ipa(self.vttbr, ipa, level);
            }
        }
    }
}
