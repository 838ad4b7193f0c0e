//! Answers and events, as JSON lines.

use crate::VERSION;
use alloc::string::String;
use serde_json::{Map, Value};

/// Why a request failed, as a stable machine-readable code (`docs/API.md`
/// lists them); the message beside it is for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The line is not JSON.
    BadJson,
    /// JSON, but not a request object (no usable `id`, no `cmd`...).
    BadRequest,
    /// A `v` other than [`VERSION`].
    Version,
    /// `cmd` names no command the channel takes.
    UnknownCommand,
    /// A field is missing, unexpected, of the wrong type or out of range.
    BadArgument,
    /// The line was longer than [`crate::MAX_LINE`] and was dropped.
    TooLong,
    /// No VM with that id.
    NoVm,
    /// The VM is not in a state the command applies to.
    WrongState,
    /// The VM or the memory manager is busy; try again.
    Busy,
    /// Out of memory or memory-manager resources.
    NoMemory,
    /// The command ran and failed for another reason (see the message).
    Failed,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Version => "version",
            ErrorCode::UnknownCommand => "unknown_command",
            ErrorCode::BadArgument => "bad_argument",
            ErrorCode::TooLong => "too_long",
            ErrorCode::NoVm => "no_vm",
            ErrorCode::WrongState => "wrong_state",
            ErrorCode::Busy => "busy",
            ErrorCode::NoMemory => "no_memory",
            ErrorCode::Failed => "failed",
        }
    }
}

fn line(object: Map<String, Value>) -> String {
    // A `Value` with string keys always serialises; the fallback is never used.
    serde_json::to_string(&Value::Object(object)).unwrap_or_else(|_| String::from("{}"))
}

fn header(id: &Value) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("v".into(), VERSION.into());
    m.insert("id".into(), id.clone());
    m
}

/// The answer to request `id` that succeeded with `result`.
pub fn answer_ok(id: &Value, result: Map<String, Value>) -> String {
    let mut m = header(id);
    m.insert("ok".into(), true.into());
    m.insert("result".into(), Value::Object(result));
    line(m)
}

/// The answer to request `id` (`null` when the request had no usable id)
/// that failed.
pub fn answer_err(id: &Value, code: ErrorCode, message: &str) -> String {
    let mut m = header(id);
    m.insert("ok".into(), false.into());
    let mut e = Map::new();
    e.insert("code".into(), code.as_str().into());
    e.insert("message".into(), message.into());
    m.insert("error".into(), Value::Object(e));
    line(m)
}

/// An event pushed without a request: `{"v":1,"event":name,...fields}`.
pub fn event(name: &str, fields: Map<String, Value>) -> String {
    let mut m = Map::new();
    m.insert("v".into(), VERSION.into());
    m.insert("event".into(), name.into());
    for (k, v) in fields {
        m.entry(k).or_insert(v);
    }
    line(m)
}
