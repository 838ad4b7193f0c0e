//! `hvcfuzz [secs=N] [seed=S] [switches]`: every vCPU issues
//! random vendor and PSCI hypercalls (`gen.rs`) for N seconds while FORK,
//! SNAPSHOT, RESTORE, MEM_RELEASE and EXIT race across vCPUs and VMs.
//!
//! - The root VM (the one booted) forks a checker first (`checker.rs`), a VM
//!   that does nothing wrong and must keep passing its own checks; then it
//!   brings up its vCPUs and fuzzes. It never exits, powers off vCPU 0 or
//!   releases anything but its scratch area, so it survives to report.
//! - Any other VM running this code (a fuzz FORK's child, a console/chaos
//!   fork, a VM restored into a foreign snapshot) knows it by its VM id and
//!   fuzzes for `CHILD_MS`, then exits 0.
//! - Statics are per VM (each VM has its own copy-on-write memory); the root
//!   carries its call count across its own restores in the restore cookie.
//!
//! Switches for hypervisor bugs the fuzzer found (findings in
//! /work/notes/hvcfuzz-findings.md), to fuzz past them on a hypervisor that
//! still has them:
//! - `foreign=1`: the root, too, restores random ids near its own (before
//!   40a99c5 any VM's snapshot was accepted, turning the root into another
//!   VM; F1). Off by default even now: those ids are mostly the root's own
//!   snapshots, and a root that keeps jumping back to them gets nowhere
//!   (34,506 restores and 12 calls to show for a 30 s run). Children do it.
//! - `anyvcpu=0`: only vCPU 0 SNAPSHOTs/RESTOREs anything real (before
//!   2b14864 a RESTORE by vCPU j gave j its own snapshot state with x0/x1
//!   overwritten at an arbitrary PC; F3). Default 1: any vCPU does.
//! - `norestore=1`: no RESTORE that could succeed (the checker's and every
//!   VM's own included): before eccd210 a fast restore waited on a frame lock
//!   holding the snapshot's stage-2 lock, deadlocking with reclaim (F5).

mod checker;
mod gen;
mod oracle;

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

use crate::dtb::Platform;
use crate::modes::fork::arg;
use crate::report::{reason, Reason};
use crate::smp::MAX_VCPUS;
use crate::{cpu, entry, psci, smp};
use gen::{Call, Ctx, Rng};
use platform::abi::{Stat, HVC_RESTORE, HVC_SNAPSHOT, HVC_STATS, HVC_VM_ID, SMCCC_NO_MEMORY};

/// VMs alive (snapshots included) above which nobody forks or snapshots.
const CAP: u64 = 14;
/// How long a VM other than the root fuzzes before it exits.
const CHILD_MS: u64 = 1500;
/// Snapshots the root takes of itself at most.
const ROOT_SNAPS: u64 = 4;
/// Restore cookie tags (top byte).
const ROOT_TAG: u64 = 0xA5;
const CHILD_TAG: u64 = 0x5A;
const MASK40: u64 = (1 << 40) - 1;
const PROBE_TAG: u64 = 0xCC;

static ROOT_ID: AtomicU64 = AtomicU64::new(0);
static SEED: AtomicU64 = AtomicU64::new(0);
/// Root: the fuzzing ends at this counter value.
static END: AtomicU64 = AtomicU64::new(0);
static FOREIGN: AtomicBool = AtomicBool::new(false);
static ANY_VCPU: AtomicBool = AtomicBool::new(false);
pub(super) static NO_RESTORE: AtomicBool = AtomicBool::new(false);
static CALLS: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
/// Calls made before the root's last restore that the restore undid.
static CARRIED: AtomicU64 = AtomicU64::new(0);
/// A VM other than the root: its id << 40 | its end (counter >> 8).
static CLONE: AtomicU64 = AtomicU64::new(0);
/// Snapshots of this VM: owner id << 32 | snapshot id, taken by vCPU 0.
static SNAPS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
static ROOT_SNAPS_TAKEN: AtomicU64 = AtomicU64::new(0);
static WRONG: AtomicU64 = AtomicU64::new(0);
/// The VM that last snapshotted this memory (set just before each
/// SNAPSHOT): a VM that resumes at a SNAPSHOT and finds another VM's id here
/// restored itself into that VM's snapshot.
static MEM_OWNER: AtomicU64 = AtomicU64::new(0);
static MPIDRS: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(u64::MAX) }; MAX_VCPUS];
/// RAM, scratch (MEM_RELEASE), root pattern and checker areas.
static LAYOUT: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

pub fn vm_id() -> u64 {
    psci::hvc(HVC_VM_ID, 0, 0, 0) as u64
}

fn live_vms() -> u64 {
    psci::hvc(HVC_STATS, Stat::LiveVms as u64, 0, 0) as u64
}

/// Lets another vCPU run while this one polls memory: WFE (see
/// `modes::fork`'s `yield_cpu`: a WFI would sleep until an interrupt).
fn yield_cpu() {
    // SAFETY: WFE only waits (at most until the next event or trap).
    unsafe { core::arch::asm!("wfe", options(nomem, nostack)) };
}

/// A hypercall with x0..x3 as given; returns x0 and x1.
fn hvc_raw(x: [u64; 4]) -> (i64, u64) {
    let (r0, r1): (i64, u64);
    // SAFETY: an SMCCC call changes no memory of ours (a RESTORE replaces all
    // of it and all registers, consistently); clobber_abi covers x0-x17.
    unsafe {
        core::arch::asm!("hvc #0", inlateout("x0") x[0] => r0, inlateout("x1") x[1] => r1,
            in("x2") x[2], in("x3") x[3], clobber_abi("C"), options(nostack));
    }
    (r0, r1)
}

fn total_calls() -> u64 {
    CARRIED.load(SeqCst) + CALLS.iter().map(|c| c.load(SeqCst)).sum::<u64>()
}

fn bump(vcpu: usize) {
    CALLS[vcpu % MAX_VCPUS].fetch_add(1, SeqCst);
}

pub fn run(plat: &Platform) -> Result<(), Reason> {
    let secs = arg(plat, "secs", 30);
    let seed = match arg(plat, "seed", 0) {
        0 => cpu::ticks() ^ 0x5eed,
        s => s,
    };
    SEED.store(seed, SeqCst);
    FOREIGN.store(arg(plat, "foreign", 0) != 0, SeqCst);
    ANY_VCPU.store(arg(plat, "anyvcpu", 1) != 0, SeqCst);
    NO_RESTORE.store(arg(plat, "norestore", 0) != 0, SeqCst);
    let root = vm_id();
    ROOT_ID.store(root, SeqCst);
    set_layout(plat)?;
    END.store(cpu::ticks() + secs * cpu::ticks_per_sec(), SeqCst);
    println!("hvcfuzz: root vm {root}, seed {seed}, {secs} s");
    checker::fill_root_area();
    checker::fork_checker(secs)?;
    if vm_id() != root {
        clone_exit(vm_id()); // a console fork of us while we set up
    }
    let vcpus = smp::bring_up(plat, vcpu_job)?;
    println!("hvcfuzz: {vcpus} vcpus fuzzing");
    smp::release(vcpus);
    vcpu_job(0, vcpus);
    finish(root, seed)
}

/// The root's last words (a clone of the root that got here just exits).
fn finish(root: u64, seed: u64) -> Result<(), Reason> {
    if vm_id() != root {
        clone_exit(vm_id());
    }
    checker::verify_root_area()?;
    let restores = psci::hvc(HVC_STATS, Stat::Restores as u64, 0, 0);
    println!(
        "hvcfuzz: {} hypercalls, seed {seed} ({restores} restores of the root, {} wrong answers)",
        total_calls(),
        WRONG.load(SeqCst)
    );
    match WRONG.load(SeqCst) {
        0 => Ok(()),
        n => Err(reason!("{n} wrong answers to the root's hypercalls")),
    }
}

fn set_layout(plat: &Platform) -> Result<(), Reason> {
    let ram = plat.ram()[0];
    let mib = 1 << 20;
    let area = super::selftest::choose_area(plat, Some(crate::args::MemSize::MiB(8)))?;
    if area.size < 8 * mib {
        return Err(reason!("no 8 MiB free for the hvcfuzz areas"));
    }
    let a = area.start as u64;
    let values = [
        ram.start as u64,
        ram.end() as u64,
        a,
        a + 4 * mib as u64,
        a + 4 * mib as u64,
        a + 6 * mib as u64,
    ];
    for (slot, v) in LAYOUT.iter().zip(values) {
        slot.store(v, SeqCst);
    }
    // smp's vCPU order: the boot vCPU, then the others in DTB order.
    let me = cpu::mpidr_affinity();
    let others = plat.cpus().iter().copied().filter(|&m| m != me);
    for (slot, m) in MPIDRS.iter().zip(core::iter::once(me).chain(others)) {
        slot.store(m, SeqCst);
    }
    Ok(())
}

pub(super) fn layout(i: usize) -> u64 {
    LAYOUT[i].load(SeqCst)
}

/// Every vCPU of every VM running this code: fuzz until its VM's end.
fn vcpu_job(index: usize, _vcpus: usize) {
    let mut rng = Rng::new(SEED.load(SeqCst) ^ (index as u64 + 1).wrapping_mul(0x1000_0001));
    let mut mpidrs = [0u64; MAX_VCPUS];
    let n = MPIDRS
        .iter()
        .take_while(|m| m.load(SeqCst) != u64::MAX)
        .count();
    for (d, s) in mpidrs.iter_mut().zip(&MPIDRS) {
        *d = s.load(SeqCst);
    }
    let mut last = 0;
    loop {
        let me = vm_id();
        bump(index);
        if me != last {
            rng.mix(me);
            if index == 0 && last != 0 {
                println!("hvcfuzz: vm {me} is a copy of vm {last}");
            }
            last = me;
        }
        let root = me == ROOT_ID.load(SeqCst);
        if !root && clone_expired(me) {
            if index == 0 {
                clone_exit(me);
            }
            yield_cpu();
            continue;
        }
        if root && cpu::ticks() > END.load(SeqCst) {
            return;
        }
        let ctx = Ctx {
            me,
            root,
            vcpu: index,
            ram: (layout(0), layout(1)),
            scratch: (layout(2), layout(3)),
            mpidrs: &mpidrs[..n],
            secondary_entry: entry::secondary_entry as *const () as u64,
            foreign: FOREIGN.load(SeqCst),
            any_vcpu: ANY_VCPU.load(SeqCst),
            avoid: mislabeled(me),
            no_restore: NO_RESTORE.load(SeqCst),
            own: own_snapshots(me),
        };
        step(&mut rng, &ctx);
    }
}

/// Whether this VM (not the root) has fuzzed long enough; the first vCPU
/// to see a new VM id starts its clock.
fn clone_expired(me: u64) -> bool {
    let now = cpu::ticks() >> 8;
    let mut cur = CLONE.load(SeqCst);
    if cur >> 40 != me {
        let end = now + CHILD_MS * cpu::ticks_per_sec() / 1000 / 256;
        let new = (me << 40) | (end & MASK40);
        cur = match CLONE.compare_exchange(cur, new, SeqCst, SeqCst) {
            Ok(_) => new,
            Err(other) => other,
        };
    }
    // Nobody fuzzes past the root's end: the machine must run dry.
    let over = cpu::ticks() > END.load(SeqCst);
    over || (cur >> 40 == me && now & MASK40 > cur & MASK40)
}

fn clone_exit(me: u64) -> ! {
    println!(
        "hvcfuzz child vm {me}: {} hypercalls (with its ancestors'), seed {}",
        total_calls(),
        SEED.load(SeqCst)
    );
    psci::power_off(0)
}

fn step(rng: &mut Rng, ctx: &Ctx) {
    if ctx.vcpu == 0 && rng.one_in(64) {
        own_snapshot_work(rng, ctx);
        return;
    }
    if ctx.root && ctx.vcpu == 0 && rng.one_in(256) {
        if let Err(e) = checker::verify_root_area() {
            crate::report::fail(format_args!("{e}"));
        }
    }
    let Some(call) = gen::sanitize(gen::raw(rng, ctx), ctx, rng) else {
        return;
    };
    if matches!(call.fid(), platform::abi::HVC_FORK | HVC_SNAPSHOT) && !may_grow(ctx, call.fid()) {
        return;
    }
    if call.fid() == HVC_SNAPSHOT {
        MEM_OWNER.store(ctx.me, SeqCst);
    }
    let mut call = call;
    if call.fid() == HVC_RESTORE && ctx.vcpu == 0 && rng.one_in(2) {
        // A cookie that says who restored what, should it ever succeed.
        // Our id read right before the call: a fork in between shows.
        call.x[2] = (PROBE_TAG << 56) | (vm_id() << 24) | (call.x[1] & 0xff_ffff);
    }
    let (r, x1) = hvc_raw(call.x);
    bump(ctx.vcpu);
    after(&call, r, x1, ctx);
}

/// FORK and SNAPSHOT only while few VMs live (snapshots never go away).
/// The root's snapshots (from any vCPU) live as long as the root, so they
/// have their own budget, or they would fill `CAP` and stop every fork.
fn may_grow(ctx: &Ctx, fid: u32) -> bool {
    let live = live_vms();
    let root_snaps = ROOT_SNAPS_TAKEN.load(SeqCst);
    live < CAP && !(ctx.root && fid == HVC_SNAPSHOT && root_snaps >= ROOT_SNAPS)
}

fn after(call: &Call, r: i64, x1: u64, ctx: &Ctx) {
    if call.fid() == HVC_SNAPSHOT {
        match r {
            0 => restored(x1),
            id if id > 0 && ctx.vcpu == 0 => record_snapshot(ctx, id as u64),
            id if id > 0 && ctx.root => {
                ROOT_SNAPS_TAKEN.fetch_add(1, SeqCst);
            }
            _ => {}
        }
    }
    if let Some(want) = oracle::check(call, r, ctx) {
        let n = WRONG.fetch_add(1, SeqCst);
        if n < 5 {
            println!(
                "hvcfuzz: WRONG ANSWER in vm {} vcpu {}: call {:#x}({:#x}, {:#x}, {:#x}) returned {r} ({r:#x}), expected {want}",
                ctx.me, ctx.vcpu, call.x[0], call.x[1], call.x[2], call.x[3]
            );
        }
    }
}

/// Marks a snapshot whose memory names another VM as its taker.
const MISLABELED: u64 = 1 << 31;

fn record_snapshot(ctx: &Ctx, id: u64) {
    // A fork of this VM between the MEM_OWNER store and the SNAPSHOT leaves
    // the child holding a snapshot of itself whose memory names the parent:
    // the child must never resume there (it would look like a stolen one).
    let now = vm_id();
    let flag = if now == ctx.me { 0 } else { MISLABELED };
    if ctx.root && flag == 0 {
        ROOT_SNAPS_TAKEN.fetch_add(1, SeqCst);
    }
    let entry = (now << 32) | flag | id;
    let note = if flag == 0 {
        ""
    } else {
        " (its memory names its parent)"
    };
    println!("hvcfuzz: vm {now} took snapshot {id}{note}");
    if let Some(slot) = SNAPS.iter().find(|s| s.load(SeqCst) >> 32 != now) {
        slot.store(entry, SeqCst);
    }
}

/// This VM's snapshots (their ids; 0 in unused slots).
fn own_snapshots(me: u64) -> [u64; 8] {
    core::array::from_fn(|i| match SNAPS[i].load(SeqCst) {
        s if s >> 32 == me => s & 0x7fff_ffff,
        _ => 0,
    })
}

/// The id of this VM's mislabeled snapshot (see `record_snapshot`), or 0.
fn mislabeled(me: u64) -> u64 {
    SNAPS
        .iter()
        .map(|s| s.load(SeqCst))
        .find(|s| s >> 32 == me && s & MISLABELED != 0)
        .map_or(0, |s| s & 0x7fff_ffff)
}

/// Execution resumed at a SNAPSHOT after a RESTORE with cookie `x1`. The
/// root's own restore brings its count and snapshot budget back with it.
fn restored(cookie: u64) {
    let (me, owner) = (vm_id(), MEM_OWNER.load(SeqCst));
    // Judged only for probe cookies issued by this very VM: a fork between
    // reading our id and the RESTORE, or between the resume and here, leaves
    // a copy with its parent's memory that did nothing wrong.
    let (by, id) = ((cookie >> 24) & 0xffff_ffff, cookie & 0xff_ffff);
    if cookie >> 56 == PROBE_TAG && by == me && owner != me {
        // A snapshot belongs to the VM it was taken of (issue 12, item 2).
        println!(
            "hvcfuzz: SNAPSTEAL: vm {me} restored into a snapshot of vm {owner} (RESTORE({id}), cookie {cookie:#x})"
        );
    }
    if cookie >> 56 == ROOT_TAG && me == ROOT_ID.load(SeqCst) {
        let before = cookie & MASK40;
        let now = total_calls();
        CARRIED.fetch_add(before.saturating_sub(now), SeqCst);
        ROOT_SNAPS_TAKEN.store((cookie >> 40) & 0xffff, SeqCst);
    }
}

/// vCPU 0: snapshot itself, or restore one of its own snapshots.
fn own_snapshot_work(rng: &mut Rng, ctx: &Ctx) {
    let mine = SNAPS
        .iter()
        .map(|s| s.load(SeqCst))
        .filter(|s| s >> 32 == ctx.me && s & MISLABELED == 0 && s & 0x7fff_ffff != 0);
    let count = mine.clone().count() as u64;
    let want_new = count == 0 || (ctx.root && rng.one_in(4)) || (!ctx.root && rng.one_in(8));
    if want_new {
        let room = may_grow(ctx, HVC_SNAPSHOT) && (ctx.root || live_vms() < CAP / 2);
        if (ctx.root || count == 0) && room {
            MEM_OWNER.store(ctx.me, SeqCst);
            let (r, x1) = hvc_raw([u64::from(HVC_SNAPSHOT), 0, 0, 0]);
            bump(0);
            after(
                &Call {
                    x: [u64::from(HVC_SNAPSHOT), 0, 0, 0],
                },
                r,
                x1,
                ctx,
            );
        }
        return;
    }
    if ctx.no_restore {
        return;
    }
    let Some(snap) = mine.clone().nth(rng.below(count) as usize) else {
        return;
    };
    let snap = snap & 0xffff_ffff;
    let cookie = if ctx.root {
        (ROOT_TAG << 56) | (ROOT_SNAPS_TAKEN.load(SeqCst) << 40) | (total_calls() & MASK40)
    } else {
        (CHILD_TAG << 56) | ctx.me
    };
    let (r, _) = hvc_raw([u64::from(HVC_RESTORE), snap, cookie, 0]);
    bump(0);
    // A fork between our id check and the call made the caller a copy, whose
    // refusal of its parent's snapshot is right (seen: seed 172, vm 13).
    if r == SMCCC_NO_MEMORY || vm_id() != ctx.me {
        return;
    }
    println!(
        "hvcfuzz: WRONG ANSWER in vm {}: RESTORE of its own snapshot {snap} returned {r}",
        ctx.me
    );
    WRONG.fetch_add(1, SeqCst);
}
