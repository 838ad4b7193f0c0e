//! The physical GICv3 as the hypervisor uses it: its own interrupts (the EL2
//! timer, the kick SGI) are group 1, taken at EL2 because HCR_EL2.IMO routes
//! physical IRQs here while a guest runs; EL2 itself keeps IRQs masked and
//! polls the CPU interface after a wake-up.

/// The guest's virtual timer PPI (and the physical one it mirrors).
pub const VTIMER_INTID: u32 = 27;
/// The GIC maintenance interrupt (PPI 9).
pub const MAINTENANCE_INTID: u32 = 25;

use crate::arch::{isb, read_sysreg, write_sysreg};
use platform::gicv3::*;
use platform::Board;
use tock_registers::interfaces::{ReadWriteable, Readable, Writeable};

/// SGI used to make another CPU leave its guest and look at its queue.
pub const SGI_KICK: u32 = 0;
const PRIORITY: u32 = 0x80;
const ICC_CTLR_EOIMODE: u64 = 1 << 1;
const GICR_ISACTIVER0: u64 = 0x300;
const GICR_ICACTIVER0: u64 = 0x380;
/// Each CPU's redistributor (RD_base), found at init.
static REDIST: [core::sync::atomic::AtomicU64; platform::board::MAX_CPUS] =
    [const { core::sync::atomic::AtomicU64::new(0) }; platform::board::MAX_CPUS];

fn gicd(board: &Board) -> &'static GicdRegs {
    // SAFETY: the distributor's registers, from the DTB, identity mapped as
    // device memory for the hypervisor's lifetime.
    unsafe { &*(board.gicd.base as *const GicdRegs) }
}

/// Distributor: affinity routing on, group 1 enabled. Boot CPU, once.
pub fn init_distributor(board: &Board) {
    let d = gicd(board);
    d.ctlr.set(0);
    while d.ctlr.is_set(GICD_CTLR::RWP) {}
    d.ctlr
        .write(GICD_CTLR::ARE::SET + GICD_CTLR::ENABLE_GRP1::SET);
}

/// Finds this CPU's redistributor by its affinity in GICR_TYPER.
fn redistributor(board: &Board) -> Option<u64> {
    let mpidr = crate::arch::mpidr_aff();
    let aff = (mpidr & 0xff_ffff) | ((mpidr >> 8) & 0xff00_0000);
    let mut base = board.gicr.base;
    while base < board.gicr.end() {
        // SAFETY: inside the redistributor region from the DTB, identity
        // mapped as device memory.
        let rd = unsafe { &*(base as *const GicrRdRegs) };
        let typer = rd.typer.get();
        if typer >> 32 == aff {
            return Some(base);
        }
        if typer & GICR_TYPER_LAST != 0 {
            break;
        }
        base += GICR_STRIDE;
    }
    None
}

/// Wakes this CPU's redistributor, enables our PPIs/SGIs, and turns on the
/// system-register CPU interface.
pub fn init_cpu(board: &Board) {
    let base = redistributor(board).expect("no GICv3 redistributor for this CPU");
    // SAFETY: this CPU's redistributor frames, device memory.
    let rd = unsafe { &*(base as *const GicrRdRegs) };
    // SAFETY: as above, the SGI_base frame follows RD_base.
    let sgi = unsafe { &*((base + GICR_SGI_OFFSET) as *const GicrSgiRegs) };
    rd.waker.modify(GICR_WAKER::PROCESSOR_SLEEP::CLEAR);
    while rd.waker.is_set(GICR_WAKER::CHILDREN_ASLEEP) {}

    REDIST[crate::arch::percpu::cpu_index()].store(base, core::sync::atomic::Ordering::Relaxed);
    // Ours, and the guest's timer and the GIC maintenance interrupt, which
    // exit the guest so the vGIC can act (vgic.rs).
    let ours = (1 << board.hyp_timer_intid)
        | (1 << SGI_KICK)
        | (1 << VTIMER_INTID)
        | (1 << MAINTENANCE_INTID);
    sgi.igroupr0.set(0xffff_ffff);
    for (i, reg) in sgi.ipriorityr.iter().enumerate() {
        let p = PRIORITY | PRIORITY << 8 | PRIORITY << 16 | PRIORITY << 24;
        let _ = i;
        reg.set(p);
    }
    sgi.icenabler0.set(!ours);
    sgi.isenabler0.set(ours);

    // ICC_SRE_EL2: SRE, DFB, DIB, and Enable (EL1 may use its own SRE).
    // SAFETY: enables the system-register GIC interface at EL2 and lets EL1
    // use its own; no memory effect.
    unsafe { crate::arch::write_el2_sysreg!("icc_sre_el2", 0xf) };
    isb();
    write_sysreg!("icc_pmr_el1", 0xff);
    write_sysreg!("icc_bpr1_el1", 0);
    // EOImode 1: EOI only drops priority, deactivation is separate, so a
    // guest can deactivate a physical interrupt handed to it (vtimer.rs).
    write_sysreg!("icc_ctlr_el1", ICC_CTLR_EOIMODE);
    write_sysreg!("icc_igrpen1_el1", 1);
    isb();
}

/// The highest-priority pending interrupt, acknowledged; None if spurious.
pub fn ack() -> Option<u32> {
    let intid = (read_sysreg!("icc_iar1_el1") & 0xff_ffff) as u32;
    (intid < INTID_SPURIOUS).then_some(intid)
}

/// Ends a hypervisor interrupt: priority drop and deactivation.
pub fn eoi(intid: u32) {
    write_sysreg!("icc_eoir1_el1", intid as u64);
    write_sysreg!("icc_dir_el1", intid as u64);
}

/// Priority drop only: the interrupt stays active until its guest
/// deactivates it through a HW list register.
pub fn priority_drop(intid: u32) {
    write_sysreg!("icc_eoir1_el1", intid as u64);
}

/// Sets or clears the active state of SGI/PPI `intid` on this CPU (a vCPU
/// moving between CPUs carries its timer interrupt's active state along).
pub fn set_private_active(intid: u32, active: bool) {
    let base = REDIST[crate::arch::percpu::cpu_index()].load(core::sync::atomic::Ordering::Relaxed);
    if base == 0 || intid >= 32 {
        return;
    }
    let reg = if active {
        GICR_ISACTIVER0
    } else {
        GICR_ICACTIVER0
    };
    // SAFETY: this CPU's redistributor SGI frame (found at init), device
    // memory; ISACTIVER0/ICACTIVER0 only change the named interrupt's state.
    unsafe { core::ptr::write_volatile((base + GICR_SGI_OFFSET + reg) as *mut u32, 1 << intid) };
}

/// Sends SGI `sgi` to the CPU with affinity `mpidr`.
/// Sends [`SGI_KICK`] to every other online CPU: each leaves its guest (or
/// its WFI) and looks at the run queue again.
pub fn kick_others() {
    let board = crate::arch::el2::board();
    let me = crate::arch::percpu::cpu_index();
    for (i, &mpidr) in board.cpus.iter().enumerate() {
        if i != me
            && crate::arch::percpu::get(i)
                .online
                .load(core::sync::atomic::Ordering::Acquire)
        {
            send_sgi(SGI_KICK, mpidr);
        }
    }
}

pub fn send_sgi(sgi: u32, mpidr: u64) {
    let aff1 = (mpidr >> 8) & 0xff;
    let aff2 = (mpidr >> 16) & 0xff;
    let aff3 = (mpidr >> 32) & 0xff;
    let target_list = 1u64 << (mpidr & 0xf);
    let v = (aff3 << 48) | (aff2 << 32) | ((sgi as u64) << 24) | (aff1 << 16) | target_list;
    // SAFETY: make the prior stores visible before the interrupt is sent.
    unsafe { core::arch::asm!("dsb ishst", options(nostack, preserves_flags)) };
    write_sysreg!("icc_sgi1r_el1", v);
    isb();
}
