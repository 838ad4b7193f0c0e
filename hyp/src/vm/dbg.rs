//! TEMPORARY instrumentation of CPU 0's scheduler loop (to be removed).
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};
pub static TICKS: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];
pub static POLLS: AtomicU64 = AtomicU64::new(0);
pub static RUNS0: AtomicU64 = AtomicU64::new(0);
pub static EXITS0: AtomicU64 = AtomicU64::new(0);
pub static RUN_T0: AtomicU64 = AtomicU64::new(0);
pub static POLL_T0: AtomicU64 = AtomicU64::new(0);
pub static STEPS: AtomicU64 = AtomicU64::new(0);
pub static STEP_T: AtomicU64 = AtomicU64::new(0);
pub static FETCHED: AtomicU64 = AtomicU64::new(0);
pub static MAXRUN: AtomicU64 = AtomicU64::new(0);
pub static WFX0: AtomicU64 = AtomicU64::new(0);
pub static IDLEWFI0: AtomicU64 = AtomicU64::new(0);
pub static BREAK_CW: AtomicU64 = AtomicU64::new(0);
static NEXT: AtomicU64 = AtomicU64::new(0);

pub fn maybe_print() {
    let now = crate::arch::timer::now();
    let next = NEXT.load(Relaxed);
    if now < next {
        return;
    }
    if NEXT
        .compare_exchange(next, now + crate::arch::timer::ms_to_ticks(2000), Relaxed, Relaxed)
        .is_err()
    {
        return;
    }
    let us = |t: &AtomicU64| crate::arch::timer::ticks_to_us(t.load(Relaxed)) / 1000;
    crate::println!(
        "[dbg] cpu{} t={}ms ticks0={} ticks1={} polls={} runs0={} exits0={} wfx0={} idlewfi0={} brk={} run0ms={} maxrun0us={} poll0ms={} steps={} stepms={} fetched={}",
        crate::arch::percpu::cpu_index(),
        crate::arch::timer::ticks_to_us(now) / 1000,
        TICKS[0].load(Relaxed),
        TICKS[1].load(Relaxed),
        POLLS.load(Relaxed),
        RUNS0.load(Relaxed),
        EXITS0.load(Relaxed),
        WFX0.load(Relaxed),
        IDLEWFI0.load(Relaxed),
        BREAK_CW.load(Relaxed),
        us(&RUN_T0),
        crate::arch::timer::ticks_to_us(MAXRUN.load(Relaxed)),
        us(&POLL_T0),
        STEPS.load(Relaxed),
        us(&STEP_T),
        FETCHED.load(Relaxed),
    );
}
