//! Console fuzz: a running Debian Linux guest, then a few hundred random and
//! adversarial lines typed at `hyp>` from a seeded PRNG (overflowing hex and
//! decimal numbers, `u64::MAX` ranges, empty, negative and huge counts,
//! unknown words, very long lines, non-ASCII and control bytes, every
//! command with the wrong number of arguments, and cheap valid commands).
//! The hypervisor must answer every line with a prompt, never fault, still
//! list VM 1 as running, and VM 1 must still answer on its console.
//!
//! Lines that legitimately end the machine or stop, pause or rewind VM 1
//! (`quit`, `destroy 1`, `pause 1`, `restore 1 <s>`), `console` to a VM that
//! may exist (the next lines would go to its shell), valid commands that run
//! for long (`wait`, `chaos`, benches beyond a small size) and forks beyond a
//! few VMs are not typed: the test classifies each line as the hypervisor's
//! line editor will see it, with the hypervisor's own parser (`hypcmd`),
//! also for every prefix of its words (a parser that ignored extra words
//! would run the prefix). An `evacuate` that parses is followed by `online`
//! of the same range, so guest memory is not left offline.
//!
//! The seed is printed on failure; `MHV_FUZZ_SEED=<n>` replays it.

use hypcmd::{parse, Command, Focus, VmId};
use qemu_tests::{linux_config, Machine};
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(240);
const REPLY: Duration = Duration::from_secs(60);
const LINES: usize = 300;
/// VMs the typed commands may create (forks, snapshots, chaos).
const NEW_VMS: u32 = 4;
/// Ctrl-A h: the keyboard goes to the hypervisor.
const HYP: &str = "\x01h";

/// splitmix64: small, seedable, good enough to pick words.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const COMMANDS: &[&str] = &[
    "help", "vms", "stats", "pause", "resume", "destroy", "fork", "snapshot", "restore", "rmap",
    "migrate", "evacuate", "online", "reclaim", "chaos", "wait", "bench", "sleep", "quit",
    "console",
];

/// Numbers and near-numbers at every boundary the console checks.
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "2",
    "-1",
    "+1",
    "-0",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "ffffffffffffffff",
    "0xffffffffffffffff",
    "fffffffffffffff1",
    "0xfffffffffffff001",
    "fffffffffffff000",
    "10000000000000000",
    "0x",
    "0x0x10",
    "40000000",
    "0x40000000",
    "0x50000000",
    "40001fff",
    "0x48000000",
    "1000",
    "1001",
    "4096",
    "4097",
    "16777216",
    "16777217",
    "60000",
    "60001",
    "3600",
    "3601",
    "600",
    "601",
    "64",
    "65",
    "200",
    "201",
    "65536",
    "65537",
    "",
    "1e3",
    "1.5",
    "0b101",
    "0o7",
    "٣",
    "NaN",
    "inf",
    "x",
    "é",
];

/// Text that is no command at all.
const JUNK: &[&str] = &[
    "frobnicate",
    "HELP",
    "Vms",
    "fork1",
    "bench-fork",
    "rm -rf /",
    "$(reboot)",
    "%s%n%x",
    "\\x01",
    "hyp",
    "null",
    "\u{1F600}",
    "ünïcödé",
    "漢字",
    "\u{202e}evil",
    "\t\t",
    "\x1b[2J",
    "\x00",
    "\x7f\x7f\x7f",
    "\x08\x08",
    "  ",
    "\x07",
];

fn number(rng: &mut Rng) -> String {
    match rng.below(4) {
        0 => format!("{:#x}", rng.next()),
        1 => format!("{}", rng.next() >> rng.below(64)),
        _ => rng.pick(NUMBERS).to_string(),
    }
}

/// A command with 0..7 arguments: wrong arity for most commands.
fn arity_line(rng: &mut Rng) -> String {
    let mut words = vec![rng.pick(COMMANDS).to_string()];
    if words[0] == "bench" && rng.below(3) > 0 {
        words.push(rng.pick(&["fork", "migrate", "reclaim"]).to_string());
    }
    for _ in 0..rng.below(7) {
        words.push(number(rng));
    }
    words.join(rng.pick(&[" ", "  ", "\t", " \t "]))
}

/// A range command whose end overflows (or nearly) the address space.
fn range_line(rng: &mut Rng) -> String {
    let end = rng.pick(&[
        "ffffffffffffffff",
        "0xffffffffffffffff",
        "fffffffffffffff1",
        "0xfffffffffffff001",
        "fffffffffffff000",
        "10000000000000000",
    ]);
    let start = rng.pick(&["0", "40000000", "ffffffffffffffff", "fffffffffffff000", "x"]);
    match rng.below(4) {
        0 => format!("online {start} {end}"),
        1 => format!("evacuate {start} {end} {}", number(rng)),
        _ => format!("migrate {} {start} {end}", rng.pick(&["1", "2", "0", "99"])),
    }
}

fn junk_line(rng: &mut Rng) -> String {
    let n = 1 + rng.below(4);
    (0..n).map(|_| rng.pick(JUNK)).collect::<Vec<_>>().join(" ")
}

/// 200 to 1600 characters of words, numbers and non-ASCII (the console
/// drops a line over 1024 characters whole).
fn long_line(rng: &mut Rng) -> String {
    let mut line = rng.pick(COMMANDS).to_string();
    let len = 200 + rng.below(1400);
    while line.len() < len {
        line.push(' ');
        match rng.below(3) {
            0 => line.push_str(&number(rng)),
            1 => line.push_str(rng.pick(JUNK)),
            _ => line.push_str(&"9".repeat(1 + rng.below(100))),
        }
    }
    line
}

/// Cheap commands that should succeed (or fail only on the machine's state).
fn valid_line(rng: &mut Rng) -> String {
    let vm = 1 + rng.below(6);
    let ipa = 0x4000_0000 + (rng.below(256) << 20);
    match rng.below(12) {
        0 => "vms".into(),
        1 => "stats".into(),
        2 => "help".into(),
        3 => format!("rmap {:#x}", 0x4000_0000 + (rng.below(1 << 18) << 12)),
        4 => format!("migrate {vm} {ipa:#x} {:#x}", ipa + (1 << 20)),
        5 => format!("reclaim {}", 1 + rng.below(2048)),
        6 => format!("evacuate {ipa:#x} {:#x} 64", ipa + (1 << 20)),
        7 => format!("fork {vm}"),
        8 => format!("snapshot {vm}"),
        9 => format!("{} {vm}", rng.pick(&["pause", "resume", "destroy"])),
        10 if rng.below(3) == 0 => "wait 1".into(),
        _ => format!("sleep {}", rng.below(70_000)),
    }
}

fn random_line(rng: &mut Rng) -> String {
    match rng.below(20) {
        0..=3 => range_line(rng),
        4..=7 => arity_line(rng),
        8 | 9 => junk_line(rng),
        // Long lines cost the most time (the console reads input once per
        // 10 ms slice): few of them.
        10 => long_line(rng),
        11 | 12 => {
            // Non-ASCII and control bytes inside an otherwise good line.
            let mut line = valid_line(rng);
            let at = line
                .char_indices()
                .map(|(i, _)| i)
                .nth(rng.below(4))
                .unwrap_or(0);
            line.insert_str(
                at,
                rng.pick(&["é", "\u{0}", "\x1b", "\x7f", "\x08", "\u{feff}"]),
            );
            line
        }
        _ => valid_line(rng),
    }
}

/// What the hypervisor's line editor (`input` in hyp/src/console/cmd.rs) makes of
/// typed text: printable ASCII and space kept, DEL and BS erase, the rest
/// dropped.
fn as_seen(typed: &str) -> String {
    let mut line = String::new();
    for b in typed.bytes() {
        match b {
            0x7f | 0x08 => {
                line.pop();
            }
            b if b.is_ascii_graphic() || b == b' ' => line.push(b as char),
            _ => {}
        }
    }
    line
}

/// How many VMs a command may create, or `None` if it is not to be typed.
fn cost(cmd: &Command) -> Option<u32> {
    use Command::*;
    const VM1: VmId = VmId(1);
    match *cmd {
        Quit | Destroy(VM1) | Pause(VM1) | Restore { vm: VM1, .. } => None,
        // Giving the keyboard to a VM that exists would send the next lines
        // to its shell; ids this run cannot reach only get an error.
        Console(Focus::Vm(VmId(id))) if id <= 100 => None,
        Fork { count, .. } if count <= 2 => Some(count),
        Fork { .. } => None,
        Snapshot { count, .. } if count <= 2 => Some(count),
        Snapshot { .. } => None,
        Chaos { secs, max_vms, .. } if secs <= 2 => Some(max_vms as u32),
        Chaos { .. } => None,
        Wait { secs } if secs <= 2 => Some(0),
        Wait { .. } => None,
        Reclaim { pages, .. } if pages <= 4096 => Some(0),
        Reclaim { .. } => None,
        Evacuate { range, .. } if range.end() - range.start() <= 64 << 20 => Some(0),
        Evacuate { .. } => None,
        // Only-fork mode keeps its snapshots: VMs this run creates.
        BenchFork { mib, forks } if mib <= 16 && forks.unwrap_or(0) <= 2 => {
            Some(forks.unwrap_or(0))
        }
        BenchMigrate { mappers, pages, .. } if mappers <= 4 && pages <= 1024 => Some(0),
        BenchReclaim { pages, .. } if pages <= 1024 => Some(0),
        BenchFork { .. } | BenchMigrate { .. } | BenchReclaim { .. } => None,
        _ => Some(0),
    }
}

/// The VMs `seen` may create if it may be typed: every prefix of its words
/// that is a command must be allowed.
fn allowed(seen: &str) -> Option<u32> {
    let words: Vec<&str> = seen.split_whitespace().collect();
    let mut most = 0;
    for k in 1..=words.len() {
        if let Ok(Some(cmd)) = parse(&words[..k].join(" ")) {
            most = most.max(cost(&cmd)?);
        }
    }
    Some(most)
}

/// About `count` lines to type (an evacuate that parses brings its
/// `online`), deterministic for a seed.
fn fuzz_lines(seed: u64, count: usize) -> Vec<String> {
    let mut rng = Rng(seed);
    let mut budget = NEW_VMS;
    let mut lines = Vec::new();
    while lines.len() < count {
        let line = random_line(&mut rng);
        // The prompt is how the test knows a line was answered: it must
        // not appear in a line's echo (every printable byte typed, even
        // one erased later).
        let echo: String = line
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .collect();
        if line.contains(['\x01', '\r', '\n']) || echo.contains("hyp>") {
            continue;
        }
        let Some(cost) = allowed(&as_seen(&line)).filter(|&c| c <= budget) else {
            continue;
        };
        budget -= cost;
        let follow = match parse(&as_seen(&line)) {
            Ok(Some(Command::Evacuate { range, .. })) => Some(format!("online {range}")),
            _ => None,
        };
        lines.push(line);
        lines.extend(follow);
    }
    lines
}

fn seed() -> u64 {
    match std::env::var("MHV_FUZZ_SEED") {
        Ok(s) => s.parse().expect("MHV_FUZZ_SEED is a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

/// Fails with the seed, the line and the end of the console; the whole
/// console goes to a file.
fn fail(m: &mut Machine, seed: u64, what: &str) -> ! {
    let t = m.transcript();
    let path = std::env::temp_dir().join(format!("console_fuzz-{seed}.log"));
    let saved = match std::fs::write(&path, &t) {
        Ok(()) => format!("whole console in {}", path.display()),
        Err(e) => format!("cannot save the console to {}: {e}", path.display()),
    };
    let chars: Vec<char> = t.chars().collect();
    let tail: String = chars[chars.len().saturating_sub(6000)..].iter().collect();
    panic!("[console_fuzz] seed {seed} (MHV_FUZZ_SEED={seed} replays): {what}\n----- console (end; {saved}) -----\n{tail}\n-------------------------");
}

#[test]
fn console_survives_random_and_adversarial_lines() {
    let seed = seed();
    println!("console_fuzz: seed {seed} (MHV_FUZZ_SEED={seed} replays it)");
    let lines = fuzz_lines(seed, LINES);
    let start = std::time::Instant::now();
    let mut m = Machine::boot("console-fuzz", &linux_config());
    m.expect("MHV-LINUX-READY", BOOT);
    m.expect("# ", BOOT);
    let booted = start.elapsed();
    m.send(HYP);
    m.expect("[console: hypervisor]", REPLY);
    m.expect("hyp> ", REPLY);
    for (i, line) in lines.iter().enumerate() {
        m.send(&format!("{line}\n"));
        if let Err(why) = m.try_expect("hyp> ", REPLY) {
            fail(&mut m, seed, &format!("line {i} {line:?}: {why}"));
        }
        if m.transcript().contains("*** HYPERVISOR") {
            fail(
                &mut m,
                seed,
                &format!("line {i} {line:?} faulted the hypervisor"),
            );
        }
    }
    // The hypervisor still answers and VM 1 still runs...
    m.send("vms\n");
    let vms = m
        .try_expect("hyp> ", REPLY)
        .unwrap_or_else(|why| fail(&mut m, seed, &why));
    if !vms
        .lines()
        .any(|l| l.starts_with("  1 ") && l.contains(" running "))
    {
        fail(&mut m, seed, &format!("VM 1 is not running:\n{vms}"));
    }
    // ... and answers on its own console.
    m.send("console 1\n");
    if let Err(why) = m.try_expect("[console: vm 1]", REPLY) {
        fail(&mut m, seed, &why);
    }
    m.send("echo fuzz=$((6*7))\n");
    if let Err(why) = m.try_expect("fuzz=42", REPLY) {
        fail(&mut m, seed, &format!("VM 1 does not answer: {why}"));
    }
    m.assert_no_hyp_fault();
    println!(
        "console_fuzz: seed {seed}: {} lines, hypervisor and VM 1 fine (Linux up in {booted:?}, lines and checks {:?})",
        lines.len(),
        start.elapsed() - booted
    );
}
