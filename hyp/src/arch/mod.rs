//! `arch`: what the hypervisor runs on. Lowest layer: may use only `platform`
//! and external crates, nothing else of `hyp`.
//!
//! Owns the boot entry, exception vectors and guest world switch (assembly
//! here), system-register access, EL2 setup (`el2`) and the EL2 stage-1 MMU
//! (`mmu`), the physical timer (`timer`), the GIC distributor and CPU
//! interface (`gic`), the hypervisor's own UART output and `println!`
//! (`uart`), per-CPU state (`percpu`), semihosting exit (`semihost`) and the
//! report of a hypervisor fault (`exception`). The register blocks the
//! assembly saves and restores (`GuestRegs`, `FpRegs`) are defined here
//! because their layout is the assembly's.

pub mod el2;
pub mod esr;
pub mod exception;
pub mod gic;
pub mod mmu;
pub mod percpu;
pub mod semihost;
pub mod timer;
pub mod uart;

use core::arch::global_asm;

global_asm!(include_str!("entry.S"));
global_asm!(include_str!("vectors.S"));

/// Exit codes `__guest_enter` returns (the EXIT_* values in vectors.S).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    Sync,
    Irq,
    Fiq,
    SError,
    Aarch32,
}

impl ExitKind {
    pub fn from_code(code: u64) -> ExitKind {
        match code {
            0 => ExitKind::Sync,
            1 => ExitKind::Irq,
            2 => ExitKind::Fiq,
            3 => ExitKind::SError,
            _ => ExitKind::Aarch32,
        }
    }
}

/// General registers, PC and PSTATE. Layout known to vectors.S (saved and restored there).
#[repr(C)]
#[derive(Clone, Default)]
pub struct GuestRegs {
    pub x: [u64; 31],
    pub pc: u64,
    pub pstate: u64,
}

/// FP/SIMD registers. Layout known to vectors.S (saved and restored there).
#[repr(C, align(16))]
#[derive(Clone, Default)]
pub struct FpRegs {
    pub q: [u128; 32],
    pub fpsr: u64,
    pub fpcr: u64,
}

unsafe extern "C" {
    /// Runs the guest whose registers the per-CPU block points at.
    pub fn __guest_enter(regs: *mut GuestRegs) -> u64;
    pub fn __fpsimd_save(fp: *mut FpRegs);
    pub fn __fpsimd_restore(fp: *const FpRegs);
    pub fn secondary_entry();
}

/// Reads a system register by name.
macro_rules! read_sysreg {
    ($name:literal) => {{
        let v: u64;
        // SAFETY: reading a system register has no side effects on memory.
        unsafe { core::arch::asm!(concat!("mrs {}, ", $name), out(reg) v, options(nomem, nostack, preserves_flags)) };
        v
    }};
}

/// Writes a system register by name: only one that `guest_state_register`
/// accepts (checked at compile time). For EL2's own controls use
/// `write_el2_sysreg!` inside an `unsafe` block.
macro_rules! write_sysreg {
    ($name:literal, $v:expr) => {{
        const _: () = assert!(
            $crate::arch::guest_state_register($name),
            concat!($name, " controls EL2: use write_el2_sysreg! in an unsafe block")
        );
        let v: u64 = $v;
        // SAFETY: the register is guest (EL1/EL0) state, the GIC CPU
        // interface or a timer (asserted above): with HCR_EL2.E2H = 0 none of
        // them changes EL2's translation, exception or memory state, so no
        // value written here can break the hypervisor's memory safety.
        unsafe { core::arch::asm!(concat!("msr ", $name, ", {}"), in(reg) v, options(nostack, preserves_flags)) };
    }};
}

/// Writes one of EL2's own control registers (HCR, SCTLR, TCR, TTBR0, MAIR,
/// VTCR, VTTBR, TPIDR, CPTR, MDCR, CNTHCTL, ICC_SRE_EL2). Expands to the bare
/// instruction, so it only compiles inside an `unsafe` block whose SAFETY
/// comment says why the new value keeps the hypervisor's translation,
/// exception vectors and per-CPU state sound.
macro_rules! write_el2_sysreg {
    ($name:literal, $v:expr) => {{
        let v: u64 = $v;
        core::arch::asm!(concat!("msr ", $name, ", {}"), in(reg) v, options(nostack, preserves_flags))
    }};
}

/// Whether writing system register `name` touches only guest-visible state:
/// an EL1 or EL0 register, the GIC's virtual interface (`ich_*`), a timer
/// (`cnthp_*`, `cntvoff_el2`) or the virtual CPU ids (`vpidr_el2`,
/// `vmpidr_el2`).
pub const fn guest_state_register(name: &str) -> bool {
    let b = name.as_bytes();
    ends_with(b, b"_el1")
        || ends_with(b, b"_el0")
        || starts_with(b, b"ich_")
        || starts_with(b, b"cnthp_")
        || eq(b, b"cntvoff_el2")
        || eq(b, b"vpidr_el2")
        || eq(b, b"vmpidr_el2")
}

const fn starts_with(s: &[u8], p: &[u8]) -> bool {
    if s.len() < p.len() {
        return false;
    }
    let mut i = 0;
    while i < p.len() {
        if s[i] != p[i] {
            return false;
        }
        i += 1;
    }
    true
}

const fn ends_with(s: &[u8], p: &[u8]) -> bool {
    if s.len() < p.len() {
        return false;
    }
    let off = s.len() - p.len();
    let mut i = 0;
    while i < p.len() {
        if s[off + i] != p[i] {
            return false;
        }
        i += 1;
    }
    true
}

const fn eq(s: &[u8], p: &[u8]) -> bool {
    s.len() == p.len() && starts_with(s, p)
}

pub(crate) use read_sysreg;
pub(crate) use write_el2_sysreg;
pub(crate) use write_sysreg;

/// Instruction synchronisation barrier.
pub fn isb() {
    // SAFETY: a barrier has no memory effects beyond ordering.
    unsafe { core::arch::asm!("isb", options(nostack, preserves_flags)) };
}

/// Data synchronisation barrier, inner shareable: every memory access before
/// it is complete and observed by all CPUs before any access after it.
pub fn dsb_ish() {
    // SAFETY: a barrier has no memory effects beyond ordering (no `nomem`:
    // the compiler must not move memory accesses across it).
    unsafe { core::arch::asm!("dsb ish", options(nostack, preserves_flags)) };
}

/// Waits for an interrupt (or event); interrupts stay masked at EL2, a
/// pending one still wakes the CPU and is then acknowledged by polling.
pub fn wfi() {
    // SAFETY: WFI only suspends the CPU until a wake-up event.
    unsafe { core::arch::asm!("wfi", options(nomem, nostack, preserves_flags)) };
}

/// Index of this physical CPU (set up at boot from the per-CPU block).
pub fn mpidr_aff() -> u64 {
    read_sysreg!("mpidr_el1") & 0xff_00ff_ffff
}
