/* EL2 exception vectors, guest entry and exit (the world switch of general
 * registers), and FP/SIMD state save/restore. */

/* Layout of GuestRegs (vcpu.rs): x0..x30 at 0..248, pc at 248, pstate at 256. */
.equ GR_PC, 248

/* Offset 0 of the per-CPU block that TPIDR_EL2 points at: the running
 * vCPU's GuestRegs. */
.equ PCPU_GUEST_REGS, 0

.equ EXIT_SYNC, 0
.equ EXIT_IRQ, 1
.equ EXIT_FIQ, 2
.equ EXIT_SERROR, 3
.equ EXIT_AARCH32, 4

.equ HYP_CUR_SP0, 0
.equ HYP_CUR_SPX_SYNC, 1
.equ HYP_CUR_SPX_IRQ, 2
.equ HYP_CUR_SPX_FIQ, 3
.equ HYP_CUR_SPX_SERROR, 4

/* Trap frame of an exception taken from EL2 itself (TrapFrame in exception.rs). */
.macro hyp_trap kind
    sub     sp, sp, #(32 * 8)
    stp     x0, x1, [sp, #(0 * 8)]
    stp     x2, x3, [sp, #(2 * 8)]
    stp     x4, x5, [sp, #(4 * 8)]
    stp     x6, x7, [sp, #(6 * 8)]
    stp     x8, x9, [sp, #(8 * 8)]
    stp     x10, x11, [sp, #(10 * 8)]
    stp     x12, x13, [sp, #(12 * 8)]
    stp     x14, x15, [sp, #(14 * 8)]
    stp     x16, x17, [sp, #(16 * 8)]
    stp     x18, x19, [sp, #(18 * 8)]
    stp     x20, x21, [sp, #(20 * 8)]
    stp     x22, x23, [sp, #(22 * 8)]
    stp     x24, x25, [sp, #(24 * 8)]
    stp     x26, x27, [sp, #(26 * 8)]
    stp     x28, x29, [sp, #(28 * 8)]
    add     x0, sp, #(32 * 8)
    stp     x30, x0, [sp, #(30 * 8)]
    mov     x0, sp
    mov     x1, #\kind
    bl      hyp_exception
.endm

.macro guest_exit code
    stp     x0, x1, [sp, #-16]!
    mov     x0, #\code
    b       __guest_exit
.endm

.section .text.vectors, "ax"
.balign 2048
.global vectors
vectors:
    /* Current EL with SP0: never used at EL2. */
.balign 0x80
    hyp_trap HYP_CUR_SP0
.balign 0x80
    hyp_trap HYP_CUR_SP0
.balign 0x80
    hyp_trap HYP_CUR_SP0
.balign 0x80
    hyp_trap HYP_CUR_SP0
    /* Current EL with SPx: a hypervisor bug (or a stray interrupt). */
.balign 0x80
    hyp_trap HYP_CUR_SPX_SYNC
.balign 0x80
    hyp_trap HYP_CUR_SPX_IRQ
.balign 0x80
    hyp_trap HYP_CUR_SPX_FIQ
.balign 0x80
    hyp_trap HYP_CUR_SPX_SERROR
    /* Lower EL, AArch64: a guest exit. */
.balign 0x80
    guest_exit EXIT_SYNC
.balign 0x80
    guest_exit EXIT_IRQ
.balign 0x80
    guest_exit EXIT_FIQ
.balign 0x80
    guest_exit EXIT_SERROR
    /* Lower EL, AArch32: we never run AArch32 guests. */
.balign 0x80
    guest_exit EXIT_AARCH32
.balign 0x80
    guest_exit EXIT_AARCH32
.balign 0x80
    guest_exit EXIT_AARCH32
.balign 0x80
    guest_exit EXIT_AARCH32

.text
/* u64 __guest_enter(GuestRegs *regs): runs the guest until it traps, saves
 * its general registers back into *regs and returns the EXIT_* code. The
 * per-CPU block must already point at regs. Callee-saved host registers are
 * kept on the host stack, which stays SP_EL2 while the guest runs. */
.global __guest_enter
__guest_enter:
    stp     x29, x30, [sp, #-96]!
    stp     x19, x20, [sp, #16]
    stp     x21, x22, [sp, #32]
    stp     x23, x24, [sp, #48]
    stp     x25, x26, [sp, #64]
    stp     x27, x28, [sp, #80]

    ldp     x1, x2, [x0, #GR_PC]
    msr     elr_el2, x1
    msr     spsr_el2, x2

    ldp     x2, x3, [x0, #(2 * 8)]
    ldp     x4, x5, [x0, #(4 * 8)]
    ldp     x6, x7, [x0, #(6 * 8)]
    ldp     x8, x9, [x0, #(8 * 8)]
    ldp     x10, x11, [x0, #(10 * 8)]
    ldp     x12, x13, [x0, #(12 * 8)]
    ldp     x14, x15, [x0, #(14 * 8)]
    ldp     x16, x17, [x0, #(16 * 8)]
    ldp     x18, x19, [x0, #(18 * 8)]
    ldp     x20, x21, [x0, #(20 * 8)]
    ldp     x22, x23, [x0, #(22 * 8)]
    ldp     x24, x25, [x0, #(24 * 8)]
    ldp     x26, x27, [x0, #(26 * 8)]
    ldp     x28, x29, [x0, #(28 * 8)]
    ldr     x30, [x0, #(30 * 8)]
    ldp     x0, x1, [x0, #(0 * 8)]
    eret
    dsb     nsh
    isb

/* Entered from a lower-EL vector with the guest's x0/x1 pushed and x0 = code. */
__guest_exit:
    mrs     x1, tpidr_el2
    ldr     x1, [x1, #PCPU_GUEST_REGS]
    stp     x2, x3, [x1, #(2 * 8)]
    stp     x4, x5, [x1, #(4 * 8)]
    stp     x6, x7, [x1, #(6 * 8)]
    stp     x8, x9, [x1, #(8 * 8)]
    stp     x10, x11, [x1, #(10 * 8)]
    stp     x12, x13, [x1, #(12 * 8)]
    stp     x14, x15, [x1, #(14 * 8)]
    stp     x16, x17, [x1, #(16 * 8)]
    stp     x18, x19, [x1, #(18 * 8)]
    stp     x20, x21, [x1, #(20 * 8)]
    stp     x22, x23, [x1, #(22 * 8)]
    stp     x24, x25, [x1, #(24 * 8)]
    stp     x26, x27, [x1, #(26 * 8)]
    stp     x28, x29, [x1, #(28 * 8)]
    str     x30, [x1, #(30 * 8)]
    ldp     x2, x3, [sp], #16
    stp     x2, x3, [x1, #(0 * 8)]
    mrs     x2, elr_el2
    mrs     x3, spsr_el2
    stp     x2, x3, [x1, #GR_PC]

    ldp     x19, x20, [sp, #16]
    ldp     x21, x22, [sp, #32]
    ldp     x23, x24, [sp, #48]
    ldp     x25, x26, [sp, #64]
    ldp     x27, x28, [sp, #80]
    ldp     x29, x30, [sp], #96
    ret

/* FP/SIMD state (FpRegs in vcpu.rs): q0..q31 at 0..512, fpsr at 512, fpcr at
 * 520. The hypervisor itself is built general-registers-only, so these are
 * the only instructions at EL2 that touch the guest's FP/SIMD registers. */
.arch_extension fp
.arch_extension simd
.global __fpsimd_save
__fpsimd_save:
    stp     q0, q1, [x0, #(0 * 32)]
    stp     q2, q3, [x0, #(1 * 32)]
    stp     q4, q5, [x0, #(2 * 32)]
    stp     q6, q7, [x0, #(3 * 32)]
    stp     q8, q9, [x0, #(4 * 32)]
    stp     q10, q11, [x0, #(5 * 32)]
    stp     q12, q13, [x0, #(6 * 32)]
    stp     q14, q15, [x0, #(7 * 32)]
    stp     q16, q17, [x0, #(8 * 32)]
    stp     q18, q19, [x0, #(9 * 32)]
    stp     q20, q21, [x0, #(10 * 32)]
    stp     q22, q23, [x0, #(11 * 32)]
    stp     q24, q25, [x0, #(12 * 32)]
    stp     q26, q27, [x0, #(13 * 32)]
    stp     q28, q29, [x0, #(14 * 32)]
    stp     q30, q31, [x0, #(15 * 32)]
    mrs     x1, fpsr
    mrs     x2, fpcr
    add     x3, x0, #512
    stp     x1, x2, [x3]
    ret

.global __fpsimd_restore
__fpsimd_restore:
    ldp     q0, q1, [x0, #(0 * 32)]
    ldp     q2, q3, [x0, #(1 * 32)]
    ldp     q4, q5, [x0, #(2 * 32)]
    ldp     q6, q7, [x0, #(3 * 32)]
    ldp     q8, q9, [x0, #(4 * 32)]
    ldp     q10, q11, [x0, #(5 * 32)]
    ldp     q12, q13, [x0, #(6 * 32)]
    ldp     q14, q15, [x0, #(7 * 32)]
    ldp     q16, q17, [x0, #(8 * 32)]
    ldp     q18, q19, [x0, #(9 * 32)]
    ldp     q20, q21, [x0, #(10 * 32)]
    ldp     q22, q23, [x0, #(11 * 32)]
    ldp     q24, q25, [x0, #(12 * 32)]
    ldp     q26, q27, [x0, #(13 * 32)]
    ldp     q28, q29, [x0, #(14 * 32)]
    ldp     q30, q31, [x0, #(15 * 32)]
    add     x3, x0, #512
    ldp     x1, x2, [x3]
    msr     fpsr, x1
    msr     fpcr, x2
    ret
