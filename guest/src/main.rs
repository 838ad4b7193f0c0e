//! A small EL1 test guest for the hypervisor.
//!
//! It boots exactly like a Linux arm64 `Image` (see `entry.rs`), finds the
//! machine in the DTB, turns its MMU on, and runs the mode its bootargs select
//! (`modes/`). Whatever happens, it ends with one line, `GUEST RESULT: PASS` or
//! `GUEST RESULT: FAIL <reason>`, and powers the VM off (`report.rs`).
//!
//! Only the `aarch64-unknown-none` build is the guest; a host build of the
//! workspace compiles this crate to an empty stub so it never breaks there.
#![deny(
    missing_docs,
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks
)]
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
#[macro_use]
mod console;
#[cfg(target_os = "none")]
mod args;
#[cfg(target_os = "none")]
mod cpu;
#[cfg(target_os = "none")]
mod dtb;
#[cfg(target_os = "none")]
mod entry;
#[cfg(target_os = "none")]
mod exceptions;
#[cfg(target_os = "none")]
mod fdt;
#[cfg(target_os = "none")]
mod fpsimd;
#[cfg(target_os = "none")]
mod mmu;
#[cfg(target_os = "none")]
mod modes;
#[cfg(target_os = "none")]
mod psci;
#[cfg(target_os = "none")]
mod report;
#[cfg(target_os = "none")]
mod smp;
#[cfg(target_os = "none")]
mod sync;

#[cfg(target_os = "none")]
use report::Reason;

/// Rust entry of the boot vCPU, called by `entry.rs` with the MMU off, on the
/// boot stack, with `.bss` zeroed and `x0` (the DTB address) as `dtb`.
#[cfg(target_os = "none")]
extern "C" fn boot_main(dtb: usize) -> ! {
    // Until the MMU is on, memory is Device memory: no atomics read-modify-write
    // (exclusives) and so no console lock. Probe and map first, then talk.
    let plat = dtb::PLATFORM.set(dtb::Platform::probe(dtb));
    mmu::enable_boot(plat);
    cpu::init_after_mmu();

    println!(
        "GUEST: boot on mpidr {:#x}: dtb={:#x} ram={:#x}+{:#x} uart={:#x} cpus={} hypervisor={}",
        cpu::mpidr_affinity(),
        plat.dtb.start,
        plat.ram()[0].start,
        plat.ram()[0].size,
        plat.uart,
        plat.cpus().len(),
        if plat.hypervisor { "mhv" } else { "none" },
    );
    if let Some(err) = plat.dtb_error {
        println!("GUEST: no usable DTB ({err}); using QEMU virt defaults");
    }
    println!("GUEST: bootargs \"{}\"", plat.bootargs());
    report::finish(run(plat))
}

#[cfg(target_os = "none")]
fn run(plat: &'static dtb::Platform) -> Result<(), Reason> {
    let args = args::Args::parse(plat.bootargs())?;
    println!("GUEST: mode {}", args.mode.name());
    modes::run(plat, &args)
}

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("GUEST: panic on vcpu {}: {}", cpu::vcpu_index(), info);
    match info.location() {
        Some(l) => report::fail(format_args!("panic at {}:{}", l.file(), l.line())),
        None => report::fail(format_args!("panic")),
    }
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("guest: build it with --target aarch64-unknown-none (it is a bare-metal EL1 image)");
}
