//! A virtual CPU: its saved register state and the world switch around
//! `__guest_enter`. A `Vcpu` is owned by exactly one place at a time (the run
//! queue, a physical CPU running it, or its VM's parking area), so its state
//! needs no lock: ownership moves with the `Box`.

use crate::arch::{read_sysreg, write_sysreg};
pub use crate::arch::{FpRegs, GuestRegs};
use crate::vm::Vm;
use alloc::sync::Arc;

/// Declares the EL1 (and EL0 / virtual timer) system registers a vCPU owns,
/// with save and restore generated from one list so they cannot drift apart.
macro_rules! el1_state {
    ($($field:ident => $reg:literal),* $(,)?) => {
        /// EL1 system register state of a vCPU.
        #[derive(Clone, Default)]
        pub struct El1Regs { $(pub $field: u64,)* }

        impl El1Regs {
            /// Reads the live registers of this physical CPU.
            pub fn save(&mut self) {
                $(self.$field = read_sysreg!($reg);)*
            }

            /// Loads these values into this physical CPU.
            pub fn restore(&self) {
                $(write_sysreg!($reg, self.$field);)*
            }

            /// How many registers (a saved VM's layout, issue 17).
            pub const COUNT: usize = [$(stringify!($field)),*].len();

            /// The values in declaration order.
            pub fn to_words(&self) -> [u64; Self::COUNT] {
                [$(self.$field),*]
            }

            /// From values in declaration order.
            pub fn from_words(w: [u64; Self::COUNT]) -> Self {
                let [$($field),*] = w;
                Self { $($field),* }
            }
        }
    };
}

el1_state! {
    sctlr => "sctlr_el1",
    cpacr => "cpacr_el1",
    ttbr0 => "ttbr0_el1",
    ttbr1 => "ttbr1_el1",
    tcr => "tcr_el1",
    mair => "mair_el1",
    amair => "amair_el1",
    vbar => "vbar_el1",
    contextidr => "contextidr_el1",
    tpidr_el0 => "tpidr_el0",
    tpidrro_el0 => "tpidrro_el0",
    tpidr_el1 => "tpidr_el1",
    sp_el0 => "sp_el0",
    sp_el1 => "sp_el1",
    elr_el1 => "elr_el1",
    spsr_el1 => "spsr_el1",
    esr_el1 => "esr_el1",
    far_el1 => "far_el1",
    afsr0 => "afsr0_el1",
    afsr1 => "afsr1_el1",
    par => "par_el1",
    cntkctl => "cntkctl_el1",
    csselr => "csselr_el1",
    mdscr => "mdscr_el1",
    cntv_cval => "cntv_cval_el0",
    cntv_ctl => "cntv_ctl_el0",
}

/// SPSR value for a vCPU entering at EL1h with D, A, I, F masked.
pub const PSTATE_EL1H_MASKED: u64 = 0x3c5;
/// SCTLR_EL1 reset value: MMU and caches off, RES1 bits set.
pub const SCTLR_EL1_RESET: u64 = 0x30d0_0800;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Power {
    Off,
    On,
}

pub struct Vcpu {
    pub vm: Arc<Vm>,
    pub index: usize,
    pub regs: GuestRegs,
    pub fp: FpRegs,
    pub el1: El1Regs,
    pub power: Power,
    /// Asleep in the run queue after a WFI (`vm::sched`): runnable again at
    /// this physical counter value (its timer's deadline), or once an
    /// interrupt may be deliverable to it. `None`: runnable.
    pub wake_at: Option<u64>,
}

impl Vcpu {
    pub fn new(vm: Arc<Vm>, index: usize) -> Vcpu {
        let el1 = El1Regs {
            sctlr: SCTLR_EL1_RESET,
            ..El1Regs::default()
        };
        Vcpu {
            vm,
            index,
            regs: GuestRegs::default(),
            fp: FpRegs::default(),
            el1,
            power: Power::Off,
            wake_at: None,
        }
    }

    /// An identical vCPU belonging to `vm` (fork, snapshot, restore).
    pub fn clone_into(&self, vm: Arc<Vm>) -> Vcpu {
        Vcpu {
            vm,
            index: self.index,
            regs: self.regs.clone(),
            fp: self.fp.clone(),
            el1: self.el1.clone(),
            power: self.power,
            // A copy starts runnable: its first WFI decides again (a WFI
            // may end spuriously).
            wake_at: None,
        }
    }

    /// The MPIDR the guest sees: affinity 0 = vCPU index (up to 16 per cluster).
    pub fn mpidr(&self) -> u64 {
        (1 << 31) | ((self.index as u64 / 16) << 8) | (self.index as u64 % 16)
    }

    /// Resets to a PSCI entry: PC = `entry`, x0 = `context`, EL1h, MMU off.
    pub fn reset(&mut self, entry: u64, context: u64) {
        self.regs = GuestRegs::default();
        self.regs.pc = entry;
        self.regs.x[0] = context;
        self.regs.pstate = PSTATE_EL1H_MASKED;
        self.el1 = El1Regs {
            sctlr: SCTLR_EL1_RESET,
            ..El1Regs::default()
        };
        self.fp = FpRegs::default();
        self.power = Power::On;
    }

    /// Loads this vCPU's EL1, FP/SIMD and VM configuration onto this CPU.
    pub fn load(&mut self) {
        self.el1.restore();
        // SAFETY: `fp` is a valid, aligned FpRegs owned by this vCPU.
        unsafe { crate::arch::__fpsimd_restore(&self.fp) };
        write_sysreg!("vmpidr_el2", self.mpidr());
        write_sysreg!("vpidr_el2", read_sysreg!("midr_el1"));
        self.vm.load_stage2();
        self.vm.vtimer.load();
        self.vm.vgic.load(self.index);
    }

    /// Saves the live EL1 and FP/SIMD state of this CPU into the vCPU.
    pub fn put(&mut self) {
        self.el1.save();
        // SAFETY: `fp` is a valid, aligned FpRegs owned by this vCPU.
        unsafe { crate::arch::__fpsimd_save(&mut self.fp) };
        self.vm.vgic.put(self.index);
        crate::vdev::vtimer::put();
        self.vm.unload_stage2();
    }

    /// Runs the guest until its next exit.
    pub fn enter(&mut self) -> crate::arch::ExitKind {
        let regs: *mut GuestRegs = &mut self.regs;
        crate::arch::percpu::this_cpu().set_guest_regs(regs);
        // SAFETY: `regs` points at this vCPU's GuestRegs, which stays alive
        // and unaliased (we hold `&mut self`) for the whole guest run; the
        // per-CPU block points at it so the exit path saves into it.
        let code = unsafe { crate::arch::__guest_enter(regs) };
        crate::arch::ExitKind::from_code(code)
    }
}
