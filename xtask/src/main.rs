//! `cargo xtask run|test|bench|build`: installs what is missing, builds the
//! guest and hypervisor images, and runs them under QEMU.
#![deny(
    missing_docs,
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks
)]

mod anchor;
mod build;
mod layers;
mod linux;
mod merge_bench;
mod mutants;
mod persist_bench;
mod profile;
mod qemu;
mod setup;
mod soak;

use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  run [--smp N] [--mem SIZE] [--cpu MODEL] [--guest linux|test|none] [--vcpus N] [--vms N]
      [--guest-mem SIZE] [--guest-args ARGS] [--script \"cmd; cmd\"] [--gdb] [--release]
      [--kernel IMAGE] [--initrd CPIO] [--cmdline ARGS] [--api SOCKET]
      [--disk FILE[,size=SIZE][,readonly]] [--restore NAME]
                 build everything and boot the hypervisor with a guest (default:
                 Debian's arm64 Linux with a busybox shell; --guest-args is its
                 kernel command line; --api serves the hypervisor's control
                 channel, one JSON object per line, on a unix socket; --disk
                 attaches FILE, a raw image, as the hypervisor's own virtio-blk
                 disk, creating it sparse at SIZE (default 1G) if missing;
                 --vms N boots N independent guests, each loaded on its own,
                 and grows --mem to hold them; --restore loads the snapshot NAME
                 saved on that disk instead of starting a guest)
  test           hyp's layer rule, clippy, host tests of every crate, then the
                 QEMU scenarios in tests/
  shuttle        only the shuttle runs of rmap and stage2 and their mutation checks
                 (part of test)
  bench [chain|fork|guest|migrate|linux|anchor|disk|merge|persist]...
                 benchmarks (results belong in docs/BENCHMARKS.md): all, or the named
                 ones (`linux`: Linux boot, bare QEMU against under the hypervisor,
                 forks of a running Linux, and the anchor; `anchor`: the stage-2
                 CoW fault over Linux's own CoW fault inside the Linux guest,
                 5 interleaved pairs; `disk`: the hypervisor's raw
                 virtio-blk throughput on a fresh sparse file in the temp dir;
                 `merge`: host frames of 4 idle Linux VMs before and after one
                 `merge` pass; `persist`: Linux saved to and restored from that disk)
  soak [minutes] [guest args]
                 the hvcfuzz guest (random hypercalls on 4 vCPUs, console chaos, a
                 checker VM) for minutes (default 10) on the release hypervisor;
                 HVCFUZZ_SEED=<n> replays a seed
  profile [cow|snapshot|fork|migrate|migrate100]
                 hypervisor instructions per copy-on-write fault (or per fuzzing
                 cycle), by function: two runs of the test guest under a QEMU TCG
                 plugin that counts instructions (deterministic, unlike time);
                 `fork`: per fork of 1 GiB and per 2 MiB block forked (console
                 `bench fork <MiB> <n>` at 1 GiB and 64 MiB, 1 and 11 forks);
                 `migrate[100]`: per page of block migration at 1 (100) mappers
  build          build the images only
  mutants [--shard k/n] [--re REGEX] [file...]
                 mutation score (cargo-mutants) of rmap's and stage2's core files, or
                 of the named ones, with the fast host tests (results belong in
                 docs/TESTING.md)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => qemu::run(&args[1..]),
        Some("test") => test(),
        Some("shuttle") => shuttle(),
        Some("bench") => bench(&args[1..]),
        Some("soak") => soak::soak(&args[1..]),
        Some("mutants") => mutants::mutants(&args[1..]),
        Some("profile") => profile::profile(&args[1..]),
        Some("build") => setup::ensure()
            .and_then(|_| build::images(false))
            .map(|_| ()),
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Everything that proves it works, cheapest first.
fn test() -> Result<(), String> {
    layers::check()?;
    setup::ensure()?;
    let images = build::images(false)?;
    build::clippy(&images)?;
    let linux = linux::ensure()?;
    let linux_dir = linux.kernel.parent().unwrap().to_str().unwrap().to_string();
    build::cargo(
        &[
            "test",
            "--workspace",
            "--exclude",
            "hyp",
            "--exclude",
            "guest",
            "--exclude",
            "qemu-tests",
        ],
        &[],
    )?;
    shuttle()?;
    // The VMID allocator's loom runs need its atomics swapped for loom's
    // (`--cfg loom`), in a target dir of their own so the flag does not
    // rebuild everything else.
    let loom_dir = build::target_dir().join("loom");
    build::cargo(
        &["test", "-p", "stage2", "--release", "--test", "vmid_loom"],
        &[
            ("RUSTFLAGS", "--cfg loom"),
            ("CARGO_TARGET_DIR", loom_dir.to_str().unwrap()),
        ],
    )?;
    build::cargo(
        &["test", "-p", "qemu-tests", "--", "--test-threads=1"],
        &[
            ("HYP_ELF", images.hyp.to_str().unwrap()),
            ("MHV_QEMU", "qemu-system-aarch64"),
            ("MHV_LINUX_DIR", &linux_dir),
        ],
    )?;
    println!("xtask: all tests passed");
    Ok(())
}

/// rmap's broken variants (`mutate-*` features of rmap/Cargo.toml) and the shuttle scenario
/// of `rmap/tests/shuttle_seeds.rs` that must catch each.
const MUTATIONS: [(&str, &str); 8] = [
    ("mutate-recycle-before-invalidate", "seed1"),
    ("mutate-lock-order", "seed2"),
    ("mutate-chain-head-insert", "seed3"),
    ("mutate-anon-vma-recheck", "seed4"),
    ("mutate-free-tables-before-unlink", "seed5"),
    ("mutate-copy-before-flush", "batch_flush"),
    ("mutate-swap-in-without-ref", "swap_release"),
    ("mutate-merge-without-recheck", "merge_race"),
];

/// rmap's real code under shuttle (`tests/shuttle_*.rs`, CI-sized; `RMAP_SHUTTLE_ITERS`
/// raises it), then each mutation with the scenario that must catch it (one build each).
fn shuttle() -> Result<(), String> {
    let manifest = std::fs::read_to_string(build::root().join("rmap/Cargo.toml"))
        .map_err(|e| format!("rmap/Cargo.toml: {e}"))?;
    let mut features = manifest
        .lines()
        .filter_map(|l| l.split_once(" = "))
        .filter(|(f, _)| f.starts_with("mutate-"));
    if let Some((f, _)) = features.find(|(f, _)| !MUTATIONS.iter().any(|(m, _)| m == f)) {
        return Err(format!(
            "rmap feature {f} has no shuttle scenario in xtask's MUTATIONS"
        ));
    }
    let tests = [
        "--test",
        "shuttle_seeds",
        "--test",
        "shuttle_stress",
        "--test",
        "shuttle_walker",
        "--test",
        "shuttle_blockmig",
    ];
    let mut args = vec!["test", "-p", "rmap", "--features", "shuttle"];
    build::cargo(&[&args[..], &tests].concat(), &[])?;
    for (feature, scenario) in MUTATIONS {
        args = vec!["test", "-p", "rmap", "--features", feature];
        build::cargo(
            &[&args[..], &["--test", "shuttle_seeds", scenario]].concat(),
            &[],
        )?;
    }
    // The walker scenario with reuse must catch the recheck's removal too.
    let args = [
        "test",
        "-p",
        "rmap",
        "--features",
        "mutate-anon-vma-recheck",
    ];
    build::cargo(
        &[&args[..], &["--test", "shuttle_walker", "walker_meets"]].concat(),
        &[],
    )?;
    // stage2's table code: break-before-make and lockless Access-flag updates, then its
    // broken variant, which must be caught (`should_panic` under that feature).
    for feature in ["shuttle", "mutate-bbm-blind-lock"] {
        let args = ["test", "-p", "stage2", "--features", feature];
        build::cargo(&[&args[..], &["--test", "shuttle_table"]].concat(), &[])?;
    }
    Ok(())
}

/// `bench [chain|fork|guest|migrate|linux|anchor|disk|merge]...`: all benchmarks, or only the named ones.
fn bench(args: &[String]) -> Result<(), String> {
    const ALL: [&str; 9] = [
        "chain", "fork", "guest", "migrate", "linux", "anchor", "disk", "merge", "persist",
    ];
    if let Some(bad) = args.iter().find(|a| !ALL.contains(&a.as_str())) {
        return Err(format!("bench: unknown benchmark '{bad}' (one of {ALL:?})"));
    }
    let wanted = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    setup::ensure()?;
    if wanted("chain") {
        build::cargo(&["bench", "-p", "rmap", "--bench", "anon_vma_chain"], &[])?;
    }
    let images = build::images(true)?;
    if wanted("fork") {
        fork_bench(&images)?;
    }
    if wanted("guest") {
        guest_bench(&images)?;
    }
    if wanted("migrate") {
        migrate_bench(&images)?;
    }
    if wanted("disk") {
        disk_bench(&images)?;
    }
    if wanted("persist") {
        persist_bench::bench(&images.hyp)?;
    }
    if wanted("linux") {
        linux::bench(&images.hyp, 5)?;
        linux::fork_bench(&images.hyp, 8, std::time::Duration::from_secs(5))?;
    }
    if wanted("linux") || wanted("anchor") {
        anchor::bench(&images, 5)?;
    }
    if wanted("merge") {
        merge_bench::costs(&images)?;
        merge_bench::bench(&images.hyp)?;
    }
    println!("xtask: record the tables above in docs/BENCHMARKS.md with this command");
    Ok(())
}

/// The console script of `migrate_bench`.
pub const MIGRATE_BENCH_SCRIPT: &str = "bench migrate 1 1024 1; bench migrate 1 1024 64; bench migrate 1 1024 512; bench migrate 10 1024 1; bench migrate 10 1024 64; bench migrate 10 1024 512; bench migrate 100 1024 1; bench migrate 100 1024 64; bench migrate 100 1024 512; bench migrate 1 1024 512 blocks; bench migrate 10 1024 512 blocks; bench migrate 100 1024 512 blocks; bench reclaim 2048 1; bench reclaim 2048 64; bench reclaim 2048 512";

/// Boots the release hypervisor with no guest, runs `script` on its console
/// and prints the `expected` result lines starting with one of `prefixes`.
fn console_bench(
    images: &build::Images,
    mem: &str,
    script: &str,
    prefixes: &[&str],
    expected: usize,
    title: &str,
) -> Result<(), String> {
    let cfg = qemu_tests::MachineConfig {
        mem: mem.into(),
        guest: "none".into(),
        script: Some(script.into()),
        ..Default::default()
    };
    let (text, lines) = captured_lines(&cfg, images, prefixes)?;
    if lines.len() != expected {
        return Err(format!("{title}: benchmark did not complete:\n{text}"));
    }
    println!("\n{title} (release hypervisor, QEMU TCG, cortex-a72, -smp 2):");
    lines.iter().for_each(|l| println!("  {l}"));
    Ok(())
}

/// Boots `cfg` to the end and returns its console output with the lines
/// that start with one of `prefixes` (a VM's `[vmN] ` label removed).
fn captured_lines(
    cfg: &qemu_tests::MachineConfig,
    images: &build::Images,
    prefixes: &[&str],
) -> Result<(String, Vec<String>), String> {
    let out = cfg
        .command(&images.hyp)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("qemu: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let unlabel = |l: &str| match l.strip_prefix("[vm") {
        Some(rest) => rest
            .split_once("] ")
            .map_or(l, |(_, line)| line)
            .to_string(),
        None => l.to_string(),
    };
    let lines = text
        .lines()
        .map(unlabel)
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
        .collect();
    Ok((text, lines))
}

/// Migration next to memcpy, reclaim next to LZ4 of the same frames, and
/// fault-in latency, measured inside the hypervisor in one run (`bench
/// migrate` / `bench reclaim` on its console).
fn migrate_bench(images: &build::Images) -> Result<(), String> {
    console_bench(
        images,
        "1G",
        MIGRATE_BENCH_SCRIPT,
        &["bench migrate:", "bench reclaim:"],
        12,
        "migration vs memcpy, reclaim vs lz4",
    )
}

/// The measurements the test guest makes of itself (release hypervisor,
/// one vCPU): CoW write fault next to a private write, a copy and a trap;
/// the restore rate; the host frames an idle fork costs.
fn guest_bench(images: &build::Images) -> Result<(), String> {
    let runs: [(&str, &[&str]); 3] = [
        ("cowbench", &["GUEST: cowbench:"]),
        ("snapshot cycles=300", &["GUEST: restore"]),
        ("forkmem", &["GUEST: forkmem: 8"]),
    ];
    println!("\nguest measurements (release hypervisor, QEMU TCG, cortex-a72, -smp 2, 1 vCPU):");
    for (args, prefixes) in runs {
        let cfg = qemu_tests::MachineConfig {
            vcpus: Some(1),
            guest_args: Some(args.into()),
            ..Default::default()
        };
        let (text, lines) = captured_lines(&cfg, images, prefixes)?;
        if lines.is_empty() || !text.contains("GUEST RESULT: PASS") {
            return Err(format!("guest bench '{args}' did not complete:\n{text}"));
        }
        lines.iter().for_each(|l| println!("  {l}"));
    }
    Ok(())
}

/// Fork vs eager copy of the same frames, measured inside the hypervisor in
/// one run (`bench fork <MiB>` on its console).
fn fork_bench(images: &build::Images) -> Result<(), String> {
    console_bench(
        images,
        "3G",
        "bench fork 64; bench fork 256; bench fork 1024",
        &["bench fork:"],
        3,
        "fork vs eager copy",
    )
}

/// The hypervisor's raw sequential disk throughput (`bench disk <MiB>` on
/// its console), on a fresh 1 GiB sparse raw file in the temp directory:
/// the baseline a snapshot save is compared with (issue 17).
fn disk_bench(images: &build::Images) -> Result<(), String> {
    let path = std::env::temp_dir().join(format!("mhv-bench-disk-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let cfg = qemu_tests::MachineConfig {
        guest: "none".into(),
        disk: Some(qemu_tests::DiskConfig::new(&path)),
        script: Some("bench disk 64; bench disk 256; quit".into()),
        ..Default::default()
    };
    let disk = cfg.disk.as_ref().map(|d| d.create_if_missing());
    let result = match disk {
        Some(Err(e)) => Err(format!("{}: {e}", path.display())),
        _ => captured_lines(&cfg, images, &["bench disk:"]),
    };
    let _ = std::fs::remove_file(&path);
    let (text, lines) = result?;
    if lines.len() != 2 {
        return Err(format!("disk bench did not complete:\n{text}"));
    }
    println!(
        "\nhypervisor disk throughput (release hypervisor, QEMU TCG, cortex-a72, -smp 2, raw file in {}):",
        std::env::temp_dir().display()
    );
    lines.iter().for_each(|l| println!("  {l}"));
    Ok(())
}
