//! vCPUs that wait for an interrupt while sharing physical CPUs: an idle
//! one sleeps in the run queue (no exits while it waits), and wakes on time
//! for its timer and for input, even while other vCPUs keep every CPU busy.
//! Debian's Linux on 2 vCPUs, forked once: four vCPUs on QEMU's two CPUs.

use qemu_tests::{linux_config, Machine};
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(240);
const REPLY: Duration = Duration::from_secs(60);
/// Ctrl-A h: the keyboard goes to the hypervisor.
const HYP: &str = "\x01h";

/// Ctrl-A <vm> Enter: the keyboard goes to that VM.
fn to_vm(m: &mut Machine, vm: u32) {
    m.send(&format!("\x01{vm}\r"));
    m.expect(&format!("[console: vm {vm}]"), REPLY);
}

/// The `exits` column of each VM's row in `vms` (the hypervisor console has
/// the keyboard): (id, exits) pairs.
fn exits(m: &mut Machine) -> Vec<(u32, u64)> {
    m.send("vms\n");
    let text = m.expect("hyp> ", REPLY);
    text.lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let id = cols.first()?.parse().ok()?;
            let exits = cols.last()?.parse().ok()?;
            (cols.len() >= 8).then_some((id, exits))
        })
        .collect()
}

/// Exits per second per vCPU of VMs 1 and 2 over `secs` of idling.
fn idle_rate(m: &mut Machine, secs: u64) -> f64 {
    let before = exits(m);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let after = exits(m);
    let elapsed = t0.elapsed().as_secs_f64();
    let total = |v: &[(u32, u64)]| -> u64 {
        v.iter()
            .filter(|(id, _)| *id == 1 || *id == 2)
            .map(|(_, n)| n)
            .sum()
    };
    assert_eq!(after.len(), 2, "two VMs in `vms`: {after:?}");
    (total(&after) - total(&before)) as f64 / elapsed / 4.0
}

#[test]
fn idle_vcpus_sharing_cpus_sleep_and_wake_on_time() {
    let mut m = Machine::boot("idle-sleep", &linux_config());
    m.expect("MHV-LINUX-READY", BOOT);
    m.expect("# ", BOOT);
    m.send(HYP);
    m.expect("[console: hypervisor]", REPLY);
    m.command("fork 1", "vm 1 forked: child vm 2", REPLY);
    m.expect("hyp> ", REPLY);
    // Both Linuxes idle: four vCPUs on two CPUs, each waiting in WFI. One
    // that handed the CPU to another at every WFI exited thousands of times
    // a second; asleep, a vCPU exits only for its timer ticks and IPIs.
    std::thread::sleep(Duration::from_secs(3));
    let rate = idle_rate(&mut m, 5);
    println!("idle: {rate:.0} exits per second per vCPU");
    assert!(
        rate < 400.0,
        "idle vCPUs exited {rate:.0} times a second each\n{}",
        m.transcript()
    );
    // vm 1 keeps both CPUs busy; vm 2's shell sleeps ten times 0.2 s. Each
    // time its vCPU sleeps in the run queue and must be woken at its timer's
    // deadline (a vCPU woken only by the 1 s cap takes 10 s), and the typed
    // line must wake it too.
    to_vm(&mut m, 1);
    m.send("(while :; do :; done) & (while :; do :; done) & echo spin=$((2*3))\n");
    m.expect("[vm1] spin=6", REPLY);
    to_vm(&mut m, 2);
    let t0 = Instant::now();
    m.send("for i in 1 2 3 4 5 6 7 8 9 10; do sleep 0.2; done; echo slept=$((5*2))\n");
    m.expect("[vm2] slept=10", REPLY);
    let took = t0.elapsed();
    println!("ten sleeps of 0.2 s beside two busy vCPUs: {took:?}");
    assert!(
        took < Duration::from_secs(6),
        "ten 0.2 s sleeps took {took:?}\n{}",
        m.transcript()
    );
    to_vm(&mut m, 1);
    m.send("kill %1 %2; echo ok=$((6*7))\n");
    m.expect("[vm1] ok=42", REPLY);
    m.assert_no_hyp_fault();
}
