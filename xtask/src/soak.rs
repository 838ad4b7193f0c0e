//! `cargo xtask soak [minutes] [-- guest args]`: the `hvcfuzz` guest mode for
//! longer than the QEMU test does (release hypervisor, 4 vCPUs on 2 CPUs,
//! `chaos` on the console the whole time). Prints the seed, the counts and
//! every line that means a bug; the console goes to `target/soak/`.

use qemu_tests::hvcfuzz;
use qemu_tests::Machine;
use std::time::Duration;

pub fn soak(args: &[String]) -> Result<(), String> {
    let minutes: u64 = match args.first() {
        Some(m) => m
            .parse()
            .ok()
            .filter(|&m| m > 0)
            .ok_or(format!("soak: '{m}' is not a number of minutes"))?,
        None => 10,
    };
    // Switches for known hypervisor bugs (guest/src/modes/hvcfuzz/mod.rs).
    let extra = args.get(1..).unwrap_or_default().join(" ");
    crate::setup::ensure()?;
    let images = crate::build::images(true)?;
    let seed = hvcfuzz::seed();
    let secs = minutes * 60;
    let cfg = hvcfuzz::config(secs, seed, &extra);
    println!("xtask: soak: {minutes} min of hvcfuzz, seed {seed} {extra}");
    let mut m = Machine::spawn("soak", &mut cfg.command(&images.hyp));
    let status = m.wait_exit(Duration::from_secs(secs + 600));
    let text = m.transcript();
    let dir = crate::build::target_dir().join("soak");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let log = dir.join(format!("hvcfuzz-{seed}.log"));
    std::fs::write(&log, &text).map_err(|e| format!("{}: {e}", log.display()))?;
    let s = hvcfuzz::verdict(&text, status);
    println!(
        "xtask: soak: seed {seed}: root {} hypercalls, checker {} rounds, {} fuzz VMs ran out their time, {} checker clones; console in {}",
        s.root_calls.map_or("?".into(), |n| n.to_string()),
        s.checker_rounds.map_or("?".into(), |n| n.to_string()),
        s.children,
        s.checker_clones,
        log.display()
    );
    if s.problems.is_empty() {
        return Ok(());
    }
    s.problems.iter().for_each(|p| println!("  {p}"));
    Err(format!(
        "soak: seed {seed}: {} problem lines (replay: HVCFUZZ_SEED={seed} cargo xtask soak {minutes} {extra})",
        s.problems.len()
    ))
}
