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
//!
//! The interface is narrow: a vCPU is named by its index, a trapped access
//! comes in decoded (`arch::esr`), and the caller (`vm`) owns the vCPU's
//! registers. `cpuif` holds the hardware side (list registers, load/put,
//! flush/sync), `mmio` the trapped distributor, redistributor and SGI
//! accesses.

mod cpuif;
pub use cpuif::host_irq;
mod mmio;
mod save;

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU8, Ordering};
use spin::Mutex;

/// Guest-physical distributor and redistributor frames (as on QEMU virt).
pub const GICD_BASE: u64 = 0x0800_0000;
pub const GICD_SIZE: u64 = 0x1_0000;
pub const GICR_BASE: u64 = 0x080a_0000;
pub const GICR_STRIDE: u64 = 0x2_0000;
const GICR_SGI_FRAME: u64 = 0x1_0000;

use crate::arch::gic::VTIMER_INTID;
/// SPI 1: the emulated PL011.
pub const UART_INTID: u32 = 33;

/// SPIs the distributor implements (GICD_TYPER.ITLinesNumber = 2: INTIDs < 96).
const NR_SPIS: usize = 64;
const NR_INTIDS: u32 = 32 + NR_SPIS as u32;
/// The architecture's maximum number of list registers.
const MAX_LRS: usize = 16;
const NO_LR: u8 = u8::MAX;

// List registers (ICH_LR<n>_EL2) and ICH_HCR_EL2, as `aarch64-cpu` describes
// them (every LR has ICH_LR0_EL2's layout).
use aarch64_cpu::registers::{ICH_HCR_EL2, ICH_LR0_EL2};
use tock_registers::LocalRegisterCopy;

/// A list register's value.
type Lr = LocalRegisterCopy<u64, ICH_LR0_EL2::Register>;

/// The LR holds a pending (or pending and active) interrupt.
fn lr_pending(lr: u64) -> bool {
    Lr::new(lr).read(ICH_LR0_EL2::State) & 0b01 != 0
}

/// The LR holds an active (or active and pending) interrupt.
fn lr_active(lr: u64) -> bool {
    Lr::new(lr).read(ICH_LR0_EL2::State) & 0b10 != 0
}

/// The LR still holds its interrupt (pending, active or both).
fn lr_live(lr: u64) -> bool {
    Lr::new(lr).read(ICH_LR0_EL2::State) != 0
}

/// The same LR, pending again (an edge that fired while it was active).
fn lr_repend(lr: u64) -> u64 {
    let mut r = Lr::new(lr);
    let state = r.read(ICH_LR0_EL2::State);
    r.modify(ICH_LR0_EL2::State.val(state | 0b01));
    r.get()
}

/// ICH_HCR_EL2 with the virtual CPU interface on, and the underflow
/// maintenance interrupt if more interrupts wait than LRs hold.
fn hcr(underflow: bool) -> u64 {
    let on = ICH_HCR_EL2::En::SET;
    if underflow {
        (on + ICH_HCR_EL2::UIE::SET).value
    } else {
        on.value
    }
}

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
/// The vCPU sleeps in the run queue (its WFI, `vm::sched`): whatever sets
/// `F_DIRTY` for it wakes the other CPUs to look. Both bits live in one
/// atomic, so of a `touch` and a `sleep` racing, the later one sees the
/// earlier one's bit: no wake-up is lost.
const F_ASLEEP: u8 = 1 << 2;

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
        if pcpu != crate::arch::percpu::cpu_index() {
            if let Some(&mpidr) = crate::arch::el2::board().cpus.get(pcpu) {
                crate::arch::gic::send_sgi(crate::arch::gic::SGI_KICK, mpidr);
            }
        }
    }

    /// Makes `flush` look at vCPU `cpu`'s interrupts again, and wakes the
    /// other CPUs if it sleeps in the run queue (one of them takes it).
    fn touch(&self, cpu: usize) {
        if let Some(f) = self.flags.get(cpu) {
            if f.fetch_or(F_DIRTY, Ordering::AcqRel) & F_ASLEEP != 0 {
                crate::arch::gic::kick_others();
            }
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

    /// Makes every vCPU of the VM pass through `flush` (and so the device
    /// updates its caller does first, see `needs_flush`) before it next runs
    /// guest code.
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
