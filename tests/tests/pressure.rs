//! QEMU scenarios that put the hypervisor's own paths under pressure: the
//! UART register image across snapshot/restore cycles, and snapshots until
//! the hypervisor runs out of something (issue 12, items 1 and 11).

use qemu_tests::{Machine, MachineConfig};
use std::time::Duration;

const T: Duration = Duration::from_secs(180);

/// A churner VM forks short-lived children (stage-2 table pages come and go
/// on the other CPU) while the VM restores itself 200 times, checking after
/// each that the UART page reads as its own register image. Before the fix a
/// restore freed the image frame the read-only entry at 0x0900_0000 still
/// mapped: checked against 1447395, round 2 read IMSC as 0x4440777f, a
/// stage-2 descriptor of another VM's table.
#[test]
fn uart_image_stays_the_vms_own_across_restores() {
    let cfg = MachineConfig {
        smp: 2,
        vcpus: Some(1),
        guest_args: Some("uartimage cycles=200".into()),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("uartimage", &cfg);
    m.expect("200 restores, the UART page was always its own", T);
    m.expect("GUEST RESULT: PASS", T);
    assert_eq!(m.wait_exit(T), 0);
    m.assert_no_hyp_fault();
    let t = m.transcript();
    assert!(!t.contains("UART image not"), "{t}");
}

/// Snapshots until the hypervisor refuses: frames, rmap pools or the heap
/// reserve run out (snapshots hold no VMID, so VMIDs never do). Every
/// refusal is SMCCC_NO_MEMORY, never a hypervisor abort, and the VM keeps
/// running after it.
#[test]
fn snapshots_until_refused_end_in_an_error_code() {
    let cfg = MachineConfig {
        smp: 2,
        mem: "512M".into(),
        cpu: "max".into(),
        vcpus: Some(1),
        guest_mem: Some("64M".into()),
        guest_args: Some("snapflood".into()),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("snapflood", &cfg);
    let seen = m.expect("snapflood: still running after the refusal", T);
    println!(
        "{}",
        seen.lines()
            .rfind(|l| l.contains("snapflood:"))
            .unwrap_or("")
    );
    m.expect("GUEST RESULT: PASS", T);
    assert_eq!(m.wait_exit(T), 0);
    m.assert_no_hyp_fault();
    let t = m.transcript();
    assert!(!t.contains("panicked"), "{t}");
}
