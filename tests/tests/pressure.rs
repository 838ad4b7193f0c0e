//! QEMU scenarios that put the hypervisor's own paths under pressure: a
//! teardown with no free frame left, and the UART register image across
//! snapshot/restore cycles (issue 12, items 1 and 4).

use qemu_tests::{Machine, MachineConfig};
use std::time::Duration;

const T: Duration = Duration::from_secs(180);

/// A fork child that shares every 2 MiB block of its parent exits while the
/// parent's copy-on-write copies have used the host's frames up. Its
/// teardown frees nothing (every frame is still the parent's) and, before
/// blocks were zapped whole, had to split each block with a table page it
/// could not get: a hypervisor panic ("stage-2 locked").
#[test]
fn teardown_of_a_child_sharing_every_block_needs_no_memory() {
    let cfg = MachineConfig {
        smp: 2,
        mem: "640M".into(),
        vcpus: Some(1),
        guest_mem: Some("432M".into()),
        guest_args: Some("zapfull mb=400".into()),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("zapfull", &cfg);
    m.expect("zapfull: filled 400 MiB", T);
    m.expect("zapfull: child exits", T);
    m.expect("(fork) stopped, status 0", T);
    // The parent ran out of frames (paused) or finished; either way the
    // machine is alive and answers.
    m.send("vms\n");
    m.expect("id  name", Duration::from_secs(30));
    m.assert_no_hyp_fault();
    let t = m.transcript();
    assert!(!t.contains("panicked"), "{t}");
}

/// Each round writes a UART register, lets a child take fresh frames, reads
/// the whole UART page, and restores. Before the fix a restore freed the
/// register-image frame that the read-only entry at 0x0900_0000 still
/// mapped, so the page could show a stale image or another owner's data.
#[test]
fn uart_image_stays_the_vms_own_across_restores() {
    let cfg = MachineConfig {
        smp: 2,
        vcpus: Some(1),
        guest_args: Some("uartimage cycles=40".into()),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("uartimage", &cfg);
    m.expect("40 restores, the UART page was always its own", T);
    m.expect("GUEST RESULT: PASS", T);
    assert_eq!(m.wait_exit(T), 0);
    m.assert_no_hyp_fault();
    let t = m.transcript();
    assert!(!t.contains("UART image not"), "{t}");
}
