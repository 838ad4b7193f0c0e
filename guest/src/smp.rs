//! Secondary vCPUs: started with PSCI CPU_ON for each cpu in the DTB, each on
//! its own static stack, then released together to run one job.
//!
//! vCPU indices are 0 (boot) and 1.. in DTB order of the others; the index is
//! the CPU_ON context id and lives in TPIDR_EL1 (`cpu::vcpu_index`).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::dtb::Platform;
use crate::report::{reason, Reason};
use crate::sync::SetOnce;
use crate::{cpu, entry, mmu, psci};

pub const MAX_VCPUS: usize = 8;
pub const STACK_SIZE: usize = 64 << 10;
/// How long the secondaries get to come up after CPU_ON.
const BRING_UP_TIMEOUT_MS: u64 = 10_000;

/// Work for every vCPU: `job(index, vcpus)`.
pub type Job = fn(usize, usize);

#[repr(C, align(4096))]
pub struct Stacks(UnsafeCell<[[u8; STACK_SIZE]; MAX_VCPUS]>);

// SAFETY: each vCPU uses only its own stack, and only through SP.
unsafe impl Sync for Stacks {}

/// The stacks (`entry.rs` finds them as `__stacks_start` in guest.ld). Never
/// touched from Rust; the section is NOLOAD, so they are not in the binary.
#[unsafe(link_section = ".stacks")]
#[used]
static STACKS: Stacks = Stacks(UnsafeCell::new([[0; STACK_SIZE]; MAX_VCPUS]));

static JOB: SetOnce<Job> = SetOnce::new();
/// Secondaries that reached Rust.
static ONLINE: AtomicUsize = AtomicUsize::new(0);
/// 0 until the boot vCPU releases the secondaries; then the vCPU count.
static RELEASED: AtomicUsize = AtomicUsize::new(0);

/// Starts every other cpu in the DTB and waits until all are up. They wait
/// for [`release`] before running `job`. Returns the vCPU count (boot
/// included).
pub fn bring_up(plat: &Platform, job: Job) -> Result<usize, Reason> {
    JOB.set(job);
    // Secondaries read the MMU parameters with their MMU off.
    let params = mmu::MMU_PARAMS.get() as usize;
    cpu::clean_dcache(params..params + core::mem::size_of::<[u64; 4]>());

    let me = cpu::mpidr_affinity();
    let mut started = 1;
    for &mpidr in plat.cpus().iter().filter(|&&m| m != me) {
        if started == MAX_VCPUS {
            println!("GUEST: cpu {mpidr:#x} not started: at most {MAX_VCPUS} vCPUs");
            continue;
        }
        let entry = entry::secondary_entry as *const () as usize;
        psci::cpu_on(mpidr, entry, started as u64).map_err(|e| {
            reason!(
                "PSCI CPU_ON of cpu {mpidr:#x} failed: {e} ({})",
                psci::error_name(e)
            )
        })?;
        started += 1;
    }
    wait_online(started - 1)?;
    Ok(started)
}

fn wait_online(expected: usize) -> Result<(), Reason> {
    let deadline = cpu::Deadline::after_ms(BRING_UP_TIMEOUT_MS);
    while ONLINE.load(Ordering::Acquire) < expected {
        if deadline.passed() {
            let n = ONLINE.load(Ordering::Acquire);
            return Err(reason!("only {n} of {expected} secondary vCPUs came up"));
        }
        cpu::wait_for_event();
    }
    Ok(())
}

/// Lets the secondaries run their job, knowing there are `vcpus` in all.
pub fn release(vcpus: usize) {
    RELEASED.store(vcpus, Ordering::Release);
    cpu::send_event();
}

/// Rust entry of a secondary vCPU, MMU already on (`entry.rs`).
pub extern "C" fn secondary_main(index: usize) -> ! {
    cpu::init_after_mmu();
    ONLINE.fetch_add(1, Ordering::AcqRel);
    cpu::send_event();
    let vcpus = loop {
        match RELEASED.load(Ordering::Acquire) {
            0 => cpu::wait_for_event(),
            n => break n,
        }
    };
    // A latecomer (after the bring-up timeout) has no share of the work.
    if index < vcpus {
        if let Some(job) = JOB.get() {
            job(index, vcpus);
        }
    }
    psci::cpu_off()
}
