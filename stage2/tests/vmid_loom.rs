//! loom runs of the VMID allocator itself (`stage2::vmid` built on loom's atomics and mutex):
//! every interleaving (preemption bound 3) of a vCPU load racing a rollover on another CPU.
//!
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p stage2 --release --test
//! vmid_loom` (run by `cargo xtask test`). Without `--cfg loom` this file is empty.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use stage2::{TlbMaintenance, Vmid, VmidAllocator, VmidBits, Vttbr};

struct NoTlb;

impl TlbMaintenance for NoTlb {
    fn invalidate_ipa(&self, _: Vttbr, _: u64, _: u8) {}
    fn invalidate_vmid(&self, _: Vttbr) {}
    fn invalidate_icache(&self, _: u64, _: u64) {}
    fn invalidate_all(&self) {}
    fn clean_dcache_poc(&self, _: u64, _: u64) {}
}

fn explore(model: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    // The set-up (255 loads) runs in one thread, but every one of its atomic operations counts.
    builder.max_branches = 20_000;
    builder.check(model);
}

/// An allocator whose 255 numbers are all taken in generation 1, none loaded: VM 0 has number 1
/// (current), VMs 1..=254 the rest. `vms[255]` has none.
fn full() -> (Arc<VmidAllocator<2>>, Arc<Vec<Vmid>>) {
    let alloc = Arc::new(VmidAllocator::new(VmidBits::Eight));
    let vms: Arc<Vec<Vmid>> = Arc::new((0..256).map(|_| Vmid::new()).collect());
    for vm in &vms[..255] {
        alloc.load(vm, 1, &NoTlb);
        alloc.put(1);
    }
    assert_eq!(vms[0].number(), 1);
    (alloc, vms)
}

/// CPU 0 reloads VM 0 (the lock-free fast path: its VMID is current) while CPU 1 loads VM 255,
/// which has to roll over. Both stay loaded: they must not share a number. The fast path's
/// compare-and-swap of CPU 0's active word is what makes this hold: a plain store there lets
/// CPU 0 run under number 1 after the rollover freed it and gave it to VM 255.
#[test]
fn fast_path_load_racing_a_rollover() {
    explore(|| {
        let (alloc, vms) = full();
        let (a, v) = (alloc.clone(), vms.clone());
        let cpu0 = thread::spawn(move || a.load(&v[0], 0, &NoTlb));
        let n1 = alloc.load(&vms[255], 1, &NoTlb);
        let n0 = cpu0.join().unwrap();
        assert_eq!(alloc.rollovers(), 1);
        assert_ne!(n0, n1, "VMs 0 and 255 loaded at once under one VMID");
    });
}

/// VM 0 is loaded on CPU 0 before the rollover and stays loaded (CPU 0 re-enters it: another
/// load, racing the rollover) while CPU 1 rolls over for VM 255, puts it, and loads a second
/// vCPU of VM 0: the number CPU 0 was running is reserved, so VM 255 does not get it and VM 0
/// keeps it on both CPUs.
#[test]
fn a_number_loaded_across_a_rollover_is_kept() {
    explore(|| {
        let (alloc, vms) = full();
        let n0 = alloc.load(&vms[0], 0, &NoTlb);
        let (a, v) = (alloc.clone(), vms.clone());
        let cpu0 = thread::spawn(move || a.load(&v[0], 0, &NoTlb));
        let new = alloc.load(&vms[255], 1, &NoTlb);
        assert_ne!(new, n0, "the rollover gave away a number CPU 0 was running");
        alloc.put(1);
        assert_eq!(
            alloc.load(&vms[0], 1, &NoTlb),
            n0,
            "VM 0 renumbered while loaded"
        );
        assert_eq!(cpu0.join().unwrap(), n0, "VM 0 renumbered while loaded");
    });
}
