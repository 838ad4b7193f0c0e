//! `cargo xtask mutants [--shard k/n] [--re REGEX] [file...]`: the mutation score of rmap's
//! and stage2's core files (issue 13, item 5), recorded in docs/TESTING.md. Not part of CI.
//!
//! One `cargo mutants` run per file, in [`FILES`] order (the most important results first),
//! the runs of one package sharing a target directory (`target/mutants-<package>`) so that only
//! the first builds the dependencies, and the two packages using different ones so that they can
//! be scored at once (`cargo xtask mutants rmap/src/*.rs` next to `... stage2/src/ops/*.rs`);
//! each run's report goes to `target/mutants-out/<file>/mutants.out`. Only the
//! fast, deterministic host tests are built and run for each mutant: the threaded stress tests
//! are timing-dependent (a mutant could pass or fail by chance) and slow to build, and the loom
//! models do not run the crates' code at all. Proptest gets a fixed seed for the same reason.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Every file scored by default, most important first.
pub const FILES: [&str; 18] = [
    "rmap/src/fault.rs",
    "rmap/src/walk.rs",
    "rmap/src/fork.rs",
    "rmap/src/anon_vma.rs",
    "rmap/src/chain.rs",
    "rmap/src/batch.rs",
    "rmap/src/swap_cache.rs",
    "rmap/src/destroy.rs",
    "stage2/src/ops/driver.rs",
    "stage2/src/ops/commit.rs",
    "stage2/src/ops/leaf.rs",
    "stage2/src/ops/update.rs",
    "stage2/src/ops/map.rs",
    "stage2/src/ops/split.rs",
    "stage2/src/ops/unmap.rs",
    "stage2/src/ops/mod.rs",
    "stage2/src/ops/protect.rs",
    "stage2/src/ops/walk.rs",
];

/// The test targets each mutant is built and tested with, per package, besides `--lib` and
/// every `tests/kill_*.rs` (the tests written to kill surviving mutants). Left out: rmap's
/// `stress` and `loom_races`, and stage2's `concurrency`, whose racing threads can run for
/// tens of seconds on a loaded machine (a spurious timeout would count as a kill).
const FAST_TESTS: [(&str, &[&str]); 2] = [
    ("rmap", &["fork_errors", "hurt", "model", "swap_release"]),
    ("stage2", &["api", "model", "tlb", "walker"]),
];

/// Seconds a mutant's test run may take: the baseline's tests run in about 2 s (5 s on a busy
/// machine), so a mutant that takes this long is stuck (a fault retried forever), not slow.
const TEST_TIMEOUT: &str = "20";
/// Seconds a mutant's build may take (an incremental build of one crate and its tests).
const BUILD_TIMEOUT: &str = "600";
/// Proptest's seed, so that a mutant is caught or missed the same way on every run.
const PROPTEST_SEED: &str = "1";

/// How one file's mutants fared.
struct Score {
    file: String,
    caught: usize,
    missed: usize,
    unviable: usize,
    timeout: usize,
}

pub fn mutants(args: &[String]) -> Result<(), String> {
    let mut shard = None;
    let mut re = None;
    let mut files = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--shard" => shard = Some(it.next().ok_or("--shard needs k/n")?.clone()),
            "--re" => re = Some(it.next().ok_or("--re needs a regex")?.clone()),
            f if f.starts_with('-') => return Err(format!("mutants: unknown option {f}")),
            f => files.push(f.trim_start_matches("./").to_string()),
        }
    }
    if files.is_empty() {
        files = FILES.iter().map(|f| f.to_string()).collect();
    }
    crate::setup::cargo_mutants()?;
    let root = workspace_root();
    let mut scores = Vec::new();
    let mut tested = Vec::new();
    for file in &files {
        let package = file.split('/').next().unwrap_or_default().to_string();
        let baseline = !tested.contains(&package);
        scores.push(run_file(
            &root,
            file,
            shard.as_deref(),
            re.as_deref(),
            baseline,
        )?);
        tested.push(package);
    }
    print_scores(&scores);
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

/// The `cargo` arguments that select `package`'s fast tests: used for the build of every
/// mutant as well as for its test run, so the slow targets are never even built.
fn test_targets(root: &Path, package: &str) -> Result<Vec<String>, String> {
    let fixed = FAST_TESTS
        .iter()
        .find(|(p, _)| *p == package)
        .ok_or_else(|| format!("mutants: no test list for package {package}"))?
        .1;
    let mut names: Vec<String> = fixed.iter().map(|t| t.to_string()).collect();
    let dir = root.join(package).join("tests");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".rs") {
            if stem.starts_with("kill_") {
                names.push(stem.to_string());
            }
        }
    }
    names.sort();
    let mut args = vec!["--lib".to_string()];
    for name in names {
        args.push("--test".into());
        args.push(name);
    }
    Ok(args)
}

/// Where `package`'s mutants are built: `MUTANTS_TARGET_DIR` if set (to score two files of
/// one package at once, each invocation needs its own), else `target/mutants-<package>`.
fn target_dir(root: &Path, package: &str) -> PathBuf {
    match std::env::var_os("MUTANTS_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => root.join(format!("target/mutants-{package}")),
    }
}

/// Runs `cargo mutants` on one file and reads back its outcome lists. `baseline`: test the
/// unmutated tree first (once per package and invocation is enough: every file's run starts
/// from the same tree).
fn run_file(
    root: &Path,
    file: &str,
    shard: Option<&str>,
    re: Option<&str>,
    baseline: bool,
) -> Result<Score, String> {
    let package = file.split('/').next().unwrap_or_default();
    if !root.join(file).is_file() {
        return Err(format!("mutants: no such file {file}"));
    }
    let out_dir = root
        .join("target/mutants-out")
        .join(file.trim_end_matches(".rs").replace('/', "-"));
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let mut cmd = Command::new("nice");
    cmd.current_dir(root)
        .args([
            "-n",
            "10",
            "cargo",
            "mutants",
            "--package",
            package,
            "--file",
            file,
        ])
        .args(["--timeout", TEST_TIMEOUT, "--build-timeout", BUILD_TIMEOUT])
        .arg("--output")
        .arg(&out_dir)
        .env("CARGO_TARGET_DIR", target_dir(root, package))
        .env("PROPTEST_RNG_SEED", PROPTEST_SEED)
        // No debug info: linking five test binaries per mutant is most of its build time.
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .env("CARGO_PROFILE_TEST_DEBUG", "0");
    if !baseline {
        cmd.args(["--baseline", "skip"]);
    }
    if std::env::var_os("CARGO_BUILD_JOBS").is_none() {
        cmd.env("CARGO_BUILD_JOBS", "2");
    }
    if let Some(shard) = shard {
        cmd.args(["--shard", shard]);
    }
    if let Some(re) = re {
        cmd.args(["--re", re]);
    }
    for arg in test_targets(root, package)? {
        cmd.arg(format!("--cargo-arg={arg}"));
    }
    println!("xtask: mutants of {file} (report in {})", out_dir.display());
    let status = cmd.status().map_err(|e| format!("cargo mutants: {e}"))?;
    // 0: all caught; 2: some missed; 3: some timed out. Anything else is a failure of the run
    // itself (the unmutated baseline failing, a bad argument).
    if !matches!(status.code(), Some(0 | 2 | 3)) {
        return Err(format!("cargo mutants on {file} failed ({status})"));
    }
    let count = |list: &str| {
        std::fs::read_to_string(out_dir.join("mutants.out").join(list))
            .map(|s| s.lines().filter(|l| !l.trim().is_empty()).count())
            .unwrap_or(0)
    };
    Ok(Score {
        file: file.to_string(),
        caught: count("caught.txt"),
        missed: count("missed.txt"),
        unviable: count("unviable.txt"),
        timeout: count("timeout.txt"),
    })
}

fn print_scores(scores: &[Score]) {
    println!("\n| file | caught | missed | unviable | timeout | caught of viable |");
    println!("|---|---|---|---|---|---|");
    for s in scores {
        // A timeout is a caught mutant (the tests did not pass), as cargo-mutants counts it.
        let viable = s.caught + s.missed + s.timeout;
        let pct = if viable == 0 {
            100.0
        } else {
            100.0 * (s.caught + s.timeout) as f64 / viable as f64
        };
        println!(
            "| {} | {} | {} | {} | {} | {pct:.0}% |",
            s.file, s.caught, s.missed, s.unviable, s.timeout
        );
    }
    println!("\nxtask: the missed mutants of each file are in target/mutants-out/<file>/mutants.out/missed.txt");
}
