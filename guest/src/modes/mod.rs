//! Test modes, selected by a bootarg token. To add one: a module here, a
//! variant in [`Mode`] with its token in [`Mode::from_name`]/[`Mode::name`],
//! and its arm in [`run`]. A mode returns Ok for PASS or the reason to FAIL;
//! it may use `smp::bring_up` to run work on every vCPU.

mod fork;
mod hvcfuzz;
mod idle;
mod memstress;
mod mergecheck;
mod pressure;
mod selftest;
mod snapsteal;
mod snapvcpu;
mod wild;

use crate::args::Args;
use crate::dtb::Platform;
use crate::report::Reason;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// All vCPUs fill and verify RAM while holding FP/SIMD state.
    Selftest,
    /// A read outside RAM and devices must come back as an abort.
    Wild,
    /// A tree of forks checking copy-on-write sharing and isolation.
    ForkTree,
    /// Fork/exit cycles checking resources return to their baseline.
    ForkLoop,
    /// Snapshot then repeated dirty/restore.
    Snapshot,
    /// Times a CoW write fault next to a private write, a copy and a trap.
    CowBench,
    /// Host memory per idle fork.
    ForkMem,
    /// MEM_RELEASE gives pages back.
    Release,
    /// Garbage hypercalls get error codes.
    BadCalls,
    /// All vCPUs keep verifying checksummed memory while the hypervisor
    /// migrates, reclaims and forks under them.
    MemStress,
    /// The UART register image survives snapshot/restore cycles.
    UartImage,
    /// Snapshots until the hypervisor refuses with an error code.
    SnapFlood,
    /// Random hypercalls racing on every vCPU and VM, next to a checker VM.
    HvcFuzz,
    /// A child tries to restore itself into its parent's snapshots.
    SnapSteal,
    /// RESTORE from a vCPU that did not take the snapshot.
    SnapVcpu,
    /// Waits for (timer) interrupts forever with a heartbeat: cheap VMs.
    Idle,
    /// Keeps checking pages identical across VMs (mergeable) while the
    /// hypervisor merges, migrates, evacuates and reclaims them.
    MergeCheck,
}

impl Mode {
    pub fn from_name(token: &str) -> Option<Self> {
        match token {
            "selftest" => Some(Self::Selftest),
            "wild" => Some(Self::Wild),
            "forktree" => Some(Self::ForkTree),
            "forkloop" => Some(Self::ForkLoop),
            "snapshot" => Some(Self::Snapshot),
            "cowbench" => Some(Self::CowBench),
            "forkmem" => Some(Self::ForkMem),
            "release" => Some(Self::Release),
            "badcalls" => Some(Self::BadCalls),
            "memstress" => Some(Self::MemStress),
            "uartimage" => Some(Self::UartImage),
            "snapflood" => Some(Self::SnapFlood),
            "hvcfuzz" => Some(Self::HvcFuzz),
            "snapsteal" => Some(Self::SnapSteal),
            "snapvcpu" => Some(Self::SnapVcpu),
            "idle" => Some(Self::Idle),
            "mergecheck" => Some(Self::MergeCheck),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Selftest => "selftest",
            Self::Wild => "wild",
            Self::ForkTree => "forktree",
            Self::ForkLoop => "forkloop",
            Self::Snapshot => "snapshot",
            Self::CowBench => "cowbench",
            Self::ForkMem => "forkmem",
            Self::Release => "release",
            Self::BadCalls => "badcalls",
            Self::MemStress => "memstress",
            Self::UartImage => "uartimage",
            Self::SnapFlood => "snapflood",
            Self::HvcFuzz => "hvcfuzz",
            Self::SnapSteal => "snapsteal",
            Self::SnapVcpu => "snapvcpu",
            Self::Idle => "idle",
            Self::MergeCheck => "mergecheck",
        }
    }
}

pub fn run(plat: &'static Platform, args: &Args) -> Result<(), Reason> {
    match args.mode {
        Mode::Selftest => selftest::run(plat, args),
        Mode::Wild => wild::run(plat, args),
        Mode::ForkTree => fork::tree(plat),
        Mode::ForkLoop => fork::fork_loop(plat),
        Mode::Snapshot => fork::snapshot(plat),
        Mode::CowBench => fork::cow_bench(plat),
        Mode::ForkMem => fork::fork_mem(plat),
        Mode::Release => fork::release(plat),
        Mode::BadCalls => fork::bad_calls(plat),
        Mode::MemStress => memstress::run(plat, args),
        Mode::UartImage => pressure::uart_image(plat),
        Mode::SnapFlood => pressure::snap_flood(plat),
        Mode::HvcFuzz => hvcfuzz::run(plat),
        Mode::SnapSteal => snapsteal::run(plat),
        Mode::SnapVcpu => snapvcpu::run(plat),
        Mode::Idle => idle::run(plat),
        Mode::MergeCheck => mergecheck::run(plat, args),
    }
}
