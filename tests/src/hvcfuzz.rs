//! The `hvcfuzz` guest mode's machine and verdict, shared by the QEMU test
//! (`tests/tests/hvcfuzz.rs`, 30 s) and `cargo xtask soak` (minutes).

use crate::MachineConfig;

/// `secs` of fuzzing on 4 vCPUs over 2 CPUs while the console runs `chaos`
/// for as long (in chunks: one `chaos` runs at most 600 s).
pub fn config(secs: u64, seed: u64, extra_args: &str) -> MachineConfig {
    let chunks: Vec<String> = (0..secs.div_ceil(600))
        .map(|i| {
            let s = (secs - i * 600).min(600);
            format!("chaos {s} {}", seed.wrapping_add(i) % (1 << 63))
        })
        .collect();
    MachineConfig {
        smp: 2,
        vcpus: Some(4),
        guest_args: Some(format!("hvcfuzz secs={secs} seed={seed} {extra_args}")),
        script: Some(chunks.join("; ")),
        ..MachineConfig::default()
    }
}

/// A seed from the environment (`HVCFUZZ_SEED`) or the clock.
pub fn seed() -> u64 {
    std::env::var("HVCFUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            (t.as_nanos() as u64 % 1_000_000_000).max(1)
        })
}

/// What a run showed.
#[derive(Debug, Default)]
pub struct Summary {
    /// The root's hypercall count (its final line).
    pub root_calls: Option<u64>,
    /// Rounds of rewriting and verifying its pattern that the checker VM reported
    /// passing at its end; `None` if it never reported.
    pub checker_rounds: Option<u64>,
    /// Lines of fuzz VMs that ended by running out their time.
    pub children: usize,
    /// Lines of console (chaos) forks of the checker, each of which kept
    /// checking and passed.
    pub checker_clones: usize,
    /// Everything that must not happen, one line each.
    pub problems: Vec<String>,
}

/// Lines that mean a bug (in the hypervisor, or a guest it wronged).
const BAD: [&str; 9] = [
    "*** HYPERVISOR",
    "panicked",
    "PANIC",
    "MISMATCH",
    "WRONG ANSWER",
    "SNAPSTEAL",
    "GUEST RESULT: FAIL",
    "unexpected exception",
    "still runnable",
];

/// Judges a run from its console `text` and QEMU exit `status`: collects
/// every line that means a bug, the root's and checker's final counts, and a
/// problem for each missing count or a non-zero status. The run passed iff
/// `problems` is empty.
pub fn verdict(text: &str, status: i32) -> Summary {
    let mut s = Summary::default();
    for line in text.lines() {
        if BAD.iter().any(|b| line.contains(b)) {
            s.problems.push(line.to_string());
        }
    }
    // vm 1's lines are unlabelled while it is the only VM.
    s.root_calls = ["[vm1] hvcfuzz: ", "hvcfuzz: "]
        .iter()
        .find_map(|p| number_before(text, p, " hypercalls, seed"));
    if let Some(checker) = number_before(text, "[vm1] hvcfuzz: checker is vm ", "\r") {
        let prefix = format!("[vm{checker}] hvcfuzz checker: ");
        s.checker_rounds = number_before(text, &prefix, " rounds ok");
    }
    s.children = text.matches("hvcfuzz child vm").count();
    s.checker_clones = text.matches("hvcfuzz checker clone").count();
    if s.root_calls.is_none() {
        s.problems
            .push("the root (vm 1) never printed its count".into());
    }
    if s.checker_rounds.is_none() {
        s.problems.push("the checker never passed".into());
    }
    if status != 0 {
        s.problems
            .push(format!("the machine exited with status {status}"));
    }
    s
}

/// The number between `before` and `after` on the first line that starts
/// with `before` and goes on with a number.
fn number_before(text: &str, before: &str, after: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(before)?;
        let end = rest.find(after).unwrap_or(rest.len());
        rest[..end].trim().parse().ok()
    })
}
