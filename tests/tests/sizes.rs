//! QEMU scenarios at the machine sizes a user picks: 8 CPUs running Linux on
//! 8 vCPUs, a 64 GiB host (QEMU maps its RAM lazily, `reserve=off`) and a
//! 256 MiB one, each running the test guest and Linux. On 64 GiB the
//! hypervisor's metadata stays within 16 bytes per 4 KiB frame plus 0.1% of
//! RAM, as `stats` reports it over the control channel.

use qemu_tests::api::{socket_path, ApiClient};
use qemu_tests::{linux_config, Machine, MachineConfig};
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(120);
/// TCG boots the Debian kernel in 10-30 s; leave room for a loaded machine.
const LINUX: Duration = Duration::from_secs(240);
const REPLY: Duration = Duration::from_secs(60);

/// Boots the test guest's self-test on a `mem` host and, once it has
/// exited, reads `stats` over the control channel (which keeps the machine
/// up): (frame table bytes, heap bytes in use, RAM frames).
fn selftest_on(name: &str, mem: &str) -> (u64, u64, u64) {
    let sock = socket_path(name);
    let cfg = MachineConfig {
        mem: mem.into(),
        guest_mem: Some("64M".into()),
        guest_args: Some("selftest mem=16".into()),
        api: Some(sock.clone()),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot(name, &cfg);
    m.expect("GUEST RESULT: PASS", BOOT);
    m.expect("[hyp] vm 1 (test) stopped", BOOT);
    let mut c = ApiClient::connect(&sock, REPLY).expect("connect to the api socket");
    let s = c.stats(REPLY).unwrap();
    println!("[{name}] {s}");
    let n = |k: &str| {
        s[k].as_u64()
            .unwrap_or_else(|| panic!("[{name}] no {k} in {s}"))
    };
    let metadata = (n("frame_table_bytes"), n("heap_used"), n("ram_frames"));
    c.send_line(r#"{"id":"q","cmd":"quit"}"#).unwrap();
    let status = m.wait_exit(BOOT);
    m.assert_no_hyp_fault();
    assert_eq!(status, 0, "[{name}] exit status\n{}", m.transcript());
    let _ = std::fs::remove_file(&sock);
    metadata
}

#[test]
fn test_guest_on_a_64g_host_with_metadata_in_budget() {
    let (table, heap, frames) = selftest_on("64g-test", "64G");
    let line = format!("frame table {table}, heap {heap}, frames {frames}");
    assert!(frames > 16_000_000, "a 64 GiB host: {line}");
    assert!(table <= 16 * frames, "frame table over 16 B/frame: {line}");
    assert!(
        heap * 1000 <= frames * 4096,
        "heap over 0.1% of RAM: {line}"
    );
}

#[test]
fn test_guest_on_a_256m_host() {
    let (table, heap, frames) = selftest_on("256m-test", "256M");
    let line = format!("frame table {table}, heap {heap}, frames {frames}");
    assert!(frames <= 65_536, "a 256 MiB host: {line}");
    assert!(table <= 16 * frames, "frame table over 16 B/frame: {line}");
    assert!(
        heap * 1000 <= frames * 4096,
        "heap over 0.1% of RAM: {line}"
    );
}

/// Linux boots to its shell on a `mem` host with `guest_mem` of its own,
/// answers a command and powers off.
fn linux_on(name: &str, mem: &str, guest_mem: &str) {
    let cfg = MachineConfig {
        mem: mem.into(),
        guest_mem: Some(guest_mem.into()),
        ..linux_config()
    };
    let mut m = Machine::boot(name, &cfg);
    m.expect("MHV-LINUX-READY", LINUX);
    m.expect("# ", LINUX);
    m.send("echo answer=$((6*7)); grep MemTotal /proc/meminfo\n");
    m.expect("answer=42", REPLY);
    m.expect("MemTotal:", REPLY);
    m.send("poweroff -f\n");
    m.expect("powered off (PSCI SYSTEM_OFF)", REPLY);
    let status = m.wait_exit(REPLY);
    m.assert_no_hyp_fault();
    assert_eq!(status, 0, "[{name}] exit status\n{}", m.transcript());
}

#[test]
fn linux_on_a_64g_host() {
    linux_on("64g-linux", "64G", "1G");
}

#[test]
fn linux_on_a_256m_host() {
    linux_on("256m-linux", "256M", "128M");
}

#[test]
fn linux_on_eight_cpus_with_eight_vcpus() {
    let cfg = MachineConfig {
        smp: 8,
        vcpus: Some(8),
        ..linux_config()
    };
    let mut m = Machine::boot("8cpu-linux", &cfg);
    m.expect("8 CPU(s) online", BOOT);
    m.expect("smp: Brought up 1 node, 8 CPUs", LINUX);
    m.expect("MHV-LINUX-READY", LINUX);
    m.expect("# ", LINUX);
    m.send("grep -c processor /proc/cpuinfo\n");
    m.expect("\n8", REPLY);
    m.send("poweroff -f\n");
    m.expect("powered off (PSCI SYSTEM_OFF)", REPLY);
    let status = m.wait_exit(REPLY);
    m.assert_no_hyp_fault();
    assert_eq!(status, 0, "exit status\n{}", m.transcript());
}

#[test]
fn test_guest_on_twenty_cpus() {
    // More physical CPUs than one GICv3 affinity-0 group (QEMU virt puts 16
    // in a cluster): CPUs 16-19 have Aff1 = 1, so bring-up, redistributor
    // lookup and the kicks and SGIs that reach them are exercised. The test
    // guest runs at most 8 vCPUs; the scheduler spreads them over all CPUs.
    let cfg = MachineConfig {
        smp: 20,
        vcpus: Some(8),
        guest_args: Some("selftest mem=32".into()),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("20cpu-test", &cfg);
    m.expect("20 CPU(s) online", BOOT);
    m.expect("GUEST: 8 vcpus up", BOOT);
    m.expect("GUEST RESULT: PASS", LINUX);
    let status = m.wait_exit(BOOT);
    m.assert_no_hyp_fault();
    assert_eq!(status, 0, "exit status\n{}", m.transcript());
}
