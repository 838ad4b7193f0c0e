//! Same-page merging across independently booted VMs (issue 16): four Linux
//! VMs booted each on its own, put in one trust group, merged by `merge`;
//! every shell still answers for itself, writes unmerge only the writer's
//! pages, the background merger (`merge auto`) merges pages that became
//! identical later, and destroying the VMs releases every merged frame.

use qemu_tests::api::{socket_path, ApiClient};
use qemu_tests::{linux_config, Machine, MachineConfig};
use serde_json::json;
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(480);
const REPLY: Duration = Duration::from_secs(60);
/// A whole pass over 4 x 256 MiB under TCG on a loaded machine.
const PASS: Duration = Duration::from_secs(300);
const HYP: &str = "\x01h";

fn to_vm(vm: u64) -> String {
    format!("\x01{vm}\r")
}

/// Has `vm`'s shell run `line` and checks it printed `expect`.
fn shell(m: &mut Machine, vm: u64, line: &str, expect: &str) {
    m.send(&to_vm(vm));
    m.expect(&format!("[console: vm {vm}]"), REPLY);
    m.send(&format!("{line}\n"));
    m.expect(&format!("[vm{vm}] {expect}"), REPLY);
}

fn stat(c: &mut ApiClient, key: &str) -> u64 {
    let s = c.stats(REPLY).expect("stats");
    s[key].as_u64().unwrap_or_else(|| panic!("no {key} in {s}"))
}

#[test]
fn four_independent_linux_vms_merge_and_stay_apart() {
    let sock = socket_path("merge4");
    let cfg = MachineConfig {
        vms: Some(4),
        // 128 MiB each keeps a pass short under TCG; `cargo xtask bench
        // merge` measures 256 MiB VMs.
        guest_mem: Some("128M".into()),
        vcpus: Some(1),
        api: Some(sock.clone()),
        ..linux_config()
    };
    let started = Instant::now();
    let mut m = Machine::boot("merge4", &cfg);
    for _ in 1..=4 {
        m.expect("MHV-LINUX-READY", BOOT);
    }
    std::thread::sleep(Duration::from_secs(2));
    for vm in 1..=4 {
        let line = format!("echo vm{vm} > /tmp/who; echo tag-$((1+{vm}))");
        shell(&mut m, vm, &line, &format!("tag-{}", 1 + vm));
    }
    m.send(HYP);
    m.expect("[console: hypervisor]", REPLY);
    let mut c = ApiClient::connect(&sock, REPLY).expect("connect");
    for vm in 2..=4 {
        let g = json!({"op": "group", "vm": vm, "group": 1});
        c.call("merge", g, REPLY).expect("merge group");
    }
    let before = stat(&mut c, "frames_used");
    let t = Instant::now();
    let pass = c.call("merge", json!({}), PASS).expect("merge");
    println!("merge4: one merge pass took {:?}: {pass}", t.elapsed());
    let merged = pass["merged"].as_u64().unwrap();
    let after = stat(&mut c, "frames_used");
    println!("merge4: frames used {before} -> {after} ({merged} pages merged)");
    assert!(merged > 1000, "four identical kernels share pages: {pass}");
    assert!(after < before, "{before} -> {after}");
    assert!(stat(&mut c, "merged_saved") > 0);
    // Untouched pages of first-touch blocks and zeroed guest pages map the
    // shared zero page instead.
    let zero = pass["zero"].as_u64().unwrap();
    println!("merge4: {zero} pages to the zero page");
    assert!(zero > 0, "all-zero pages go to the zero page: {pass}");
    assert!(stat(&mut c, "merged_zero") >= zero);

    // Each VM still answers for itself, and its writes stay its own.
    for vm in [3, 1, 4, 2] {
        let line = format!("echo ans-$(({vm}*7))-$(cat /tmp/who)");
        shell(&mut m, vm, &line, &format!("ans-{}-vm{vm}", vm * 7));
    }

    // Pages that become identical later: the background merger finds them.
    let saved = stat(&mut c, "merged_saved");
    for vm in [1, 2] {
        let line = "yes merge-me | head -c 4194304 > /tmp/same; echo wrote-$((40+2))";
        shell(&mut m, vm, line, "wrote-42");
    }
    m.send(HYP);
    m.expect("[console: hypervisor]", REPLY);
    c.call("merge auto", json!({"rate": 200000}), REPLY)
        .expect("merge auto");
    // Two whole rounds after the writes see the files unchanged; a third
    // is slack for a round that started before them.
    let rounds = stat(&mut c, "merge_rounds");
    let deadline = Instant::now() + PASS * 2;
    while stat(&mut c, "merged_saved") < saved + 512
        && stat(&mut c, "merge_rounds") < rounds + 3
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_secs(2));
    }
    let later = stat(&mut c, "merged_saved");
    println!(
        "merge4: background merging: saved {saved} -> {later} in {} rounds",
        stat(&mut c, "merge_rounds") - rounds
    );
    c.call("merge off", json!({}), REPLY).expect("merge off");
    assert!(
        later >= saved + 512,
        "the 4 MiB files merged: {saved} -> {later}"
    );
    // Both files still read back as written.
    for vm in [1, 2] {
        // 4 MiB of "merge-me\n": 466,033 whole lines.
        let line = "echo n-$(grep -c merge-me /tmp/same)";
        shell(&mut m, vm, line, "n-466033");
    }
    m.send(HYP);
    m.expect("[console: hypervisor]", REPLY);

    // Destroying every VM drops every merged frame.
    for vm in 1..=4 {
        c.call("destroy", json!({"vm": vm}), REPLY)
            .expect("destroy");
    }
    let deadline = Instant::now() + REPLY;
    while stat(&mut c, "merged_frames") != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(stat(&mut c, "merged_frames"), 0);
    assert_eq!(stat(&mut c, "merged_mappings"), 0);
    m.assert_no_hyp_fault();
    println!("merge4: done in {:?}", started.elapsed());
}
