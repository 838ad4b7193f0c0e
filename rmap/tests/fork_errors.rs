//! Fork error paths (issue 12, item 7): a fork that fails because the chain or anon_vma pool
//! is full must leave the reverse map exactly as it was: every anon_vma's counters, the pools,
//! frames and swap slots. `anon_vma_fork` used to note its reuse candidate in the child region
//! before a later `link` could fail; the cleanup (`unlink_region`) then decremented the
//! candidate's `num_active_regions`, which was never incremented (an underflow: a debug
//! panic, or in release a wrapped counter that stops the anon_vma from ever being reused).
//!
//! Each case fills the pool under test with filler regions until exactly `free` slots are
//! left, for every `free` from "fails at once" to "succeeds", and checks after each fork.

use rmap::host::{page_ipa, HostVm, HostWorld};
use rmap::Ipa;
use rmap::{Error, Pfn, Stage2, Stage2Locked};
use std::sync::Arc;

const RAM: Ipa = Ipa::new(0x4000_0000);
const REGIONS: [(Ipa, u64); 2] = [(RAM, 8), (RAM.offset(0x20_0000), 4)];
/// Where filler regions go: one page each, two pages apart (never adopted by a neighbour).
const FILL: Ipa = Ipa::new(0x8000_0000);
const ROOMY: usize = 256;
const TIGHT: usize = 48;

#[derive(Clone, Copy, Debug)]
enum Pool {
    Chains,
    AnonVmas,
}

/// Everything a failed fork must leave unchanged.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    chains: usize,
    anon_vmas: usize,
    frames: usize,
    swap: Vec<(u64, u32)>,
    /// (anon_vma, num_active_regions, num_children, chains) of the forked VM's family.
    nodes: Vec<(u64, u32, u32, usize)>,
}

fn snapshot(w: &HostWorld, vm: &HostVm) -> Snapshot {
    let list = vm.regions.read();
    let mut nodes = Vec::new();
    for region in list.iter() {
        let own = region.anon_vma().expect("faulted");
        let family = w.rmap.lock_family_read(own);
        nodes.extend(family.iter().map(|(a, n)| {
            let counts = (n.num_active_regions, n.num_children, n.chain_count());
            (a.raw(), counts.0, counts.1, counts.2)
        }));
    }
    nodes.sort_unstable();
    nodes.dedup();
    Snapshot {
        chains: w.rmap.live_chains(),
        anon_vmas: w.rmap.live_anon_vmas(),
        frames: w.machine.allocated(),
        swap: w.machine.swap_refs().into_iter().collect(),
        nodes,
    }
}

fn pfn_at(vm: &HostVm, ipa: Ipa) -> Pfn {
    vm.s2.lock().lookup(ipa).pfn().expect("mapped")
}

/// A VM with both regions faulted in, one page of each pushed out to swap.
fn faulted_vm(w: &HostWorld) -> Arc<HostVm> {
    let vm = w.create_vm(&REGIONS);
    for (n, &(start, pages)) in REGIONS.iter().enumerate() {
        for i in 0..pages {
            let value = (n as u64) << 32 | i;
            vm.write(&w.rmap, &w.machine, page_ipa(start, i), value)
                .unwrap();
        }
        let pfn = pfn_at(&vm, start);
        w.rmap
            .reclaim_frame(&w.vms, &w.machine, &w.machine, pfn)
            .unwrap();
    }
    vm
}

/// A VM whose one-page regions use up `pool` until `free` slots are left (each filler
/// region takes one chain and one anon_vma).
fn fill(w: &HostWorld, pool: Pool, free: usize) -> Arc<HostVm> {
    let vm = w.create_vm(&[]);
    let used = match pool {
        Pool::Chains => w.rmap.live_chains(),
        Pool::AnonVmas => w.rmap.live_anon_vmas(),
    };
    for i in 0..(TIGHT - used).saturating_sub(free) as u64 {
        let start = FILL + 2 * i * 0x1000;
        let mut list = vm.regions.write();
        w.rmap
            .region_create(&mut list, start, 1, rmap::RegionFlags::NONE)
            .unwrap();
        drop(list);
        vm.write(&w.rmap, &w.machine, start, i).unwrap();
    }
    vm
}

/// Builds a lineage with `setup`, fills `pool` up to `free` free slots, forks `setup`'s VM
/// and checks the outcome; returns whether the fork succeeded.
fn fork_with(pool: Pool, free: usize, destroy_parent: bool) -> bool {
    let (anon, chains) = match pool {
        Pool::Chains => (ROOMY, TIGHT),
        Pool::AnonVmas => (TIGHT, ROOMY),
    };
    let w = HostWorld::new(256, 4, anon, chains);
    let a = faulted_vm(&w);
    let b = w.fork(&a).unwrap();
    // B writes one page: its own anon_vma gets a frame.
    b.write(&w.rmap, &w.machine, RAM + 0x1000, 77).unwrap();
    if destroy_parent {
        // A's anon_vmas keep B's chains but no live region, and one child each: the next
        // fork of B reuses them.
        w.destroy(&a);
    }
    let filler = fill(&w, pool, free);
    w.check().unwrap();
    let before = snapshot(&w, &b);
    let forked = w.fork(&b);
    let ok = match &forked {
        Ok(_) => true,
        Err(Error::OutOfChains | Error::OutOfAnonVmas) => {
            assert_eq!(
                snapshot(&w, &b),
                before,
                "{pool:?} free {free}: failed fork"
            );
            false
        }
        Err(e) => panic!("{pool:?} free {free}: {e:?}"),
    };
    w.check()
        .unwrap_or_else(|e| panic!("{pool:?} free {free}: {e}"));
    if let Ok(d) = forked {
        assert_eq!(d.read(&w.rmap, &w.machine, RAM + 0x1000).unwrap(), 77);
        w.destroy(&d);
    }
    let mut rest = vec![filler, b];
    if !destroy_parent {
        rest.push(a);
    }
    destroy_all(&w, rest);
    ok
}

/// Destroys `vms`; then nothing may be left.
fn destroy_all(w: &HostWorld, vms: Vec<Arc<HostVm>>) {
    for vm in vms {
        w.destroy(&vm);
    }
    w.check().unwrap();
    assert_eq!(w.rmap.live_chains(), 0, "chains leaked");
    assert_eq!(w.rmap.live_anon_vmas(), 0, "anon_vmas leaked");
    assert_eq!(w.machine.allocated(), 0, "frames leaked");
    assert!(w.machine.swap_refs().is_empty(), "swap slots leaked");
}

/// Every pool limit from "fails at the first allocation" to "succeeds".
fn sweep(pool: Pool, destroy_parent: bool) -> usize {
    let failures = (0..=16)
        .position(|free| fork_with(pool, free, destroy_parent))
        .unwrap_or_else(|| panic!("{pool:?}: the fork never succeeded"));
    assert!(failures > 0, "{pool:?}: the fork never failed");
    failures
}

/// The case: A faulted, A forked into B, A destroyed, B forked with the chain pool
/// nearly full. Free 1 and 3 fail at a region's second link after its first anon_vma (A's)
/// was noted for reuse: the old code underflowed `num_active_regions` there.
#[test]
fn failed_fork_after_parent_destroyed_leaves_counters() {
    assert_eq!(sweep(Pool::Chains, true), 4, "two regions, two links each");
    assert!(
        fork_with(Pool::AnonVmas, 0, true),
        "reusing A's anon_vmas needs no new one"
    );
}

/// No reuse possible (A alive): each child region needs links plus its own anon_vma, so
/// the anon_vma allocation and the link of the new anon_vma fail too.
#[test]
fn failed_fork_without_reuse_leaves_counters() {
    assert_eq!(
        sweep(Pool::Chains, false),
        6,
        "two regions, three links each"
    );
    assert_eq!(
        sweep(Pool::AnonVmas, false),
        2,
        "one new anon_vma per region"
    );
}
