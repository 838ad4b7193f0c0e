//! The hypervisor's own EL2 stage-1 map: an identity map of RAM (normal,
//! write-back) and of the device window below RAM (device-nGnRE), with the
//! image's text read-only+executable and everything else execute-never.
//! Built once by the boot CPU with `aarch64-paging`; every CPU loads it.

use aarch64_paging::descriptor::El23Attributes as A;
use aarch64_paging::idmap::IdMap;
use aarch64_paging::mair::{Mair, MairAttribute, NormalMemory};
use aarch64_paging::paging::{El2, MemoryRegion};
use core::sync::atomic::{AtomicU64, Ordering};
use platform::Board;

use crate::arch::{isb, read_sysreg, write_el2_sysreg};

const MAIR: Mair = Mair::EMPTY
    .with_attribute(0, MairAttribute::DEVICE_NGNRE)
    .with_attribute(
        1,
        MairAttribute::normal(
            NormalMemory::WriteBackNonTransientReadWriteAllocate,
            NormalMemory::WriteBackNonTransientReadWriteAllocate,
        ),
    );

const DEVICE: A = A::ATTRIBUTE_INDEX_0
    .union(A::VALID)
    .union(A::ACCESSED)
    .union(A::USER_RES1)
    .union(A::XN);
const DATA: A = A::ATTRIBUTE_INDEX_1
    .union(A::INNER_SHAREABLE)
    .union(A::VALID)
    .union(A::ACCESSED)
    .union(A::USER_RES1)
    .union(A::XN);
const RODATA: A = DATA.union(A::READ_ONLY);
const TEXT: A = DATA.difference(A::XN).union(A::READ_ONLY);

/// Start of RAM on QEMU virt: everything below is devices (and flash).
const DEVICE_WINDOW_END: usize = 0x4000_0000;
/// Root level 1 with 4 KiB pages: a 39-bit (512 GiB) address space.
const ROOT_LEVEL: usize = 1;
const T0SZ: u64 = 64 - 39;

static TTBR0: AtomicU64 = AtomicU64::new(0);
static TCR: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" {
    static __image_start: u8;
    static __text_end: u8;
    static __rodata_end: u8;
}

/// Builds the map (needs the heap) and turns the MMU on for the boot CPU.
pub fn init(board: &Board) {
    let mut idmap = IdMap::new(ROOT_LEVEL, El2);
    let map = |m: &mut IdMap<El2>, start: usize, end: usize, a: A| {
        m.map_range(&MemoryRegion::new(start, end), a)
            .expect("EL2 identity map");
    };
    map(&mut idmap, 0, DEVICE_WINDOW_END, DEVICE);
    for bank in &board.ram {
        map(&mut idmap, bank.base as usize, bank.end() as usize, DATA);
    }
    let text = &raw const __image_start as usize;
    let text_end = &raw const __text_end as usize;
    let rodata_end = &raw const __rodata_end as usize;
    map(&mut idmap, text, text_end, TEXT);
    map(&mut idmap, text_end, rodata_end, RODATA);
    TTBR0.store(idmap.root_address().0 as u64, Ordering::Release);
    TCR.store(tcr(), Ordering::Release);
    enable_this_cpu();
    // The map lives for the life of the machine; each CPU's TTBR0_EL2 points at it.
    core::mem::forget(idmap);
}

/// TCR_EL2 (non-VHE): 4 KiB granule, inner-shareable write-back walks, the
/// physical address size the CPU reports (capped at 48 bits).
fn tcr() -> u64 {
    const RES1: u64 = (1 << 31) | (1 << 23);
    let parange = (read_sysreg!("id_aa64mmfr0_el1") & 0xf).min(5);
    RES1 | (parange << 16) | (3 << 12) | (1 << 10) | (1 << 8) | T0SZ
}

/// Loads the shared map and enables the MMU and caches on this CPU.
pub fn enable_this_cpu() {
    // SCTLR_EL2 RES1 bits (non-VHE) plus M, C, SA, I.
    const SCTLR_RES1: u64 = (1 << 29)
        | (1 << 28)
        | (1 << 23)
        | (1 << 22)
        | (1 << 18)
        | (1 << 16)
        | (1 << 11)
        | (1 << 5)
        | (1 << 4);
    const SCTLR: u64 = SCTLR_RES1 | (1 << 12) | (1 << 3) | (1 << 2) | 1;
    // SAFETY: the attributes, translation control and root of the identity
    // map `init` built (every RAM and device range the hypervisor uses,
    // mapped at its own address), written while translation is still off.
    unsafe {
        write_el2_sysreg!("mair_el2", MAIR.0);
        write_el2_sysreg!("tcr_el2", TCR.load(Ordering::Acquire));
        write_el2_sysreg!("ttbr0_el2", TTBR0.load(Ordering::Acquire));
    }
    isb();
    // SAFETY: invalidating this CPU's EL2 TLB before turning translation on
    // has no effect on memory.
    unsafe { core::arch::asm!("tlbi alle2", "dsb nsh", options(nostack, preserves_flags)) };
    // SAFETY: turns on the identity map just installed (addresses do not
    // change) with caches and alignment checks; RES1 bits kept.
    unsafe { write_el2_sysreg!("sctlr_el2", SCTLR) };
    isb();
}
