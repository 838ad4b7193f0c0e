//! An AArch64 EL2 microhypervisor for QEMU virt whose memory manager is an
//! anon_vma reverse map (see docs/ARCHITECTURE.md).
#![no_std]
#![no_main]
#![deny(
    missing_docs,
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks
)]
// vCPUs are boxed in every queue: moving one between the run queue and its
// VM moves a pointer, and its register block keeps a stable address.
#![allow(clippy::vec_box)]

extern crate alloc;

// The layers, lowest first; each imports only the ones before it (checked by
// `layers` in xtask's tests against the table in docs/ARCHITECTURE.md).
mod arch;
mod boot;
mod channel;
mod console;
mod dev;
mod mm;
mod persist;
mod vdev;
mod vm;

use arch::{el2, gic, mmu, percpu, semihost, uart};
use boot::bootargs;
use mm::{frames, heap};
use vm::sched;

use core::sync::atomic::Ordering;
use platform::{Board, MemRange};

/// QEMU puts the DTB at the start of RAM for a bare ELF (x0 = 0).
const DEFAULT_DTB: usize = 0x4000_0000;
/// Where the UART is on QEMU virt, for errors before the DTB is understood.
const FALLBACK_UART: u64 = 0x0900_0000;
/// Machine exit status when the board cannot be used.
const STATUS_BAD_BOARD: u32 = 4;

unsafe extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

fn dtb_slice(addr: usize) -> &'static [u8] {
    // SAFETY: QEMU (or a boot loader) placed a DTB at `addr` in RAM; its
    // header's big-endian totalsize at offset 4 gives its length. Nothing
    // writes that memory: the frame allocator keeps it reserved.
    unsafe {
        let header = core::slice::from_raw_parts(addr as *const u8, 8);
        let size = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
        core::slice::from_raw_parts(addr as *const u8, size.clamp(8, 2 << 20))
    }
}

#[unsafe(no_mangle)]
extern "C" fn boot_main(dtb: usize) -> ! {
    percpu::init(0);
    let dtb = dtb_slice(if dtb == 0 { DEFAULT_DTB } else { dtb });
    let board = match Board::from_dtb(dtb) {
        Ok(b) => b,
        Err(e) => {
            uart::init(FALLBACK_UART);
            println!("[hyp] cannot use this board: {e}");
            semihost::exit(STATUS_BAD_BOARD);
        }
    };
    uart::init(board.uart.base);
    println!(
        "[hyp] microhypervisor at EL2, {} CPUs, {} RAM bank(s)",
        board.cpus.len(),
        board.ram.len()
    );
    heap::init();
    mmu::init(&board);
    let _ = rmap::lock::lockdep::set_cpu_index_hook(percpu::cpu_index);
    reserve_and_init_frames(&board, dtb);
    mm::memory::init();
    mm::glue::init(&board);
    el2::init_this_cpu(mm::memory::vtcr(), mm::memory::fwb());
    gic::init_distributor(&board);
    gic::init_cpu(&board);
    dev::control::init(&board);
    dev::blk::init(&board);
    sched::init(&board, &channel::HOOKS);
    percpu::this_cpu().online.store(true, Ordering::Release);
    el2::start_secondaries(&board);
    start_default_vm(&board);
    sched::STARTED.store(true, Ordering::Release);
    sched::cpu_loop()
}

#[unsafe(no_mangle)]
extern "C" fn secondary_main(cpu: usize) -> ! {
    percpu::init(cpu);
    mmu::enable_this_cpu();
    el2::init_this_cpu(mm::memory::vtcr(), mm::memory::fwb());
    gic::init_cpu(el2::board());
    percpu::this_cpu().online.store(true, Ordering::Release);
    sched::cpu_loop()
}

fn reserve_and_init_frames(board: &Board, dtb: &[u8]) {
    let start = &raw const __image_start as u64;
    let end = &raw const __image_end as u64;
    let mut reserved = alloc::vec![
        MemRange {
            base: start,
            size: end - start
        },
        MemRange {
            base: dtb.as_ptr() as u64 & !0xfff,
            size: (dtb.len() as u64 + 0x1fff) & !0xfff
        },
    ];
    // Guest images QEMU's loader put in RAM stay put until copied (linux.rs).
    reserved.extend(bootargs::image_ranges(board.bootargs()));
    // The rmap's frame table, sized to the machine (mm::glue::init), at the
    // top of RAM: nothing else may be there.
    let table = mm::glue::frame_table_range(board);
    if reserved
        .iter()
        .any(|r| r.base < table.end() && table.base < r.end())
    {
        println!("[hyp] the frame table's RAM {table:?} is taken by a boot image");
        semihost::exit(STATUS_BAD_BOARD);
    }
    reserved.push(table);
    frames::init(board, &reserved);
    let f = frames::get();
    println!(
        "[hyp] {} MiB of RAM for guests ({} frames)",
        f.free_count() >> 8,
        f.free_count()
    );
}

fn start_default_vm(board: &Board) {
    let args = bootargs::parse(board.bootargs());
    // With a control channel attached the operator's program decides when the
    // machine ends (`quit`): it may still read `stats` or start VMs after the
    // last one is gone, as an API-driven VMM stays up for its client.
    let stay = args.stay || dev::control::present();
    if stay && !args.stay {
        println!("[hyp] control channel attached: staying up after the last VM until `quit`");
    }
    sched::STAY_WHEN_IDLE.store(stay, Ordering::Relaxed);
    console::cmd::set_script(args.script);
    if let Some(name) = &args.restore {
        return console::snapcmd::boot_restore(name.as_str());
    }
    if let Some(id) = boot::create::start_default(&args) {
        console::cmd::set_focus(id);
    }
}
