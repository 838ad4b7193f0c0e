//! The `virtio-drivers` HAL: DMA memory from the frame allocator, identity
//! mapped (the EL2 stage-1 map has VA == PA for RAM and the device window).

use crate::mm::frames::{self, PAGE_SIZE};
use core::ptr::NonNull;
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

/// DMA pages are unmovable frames (nothing may migrate a page a device
/// writes), zeroed, contiguous; buffers are shared in place.
///
/// Cache coherency: the EL2 map makes RAM normal write-back cacheable, and
/// QEMU's virtio-mmio devices read and write guest RAM through the same host
/// memory the CPU's caches model, i.e. DMA is coherent, so `share` and
/// `unshare` need no cache maintenance. On a platform whose DMA is not
/// coherent, `share` would clean the buffer to the point of coherency
/// (`DC CVAC` per cache line, then `DSB`) before the device reads it, and
/// `unshare` of a device-written buffer would invalidate it (`DC IVAC` per
/// line, after the device is done, then `DSB`) before the CPU reads it (Arm
/// ARM D7.5, "data cache maintenance to the PoC"); DMA pages from
/// `dma_alloc` would be mapped non-cacheable instead.
pub struct HypHal;

/// Frames the devices hold for DMA (virtqueues), for `stats`: they are in
/// use but neither guest memory nor the heap.
static DMA_FRAMES: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Frames held for DMA now.
pub fn dma_frames() -> u64 {
    DMA_FRAMES.load(core::sync::atomic::Ordering::Relaxed)
}

// SAFETY: `dma_alloc` returns frames no one else owns (the frame allocator
// hands each out once), zeroed, `pages` long and contiguous, with VA == PA
// (identity map); `dma_dealloc` returns exactly them; `mmio_phys_to_virt`
// and `share` return identity-mapped addresses (device window and RAM are
// both mapped at EL2); DMA is coherent (see above), so sharing in place is
// sound.
unsafe impl Hal for HypHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let pa = frames::try_get().and_then(|f| f.alloc_run_zeroed_unmovable(pages, 1));
        // The driver's DMA addresses are raw physical addresses.
        let pa = pa.map(rmap::Pa::raw);
        match pa.and_then(|pa| Some((pa, NonNull::new(pa as *mut u8)?))) {
            Some(got) => {
                DMA_FRAMES.fetch_add(pages as u64, core::sync::atomic::Ordering::Relaxed);
                got
            }
            // `Dma::new` takes PA 0 as "out of memory" (RAM never starts at 0
            // on QEMU virt) and returns an error to the driver.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        for i in 0..pages as u64 {
            frames::get().free(rmap::Pa::new(paddr + i * PAGE_SIZE));
        }
        DMA_FRAMES.fetch_sub(pages as u64, core::sync::atomic::Ordering::Relaxed);
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        // Identity map: the buffer's address is its physical address. Heap
        // and DMA pages are RAM, contiguous in PA as they are in VA.
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {
        // Shared in place and coherent: nothing to copy back or invalidate.
    }
}
