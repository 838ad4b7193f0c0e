//! Boots an unmodified arm64 Linux kernel with an initramfs as a guest,
//! following Documentation/arch/arm64/booting.rst. QEMU's generic loader put
//! both images in host RAM (`-device loader,...,force-raw=on`) and the
//! bootargs say where (`kernel=ADDR:SIZE initrd=ADDR:SIZE`); the frame
//! allocator kept those frames reserved. Every whole 2 MiB of the kernel is
//! mapped into the VM where it lies (a 2 MiB block entry each, no copy:
//! `mm::adopt_block`); the rest is copied and then given back to the
//! allocator.
//!
//! Guest RAM layout: the DTB at the start of RAM, the kernel 2 MiB in (a
//! 2 MiB-aligned base plus the header's text_offset), the initrd at the end.

use crate::boot::bootargs::{mem_range, BootArgs};
use crate::vm::{Vm, VmError};
use alloc::sync::Arc;
use platform::MemRange;
use rmap::{Ipa, Pa};

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

/// Starts the Linux guest named by the bootargs; reports failures on the
/// console. Returns the new VM's id (the caller gives it the keyboard).
pub fn start(args: &BootArgs, vcpus: usize) -> Option<u32> {
    // Bytes from the kernel's start that became the VM's own frames.
    let mut adopted = 0;
    let started = boot(args, vcpus, &mut adopted);
    let id = started.as_ref().ok().map(|vm| vm.id);
    match started {
        Ok(vm) => {
            crate::println!(
                "[hyp] vm {} (linux): {} vCPUs, {} MiB; console input goes to it (Ctrl-A h: hypervisor console)",
                vm.id,
                vcpus,
                args.mem >> 20
            );
        }
        Err(e) => crate::println!("[hyp] cannot start the Linux guest: {e}"),
    }
    let kernel_rest = args.kernel.map(|k| MemRange {
        base: k.base + adopted,
        size: k.size - adopted,
    });
    for range in [kernel_rest, args.initrd.map(mem_range)]
        .into_iter()
        .flatten()
    {
        crate::mm::frames::get().release_reserved(range);
    }
    id
}

fn boot(args: &BootArgs, vcpus: usize, adopted: &mut u64) -> Result<Arc<Vm>, VmError> {
    let (Some(kernel_range), Some(initrd)) =
        (args.kernel.map(mem_range), args.initrd.map(mem_range))
    else {
        return Err(VmError::BadConfig(
            "guest=linux needs kernel=ADDR:SIZE and initrd=ADDR:SIZE (cargo xtask run does this)",
        ));
    };
    let kernel = host_bytes(kernel_range)?;
    let initrd = host_bytes(initrd)?;
    let vm = Vm::create("linux", vcpus, args.mem)?;
    let layout = match layout(&vm, kernel, initrd.len() as u64) {
        Ok(l) => l,
        Err(e) => {
            vm.stop(crate::vm::STATUS_FAULT);
            return Err(e);
        }
    };
    let cmdline = if args.guest_args.is_empty() {
        DEFAULT_CMDLINE
    } else {
        args.guest_args
    };
    let initrd_range = Some((layout.initrd.base, layout.initrd.end()));
    let loaded =
        crate::boot::guest_dtb::build_with_initrd(&vm, cmdline, initrd_range).and_then(|dtb| {
            adopt_image(&vm, layout.kernel, kernel_range, adopted)?;
            copy_in(&vm, layout.kernel + *adopted, &kernel[*adopted as usize..])?;
            copy_in(&vm, layout.initrd.base, initrd)?;
            copy_in(&vm, layout.dtb, &dtb)
        });
    if let Err(e) = loaded {
        vm.stop(crate::vm::STATUS_FAULT);
        return Err(e);
    }
    if !vm.power_on(0, layout.kernel, layout.dtb) {
        return Err(VmError::BadConfig("vCPU 0 is not off"));
    }
    Ok(vm)
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
    // EL2, and reserved in the frame allocator since boot, so nothing else
    // writes it until `start` releases it after the copy.
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

/// Maps the image's whole 2 MiB chunks at `host` into `vm` at `ipa` where
/// QEMU's loader put them; `adopted` counts the bytes from the start that
/// are the VM's now (including a chunk lost to an error, which the
/// allocator already took back), so the caller releases only the rest.
fn adopt_image(vm: &Vm, ipa: u64, host: MemRange, adopted: &mut u64) -> Result<(), VmError> {
    while *adopted + ALIGN_2M <= host.size {
        match crate::mm::glue::adopt_block(
            &vm.mem,
            Ipa::new(ipa + *adopted),
            Pa::new(host.base + *adopted),
        ) {
            Ok(true) => *adopted += ALIGN_2M,
            Ok(false) => break,
            Err(_) => {
                *adopted += ALIGN_2M;
                return Err(VmError::NoMemory);
            }
        }
    }
    Ok(())
}

fn copy_in(vm: &Vm, ipa: u64, data: &[u8]) -> Result<(), VmError> {
    crate::mm::glue::write_guest(&vm.mem, Ipa::new(ipa), data).map_err(|_| VmError::NoMemory)
}
