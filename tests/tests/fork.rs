//! QEMU scenarios for fork, snapshot/restore and destroy with copy-on-write
//! through the reverse map, driven by the test guest's hypercalls and by the
//! console.

use qemu_tests::api::{socket_path, ApiClient};
use qemu_tests::{Machine, MachineConfig};
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn guest(mode: &str) -> MachineConfig {
    MachineConfig {
        smp: 2,
        vcpus: Some(1),
        guest_args: Some(mode.into()),
        ..MachineConfig::default()
    }
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[test]
fn fork_tree_isolates_parents_and_children() {
    let mut m = Machine::boot("forktree", &guest("forktree depth=2 breadth=2"));
    let status = m.wait_exit(T);
    let t = m.transcript();
    m.assert_no_hyp_fault();
    assert_eq!(count(&t, "wrote its pattern"), 6, "six children\n{t}");
    assert_eq!(
        count(&t, "verified its own pattern"),
        7,
        "seven VMs verified\n{t}"
    );
    assert_eq!(count(&t, "GUEST RESULT: PASS"), 7, "{t}");
    assert_eq!(status, 0, "{t}");
}

#[test]
fn thousand_fork_destroy_cycles_return_to_baseline() {
    let mut m = Machine::boot("forkloop", &guest("forkloop cycles=1000"));
    m.expect("forkloop after 1000 cycles", Duration::from_secs(600));
    m.expect("GUEST RESULT: PASS", T);
    assert_eq!(m.wait_exit(T), 0);
    m.assert_no_hyp_fault();
}

#[test]
fn snapshot_restore_loop_sees_the_snapshot_again() {
    let mut m = Machine::boot("snapshot", &guest("snapshot cycles=200"));
    m.expect("200 restores of snapshot vm", T);
    m.expect("GUEST RESULT: PASS", T);
    assert_eq!(m.wait_exit(T), 0);
    m.assert_no_hyp_fault();
    // One vCPU that stays on its CPU: its CoW breaks and restores need no
    // broadcast invalidation.
    let (local, _) = tlb_flushes(&m.transcript());
    assert!(
        local > 0,
        "no invalidation stayed local\n{}",
        m.transcript()
    );
}

/// The hypervisor's last words: stage-2 invalidations (on one CPU, broadcast).
fn tlb_flushes(text: &str) -> (u64, u64) {
    let line = text
        .lines()
        .rfind(|l| l.contains("stage-2 TLB invalidations:"))
        .unwrap_or_else(|| panic!("no TLB invalidation count\n{text}"));
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    // "stage-2 TLB invalidations: N on one CPU, M broadcast" ('2' is the first number).
    (nums[1], nums[2])
}

#[test]
fn console_fork_of_a_running_smp_guest_and_bad_commands() {
    // The parent runs the SMP self-check; the console forks it twice while it
    // runs; all three VMs must pass on their own copies of memory.
    let cfg = MachineConfig {
        smp: 2,
        vcpus: Some(2),
        guest_args: Some("selftest mem=96".into()),
        script: Some(
            "fork 1 2; vms; stats; fork 99; restore 1 2; snapshot x; rmap 0x40000000".into(),
        ),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("console-fork", &cfg);
    m.expect("vm 1 forked: child vm 2", T);
    m.expect("vm 1 forked: child vm 3", T);
    m.expect("error: no VM 99", T);
    m.expect("error: that VM is not a snapshot", T);
    m.expect("error: 'x' is not a VM id", T);
    let status = m.wait_exit(Duration::from_secs(300));
    let t = m.transcript();
    m.assert_no_hyp_fault();
    assert_eq!(
        count(&t, "GUEST RESULT: PASS"),
        3,
        "parent and two children pass\n{t}"
    );
    assert_eq!(status, 0, "{t}");
    // Two vCPUs on two CPUs: forking them write-protects entries both CPUs
    // may cache, which only a broadcast invalidation reaches.
    let (_, broadcast) = tlb_flushes(&t);
    assert!(broadcast > 0, "no broadcast invalidation\n{t}");
}

#[test]
fn mem_release_returns_pages_and_refuses_bad_ranges() {
    let mut m = Machine::boot("release", &guest("release"));
    m.expect("GUEST: release: 256 pages returned", T);
    m.expect("GUEST RESULT: PASS", T);
    assert_eq!(m.wait_exit(T), 0);
    m.assert_no_hyp_fault();
}

#[test]
fn garbage_hypercalls_get_error_codes() {
    let cfg = MachineConfig {
        vcpus: Some(2),
        ..guest("badcalls")
    };
    let mut m = Machine::boot("badcalls", &cfg);
    m.expect("garbage hypercalls refused with the right codes", T);
    m.expect("GUEST RESULT: PASS", T);
    assert_eq!(m.wait_exit(T), 0);
    m.assert_no_hyp_fault();
}

/// `destroy` from the console while the VM is forking in a loop on one CPU,
/// and while two vCPUs fault in fresh memory: the hypervisor survives and
/// every frame comes back (only the 16-frame split reserve stays in use).
#[test]
fn destroy_while_forking_or_faulting() {
    for (name, vcpus, args) in [
        ("destroy-forking", 1, "forkloop cycles=100000"),
        ("destroy-faulting", 2, "selftest mem=160"),
    ] {
        let sock = socket_path(name);
        let cfg = MachineConfig {
            vcpus: Some(vcpus),
            guest_args: Some(args.into()),
            script: Some("sleep 300; destroy 1; wait 60".into()),
            api: Some(sock.clone()),
            ..MachineConfig::default()
        };
        let mut m = Machine::boot(name, &cfg);
        m.expect("hyp> destroy 1", T);
        m.expect("wait: no runnable VMs left", T);
        // The channel keeps the machine up after its last VM: ask it.
        let mut c = ApiClient::connect(&sock, T).expect("connect to the api socket");
        let s = c.stats(T).unwrap();
        let n = |k: &str| {
            s[k].as_u64()
                .unwrap_or_else(|| panic!("[{name}] no {k} in {s}"))
        };
        // Only the split reserve, what the heap grew by, the zero page and the
        // control channel's virtqueues stay in use.
        assert_eq!(
            n("frames_used"),
            n("split_reserve") + n("heap_frames") + n("dma_frames") + n("zero_page_frames"),
            "[{name}] frames leaked: {s}"
        );
        assert_eq!(n("frames_shared"), 0, "[{name}] {s}");
        c.send_line(r#"{"id":"q","cmd":"quit"}"#).unwrap();
        assert_eq!(m.wait_exit(T), 0, "{}", m.transcript());
        m.assert_no_hyp_fault();
    }
}
