//! The EL1 stage-1 identity map, shared by all vCPUs.
//!
//! 4 KiB granule, 39-bit VA (T0SZ = 25) so the walk starts at level 1 with
//! 1 GiB blocks. RAM (from the DTB) is Normal write-back cacheable, inner
//! shareable: exclusives (atomics) and unaligned accesses need Normal memory.
//! Everything else the CPU can address is Device-nGnRE and never executable:
//! the first GiB holds QEMU virt's devices, and addresses past RAM must still
//! be mapped so a wild access reaches stage 2 (the hypervisor) instead of
//! faulting here. A GiB that is only partly RAM is split into 2 MiB blocks
//! (a 2 MiB block with any RAM in it counts as RAM).

use crate::cpu;
use crate::dtb::{MemRange, Platform};
use crate::entry;
use crate::sync::RacyCell;

const GIB: usize = 1 << 30;
const BLOCK_2M: usize = 2 << 20;
const ENTRIES: usize = 512;
/// Level-2 tables for GiBs that are only partly RAM (two per RAM range).
const L2_TABLES: usize = 8;

/// MAIR_EL1: attr0 Device-nGnRnE (unused), attr1 Device-nGnRE, attr2 Normal
/// inner/outer write-back read/write-allocate.
const MAIR: u64 = (0x04 << 8) | (0xff << 16);
const ATTR_DEVICE: u64 = 1 << 2;
const ATTR_NORMAL: u64 = 2 << 2;
const DESC_BLOCK: u64 = 0b01;
const DESC_TABLE: u64 = 0b11;
const SH_INNER: u64 = 3 << 8;
/// Access flag set up front: no access-flag faults.
const AF: u64 = 1 << 10;
const PXN: u64 = 1 << 53;
const UXN: u64 = 1 << 54;
const DEVICE_BLOCK: u64 = DESC_BLOCK | ATTR_DEVICE | AF | PXN | UXN;
const NORMAL_BLOCK: u64 = DESC_BLOCK | ATTR_NORMAL | SH_INNER | AF | UXN;

/// TCR_EL1: T0SZ = 25, walks inner/outer write-back cacheable and inner
/// shareable (IRGN0/ORGN0 = 1, SH0 = 3), TG0 = 4 KiB, EPD1 (no TTBR1 walks).
/// IPS (bits 32-34) is filled in from the CPU's PARange.
const TCR: u64 = 25 | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 23);
const TCR_IPS_SHIFT: u64 = 32;

/// SCTLR_EL1: the ARMv8.0 RES1 bits (11, 20, 22, 23, 28, 29), plus M (MMU),
/// C (data cache), SA/SA0 (stack alignment checks) and I (instruction cache).
/// A (alignment checks) stays off.
const SCTLR: u64 = 0x30d0_0800 | (1 << 0) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 12);

#[repr(C, align(4096))]
struct Table([u64; ENTRIES]);

#[repr(C)]
struct Tables {
    l1: Table,
    l2: [Table; L2_TABLES],
}

/// Written by the boot vCPU with the MMU off before any other vCPU runs, then
/// only read (by the table walker of every vCPU).
static TABLES: RacyCell<Tables> = RacyCell::new(Tables {
    l1: Table([0; ENTRIES]),
    l2: [const { Table([0; ENTRIES]) }; L2_TABLES],
});

/// [MAIR, TCR, TTBR0, SCTLR] for `entry::enable_mmu`. Written by the boot vCPU
/// before it starts others; secondaries read it with their MMU off.
pub static MMU_PARAMS: RacyCell<[u64; 4]> = RacyCell::new([0; 4]);

/// Builds the map and turns the MMU on for the boot vCPU. MMU off on entry.
pub fn enable_boot(plat: &Platform) {
    let (parange, pa_bits) = cpu::pa_range();
    // SAFETY: boot vCPU, MMU off, no other vCPU started: nobody else touches
    // the tables or the parameters now.
    let (tables, params) = unsafe { (&mut *TABLES.get(), &mut *MMU_PARAMS.get()) };
    build(tables, plat.ram(), pa_bits);
    *params = [
        MAIR,
        TCR | (parange << TCR_IPS_SHIFT),
        &tables.l1 as *const Table as u64,
        SCTLR,
    ];

    // Everything we wrote so far (.bss with the tables, the boot stack) went
    // straight to memory. Drop any stale line allocated there since the entry
    // code's invalidation, so cached reads see it. The loaded image needs none:
    // we never wrote it, and the loader cleaned it to the PoC (booting.rst).
    cpu::invalidate_dcache(entry::unloaded_range());
    // SAFETY: the parameters describe an identity map of all RAM (this code,
    // its stack and data included), so execution continues unchanged.
    unsafe { entry::enable_mmu(params) };
}

fn build(t: &mut Tables, ram: &[MemRange], pa_bits: u32) {
    // Output addresses beyond the PA size would be address size faults.
    let l1_entries = (1usize << (pa_bits - 30)).min(ENTRIES);
    let mut next_l2 = 0;
    for (i, entry) in t.l1.0.iter_mut().enumerate().take(l1_entries) {
        let base = i * GIB;
        *entry = match coverage(ram, base, GIB) {
            Coverage::None => base as u64 | DEVICE_BLOCK,
            Coverage::Full => base as u64 | NORMAL_BLOCK,
            Coverage::Partial if next_l2 < L2_TABLES => {
                let l2 = &mut t.l2[next_l2];
                next_l2 += 1;
                fill_l2(l2, ram, base);
                l2 as *const Table as u64 | DESC_TABLE
            }
            // Out of level-2 tables: map the whole GiB as RAM.
            Coverage::Partial => base as u64 | NORMAL_BLOCK,
        };
    }
}

fn fill_l2(l2: &mut Table, ram: &[MemRange], gib_base: usize) {
    for (j, entry) in l2.0.iter_mut().enumerate() {
        let base = gib_base + j * BLOCK_2M;
        *entry = match coverage(ram, base, BLOCK_2M) {
            Coverage::None => base as u64 | DEVICE_BLOCK,
            _ => base as u64 | NORMAL_BLOCK,
        };
    }
}

enum Coverage {
    None,
    Partial,
    Full,
}

fn coverage(ram: &[MemRange], base: usize, size: usize) -> Coverage {
    let end = base + size;
    if ram.iter().any(|r| r.start <= base && end <= r.end()) {
        Coverage::Full
    } else if ram.iter().any(|r| r.start < end && base < r.end()) {
        Coverage::Partial
    } else {
        Coverage::None
    }
}
