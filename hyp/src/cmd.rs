//! The hypervisor console: commands typed on the physical UART (Ctrl-A
//! switches input between the hypervisor and the VMs' consoles) or given as a
//! boot script. Bad commands get a clear error; nothing here can hurt a VM
//! that was not named.

use crate::vm;
use alloc::collections::VecDeque;
use alloc::string::String;
use core::sync::atomic::{AtomicBool, Ordering};
use spin::Mutex;

const CTRL_A: u8 = 0x01;

struct Console {
    line: String,
    /// None: input goes to the hypervisor console; Some(id): to that VM.
    focus: Option<u32>,
    script: VecDeque<String>,
}

static CONSOLE: Mutex<Console> = Mutex::new(Console { line: String::new(), focus: None, script: VecDeque::new() });
static SCRIPT_DONE: AtomicBool = AtomicBool::new(true);

/// Queues `;`-separated commands to run once the initial VMs are up.
pub fn set_script(script: &str) {
    let mut c = CONSOLE.lock();
    for cmd in script.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        c.script.push_back(String::from(cmd));
    }
    SCRIPT_DONE.store(c.script.is_empty(), Ordering::Release);
}

pub fn script_done() -> bool {
    SCRIPT_DONE.load(Ordering::Acquire)
}

/// Called by CPU 0 between guest slices: runs the next script command and
/// handles typed input. Commands run without the console state lock held.
pub fn poll() {
    let next = CONSOLE.lock().script.pop_front();
    if let Some(cmd) = next {
        crate::println!("hyp> {cmd}");
        execute(&cmd);
        if CONSOLE.lock().script.is_empty() {
            SCRIPT_DONE.store(true, Ordering::Release);
        }
    }
    while let Some(b) = crate::console::read_byte() {
        if let Some(cmd) = input(b) {
            execute(&cmd);
            crate::print!("hyp> ");
        }
    }
}

/// One typed byte; returns a complete command line for the hypervisor.
fn input(b: u8) -> Option<String> {
    let mut c = CONSOLE.lock();
    if b == CTRL_A {
        c.focus = next_focus(c.focus);
        match c.focus {
            None => crate::print!("\n[console: hypervisor]\nhyp> "),
            Some(id) => crate::print!("\n[console: vm {id}]\n"),
        }
        return None;
    }
    if let Some(id) = c.focus {
        drop(c);
        if let Some(vm) = vm::get(id) {
            vm.uart.lock().push_rx(b);
        }
        return None;
    }
    match b {
        b'\r' | b'\n' => {
            crate::print!("\n");
            Some(core::mem::take(&mut c.line))
        }
        0x7f | 0x08 => {
            if c.line.pop().is_some() {
                crate::print!("\x08 \x08");
            }
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

/// Hypervisor, then each VM in id order, then back.
fn next_focus(cur: Option<u32>) -> Option<u32> {
    let ids: alloc::vec::Vec<u32> = vm::all().iter().map(|v| v.id).collect();
    match cur {
        None => ids.first().copied(),
        Some(id) => ids.iter().copied().find(|&i| i > id),
    }
}

fn parse_vm(arg: Option<&str>) -> Result<alloc::sync::Arc<vm::Vm>, String> {
    let arg = arg.ok_or_else(|| String::from("missing VM id"))?;
    let id: u32 = arg.parse().map_err(|_| alloc::format!("'{arg}' is not a VM id"))?;
    vm::get(id).ok_or_else(|| alloc::format!("no VM {id} (see `vms`)"))
}

pub fn execute(line: &str) {
    let mut words = line.split_whitespace();
    let Some(cmd) = words.next() else { return };
    let result = match cmd {
        "help" => {
            help();
            Ok(())
        }
        "vms" => {
            vms();
            Ok(())
        }
        "stats" => {
            stats();
            Ok(())
        }
        "pause" => parse_vm(words.next()).and_then(|v| ok_or(v.pause(), "not running")),
        "resume" => parse_vm(words.next()).and_then(|v| ok_or(v.resume(), "not paused")),
        "destroy" => parse_vm(words.next()).map(|v| v.stop(0)),
        "quit" => {
            let status = vm::WORST_STATUS.load(Ordering::Relaxed);
            crate::println!("[hyp] quit: exiting with status {status}");
            crate::semihost::exit(status.clamp(0, 255) as u32)
        }
        _ => Err(alloc::format!("unknown command '{cmd}' (try `help`)")),
    };
    if let Err(e) = result {
        crate::println!("error: {e}");
    }
}

fn ok_or(ok: bool, why: &str) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(String::from(why))
    }
}

fn help() {
    crate::println!(
        "commands:\n  help              this list\n  vms               list VMs\n  stats             memory and exit counters\n  pause <vm>        stop scheduling a VM's vCPUs\n  resume <vm>       resume a paused VM\n  destroy <vm>      stop a VM and free its memory\n  quit              end the machine\nCtrl-A cycles console input: hypervisor -> vm ... -> hypervisor"
    );
}

fn vms() {
    crate::println!("  id  name        state     vcpus  active  pages  exits");
    for v in vm::all() {
        // Read under the stage-2 lock first, print after: the console lock
        // and memory-manager locks are never nested.
        let pages = v.memory.lock().resident_pages();
        crate::println!(
            "  {:<3} {:<11} {:<9} {:<6} {:<7} {:<6} {}",
            v.id,
            v.name,
            v.state().name(),
            v.nr_vcpus,
            v.active_vcpus(),
            pages,
            v.exits.load(Ordering::Relaxed)
        );
    }
}

fn stats() {
    let frames = crate::frames::get();
    let (heap_used, heap_total) = crate::heap::usage();
    crate::println!(
        "frames: {} free / {} total ({} used)\nheap: {} / {} bytes\nvms: {}",
        frames.free_count(),
        frames.total_count(),
        frames.total_count() - frames.free_count(),
        heap_used,
        heap_total,
        vm::count()
    );
}
