//! TLB and cache maintenance on the real CPU, at EL2 (non-VHE, identity-mapped: PA == VA).
//!
//! TLBIs by IPA and by VMID act on the VMID in `VTTBR_EL2`, so each operation switches
//! `VTTBR_EL2` to the target VM's value and restores the previous one afterwards, as Linux
//! KVM's `__tlb_switch_to_guest`/`__tlb_switch_to_host` do. The full VTTBR (root address too,
//! not only the VMID) is installed so that a speculative stage-2 walk in that window can only
//! use the VM's own tables. Stage-1 EL2 TLBIs (`VAE2IS`, `ALLE2IS`) are never used for stage 2.
//!
//! The TTL level hint (FEAT_TTL) is not used: the level argument is ignored and the operand
//! carries only IPA\[47:12\].

use crate::{TlbMaintenance, Vttbr};
use core::arch::asm;

/// [`TlbMaintenance`] by `TLBI`, `DC`/`IC`, `DSB` and `ISB` at EL2.
#[derive(Debug)]
pub struct Aarch64Tlb {
    _private: (),
}

impl Aarch64Tlb {
    /// The maintenance interface.
    ///
    /// # Safety
    ///
    /// Only use it at EL2 with `HCR_EL2.E2H = 0`, on a CPU where nothing else changes
    /// `VTTBR_EL2` concurrently (an interrupt handler switching VMs while an invalidation has
    /// switched it): call it with interrupts masked or from code no interrupt handler
    /// re-enters. Physical addresses given to `invalidate_icache` and `clean_dcache_poc` must
    /// be mapped at the same virtual address (identity map).
    pub const unsafe fn new() -> Self {
        Aarch64Tlb { _private: () }
    }
}

impl Aarch64Tlb {
    /// [`TlbMaintenance::invalidate_ipa`] on this CPU only (`TLBI IPAS2E1`, `TLBI VMALLE1`,
    /// non-shareable barriers): for a caller that knows no other CPU can hold entries of the
    /// VM (it has never had the VM's VTTBR loaded since the VMID was last invalidated
    /// everywhere). The descriptor store is still made visible to every CPU's walker first.
    pub fn invalidate_ipa_local(&self, vttbr: Vttbr, ipa: u64) {
        // SAFETY: barrier only, as in `invalidate_ipa`.
        unsafe { asm!("dsb ishst", options(nostack, preserves_flags)) };
        with_vttbr(vttbr, || {
            // SAFETY: as in `invalidate_ipa`, for this CPU's TLB only; touches no memory.
            unsafe {
                asm!(
                    "tlbi ipas2e1, {ipa}",
                    "dsb nsh",
                    "tlbi vmalle1",
                    "dsb nsh",
                    "isb",
                    ipa = in(reg) (ipa >> 12) & ((1 << 36) - 1),
                    options(nostack, preserves_flags),
                );
            }
        });
    }

    /// [`TlbMaintenance::invalidate_vmid`] on this CPU only (same contract as
    /// [`Aarch64Tlb::invalidate_ipa_local`]).
    pub fn invalidate_vmid_local(&self, vttbr: Vttbr) {
        // SAFETY: barrier only, as above.
        unsafe { asm!("dsb ishst", options(nostack, preserves_flags)) };
        with_vttbr(vttbr, || {
            // SAFETY: invalidates this CPU's stage-1 and stage-2 entries of the current VMID;
            // touches no memory.
            unsafe {
                asm!(
                    "tlbi vmalls12e1",
                    "dsb nsh",
                    "isb",
                    options(nostack, preserves_flags)
                )
            };
        });
    }
}

/// Runs `f` with `VTTBR_EL2 = vttbr`, restoring the previous value afterwards.
fn with_vttbr(vttbr: Vttbr, f: impl FnOnce()) {
    let saved: u64;
    // SAFETY: reading and writing VTTBR_EL2 at EL2 (guaranteed by `Aarch64Tlb::new`'s
    // contract); the VM's VTTBR points at its own valid tables, and the ISB makes the switch
    // effective before the TLBIs that follow. Nothing runs at EL1 in between.
    unsafe {
        asm!(
            "mrs {saved}, vttbr_el2",
            "msr vttbr_el2, {new}",
            "isb",
            saved = out(reg) saved,
            new = in(reg) vttbr.raw(),
            options(nostack, preserves_flags),
        );
    }
    f();
    // SAFETY: restores the value read above, at EL2.
    unsafe {
        asm!("msr vttbr_el2, {v}", "isb", v = in(reg) saved, options(nostack, preserves_flags));
    }
}

/// The smallest data cache line of the CPU (`CTR_EL0.DminLine`, in words), the stride of
/// by-line maintenance.
fn dcache_line() -> u64 {
    let ctr: u64;
    // SAFETY: reads CTR_EL0, a read-only identification register.
    unsafe { asm!("mrs {c}, ctr_el0", c = out(reg) ctr, options(nomem, nostack, preserves_flags)) };
    4u64 << ((ctr >> 16) & 0xf)
}

impl TlbMaintenance for Aarch64Tlb {
    fn clean_dcache_poc(&self, pa: u64, len: u64) {
        let line = dcache_line();
        let end = pa + len;
        let mut va = pa & !(line - 1);
        // Four lines a step while four start below `end`: the loop's own compare and branch
        // were as many instructions as the cleans (a 4 KiB copy's clean was a third of a
        // migrated page's hypervisor instructions).
        while va + 3 * line < end {
            // SAFETY: as below, for the four lines from `va`, each starting below `end`; `va`
            // ends four lines on.
            unsafe {
                asm!(
                    "dc civac, {va}",
                    "add {va}, {va}, {line}",
                    "dc civac, {va}",
                    "add {va}, {va}, {line}",
                    "dc civac, {va}",
                    "add {va}, {va}, {line}",
                    "dc civac, {va}",
                    "add {va}, {va}, {line}",
                    va = inout(reg) va,
                    line = in(reg) line,
                    options(nostack, preserves_flags)
                )
            };
        }
        while va < end {
            // SAFETY: cleans and invalidates a data cache line to the point of coherency;
            // `va` is mapped (identity map, per `Aarch64Tlb::new`'s contract). Dirty data is
            // written back first, so no value changes. Invalidating too (as KVM's
            // `kvm_flush_dcache_to_poc` does) leaves no line that a guest's later
            // non-cacheable writes would make stale for the hypervisor's cacheable reads.
            unsafe { asm!("dc civac, {va}", va = in(reg) va, options(nostack, preserves_flags)) };
            va += line;
        }
        // SAFETY: barrier only: completes the cleans for every observer (a non-cacheable
        // reader may be any agent, so full system), as Linux's `dcache_clean_poc` does.
        unsafe { asm!("dsb sy", options(nostack, preserves_flags)) };
    }

    fn invalidate_ipa(&self, vttbr: Vttbr, ipa: u64, _level: u8) {
        // SAFETY: barrier only: makes the descriptor store visible to table walkers before the
        // invalidation.
        unsafe { asm!("dsb ishst", options(nostack, preserves_flags)) };
        with_vttbr(vttbr, || {
            // SAFETY: stage-2 TLB maintenance for the current VMID (just switched to), then the
            // combined stage-1&2 entries of that VMID, which may hold the old translation;
            // completed by DSB ISH and synchronized by ISB. Touches no memory.
            unsafe {
                asm!(
                    "tlbi ipas2e1is, {ipa}",
                    "dsb ish",
                    "tlbi vmalle1is",
                    "dsb ish",
                    "isb",
                    ipa = in(reg) (ipa >> 12) & ((1 << 36) - 1),
                    options(nostack, preserves_flags),
                );
            }
        });
    }

    fn invalidate_vmid(&self, vttbr: Vttbr) {
        // SAFETY: barrier only, as above.
        unsafe { asm!("dsb ishst", options(nostack, preserves_flags)) };
        with_vttbr(vttbr, || {
            // SAFETY: invalidates stage-1 and stage-2 entries of the current VMID on all CPUs of
            // the inner-shareable domain; touches no memory.
            unsafe {
                asm!(
                    "tlbi vmalls12e1is",
                    "dsb ish",
                    "isb",
                    options(nostack, preserves_flags)
                );
            }
        });
    }

    fn invalidate_icache(&self, pa: u64, len: u64) {
        let line = dcache_line();
        let mut va = pa & !(line - 1);
        while va < pa + len {
            // SAFETY: cleans a data cache line to the point of unification; `va` is mapped
            // (identity map, per `Aarch64Tlb::new`'s contract). Does not change memory contents.
            unsafe { asm!("dc cvau, {va}", va = in(reg) va, options(nostack, preserves_flags)) };
            va += line;
        }
        // SAFETY: completes the cleans, invalidates all instruction caches to the point of
        // unification on the inner-shareable domain, and synchronizes.
        unsafe {
            asm!(
                "dsb ish",
                "ic ialluis",
                "dsb ish",
                "isb",
                options(nostack, preserves_flags)
            )
        };
    }

    fn invalidate_all(&self) {
        // SAFETY: invalidates all EL1&0 entries of all VMIDs on the inner-shareable domain;
        // touches no memory.
        unsafe {
            asm!(
                "dsb ishst",
                "tlbi alle1is",
                "dsb ish",
                "isb",
                options(nostack, preserves_flags)
            )
        };
    }
}
