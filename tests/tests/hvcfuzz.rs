//! Proving it: random hypercalls from every vCPU of every VM while the
//! console runs `chaos`, next to a VM that did nothing wrong (the guest's
//! `hvcfuzz` mode); and snapshot ownership (`snapsteal`): a VM may restore
//! only its own snapshots.
//!
//! `HVCFUZZ_SEED=<n>` replays a seed (as far as timing allows);
//! `cargo xtask soak [minutes]` runs the fuzzer for longer.

use qemu_tests::{hvcfuzz, Machine, MachineConfig};
use std::time::Duration;

const FUZZ_SECS: u64 = 30;

#[test]
fn hvcfuzz_with_chaos_harms_neither_the_hypervisor_nor_an_innocent_vm() {
    let seed = hvcfuzz::seed();
    println!("hvcfuzz: seed {seed} (HVCFUZZ_SEED={seed} to replay)");
    let mut m = Machine::boot("hvcfuzz", &hvcfuzz::config(FUZZ_SECS, seed, ""));
    let status = m.wait_exit(Duration::from_secs(FUZZ_SECS + 270));
    let t = m.transcript();
    m.assert_no_hyp_fault();
    let s = hvcfuzz::verdict(&t, status);
    println!(
        "hvcfuzz: seed {seed}: root {:?} hypercalls, checker {:?} rounds, {} fuzz VMs ran out their time, {} checker clones",
        s.root_calls, s.checker_rounds, s.children, s.checker_clones
    );
    assert!(
        s.problems.is_empty(),
        "seed {seed}: {:#?}\n----- console -----\n{t}",
        s.problems
    );
}

/// Failed on 1447395 (the thief restored into the root's snapshot and read
/// its marker); passes since 40a99c5 (snapshots belong to their VM).
#[test]
fn a_vm_cannot_restore_itself_into_another_vms_snapshot() {
    let cfg = MachineConfig {
        smp: 2,
        vcpus: Some(1),
        guest_args: Some("snapsteal".into()),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("snapsteal", &cfg);
    let status = m.wait_exit(Duration::from_secs(240));
    let t = m.transcript();
    m.assert_no_hyp_fault();
    assert!(!t.contains("SNAPSTEAL"), "a thief got in\n{t}");
    assert!(t.contains("foreign ids refused"), "{t}");
    assert!(t.contains("restored its own snapshot"), "{t}");
    assert_eq!(t.matches("GUEST RESULT: PASS").count(), 2, "{t}");
    assert_eq!(status, 0, "{t}");
}

/// A RESTORE puts x0/x1 (the cookie) into the vCPU that took the snapshot
/// and leaves every other vCPU's registers alone (or is refused). Failed on
/// 93d4bea: vCPU 0 (the taker) resumed with x1 = 0 and vCPU 1 (the caller)
/// in the middle of its loop with x0 = 0 and x1 = the cookie; passes since
/// 2b14864.
#[test]
fn a_restore_from_another_vcpu_corrupts_no_registers() {
    let cfg = MachineConfig {
        smp: 2,
        vcpus: Some(2),
        guest_args: Some("snapvcpu".into()),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("snapvcpu", &cfg);
    let status = m.wait_exit(Duration::from_secs(180));
    let t = m.transcript();
    m.assert_no_hyp_fault();
    assert!(!t.contains("SNAPVCPU"), "registers corrupted\n{t}");
    assert!(t.contains("GUEST RESULT: PASS"), "{t}");
    assert_eq!(status, 0, "{t}");
}
