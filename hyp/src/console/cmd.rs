//! The hypervisor console: commands typed on the physical UART (the Ctrl-A
//! keys of `hypcmd::keys`, or `console <vm>`, move the keyboard between the
//! hypervisor and the VMs' consoles) or given as a boot script. A line is parsed once, by `hypcmd::parse` (total: a bad line
//! is an error message, never a panic); this file edits the typed line, runs
//! the typed `Command` and answers what only the machine knows (does the VM
//! exist). Nothing here can hurt a VM that was not named.

use crate::console::error::CmdError;
use crate::console::reply::Reply;
use crate::vm;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, Ordering};
use hypcmd::keys::{Key, Keys, KEYS_HELP};
use hypcmd::{Command, Focus, VmId};
use spin::Mutex;

/// A typed line longer than this is dropped whole: the heap is not the
/// operator's to fill, and no command is anywhere near this long.
const MAX_LINE: usize = 1024;

struct Console {
    line: String,
    /// The line being typed went past `MAX_LINE`; it is dropped at Enter.
    too_long: bool,
    /// None: input goes to the hypervisor console; Some(id): to that VM.
    focus: Option<u32>,
    /// The Ctrl-A prefix keys in progress.
    keys: Keys,
    script: VecDeque<String>,
}

static CONSOLE: Mutex<Console> = Mutex::new(Console {
    line: String::new(),
    too_long: false,
    focus: None,
    keys: Keys::new(),
    script: VecDeque::new(),
});
/// A script `sleep` holds the next command back until this counter value.
static SCRIPT_RESUME_AT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static SCRIPT_DONE: AtomicBool = AtomicBool::new(true);
/// When a byte was last read from the console (counter value).
static LAST_INPUT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// How long after a byte the console counts as being typed into.
const TYPING_MS: u64 = 50;

/// A byte was read from the console.
fn note_input() {
    LAST_INPUT.store(crate::arch::timer::now(), Ordering::Relaxed);
}

/// Whether a byte came in the last [`TYPING_MS`]: more may be on the way
/// (a pasted or sent line), faster than the UART's FIFO fills per slice.
pub fn typing() -> bool {
    let since = crate::arch::timer::now().wrapping_sub(LAST_INPUT.load(Ordering::Relaxed));
    since < crate::arch::timer::ms_to_ticks(TYPING_MS)
}

/// Queues `;`-separated commands to run once the initial VMs are up.
pub fn set_script(script: &str) {
    let mut c = CONSOLE.lock();
    // On the command line a ',' stands for a space (bootargs split on spaces).
    for cmd in script.split(';').map(|c| c.replace(',', " ")) {
        let cmd = cmd.trim();
        if !cmd.is_empty() {
            c.script.push_back(String::from(cmd));
        }
    }
    SCRIPT_DONE.store(c.script.is_empty(), Ordering::Release);
}

/// Sends typed input to VM `id` (an interactive guest started at boot).
pub fn set_focus(id: u32) {
    CONSOLE.lock().focus = Some(id);
}

pub fn script_done() -> bool {
    SCRIPT_DONE.load(Ordering::Acquire)
}

/// A command typed while CPU 0 had a vCPU loaded, waiting for `poll`.
static TYPED: Mutex<Option<String>> = Mutex::new(None);
/// CPU 0 should leave its guest and call `poll` (a typed or script command).
static WAITING: AtomicBool = AtomicBool::new(false);

/// Whether a command waits for CPU 0's scheduler loop (`poll`).
pub fn command_waiting() -> bool {
    WAITING.load(Ordering::Acquire)
}

/// Called by CPU 0 while it has a vCPU loaded: routes typed bytes, but a
/// complete command (or a script's next one) only waits for `poll` from the
/// scheduler loop, since it may have to quiesce that very vCPU's VM (fork).
pub fn poll_input() {
    if WAITING.load(Ordering::Acquire) {
        return;
    }
    if !CONSOLE.lock().script.is_empty() {
        WAITING.store(true, Ordering::Release);
        return;
    }
    while let Some(b) = crate::arch::uart::read_byte() {
        note_input();
        if let Some(cmd) = input(b) {
            *TYPED.lock() = Some(cmd);
            WAITING.store(true, Ordering::Release);
            return;
        }
    }
}

/// Called by CPU 0 between guest slices (no vCPU loaded): runs the next
/// script command and handles typed input. Commands run without the console
/// state lock held.
pub fn poll() {
    WAITING.store(false, Ordering::Release);
    crate::console::merge::background();
    let typed = TYPED.lock().take();
    if let Some(cmd) = typed {
        execute(&cmd);
        prompt();
    }
    let paused = crate::arch::timer::now() < SCRIPT_RESUME_AT.load(Ordering::Acquire);
    let next = if paused {
        None
    } else {
        CONSOLE.lock().script.pop_front()
    };
    if let Some(cmd) = next {
        crate::println!("hyp> {cmd}");
        execute(&cmd);
        if CONSOLE.lock().script.is_empty() {
            SCRIPT_DONE.store(true, Ordering::Release);
        }
    }
    while let Some(b) = crate::arch::uart::read_byte() {
        note_input();
        if let Some(cmd) = input(b) {
            execute(&cmd);
            prompt();
        }
    }
}

/// The hypervisor's prompt, if it has the keyboard (a `console <vm>` just
/// gave it away: the VM's console answers next).
fn prompt() {
    if CONSOLE.lock().focus.is_none() {
        crate::print!("hyp> ");
    }
}

/// One typed byte; returns a complete command line for the hypervisor.
fn input(b: u8) -> Option<String> {
    let mut c = CONSOLE.lock();
    let key = c.keys.feed(b);
    let b = focus_key(&mut c, key)?;
    if let Some(id) = c.focus {
        drop(c);
        if let Some(vm) = vm::get(id) {
            vm.uart.lock().push_rx(b);
            crate::vm::devices::update_irq(&vm);
        }
        return None;
    }
    match b {
        b'\r' | b'\n' => {
            crate::print!("\n");
            let line = core::mem::take(&mut c.line);
            if core::mem::take(&mut c.too_long) {
                crate::println!("error: line too long (over {MAX_LINE} characters), ignored");
                // An empty command: the caller prints the next prompt.
                return Some(String::new());
            }
            Some(line)
        }
        0x7f | 0x08 => {
            if c.line.pop().is_some() {
                crate::print!("\x08 \x08");
            }
            None
        }
        _ if c.too_long => None,
        b if (b.is_ascii_graphic() || b == b' ') && c.line.len() >= MAX_LINE => {
            c.too_long = true;
            c.line = String::new(); // frees the buffer now
            None
        }
        b if b.is_ascii_graphic() || b == b' ' => {
            c.line.push(b as char);
            crate::print!("{}", b as char);
            None
        }
        _ => None,
    }
}

/// Acts on a focus key; returns the byte if it is input for the focused
/// console.
fn focus_key(c: &mut Console, key: Key) -> Option<u8> {
    match key {
        Key::Input(b) => return Some(b),
        Key::Pending => {}
        Key::Cycle => {
            let to = next_focus(c.focus);
            switch(c, to);
        }
        Key::Hypervisor => switch(c, None),
        Key::Vm(id) => switch(c, Some(id)),
        Key::Unknown => {
            crate::print!("\n[console: {KEYS_HELP}]\n");
            if c.focus.is_none() {
                crate::print!("hyp> {}", c.line);
            }
        }
    }
    None
}

/// Gives the keyboard to `to` (None: the hypervisor), if that VM exists, and
/// says so on the console.
fn switch(c: &mut Console, to: Option<u32>) {
    match to {
        Some(id) if vm::get(id).is_none() => {
            crate::print!("\n[console: no vm {id}; the keyboard stays ");
            match c.focus {
                None => crate::print!("with the hypervisor]\nhyp> {}", c.line),
                Some(cur) => crate::print!("with vm {cur}]\n"),
            }
        }
        None => {
            c.focus = None;
            crate::print!("\n[console: hypervisor]\nhyp> {}", c.line);
        }
        Some(id) => {
            c.focus = Some(id);
            crate::print!("\n[console: vm {id}]\n");
        }
    }
}

/// `console <vm>|hyp`: run from `execute`, without the console lock.
fn console_cmd(to: Focus) -> Result<(), CmdError> {
    let to = match to {
        Focus::Hypervisor => None,
        Focus::Vm(id) => Some(vm(id)?.id),
    };
    let mut c = CONSOLE.lock();
    c.focus = to;
    match to {
        None => crate::println!("[console: hypervisor]"),
        Some(id) => crate::println!("[console: vm {id}]"),
    }
    Ok(())
}

/// Hypervisor, then each VM in id order, then back.
fn next_focus(cur: Option<u32>) -> Option<u32> {
    let ids: alloc::vec::Vec<u32> = vm::all().iter().map(|v| v.id).collect();
    match cur {
        None => ids.first().copied(),
        Some(id) => ids.iter().copied().find(|&i| i > id),
    }
}

/// The VM a command names, if it exists.
pub fn vm(id: VmId) -> Result<Arc<vm::Vm>, CmdError> {
    vm::get(id.0).ok_or(CmdError::NoVm(id))
}

/// Parses and runs one console line; errors are printed. Parsing is
/// `hypcmd::parse` (total); what remains here are the machine's answers.
pub fn execute(line: &str) {
    let result = match hypcmd::parse(line) {
        Ok(None) => return,
        Ok(Some(cmd)) => run(cmd, &mut Reply::console()),
        Err(e) => Err(CmdError::from(e)),
    };
    if let Err(e) = result {
        crate::println!("error: {e}");
    }
}

/// Runs one command, its answer going to `r` (the console, or the control
/// channel's answer).
pub fn run(cmd: Command, r: &mut Reply) -> Result<(), CmdError> {
    match cmd {
        Command::Help => crate::say!(r, "{}", hypcmd::HELP),
        Command::Vms => vms(r),
        Command::Stats => crate::console::stats::print(r),
        Command::Pause(id) => return ok_or(vm(id)?.pause(), id, "not running"),
        Command::Resume(id) => return ok_or(vm(id)?.resume(), id, "not paused"),
        Command::Destroy(id) => vm(id)?.stop(0),
        Command::Fork { vm, count } => return fork_cmd(vm, count, r),
        Command::Snapshot { vm: id, count } => {
            let v = vm(id)?;
            for _ in 0..count {
                let snap = crate::vm::fork::fork(&v, None, crate::vm::fork::ForkKind::Snapshot)?;
                crate::say!(r, "snapshot of vm {} is vm {}", v.id, snap.id);
                r.push("snapshots", snap.id);
            }
        }
        Command::Restore { vm: id, snapshot } => {
            let (v, snap) = (vm(id)?, vm(snapshot)?);
            crate::vm::fork::restore(&v, &snap, crate::vm::fork::Actor::Operator, None, 0)?;
            crate::say!(r, "vm {} restored to snapshot {}", v.id, snap.id);
        }
        Command::Rmap { pa } => return rmap_cmd(pa, r),
        Command::Console(to) => return console_cmd(to),
        Command::Create(c) => return crate::console::vmcmd::create(&c, r),
        Command::MergeGroup { vm: id, group } => {
            return crate::console::vmcmd::merge_group(vm(id)?, group, r)
        }
        Command::Merge => return crate::console::merge::pass(r),
        Command::MergeAuto { rate } => return crate::console::merge::auto(Some(rate), r),
        Command::MergeOff => return crate::console::merge::auto(None, r),
        Command::MergeList { count } => return crate::console::mergelist::list(count, r),
        Command::BenchFork { mib, forks } => return crate::console::bench::fork(mib, forks, r),
        Command::BenchMerge { pages } => return crate::console::mergebench::merge(pages, r),
        Command::Sleep { ms } => {
            let until =
                crate::arch::timer::now().saturating_add(crate::arch::timer::ms_to_ticks(ms));
            SCRIPT_RESUME_AT.store(until, Ordering::Release);
        }
        Command::Quit => {
            let status = vm::WORST_STATUS.load(Ordering::Relaxed);
            crate::println!("[hyp] quit: exiting with status {status}");
            crate::arch::semihost::exit(status.clamp(0, 255) as u32)
        }
        Command::Disk
        | Command::DiskSum { .. }
        | Command::DiskFill { .. }
        | Command::BenchDisk { .. } => return crate::console::disk::run(cmd, r),
        Command::Save { .. } | Command::Load { .. } | Command::Images | Command::Delete { .. } => {
            return crate::console::snapcmd::run(cmd, r)
        }
        // Migration, reclaim, chaos, wait and their benches.
        mem => return crate::console::memcmd::run(mem, r),
    }
    Ok(())
}

fn fork_cmd(id: VmId, count: u32, r: &mut Reply) -> Result<(), CmdError> {
    let parent = vm(id)?;
    for _ in 0..count {
        let start = crate::arch::timer::now();
        let child = crate::vm::fork::fork(&parent, None, crate::vm::fork::ForkKind::Running)?;
        let us = crate::arch::timer::ticks_to_us(crate::arch::timer::now().wrapping_sub(start));
        crate::say!(
            r,
            "vm {} forked: child vm {} in {us} us",
            parent.id,
            child.id
        );
        r.push("children", hypapi::Value::from(child.id));
        r.push("us", us);
    }
    Ok(())
}

/// Who maps the frame at `pa`: every VM and IPA, through which anon_vma chain.
fn rmap_cmd(pa: u64, r: &mut Reply) -> Result<(), CmdError> {
    let rmap = crate::mm::glue::rmap();
    let pfn = rmap::Pa::new(pa).pfn();
    if crate::mm::memory::zero_page().is_some_and(|z| z.pfn() == pfn) {
        // In no reverse map: its mappers are not recorded anywhere.
        crate::say!(
            r,
            "frame {pa:#x}: the shared zero page (read-only, not reverse-mapped)"
        );
        r.set("zero_page", true);
        return Ok(());
    }
    let frame = rmap.frames().get(pfn).ok_or(CmdError::NotRamFrame(pa))?;
    let (mapcount, anon, index) = (
        rmap.frames().mapcount(pfn),
        rmap.frame_anon_vma(frame),
        frame.index(),
    );
    let blocks = rmap.frames().entire_mapcount(pfn);
    crate::say!(
        r,
        "frame {pa:#x}: mapcount {mapcount} ({blocks} as a 2 MiB block), anon_vma {anon:?}, index {index:#x}"
    );
    r.set("mapcount", mapcount);
    if let Some(node) = rmap.stable_info(pfn) {
        // A merged frame: its mappers come from several fork families.
        crate::say!(
            r,
            "  merged: trust group {}, {} family items{}",
            node.group,
            node.items.len(),
            if node.dirty {
                " (counts being recounted)"
            } else {
                ""
            }
        );
        r.set("merged_group", node.group);
    }
    for m in rmap.mappers(pfn, &crate::mm::glue::HypVms) {
        crate::say!(
            r,
            "  vm {} ipa {:#x} {:?} via chain {:?}",
            m.vm.0,
            m.ipa,
            m.entry,
            m.chain
        );
        let mut mapper = hypapi::Map::new();
        mapper.insert("vm".into(), m.vm.0.into());
        mapper.insert("ipa".into(), m.ipa.raw().into());
        r.push("mappers", mapper);
    }
    Ok(())
}

fn ok_or(ok: bool, vm: VmId, not: &'static str) -> Result<(), CmdError> {
    if ok {
        Ok(())
    } else {
        Err(CmdError::WrongState { vm, not })
    }
}

fn vms(r: &mut Reply) {
    crate::say!(
        r,
        "  id  name        state     vcpus  active  pages  group  exits"
    );
    for v in vm::all() {
        // Read under the stage-2 lock first, print after: the console lock
        // and memory-manager locks are never nested.
        let pages = v.mem.memory.lock().resident_pages();
        let exits = v.exits.load(Ordering::Relaxed);
        crate::say!(
            r,
            "  {:<3} {:<11} {:<9} {:<6} {:<7} {:<6} {:<6} {}",
            v.id,
            v.name,
            v.state().name(),
            v.nr_vcpus,
            v.active_vcpus(),
            pages,
            v.group(),
            exits
        );
        let mut row = hypapi::Map::new();
        row.insert("id".into(), v.id.into());
        row.insert("name".into(), v.name.as_str().into());
        row.insert("state".into(), v.state().name().into());
        row.insert("vcpus".into(), v.nr_vcpus.into());
        row.insert("active".into(), v.active_vcpus().into());
        row.insert("pages".into(), pages.into());
        row.insert("group".into(), v.group().into());
        row.insert("exits".into(), exits.into());
        r.push("vms", row);
    }
}
