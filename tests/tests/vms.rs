//! Independent VMs (issue 16): several VMs each loaded and booted on its own
//! (`vms=N`, `create linux|test` from the console and the control channel),
//! each with a working console, clear errors that stop nothing, and trust
//! groups (a fork family shares its root's, a VM created on its own gets a
//! fresh one, `merge group` moves a VM).

use qemu_tests::api::{socket_path, ApiClient};
use qemu_tests::{linux_config, Machine, MachineConfig};
use serde_json::json;
use std::time::{Duration, Instant};

/// TCG boots the Debian kernel in 10-30 s per VM; four share two host CPUs.
const BOOT: Duration = Duration::from_secs(480);
const REPLY: Duration = Duration::from_secs(60);
/// Ctrl-A h: the keyboard goes to the hypervisor.
const HYP: &str = "\x01h";

/// Ctrl-A <vm> Enter: the keyboard goes to that VM.
fn to_vm(vm: u64) -> String {
    format!("\x01{vm}\r")
}

/// Gives the keyboard to `vm` and checks its shell answers with something
/// only that VM knows (`/tmp/who`, written by its own shell, or its
/// parent's before a fork: `who`).
fn ask(m: &mut Machine, vm: u64, who: u64) {
    m.send(&to_vm(vm));
    m.expect(&format!("[console: vm {vm}]"), REPLY);
    // The marker is computed by the shell, so the echo of the line never matches.
    m.send(&format!("echo ans-$(({vm}*7))-$(cat /tmp/who)\n"));
    m.expect(&format!("[vm{vm}] ans-{}-vm{who}", vm * 7), REPLY);
}

/// Gives the keyboard to `vm` and has its shell remember who it is.
fn tag(m: &mut Machine, vm: u64) {
    m.send(&to_vm(vm));
    m.expect(&format!("[console: vm {vm}]"), REPLY);
    m.send(&format!("echo vm{vm} > /tmp/who; echo tag-$((1+{vm}))\n"));
    m.expect(&format!("[vm{vm}] tag-{}", 1 + vm), REPLY);
}

/// `vms` over the channel: each VM's id, name and trust group.
fn groups(c: &mut ApiClient) -> Vec<(u64, String, u64)> {
    let vms = c.call("vms", json!({}), REPLY).expect("vms");
    vms["vms"]
        .as_array()
        .expect("a list of VMs")
        .iter()
        .map(|v| {
            let name = v["name"].as_str().unwrap_or("").to_string();
            (
                v["id"].as_u64().unwrap(),
                name,
                v["group"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn group_of(list: &[(u64, String, u64)], vm: u64) -> u64 {
    list.iter()
        .find(|v| v.0 == vm)
        .unwrap_or_else(|| panic!("no vm {vm} in {list:?}"))
        .2
}

/// Four Linux VMs of 256 MiB from `vms=4`, each booted on its own: every
/// shell answers for itself; each VM is its own trust group; a fork and a
/// snapshot join their parent's; `merge group` moves a VM.
#[test]
fn four_independent_linux_vms_answer_and_keep_their_groups() {
    let sock = socket_path("vms4");
    let cfg = MachineConfig {
        vms: Some(4),
        guest_mem: Some("256M".into()),
        vcpus: Some(1),
        api: Some(sock.clone()),
        ..linux_config()
    };
    let started = Instant::now();
    let mut m = Machine::boot("vms4", &cfg);
    for vm in 1..=4 {
        m.expect(&format!("[hyp] vm {vm} (linux): 1 vCPUs, 256 MiB"), REPLY);
    }
    for _ in 1..=4 {
        m.expect("MHV-LINUX-READY", BOOT);
    }
    println!("vms4: four Linux VMs ready in {:?}", started.elapsed());
    // Give every shell time to print its prompt before typing at it.
    std::thread::sleep(Duration::from_secs(2));
    for vm in 1..=4 {
        tag(&mut m, vm);
    }
    for vm in [3, 1, 4, 2] {
        ask(&mut m, vm, vm);
    }
    println!("vms4: four shells answered at {:?}", started.elapsed());

    m.send(HYP);
    m.expect("[console: hypervisor]", REPLY);
    let mut c = ApiClient::connect(&sock, REPLY).expect("connect to the api socket");
    let before = groups(&mut c);
    let mut own: Vec<u64> = (1..=4).map(|vm| group_of(&before, vm)).collect();
    own.sort_unstable();
    own.dedup();
    assert_eq!(own.len(), 4, "independent VMs share a group: {before:?}");

    let fork = c.call("fork", json!({"vm": 1}), REPLY).expect("fork");
    let child = fork["children"][0].as_u64().expect("a child");
    let snap = c
        .call("snapshot", json!({"vm": 2}), REPLY)
        .expect("snapshot");
    let snap = snap["snapshots"][0].as_u64().expect("a snapshot");
    let moved = c
        .call(
            "merge",
            json!({"op": "group", "vm": 3, "group": group_of(&before, 1)}),
            REPLY,
        )
        .expect("merge group");
    assert_eq!(moved["group"], group_of(&before, 1), "{moved}");
    let after = groups(&mut c);
    assert_eq!(group_of(&after, child), group_of(&before, 1), "{after:?}");
    assert_eq!(group_of(&after, snap), group_of(&before, 2), "{after:?}");
    assert_eq!(group_of(&after, 3), group_of(&before, 1), "{after:?}");
    assert_eq!(group_of(&after, 4), group_of(&before, 4), "{after:?}");
    // The console shows the group too.
    m.send("vms\n");
    m.expect("group", REPLY);
    // A VM created now gets a group no VM has had.
    let made = c
        .call(
            "create",
            json!({"guest": "test", "vcpus": 1, "mem": 32, "cmdline": "idle beat_ms=1000"}),
            REPLY,
        )
        .expect("create test");
    let fresh = made["group"].as_u64().expect("a group");
    assert!(after.iter().all(|v| v.2 != fresh), "{fresh} in {after:?}");

    // The forked child has vm 1's memory; the shells still answer.
    ask(&mut m, child, 1);
    ask(&mut m, 4, 4);
    m.assert_no_hyp_fault();
    println!("{}", m.transcript());
    c.call("quit", json!({}), REPLY).ok();
    let _ = std::fs::remove_file(&sock);
    println!("vms4: done in {:?}", started.elapsed());
}

/// `create test` twice, from the console and from the control channel: both
/// guests run and report; `create linux` without loaded images is an error
/// that stops nothing.
#[test]
fn create_test_twice_from_console_and_api() {
    let sock = socket_path("vms-create-test");
    let cfg = MachineConfig {
        guest: "none".into(),
        api: Some(sock.clone()),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("vms-create-test", &cfg);
    m.expect("[hyp] no default guest", REPLY);
    let mut c = ApiClient::connect(&sock, REPLY).expect("connect to the api socket");
    m.send("\n");
    m.send("create test --vcpus 1 --mem 32 idle beat_ms=300\n");
    m.expect("vm 1 (test) created: 1 vCPUs, 32 MiB", REPLY);
    // One VM so far: its lines are not labelled yet.
    m.expect("GUEST: idle: heartbeat 2 ", REPLY);
    let made = c
        .call(
            "create",
            json!({"guest": "test", "vcpus": 2, "mem": 64, "cmdline": "selftest mem=8"}),
            REPLY,
        )
        .expect("create test over the api");
    assert_eq!(made["vm"], 2, "{made}");
    m.expect("[vm2] GUEST: 2 vcpus up", REPLY);
    m.expect("[vm2] GUEST RESULT: PASS", Duration::from_secs(240));
    m.expect("[hyp] vm 2 (test) stopped, status 0", REPLY);

    // No kernel was loaded: a clear error, and vm 1 keeps running.
    let err = c
        .call("create", json!({"guest": "linux"}), REPLY)
        .expect_err("no kernel");
    assert!(err.contains("no Linux kernel loaded"), "{err}");
    m.send("create linux\n");
    m.expect("error: bad VM configuration: no Linux kernel loaded", REPLY);
    let beats = m.expect("[vm1] GUEST: idle: heartbeat", REPLY);
    assert!(!beats.is_empty());
    let list = groups(&mut c);
    assert_eq!(list.len(), 1, "{list:?}");
    m.assert_no_hyp_fault();
    println!("{}", m.transcript());
    c.call("quit", json!({}), REPLY).ok();
    let _ = std::fs::remove_file(&sock);
}

/// A second Linux VM from `create linux` after boot has its own working
/// shell; an absurd `--mem` is an out-of-memory error and both keep running.
#[test]
fn create_linux_after_boot_and_refuse_absurd_memory() {
    let cfg = MachineConfig {
        vcpus: Some(1),
        ..linux_config()
    };
    let started = Instant::now();
    let mut m = Machine::boot("vms-create-linux", &cfg);
    m.expect("MHV-LINUX-READY", BOOT);
    m.expect("# ", BOOT);
    m.send("echo vm1 > /tmp/who\n");
    m.send(HYP);
    m.expect("[console: hypervisor]", REPLY);
    m.send(
        "create linux --mem 256 --vcpus 1 --cmdline console=ttyAMA0 rdinit=/init mhv.second=yes\n",
    );
    let made = m.expect("(linux) created: 1 vCPUs, 256 MiB", REPLY);
    assert!(made.contains("vm 2 (linux) created"), "{made}");
    m.expect("MHV-LINUX-READY", BOOT);
    println!("create linux: second VM ready at {:?}", started.elapsed());
    std::thread::sleep(Duration::from_secs(2));
    tag(&mut m, 2);
    m.send("grep -o 'mhv.second=[a-z]*' /proc/cmdline\n");
    m.expect("[vm2] mhv.second=yes", REPLY);

    m.send(HYP);
    m.expect("[console: hypervisor]", REPLY);
    m.send("create linux --mem 100000\n");
    m.expect(
        "error: out of memory: 100000 MiB of guest RAM asked for, ",
        REPLY,
    );
    // Too small for the kernel and initrd: the half-made VM 3 is gone again.
    m.send("create linux --mem 8\n");
    // Its teardown runs inside the failed create, before the error prints.
    m.expect("[hyp] vm 3 (linux) stopped, status 0", REPLY);
    m.expect("error: bad VM configuration: guest RAM is too small", REPLY);
    m.send("vms\n");
    let list = m.expect("hyp> ", REPLY);
    assert!(!list.contains("\n  3 "), "vm 3 is still listed:\n{list}");
    ask(&mut m, 1, 1);
    ask(&mut m, 2, 2);
    // Failed creates are errors, not guest failures: the machine ends well.
    m.send(HYP);
    m.expect("[console: hypervisor]", REPLY);
    m.send("quit\n");
    let status = m.wait_exit(REPLY);
    m.assert_no_hyp_fault();
    println!("{}", m.transcript());
    assert_eq!(status, 0, "exit status");
    println!("create linux: done in {:?}", started.elapsed());
}
