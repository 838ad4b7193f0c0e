//! KVM's lazy I-cache policy in the real adapter (`hypmm::Fetch`): every
//! frame the hypervisor fills or a new mapper maps is mapped not executable;
//! only an instruction fetch's fault (`make_executable`) makes the I-cache
//! coherent with it, before the executable entry can be used; a change that
//! keeps the frame keeps the permission.

mod common;

use common::{World, RAM_BASE, RAM_PAGES};
use hypmm::{BLOCK_SIZE, PAGE_SIZE};
use rmap::Ipa;
use stage2::host::TlbCall;
use stage2::Leaf;

/// Stage-2 XN (execute-never for EL1 and EL0), bit 54.
const XN: u64 = 1 << 54;

/// Whether the leaf mapping `ipa` allows execution (None: no valid leaf).
fn executable(vm: &common::TestVm, ipa: Ipa) -> Option<bool> {
    let leaf = vm.memory.lock().table().lookup(ipa)?;
    match leaf.leaf {
        Leaf::Mapped(m) => Some(m.attrs.perm.exec),
        Leaf::Software(_) => None,
    }
}

fn icache_calls(w: &World) -> Vec<(u64, u64)> {
    let f = |c: &TlbCall| match *c {
        TlbCall::Icache { pa, len } => Some((pa, len)),
        _ => None,
    };
    w.hw().tlb.take().iter().filter_map(f).collect()
}

#[test]
fn frames_stay_non_executable_until_a_fetch_and_only_the_fetch_maintains_the_icache() {
    let w = World::new(false);
    let parent = w.vm(1, RAM_PAGES);
    let ipa = RAM_BASE + 7 * PAGE_SIZE;
    w.hw().tlb.take();
    w.access(&parent, ipa, true);
    assert_eq!(executable(&parent, ipa), Some(false), "first touch");
    assert_eq!(
        icache_calls(&w),
        [],
        "a data touch owes the I-cache nothing"
    );

    // The fetch: I-cache maintenance for the block's frames while its entry
    // still forbids execution, then the executable entry.
    let block = parent.memory.lock().pa_of(RAM_BASE).unwrap().raw();
    let root = parent.root;
    let hw = w.hw();
    hw.tlb.set_hook(move |call| {
        if matches!(call, TlbCall::Icache { .. }) {
            // What the hardware would use now, read without the held lock.
            let (desc, _) = common::walk_leaf(hw, root, ipa.raw()).expect("mapped");
            assert_ne!(desc & XN, 0, "executable before the I-cache maintenance");
        }
        hw.on_tlb(call);
    });
    assert!(parent.memory.lock().make_executable(ipa));
    assert_eq!(executable(&parent, ipa), Some(true));
    assert_eq!(icache_calls(&w), [(block, BLOCK_SIZE)]);
    assert!(
        parent.memory.lock().make_executable(ipa),
        "a second fetch fault finds it done"
    );
    assert_eq!(icache_calls(&w), [], "and owes nothing");

    // Fork write-protects the parent's block in place: still executable. The
    // child maps the frames anew: its own fetch must fault.
    let child = w.empty_vm(2);
    w.fork(&parent, &child);
    assert_eq!(
        executable(&parent, ipa),
        Some(true),
        "write-protect keeps the frame"
    );
    assert_eq!(
        executable(&child, ipa),
        Some(false),
        "a new mapper fetches first"
    );

    // Copy-on-write: a new frame, not executable, and no I-cache work in the
    // fault; the rest of the split block keeps its permission.
    icache_calls(&w);
    w.access(&parent, ipa, true);
    assert_eq!(
        icache_calls(&w),
        [],
        "the CoW fault does no I-cache maintenance"
    );
    assert_eq!(
        executable(&parent, ipa),
        Some(false),
        "the copy waits for a fetch"
    );
    assert_eq!(executable(&parent, ipa + PAGE_SIZE), Some(true));
    let copy = parent.memory.lock().pa_of(ipa).unwrap().raw();
    assert!(parent.memory.lock().make_executable(ipa));
    assert_eq!(icache_calls(&w), [(copy, PAGE_SIZE)]);
}

#[test]
fn a_fetch_fault_on_no_valid_entry_takes_the_ordinary_path() {
    let w = World::new(false);
    let vm = w.vm(1, RAM_PAGES);
    assert!(
        !vm.memory.lock().make_executable(RAM_BASE),
        "nothing mapped"
    );
    assert_eq!(icache_calls(&w), []);
}
