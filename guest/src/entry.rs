//! Entry code: the arm64 `Image` header, the boot vCPU's entry, the secondary
//! vCPUs' entry (PSCI CPU_ON) and the MMU switch-on shared by both.
//!
//! Boot protocol (Linux `Documentation/arch/arm64/booting.rst`): entered at
//! EL1 with the MMU off, `x0` = DTB address, the image loaded at its link
//! address 0x4008_0000 (RAM base + `text_offset`).
//!
//! Header flags = 0xa: little endian (bit 0 = 0), 4 KiB pages (bits 1-2 = 1),
//! "may be placed anywhere" (bit 3 = 1). The code is linked at a fixed address
//! and not position independent, so a loader must use exactly RAM base +
//! `text_offset`; the entry code checks this and, if violated, prints a FAIL
//! line directly on the PL011 at 0x0900_0000 and powers off.
//!
//! Caches (booting.rst: "the address range corresponding to the loaded kernel
//! image must be cleaned to the PoC"): only the *loaded* part (text, rodata,
//! data) is clean; we run from it and never write it with the MMU off. The
//! rest of the image (.bss and the stacks, NOLOAD) is RAM in whatever state its
//! last user left it, possibly with dirty lines that could be evicted over
//! what we write there with the MMU off (non-cacheable, straight to memory).
//! So the entry code invalidates that range *before* writing it, and
//! `mmu::enable_boot` invalidates it again before turning the MMU on (lines
//! speculatively allocated meanwhile through a cacheable alias are stale).
//! Under a hypervisor, DC IVAC at EL1 is performed as DC CIVAC
//! (HCR_EL2.VM = 1): that is why the first pass must come before our writes,
//! not only after them.

use core::arch::global_asm;

use crate::{mmu, smp};

/// Linux arm64 `Image` header magic, "ARM\x64" little endian.
const IMAGE_MAGIC: u32 = 0x644d_5241;
/// Where the image sits above the 2 MiB aligned RAM base.
const TEXT_OFFSET: u64 = 0x80000;
/// LE, 4 KiB pages, placement anywhere (see the module comment).
const IMAGE_FLAGS: u64 = 0xa;
/// CPACR_EL1.FPEN = 0b11: FP/SIMD does not trap at EL1/EL0. Rust code may use
/// SIMD registers for plain copies, so this comes before any Rust.
const CPACR_FPEN: u64 = 3 << 20;
const PSCI_SYSTEM_OFF: u32 = 0x8400_0008;
const PSCI_CPU_OFF: u32 = 0x8400_0002;

global_asm!(
    r#"
    .section .text.head, "ax"
    .global _start
_start:
    b       primary_entry               // code0
    .long   0                           // code1
    .quad   {text_offset}               // text_offset
    .quad   __image_size                // image_size, .bss and stacks included
    .quad   {flags}                     // flags
    .quad   0, 0, 0                     // res2..res4
    .long   {magic}                     // magic "ARM\x64"
    .long   0                           // res5 (no PE/COFF header)

primary_entry:
    msr     daifset, #0xf
    mov     x19, x0                     // the DTB, kept across the setup
    adr     x1, _start                  // where we run ...
    ldr     x2, =_start                 // ... and where we are linked
    cmp     x1, x2
    b.ne    wrong_load_address
    bl      cpu_early_init

    // Nothing dirty may be left over .bss and the stacks when we write them
    // with the MMU off (see the module comment).
    adrp    x0, __bss_start
    add     x0, x0, :lo12:__bss_start
    adrp    x1, __image_end
    add     x1, x1, :lo12:__image_end
    bl      dcache_inval_poc

    // Zero .bss (MMU off: these stores go straight to memory).
    adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
1:  cmp     x1, x2
    b.hs    2f
    stp     xzr, xzr, [x1], #16
    b       1b
2:
    // The boot vCPU is vCPU 0 and uses the first stack.
    mov     x0, xzr
    bl      stack_top
    mov     sp, x0
    msr     tpidr_el1, xzr
    mov     x0, x19
    bl      {boot_main}
3:  wfe
    b       3b

    // x0 = vCPU index -> x0 = top of its stack. Leaf, no stack.
stack_top:
    adrp    x1, __stacks_start
    add     x1, x1, :lo12:__stacks_start
    mov     x2, #{stack_size}
    madd    x0, x0, x2, x2              // (index + 1) * size
    add     x0, x0, x1
    ret

    // Per-vCPU state every entry path needs before Rust runs. Leaf, no stack.
cpu_early_init:
    msr     spsel, #1                   // EL1h: exceptions and code on SP_EL1
    mov     x9, #{cpacr}
    msr     cpacr_el1, x9
    adrp    x9, exception_vectors        // exceptions.rs
    add     x9, x9, :lo12:exception_vectors
    msr     vbar_el1, x9
    isb
    ret

    // Invalidates the data cache to the PoC over [x0, x1) by line
    // (CTR_EL0.DminLine), then DSB SY. Leaf, no stack; clobbers x0, x2, x3.
    .global dcache_inval_poc
dcache_inval_poc:
    mrs     x3, ctr_el0
    ubfx    x3, x3, #16, #4
    mov     x2, #4
    lsl     x2, x2, x3                  // line size in bytes
    sub     x3, x2, #1
    bic     x0, x0, x3
1:  cmp     x0, x1
    b.hs    2f
    dc      ivac, x0
    add     x0, x0, x2
    b       1b
2:  dsb     sy
    ret

wrong_load_address:
    adr     x1, 9f
    mov     x2, #0x09000000             // QEMU virt PL011
5:  ldrb    w3, [x1], #1
    cbz     w3, 7f
6:  ldr     w4, [x2, #0x18]             // UARTFR
    tbnz    w4, #5, 6b                  // TXFF
    str     w3, [x2]                    // UARTDR
    b       5b
7:  ldr     x0, ={system_off}
    hvc     #0
8:  wfe
    b       8b
9:  .asciz  "GUEST RESULT: FAIL image not loaded at its link address 0x40080000\r\n"
    .balign 4
    .ltorg

    // PSCI CPU_ON entry point of the secondary vCPUs: x0 = context id = index.
    .section .text.secondary, "ax"
    .global secondary_entry
secondary_entry:
    msr     daifset, #0xf
    mov     x19, x0
    bl      cpu_early_init
    cmp     x19, #{max_vcpus}
    b.hs    1f
    // The MMU goes on before any memory is touched: the boot vCPU's cached
    // view of our stack could otherwise hide what we wrote with it off.
    adrp    x0, {mmu_params}
    add     x0, x0, :lo12:{mmu_params}
    bl      enable_mmu
    mov     x0, x19
    bl      stack_top
    mov     sp, x0
    msr     tpidr_el1, x19
    mov     x0, x19
    bl      {secondary_main}
1:  ldr     x0, ={cpu_off}              // no stack for this index: go away
    hvc     #0
2:  wfe
    b       2b
    .ltorg

    // x0 = &[MAIR, TCR, TTBR0, SCTLR]. Turns the EL1 stage-1 MMU on.
    .global enable_mmu
enable_mmu:
    ldp     x1, x2, [x0]
    ldp     x3, x4, [x0, #16]
    msr     mair_el1, x1
    msr     tcr_el1, x2
    msr     ttbr0_el1, x3
    isb
    tlbi    vmalle1                     // nothing stale from a previous life
    dsb     nsh
    isb
    msr     sctlr_el1, x4
    isb
    ic      iallu
    dsb     nsh
    isb
    ret
    "#,
    text_offset = const TEXT_OFFSET,
    flags = const IMAGE_FLAGS,
    magic = const IMAGE_MAGIC,
    cpacr = const CPACR_FPEN,
    stack_size = const smp::STACK_SIZE,
    max_vcpus = const smp::MAX_VCPUS,
    system_off = const PSCI_SYSTEM_OFF,
    cpu_off = const PSCI_CPU_OFF,
    mmu_params = sym mmu::MMU_PARAMS,
    boot_main = sym crate::boot_main,
    secondary_main = sym smp::secondary_main,
);

unsafe extern "C" {
    /// Turns the MMU on with `params` = [MAIR, TCR, TTBR0, SCTLR].
    pub fn enable_mmu(params: *const [u64; 4]);
    /// PSCI CPU_ON entry point of the secondary vCPUs.
    pub fn secondary_entry();
    static __image_start: u8;
    static __bss_start: u8;
    static __image_end: u8;
}

/// Where the image (code, data, .bss and stacks) is in memory.
pub fn image_range() -> core::ops::Range<usize> {
    (&raw const __image_start) as usize..(&raw const __image_end) as usize
}

/// The part of the image the loader did not load (.bss and the stacks, page
/// aligned): the only part written with the MMU off.
pub fn unloaded_range() -> core::ops::Range<usize> {
    (&raw const __bss_start) as usize..(&raw const __image_end) as usize
}
