//! GICv3 distributor and redistributor register maps (only what the
//! hypervisor programs: group, enable, priority, routing, wake-up).

use tock_registers::register_bitfields;
use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, ReadWrite};

register_bitfields! [u32,
    /// GICD_CTLR, the distributor control register, with the bit layout of a GIC
    /// with one security state (GICD_CTLR.DS = 1).
    // `register_bitfields!` also generates an undocumented `Register` type and
    // `SET`/`CLEAR`/`Value` items per field, which no doc comment can reach.
    #[allow(missing_docs)]
    pub GICD_CTLR [
        /// Register Write Pending: reads 1 while a write to GICD_CTLR (or the
        /// disabling of an interrupt) is still taking effect; poll it to 0 before
        /// relying on the new state.
        RWP OFFSET(31) NUMBITS(1) [],
        /// Affinity routing (the only mode we use). With one security state (DS=1) it is bit 4.
        ARE OFFSET(4) NUMBITS(1) [],
        /// Forward Group 1 interrupts (the group everything here uses).
        ENABLE_GRP1 OFFSET(1) NUMBITS(1) [],
        /// Forward Group 0 interrupts.
        ENABLE_GRP0 OFFSET(0) NUMBITS(1) [],
    ],
    /// GICR_WAKER, a redistributor's power handshake with its CPU interface.
    // Generated items without docs, as for `GICD_CTLR`.
    #[allow(missing_docs)]
    pub GICR_WAKER [
        /// Read-only: 1 while the CPU interface is quiescent. After clearing
        /// `PROCESSOR_SLEEP`, wait for this to read 0 before using the interface.
        CHILDREN_ASLEEP OFFSET(2) NUMBITS(1) [],
        /// 1 marks the connected CPU as asleep (no interrupts are forwarded to it);
        /// clear it to wake the redistributor.
        PROCESSOR_SLEEP OFFSET(1) NUMBITS(1) [],
    ],
];

register_structs! {
    /// The distributor's register block (64 KiB): shared peripheral interrupts
    /// (SPIs, INTID 32 and up). Per-INTID banks hold 32 INTIDs per 32-bit word
    /// (bit `intid % 32` of word `intid / 32`) unless a field says otherwise.
    pub GicdRegs {
        /// GICD_CTLR: group enables and affinity routing (see [`GICD_CTLR`]).
        (0x0000 => pub ctlr: ReadWrite<u32, GICD_CTLR::Register>),
        /// GICD_TYPER: bits 4:0 (ITLinesNumber) give the number of INTIDs the
        /// distributor handles as 32 * (ITLinesNumber + 1).
        (0x0004 => pub typer: ReadOnly<u32>),
        /// GICD_IIDR: implementer, revision and product of the distributor.
        (0x0008 => pub iidr: ReadOnly<u32>),
        (0x000c => _reserved0),
        /// GICD_IGROUPR<n>: the group of each INTID, 1 = Group 1.
        (0x0080 => pub igroupr: [ReadWrite<u32>; 32]),
        /// GICD_ISENABLER<n>: write 1 to enable forwarding an INTID; reads the
        /// enable bits.
        (0x0100 => pub isenabler: [ReadWrite<u32>; 32]),
        /// GICD_ICENABLER<n>: write 1 to disable forwarding an INTID (complete once
        /// GICD_CTLR.RWP reads 0); reads the enable bits.
        (0x0180 => pub icenabler: [ReadWrite<u32>; 32]),
        /// GICD_ISPENDR<n>: write 1 to make an INTID pending; reads the pending bits.
        (0x0200 => pub ispendr: [ReadWrite<u32>; 32]),
        /// GICD_ICPENDR<n>: write 1 to clear an INTID's pending state.
        (0x0280 => pub icpendr: [ReadWrite<u32>; 32]),
        /// GICD_ISACTIVER<n>: write 1 to make an INTID active; reads the active bits.
        (0x0300 => pub isactiver: [ReadWrite<u32>; 32]),
        /// GICD_ICACTIVER<n>: write 1 to clear an INTID's active state.
        (0x0380 => pub icactiver: [ReadWrite<u32>; 32]),
        /// GICD_IPRIORITYR<n>: one priority byte per INTID, four per word (byte
        /// `intid % 4` of word `intid / 4`); lower values are higher priority.
        (0x0400 => pub ipriorityr: [ReadWrite<u32>; 256]),
        (0x0800 => _reserved1),
        /// GICD_ICFGR<n>: two bits per INTID, sixteen per word; the upper bit of a
        /// pair set means edge-triggered, clear means level-sensitive.
        (0x0c00 => pub icfgr: [ReadWrite<u32>; 64]),
        /// GICD_IGRPMODR<n>: group modifier; RAZ/WI with one security state.
        (0x0d00 => pub igrpmodr: [ReadWrite<u32>; 32]),
        (0x0d80 => _reserved2),
        /// GICD_IROUTER<n>: where SPI `n` is delivered, indexed by INTID (entries
        /// 0..32 are reserved): the target's affinity (Aff3 in bits 39:32, Aff2.Aff1.Aff0
        /// in bits 23:0), or any CPU when bit 31 (Interrupt_Routing_Mode) is set.
        (0x6000 => pub irouter: [ReadWrite<u64>; 1020]),
        (0x7fe0 => _reserved3),
        (0x10000 => @END),
    }
}

register_structs! {
    /// One redistributor's RD_base frame.
    pub GicrRdRegs {
        /// GICR_CTLR: LPI enable and register-write-pending state (LPIs unused here).
        (0x0000 => pub ctlr: ReadWrite<u32>),
        /// GICR_IIDR: implementer, revision and product of the redistributor.
        (0x0004 => pub iidr: ReadOnly<u32>),
        /// GICR_TYPER: bits 63:32 hold the affinity (Aff3.Aff2.Aff1.Aff0) of the CPU
        /// this redistributor serves, bit 4 ([`GICR_TYPER_LAST`]) marks the last
        /// redistributor of a region.
        (0x0008 => pub typer: ReadOnly<u64>),
        (0x0010 => _reserved0),
        /// GICR_WAKER: wakes the redistributor (see [`GICR_WAKER`]).
        (0x0014 => pub waker: ReadWrite<u32, GICR_WAKER::Register>),
        (0x0018 => _reserved1),
        (0x10000 => @END),
    }
}

register_structs! {
    /// One redistributor's SGI_base frame (SGIs and PPIs, INTIDs 0..32).
    pub GicrSgiRegs {
        (0x0000 => _reserved0),
        /// GICR_IGROUPR0: the group of each SGI/PPI, bit n for INTID n, 1 = Group 1.
        (0x0080 => pub igroupr0: ReadWrite<u32>),
        (0x0084 => _reserved1),
        /// GICR_ISENABLER0: write 1 to enable an SGI/PPI; reads the enable bits.
        (0x0100 => pub isenabler0: ReadWrite<u32>),
        (0x0104 => _reserved2),
        /// GICR_ICENABLER0: write 1 to disable an SGI/PPI.
        (0x0180 => pub icenabler0: ReadWrite<u32>),
        (0x0184 => _reserved3),
        /// GICR_ISPENDR0: write 1 to make an SGI/PPI pending; reads the pending bits.
        (0x0200 => pub ispendr0: ReadWrite<u32>),
        (0x0204 => _reserved4),
        /// GICR_ICPENDR0: write 1 to clear an SGI/PPI's pending state.
        (0x0280 => pub icpendr0: ReadWrite<u32>),
        (0x0284 => _reserved5),
        /// GICR_IPRIORITYR0..7: one priority byte per SGI/PPI, four per word (byte
        /// `intid % 4` of word `intid / 4`); lower values are higher priority.
        (0x0400 => pub ipriorityr: [ReadWrite<u32>; 8]),
        (0x0420 => _reserved6),
        /// GICR_ICFGR0: trigger mode of the SGIs (INTIDs 0..16), always edge;
        /// read-only.
        (0x0c00 => pub icfgr0: ReadWrite<u32>),
        /// GICR_ICFGR1: trigger mode of the PPIs (INTIDs 16..32), two bits each; the
        /// upper bit of a pair set means edge-triggered.
        (0x0c04 => pub icfgr1: ReadWrite<u32>),
        (0x0c08 => _reserved7),
        /// GICR_IGRPMODR0: group modifier of the SGIs/PPIs; RAZ/WI with one security
        /// state.
        (0x0d00 => pub igrpmodr0: ReadWrite<u32>),
        (0x0d04 => _reserved8),
        (0x10000 => @END),
    }
}

/// Size of one GICv3 redistributor (RD_base + SGI_base frames).
pub const GICR_STRIDE: u64 = 0x2_0000;
/// Offset of the SGI_base frame inside a redistributor.
pub const GICR_SGI_OFFSET: u64 = 0x1_0000;
/// `GICR_TYPER.Last`: this is the last redistributor of its region.
pub const GICR_TYPER_LAST: u64 = 1 << 4;
/// INTIDs at and above this value are "special" (1020..1023: spurious).
pub const INTID_SPURIOUS: u32 = 1020;
