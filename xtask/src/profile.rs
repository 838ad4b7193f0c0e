//! `cargo xtask profile [cow|snapshot|fork]`: where the hypervisor's instructions
//! go, per copy-on-write fault, per fuzzing cycle or per fork. The release hypervisor
//! runs the test guest (or, for `fork`, a console script) twice under QEMU with a small TCG plugin
//! (`plugin/tbcount.c`) that counts every translated block the CPU runs inside
//! the hypervisor's image; the two runs differ only in how many faults (or
//! cycles) the guest makes, so their difference divided by that number is
//! the cost of one, by function. Instruction counts repeat exactly for the
//! same binary, whatever else the shared machine does; wall-clock time under
//! TCG does not (`bench` measures time, this measures work).

use crate::build;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const PLUGIN_SRC: &str = include_str!("../plugin/tbcount.c");

/// A workload at two sizes: what one unit of the difference is.
struct Workload {
    name: &'static str,
    /// The test guest's arguments, or (`console`) a console script run with no guest.
    small: &'static str,
    large: &'static str,
    units: f64,
    unit: &'static str,
    console: bool,
}

/// `profile fork`'s second pair: forks of 64 MiB (32 blocks), so that the
/// 1 GiB fork's 480 extra blocks separate the per-block cost from the fixed one.
const FORK_SMALL_VM: Workload = Workload {
    name: "fork64",
    small: "bench fork 64 1",
    large: "bench fork 64 11",
    units: 10.0,
    unit: "fork of a VM with 64 MiB resident (32 blocks of 2 MiB)",
    console: true,
};

/// Blocks of 2 MiB in a 1 GiB fork beyond those of a 64 MiB one.
const FORK_EXTRA_BLOCKS: f64 = 480.0;

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "cow",
        small: "cowbench pages=8",
        large: "cowbench pages=128",
        units: 120.0,
        unit: "copy-on-write write fault (and one null hypercall: the trap baseline)",
        console: false,
    },
    Workload {
        name: "snapshot",
        small: "snapshot cycles=50",
        large: "snapshot cycles=300",
        units: 250.0,
        unit: "fuzzing cycle (64 pages dirtied, a restore) plus one restore alone",
        console: false,
    },
    Workload {
        name: "fork",
        small: "bench fork 1024 1",
        large: "bench fork 1024 11",
        units: 10.0,
        unit: "fork of a VM with 1 GiB resident (512 blocks of 2 MiB), a snapshot kept",
        console: true,
    },
];

/// Per function: instructions run, and calls (runs of its first block).
type Counts = HashMap<usize, (u64, u64)>;
/// Per function: the difference of two runs' counts per unit (instructions, calls).
type Diff = HashMap<usize, (f64, f64)>;

/// `large` minus `small`, per unit.
fn diff(small: &Counts, large: &Counts, units: f64) -> Diff {
    let mut d = Diff::new();
    for f in small.keys().chain(large.keys()) {
        let (a, b) = (
            small.get(f).copied().unwrap_or_default(),
            large.get(f).copied().unwrap_or_default(),
        );
        let per = (
            (b.0 as f64 - a.0 as f64) / units,
            (b.1 as f64 - a.1 as f64) / units,
        );
        d.insert(*f, per);
    }
    d
}

pub fn profile(args: &[String]) -> Result<(), String> {
    crate::setup::ensure()?;
    let which = args.first().map_or("cow", String::as_str);
    let work = WORKLOADS
        .iter()
        .find(|w| w.name == which)
        .ok_or_else(|| format!("profile: unknown workload '{which}' (cow, snapshot or fork)"))?;
    let images = build::images(true)?;
    let dir = build::target_dir().join("profile");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let plugin = build_plugin(&dir)?;
    let syms = Symbols::read(&images.hyp)?;
    let run_pair = |w: &Workload| -> Result<Diff, String> {
        let small = run(
            &images.hyp,
            &plugin,
            &syms,
            w,
            w.small,
            &dir.join("small.txt"),
        )?;
        let large = run(
            &images.hyp,
            &plugin,
            &syms,
            w,
            w.large,
            &dir.join("large.txt"),
        )?;
        Ok(diff(&small, &large, w.units))
    };
    let per_unit = run_pair(work)?;
    let title = format!(
        "hypervisor instructions per {} ('{}' minus '{}', / {})",
        work.unit, work.large, work.small, work.units
    );
    report(&title, &syms, &per_unit);
    if work.name == "fork" {
        fork_split(&syms, &per_unit, &run_pair(&FORK_SMALL_VM)?);
    }
    Ok(())
}

/// The 1 GiB fork's work split into a part per 2 MiB block and a fixed part,
/// from the forks of 1 GiB and of 64 MiB.
fn fork_split(syms: &Symbols, big: &Diff, small: &Diff) {
    let mut per_block = Diff::new();
    for (f, b) in big {
        let s = small.get(f).copied().unwrap_or_default();
        let d = (
            (b.0 - s.0) / FORK_EXTRA_BLOCKS,
            (b.1 - s.1) / FORK_EXTRA_BLOCKS,
        );
        per_block.insert(*f, d);
    }
    for (f, s) in small {
        per_block
            .entry(*f)
            .or_insert((-s.0 / FORK_EXTRA_BLOCKS, -s.1 / FORK_EXTRA_BLOCKS));
    }
    let total = |d: &Diff| d.values().map(|v| v.0).sum::<f64>();
    let fixed: Diff = big
        .iter()
        .map(|(f, b)| {
            let p = per_block.get(f).copied().unwrap_or_default();
            (*f, (b.0 - 512.0 * p.0, b.1 - 512.0 * p.1))
        })
        .collect();
    let block = total(&per_block);
    println!(
        "\nper fork: 1 GiB {:.0}, 64 MiB {:.0} instructions; per 2 MiB block {block:.0}; fixed (1 GiB fork less 512 blocks) {:.0}",
        total(big),
        total(small),
        total(big) - 512.0 * block
    );
    report(
        "hypervisor instructions per 2 MiB block forked ((1 GiB fork - 64 MiB fork) / 480)",
        syms,
        &per_block,
    );
    report(
        "hypervisor instructions per fork not per block (1 GiB fork - 512 blocks)",
        syms,
        &fixed,
    );
}

/// Compiles the plugin with the host C compiler (gcc is on every machine
/// of this kind; QEMU loads plugins as shared objects).
fn build_plugin(dir: &Path) -> Result<PathBuf, String> {
    let src = dir.join("tbcount.c");
    let so = dir.join("tbcount.so");
    std::fs::write(&src, PLUGIN_SRC).map_err(|e| format!("{}: {e}", src.display()))?;
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&so)
        .arg(&src)
        .arg("-lpthread")
        .status()
        .map_err(|e| format!("cc: {e}"))?;
    status
        .success()
        .then_some(so)
        .ok_or("profile: the plugin did not compile".into())
}

/// The hypervisor's function symbols, by address.
struct Symbols {
    addrs: Vec<u64>,
    names: Vec<String>,
}

impl Symbols {
    fn read(elf: &Path) -> Result<Symbols, String> {
        // binutils' nm demangles Rust's symbols (`-C`); the toolchain's
        // llvm-nm leaves the legacy mangling.
        let out = Command::new("nm")
            .args(["-C", "--defined-only", "-n"])
            .arg(elf)
            .output()
            .map_err(|e| format!("nm: {e}"))?;
        let (mut addrs, mut names) = (Vec::new(), Vec::new());
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut parts = line.splitn(3, ' ');
            let (Some(addr), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if matches!(kind, "t" | "T") {
                if let Ok(a) = u64::from_str_radix(addr, 16) {
                    addrs.push(a);
                    names.push(name.to_string());
                }
            }
        }
        if addrs.is_empty() {
            return Err(format!("{}: no function symbols", elf.display()));
        }
        Ok(Symbols { addrs, names })
    }

    /// The function holding `addr`.
    fn at(&self, addr: u64) -> Option<usize> {
        self.addrs.partition_point(|&a| a <= addr).checked_sub(1)
    }

    /// The text range to count: from the first function to past the last.
    fn range(&self) -> (u64, u64) {
        (self.addrs[0], self.addrs[self.addrs.len() - 1] + 0x1_0000)
    }
}

/// Boots the test guest with `args` under the plugin; its counts by function.
fn run(
    hyp: &Path,
    plugin: &Path,
    syms: &Symbols,
    work: &Workload,
    args: &str,
    out: &Path,
) -> Result<Counts, String> {
    let cfg = if work.console {
        // The fork bench's machine: room for a 1 GiB VM and the frames it forks.
        qemu_tests::MachineConfig {
            mem: "3G".into(),
            guest: "none".into(),
            script: Some(args.into()),
            ..Default::default()
        }
    } else {
        qemu_tests::MachineConfig {
            vcpus: Some(1),
            guest_args: Some(args.into()),
            ..Default::default()
        }
    };
    let (lo, hi) = syms.range();
    let spec = format!(
        "{},out={},lo={lo:x},hi={hi:x}",
        plugin.display(),
        out.display()
    );
    let mut cmd = cfg.command(hyp);
    // One TCG thread: the counters are plain adds, not atomics.
    cmd.args(["-accel", "tcg,thread=single", "-plugin", &spec]);
    let res = cmd.stdin(std::process::Stdio::null()).output();
    let text = String::from_utf8_lossy(&res.map_err(|e| format!("qemu: {e}"))?.stdout).into_owned();
    let done = if work.console {
        text.contains("bench fork:")
    } else {
        text.contains("GUEST RESULT: PASS")
    };
    if !done {
        return Err(format!("profile: '{args}' did not complete:\n{text}"));
    }
    let data = std::fs::read_to_string(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut counts = Counts::new();
    for line in data.lines() {
        // "vaddr(hex) instructions runs" per translated block.
        let mut words = line.split(' ');
        let block = (|| {
            let vaddr = u64::from_str_radix(words.next()?, 16).ok()?;
            let insns: u64 = words.next()?.parse().ok()?;
            let runs: u64 = words.next()?.parse().ok()?;
            Some((vaddr, insns, runs, syms.at(vaddr)?))
        })();
        let Some((vaddr, insns, runs, f)) = block else {
            continue;
        };
        let e = counts.entry(f).or_default();
        e.0 += insns * runs;
        if syms.addrs[f] == vaddr {
            e.1 += runs;
        }
    }
    Ok(counts)
}

/// Prints the difference per unit: the total and the functions it is in.
fn report(title: &str, syms: &Symbols, per_unit: &Diff) {
    let mut rows: Vec<(f64, f64, &str)> = per_unit
        .iter()
        .map(|(f, &(insns, calls))| (insns, calls, syms.names[*f].as_str()))
        .collect();
    let total: f64 = rows.iter().map(|r| r.0).sum();
    rows.sort_by(|x, y| y.0.total_cmp(&x.0));
    println!("\n{title}:");
    let grew: f64 = rows.iter().map(|r| r.0).filter(|i| *i > 0.0).sum();
    println!("  total: {total:.0} ({grew:.0} in the functions that grew)");
    println!("  {:>9} {:>7}  function", "instr", "calls");
    for (insns, calls, name) in rows.iter().filter(|r| r.0 >= 5.0).take(30) {
        let name: String = name.chars().take(110).collect();
        println!("  {insns:>9.1} {calls:>7.2}  {name}");
    }
    // What shrank is work that follows wall-clock time, not the workload (an
    // idle CPU's timer ticks and WFI loop): shown so a negative total reads
    // as that, not as the workload's cost.
    let shrank: Vec<_> = rows.iter().rev().filter(|r| r.0 <= -5.0).take(5).collect();
    if !shrank.is_empty() {
        println!("  shrank (idle work that follows wall-clock time, not the workload):");
        for (insns, calls, name) in shrank {
            let name: String = name.chars().take(110).collect();
            println!("  {insns:>9.1} {calls:>7.2}  {name}");
        }
    }
}
