//! Small wrappers over system registers and barriers of the current vCPU.

use core::arch::asm;
use core::ops::Range;

/// MPIDR_EL1 affinity fields (Aff3, Aff2..Aff0), as PSCI and the DTB use them.
const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;

/// This vCPU's index (0 = boot vCPU), kept in TPIDR_EL1 by the entry code.
pub fn vcpu_index() -> usize {
    let v: usize;
    // SAFETY: reading TPIDR_EL1 has no side effects.
    unsafe { asm!("mrs {}, tpidr_el1", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

pub fn mpidr_affinity() -> u64 {
    let v: u64;
    // SAFETY: reading MPIDR_EL1 has no side effects.
    unsafe { asm!("mrs {}, mpidr_el1", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v & MPIDR_AFFINITY_MASK
}

/// Physical address size this CPU supports, in bits (ID_AA64MMFR0_EL1.PARange).
pub fn pa_range() -> (u64, u32) {
    let v: u64;
    // SAFETY: reading an ID register has no side effects.
    unsafe {
        asm!("mrs {}, id_aa64mmfr0_el1", out(reg) v, options(nomem, nostack, preserves_flags))
    };
    // 52-bit needs the LPA2/LPA descriptor formats we do not use: cap at 48.
    let parange = (v & 0xf).min(5);
    let bits = [32, 36, 40, 42, 44, 48][parange as usize];
    (parange, bits)
}

/// The virtual counter (the one a hypervisor virtualises for us).
pub fn ticks() -> u64 {
    let v: u64;
    // SAFETY: the ISB keeps the read from being hoisted; no side effects.
    unsafe {
        asm!("isb", "mrs {}, cntvct_el0", out(reg) v, options(nomem, nostack, preserves_flags))
    };
    v
}

pub fn ticks_per_sec() -> u64 {
    let v: u64;
    // SAFETY: reading CNTFRQ_EL0 has no side effects.
    unsafe { asm!("mrs {}, cntfrq_el0", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v.max(1)
}

pub fn ms_since(start: u64) -> u64 {
    ticks().wrapping_sub(start) * 1000 / ticks_per_sec()
}

/// A point in time to give up waiting.
pub struct Deadline(u64);

impl Deadline {
    pub fn after_ms(ms: u64) -> Self {
        Self(ticks() + ms * ticks_per_sec() / 1000)
    }

    pub fn passed(&self) -> bool {
        ticks() >= self.0
    }
}

/// Waits for an event (SEV from another vCPU, or the timer event stream).
/// Under a hypervisor a trapped WFE lets it run someone else meanwhile.
pub fn wait_for_event() {
    // SAFETY: WFE only waits.
    unsafe { asm!("wfe", options(nomem, nostack, preserves_flags)) };
}

/// Makes prior stores visible, then wakes vCPUs waiting in `wait_for_event`.
pub fn send_event() {
    // SAFETY: a barrier and SEV have no memory-safety effect.
    unsafe { asm!("dsb ish", "sev", options(nostack, preserves_flags)) };
}

/// Per-vCPU setup once the MMU is on (atomics work from here on).
pub fn init_after_mmu() {
    enable_event_stream();
    // SAFETY: unmasking SError only lets an asynchronous abort be reported by
    // our vectors (installed by the entry code) instead of staying pending.
    unsafe { asm!("msr daifclr, #4", options(nomem, nostack, preserves_flags)) };
}

/// Enables the generic timer event stream (CNTKCTL_EL1.EVNTEN, from CNTVCT
/// bit 15, i.e. every 65536 ticks: ~1 ms at 62.5 MHz) so a WFE wait always
/// wakes up to re-check its condition and deadline even if no SEV comes.
fn enable_event_stream() {
    const EVNTEN: u64 = 1 << 2;
    const EVNTI_SHIFT: u64 = 4;
    const EVNTI: u64 = 15;
    let mut v: u64;
    // SAFETY: CNTKCTL_EL1 only controls EL0 timer access and the event stream.
    unsafe {
        asm!("mrs {}, cntkctl_el1", out(reg) v, options(nomem, nostack, preserves_flags));
        v = (v & !(0xf << EVNTI_SHIFT)) | (EVNTI << EVNTI_SHIFT) | EVNTEN;
        asm!("msr cntkctl_el1, {}", "isb", in(reg) v, options(nomem, nostack, preserves_flags));
    }
}

/// Smallest data cache line size (CTR_EL0.DminLine).
fn dcache_line() -> usize {
    let ctr: u64;
    // SAFETY: reading CTR_EL0 has no side effects.
    unsafe { asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags)) };
    4 << ((ctr >> 16) & 0xf)
}

/// Invalidates the data cache over `range` to the point of coherency: discards
/// stale lines so data written with the MMU off (straight to memory) is what
/// cacheable reads see afterwards. Only for memory we wrote with the MMU off
/// after the entry code invalidated it (`entry.rs`): under a hypervisor
/// DC IVAC may clean as well (it is DC CIVAC at EL1 when HCR_EL2.VM = 1), so
/// a dirty line left by someone else would be written over our data.
pub fn invalidate_dcache(range: Range<usize>) {
    let line = dcache_line();
    for addr in (range.start & !(line - 1)..range.end).step_by(line) {
        // SAFETY: the range is ours and holds nothing dirty: it was invalidated
        // before we wrote it, and only with the MMU off (non-cacheable), so
        // dropping its lines loses nothing. `range` is page aligned (guest.ld),
        // so no line is shared with the loaded image.
        unsafe { asm!("dc ivac, {}", in(reg) addr, options(nostack, preserves_flags)) };
    }
    // SAFETY: a barrier only orders.
    unsafe { asm!("dsb sy", options(nostack, preserves_flags)) };
}

/// Cleans the data cache over `range` to the point of coherency, so a vCPU
/// reading it with its MMU off (non-cacheable) sees our cached writes.
pub fn clean_dcache(range: Range<usize>) {
    let line = dcache_line();
    for addr in (range.start & !(line - 1)..range.end).step_by(line) {
        // SAFETY: cleaning writes dirty data back and changes no values.
        unsafe { asm!("dc cvac, {}", in(reg) addr, options(nostack, preserves_flags)) };
    }
    // SAFETY: a barrier only orders.
    unsafe { asm!("dsb sy", options(nostack, preserves_flags)) };
}

/// Stops this vCPU for good, for when even powering off failed.
pub fn halt() -> ! {
    loop {
        // SAFETY: WFI only waits; interrupts are masked so this is a park.
        unsafe { asm!("wfi", options(nomem, nostack, preserves_flags)) };
    }
}
