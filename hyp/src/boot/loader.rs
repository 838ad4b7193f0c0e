//! Loads a guest the way a Linux boot loader would: an arm64 `Image` at
//! RAM base + text_offset, a DTB at the start of RAM, and vCPU 0 entered with
//! x0 = the DTB's address.

use crate::vm::{Vm, VmError};
use alloc::sync::Arc;

/// arm64 Image header fields (Documentation/arch/arm64/booting.rst).
const MAGIC_OFFSET: usize = 0x38;
const MAGIC: u32 = 0x644d_5241; // "ARM\x64"
const HEADER_SIZE: usize = 0x40;
const DEFAULT_TEXT_OFFSET: u64 = 0x8_0000;

struct ImageHeader {
    text_offset: u64,
    image_size: u64,
}

fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn parse_header(image: &[u8]) -> Result<ImageHeader, VmError> {
    if image.len() < HEADER_SIZE {
        return Err(VmError::BadImage("shorter than an arm64 Image header"));
    }
    let magic = u32::from_le_bytes(image[MAGIC_OFFSET..MAGIC_OFFSET + 4].try_into().unwrap());
    if magic != MAGIC {
        return Err(VmError::BadImage("no arm64 Image magic"));
    }
    let image_size = le64(image, 0x10);
    // image_size == 0 marks a pre-3.17 kernel: text_offset is then 0x80000.
    if image_size == 0 {
        return Ok(ImageHeader {
            text_offset: DEFAULT_TEXT_OFFSET,
            image_size: image.len() as u64,
        });
    }
    Ok(ImageHeader {
        text_offset: le64(image, 0x08),
        image_size: image_size.max(image.len() as u64),
    })
}

/// Loads `image` and a DTB with `bootargs` into `vm` and powers on vCPU 0.
pub fn boot(vm: &Arc<Vm>, image: &[u8], bootargs: &str) -> Result<(), VmError> {
    let header = parse_header(image)?;
    let ram = vm.mem.ram;
    let entry = ram.base + header.text_offset;
    if header.text_offset < 0x1_0000 || entry + header.image_size > ram.end() {
        return Err(VmError::BadImage("does not fit in guest RAM above the DTB"));
    }
    let dtb = crate::boot::guest_dtb::build(vm, bootargs)?;
    if dtb.len() as u64 > header.text_offset {
        return Err(VmError::BadConfig("guest DTB overlaps the image"));
    }
    crate::mm::glue::write_guest(&vm.mem, rmap::Ipa::new(entry), image)
        .map_err(|_| VmError::NoMemory)?;
    crate::mm::glue::write_guest(&vm.mem, rmap::Ipa::new(ram.base), &dtb)
        .map_err(|_| VmError::NoMemory)?;
    if !vm.power_on(0, entry, ram.base) {
        return Err(VmError::BadConfig("vCPU 0 is not off"));
    }
    Ok(())
}
