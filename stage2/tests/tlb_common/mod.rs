//! What the TLB and cache tests (`tlb.rs`, `tlb_order.rs`, `cache.rs`) share: one
//! 40-bit-IPA table of VMID 0x1234 and the addresses they map.

use stage2::*;

pub const IPA: u64 = 0x4000_0000;
pub const PA: u64 = 0x1_0000_0000;
pub const MIB2: u64 = 2 << 20;

pub fn cfg() -> S2Config {
    S2Config::new(2, 40, VmidBits::Sixteen).unwrap()
}

pub fn new_table(mem: &HostMemory) -> Stage2Table<&HostMemory> {
    Stage2Table::new(cfg(), 0x1234, mem).unwrap()
}
