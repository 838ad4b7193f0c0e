//! `chaos`: random migrations, evacuations, reclaims, forks and destroys on
//! one CPU while the guests run on the others (the console's stress tool).
//! Console code: it drives `mm` and `vm` from above, as an operator would.

use crate::mm::frames::PAGE_SIZE;
use crate::mm::memctl::{evacuate, migrate_vm, online, reclaim, BATCH};
use alloc::vec::Vec;

/// A small xorshift generator for the chaos loop.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What a chaos run did.
#[derive(Default)]
struct Tally {
    ops: [u64; 5],
    moved: u64,
    reclaimed: u64,
    evac_left: usize,
    /// VMs this run forked (the only ones it destroys).
    mine: Vec<u32>,
}

/// Runs random migrations, evacuations, reclaims, forks and destroys for
/// `secs` seconds on this CPU while the guests run on the others. Forks at
/// most `max_vms` VMs in all; destroys only VMs it forked itself.
pub fn chaos(secs: u64, seed: u64, max_vms: usize) {
    let mut rng = Rng(seed | 1);
    let freq = crate::arch::timer::frequency();
    let deadline = crate::arch::timer::now() + secs * freq;
    let mut t = Tally::default();
    let ram_lo = (crate::mm::frames::get().first_free() + 0xf_ffff) & !0xf_ffff;
    while crate::arch::timer::now() < deadline {
        let vms: Vec<_> = crate::vm::all()
            .into_iter()
            .filter(|v| v.state() != crate::vm::VmState::Stopping)
            .collect();
        if vms.is_empty() {
            break;
        }
        let op = rng.below(10);
        let vm = &vms[rng.below(vms.len() as u64) as usize];
        step(&mut rng, &mut t, op, vm, ram_lo, max_vms);
    }
    crate::println!(
        "chaos: done: {} migrate, {} evacuate, {} reclaim, {} fork, {} destroy; {} frames moved, {} reclaimed, {} left busy in evacuations",
        t.ops[0], t.ops[1], t.ops[2], t.ops[3], t.ops[4], t.moved, t.reclaimed, t.evac_left
    );
}

/// One random operation (`op` in 0..10) on `vm` or on physical memory.
fn step(
    rng: &mut Rng,
    t: &mut Tally,
    op: u64,
    vm: &alloc::sync::Arc<crate::vm::Vm>,
    ram_lo: u64,
    max_vms: usize,
) {
    match op {
        0..=3 => {
            let pages = vm.mem.ram.size / PAGE_SIZE;
            let first = rng.below(pages);
            let len = 1 + rng.below(256);
            let start = vm.mem.ram.base + first * PAGE_SIZE;
            let end = (start + len * PAGE_SIZE).min(vm.mem.ram.end());
            let (start, end) = (rmap::Ipa::new(start), rmap::Ipa::new(end));
            let r = migrate_vm(&vm.mem, start, end, 1 + rng.below(BATCH as u64) as usize);
            t.moved += r.done;
            t.ops[0] += 1;
        }
        4 => {
            let start = ram_lo + rng.below(64) * (1 << 20);
            let end = start + (1 << 20);
            let (r, left) = evacuate(start, end, 64);
            t.moved += r.done;
            t.evac_left += left.guest;
            online(start, end);
            t.ops[1] += 1;
        }
        5 | 6 => {
            let (r, _, _) = reclaim(1 + rng.below(512), 64);
            t.reclaimed += r.done;
            t.ops[2] += 1;
        }
        7 | 8 if !vm.is_frozen() && crate::vm::count() < max_vms => {
            if let Ok(child) = crate::vm::fork::fork(vm, None, crate::vm::fork::ForkKind::Running) {
                t.mine.push(child.id);
                t.ops[3] += 1;
            }
        }
        _ if !t.mine.is_empty() => {
            let id = t.mine.swap_remove(rng.below(t.mine.len() as u64) as usize);
            if let Some(v) = crate::vm::get(id) {
                v.stop(0);
                t.ops[4] += 1;
            }
        }
        _ => {}
    }
}
