//! `idle [beat_ms=N]`: waits for interrupts forever, printing a heartbeat
//! every N ms (default 3000), so that hundreds of VMs cost little: the vCPU
//! sleeps in WFI until its virtual timer fires.
//!
//! Only vCPU 0 runs. It enables its virtual timer PPI (27) in the virtual
//! GICv3 as a group 1 interrupt and keeps IRQs masked in PSTATE: a pending
//! interrupt still ends WFI, and the loop acknowledges and ends it through the
//! ICC registers without taking an exception. Each heartbeat line counts
//! beats and wake-ups (timer or spurious: the hypervisor may end a WFI at a
//! scheduling tick), so a test can tell a VM that keeps running from one that
//! stopped.

use crate::cpu::{ticks, ticks_per_sec};
use crate::dtb::Platform;
use crate::report::Reason;
use core::arch::asm;

/// QEMU virt's GICv3 distributor, and vCPU 0's redistributor SGI/PPI frame.
const GICD: usize = 0x0800_0000;
const GICR0_SGI: usize = 0x080a_0000 + 0x1_0000;
const VTIMER_PPI: u32 = 27;
/// ICC_IAR1_EL1 when nothing is pending.
const SPURIOUS: u64 = 1023;

fn mmio_write(addr: usize, value: u32) {
    // SAFETY: a GIC register of QEMU virt's first GiB, mapped as device
    // memory by the guest's boot page tables (mmu.rs); the hypervisor
    // emulates it, and writes have no effect on guest memory.
    unsafe { (addr as *mut u32).write_volatile(value) };
}

/// Group 1 interrupts on, PPI 27 enabled in group 1 at a priority the
/// priority mask lets through.
fn gic_init() {
    mmio_write(GICD, 1 << 1); // GICD_CTLR.EnableGrp1
    mmio_write(GICR0_SGI + 0x080, 1 << VTIMER_PPI); // GICR_IGROUPR0
    let prio = GICR0_SGI + 0x400 + VTIMER_PPI as usize; // GICR_IPRIORITYR (byte)
                                                        // SAFETY: as in mmio_write; the priority registers are byte accessible.
    unsafe { (prio as *mut u8).write_volatile(0xa0) };
    mmio_write(GICR0_SGI + 0x100, 1 << VTIMER_PPI); // GICR_ISENABLER0
                                                    // SAFETY: the (virtual) GIC CPU interface's system registers: system
                                                    // register access, every priority unmasked, group 1 on. They only
                                                    // affect interrupt delivery to this vCPU, whose IRQs stay masked.
    unsafe {
        asm!(
            "msr icc_sre_el1, {sre}",
            "isb",
            "msr icc_pmr_el1, {pmr}",
            "msr icc_igrpen1_el1, {one}",
            "isb",
            sre = in(reg) 7u64,
            pmr = in(reg) 0xffu64,
            one = in(reg) 1u64,
            options(nostack, preserves_flags)
        )
    };
}

/// Arms the virtual timer to fire at virtual count `cval`, unmasked.
fn arm_timer(cval: u64) {
    // SAFETY: this vCPU's own virtual timer registers.
    unsafe {
        asm!(
            "msr cntv_cval_el0, {cval}",
            "msr cntv_ctl_el0, {on}",
            "isb",
            cval = in(reg) cval,
            on = in(reg) 1u64,
            options(nostack, preserves_flags)
        )
    };
}

/// Waits for an interrupt, then acknowledges it: its INTID, or SPURIOUS.
fn wait_and_ack() -> u64 {
    let intid: u64;
    // SAFETY: WFI only waits; reading ICC_IAR1_EL1 acknowledges the highest
    // pending group 1 interrupt of this vCPU, which the caller ends.
    unsafe {
        asm!("wfi", "mrs {}, icc_iar1_el1", out(reg) intid, options(nostack, preserves_flags))
    };
    intid & 0xff_ffff
}

fn end_interrupt(intid: u64) {
    // SAFETY: ends (drop and deactivate, EOImode 0) the interrupt this vCPU
    // just acknowledged; with the HW bit that also deactivates the physical
    // timer interrupt (the hypervisor's vtimer.rs).
    unsafe {
        asm!("msr icc_eoir1_el1, {}", "isb", in(reg) intid, options(nostack, preserves_flags))
    };
}

fn beat_ms(plat: &Platform) -> u64 {
    plat.bootargs()
        .split_ascii_whitespace()
        .find_map(|t| t.strip_prefix("beat_ms=")?.parse().ok())
        .filter(|&ms| ms > 0)
        .unwrap_or(3000)
}

pub fn run(plat: &Platform) -> Result<(), Reason> {
    let period = ticks_per_sec() * beat_ms(plat) / 1000;
    gic_init();
    let mut next = ticks() + period;
    arm_timer(next);
    println!("GUEST: idle: waiting for interrupts, a heartbeat every {period} ticks");
    let (mut beats, mut wakes, mut timer_irqs) = (0u64, 0u64, 0u64);
    loop {
        let intid = wait_and_ack();
        wakes += 1;
        if intid == VTIMER_PPI as u64 {
            timer_irqs += 1;
        }
        if ticks() >= next {
            beats += 1;
            println!("GUEST: idle: heartbeat {beats} ({wakes} wake-ups, {timer_irqs} timer)");
            next = ticks() + period;
        }
        if intid != SPURIOUS {
            // The timer condition is cleared first (the compare value moves
            // on), so the level-triggered PPI is not pending again at once.
            arm_timer(next);
            end_interrupt(intid);
        }
    }
}
