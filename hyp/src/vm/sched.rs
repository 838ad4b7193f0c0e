//! The scheduler: one global run queue of vCPUs shared by all physical CPUs,
//! round-robin with time slices from the EL2 timer. More vCPUs than CPUs is
//! the normal case once VMs fork. The run-queue lock is a scheduling lock: it
//! never encloses a memory-manager lock (nor the vGIC's: whether a sleeping
//! vCPU may run is read from atomics).
//!
//! A vCPU that gave up its CPU in a WFI sleeps in the queue (`Vcpu::wake_at`,
//! `vm::exit`'s WFx handler): it is passed over until its timer's deadline
//! or until an interrupt may be deliverable to it (the vGIC's dirty hint,
//! whose setting kicks the other CPUs). A CPU about to wait arms its EL2
//! timer for the earliest such deadline (`idle_wfi`), and one entering a
//! guest does too, so a sleeper's timer is not late by a whole slice.

use crate::arch::{wfi, ExitKind};
use crate::vm::exit::Action;
use crate::vm::vcpu::{Power, Vcpu};
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use platform::Board;
use spin::{Mutex, Once};

static RUNQ: Mutex<VecDeque<Box<Vcpu>>> = Mutex::new(VecDeque::new());
static BOARD: Once<Board> = Once::new();
/// Set once the boot CPU has created the initial VMs.
pub static STARTED: AtomicBool = AtomicBool::new(false);
/// Keep running with no VMs left (interactive use).
pub static STAY_WHEN_IDLE: AtomicBool = AtomicBool::new(false);

/// What the scheduler needs of the operator's console, which sits above it
/// (layers.txt): `main` installs these at boot so `vm` never imports
/// `console`. Before they are installed (or with none), there is no input.
pub struct ConsoleHooks {
    /// Reads pending keyboard input into the line editor (cheap; CPU 0, even
    /// between two time slices of a guest).
    pub poll_input: fn(),
    /// Runs a complete command line or script step, with no vCPU loaded.
    pub poll: fn(),
    /// Whether a command waits to run (the running vCPU then gives up CPU 0).
    pub command_waiting: fn() -> bool,
    /// Whether bytes are coming in (CPU 0 then reads the UART every
    /// [`TYPING_POLL_MS`] while it waits, not every slice: the console is
    /// polled, and its FIFO holds 16 bytes).
    pub typing: fn() -> bool,
    /// Whether the boot script has finished (the machine may then exit idle).
    pub script_done: fn() -> bool,
    /// The last line printed before the machine exits (TLB statistics).
    pub exit_report: fn(),
    /// A VM exited or faulted (the control channel pushes it as an event).
    /// Called on any CPU, possibly with a vCPU loaded: it only queues.
    pub vm_event: fn(VmEvent),
}

/// What happened to a VM, for the console's event stream.
#[derive(Clone, Copy, Debug)]
pub enum VmEvent {
    /// The VM is gone (torn down) with this exit status.
    Exited {
        /// VM id.
        vm: u32,
        /// Its exit status.
        status: i64,
    },
    /// A vCPU did something the hypervisor stopped the VM for.
    Faulted {
        /// VM id.
        vm: u32,
        /// vCPU index.
        vcpu: usize,
        /// Why.
        why: &'static str,
        /// The guest PC.
        pc: u64,
    },
}

/// Tells the console about `e`, if one is installed.
pub fn vm_event(e: VmEvent) {
    if let Some(c) = console() {
        (c.vm_event)(e);
    }
}

static CONSOLE: Once<&'static ConsoleHooks> = Once::new();

/// Work of a higher layer (the disk images' prefetch, the teardown of a
/// save's snapshot) that any CPU does in steps whenever it has no vCPU
/// loaded and the work is ready:
/// between two time slices, in place of an idle WFI, and when a vCPU waits
/// for an interrupt (its WFI gives the CPU back while the work is ready).
/// Installed by that layer (layers.txt: `vm` never imports it).
pub struct Background {
    /// Whether a step would do something now (work left, and no other CPU
    /// in a step). Cheap: asked at guest exits.
    pub ready: fn() -> bool,
    /// One bounded step (a no-op if another CPU is in one).
    pub step: fn(),
}

/// Most kinds of background work installed.
const MAX_BACKGROUND: usize = 4;
/// The background works installed, in slots taken in order (lock-free to
/// read: asked at every guest exit that would idle).
static BACKGROUND: [Once<&'static Background>; MAX_BACKGROUND] =
    [const { Once::new() }; MAX_BACKGROUND];
static BACKGROUND_SLOTS: AtomicUsize = AtomicUsize::new(0);

/// The background works installed so far.
fn background() -> impl Iterator<Item = &'static Background> {
    BACKGROUND.iter().filter_map(|w| w.get().copied())
}

/// Installs `work` (once: installing it again only wakes the CPUs) and wakes
/// idle CPUs to do it. Each layer installs a `static`, so there are at most
/// [`MAX_BACKGROUND`]; one more is ignored (a debug build stops).
pub fn set_background(work: &'static Background) {
    if !background().any(|w| core::ptr::eq(w, work)) {
        let slot = BACKGROUND_SLOTS.fetch_add(1, Ordering::AcqRel);
        debug_assert!(
            slot < MAX_BACKGROUND,
            "more than {MAX_BACKGROUND} background works"
        );
        if let Some(s) = BACKGROUND.get(slot) {
            s.call_once(|| work);
        }
    }
    kick_all();
}

/// Whether background work waits for a CPU.
pub fn background_ready() -> bool {
    background().any(|b| (b.ready)())
}

pub fn init(board: &Board, console: &'static ConsoleHooks) {
    BOARD.call_once(|| board.clone());
    CONSOLE.call_once(|| console);
}

fn console() -> Option<&'static ConsoleHooks> {
    CONSOLE.get().copied()
}

pub fn enqueue(vcpu: Box<Vcpu>) {
    RUNQ.lock().push_back(vcpu);
    kick_all();
}

/// Takes `vm`'s queued vCPUs off the run queue and lets the VM park them
/// (it is pausing or stopping).
pub fn park_queued(vm: &crate::vm::Vm) {
    let mine: VecDeque<Box<Vcpu>> = {
        let mut q = RUNQ.lock();
        let (mine, rest) = core::mem::take(&mut *q)
            .into_iter()
            .partition(|v| core::ptr::eq(&*v.vm, vm));
        *q = rest;
        mine
    };
    for v in mine {
        if let Some(v) = vm.settle(v) {
            RUNQ.lock().push_back(v);
        }
    }
}

/// Whether queued `v` may run at counter value `now`: it is not asleep, or
/// its timer's deadline has come, or an interrupt may be deliverable to it,
/// or its VM left `Running` (`Vm::settle` then parks or drops it).
fn ready(v: &Vcpu, now: u64) -> bool {
    v.wake_at.is_none_or(|t| {
        t <= now || v.vm.vgic.needs_flush(v.index) || v.vm.state() != crate::vm::VmState::Running
    })
}

/// The first queued vCPU ready to run, awake.
fn dequeue() -> Option<Box<Vcpu>> {
    let now = crate::arch::timer::now();
    let mut v = {
        let mut q = RUNQ.lock();
        let i = q.iter().position(|v| ready(v, now))?;
        q.remove(i)?
    };
    if v.wake_at.take().is_some() {
        v.vm.vgic.wake(v.index);
    }
    Some(v)
}

/// Whether no queued vCPU is ready to run (sleeping ones may be queued).
pub fn queue_empty() -> bool {
    let now = crate::arch::timer::now();
    !RUNQ.lock().iter().any(|v| ready(v, now))
}

/// Brings this CPU's EL2 timer forward to the earliest deadline of a vCPU
/// sleeping in the queue, so that CPU looks again when it is due.
fn arm_for_sleepers() {
    let next = RUNQ.lock().iter().filter_map(|v| v.wake_at).min();
    if let Some(t) = next {
        crate::arch::timer::fire_by(t);
    }
}

/// How often CPU 0 reads console input that is coming in while it waits.
const TYPING_POLL_MS: u64 = 1;

/// Waits for an interrupt with nothing to run: until a kick, the slice's
/// end, the first sleeping vCPU's deadline, or on CPU 0 while console
/// input is coming in, the next look at the UART.
pub fn idle_wfi() {
    arm_for_sleepers();
    if crate::arch::percpu::cpu_index() == 0 && console().is_some_and(|c| (c.typing)()) {
        let t = crate::arch::timer::now() + crate::arch::timer::ms_to_ticks(TYPING_POLL_MS);
        crate::arch::timer::fire_by(t);
    }
    wfi();
}

/// Makes every other online CPU leave its guest (or its WFI) and look again.
pub fn kick_all() {
    if BOARD.get().is_some() {
        crate::arch::gic::kick_others();
    }
}

/// Host interrupts seen while handling: whether this CPU's slice ended.
/// `vcpu` is the vCPU loaded on this CPU, which gets its timer's interrupt.
pub fn handle_host_irqs(vcpu: Option<&Vcpu>) -> bool {
    let mut slice_over = false;
    while let Some(intid) = crate::arch::gic::ack() {
        if BOARD.get().is_some_and(|b| intid == b.hyp_timer_intid) {
            crate::arch::timer::arm_slice();
            slice_over = true;
        }
        if !crate::vdev::vgic::host_irq(vcpu.map(|v| (&v.vm.vgic, v.index)), intid) {
            crate::arch::gic::eoi(intid);
        }
    }
    // Console input is polled by CPU 0 even while it runs a guest; commands
    // wait until it is back in `cpu_loop` (see `run`).
    if slice_over && vcpu.is_some() && crate::arch::percpu::cpu_index() == 0 {
        if let Some(c) = console() {
            (c.poll_input)();
        }
    }
    slice_over
}

/// Each physical CPU's life after boot.
pub fn cpu_loop() -> ! {
    crate::arch::timer::arm_slice();
    loop {
        handle_host_irqs(None);
        if crate::arch::percpu::cpu_index() == 0 {
            if let Some(c) = console() {
                (c.poll)();
            }
            exit_if_idle();
        }
        for b in background() {
            if (b.ready)() {
                (b.step)();
            }
        }
        // No vCPU is loaded here: no VM's stage 2 may stay this CPU's
        // context (a torn-down VM's root would; see Vm::unload_stage2).
        debug_assert_eq!(
            crate::arch::read_sysreg!("vttbr_el2"),
            0,
            "a VM's VTTBR is still loaded with no vCPU on this CPU"
        );
        match dequeue() {
            Some(vcpu) => run(vcpu),
            // Nothing to run: more background work, or wait.
            None if background_ready() => {}
            None => idle_wfi(),
        }
    }
}

/// With every VM gone, the machine ends with the worst VM exit status.
fn exit_if_idle() {
    if !STARTED.load(Ordering::Acquire) || STAY_WHEN_IDLE.load(Ordering::Relaxed) {
        return;
    }
    if crate::vm::count_runnable() == 0 && console().is_none_or(|c| (c.script_done)()) {
        let status = crate::vm::WORST_STATUS.load(Ordering::Relaxed);
        if let Some(c) = console() {
            (c.exit_report)();
        }
        crate::println!("[hyp] no runnable VMs left; exiting with status {status}");
        crate::arch::semihost::exit(status.clamp(0, 255) as u32);
    }
}

/// Runs one vCPU for up to a time slice, then hands it back.
fn run(vcpu: Box<Vcpu>) {
    let vm = vcpu.vm.clone();
    let Some(mut vcpu) = vm.settle(vcpu) else {
        return;
    };
    vcpu.load();
    arm_for_sleepers();
    loop {
        if vm.state() != crate::vm::VmState::Running || vcpu.power != Power::On {
            break;
        }
        crate::vm::devices::flush(&vcpu);
        vm.note_entry();
        let kind = vcpu.enter();
        vm.vgic.sync(vcpu.index);
        vm.exits.fetch_add(1, Ordering::Relaxed);
        crate::arch::percpu::this_cpu()
            .exits
            .fetch_add(1, Ordering::Relaxed);
        let action = match kind {
            ExitKind::Irq | ExitKind::Fiq => match handle_host_irqs(Some(&vcpu)) {
                // A slice ended: let a ready vCPU or background work in.
                true if !queue_empty() || background_ready() => Action::Yield,
                // The timer now marks the next slice's end: the next
                // sleeper's deadline may come sooner.
                true => {
                    arm_for_sleepers();
                    Action::Continue
                }
                false => Action::Continue,
            },
            _ => crate::vm::exit::handle(&mut vcpu, kind),
        };
        match action {
            Action::Continue if !console().is_some_and(|c| (c.command_waiting)()) => {}
            // A console command runs with no vCPU loaded (it may quiesce this VM).
            _ => break,
        }
    }
    vcpu.put();
    if let Some(v) = vm.settle(vcpu) {
        RUNQ.lock().push_back(v);
    }
}
