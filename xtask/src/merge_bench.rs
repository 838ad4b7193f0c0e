//! `cargo xtask bench merge` (issue 16): first the merger's costs measured
//! inside the hypervisor (`bench merge` on its console: a scan pass next to
//! a memcmp of the same pages, a CoW fault on a merged
//! page next to one on a forked page, interleaved pairs); then host frames
//! used by four independently booted, idle 256 MiB Linux VMs before and
//! after one `merge` pass (goal: at most 0.5x), and the pass's scan rate.
//! Release hypervisor, the VMs in one trust group, driven over the control
//! channel.

use qemu_tests::api::{socket_path, ApiClient};
use qemu_tests::{Machine, MachineConfig};
use serde_json::json;
use std::path::Path;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(600);
const PASS: Duration = Duration::from_secs(600);
const REPLY: Duration = Duration::from_secs(60);
/// How long the VMs idle after their shells are up, before measuring.
const IDLE: Duration = Duration::from_secs(10);

/// The console script of [`costs`]: two sizes, so a per-page cost that
/// depends on the working set shows.
pub const COSTS_SCRIPT: &str = "bench merge 1024; bench merge 4096; quit";

/// `bench merge` on the release hypervisor's console; prints its lines
/// (`merge scan = N pages/s, memcmp = M pages/s, scan/memcmp = R` and
/// `merged CoW / forked CoW = R`).
pub fn costs(images: &crate::build::Images) -> Result<(), String> {
    crate::console_bench(
        images,
        "1G",
        COSTS_SCRIPT,
        &["bench merge:"],
        6,
        "merge scan vs memcmp, CoW on merged vs forked pages",
    )
}

fn used(c: &mut ApiClient) -> Result<u64, String> {
    let s = c.stats(REPLY)?;
    s["frames_used"]
        .as_u64()
        .ok_or_else(|| format!("no frames_used in {s}"))
}

/// Boots `vms=4`, idles, merges once; prints the table rows.
pub fn bench(hyp: &Path) -> Result<(), String> {
    let linux = crate::linux::ensure()?;
    let sock = socket_path("bench-merge");
    let cfg = MachineConfig {
        guest: "linux".into(),
        vms: Some(4),
        guest_mem: Some("256M".into()),
        vcpus: Some(1),
        api: Some(sock.clone()),
        linux: Some((linux.kernel.clone(), linux.initrd.clone())),
        ..MachineConfig::default()
    };
    let mut m = Machine::spawn("bench-merge", &mut cfg.command(hyp));
    for _ in 0..4 {
        m.try_expect("MHV-LINUX-READY", BOOT)?;
    }
    std::thread::sleep(IDLE);
    let mut c = ApiClient::connect(&sock, REPLY).map_err(|e| format!("api: {e}"))?;
    for vm in 2..=4 {
        let g = json!({"op": "group", "vm": vm, "group": 1});
        c.call("merge", g, REPLY)?;
    }
    let before = used(&mut c)?;
    let pass = c.call("merge", json!({}), PASS)?;
    let after = used(&mut c)?;
    let field = |k: &str| pass[k].as_u64().unwrap_or(0);
    let (scanned, us) = (field("scanned"), field("us").max(1));
    println!("\n| 4 idle Linux VMs, 256 MiB each, one group | host frames in use |");
    println!("|---|---:|");
    println!("| before `merge` | {before} |");
    println!("| after one `merge` (two rounds: first sight) | {after} |");
    println!(
        "| after / before | **{:.2}x** (goal <= 0.5x) |",
        after as f64 / before as f64
    );
    println!(
        "\nmerge pass: {scanned} pages scanned in {:.2} s ({:.0} pages/s), {} merged ({} into frames merged earlier in the pass)",
        us as f64 / 1e6,
        scanned as f64 * 1e6 / us as f64,
        field("merged"),
        field("stable_hits"),
    );
    m.assert_no_hyp_fault();
    Ok(())
}
