//! ARM PL011 UART register map (used by the hypervisor's own console driver and
//! by the per-VM emulated PL011, which must present the same registers).

use tock_registers::register_bitfields;
use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, ReadWrite, WriteOnly};

register_bitfields! [u32,
    pub FR [
        /// Transmit FIFO full.
        TXFF OFFSET(5) NUMBITS(1) [],
        /// Receive FIFO empty.
        RXFE OFFSET(4) NUMBITS(1) [],
        BUSY OFFSET(3) NUMBITS(1) [],
    ],
    pub CR [
        RXE OFFSET(9) NUMBITS(1) [],
        TXE OFFSET(8) NUMBITS(1) [],
        UARTEN OFFSET(0) NUMBITS(1) [],
    ],
    pub INT [
        /// Receive timeout.
        RT OFFSET(6) NUMBITS(1) [],
        TX OFFSET(5) NUMBITS(1) [],
        RX OFFSET(4) NUMBITS(1) [],
    ],
];

register_structs! {
    pub Pl011Regs {
        (0x000 => pub dr: ReadWrite<u32>),
        (0x004 => pub rsr: ReadWrite<u32>),
        (0x008 => _reserved0),
        (0x018 => pub fr: ReadOnly<u32, FR::Register>),
        (0x01c => _reserved1),
        (0x024 => pub ibrd: ReadWrite<u32>),
        (0x028 => pub fbrd: ReadWrite<u32>),
        (0x02c => pub lcr_h: ReadWrite<u32>),
        (0x030 => pub cr: ReadWrite<u32, CR::Register>),
        (0x034 => pub ifls: ReadWrite<u32>),
        (0x038 => pub imsc: ReadWrite<u32, INT::Register>),
        (0x03c => pub ris: ReadOnly<u32, INT::Register>),
        (0x040 => pub mis: ReadOnly<u32, INT::Register>),
        (0x044 => pub icr: WriteOnly<u32, INT::Register>),
        (0x048 => pub dmacr: ReadWrite<u32>),
        (0x04c => _reserved2),
        (0x1000 => @END),
    }
}

/// Register offsets, for the emulated device (which decodes trapped accesses).
pub mod offset {
    pub const DR: u64 = 0x000;
    pub const RSR: u64 = 0x004;
    pub const FR: u64 = 0x018;
    pub const IBRD: u64 = 0x024;
    pub const FBRD: u64 = 0x028;
    pub const LCR_H: u64 = 0x02c;
    pub const CR: u64 = 0x030;
    pub const IFLS: u64 = 0x034;
    pub const IMSC: u64 = 0x038;
    pub const RIS: u64 = 0x03c;
    pub const MIS: u64 = 0x040;
    pub const ICR: u64 = 0x044;
    pub const DMACR: u64 = 0x048;
    /// Peripheral and PrimeCell identification registers, 0xfe0..0x1000.
    pub const ID_START: u64 = 0xfe0;
}

/// Identification bytes a PL011 r1p5 reports at 0xfe0..0x1000 (Linux's amba
/// bus matches on them).
pub const ID_BYTES: [u32; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

/// A polled console on a real PL011. Holds only the address, so it can be
/// shared between CPUs (callers serialise whole lines with their own lock).
pub struct Pl011 {
    base: usize,
}

impl Pl011 {
    /// # Safety
    /// `base` must be the address of a PL011's registers, mapped as device
    /// memory for the lifetime of the program, and not otherwise aliased as
    /// ordinary memory.
    pub unsafe fn new(base: usize) -> Pl011 {
        Pl011 { base }
    }

    fn regs(&self) -> &Pl011Regs {
        // SAFETY: `new`'s contract: `base` points at live PL011 registers.
        unsafe { &*(self.base as *const Pl011Regs) }
    }

    pub fn put_byte(&self, b: u8) {
        while self.regs().fr.is_set(FR::TXFF) {
            core::hint::spin_loop();
        }
        self.regs().dr.set(b as u32);
    }

    /// A received byte, if the receive FIFO holds one.
    pub fn get_byte(&self) -> Option<u8> {
        use tock_registers::interfaces::Readable;
        if self.regs().fr.is_set(FR::RXFE) {
            None
        } else {
            Some(self.regs().dr.get() as u8)
        }
    }
}

use tock_registers::interfaces::{Readable as _, Writeable as _};
