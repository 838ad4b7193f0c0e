//! QEMU scenarios for the foundation: boot on 1, 2 and 4 CPUs with both CPU
//! models (with and without FEAT_S2FWB), the test guest's SMP self-check, more vCPUs than CPUs, a wild
//! guest access, and exit statuses that reach QEMU's exit code.

use qemu_tests::{Machine, MachineConfig};
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(60);
const SELFTEST: Duration = Duration::from_secs(240);

fn config(smp: u32, cpu: &str, guest_args: &str) -> MachineConfig {
    MachineConfig {
        smp,
        cpu: cpu.into(),
        guest_args: Some(guest_args.into()),
        ..MachineConfig::default()
    }
}

/// Boots, waits for the guest's verdict, and checks the machine's exit status.
fn selftest(name: &str, cfg: &MachineConfig, vcpus: u32) {
    let mut m = Machine::boot(name, cfg);
    // FEAT_S2FWB (ID_AA64MMFR2_EL1.FWB): QEMU 7.2's `max` has it, `cortex-a72`
    // (Armv8.0) does not, so both cache-maintenance policies boot here.
    let fwb = if cfg.cpu == "max" {
        "FWB on"
    } else {
        "FWB off"
    };
    m.expect(fwb, BOOT);
    m.expect(&format!("{} CPU(s) online", cfg.smp), BOOT);
    m.expect(&format!("GUEST: {vcpus} vcpus up"), BOOT);
    m.expect("GUEST RESULT: PASS", SELFTEST);
    m.expect("exited with status 0", BOOT);
    let status = m.wait_exit(BOOT);
    m.assert_no_hyp_fault();
    assert_eq!(status, 0, "[{name}] exit status\n{}", m.transcript());
}

#[test]
fn boots_and_passes_selftest_on_one_cpu() {
    selftest("smp1", &config(1, "cortex-a72", "selftest mem=16"), 1);
}

#[test]
fn boots_and_passes_selftest_on_two_cpus() {
    selftest("smp2", &config(2, "cortex-a72", "selftest mem=32"), 2);
}

#[test]
fn boots_and_passes_selftest_on_four_cpus_max() {
    selftest("smp4-max", &config(4, "max", "selftest mem=32"), 4);
}

#[test]
fn more_vcpus_than_cpus() {
    let cfg = MachineConfig {
        vcpus: Some(6),
        ..config(2, "cortex-a72", "selftest mem=24")
    };
    selftest("6-vcpus-on-2", &cfg, 6);
}

#[test]
fn wild_guest_access_gets_an_abort_and_the_hypervisor_lives() {
    let mut m = Machine::boot("wild", &config(2, "cortex-a72", "wild"));
    m.expect("outside its memory", BOOT);
    m.expect("GUEST: wild access at", BOOT);
    m.expect("caught", BOOT);
    m.expect("GUEST RESULT: PASS", BOOT);
    assert_eq!(m.wait_exit(BOOT), 0);
    m.assert_no_hyp_fault();
}

#[test]
fn guest_failure_status_reaches_qemu() {
    // A bootarg the guest rejects makes it FAIL with a non-zero status, which
    // must come out as QEMU's exit status.
    let mut m = Machine::boot(
        "fail-status",
        &config(1, "cortex-a72", "selftest mem=notanumber"),
    );
    m.expect("GUEST RESULT: FAIL", BOOT);
    let status = m.wait_exit(BOOT);
    assert_ne!(
        status,
        0,
        "a failing guest must fail the machine\n{}",
        m.transcript()
    );
    m.assert_no_hyp_fault();
}

#[test]
fn console_script_runs_and_bad_commands_get_errors() {
    let cfg = MachineConfig {
        script: Some("help; vms; stats; frobnicate; pause 99; destroy x".into()),
        ..config(2, "cortex-a72", "selftest mem=8")
    };
    let mut m = Machine::boot("script", &cfg);
    // Guest output and script output interleave freely: check the whole
    // transcript once the machine is done.
    let status = m.wait_exit(SELFTEST);
    let t = m.transcript();
    for needle in [
        "hyp> help",
        "commands:",
        "hyp> vms",
        "frames:",
        "error: unknown command 'frobnicate'",
        "error: no VM 99",
        "error: 'x' is not a VM id",
        "GUEST RESULT: PASS",
    ] {
        assert!(t.contains(needle), "missing {needle:?}\n{t}");
    }
    assert_eq!(status, 0, "{t}");
}
