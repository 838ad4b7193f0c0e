//! Wiring of the control channel (issue 19): the transport (`dev::control`,
//! lines over a virtio-console) to the console's request handler
//! (`console::api`). Neither layer knows the other: `dev` sits below
//! `console`, and `console` leaves the transport to whoever installs its
//! hooks, so `main` joins them in the hooks it gives the scheduler.
//!
//! Like typed input: CPU 0 reads complete request lines at every tick, even
//! with a vCPU loaded (`poll_input`), and a waiting request makes the running
//! vCPU give CPU 0 back (`command_waiting`), so it is answered in `poll`, with
//! no vCPU loaded, as a typed command would run.

use crate::console;
use crate::dev::control::{self, LineError};
use crate::vm::sched::ConsoleHooks;
use alloc::collections::VecDeque;
use alloc::string::String;
use core::sync::atomic::{AtomicBool, Ordering};
use spin::Mutex;

/// The console's hooks, extended with the control channel.
pub static HOOKS: ConsoleHooks = ConsoleHooks {
    poll_input,
    poll,
    command_waiting,
    exit_report,
    ..console::HOOKS
};

/// Most request lines read ahead of their answers, so a flooding client
/// costs a bounded heap (64 KiB a line) and CPU 0 a bounded time per poll;
/// the rest wait in the device and the socket.
const MAX_READY: usize = 16;

/// Complete request lines (or framing errors) not yet answered, oldest
/// first. Lock level: a leaf (taken with nothing else held).
static READY: Mutex<VecDeque<Result<String, LineError>>> = Mutex::new(VecDeque::new());
/// `READY` is not empty: cheap to test on every guest exit, on any CPU.
static WAITING: AtomicBool = AtomicBool::new(false);

/// Reads complete lines into `READY` (up to `MAX_READY`) and writes the
/// queued events. Device I/O only, so fine with a vCPU loaded.
fn read_ahead() {
    let mut ready = READY.lock();
    while ready.len() < MAX_READY {
        match control::read_line() {
            Some(line) => ready.push_back(line),
            None => break,
        }
    }
    WAITING.store(!ready.is_empty(), Ordering::Release);
    drop(ready);
    for event in console::api::take_events() {
        control::write_line(&event);
    }
}

/// CPU 0 at every tick, possibly with a vCPU loaded.
fn poll_input() {
    (console::HOOKS.poll_input)();
    if control::present() {
        read_ahead();
    }
}

fn command_waiting() -> bool {
    (console::HOOKS.command_waiting)() || WAITING.load(Ordering::Acquire)
}

/// CPU 0, no vCPU loaded (where a typed command runs, which `api::handle`
/// requires): the console's own poll, then the waiting requests, answered
/// in order.
fn poll() {
    (console::HOOKS.poll)();
    if !control::present() {
        return;
    }
    read_ahead();
    let requests = core::mem::take(&mut *READY.lock());
    WAITING.store(false, Ordering::Release);
    for request in requests {
        let answer = match request {
            Ok(line) => console::api::handle(&line),
            Err(LineError::TooLong) => console::api::too_long(),
            Err(LineError::NotUtf8) => console::api::not_utf8(),
        };
        control::write_line(&answer);
    }
}

fn exit_report() {
    (console::HOOKS.exit_report)();
    if control::present() {
        crate::println!(
            "[hyp] control channel: {} output lines dropped, {} read errors",
            control::dropped(),
            control::read_errors()
        );
    }
}
