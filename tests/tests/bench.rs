//! The in-hypervisor benchmarks at small sizes: each runs its interleaved
//! pairs to the end and reports the median ratio with its spread, in the
//! wording `cargo xtask bench` and the records in docs/BENCHMARKS.md use.
//! (Whether the numbers are good is `cargo xtask bench`'s business, not a
//! test's.)

use qemu_tests::{number_after, Machine, MachineConfig};
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(60);
const BENCH: Duration = Duration::from_secs(240);

/// The `<a>.<bb>x (min <c>.<dd>x, max <e>.<ff>x, median of N interleaved
/// pairs)` after `key` in `line`, as hundredths (median, min, max).
fn ratio(line: &str, key: &str) -> (u64, u64, u64) {
    let rest = &line[line
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in {line}"))
        + key.len()..];
    let nums: Vec<u64> = rest
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .filter(|w| w.contains('.'))
        .take(3)
        .map(|w| {
            let (a, b) = w.split_once('.').unwrap();
            a.parse::<u64>().unwrap() * 100 + b.parse::<u64>().unwrap()
        })
        .collect();
    // At least the 5 pairs issue 18 asks for (`bench merge`'s CoW takes 9).
    let pairs = number_after(rest, "median of ").unwrap_or(0);
    assert!(pairs >= 5 && rest.contains(" interleaved pairs"), "{line}");
    (nums[0], nums[1], nums[2])
}

#[test]
fn benches_report_medians_of_interleaved_pairs() {
    let cfg = MachineConfig {
        guest: "none".into(),
        script: Some(
            "bench fork 8; bench migrate 2 128 64; bench reclaim 128 64; bench merge 128".into(),
        ),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("bench-pairs", &cfg);
    for (prefix, key) in [
        ("bench fork: 8 MiB", "copy/fork = "),
        (
            "bench migrate: mappers 2 (mapcount 2)",
            "migrate/memcpy throughput = ",
        ),
        (
            "bench reclaim: batch 64, 128 pages",
            "reclaim/lz4 throughput = ",
        ),
        ("bench merge: 256 pages in 2 VMs", "scan/memcmp = "),
        (
            "bench merge: CoW write fault on 128 pages",
            "merged CoW / forked CoW = ",
        ),
    ] {
        m.expect(prefix, if prefix.contains("fork") { BOOT } else { BENCH });
        let line = m.expect("\n", BENCH);
        let (median, min, max) = ratio(&line, key);
        assert!(min <= median && median <= max && max > 0, "{prefix}{line}");
        println!("{prefix}{line}");
    }
    // No VM is left once the script is done: the machine ends by itself.
    assert_eq!(m.wait_exit(BOOT), 0, "{}", m.transcript());
    m.assert_no_hyp_fault();
}
