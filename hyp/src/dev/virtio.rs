//! The virtio-mmio transports of the host DTB (QEMU virt has 32; most are
//! empty). Each is claimed at most once, by the first driver asking for its
//! device type: a transport owns its registers (`MmioTransport` holds a unique
//! pointer to them), so two drivers must never build one on the same window.

use super::hal::HypHal;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, Ordering};
use platform::{Board, VirtioMmio};
use virtio_drivers::transport::mmio::{MmioError, MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, DeviceTypeError, Transport};
use virtio_drivers::Hal;

/// Bit `i` set: transport `i` of `Board::virtio_mmio` has been claimed.
static CLAIMED: AtomicU32 = AtomicU32::new(0);
const _: () = assert!(platform::board::MAX_VIRTIO_MMIO <= 32);

/// A device the hypervisor drives: its transport and where it lives.
pub struct Claimed {
    /// The transport, ready for a `virtio_drivers` device driver.
    pub transport: MmioTransport<'static>,
    /// The DTB entry it came from.
    pub at: VirtioMmio,
}

/// Claims the first unclaimed transport (in DTB order) holding a device of
/// `kind`. Empty transports (device id 0) and transports that do not look
/// like virtio (bad magic, unknown version) are skipped, never claimed.
pub fn claim(board: &Board, kind: DeviceType) -> Option<Claimed> {
    for (i, at) in board.virtio_mmio.iter().enumerate() {
        let bit = 1u32 << i;
        if CLAIMED.load(Ordering::Acquire) & bit != 0 {
            continue;
        }
        // Read the header first without keeping the transport: dropping an
        // `MmioTransport` resets its device, so only a claimed one is built
        // for good.
        match probe(at) {
            Ok(found) if found == kind => {}
            Ok(_) | Err(MmioError::InvalidDeviceID(DeviceTypeError::InvalidDeviceType(0))) => {
                continue
            }
            Err(e) => {
                crate::println!("[hyp] virtio-mmio at {:#x}: {e}", at.regs.base);
                continue;
            }
        }
        if CLAIMED.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            continue;
        }
        // SAFETY: as in `probe`; the claim bit makes this the only transport
        // ever built for the window from now on, so its unique pointer is.
        let transport = unsafe { transport(at) }.ok()?;
        return Some(Claimed { transport, at: *at });
    }
    None
}

/// The device type behind a transport, reading only its header.
fn probe(at: &VirtioMmio) -> Result<DeviceType, MmioError> {
    // SAFETY: `at` is a `virtio,mmio` window from the host DTB, identity
    // mapped as device memory at EL2. Reading the header has no side effect,
    // and the transport is forgotten, not dropped, so its device is not reset.
    let t = unsafe { transport(at) }?;
    let kind = t.device_type();
    core::mem::forget(t);
    Ok(kind)
}

/// # Safety
///
/// `at` must be a virtio-mmio register window from the host DTB, mapped at
/// EL2 (the device window is identity mapped), and no other live transport
/// may use it mutably while the returned one does.
unsafe fn transport(at: &VirtioMmio) -> Result<MmioTransport<'static>, MmioError> {
    // SAFETY: the caller's contract; HypHal maps MMIO by identity.
    let header = unsafe { HypHal::mmio_phys_to_virt(at.regs.base, at.regs.size as usize) };
    let header: NonNull<VirtIOHeader> = header.cast();
    // SAFETY: the window is `regs.size` bytes of virtio-mmio registers
    // (the caller's contract), valid for the hypervisor's lifetime.
    unsafe { MmioTransport::new(header, at.regs.size as usize) }
}
