//! `bench linux`'s anchor for the CoW fault (issue 18): the hypervisor's
//! stage-2 CoW write fault, from the test guest's `cowbench`, over Linux's
//! own stage-1 CoW write fault, timed by linuxbench's `/bin/cowbench` inside
//! the Linux guest under the same release hypervisor on the same QEMU.
//!
//! This machine is shared and its speed swings, so the two run in pairs,
//! back to back, and the summary is the median of the per-pair ratios with
//! their min and max. Each pair boots Linux afresh (a few seconds under
//! TCG), runs `cowbench` in its shell, stops that QEMU, and then boots the
//! test guest: nothing else of ours runs while either side measures.

use std::path::Path;
use std::time::Duration;

use qemu_tests::{Machine, MachineConfig};

/// Boot to the shell prompt on a loaded machine, and cowbench's own run.
const TIMEOUT: Duration = Duration::from_secs(300);

/// The ns/page after `CoW write fault ` in either program's result line.
fn cow_ns(line: &str) -> Result<u64, String> {
    qemu_tests::number_after(line, "CoW write fault ")
        .filter(|&ns| ns > 0)
        .ok_or_else(|| format!("no CoW figure in {line:?}"))
}

/// The Linux guest's configuration: one vCPU, like the test guest's run.
fn linux_config(linux: &crate::linux::LinuxImages) -> MachineConfig {
    MachineConfig {
        guest: "linux".into(),
        vcpus: Some(1),
        linux: Some((linux.kernel.clone(), linux.initrd.clone())),
        ..MachineConfig::default()
    }
}

/// Boots Linux under `hyp`, runs `/bin/cowbench` in its shell and returns
/// its warm-up and result lines (`cowbench-linux: ...`, the one measured);
/// the machine is then stopped.
fn linux_run(hyp: &Path, cfg: &MachineConfig) -> Result<(String, String), String> {
    let mut m = Machine::spawn("bench-anchor", &mut cfg.command(hyp));
    let fail = |m: &Machine, e: String| format!("{e}\n{}", m.transcript());
    m.try_expect("MHV-LINUX-READY", TIMEOUT)
        .and_then(|_| m.try_expect("# ", TIMEOUT))
        .map_err(|e| fail(&m, e))?;
    // The typed line's echo is "cowbench": only the result has the colon.
    m.send("cowbench\n");
    let warm_up = m
        .try_expect("cowbench-linux warm-up: ", TIMEOUT)
        .and_then(|_| m.try_expect("\n", TIMEOUT))
        .map(|rest| format!("cowbench-linux warm-up: {}", rest.trim()))
        .map_err(|e| fail(&m, e))?;
    let line = m
        .try_expect("cowbench-linux: ", TIMEOUT)
        .and_then(|_| m.try_expect("\n", TIMEOUT))
        .map(|rest| format!("cowbench-linux: {}", rest.trim()))
        .map_err(|e| fail(&m, e))?;
    if m.transcript().contains("*** HYPERVISOR") {
        return Err(fail(&m, "the hypervisor faulted".into()));
    }
    Ok((warm_up, line))
}

/// The test guest's `cowbench` under `hyp` (one vCPU, as `bench guest`).
fn guest_run(images: &crate::build::Images) -> Result<String, String> {
    let cfg = MachineConfig {
        vcpus: Some(1),
        guest_args: Some("cowbench".into()),
        ..MachineConfig::default()
    };
    let (text, lines) = crate::captured_lines(&cfg, images, &["GUEST: cowbench:"])?;
    match lines.first() {
        Some(line) if text.contains("GUEST RESULT: PASS") => Ok(line.clone()),
        _ => Err(format!("guest cowbench did not complete:\n{text}")),
    }
}

/// The middle of the sorted ratios (the upper one of an even count), with
/// the smallest and the largest.
fn median_min_max(ratios: &[f64]) -> (f64, f64, f64) {
    let mut sorted = ratios.to_vec();
    sorted.sort_by(f64::total_cmp);
    (
        sorted[sorted.len() / 2],
        sorted[0],
        sorted[sorted.len() - 1],
    )
}

/// `pairs` interleaved pairs of Linux's cowbench and the test guest's; the
/// raw lines, each pair's ratio and their median, min and max.
pub fn bench(images: &crate::build::Images, pairs: usize) -> Result<(), String> {
    let cfg = linux_config(&crate::linux::ensure()?);
    println!("\nstage-2 CoW fault vs Linux's own CoW fault in the Linux guest (release hypervisor, QEMU TCG, cortex-a72, -smp 2, 1 vCPU each; {pairs} pairs, each booting Linux):");
    let mut ratios = Vec::new();
    for pair in 1..=pairs {
        let (warm_up, linux) = linux_run(&images.hyp, &cfg)?;
        let guest = guest_run(images)?;
        let ratio = cow_ns(&guest)? as f64 / cow_ns(&linux)? as f64;
        println!("  pair {pair}: {warm_up}");
        println!("  pair {pair}: {linux}");
        println!("  pair {pair}: {guest}");
        println!("  pair {pair}: stage-2 CoW / Linux CoW = {ratio:.2}");
        ratios.push(ratio);
    }
    let (median, min, max) = median_min_max(&ratios);
    println!("stage-2 CoW / Linux CoW = {median:.2} (median of {pairs} pairs; min {min:.2}, max {max:.2})");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_programs_lines_give_their_cow_figure() {
        let linux = "cowbench-linux: 4096 pages: CoW write fault 17250 ns/page, private write 90 ns/page, 4 KiB copy 3100 ns";
        assert_eq!(cow_ns(linux), Ok(17250));
        let guest = "GUEST: cowbench: 128 pages: CoW write fault 42600 ns/page, private write 80 ns/page, 4 KiB copy 3000 ns, trap 2800 ns; CoW / (copy + trap) = 7.34";
        assert_eq!(cow_ns(guest), Ok(42600));
        assert!(cow_ns("cowbench-linux: 4096 pages: CoW write fault 0 ns/page").is_err());
        assert!(cow_ns("cowbench: Cannot allocate memory").is_err());
    }

    #[test]
    fn the_summary_is_the_median_of_the_pairs_with_min_and_max() {
        assert_eq!(median_min_max(&[2.5, 0.9, 3.1, 2.0, 2.2]), (2.2, 0.9, 3.1));
        assert_eq!(median_min_max(&[1.0]), (1.0, 1.0, 1.0));
    }
}
