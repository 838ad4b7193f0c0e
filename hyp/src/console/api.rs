//! The control channel's side of the console: one JSON request line in,
//! one answer line out (`hypapi` is the protocol, `docs/API.md` its
//! description), and the events pushed between answers.
//!
//! A request runs through the same [`cmd::run`] as a typed command, with a
//! [`Reply`] that gathers its lines and fields instead of printing them, and
//! under the same conditions: on CPU 0 with no vCPU loaded (`cmd::poll`), so a
//! `fork` can quiesce any VM.

use crate::console::cmd;
use crate::console::error::CmdError;
use crate::console::reply::Reply;
use crate::vm::fork::ForkError;
use crate::vm::sched::VmEvent;
use crate::vm::VmError;
use alloc::collections::VecDeque;
use alloc::string::String;
use hypapi::{answer_err, answer_ok, ErrorCode, Map, Value};
use spin::Mutex;

/// Events not yet written to the channel. Bounded: with no client reading,
/// the oldest are dropped (and counted) rather than filling the heap. Lock
/// level: a leaf (nothing is taken while it is held).
static EVENTS: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());
/// The most events kept for a slow client.
const MAX_EVENTS: usize = 1024;
/// Events dropped because the queue was full.
pub static EVENTS_DROPPED: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Answers one request line (without its newline). Call only where a typed
/// command may run: CPU 0, no vCPU loaded.
pub fn handle(line: &str) -> String {
    let req = match hypapi::parse_request(line) {
        Ok(req) => req,
        Err(e) => return answer_err(&e.id, e.code, &e.message),
    };
    let mut reply = Reply::api();
    match cmd::run(req.cmd, &mut reply) {
        Ok(()) => answer_ok(&req.id, reply.into_fields()),
        Err(e) => answer_err(&req.id, code(&e), &alloc::format!("{e}")),
    }
}

/// The answer to a line the transport dropped for being longer than
/// [`hypapi::MAX_LINE`].
pub fn too_long() -> String {
    let msg = alloc::format!("request longer than {} bytes, dropped", hypapi::MAX_LINE);
    answer_err(&Value::Null, ErrorCode::TooLong, &msg)
}

/// The answer to a line that is not UTF-8.
pub fn not_utf8() -> String {
    answer_err(&Value::Null, ErrorCode::BadJson, "request is not UTF-8")
}

/// Takes the events to write now, oldest first.
pub fn take_events() -> VecDeque<String> {
    core::mem::take(&mut *EVENTS.lock())
}

/// Queues an event line (from the scheduler's hook: any CPU).
pub fn push_event(e: VmEvent) {
    let mut fields = Map::new();
    let name = match e {
        VmEvent::Exited { vm, status } => {
            fields.insert("vm".into(), vm.into());
            fields.insert("status".into(), status.into());
            "vm_exited"
        }
        VmEvent::Faulted { vm, vcpu, why, pc } => {
            fields.insert("vm".into(), vm.into());
            fields.insert("vcpu".into(), vcpu.into());
            fields.insert("why".into(), why.into());
            fields.insert("pc".into(), pc.into());
            "vm_faulted"
        }
    };
    let line = hypapi::event(name, fields);
    let mut q = EVENTS.lock();
    if q.len() >= MAX_EVENTS {
        q.pop_front();
        EVENTS_DROPPED.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    }
    q.push_back(line);
}

/// The stable code of a command's failure.
fn code(e: &CmdError) -> ErrorCode {
    match e {
        CmdError::Parse(_) => ErrorCode::BadArgument,
        CmdError::NoVm(_) => ErrorCode::NoVm,
        CmdError::WrongState { .. } => ErrorCode::WrongState,
        CmdError::Vm(VmError::NoMemory | VmError::TooBig { .. }) => ErrorCode::NoMemory,
        CmdError::Fork(ForkError::Busy) => ErrorCode::Busy,
        CmdError::Fork(ForkError::NotRunnable(_) | ForkError::NotOwner) => ErrorCode::WrongState,
        CmdError::Fork(ForkError::Vm(VmError::NoMemory)) => ErrorCode::NoMemory,
        CmdError::Fork(ForkError::Memory(rmap::Error::TooManyMappings)) => ErrorCode::Failed,
        CmdError::Fork(ForkError::Memory(_)) => ErrorCode::NoMemory,
        CmdError::NotRamFrame(_) | CmdError::NotRam { .. } | CmdError::OutsideVmRam { .. } => {
            ErrorCode::BadArgument
        }
        CmdError::Disk(crate::dev::blk::DiskError::PastEnd { .. }) => ErrorCode::BadArgument,
        CmdError::Persist(crate::persist::PersistError::InUse { .. })
        | CmdError::DiskInUse { .. } => ErrorCode::Busy,
        _ => ErrorCode::Failed,
    }
}
