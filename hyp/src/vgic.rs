//! The virtual GICv3 each VM sees: a distributor and one redistributor per
//! vCPU emulated by trapping their MMIO (at QEMU virt's addresses), and the
//! hardware's virtual CPU interface (ICV_* registers) fed through the list
//! registers (ICH_LR<n>_EL2).
//!
//! The model is KVM's flush/sync: the software state below is the truth for
//! every interrupt not in a list register. Before each guest entry `flush`
//! moves the best pending interrupts of that vCPU into free list registers;
//! after each exit `sync` retires the ones the guest has deactivated. The
//! guest acknowledges, EOIs and deactivates without exits. An EL2 exit comes
//! only when the guest deactivates a level-triggered interrupt (the LR's EOI
//! bit: the line is sampled again) or when more interrupts are pending than
//! list registers (underflow maintenance interrupt).
//!
//! Guest SGIs (ICC_SGI1R_EL1 writes) trap to EL2 because HCR_EL2.IMO is set.
//! The guest's virtual timer (PPI 27) is injected with the HW bit, so the
//! guest's deactivation also deactivates the physical interrupt (vtimer.rs).
//!
//! Nothing a guest writes here can fail the hypervisor: unknown offsets are
//! RAZ/WI and odd access sizes are ignored.

use crate::arch::{read_sysreg, write_sysreg};
use crate::exit::Action;
use crate::vcpu::Vcpu;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use spin::Mutex;

/// Guest-physical distributor and redistributor frames (as on QEMU virt).
pub const GICD_BASE: u64 = 0x0800_0000;
pub const GICD_SIZE: u64 = 0x1_0000;
pub const GICR_BASE: u64 = 0x080a_0000;
pub const GICR_STRIDE: u64 = 0x2_0000;
const GICR_SGI_FRAME: u64 = 0x1_0000;

/// The guest's virtual timer PPI (and the physical one it mirrors).
pub const VTIMER_INTID: u32 = 27;
/// The GIC maintenance interrupt (PPI 9).
pub const MAINTENANCE_INTID: u32 = 25;
/// SPI 1: the emulated PL011.
pub const UART_INTID: u32 = 33;

/// SPIs the distributor implements (GICD_TYPER.ITLinesNumber = 2: INTIDs < 96).
const NR_SPIS: usize = 64;
const NR_INTIDS: u32 = 32 + NR_SPIS as u32;
/// The architecture's maximum number of list registers.
const MAX_LRS: usize = 16;
const NO_LR: u8 = u8::MAX;

// List register fields (ICH_LR<n>_EL2).
const LR_PENDING: u64 = 1 << 62;
const LR_ACTIVE: u64 = 1 << 63;
const LR_STATE: u64 = LR_PENDING | LR_ACTIVE;
const LR_HW: u64 = 1 << 61;
const LR_GROUP1: u64 = 1 << 60;
const LR_EOI: u64 = 1 << 41;

// ICH_HCR_EL2 fields.
const HCR_EN: u64 = 1 << 0;
const HCR_UIE: u64 = 1 << 1;

// GICD_CTLR: group enables; ARE and DS are RAO (affinity routing, one security state).
const CTLR_GRP0: u32 = 1 << 0;
const CTLR_GRP1: u32 = 1 << 1;
const CTLR_RAO: u32 = (1 << 4) | (1 << 6);
/// GICD/GICR_PIDR2: architecture version 3.
const PIDR2_GICV3: u64 = 0x3b;
const PIDR2: u64 = 0xffe8;
const IIDR: u64 = 0x0300_043b;

/// One interrupt's state while it is not in a list register.
#[derive(Clone, Copy)]
struct Irq {
    enabled: bool,
    /// Edge latch (or a guest write to ISPENDR).
    pending: bool,
    /// Input line of a level-triggered interrupt.
    level: bool,
    edge: bool,
    group1: bool,
    priority: u8,
    /// SPIs: GICD_IROUTER as written, and the vCPU it names.
    route: u64,
    target: usize,
    /// Backed by the physical interrupt of the same INTID (the timer).
    hw: bool,
    /// List register holding it, or NO_LR.
    lr: u8,
}

impl Irq {
    const fn new(edge: bool) -> Irq {
        Irq {
            enabled: false,
            pending: false,
            level: false,
            edge,
            group1: false,
            priority: 0,
            route: 0,
            target: 0,
            hw: false,
            lr: NO_LR,
        }
    }

    fn wants_delivery(&self, ctlr: u32) -> bool {
        let group_on = ctlr & if self.group1 { CTLR_GRP1 } else { CTLR_GRP0 } != 0;
        self.enabled && group_on && (self.pending || self.level) && self.lr == NO_LR
    }
}

/// A vCPU's redistributor and its CPU-interface state while it is not loaded.
#[derive(Clone)]
struct CpuIf {
    private: [Irq; 32],
    /// List registers (live in hardware while loaded; kept in sync on exit).
    lrs: [u64; MAX_LRS],
    lr_intid: [u32; MAX_LRS],
    vmcr: u64,
    ap0r: [u64; 4],
    ap1r: [u64; 4],
    sleeping: bool,
    /// Physical CPU it is loaded on.
    running_on: Option<usize>,
}

/// Per-vCPU hints read without the vGIC lock (set and cleared under it), so
/// the many exits that change no interrupt (a UART byte, a page fault) pass
/// `sync` and `flush` without taking the lock the other vCPUs use too.
/// Something may have become deliverable since `flush` last looked.
const F_DIRTY: u8 = 1 << 0;
/// Some list register of the vCPU holds an interrupt.
const F_LRS: u8 = 1 << 1;

impl CpuIf {
    fn new() -> CpuIf {
        let mut private = [Irq::new(false); 32];
        private[..16].iter_mut().for_each(|i| i.edge = true);
        CpuIf {
            private,
            lrs: [0; MAX_LRS],
            lr_intid: [u32::MAX; MAX_LRS],
            vmcr: 0,
            ap0r: [0; 4],
            ap1r: [0; 4],
            sleeping: true,
            running_on: None,
        }
    }
}

#[derive(Clone)]
struct State {
    ctlr: u32,
    spis: [Irq; NR_SPIS],
    cpus: Vec<CpuIf>,
    /// F_* per vCPU: the same array as `Vgic::flags`.
    flags: Arc<[AtomicU8]>,
}

impl State {
    /// The state of `intid` as seen by vCPU `cpu`, if implemented.
    fn irq(&mut self, cpu: usize, intid: u32) -> Option<&mut Irq> {
        match intid {
            0..32 => self
                .cpus
                .get_mut(cpu)
                .map(|c| &mut c.private[intid as usize]),
            32..NR_INTIDS => Some(&mut self.spis[intid as usize - 32]),
            _ => None,
        }
    }

    /// Makes the physical CPU running vCPU `cpu` (other than this one) look
    /// at its interrupts again.
    fn kick(&self, cpu: usize) {
        let Some(pcpu) = self.cpus.get(cpu).and_then(|c| c.running_on) else {
            return;
        };
        if pcpu != crate::percpu::cpu_index() {
            if let Some(&mpidr) = crate::el2::board().cpus.get(pcpu) {
                crate::gic::send_sgi(crate::gic::SGI_KICK, mpidr);
            }
        }
    }

    /// Makes `flush` look at vCPU `cpu`'s interrupts again.
    fn touch(&self, cpu: usize) {
        if let Some(f) = self.flags.get(cpu) {
            f.fetch_or(F_DIRTY, Ordering::Release);
        }
    }

    /// Makes `flush` look again on every vCPU.
    fn touch_all(&self) {
        (0..self.flags.len()).for_each(|c| self.touch(c));
    }

    /// The vCPU an SPI is delivered to.
    fn spi_target(&self, intid: u32) -> usize {
        self.spis.get(intid as usize - 32).map_or(0, |i| i.target)
    }
}

/// A VM's virtual GIC.
pub struct Vgic {
    state: Mutex<State>,
    flags: Arc<[AtomicU8]>,
}

impl Vgic {
    pub fn new(nr_vcpus: usize) -> Vgic {
        let cpus = (0..nr_vcpus).map(|_| CpuIf::new()).collect();
        let flags: Arc<[AtomicU8]> = (0..nr_vcpus).map(|_| AtomicU8::new(F_DIRTY)).collect();
        Vgic {
            state: Mutex::new(State {
                ctlr: 0,
                spis: [Irq::new(false); NR_SPIS],
                cpus,
                flags: flags.clone(),
            }),
            flags,
        }
    }

    /// Makes every vCPU of the VM pass through `flush` (and so
    /// `vpl011::sync_image`) before it next runs guest code.
    pub fn poke(&self) {
        let st = self.state.lock();
        st.touch_all();
        (0..st.cpus.len()).for_each(|c| st.kick(c));
    }

    /// Drives the input line of a level-triggered SPI (a device model).
    pub fn set_spi_level(&self, intid: u32, level: bool) {
        let mut st = self.state.lock();
        let Some(irq) = st.irq(0, intid).filter(|_| intid >= 32) else {
            return;
        };
        let changed = irq.level != level;
        irq.level = level;
        if changed {
            let target = st.spi_target(intid);
            st.touch(target);
            if level {
                st.kick(target);
            }
        }
    }

    /// Becomes a copy of `src` (a forked or restored VM, both quiesced):
    /// configuration, pending and active interrupts, the saved list
    /// registers and CPU-interface state of every vCPU, exactly as a vCPU
    /// moving to another physical CPU keeps them. Losing a pending SGI or an
    /// active interrupt here would hang the guest (a lost IPI) or leave it
    /// with a stuck active priority. Device lines are copied too: the devices
    /// are copies as well.
    pub fn copy_from(&self, src: &Vgic) {
        let mut copy = src.state.lock().clone();
        copy.flags = self.flags.clone();
        for (i, cpu) in copy.cpus.iter_mut().enumerate() {
            cpu.running_on = None;
            let lrs = cpu.lr_intid.iter().any(|&i| i != u32::MAX);
            let f = F_DIRTY | if lrs { F_LRS } else { 0 };
            if let Some(flag) = self.flags.get(i) {
                flag.store(f, Ordering::Release);
            }
        }
        *self.state.lock() = copy;
    }
}

// ---------------------------------------------------------------------------
// The hardware virtual CPU interface.

static VTR: AtomicU64 = AtomicU64::new(u64::MAX);

/// ICH_VTR_EL2, read once.
fn vtr() -> u64 {
    let v = VTR.load(Ordering::Relaxed);
    if v != u64::MAX {
        return v;
    }
    let v = read_sysreg!("ich_vtr_el2");
    VTR.store(v, Ordering::Relaxed);
    v
}

fn nr_lrs() -> usize {
    ((vtr() & 0x1f) as usize + 1).min(MAX_LRS)
}

/// Active-priority registers per group: 1, 2 or 4 for 5, 6 or 7 priority bits.
fn nr_aprs() -> usize {
    let pribits = ((vtr() >> 29) & 7) + 1;
    1 << pribits.saturating_sub(5).min(2)
}

/// Indexed access to a family of system registers (list registers, APRs).
macro_rules! sysreg_array {
    ($read:ident, $write:ident, $($n:literal => $reg:literal),*) => {
        fn $read(n: usize) -> u64 {
            match n {
                $($n => read_sysreg!($reg),)*
                _ => 0,
            }
        }

        fn $write(n: usize, v: u64) {
            match n {
                $($n => write_sysreg!($reg, v),)*
                _ => {}
            }
        }
    };
}
sysreg_array!(read_lr, write_lr, 0 => "ich_lr0_el2", 1 => "ich_lr1_el2", 2 => "ich_lr2_el2", 3 => "ich_lr3_el2", 4 => "ich_lr4_el2", 5 => "ich_lr5_el2", 6 => "ich_lr6_el2", 7 => "ich_lr7_el2", 8 => "ich_lr8_el2", 9 => "ich_lr9_el2", 10 => "ich_lr10_el2", 11 => "ich_lr11_el2", 12 => "ich_lr12_el2", 13 => "ich_lr13_el2", 14 => "ich_lr14_el2", 15 => "ich_lr15_el2");
sysreg_array!(read_ap0r, write_ap0r, 0 => "ich_ap0r0_el2", 1 => "ich_ap0r1_el2", 2 => "ich_ap0r2_el2", 3 => "ich_ap0r3_el2");
sysreg_array!(read_ap1r, write_ap1r, 0 => "ich_ap1r0_el2", 1 => "ich_ap1r1_el2", 2 => "ich_ap1r2_el2", 3 => "ich_ap1r3_el2");

/// Installs `vcpu`'s CPU interface on this physical CPU (vcpu load).
pub fn load(vcpu: &Vcpu) {
    let mut st = vcpu.vm.vgic.state.lock();
    let Some(cpu) = st.cpus.get_mut(vcpu.index) else {
        return;
    };
    write_sysreg!("ich_vmcr_el2", cpu.vmcr);
    for i in 0..nr_aprs() {
        write_ap0r(i, cpu.ap0r[i]);
        write_ap1r(i, cpu.ap1r[i]);
    }
    for i in 0..nr_lrs() {
        write_lr(i, cpu.lrs[i]);
    }
    write_sysreg!("ich_hcr_el2", HCR_EN);
    cpu.running_on = Some(crate::percpu::cpu_index());
    st.touch(vcpu.index);
    let cpu = &st.cpus[vcpu.index];
    // A timer interrupt the guest has not finished with keeps the physical
    // PPI active on whichever CPU the vCPU runs, so it cannot fire again
    // until the guest deactivates it (KVM does the same).
    let timer = &cpu.private[VTIMER_INTID as usize];
    if timer.hw && timer.level {
        crate::gic::set_private_active(VTIMER_INTID, true);
    }
}

/// Saves `vcpu`'s CPU interface and turns the virtual interface off (vcpu put).
pub fn put(vcpu: &Vcpu) {
    let mut st = vcpu.vm.vgic.state.lock();
    let Some(cpu) = st.cpus.get_mut(vcpu.index) else {
        return;
    };
    cpu.vmcr = read_sysreg!("ich_vmcr_el2");
    for i in 0..nr_aprs() {
        cpu.ap0r[i] = read_ap0r(i);
        cpu.ap1r[i] = read_ap1r(i);
    }
    write_sysreg!("ich_hcr_el2", 0);
    cpu.running_on = None;
    let timer = &cpu.private[VTIMER_INTID as usize];
    if timer.hw && timer.level {
        crate::gic::set_private_active(VTIMER_INTID, false);
    }
}

/// Before entering the guest: re-pend edges that fired again while in a
/// list register, then fill free list registers with the best pending
/// interrupts. If some do not fit, ask for an underflow maintenance
/// interrupt so they get their turn.
pub fn flush(vcpu: &Vcpu) {
    let me = vcpu.index;
    let flags = &vcpu.vm.vgic.flags;
    if flags
        .get(me)
        .is_none_or(|f| f.load(Ordering::Acquire) & F_DIRTY == 0)
    {
        // Nothing changed since the last flush found nothing to add; sync
        // left ICH_HCR_EL2 enabled.
        return;
    }
    // Device state that must follow (the UART's register image), before
    // the vGIC lock: it takes the UART and stage-2 locks.
    crate::vpl011::sync_image(&vcpu.vm);
    let mut st = vcpu.vm.vgic.state.lock();
    let st = &mut *st;
    // Cleared under the lock: a change from now on sets it again.
    flags[me].fetch_and(!F_DIRTY, Ordering::AcqRel);
    let Some(cpu) = st.cpus.get_mut(me) else {
        return;
    };
    let lrs = nr_lrs();
    for i in 0..lrs {
        let intid = cpu.lr_intid[i];
        if intid < 32 && cpu.private[intid as usize].pending && cpu.lrs[i] & LR_PENDING == 0 {
            cpu.private[intid as usize].pending = false;
            cpu.lrs[i] |= LR_PENDING;
            write_lr(i, cpu.lrs[i]);
        }
    }
    let mut overflow = false;
    while let Some(intid) = best_pending(st, me) {
        let cpu = &mut st.cpus[me];
        let Some(slot) = (0..lrs).find(|&i| cpu.lr_intid[i] == u32::MAX) else {
            overflow = true;
            break;
        };
        let irq = if intid < 32 {
            &mut cpu.private[intid as usize]
        } else {
            &mut st.spis[intid as usize - 32]
        };
        let mut lr = LR_PENDING | u64::from(intid) | (u64::from(irq.priority) << 48);
        if irq.group1 {
            lr |= LR_GROUP1;
        }
        if irq.hw {
            lr |= LR_HW | (u64::from(intid) << 32);
        } else if !irq.edge {
            lr |= LR_EOI;
        }
        irq.pending = false;
        irq.lr = slot as u8;
        cpu.lrs[slot] = lr;
        cpu.lr_intid[slot] = intid;
        write_lr(slot, lr);
        flags[me].fetch_or(F_LRS, Ordering::Release);
    }
    if overflow {
        // The next flush must look again.
        st.touch(me);
    }
    write_sysreg!(
        "ich_hcr_el2",
        if overflow { HCR_EN | HCR_UIE } else { HCR_EN }
    );
}

/// The highest-priority interrupt (lowest value) waiting for vCPU `me`.
fn best_pending(st: &State, me: usize) -> Option<u32> {
    let private = st.cpus[me]
        .private
        .iter()
        .enumerate()
        .map(|(i, irq)| (i as u32, irq));
    let spis = st
        .spis
        .iter()
        .enumerate()
        .map(|(i, irq)| (i as u32 + 32, irq))
        .filter(|(_, irq)| irq.target == me);
    private
        .chain(spis)
        .filter(|(_, irq)| irq.wants_delivery(st.ctlr))
        .min_by_key(|(_, irq)| irq.priority)
        .map(|(intid, _)| intid)
}

/// After an exit: note what the guest did with its list registers, and
/// retire those it has deactivated.
pub fn sync(vcpu: &Vcpu) {
    let me = vcpu.index;
    let flags = &vcpu.vm.vgic.flags;
    // No list register in use: nothing to retire, and no underflow
    // interrupt was asked for (that needs them all full).
    if flags
        .get(me)
        .is_none_or(|f| f.load(Ordering::Acquire) & F_LRS == 0)
    {
        return;
    }
    let mut st = vcpu.vm.vgic.state.lock();
    let st = &mut *st;
    let Some(cpu) = st.cpus.get_mut(me) else {
        return;
    };
    let mut retired = false;
    for i in 0..nr_lrs() {
        let intid = cpu.lr_intid[i];
        if intid == u32::MAX {
            continue;
        }
        let lr = read_lr(i);
        cpu.lrs[i] = lr;
        if lr & LR_STATE != 0 {
            continue;
        }
        write_lr(i, 0);
        cpu.lrs[i] = 0;
        cpu.lr_intid[i] = u32::MAX;
        retired = true;
        let irq = if intid < 32 {
            &mut cpu.private[intid as usize]
        } else {
            &mut st.spis[intid as usize - 32]
        };
        irq.lr = NO_LR;
        if irq.hw {
            // The physical timer interrupt was deactivated with it; if the
            // timer still fires it interrupts EL2 again.
            irq.level = false;
        }
    }
    if retired {
        // A level still high, or an edge that came meanwhile, is due again.
        st.touch(me);
        if st.cpus[me].lr_intid.iter().all(|&i| i == u32::MAX) {
            flags[me].fetch_and(!F_LRS, Ordering::AcqRel);
        }
    }
    write_sysreg!("ich_hcr_el2", HCR_EN);
}

/// Whether `vcpu` has an interrupt to take (its WFI should end).
pub fn has_pending(vcpu: &Vcpu) -> bool {
    let st = vcpu.vm.vgic.state.lock();
    let Some(cpu) = st.cpus.get(vcpu.index) else {
        return false;
    };
    cpu.lrs.iter().any(|lr| lr & LR_PENDING != 0) || best_pending(&st, vcpu.index).is_some()
}

/// A physical interrupt taken while `vcpu` was loaded on this CPU. Returns
/// true if it now belongs to the guest (the caller must not deactivate it).
pub fn host_irq(vcpu: Option<&Vcpu>, intid: u32) -> bool {
    let Some(vcpu) = vcpu else { return false };
    if intid != VTIMER_INTID {
        return false;
    }
    // Priority drop only: the guest's deactivation of the HW-backed virtual
    // interrupt deactivates the physical one.
    crate::gic::priority_drop(intid);
    let mut st = vcpu.vm.vgic.state.lock();
    if let Some(irq) = st.irq(vcpu.index, intid) {
        irq.hw = true;
        irq.level = true;
    }
    st.touch(vcpu.index);
    true
}

// ---------------------------------------------------------------------------
// Trapped accesses: SGI generation and the distributor/redistributor MMIO.

/// A trapped system register access that belongs to the GIC, if it is one.
pub fn sysreg(vcpu: &mut Vcpu, esr: u64) -> Option<Action> {
    let iss = esr & 0x1ff_ffff;
    let (op0, op1, crn, crm, op2) = (
        (iss >> 20) & 3,
        (iss >> 14) & 7,
        (iss >> 10) & 0xf,
        (iss >> 1) & 0xf,
        (iss >> 17) & 7,
    );
    let is_read = iss & 1 != 0;
    // ICC_SGI1R_EL1, ICC_ASGI1R_EL1, ICC_SGI0R_EL1 (all write-only).
    let is_sgi =
        op0 == 3 && crn == 12 && crm == 11 && matches!((op1, op2), (0, 5) | (1, 6) | (2, 7));
    if !is_sgi {
        return None;
    }
    let rt = ((iss >> 5) & 0x1f) as usize;
    if is_read {
        if rt != 31 {
            vcpu.regs.x[rt] = 0;
        }
    } else {
        let value = if rt == 31 { 0 } else { vcpu.regs.x[rt] };
        send_sgi(vcpu, value);
    }
    vcpu.regs.pc += 4;
    Some(Action::Continue)
}

/// ICC_SGI1R_EL1: INTID [27:24], Aff1 [23:16], TargetList [15:0], Aff2
/// [39:32], IRM [40], RS [47:44], Aff3 [55:48].
fn send_sgi(vcpu: &Vcpu, value: u64) {
    let intid = ((value >> 24) & 0xf) as usize;
    let all_others = value & (1 << 40) != 0;
    let aff1 = ((value >> 16) & 0xff) as usize;
    let rs = ((value >> 44) & 0xf) as usize;
    let higher_aff = (value >> 32) & 0xff | (value >> 48) & 0xff;
    let mut st = vcpu.vm.vgic.state.lock();
    for target in 0..st.cpus.len() {
        let listed = !all_others
            && higher_aff == 0
            && target / 16 == aff1
            && rs == 0
            && (value >> (target % 16)) & 1 != 0;
        if (all_others && target != vcpu.index) || listed {
            st.cpus[target].private[intid].pending = true;
            st.touch(target);
            st.kick(target);
        }
    }
}

/// A data abort on the GIC's frames; None if `ipa` is not one of them.
pub fn mmio(vcpu: &mut Vcpu, esr: u64, ipa: u64) -> Option<Action> {
    let nr_cpus = vcpu.vm.nr_vcpus as u64;
    let region = if (GICD_BASE..GICD_BASE + GICD_SIZE).contains(&ipa) {
        Frame::Dist(ipa - GICD_BASE)
    } else if (GICR_BASE..GICR_BASE + nr_cpus * GICR_STRIDE).contains(&ipa) {
        let off = ipa - GICR_BASE;
        Frame::Redist((off / GICR_STRIDE) as usize, off % GICR_STRIDE)
    } else {
        return None;
    };
    const ISS_ISV: u64 = 1 << 24;
    if esr & ISS_ISV == 0 {
        return Some(crate::exit::stop(
            vcpu,
            "accessed the GIC with an instruction we cannot emulate (ISV=0)",
        ));
    }
    let srt = ((esr >> 16) & 0x1f) as usize;
    let size = 1u64 << ((esr >> 22) & 3);
    let mut st = vcpu.vm.vgic.state.lock();
    if esr & (1 << 6) != 0 {
        let value = if srt == 31 { 0 } else { vcpu.regs.x[srt] };
        match region {
            Frame::Dist(off) => dist_write(&mut st, off, size, value),
            Frame::Redist(cpu, off) => redist_write(&mut st, cpu, off, size, value),
        }
    } else {
        let value = match region {
            Frame::Dist(off) => dist_read(&mut st, off, size),
            Frame::Redist(cpu, off) => redist_read(&mut st, cpu, off, size),
        };
        if srt != 31 {
            vcpu.regs.x[srt] = value & size_mask(size);
        }
    }
    drop(st);
    vcpu.regs.pc += 4;
    Some(Action::Continue)
}

enum Frame {
    Dist(u64),
    Redist(usize, u64),
}

fn size_mask(size: u64) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1 << (size * 8)) - 1
    }
}

/// The part of a 64-bit register an access of `size` at `off` (relative
/// to the register) sees.
fn part_of(reg: u64, off: u64, size: u64) -> u64 {
    (reg >> ((off & 7) * 8)) & size_mask(size)
}

/// The per-interrupt registers shared by GICD (SPIs) and the redistributor's
/// SGI frame (SGIs and PPIs), at the same offsets in both.
#[derive(Clone, Copy)]
enum Field {
    Group,
    SetEnable,
    ClearEnable,
    SetPending,
    ClearPending,
    SetActive,
    ClearActive,
    Priority,
    Config,
}

/// The field and first INTID an offset addresses.
fn decode(off: u64) -> Option<(Field, u32)> {
    let bits = |base: u64| (((off - base) / 4) * 32) as u32;
    Some(match off {
        0x080..0x100 => (Field::Group, bits(0x080)),
        0x100..0x180 => (Field::SetEnable, bits(0x100)),
        0x180..0x200 => (Field::ClearEnable, bits(0x180)),
        0x200..0x280 => (Field::SetPending, bits(0x200)),
        0x280..0x300 => (Field::ClearPending, bits(0x280)),
        0x300..0x380 => (Field::SetActive, bits(0x300)),
        0x380..0x400 => (Field::ClearActive, bits(0x380)),
        0x400..0x800 => (Field::Priority, (off - 0x400) as u32),
        0xc00..0xd00 => (Field::Config, (((off - 0xc00) / 4) * 16) as u32),
        _ => return None,
    })
}

/// Which INTIDs a frame may touch: the distributor only SPIs, a
/// redistributor only its SGIs and PPIs.
fn in_frame(intid: u32, private: bool) -> bool {
    if private {
        intid < 32
    } else {
        (32..NR_INTIDS).contains(&intid)
    }
}

fn irq_read(st: &mut State, cpu: usize, off: u64, size: u64, private: bool) -> u64 {
    let Some((field, first)) = decode(off) else {
        return 0;
    };
    let active = |st: &State, intid: u32, irq: &Irq| {
        irq.lr != NO_LR
            && st
                .cpus
                .get(if intid < 32 { cpu } else { irq.target })
                .is_some_and(|c| c.lrs[irq.lr as usize] & LR_ACTIVE != 0)
    };
    match field {
        Field::Priority => (0..size.min(8) as u32).fold(0, |acc, i| {
            let p = if in_frame(first + i, private) {
                st.irq(cpu, first + i).map_or(0, |q| q.priority)
            } else {
                0
            };
            acc | (u64::from(p) << (i * 8))
        }),
        Field::Config => (0..16).fold(0, |acc, i| {
            let edge =
                in_frame(first + i, private) && st.irq(cpu, first + i).is_some_and(|q| q.edge);
            acc | (u64::from(edge) << (i * 2 + 1))
        }),
        _ if size != 4 => 0,
        _ => (0..32).fold(0, |acc, i| {
            let intid = first + i;
            if !in_frame(intid, private) {
                return acc;
            }
            let Some(irq) = st.irq(cpu, intid).copied() else {
                return acc;
            };
            let bit = match field {
                Field::Group => irq.group1,
                Field::SetEnable | Field::ClearEnable => irq.enabled,
                Field::SetPending | Field::ClearPending => irq.pending || irq.level,
                _ => active(st, intid, &irq),
            };
            acc | (u64::from(bit) << i)
        }),
    }
}

fn irq_write(st: &mut State, cpu: usize, off: u64, size: u64, value: u64, private: bool) {
    let Some((field, first)) = decode(off) else {
        return;
    };
    let count = match field {
        Field::Priority => size.min(8) as u32,
        Field::Config if size == 4 => 16,
        _ if size == 4 => 32,
        _ => return,
    };
    for i in 0..count {
        let intid = first + i;
        if !in_frame(intid, private) {
            continue;
        }
        let Some(irq) = st.irq(cpu, intid) else {
            continue;
        };
        let bit = (value >> i) & 1 != 0;
        match field {
            Field::Group => irq.group1 = bit,
            Field::SetEnable if bit => irq.enabled = true,
            Field::ClearEnable if bit => irq.enabled = false,
            Field::SetPending if bit => irq.pending = true,
            Field::ClearPending if bit => irq.pending = false,
            Field::Priority => irq.priority = (value >> (i * 8)) as u8,
            // SGIs are always edge-triggered.
            Field::Config if intid >= 16 => irq.edge = (value >> (i * 2 + 1)) & 1 != 0,
            _ => {}
        }
    }
    // Something may have become deliverable somewhere: let the vCPUs look.
    st.touch_all();
    (0..st.cpus.len()).for_each(|c| st.kick(c));
}

fn dist_read(st: &mut State, off: u64, size: u64) -> u64 {
    match off {
        0x0000 => u64::from(st.ctlr | CTLR_RAO),
        // ITLinesNumber, IDbits = 9 (10-bit INTIDs), no LPIs, no security extension.
        0x0004 => ((NR_INTIDS as u64 / 32) - 1) | (9 << 19),
        0x0008 => IIDR,
        0x6100..0x8000 => {
            let intid = ((off - 0x6000) / 8) as u32;
            st.irq(0, intid)
                .filter(|_| intid >= 32)
                .map_or(0, |q| part_of(q.route, off, size))
        }
        PIDR2 => PIDR2_GICV3,
        _ => irq_read(st, 0, off, size, false),
    }
}

fn dist_write(st: &mut State, off: u64, size: u64, value: u64) {
    match off {
        0x0000 => {
            st.ctlr = value as u32 & (CTLR_GRP0 | CTLR_GRP1);
            st.touch_all();
            (0..st.cpus.len()).for_each(|c| st.kick(c));
        }
        0x6100..0x8000 => {
            let intid = ((off - 0x6000) / 8) as u32;
            let nr_cpus = st.cpus.len();
            let Some(irq) = st.irq(0, intid).filter(|_| intid >= 32) else {
                return;
            };
            let shift = (off & 7) * 8;
            let mask = size_mask(size) << shift;
            irq.route = (irq.route & !mask) | ((value << shift) & mask);
            irq.target = route_target(irq.route, nr_cpus);
            let target = irq.target;
            st.touch_all();
            st.kick(target);
        }
        _ => irq_write(st, 0, off, size, value, false),
    }
}

/// The vCPU an IROUTER value names (Vcpu::mpidr: Aff0 = index % 16, Aff1 =
/// index / 16); "any CPU" (IRM) and unknown affinities go to vCPU 0.
fn route_target(route: u64, nr_cpus: usize) -> usize {
    if route & (1 << 31) != 0 || route & 0xff_00ff_0000 != 0 {
        return 0;
    }
    let index = ((route >> 8) & 0xff) as usize * 16 + (route & 0xff) as usize;
    if route & 0xff < 16 && index < nr_cpus {
        index
    } else {
        0
    }
}

fn redist_read(st: &mut State, cpu: usize, off: u64, size: u64) -> u64 {
    if off >= GICR_SGI_FRAME {
        return irq_read(st, cpu, off - GICR_SGI_FRAME, size, true);
    }
    let nr_cpus = st.cpus.len();
    let Some(c) = st.cpus.get(cpu) else { return 0 };
    match off {
        0x0004 => IIDR,
        0x0008..0x0010 => {
            // Affinity [63:32], processor number [23:8], Last [4].
            let aff = ((cpu as u64 / 16) << 8) | (cpu as u64 % 16);
            let last = if cpu + 1 == nr_cpus { 1 << 4 } else { 0 };
            part_of((aff << 32) | ((cpu as u64) << 8) | last, off, size)
        }
        // WAKER: ChildrenAsleep follows ProcessorSleep at once.
        0x0014 if c.sleeping => 0b110,
        PIDR2 => PIDR2_GICV3,
        _ => 0,
    }
}

fn redist_write(st: &mut State, cpu: usize, off: u64, size: u64, value: u64) {
    if off >= GICR_SGI_FRAME {
        return irq_write(st, cpu, off - GICR_SGI_FRAME, size, value, true);
    }
    if off == 0x0014 {
        if let Some(c) = st.cpus.get_mut(cpu) {
            c.sleeping = value & 0b10 != 0;
        }
    }
}
