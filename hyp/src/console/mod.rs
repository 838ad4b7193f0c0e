//! `console`: the operator's side. Top layer: may use every other layer;
//! nothing imports it (the scheduler reaches it only through the hooks `main`
//! installs in `vm::sched`).
//!
//! Owns the line editor, focus and command dispatch (`cmd`; parsing itself is
//! the host-tested `hypcmd` crate), where answers go (`reply`: printed, or
//! gathered for the control channel), the control channel's requests and
//! events (`api`; the protocol is the host-tested `hypapi` crate), the
//! memory-manager commands (`memcmd`), the disk commands (`disk`), the
//! snapshot save and load commands (`snapcmd`, over `persist`), independent
//! VMs and trust groups (`vmcmd`), same-page merging (`merge`) and the
//! in-hypervisor benchmarks (`bench`).

pub mod api;
pub mod bench;
pub mod chaos;
pub mod cmd;
pub mod disk;
pub mod error;
pub mod membench;
pub mod memcmd;
pub mod merge;
pub mod mergebench;
pub mod mergelist;
pub mod pairs;
pub mod reply;
pub mod snapcmd;
pub mod stats;
pub mod vmcmd;

/// How the scheduler reaches the console (installed by `main`).
pub static HOOKS: crate::vm::sched::ConsoleHooks = crate::vm::sched::ConsoleHooks {
    poll_input: cmd::poll_input,
    poll: cmd::poll,
    command_waiting: cmd::command_waiting,
    typing: cmd::typing,
    script_done: cmd::script_done,
    exit_report: || crate::println!("[hyp] {}", stats::tlb_line()),
    vm_event: api::push_event,
};
