//! EL1 exception vectors (installed in VBAR_EL1 by the entry code on every
//! vCPU), probing reads that expect a fault, and the report of anything else.
//!
//! Every exception saves the full register state, FP/SIMD included (Rust code
//! in the handler may use SIMD registers, and an interrupted FP/SIMD check
//! must not see them change). A synchronous exception at a probe's load
//! instruction while that probe is armed is recorded and skipped; any other
//! exception prints a decoded report and FAILs the run.

use core::arch::global_asm;
use core::mem::offset_of;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::smp::MAX_VCPUS;
use crate::{cpu, report};

/// The state saved on the stack at exception entry.
#[repr(C)]
pub struct Frame {
    pub x: [u64; 31],
    pub elr: u64,
    pub spsr: u64,
    pub esr: u64,
    pub far: u64,
    pub fpcr: u64,
    pub fpsr: u64,
    _pad: u64,
    pub q: [u128; 32],
}

const FRAME_SIZE: usize = core::mem::size_of::<Frame>();
const _: () = assert!(FRAME_SIZE.is_multiple_of(16) && offset_of!(Frame, q).is_multiple_of(16));
const _: () = assert!(offset_of!(Frame, elr) == 31 * 8 && offset_of!(Frame, esr) == 33 * 8);

global_asm!(
    r#"
    .section .text.vectors, "ax"
    .balign 2048
    .global exception_vectors
exception_vectors:
    .irp kind, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    .balign 128
    sub     sp, sp, #{frame_size}
    stp     x0, x1, [sp]
    mov     x0, #\kind
    b       exception_entry
    .endr

exception_entry:
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
    mrs     x1, elr_el1
    stp     x30, x1, [sp, #240]         // x30, elr
    mrs     x1, spsr_el1
    mrs     x2, esr_el1
    stp     x1, x2, [sp, #256]          // spsr, esr
    mrs     x1, far_el1
    mrs     x2, fpcr
    stp     x1, x2, [sp, #272]          // far, fpcr
    mrs     x1, fpsr
    str     x1, [sp, #288]              // fpsr
    add     x1, sp, #{q}
    stp     q0, q1, [x1, #0]
    stp     q2, q3, [x1, #32]
    stp     q4, q5, [x1, #64]
    stp     q6, q7, [x1, #96]
    stp     q8, q9, [x1, #128]
    stp     q10, q11, [x1, #160]
    stp     q12, q13, [x1, #192]
    stp     q14, q15, [x1, #224]
    stp     q16, q17, [x1, #256]
    stp     q18, q19, [x1, #288]
    stp     q20, q21, [x1, #320]
    stp     q22, q23, [x1, #352]
    stp     q24, q25, [x1, #384]
    stp     q26, q27, [x1, #416]
    stp     q28, q29, [x1, #448]
    stp     q30, q31, [x1, #480]
    mov     x1, sp
    bl      {handler}                   // (kind, &mut Frame)

    add     x1, sp, #{q}
    ldp     q0, q1, [x1, #0]
    ldp     q2, q3, [x1, #32]
    ldp     q4, q5, [x1, #64]
    ldp     q6, q7, [x1, #96]
    ldp     q8, q9, [x1, #128]
    ldp     q10, q11, [x1, #160]
    ldp     q12, q13, [x1, #192]
    ldp     q14, q15, [x1, #224]
    ldp     q16, q17, [x1, #256]
    ldp     q18, q19, [x1, #288]
    ldp     q20, q21, [x1, #320]
    ldp     q22, q23, [x1, #352]
    ldp     q24, q25, [x1, #384]
    ldp     q26, q27, [x1, #416]
    ldp     q28, q29, [x1, #448]
    ldp     q30, q31, [x1, #480]
    ldr     x1, [sp, #288]
    msr     fpsr, x1
    ldr     x1, [sp, #280]
    msr     fpcr, x1
    ldr     x1, [sp, #256]
    msr     spsr_el1, x1
    ldp     x30, x1, [sp, #240]
    msr     elr_el1, x1                 // the handler may have moved it
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x19, [sp, #144]
    ldp     x20, x21, [sp, #160]
    ldp     x22, x23, [sp, #176]
    ldp     x24, x25, [sp, #192]
    ldp     x26, x27, [sp, #208]
    ldp     x28, x29, [sp, #224]
    ldp     x0, x1, [sp]
    add     sp, sp, #{frame_size}
    eret

    // u64 probe_read(u64 addr): a load whose fault, if armed, is skipped.
    .section .text.probe, "ax"
    .global probe_read_asm
probe_read_asm:
    mov     x1, x0
    mov     x0, xzr
    .global probe_read_load
probe_read_load:
    ldr     x0, [x1]
    ret
    "#,
    frame_size = const FRAME_SIZE,
    q = const offset_of!(Frame, q),
    handler = sym handle_exception,
);

unsafe extern "C" {
    fn probe_read_asm(addr: u64) -> u64;
    static probe_read_load: u8;
}

/// Exception classes (ESR_EL1.EC) we name.
pub const EC_DATA_ABORT_SAME_EL: u64 = 0x25;
const KIND_SYNC_SPX: u64 = 4;
/// ESR_EL1.ISS.FnV: FAR is not valid.
const ESR_FNV: u64 = 1 << 10;

/// A fault recorded by [`probe_read`].
#[derive(Clone, Copy, Debug)]
pub struct Fault {
    pub esr: u64,
    pub far: u64,
}

impl Fault {
    pub fn ec(&self) -> u64 {
        self.esr >> 26
    }

    /// Data/instruction fault status code (ISS bits 0-5).
    pub fn fsc(&self) -> u64 {
        self.esr & 0x3f
    }

    pub fn far_valid(&self) -> bool {
        self.esr & ESR_FNV == 0
    }
}

/// Per vCPU: a probe is armed, and what it caught.
static PROBE_ARMED: [AtomicBool; MAX_VCPUS] = [const { AtomicBool::new(false) }; MAX_VCPUS];
static PROBE_FAULTED: [AtomicBool; MAX_VCPUS] = [const { AtomicBool::new(false) }; MAX_VCPUS];
static PROBE_ESR: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
static PROBE_FAR: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
/// Per vCPU: inside the report of an unexpected exception (so a second one
/// does not recurse).
static REPORTING: [AtomicBool; MAX_VCPUS] = [const { AtomicBool::new(false) }; MAX_VCPUS];

/// Reads 8 bytes at `addr`; a synchronous exception on that load is caught
/// and returned instead of failing the run.
pub fn probe_read(addr: u64) -> Result<u64, Fault> {
    let me = cpu::vcpu_index();
    PROBE_FAULTED[me].store(false, Ordering::Relaxed);
    PROBE_ARMED[me].store(true, Ordering::Relaxed);
    // SAFETY: the load may fault; the handler then skips it (x0 stays 0). It
    // reads into a register only, so no Rust memory is affected.
    let value = unsafe { probe_read_asm(addr) };
    PROBE_ARMED[me].store(false, Ordering::Relaxed);
    if PROBE_FAULTED[me].load(Ordering::Relaxed) {
        let esr = PROBE_ESR[me].load(Ordering::Relaxed);
        Err(Fault {
            esr,
            far: PROBE_FAR[me].load(Ordering::Relaxed),
        })
    } else {
        Ok(value)
    }
}

/// Called by the vectors with the exception kind (vector index 0-15).
extern "C" fn handle_exception(kind: u64, frame: &mut Frame) {
    if kind == KIND_SYNC_SPX && fixup_probe(frame) {
        return;
    }
    report_unexpected(kind, frame)
}

fn fixup_probe(frame: &mut Frame) -> bool {
    let me = cpu::vcpu_index();
    let at_probe = frame.elr == (&raw const probe_read_load) as u64;
    if me >= MAX_VCPUS || !at_probe || !PROBE_ARMED[me].load(Ordering::Relaxed) {
        return false;
    }
    PROBE_ESR[me].store(frame.esr, Ordering::Relaxed);
    PROBE_FAR[me].store(frame.far, Ordering::Relaxed);
    PROBE_FAULTED[me].store(true, Ordering::Relaxed);
    frame.elr += 4;
    true
}

fn report_unexpected(kind: u64, frame: &Frame) -> ! {
    let me = cpu::vcpu_index();
    if me < MAX_VCPUS && REPORTING[me].swap(true, Ordering::Relaxed) {
        // Faulted while reporting a fault: no more formatting, just stop.
        report::fail(format_args!("nested exception"));
    }
    let ec = frame.esr >> 26;
    println!(
        "GUEST: unexpected exception on vcpu {me}: {} {} EC={ec:#x} ({}) ESR={:#x} FAR={:#x} ELR={:#x} SPSR={:#x}",
        kind_name(kind).0,
        kind_name(kind).1,
        ec_name(ec),
        frame.esr,
        frame.far,
        frame.elr,
        frame.spsr,
    );
    if matches!(ec, 0x20 | 0x21 | 0x24 | 0x25) {
        let fsc = frame.esr & 0x3f;
        let wnr = if ec >= 0x24 && frame.esr & (1 << 6) != 0 {
            "write"
        } else {
            "read"
        };
        println!("GUEST:   {wnr}, fault status {fsc:#x} ({})", fsc_name(fsc));
    }
    report::fail(format_args!(
        "unexpected exception EC={ec:#x} ({}) ESR={:#x} FAR={:#x} ELR={:#x} on vcpu {me}",
        ec_name(ec),
        frame.esr,
        frame.far,
        frame.elr
    ))
}

/// Where the exception came from and what it is, from the vector index.
fn kind_name(kind: u64) -> (&'static str, &'static str) {
    const FROM: [&str; 4] = ["EL1t", "EL1h", "EL0/64", "EL0/32"];
    const TYPE: [&str; 4] = ["synchronous", "IRQ", "FIQ", "SError"];
    (FROM[(kind as usize / 4) % 4], TYPE[kind as usize % 4])
}

pub fn ec_name(ec: u64) -> &'static str {
    match ec {
        0x00 => "unknown reason",
        0x01 => "WFI/WFE",
        0x07 => "FP/SIMD access",
        0x0e => "illegal execution state",
        0x15 => "SVC",
        0x16 => "HVC",
        0x17 => "SMC",
        0x18 => "MSR/MRS/system instruction",
        0x19 => "SVE access",
        0x20 => "instruction abort from lower EL",
        0x21 => "instruction abort",
        0x22 => "PC alignment",
        0x24 => "data abort from lower EL",
        0x25 => "data abort",
        0x26 => "SP alignment",
        0x2c => "FP exception",
        0x2f => "SError",
        0x3c => "BRK",
        _ => "?",
    }
}

pub fn fsc_name(fsc: u64) -> &'static str {
    match fsc {
        0x00..=0x03 => "address size fault",
        0x04..=0x07 => "translation fault",
        0x09..=0x0b => "access flag fault",
        0x0d..=0x0f => "permission fault",
        0x10 => "synchronous external abort",
        0x11 => "synchronous tag check fault",
        0x14..=0x17 => "synchronous external abort on table walk",
        0x21 => "alignment fault",
        0x30 => "TLB conflict abort",
        _ => "?",
    }
}
