/* Boot and secondary entry at EL2, MMU off. */
.macro adr_l reg, sym
    adrp    \reg, \sym
    add     \reg, \reg, :lo12:\sym
.endm

.section .text.boot, "ax"
.global _start
_start:
    /* x0 = DTB address from a Linux-style loader, 0 when QEMU loads a bare ELF. */
    mov     x19, x0
    mrs     x1, CurrentEL
    cmp     x1, #(2 << 2)
    b.ne    not_el2
    msr     daifset, #0xf
    adr_l   x1, vectors
    msr     vbar_el2, x1
    isb
    /* Zero .bss before any Rust runs. */
    adr_l   x1, __bss_start
    adr_l   x2, __bss_end
1:  cmp     x1, x2
    b.hs    2f
    stp     xzr, xzr, [x1], #16
    b       1b
2:  mov     x0, #0
    bl      set_cpu_stack
    mov     x0, x19
    bl      boot_main
    b       park

/* Entered by PSCI CPU_ON with x0 = our CPU index (the context id). */
.global secondary_entry
secondary_entry:
    msr     daifset, #0xf
    adr_l   x1, vectors
    msr     vbar_el2, x1
    isb
    mov     x19, x0
    bl      set_cpu_stack
    mov     x0, x19
    bl      secondary_main
    b       park

/* sp = top of CPU x0's stack; clobbers x1, x2. */
set_cpu_stack:
    adr_l   x1, __stacks_start
    add     x2, x0, #1
    lsl     x2, x2, #16          /* STACK_SIZE = 64 KiB, as in qemu-virt.ld */
    add     x1, x1, x2
    mov     sp, x1
    ret

not_el2:
park:
    wfe
    b       park
