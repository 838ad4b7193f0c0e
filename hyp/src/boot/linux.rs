//! Boots an unmodified arm64 Linux kernel with an initramfs as a guest,
//! following Documentation/arch/arm64/booting.rst. QEMU's generic loader put
//! both images in host RAM (`-device loader,...,force-raw=on`) and the
//! bootargs say where (`kernel=ADDR:SIZE initrd=ADDR:SIZE`). The frame
//! allocator keeps those frames reserved for the machine's whole life: they
//! are the read-only source every Linux VM is copied from (the first at
//! boot, `vms=N` more, or `create linux` any time later), so each VM owns
//! its own copy and none can write another's kernel.
//!
//! Guest RAM layout: the DTB at the start of RAM, the kernel 2 MiB in (a
//! 2 MiB-aligned base plus the header's text_offset), the initrd at the end.

use crate::boot::bootargs::{mem_range, BootArgs};
use crate::vm::{Vm, VmError};
use alloc::sync::Arc;
use platform::MemRange;
use rmap::Ipa;

/// arm64 Image header (booting.rst): text_offset at 8, image_size at 16,
/// magic "ARM\x64" at 56.
const HEADER_SIZE: usize = 64;
const MAGIC: &[u8; 4] = b"ARM\x64";
const ALIGN_2M: u64 = 2 << 20;
/// The kernel command line when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyAMA0 earlycon=pl011,0x09000000 rdinit=/init";

/// Where each piece goes in guest RAM.
struct Layout {
    dtb: u64,
    kernel: u64,
    initrd: MemRange,
}

/// The kernel and initramfs QEMU's loader put in host RAM, reserved since
/// boot and never written: the source of every Linux VM's copy.
#[derive(Clone, Copy)]
pub struct Images {
    kernel: &'static [u8],
    initrd: &'static [u8],
}

/// The images the bootargs name, or why there are none.
pub fn images() -> Result<Images, VmError> {
    let line = crate::arch::el2::board().bootargs();
    let [Some(kernel), Some(initrd)] = BootArgs::image_ranges(line) else {
        return Err(VmError::BadConfig(
            "no Linux kernel loaded: boot with kernel=ADDR:SIZE and initrd=ADDR:SIZE (cargo xtask run does this)",
        ));
    };
    Ok(Images {
        kernel: host_bytes(mem_range(kernel))?,
        initrd: host_bytes(mem_range(initrd))?,
    })
}

/// Creates a VM of `mem` bytes and `vcpus` vCPUs, copies the kernel, the
/// initrd and a DTB with `cmdline` into it and powers on vCPU 0.
pub fn boot(images: Images, cmdline: &str, mem: u64, vcpus: usize) -> Result<Arc<Vm>, VmError> {
    let vm = Vm::create("linux", vcpus, mem)?;
    let powered = load(&vm, images, cmdline).and_then(|entry| {
        vm.power_on(0, entry, vm.mem.ram.base)
            .then_some(())
            .ok_or(VmError::BadConfig("vCPU 0 is not off"))
    });
    if let Err(e) = powered {
        // It never ran: the error is the caller's to report, not a guest's
        // exit status (a failed `create` must not fail the machine).
        vm.stop(0);
        return Err(e);
    }
    Ok(vm)
}

/// Copies the images and a DTB into `vm`; returns the kernel's entry.
fn load(vm: &Vm, images: Images, cmdline: &str) -> Result<u64, VmError> {
    let layout = layout(vm, images.kernel, images.initrd.len() as u64)?;
    let initrd_range = Some((layout.initrd.base, layout.initrd.end()));
    let dtb = crate::boot::guest_dtb::build_with_initrd(vm, cmdline, initrd_range)?;
    copy_in(vm, layout.kernel, images.kernel)?;
    copy_in(vm, layout.initrd.base, images.initrd)?;
    copy_in(vm, layout.dtb, &dtb)?;
    Ok(layout.kernel)
}

/// The bytes of an image QEMU loaded at host-physical `range`.
fn host_bytes(range: MemRange) -> Result<&'static [u8], VmError> {
    let in_ram = crate::arch::el2::board()
        .ram
        .iter()
        .any(|r| r.contains(range.base) && range.end() <= r.end());
    if !in_ram || range.size == 0 {
        return Err(VmError::BadImage("kernel/initrd range is not in RAM"));
    }
    // SAFETY: the range is inside RAM (checked above), identity mapped at
    // EL2, and reserved in the frame allocator since boot and never
    // released, so nothing writes it while the machine runs.
    Ok(unsafe { core::slice::from_raw_parts(range.base as *const u8, range.size as usize) })
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

fn layout(vm: &Vm, kernel: &[u8], initrd_len: u64) -> Result<Layout, VmError> {
    if kernel.len() < HEADER_SIZE || &kernel[56..60] != MAGIC {
        return Err(VmError::BadImage(
            "not an arm64 Image (gzip-compressed? xtask unpacks it)",
        ));
    }
    let text_offset = le64(kernel, 8);
    // image_size covers .bss, which must fit too; 0 means an old kernel.
    let image_size = le64(kernel, 16).max(kernel.len() as u64);
    let ram = vm.mem.ram;
    let entry = ram.base + ALIGN_2M + text_offset % ALIGN_2M;
    let kernel_end = entry
        .checked_add(image_size)
        .ok_or(VmError::BadImage("image size overflows"))?;
    let initrd_base = (ram.end().saturating_sub(initrd_len)) & !(ALIGN_2M - 1);
    if initrd_base < kernel_end || initrd_base < ram.base {
        return Err(VmError::BadConfig(
            "guest RAM is too small for the kernel and initrd (mem=)",
        ));
    }
    Ok(Layout {
        dtb: ram.base,
        kernel: entry,
        initrd: MemRange {
            base: initrd_base,
            size: initrd_len,
        },
    })
}

fn copy_in(vm: &Vm, ipa: u64, data: &[u8]) -> Result<(), VmError> {
    crate::mm::glue::write_guest(&vm.mem, Ipa::new(ipa), data).map_err(|_| VmError::NoMemory)
}
