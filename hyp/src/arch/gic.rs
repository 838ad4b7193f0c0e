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
/// The priority of the interrupts that may end a wait for a device
/// ([`urgent_only`]): higher (a lower value) than the rest.
const URGENT: u32 = 0x60;
/// ICC_PMR_EL1 letting every priority through.
const PMR_ALL: u64 = 0xff;
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
    for reg in sgi.ipriorityr.iter() {
        reg.set(PRIORITY | PRIORITY << 8 | PRIORITY << 16 | PRIORITY << 24);
    }
    // The EL2 timer may end a wait for a device (`urgent_only`).
    if let Some(reg) = sgi.ipriorityr.get((board.hyp_timer_intid / 4) as usize) {
        let sh = (board.hyp_timer_intid % 4) * 8;
        reg.set((reg.get() & !(0xff << sh)) | (URGENT << sh));
    }
    sgi.icenabler0.set(!ours);
    sgi.isenabler0.set(ours);

    // ICC_SRE_EL2: SRE, DFB, DIB, and Enable (EL1 may use its own SRE).
    // SAFETY: enables the system-register GIC interface at EL2 and lets EL1
    // use its own; no memory effect.
    unsafe { crate::arch::write_el2_sysreg!("icc_sre_el2", 0xf) };
    isb();
    write_sysreg!("icc_pmr_el1", PMR_ALL);
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

/// Runs `f` (a wait in WFI for a device) with only the [`URGENT`]
/// interrupts signalled to this CPU: the device's and the EL2 timer's. A
/// kick or a console byte pending meanwhile would end every WFI at once (it
/// is taken only when the CPU next looks, `vm::sched`), turning the wait
/// into a spin.
pub fn urgent_only<R>(f: impl FnOnce() -> R) -> R {
    write_sysreg!("icc_pmr_el1", PRIORITY as u64);
    isb();
    let r = f();
    write_sysreg!("icc_pmr_el1", PMR_ALL);
    isb();
    r
}

/// Takes SPI `intid` (a device the hypervisor drives) for the hypervisor:
/// group 1, [`URGENT`] priority, level-sensitive (a virtio-mmio line stays high
/// until its status is acknowledged, so the pending state follows it:
/// nothing latched is left behind once the device is acknowledged), and
/// disabled until [`spi_enable_here`]. Boot CPU, once.
///
/// False for an INTID that is not an SPI the distributor's arrays hold
/// (from the DTB: refused rather than indexed out of bounds).
pub fn spi_setup(board: &Board, intid: u32) -> bool {
    if !(32..1020).contains(&intid) {
        return false;
    }
    let d = gicd(board);
    let (w, bit) = ((intid / 32) as usize, 1 << (intid % 32));
    d.icenabler[w].set(bit);
    d.igroupr[w].set(d.igroupr[w].get() | bit);
    let (pw, psh) = ((intid / 4) as usize, (intid % 4) * 8);
    d.ipriorityr[pw].set((d.ipriorityr[pw].get() & !(0xff << psh)) | (URGENT << psh));
    let (cw, csh) = ((intid / 16) as usize, (intid % 16) * 2 + 1);
    d.icfgr[cw].set(d.icfgr[cw].get() & !(1 << csh));
    true
}

/// Routes SPI `intid` to this CPU and enables it: a pending one then ends
/// this CPU's WFI, even with interrupts masked (which the hypervisor keeps
/// them), without being taken. An INTID outside the distributor's arrays
/// is left alone.
pub fn spi_enable_here(board: &Board, intid: u32) {
    let d = gicd(board);
    if let (Some(route), Some(en)) = (
        d.irouter.get(intid as usize),
        d.isenabler.get((intid / 32) as usize),
    ) {
        route.set(crate::arch::mpidr_aff());
        en.set(1 << (intid % 32));
    }
}

/// Stops forwarding SPI `intid`.
pub fn spi_disable(board: &Board, intid: u32) {
    if let Some(r) = gicd(board).icenabler.get((intid / 32) as usize) {
        r.set(1 << (intid % 32));
    }
}

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

/// Sends SGI `sgi` to the CPU with affinity `mpidr`.
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
