//! Per-CPU EL2 configuration for running guests, and bringing up the
//! secondary CPUs with PSCI CPU_ON through the firmware (SMC conduit).

use crate::arch::{write_el2_sysreg, write_sysreg};
use core::sync::atomic::Ordering;
use platform::board::PsciConduit;
use platform::Board;
use spin::Once;

static BOARD: Once<Board> = Once::new();

pub fn board() -> &'static Board {
    BOARD.get().expect("board not recorded")
}

/// HCR_EL2 for running guests: stage 2 on; physical IRQ/FIQ/SError to EL2;
/// guest TLB and cache maintenance broadcast inner-shareable (FB, BSU=IS) so a
/// vCPU that moves between CPUs leaves nothing stale behind; WFI/WFE, SMC and
/// set/way maintenance trapped; EL1 is AArch64.
const HCR_EL2: u64 = (1 << 0) // VM
    | (1 << 1) // SWIO
    | (1 << 3) // FMO
    | (1 << 4) // IMO
    | (1 << 5) // AMO
    | (1 << 9) // FB
    | (1 << 10) // BSU = inner shareable
    | (1 << 13) // TWI
    | (1 << 14) // TWE
    | (1 << 19) // TSC
    | (1 << 22) // TSW
    | (1 << 31); // RW

/// CPTR_EL2 (non-VHE): RES1 bits, FP/SIMD not trapped (guests own it, the
/// hypervisor saves and restores it on every switch).
const CPTR_EL2: u64 = 0x33ff;

/// Sets this CPU's EL2 controls; `vtcr` is the stage-2 configuration all
/// VMs share and `fwb` whether its leaves are encoded for FEAT_S2FWB (both
/// the memory manager's, passed in by `main`): then `HCR_EL2.FWB` is set.
pub fn init_this_cpu(vtcr: u64, fwb: bool) {
    let fwb = if fwb { stage2::HCR_EL2_FWB } else { 0 };
    let pmcr_n = (crate::arch::read_sysreg!("pmcr_el0") >> 11) & 0x1f;
    // SAFETY: these configure what traps from EL1/EL0 and how stage 2
    // translates guest accesses; none changes EL2's own translation, vectors
    // or stack. HCR_EL2 keeps E2H = 0 (EL2 stays a separate regime), and its
    // FWB only changes how stage 2 combines guest memory types; VTTBR
    // with no table is only used once a vCPU loads its own.
    unsafe {
        write_el2_sysreg!("hcr_el2", HCR_EL2 | fwb);
        write_el2_sysreg!("cptr_el2", CPTR_EL2);
        // EL1 may read the physical counter but not program the physical timer.
        write_el2_sysreg!("cnthctl_el2", 1);
        write_el2_sysreg!("mdcr_el2", pmcr_n);
        write_el2_sysreg!("vtcr_el2", vtcr);
        // VTTBR_EL2 resets to an UNKNOWN value: VMID 0 and no table until a
        // vCPU is loaded (the scheduler checks it is so whenever none is).
        write_el2_sysreg!("vttbr_el2", 0);
    }
    write_sysreg!("cntvoff_el2", 0);
    crate::arch::isb();
}

/// Starts every other CPU of the board and waits (bounded) for each.
pub fn start_secondaries(board: &Board) {
    BOARD.call_once(|| board.clone());
    if board.psci != PsciConduit::Smc {
        crate::println!("[hyp] PSCI conduit is not SMC; running on the boot CPU only");
        return;
    }
    let entry = crate::arch::secondary_entry as *const () as u64;
    for (i, &mpidr) in board.cpus.iter().enumerate().skip(1) {
        if let Err(e) = smccc::psci::cpu_on::<smccc::Smc>(mpidr, entry, i as u64) {
            crate::println!("[hyp] CPU {i} (MPIDR {mpidr:#x}) failed to start: {e:?}");
            continue;
        }
        let deadline = crate::arch::timer::now() + crate::arch::timer::ms_to_ticks(2000);
        while !crate::arch::percpu::get(i).online.load(Ordering::Acquire)
            && crate::arch::timer::now() < deadline
        {
            core::hint::spin_loop();
        }
        if !crate::arch::percpu::get(i).online.load(Ordering::Acquire) {
            crate::println!("[hyp] CPU {i} did not come online");
        }
    }
    let online = (0..board.cpus.len())
        .filter(|&i| crate::arch::percpu::get(i).online.load(Ordering::Acquire))
        .count();
    crate::println!("[hyp] {online} CPU(s) online");
}
