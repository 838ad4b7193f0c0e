//! ARM PL011 UART register map (used by the hypervisor's own console driver and
//! by the per-VM emulated PL011, which must present the same registers).

use tock_registers::register_bitfields;
use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, ReadWrite, WriteOnly};

register_bitfields! [u32,
    /// UARTFR, the flag register (offset 0x018, read-only): FIFO and busy state.
    // `register_bitfields!` also generates an undocumented `Register` type and
    // `SET`/`CLEAR`/`Value` items per field, which no doc comment can reach.
    #[allow(missing_docs)]
    pub FR [
        /// Transmit FIFO full.
        TXFF OFFSET(5) NUMBITS(1) [],
        /// Receive FIFO empty.
        RXFE OFFSET(4) NUMBITS(1) [],
        /// UART busy: set while a byte is still being sent (until its stop bits have
        /// left the shift register), even with the transmit FIFO empty.
        BUSY OFFSET(3) NUMBITS(1) [],
    ],
    /// UARTCR, the control register (offset 0x030): enables the UART and its
    /// transmit and receive halves. Disable the UART before reprogramming it.
    // Generated items without docs, as for `FR`.
    #[allow(missing_docs)]
    pub CR [
        /// Receive enable.
        RXE OFFSET(9) NUMBITS(1) [],
        /// Transmit enable.
        TXE OFFSET(8) NUMBITS(1) [],
        /// UART enable: with it clear the UART neither sends nor receives, whatever
        /// `TXE` and `RXE` say.
        UARTEN OFFSET(0) NUMBITS(1) [],
    ],
    /// Interrupt bits, laid out the same in UARTIMSC (1 = enabled), UARTRIS (raw
    /// status), UARTMIS (masked status) and UARTICR (write 1 to clear).
    // Generated items without docs, as for `FR`.
    #[allow(missing_docs)]
    pub INT [
        /// Receive timeout.
        RT OFFSET(6) NUMBITS(1) [],
        /// Transmit: the transmit FIFO has drained to the level set in UARTIFLS.
        TX OFFSET(5) NUMBITS(1) [],
        /// Receive: the receive FIFO has filled to the level set in UARTIFLS.
        RX OFFSET(4) NUMBITS(1) [],
    ],
];

register_structs! {
    /// A PL011's register block, 4 KiB (0x1000 bytes) from its base address.
    pub Pl011Regs {
        /// UARTDR: a write sends the low byte; a read takes one received byte
        /// (bits 7:0) with its framing, parity, break and overrun errors in bits 11:8.
        (0x000 => pub dr: ReadWrite<u32>),
        /// UARTRSR/UARTECR: receive error status of the last byte read; a write
        /// clears it.
        (0x004 => pub rsr: ReadWrite<u32>),
        (0x008 => _reserved0),
        /// UARTFR: FIFO and busy flags (see [`FR`]).
        (0x018 => pub fr: ReadOnly<u32, FR::Register>),
        (0x01c => _reserved1),
        /// UARTIBRD: integer part of the baud rate divisor (UARTCLK / (16 * baud)).
        (0x024 => pub ibrd: ReadWrite<u32>),
        /// UARTFBRD: fractional part of the baud rate divisor, in 64ths (6 bits).
        /// Takes effect on the next UARTLCR_H write.
        (0x028 => pub fbrd: ReadWrite<u32>),
        /// UARTLCR_H: line control (word length, parity, stop bits, FIFO enable).
        /// Writing it also latches UARTIBRD and UARTFBRD.
        (0x02c => pub lcr_h: ReadWrite<u32>),
        /// UARTCR: UART, transmit and receive enables (see [`CR`]).
        (0x030 => pub cr: ReadWrite<u32, CR::Register>),
        /// UARTIFLS: the FIFO fill levels at which the TX and RX interrupts fire.
        (0x034 => pub ifls: ReadWrite<u32>),
        /// UARTIMSC: interrupt mask, 1 = the interrupt is enabled (see [`INT`]).
        (0x038 => pub imsc: ReadWrite<u32, INT::Register>),
        /// UARTRIS: raw interrupt status, before masking by UARTIMSC.
        (0x03c => pub ris: ReadOnly<u32, INT::Register>),
        /// UARTMIS: masked interrupt status (UARTRIS AND UARTIMSC); what raises the
        /// interrupt line.
        (0x040 => pub mis: ReadOnly<u32, INT::Register>),
        /// UARTICR: write 1 to a bit to clear that interrupt.
        (0x044 => pub icr: WriteOnly<u32, INT::Register>),
        /// UARTDMACR: DMA control (unused here; reads as 0 on the emulated PL011).
        (0x048 => pub dmacr: ReadWrite<u32>),
        (0x04c => _reserved2),
        (0x1000 => @END),
    }
}

/// Register offsets, for the emulated device (which decodes trapped accesses).
pub mod offset {
    /// UARTDR, data.
    pub const DR: u64 = 0x000;
    /// UARTRSR/UARTECR, receive status and error clear.
    pub const RSR: u64 = 0x004;
    /// UARTFR, flags (read-only).
    pub const FR: u64 = 0x018;
    /// UARTIBRD, integer baud rate divisor.
    pub const IBRD: u64 = 0x024;
    /// UARTFBRD, fractional baud rate divisor.
    pub const FBRD: u64 = 0x028;
    /// UARTLCR_H, line control.
    pub const LCR_H: u64 = 0x02c;
    /// UARTCR, control.
    pub const CR: u64 = 0x030;
    /// UARTIFLS, interrupt FIFO level select.
    pub const IFLS: u64 = 0x034;
    /// UARTIMSC, interrupt mask set/clear.
    pub const IMSC: u64 = 0x038;
    /// UARTRIS, raw interrupt status (read-only).
    pub const RIS: u64 = 0x03c;
    /// UARTMIS, masked interrupt status (read-only).
    pub const MIS: u64 = 0x040;
    /// UARTICR, interrupt clear (write-only).
    pub const ICR: u64 = 0x044;
    /// UARTDMACR, DMA control.
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

    /// Sends `b`, spinning while the transmit FIFO is full. Does not wait for the
    /// byte to leave the wire.
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
