//! One pass of the memory self-check, run in assembly while all 32 FP/SIMD
//! registers, FPCR and FPSR hold known values.
//!
//! The guest takes no interrupts, so only the hypervisor can touch these
//! registers during the pass (when it deschedules this vCPU, runs others or
//! itself, and comes back). Compiled Rust may use SIMD registers anywhere, so
//! the load, the memory work and the capture are one assembly routine that
//! uses general-purpose registers only for the memory work.
//!
//! Pattern: 64-bit words, `word(addr) = state ^ addr`, with `state` stepped by
//! a 64-bit LCG from `seed` for each word. The address term catches a page
//! mapped at the wrong place; the sequence catches lost or stale writes.

use core::arch::global_asm;
use core::mem::offset_of;

/// Shared with the assembly below by field offsets.
#[repr(C, align(16))]
pub struct Pass {
    /// v0..v31 loaded before the work ...
    pub q_in: [u128; 32],
    /// ... and as found after it.
    pub q_out: [u128; 32],
    pub base: u64,
    pub len: u64,
    pub seed: u64,
    pub fpcr_in: u64,
    pub fpsr_in: u64,
    pub fpcr_out: u64,
    pub fpsr_out: u64,
    /// Wrapping sum of all words read back.
    pub sum: u64,
    pub bad_words: u64,
    pub first_bad_addr: u64,
    pub first_bad_value: u64,
    pub first_bad_expected: u64,
}

/// The LCG (Knuth's MMIX constants).
const LCG_MUL: u64 = 6_364_136_223_846_793_005;
const LCG_INC: u64 = 1_442_695_040_888_963_407;
/// FPCR bits we set and check: RMode (22-23), FZ (24), DN (25), AHP (26).
pub const FPCR_MASK: u64 = 0x1f << 22;
/// FPSR bits we set and check: IOC..IXC (0-4), IDC (7), QC (27).
pub const FPSR_MASK: u64 = 0x9f | (1 << 27);

global_asm!(
    r#"
    .section .text.fpsimd_pass, "ax"
    .global fpsimd_memory_pass
    // x0 = &mut Pass. AAPCS64: d8-d15 are callee saved, and FPCR/FPSR belong
    // to the caller, so all of them are put back before returning.
fpsimd_memory_pass:
    sub     sp, sp, #80
    stp     d8, d9, [sp]
    stp     d10, d11, [sp, #16]
    stp     d12, d13, [sp, #32]
    stp     d14, d15, [sp, #48]
    mrs     x9, fpcr
    mrs     x10, fpsr
    stp     x9, x10, [sp, #64]

    ldr     x9, [x0, #{fpcr_in}]
    msr     fpcr, x9
    ldr     x9, [x0, #{fpsr_in}]
    msr     fpsr, x9
    add     x9, x0, #{q_in}
    ldp     q0, q1, [x9, #0]
    ldp     q2, q3, [x9, #32]
    ldp     q4, q5, [x9, #64]
    ldp     q6, q7, [x9, #96]
    ldp     q8, q9, [x9, #128]
    ldp     q10, q11, [x9, #160]
    ldp     q12, q13, [x9, #192]
    ldp     q14, q15, [x9, #224]
    ldp     q16, q17, [x9, #256]
    ldp     q18, q19, [x9, #288]
    ldp     q20, q21, [x9, #320]
    ldp     q22, q23, [x9, #352]
    ldp     q24, q25, [x9, #384]
    ldp     q26, q27, [x9, #416]
    ldp     q28, q29, [x9, #448]
    ldp     q30, q31, [x9, #480]

    ldr     x1, [x0, #{base}]
    ldr     x2, [x0, #{len}]
    ldr     x3, [x0, #{seed}]
    ldr     x4, ={mul}
    ldr     x5, ={inc}
    add     x7, x1, x2                  // end

    // Fill.
    mov     x6, x1
    mov     x8, x3
1:  cmp     x6, x7
    b.hs    2f
    eor     x9, x8, x6
    str     x9, [x6], #8
    madd    x8, x8, x4, x5
    b       1b

    // Verify: x11 = sum, x12 = bad words, x13-x15 = first bad addr/got/want.
2:  mov     x6, x1
    mov     x8, x3
    mov     x11, xzr
    mov     x12, xzr
    mov     x13, xzr
    mov     x14, xzr
    mov     x15, xzr
3:  cmp     x6, x7
    b.hs    6f
    eor     x9, x8, x6
    ldr     x10, [x6]
    add     x11, x11, x10
    cmp     x10, x9
    b.ne    5f
4:  add     x6, x6, #8
    madd    x8, x8, x4, x5
    b       3b
5:  cbnz    x12, 51f
    mov     x13, x6
    mov     x14, x10
    mov     x15, x9
51: add     x12, x12, #1
    b       4b

6:  add     x9, x0, #{q_out}
    stp     q0, q1, [x9, #0]
    stp     q2, q3, [x9, #32]
    stp     q4, q5, [x9, #64]
    stp     q6, q7, [x9, #96]
    stp     q8, q9, [x9, #128]
    stp     q10, q11, [x9, #160]
    stp     q12, q13, [x9, #192]
    stp     q14, q15, [x9, #224]
    stp     q16, q17, [x9, #256]
    stp     q18, q19, [x9, #288]
    stp     q20, q21, [x9, #320]
    stp     q22, q23, [x9, #352]
    stp     q24, q25, [x9, #384]
    stp     q26, q27, [x9, #416]
    stp     q28, q29, [x9, #448]
    stp     q30, q31, [x9, #480]
    mrs     x9, fpcr
    str     x9, [x0, #{fpcr_out}]
    mrs     x9, fpsr
    str     x9, [x0, #{fpsr_out}]
    str     x11, [x0, #{sum}]
    str     x12, [x0, #{bad_words}]
    str     x13, [x0, #{bad_addr}]
    str     x14, [x0, #{bad_value}]
    str     x15, [x0, #{bad_expected}]

    ldp     x9, x10, [sp, #64]
    msr     fpcr, x9
    msr     fpsr, x10
    ldp     d8, d9, [sp]
    ldp     d10, d11, [sp, #16]
    ldp     d12, d13, [sp, #32]
    ldp     d14, d15, [sp, #48]
    add     sp, sp, #80
    ret
    .ltorg
    "#,
    q_in = const offset_of!(Pass, q_in),
    q_out = const offset_of!(Pass, q_out),
    base = const offset_of!(Pass, base),
    len = const offset_of!(Pass, len),
    seed = const offset_of!(Pass, seed),
    fpcr_in = const offset_of!(Pass, fpcr_in),
    fpsr_in = const offset_of!(Pass, fpsr_in),
    fpcr_out = const offset_of!(Pass, fpcr_out),
    fpsr_out = const offset_of!(Pass, fpsr_out),
    sum = const offset_of!(Pass, sum),
    bad_words = const offset_of!(Pass, bad_words),
    bad_addr = const offset_of!(Pass, first_bad_addr),
    bad_value = const offset_of!(Pass, first_bad_value),
    bad_expected = const offset_of!(Pass, first_bad_expected),
    mul = const LCG_MUL,
    inc = const LCG_INC,
);

unsafe extern "C" {
    fn fpsimd_memory_pass(pass: *mut Pass);
}

/// A mismatch in the FP/SIMD state after a pass.
pub enum FpMismatch {
    Vreg { index: usize, want: u128, got: u128 },
    Fpcr { want: u64, got: u64 },
    Fpsr { want: u64, got: u64 },
}

impl Pass {
    /// A pass over `[base, base + len)` (8-byte aligned) with FP/SIMD values
    /// distinct for each (`vcpu`, `pass`).
    pub fn new(base: usize, len: usize, vcpu: usize, pass: usize) -> Self {
        let tag = ((vcpu as u64) << 8) | pass as u64;
        let mut q_in = [0u128; 32];
        for (i, q) in q_in.iter_mut().enumerate() {
            let lo = splitmix64(tag << 16 | i as u64);
            *q = u128::from(lo) | u128::from(splitmix64(!lo)) << 64;
        }
        // FPCR (round mode, FZ, DN, AHP) and FPSR (sticky flags, QC) values
        // are never zero and differ for each (vCPU, pass) with pass 0 or 1 of
        // up to 15 vCPUs, so neither a reset nor another vCPU's state passes.
        let combo = (vcpu * 2 + pass) as u64;
        let fpcr_in = deposit(1 + combo % 31, FPCR_MASK);
        let fpsr_in = deposit(1 + combo % 127, FPSR_MASK);
        Self {
            q_in,
            q_out: [0; 32],
            base: base as u64,
            len: len as u64,
            seed: splitmix64(0x5eed_0000 ^ tag),
            fpcr_in,
            fpsr_in,
            fpcr_out: 0,
            fpsr_out: 0,
            sum: 0,
            bad_words: 0,
            first_bad_addr: 0,
            first_bad_value: 0,
            first_bad_expected: 0,
        }
    }

    /// Fills and verifies the area with the FP/SIMD state loaded throughout.
    pub fn run(&mut self) {
        // SAFETY: the caller's area [base, base + len) is RAM that only this
        // vCPU uses and nothing in Rust refers to; the routine keeps the
        // AAPCS64 contract (callee-saved d8-d15, FPCR and FPSR restored).
        unsafe { fpsimd_memory_pass(self) };
    }

    /// The first FP/SIMD value that did not survive the pass, if any.
    pub fn fp_mismatch(&self) -> Option<FpMismatch> {
        if let Some(i) = (0..32).find(|&i| self.q_in[i] != self.q_out[i]) {
            return Some(FpMismatch::Vreg {
                index: i,
                want: self.q_in[i],
                got: self.q_out[i],
            });
        }
        let (want, got) = (self.fpcr_in & FPCR_MASK, self.fpcr_out & FPCR_MASK);
        if want != got {
            return Some(FpMismatch::Fpcr { want, got });
        }
        let (want, got) = (self.fpsr_in & FPSR_MASK, self.fpsr_out & FPSR_MASK);
        if want != got {
            return Some(FpMismatch::Fpsr { want, got });
        }
        None
    }
}

/// Deposits the low bits of `n`, in order, into the set bits of `mask`.
fn deposit(mut n: u64, mask: u64) -> u64 {
    let mut out = 0;
    for bit in (0..64).filter(|b| mask & (1 << b) != 0) {
        out |= (n & 1) << bit;
        n >>= 1;
    }
    out
}

/// A well-mixed 64-bit value from `x` (splitmix64 finaliser).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
