//! Exceptions taken by the hypervisor itself: always a bug. Print a decoded
//! report and stop the machine with a failing status.

use crate::arch::read_sysreg;
use crate::arch::uart::print_force;

/// Registers saved by the `hyp_trap` macro in vectors.S.
#[repr(C)]
pub struct TrapFrame {
    pub x: [u64; 31],
    pub sp: u64,
}

/// Exit status of the machine when the hypervisor itself faults.
pub const HYP_FAULT_STATUS: u32 = 3;

/// The ESR_ELx exception class, named.
pub fn ec_name(ec: u64) -> &'static str {
    match ec {
        0x00 => "unknown reason",
        0x01 => "WFI/WFE",
        0x07 => "FP/SIMD access",
        0x0e => "illegal execution state",
        0x15 => "SVC (AArch64)",
        0x16 => "HVC (AArch64)",
        0x17 => "SMC (AArch64)",
        0x18 => "MSR/MRS/system instruction",
        0x20 => "instruction abort from a lower EL",
        0x21 => "instruction abort at the same EL",
        0x22 => "PC alignment fault",
        0x24 => "data abort from a lower EL",
        0x25 => "data abort at the same EL",
        0x26 => "SP alignment fault",
        0x2f => "SError",
        0x3c => "BRK",
        _ => "other",
    }
}

#[unsafe(no_mangle)]
extern "C" fn hyp_exception(frame: &TrapFrame, kind: u64) -> ! {
    let esr = read_sysreg!("esr_el2");
    let ec = (esr >> 26) & 0x3f;
    let what = match kind {
        0 => "exception with SP0",
        1 => "synchronous exception",
        2 => "IRQ",
        3 => "FIQ",
        _ => "SError",
    };
    print_force(format_args!(
        "\n*** HYPERVISOR {what} on CPU {}: EC={ec:#x} ({}) ESR={esr:#x}\n    FAR={:#x} ELR={:#x} SPSR={:#x} SP={:#x}\n",
        crate::arch::percpu::cpu_index(),
        ec_name(ec),
        read_sysreg!("far_el2"),
        read_sysreg!("elr_el2"),
        read_sysreg!("spsr_el2"),
        frame.sp,
    ));
    for (i, pair) in frame.x.chunks(4).enumerate() {
        print_force(format_args!("    "));
        for (j, v) in pair.iter().enumerate() {
            print_force(format_args!("x{:<2}={v:#018x} ", i * 4 + j));
        }
        print_force(format_args!("\n"));
    }
    crate::arch::semihost::exit(HYP_FAULT_STATUS)
}

/// A Rust panic in the hypervisor: report and stop with a failing status.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    print_force(format_args!(
        "\n*** HYPERVISOR PANIC on CPU {}: {info}\n",
        crate::arch::percpu::cpu_index()
    ));
    crate::arch::semihost::exit(HYP_FAULT_STATUS)
}
