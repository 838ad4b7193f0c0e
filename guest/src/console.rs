//! Console on the PL011 (polled, transmit only). Each `println!` line is
//! written whole under one lock, so lines of different vCPUs never interleave;
//! lines end in "\r\n".

use core::fmt::{self, Write};

use crate::dtb;
use crate::sync::OwnerLock;

/// QEMU virt's PL011, used when the DTB names none.
pub const DEFAULT_UART: usize = 0x0900_0000;
const UARTDR: usize = 0x00;
const UARTFR: usize = 0x18;
const UARTFR_TXFF: u32 = 1 << 5;

static LOCK: OwnerLock = OwnerLock::new();

struct Pl011 {
    base: usize,
}

impl Pl011 {
    fn put(&mut self, byte: u8) {
        // SAFETY: `base` is the PL011 from the DTB (or QEMU's), mapped as
        // Device memory; its FR and DR registers are 32-bit.
        unsafe {
            while core::ptr::read_volatile((self.base + UARTFR) as *const u32) & UARTFR_TXFF != 0 {
                core::hint::spin_loop();
            }
            core::ptr::write_volatile((self.base + UARTDR) as *mut u32, u32::from(byte));
        }
    }
}

impl Write for Pl011 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
        Ok(())
    }
}

/// Writes one formatted line. Needs the MMU on (the lock uses exclusives).
pub fn print_line(args: fmt::Arguments) {
    let base = dtb::PLATFORM.get().map_or(DEFAULT_UART, |p| p.uart);
    LOCK.with(|| {
        let mut uart = Pl011 { base };
        // Pl011 never fails; a formatting error just truncates the line.
        let _ = uart.write_fmt(args);
        let _ = uart.write_str("\n");
    });
}

macro_rules! println {
    ($($arg:tt)*) => {
        $crate::console::print_line(format_args!($($arg)*))
    };
}
