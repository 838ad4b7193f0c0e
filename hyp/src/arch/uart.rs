//! The hypervisor's output on the physical PL011, shared by all CPUs. Lines
//! are written whole under the console lock, which never encloses a memory
//! manager lock (DESIGN.md lock order).

use core::fmt::{self, Write};
use platform::pl011::Pl011;
use spin::{Mutex, Once};

static UART: Once<Pl011> = Once::new();
static LOCK: Mutex<()> = Mutex::new(());

/// Starts the console on the board's PL011.
pub fn init(base: u64) {
    // SAFETY: `base` is the board's PL011 from the DTB, identity mapped as
    // device memory for the hypervisor's whole lifetime.
    UART.call_once(|| unsafe { Pl011::new(base as usize) });
}

struct Writer<'a>(&'a Pl011);

impl Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.0.put_byte(b'\r');
            }
            self.0.put_byte(b);
        }
        Ok(())
    }
}

pub fn print(args: fmt::Arguments) {
    let Some(uart) = UART.get() else { return };
    let _guard = LOCK.lock();
    let _ = Writer(uart).write_fmt(args);
}

/// For the panic and exception paths: prints even if another CPU died while
/// holding the lock (possibly interleaving).
pub fn print_force(args: fmt::Arguments) {
    let Some(uart) = UART.get() else { return };
    let _guard = LOCK.try_lock();
    let _ = Writer(uart).write_fmt(args);
}

/// Raw bytes (a guest's console output), under the console lock.
pub fn write_bytes(bytes: &[u8]) {
    let Some(uart) = UART.get() else { return };
    let _guard = LOCK.lock();
    for &b in bytes {
        if b == b'\n' {
            uart.put_byte(b'\r');
        }
        uart.put_byte(b);
    }
}

/// A byte typed on the physical console, if any.
pub fn read_byte() -> Option<u8> {
    UART.get()?.get_byte()
}

/// Prints to the hypervisor's console (the physical PL011), like `std`'s.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::arch::uart::print(format_args!($($arg)*)) };
}

/// Prints a line to the hypervisor's console, written whole under its lock.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::arch::uart::print(format_args!("{}\n", format_args!($($arg)*))) };
}
