//! Whole-frame operations through the hypervisor's identity map: zeroing
//! (`DC ZVA`) and copying, the two writes every frame handed to a guest
//! goes through (re-exported by `frames`).

use crate::mm::frames::PAGE_SIZE;
use core::sync::atomic::{AtomicUsize, Ordering};
use rmap::Pa;

/// Zeroes a frame through the hypervisor's identity map.
///
/// # Safety
///
/// `pa` is the page-aligned address of a RAM frame the caller owns
/// exclusively (just allocated, or taken out of every stage-2 table with the
/// TLBs flushed): nothing else reads or writes it during the call.
pub unsafe fn zero_frame(pa: Pa) {
    let pa = pa.raw();
    let block = zva_block();
    if block == 0 {
        // SAFETY: `pa` is a RAM frame the caller owns exclusively (this
        // function's contract), identity mapped at EL2 as normal memory.
        unsafe { core::ptr::write_bytes(pa as *mut u8, 0, PAGE_SIZE as usize) };
        return;
    }
    // DC ZVA zeroes a whole block per instruction (many times faster than
    // stores, under QEMU's TCG too, where a fault's 2 MiB block is zeroed).
    for off in (0..PAGE_SIZE).step_by(block as usize) {
        // SAFETY: as above; DC ZVA writes zeroes to one aligned block
        // inside the frame (the block size divides PAGE_SIZE).
        unsafe {
            core::arch::asm!("dc zva, {}", in(reg) pa + off, options(nostack, preserves_flags))
        };
    }
}

/// Copies the 4 KiB frame at `src` to the frame at `dst` with 16-byte load
/// and store pairs of general registers, 64 bytes per iteration (as Linux's
/// arm64 `copy_page`). The EL2 image is built without FP/SIMD, so the
/// compiler's `memcpy` moves 8 bytes per load/store: this does a third of the
/// instructions, which under QEMU's TCG makes a frame copy about 3x faster.
///
/// # Safety
///
/// `dst` and `src` are page-aligned addresses of two distinct RAM frames;
/// the caller owns `dst` exclusively and keeps `src` from being freed or
/// written for the duration of the copy.
pub unsafe fn copy_frame(dst: Pa, src: Pa) {
    debug_assert!(dst.is_aligned(PAGE_SIZE) && src.is_aligned(PAGE_SIZE));
    debug_assert!(dst != src);
    let (dst, src) = (dst.raw(), src.raw());
    // SAFETY: the caller owns `dst` exclusively and keeps `src` alive and
    // unwritten for the copy (this function's contract); both are distinct
    // RAM frames
    // identity mapped at EL2 as normal memory. The loop reads exactly
    // PAGE_SIZE bytes from `src` and writes PAGE_SIZE bytes to `dst`.
    unsafe {
        core::arch::asm!(
            "2:",
            "ldp {a}, {b}, [{src}]",
            "ldp {c}, {d}, [{src}, #16]",
            "ldp {e}, {f}, [{src}, #32]",
            "ldp {g}, {h}, [{src}, #48]",
            "add {src}, {src}, #64",
            "stp {a}, {b}, [{dst}]",
            "stp {c}, {d}, [{dst}, #16]",
            "stp {e}, {f}, [{dst}, #32]",
            "stp {g}, {h}, [{dst}, #48]",
            "add {dst}, {dst}, #64",
            "subs {n}, {n}, #1",
            "b.ne 2b",
            src = inout(reg) src => _,
            dst = inout(reg) dst => _,
            n = inout(reg) PAGE_SIZE / 64 => _,
            a = out(reg) _,
            b = out(reg) _,
            c = out(reg) _,
            d = out(reg) _,
            e = out(reg) _,
            f = out(reg) _,
            g = out(reg) _,
            h = out(reg) _,
            options(nostack),
        );
    }
}

/// DC ZVA's block size in bytes (DCZID_EL0), or 0 if it is prohibited.
fn zva_block() -> u64 {
    static BLOCK: AtomicUsize = AtomicUsize::new(usize::MAX);
    let cached = BLOCK.load(Ordering::Relaxed);
    if cached != usize::MAX {
        return cached as u64;
    }
    let dczid = crate::arch::read_sysreg!("dczid_el0");
    let block = if dczid & (1 << 4) != 0 {
        0
    } else {
        4u64 << (dczid & 0xf)
    };
    let block = if block > PAGE_SIZE { 0 } else { block };
    BLOCK.store(block as usize, Ordering::Relaxed);
    block
}

/// Whether the 4 KiB frames at `a` and `b` hold the same bytes (same-page
/// merging's last comparison, after both are write-protected).
///
/// # Safety
///
/// `a` and `b` are page-aligned addresses of RAM frames the caller keeps
/// allocated and that no one writes for the duration of the call.
pub unsafe fn frames_equal(a: Pa, b: Pa) -> bool {
    let words = (PAGE_SIZE / 8) as usize;
    // SAFETY: both are allocated RAM frames identity mapped at EL2 as normal
    // memory, page-aligned (so u64-aligned), nobody writes them meanwhile
    // (this function's contract); each slice covers exactly one frame.
    let (x, y) = unsafe {
        (
            core::slice::from_raw_parts(a.raw() as *const u64, words),
            core::slice::from_raw_parts(b.raw() as *const u64, words),
        )
    };
    // Not `x == y`: that is compiler-builtins' byte-at-a-time `memcmp` in
    // this FP-free image. Eight words per step, one branch each.
    x.chunks_exact(8)
        .zip(y.chunks_exact(8))
        .all(|(p, q)| p.iter().zip(q).fold(0, |d, (u, v)| d | (u ^ v)) == 0)
}

/// A checksum of the 4 KiB frame at `pa` (the merge scanner's hint of
/// whether a page is still changing, and its key for identical pages): each
/// word folded in with a multiply, a few instructions per word. Volatile
/// loads, since a guest may be writing the frame: the value may then be
/// stale, never undefined.
///
/// # Safety
///
/// `pa` is a page-aligned address of a RAM frame (identity mapped at EL2).
pub unsafe fn frame_hash(pa: Pa) -> u64 {
    let words = (PAGE_SIZE / 8) as usize;
    let base = pa.raw() as *const u64;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..words {
        // SAFETY: inside the frame (`i` < words per page), u64-aligned; a
        // volatile read of memory another agent (the guest) may write.
        let w = unsafe { core::ptr::read_volatile(base.add(i)) };
        h = (h ^ w).wrapping_mul(0x100_0000_01b3).rotate_left(29);
    }
    h
}
