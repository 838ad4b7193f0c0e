//! What the operator types, as typed values: the hypervisor console's
//! commands ([`Command`], parsed by [`parse`]), the console focus keys
//! ([`keys`]) and the hypervisor's own boot command line ([`bootargs`]).
//!
//! This crate owns the syntax and nothing else. Its parsers are total: any
//! string, however long, malformed or non-ASCII, gives a value or a typed
//! error ([`ParseError`], whose `Display` is the message the console prints),
//! never a panic. Every number a command carries is already checked against
//! its allowed range, and every address range is already page-aligned with
//! checked arithmetic, so the hypervisor only executes.
//!
//! What it may use: `core` and `alloc` only. It knows nothing of the
//! hypervisor (`hyp/`): whether a VM exists, whether a range is RAM or inside
//! a VM's memory are questions about the running machine, answered where the
//! command runs (`hyp/src/console/cmd.rs`, `hyp/src/console/memcmd.rs`). Keeping parsing apart
//! from execution lets a second syntax (a JSON control channel) produce the
//! same [`Command`]s later.
#![deny(
    missing_docs,
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks
)]
#![no_std]

extern crate alloc;

pub mod bootargs;
mod command;
mod display;
pub mod keys;
pub mod lines;
mod parse;
mod parse_error;

pub use command::{
    Command, Create, Focus, Guest, PageRange, SnapName, VmId, Words, HELP, MAX_GROUP,
    MAX_MERGE_LIST, MAX_MERGE_RATE,
};
pub use parse::{parse, ParseError};

/// The granule of every address range a command names.
pub const PAGE_SIZE: u64 = 4096;
