//! The control channel (issue 19): a virtio-console port the hypervisor owns,
//! which QEMU exposes as a unix socket (`cargo xtask run --api PATH`). One
//! line per message in each direction; this module moves lines, the console
//! layer gives them meaning.
//!
//! Polled, no interrupt: CPU 0 calls [`read_line`] from its console poll, so
//! the device's SPI stays disabled at the distributor. Nothing here stops the
//! hypervisor: no device means no lines, a client that disconnects or never
//! reads loses output (counted, [`dropped`]), and garbage comes out as
//! [`LineError`]s.

use super::hal::HypHal;
use super::virtio::{self, Claimed};
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use hypcmd::lines::LineAssembler;
pub use hypcmd::lines::LineError;
use platform::Board;
use spin::Mutex;
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::DeviceType;

/// Most bytes taken from the device per [`read_line`] call, so one poll of
/// a flooding client costs CPU 0 a bounded time.
const MAX_BYTES_PER_READ: usize = 4096;

struct Control {
    dev: VirtIOConsole<HypHal, MmioTransport<'static>>,
    lines: LineAssembler,
}

/// The channel, if a console device was found. Lock level: a leaf (nothing
/// is taken inside it but the frame allocator, by the driver's DMA calls).
static CONTROL: Mutex<Option<Control>> = Mutex::new(None);
/// Output lines dropped (device error, or a line that would break framing).
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Device errors while reading.
static READ_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Finds the first virtio-console device and takes it as the control
/// channel. Boot CPU, once, after the frame allocator is up.
pub fn init(board: &Board) {
    let Some(Claimed { transport, at }) = virtio::claim(board, DeviceType::Console) else {
        crate::println!("[hyp] no control channel (no virtio-console device)");
        return;
    };
    match VirtIOConsole::<HypHal, _>::new(transport) {
        Ok(dev) => {
            *CONTROL.lock() = Some(Control {
                dev,
                lines: LineAssembler::new(hypapi::MAX_LINE),
            });
            crate::println!(
                "[hyp] control channel: virtio-console at {:#x}",
                at.regs.base
            );
        }
        Err(e) => crate::println!(
            "[hyp] control channel: virtio-console at {:#x} failed: {e}",
            at.regs.base
        ),
    }
}

/// Whether a control channel device was found.
pub fn present() -> bool {
    CONTROL.lock().is_some()
}

/// The next complete line from the client, without its newline: `None` when
/// no whole line has arrived (or there is no channel). A line over 64 KiB is
/// discarded up to its newline and reported once as [`LineError::TooLong`]
/// (the protocol's cap, `hypapi::MAX_LINE`);
/// one that is not UTF-8 as [`LineError::NotUtf8`].
pub fn read_line() -> Option<Result<String, LineError>> {
    let mut guard = CONTROL.lock();
    let c = guard.as_mut()?;
    for _ in 0..MAX_BYTES_PER_READ {
        match c.dev.recv(true) {
            Ok(Some(b)) => {
                if let Some(line) = c.lines.push(b) {
                    return Some(line);
                }
            }
            Ok(None) => return None,
            Err(_) => {
                READ_ERRORS.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
    }
    None
}

/// Sends `line` and a newline. Never blocks for long: QEMU's virtconsole
/// completes a transmit buffer during the notify itself, writing what the
/// socket takes and dropping the rest (it never throttles a console port),
/// and discards it when no client is connected. A line containing a newline
/// (it would read as two messages) or failing at the device is dropped and
/// counted ([`dropped`]).
pub fn write_line(line: &str) {
    if line.contains('\n') {
        DROPPED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut guard = CONTROL.lock();
    let Some(c) = guard.as_mut() else {
        return;
    };
    // One buffer, one round trip: the line and its newline together.
    let mut buf = Vec::new();
    if buf.try_reserve_exact(line.len() + 1).is_err() {
        DROPPED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    if c.dev.send_bytes(&buf).is_err() {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Output lines dropped so far.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Device errors seen while reading so far.
pub fn read_errors() -> u64 {
    READ_ERRORS.load(Ordering::Relaxed)
}
