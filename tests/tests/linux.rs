//! QEMU scenarios with an unmodified Debian arm64 kernel and a busybox
//! initramfs as the guest (images from `cargo xtask test`, MHV_LINUX_DIR):
//! SMP boot to init, an interactive shell on the emulated PL011 (receive
//! interrupts through the vGIC), and a clean power-off through PSCI.

use qemu_tests::{linux_config, Machine, MachineConfig};
use std::time::Duration;

/// TCG boots the Debian kernel in 10-30 s; leave room for a loaded machine.
const BOOT: Duration = Duration::from_secs(240);
const REPLY: Duration = Duration::from_secs(60);

#[test]
fn linux_boots_smp_runs_shell_commands_and_powers_off() {
    let mut m = Machine::boot("linux", &linux_config());
    m.expect("Booting Linux on physical CPU", BOOT);
    m.expect("GICv3: CPU1: found redistributor 1", BOOT);
    m.expect("smp: Brought up 1 node, 2 CPUs", BOOT);
    m.expect("MHV-LINUX-READY", BOOT);
    m.expect("cpus=2", REPLY);
    m.expect("# ", BOOT);

    m.send("echo answer=$((6*7))\n");
    m.expect("answer=42", REPLY);
    m.send("cat /proc/cpuinfo | grep -c processor\n");
    m.expect("\n2", REPLY);
    // Timer interrupts reach both vCPUs (each one's count is non-zero).
    m.send("grep arch_timer /proc/interrupts\n");
    m.expect("arch_timer", REPLY);

    m.send("poweroff -f\n");
    m.expect("powered off (PSCI SYSTEM_OFF)", REPLY);
    let status = m.wait_exit(REPLY);
    m.assert_no_hyp_fault();
    assert_eq!(status, 0, "exit status\n{}", m.transcript());
}

#[test]
fn linux_guest_command_line_can_be_overridden() {
    let cfg = MachineConfig {
        guest_args: Some("console=ttyAMA0 rdinit=/init quiet mhv.test=hello,world".into()),
        ..linux_config()
    };
    let mut m = Machine::boot("linux-args", &cfg);
    m.expect("MHV-LINUX-READY", BOOT);
    m.send("cat /proc/cmdline\n");
    m.expect("mhv.test=hello,world", REPLY);
    m.send("poweroff -f\n");
    assert_eq!(m.wait_exit(REPLY), 0, "exit status\n{}", m.transcript());
    m.assert_no_hyp_fault();
}

/// Ctrl-A Ctrl-A: the keyboard goes to the next console (hypervisor -> vm 1
/// -> ... -> hypervisor).
const NEXT: &str = "\x01\x01";
/// Ctrl-A h: the keyboard goes to the hypervisor.
const HYP: &str = "\x01h";

/// Ctrl-A <vm> Enter: the keyboard goes to that VM.
fn to_vm(vm: u32) -> String {
    format!("\x01{vm}\r")
}

#[test]
fn linux_fork_running_vm_both_shells_diverge() {
    let mut m = Machine::boot("linux-fork", &linux_config());
    m.expect("MHV-LINUX-READY", BOOT);
    m.expect("# ", BOOT);
    m.send("echo parent > /tmp/who; echo stored=$(cat /tmp/who)\n");
    m.expect("stored=parent", REPLY);
    // Input focus: vm 1 -> hypervisor console.
    m.send(HYP);
    m.expect("[console: hypervisor]", REPLY);
    m.send("fork 1\n");
    m.expect("vm 1 forked: child vm 2", REPLY);
    // Straight to vm 2 by number.
    m.send(&to_vm(2));
    m.expect("[console: vm 2]", REPLY);
    m.send("hostname child; echo child > /tmp/who; echo C=$(hostname)/$(cat /tmp/who)\n");
    m.expect("[vm2] C=child/child", REPLY);
    // A VM that does not exist leaves the keyboard where it is.
    m.send(&to_vm(99));
    m.expect("[console: no vm 99; the keyboard stays with vm 2]", REPLY);
    // Ctrl-A a types a literal Ctrl-A into the guest.
    m.send("read -r x; echo got-$(printf '%s' \"$x\" | od -An -tx1 | tr -d ' ')\n");
    m.send("\x01a\n");
    m.expect("[vm2] got-01", REPLY);
    // vm 2 -> hypervisor -> (`console 1`) vm 1.
    m.send(HYP);
    m.expect("[console: hypervisor]", REPLY);
    m.send("console 1\n");
    m.expect("[console: vm 1]", REPLY);
    m.send("echo P=$(hostname)/$(cat /tmp/who)\n");
    m.expect("[vm1] P=mhv-linux/parent", REPLY);
    m.send("poweroff -f\n");
    m.expect("vm 1 (linux) stopped", REPLY);
    // The focus was on vm 1, which is gone: the next VM is vm 2.
    m.send(NEXT);
    m.expect("[console: vm 2]", REPLY);
    m.send("echo again=$((40+2))\n");
    m.expect("[vm2] again=42", REPLY);
    m.assert_no_hyp_fault();
    println!("{}", m.transcript());
}

#[test]
fn linux_eight_forks_of_an_idle_vm_in_1g_all_answer() {
    // 1 GiB of host RAM, 256 MiB guests: nine of them fit only by sharing.
    let cfg = MachineConfig {
        mem: "1G".into(),
        ..linux_config()
    };
    let mut m = Machine::boot("linux-fork8", &cfg);
    m.expect("MHV-LINUX-READY", BOOT);
    m.expect("# ", BOOT);
    m.send(HYP);
    m.expect("[console: hypervisor]", REPLY);
    m.send("fork 1 8\n");
    m.expect("vm 1 forked: child vm 9", REPLY);
    // Let them all idle for a while, then ask each one (focus: hyp -> vm 1 -> ... -> vm 9).
    std::thread::sleep(Duration::from_secs(3));
    for vm in 1..=9 {
        m.send(NEXT);
        m.expect(&format!("[console: vm {vm}]"), REPLY);
        m.send(&format!(
            "hostname vm{vm}; echo ok-$(hostname)-$(({vm}*7))\n"
        ));
        m.expect(&format!("[vm{vm}] ok-vm{vm}-{}", vm * 7), REPLY);
    }
    m.send(HYP);
    m.expect("[console: hypervisor]", REPLY);
    m.send("vms\n");
    m.expect("hyp> ", REPLY);
    m.send("stats\n");
    m.expect("vms: 9", REPLY);
    m.assert_no_hyp_fault();
    println!("{}", m.transcript());
}

/// Migrate, evacuate and reclaim under a running Linux: a checksum of a large
/// tmpfs file taken by the guest before must match the one after.
#[test]
fn linux_tmpfs_file_survives_migrate_evacuate_reclaim() {
    let mut m = Machine::boot("linux-memctl", &linux_config());
    m.expect("MHV-LINUX-READY", BOOT);
    m.expect("# ", BOOT);
    // Markers are computed by the shell, so the echo of the typed line never
    // matches them.
    m.send("dd if=/dev/urandom of=/tmp/big bs=1M count=24 2>/dev/null; md5sum /tmp/big | cut -c1-32 > /tmp/sum; echo SUM-$((2*3))-$(cat /tmp/sum)\n");
    m.expect("SUM-6-", REPLY);
    m.send(HYP);
    m.expect("[console: hypervisor]", REPLY);
    m.send("migrate 1 0x40000000 0x50000000\n");
    m.expect("migrate vm 1", REPLY);
    m.send("evacuate 0x48000000 0x4a000000\n");
    m.expect("evacuate 0x48000000", REPLY);
    m.send("reclaim 20000\n");
    m.expect("reclaim: reclaimed", REPLY);
    m.send("online 0x48000000 0x4a000000\n");
    m.expect("online 0x48000000", REPLY);
    m.send(NEXT);
    m.expect("[console: vm 1]", REPLY);
    m.send("[ \"$(md5sum /tmp/big | cut -c1-32)\" = \"$(cat /tmp/sum)\" ] && echo CHECK-$((3*4))-same || echo CHECK-$((3*4))-DIFFERENT\n");
    m.expect("CHECK-12-", REPLY);
    let verdict = m.expect("\n", REPLY);
    assert!(
        verdict.starts_with("same"),
        "checksum changed: {verdict:?}\n{}",
        m.transcript()
    );
    m.send("echo answer=$((6*7))\n");
    m.expect("answer=42", REPLY);
    m.send("poweroff -f\n");
    assert_eq!(m.wait_exit(REPLY), 0);
    m.assert_no_hyp_fault();
    println!("{}", m.transcript());
}
