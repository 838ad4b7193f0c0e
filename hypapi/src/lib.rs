//! The hypervisor's control protocol (`docs/API.md`): one JSON object per
//! line in each direction over the control channel (a virtio-console port
//! the hypervisor owns; `cargo xtask run --api PATH` exposes it as a unix
//! socket).
//!
//! - A request names a command and its arguments as fields:
//!   `{"id":7,"cmd":"fork","vm":1,"count":4}` ([`parse_request`]).
//! - Its answer carries the same `id`, and either `"ok":true` with the
//!   command's structured result, or `"ok":false` with an error `code` and
//!   `message` ([`answer_ok`], [`answer_err`]).
//! - Events (a VM exited, a VM faulted) are pushed as they happen, with an
//!   `event` field and no `id` ([`event`]).
//!
//! The JSON syntax is a second front end to the console's: a request's
//! fields are laid out as the command's positional words by one table
//! ([`request`]'s `SIGNATURES`) and parsed by `hypcmd::parse`, so every range
//! check and error message is the console's, and a command has one typed
//! value ([`hypcmd::Command`]) whichever syntax it came in.
//!
//! What it may use: `core`, `alloc`, `hypcmd` and `serde_json`. It knows
//! nothing of the hypervisor: the hypervisor executes the [`Request`] and
//! fills the answer; `mhvctl` builds requests with [`request_line`].
#![deny(
    missing_docs,
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks
)]
#![no_std]

extern crate alloc;

mod answer;
mod request;

pub use answer::{answer_err, answer_ok, event, ErrorCode};
pub use request::{parse_request, request_line, Request, RequestError, MAX_ID_LEN};
pub use serde_json::{Map, Value};

/// The protocol's version: a request may carry `"v":1`; answers and events
/// always do. A change that breaks a client bumps it (see `docs/API.md`).
pub const VERSION: u64 = 1;

/// The longest request line the hypervisor reads, in bytes (the transport
/// drops longer ones and answers [`ErrorCode::TooLong`]).
pub const MAX_LINE: usize = 64 * 1024;
