//! The console syntax: words separated by whitespace, VM ids and counts in
//! decimal, addresses in hex (`0x` optional). [`parse`] is total: it only
//! splits, parses numbers with the standard library's checked parsers,
//! compares, and rounds with checked arithmetic.

use crate::command::{
    Command, Create, Focus, Guest, PageRange, SnapName, VmId, Words, MAX_GROUP, MAX_MERGE_LIST,
    MAX_MERGE_RATE,
};
use crate::PAGE_SIZE;
use alloc::string::String;
use core::ops::RangeInclusive;
use core::str::SplitWhitespace;

pub use crate::parse_error::ParseError;

type Result<T> = core::result::Result<T, ParseError>;

const BATCH: RangeInclusive<u64> = 1..=4096;
const BENCH_USAGE: &str =
    "bench fork <MiB> [forks] | bench migrate <mappers> <pages> <batch> [blocks] | bench reclaim <pages> <batch> | bench merge <pages> | bench disk [MiB] [passes] [at <lba>]";
const BENCH_FORK_USAGE: &str = "bench fork <MiB> [forks (1..=1000): only fork]";
const SLEEP_USAGE: &str = "sleep <ms> (1..=60000; delays the next script command)";

/// Parses one console line. `Ok(None)`: the line is empty or blank.
pub fn parse(line: &str) -> Result<Option<Command>> {
    let mut words = line.split_whitespace();
    let Some(word) = words.next() else {
        return Ok(None);
    };
    let mut args = Args(words);
    let (name, cmd) = match word {
        "help" => ("help", Command::Help),
        "vms" => ("vms", Command::Vms),
        "stats" => ("stats", Command::Stats),
        "quit" => ("quit", Command::Quit),
        "pause" => ("pause", Command::Pause(args.vm()?)),
        "resume" => ("resume", Command::Resume(args.vm()?)),
        "destroy" => ("destroy", Command::Destroy(args.vm()?)),
        "snapshot" => ("snapshot", snapshot(&mut args)?),
        "fork" => ("fork", fork(&mut args)?),
        "restore" => ("restore", restore(&mut args)?),
        "rmap" => ("rmap", rmap(&mut args)?),
        "migrate" => ("migrate", migrate(&mut args)?),
        "evacuate" => ("evacuate", evacuate(&mut args)?),
        "online" => ("online", online(&mut args)?),
        "reclaim" => ("reclaim", reclaim(&mut args)?),
        "chaos" => ("chaos", chaos(&mut args)?),
        "wait" => ("wait", wait(&mut args)?),
        "bench" => ("bench", bench(&mut args)?),
        "sleep" => ("sleep", sleep(&mut args)?),
        "console" => ("console", console(&mut args)?),
        "disk" => ("disk", disk(&mut args)?),
        "create" => ("create", create(&mut args)?),
        "merge" => ("merge", merge(&mut args)?),
        "save" => ("save", save(&mut args)?),
        "load" => ("load", load(&mut args)?),
        "images" => ("images", Command::Images),
        "delete" => ("delete", delete(&mut args)?),
        _ => return Err(ParseError::Unknown(String::from(word))),
    };
    args.done(name)?;
    Ok(Some(cmd))
}

const CREATE_USAGE: &str = "create linux|test [--mem MiB] [--vcpus N] [--cmdline ARGS...]";
const MERGE_USAGE: &str =
    "merge | merge auto <pages-per-second> | merge off | merge group <vm> <group> | merge list [n]";

/// `create <guest> [--mem MiB] [--vcpus N] [--cmdline ARGS...]`: the flags
/// in any order (the last of a repeated one counts); the command line is the
/// rest of the line, after `--cmdline` or from the first word that is no flag.
fn create(args: &mut Args) -> Result<Command> {
    let guest = match args.0.next() {
        Some("linux") => Guest::Linux,
        Some("test") => Guest::Test,
        _ => return Err(ParseError::Usage(CREATE_USAGE)),
    };
    let mut c = Create {
        guest,
        mem_mib: None,
        vcpus: None,
        cmdline: None,
    };
    while let Some(word) = args.0.next() {
        match word {
            "--mem" => c.mem_mib = Some(args.num("MiB", 1..=1 << 20)?),
            "--vcpus" => c.vcpus = Some(narrow(args.num("vCPUs", 1..=16)?, "vCPUs", 1..=16)?),
            "--cmdline" => {
                let rest: alloc::vec::Vec<&str> = args.0.by_ref().collect();
                let words =
                    Words::new(&rest.join(" ")).ok_or(ParseError::Missing("command line"))?;
                c.cmdline = Some(words);
            }
            w if w.starts_with("--") => return Err(ParseError::Usage(CREATE_USAGE)),
            w => {
                let rest: alloc::vec::Vec<&str> =
                    core::iter::once(w).chain(args.0.by_ref()).collect();
                c.cmdline = Words::new(&rest.join(" "));
            }
        }
    }
    Ok(Command::Create(c))
}

/// `merge group <vm> <group>` (the merger's own subcommands come later).
fn merge(args: &mut Args) -> Result<Command> {
    match args.0.next() {
        None => Ok(Command::Merge),
        Some("auto") => {
            let rate = args.num("pages per second", 1..=MAX_MERGE_RATE)?;
            Ok(Command::MergeAuto { rate })
        }
        Some("off") => Ok(Command::MergeOff),
        Some("list") => {
            let count = args.opt_num("count", 1..=MAX_MERGE_LIST)?.unwrap_or(8);
            Ok(Command::MergeList { count })
        }
        Some("group") => {
            let vm = args.vm()?;
            let group = args.num("group", 1..=MAX_GROUP as u64)?;
            let group = narrow(group, "group", 1..=MAX_GROUP as u64)?;
            Ok(Command::MergeGroup { vm, group })
        }
        _ => Err(ParseError::Usage(MERGE_USAGE)),
    }
}

fn console(args: &mut Args) -> Result<Command> {
    let arg = args.next("VM id or `hyp`")?;
    if arg == "hyp" {
        return Ok(Command::Console(Focus::Hypervisor));
    }
    arg.parse()
        .map(|id| Command::Console(Focus::Vm(VmId(id))))
        .map_err(|_| ParseError::NotVmId(String::from(arg)))
}

fn fork(args: &mut Args) -> Result<Command> {
    let (vm, count) = vm_count(args)?;
    Ok(Command::Fork { vm, count })
}

fn snapshot(args: &mut Args) -> Result<Command> {
    let (vm, count) = vm_count(args)?;
    Ok(Command::Snapshot { vm, count })
}

/// `<vm> [n]`, n in 1..=1000 and 1 when not typed (`fork`, `snapshot`).
fn vm_count(args: &mut Args) -> Result<(VmId, u32)> {
    let vm = args.vm()?;
    let count = args.opt_num("count", 1..=1000)?.unwrap_or(1);
    Ok((vm, narrow(count, "count", 1..=1000)?))
}

fn restore(args: &mut Args) -> Result<Command> {
    let vm = args.vm()?;
    let snapshot = args.vm()?;
    Ok(Command::Restore { vm, snapshot })
}

fn rmap(args: &mut Args) -> Result<Command> {
    let arg = args.next("physical address")?;
    let pa = hex(arg).ok_or_else(|| ParseError::NotHex {
        what: "address",
        arg: String::from(arg),
    })?;
    Ok(Command::Rmap { pa })
}

fn migrate(args: &mut Args) -> Result<Command> {
    let vm = args.vm()?;
    let range = args.range("IPA", "IPA end")?;
    let batch = args.batch()?;
    Ok(Command::Migrate { vm, range, batch })
}

fn evacuate(args: &mut Args) -> Result<Command> {
    let range = args.range("PA", "PA end")?;
    let batch = args.batch()?;
    Ok(Command::Evacuate { range, batch })
}

fn online(args: &mut Args) -> Result<Command> {
    let range = args.range("PA", "PA end")?;
    Ok(Command::Online { range })
}

fn reclaim(args: &mut Args) -> Result<Command> {
    let pages = args.num("page count", 1..=1 << 24)?;
    let batch = args.batch()?;
    Ok(Command::Reclaim { pages, batch })
}

fn chaos(args: &mut Args) -> Result<Command> {
    let secs = args.num("seconds", 1..=600)?;
    let seed = args.opt_num("seed", 0..=u64::MAX)?.unwrap_or(1);
    let max_vms = args.opt_num("max VMs", 1..=64)?.unwrap_or(12);
    Ok(Command::Chaos {
        secs,
        seed,
        max_vms: narrow(max_vms, "max VMs", 1..=64)?,
    })
}

fn wait(args: &mut Args) -> Result<Command> {
    let secs = args.num("seconds", 1..=3600)?;
    Ok(Command::Wait { secs })
}

fn bench(args: &mut Args) -> Result<Command> {
    match args.0.next() {
        Some("fork") => {
            let mib = args
                .num("MiB", 1..=4096)
                .map_err(|_| ParseError::Usage(BENCH_FORK_USAGE))?;
            let forks = args.opt_num("forks", 1..=1000)?.map(|n| n as u32); // in range: fits
            Ok(Command::BenchFork { mib, forks })
        }
        Some("migrate") => {
            let mappers = args.num("mappers", 1..=200)?;
            let pages = args.num("pages", 1..=65536)?;
            let batch = args.num("batch", BATCH)?;
            let batch = narrow(batch, "batch", BATCH)?;
            let blocks = flag(args, "blocks", BENCH_USAGE)?;
            Ok(Command::BenchMigrate {
                mappers,
                pages,
                batch,
                blocks,
            })
        }
        Some("reclaim") => {
            let pages = args.num("pages", 1..=65536)?;
            let batch = narrow(args.num("batch", BATCH)?, "batch", BATCH)?;
            Ok(Command::BenchReclaim { pages, batch })
        }
        Some("merge") => {
            let pages = args.num("pages", 1..=65536)?;
            Ok(Command::BenchMerge { pages })
        }
        Some("disk") => {
            let mib = args.opt_num("MiB", 1..=1024)?.unwrap_or(64);
            let passes = args.opt_num("passes", 1..=15)?.unwrap_or(5) as u32; // in range: fits
            let at = match args.0.next() {
                None => None,
                Some("at") => Some(args.num("LBA", 0..=u64::MAX)?),
                Some(arg) => {
                    return Err(ParseError::Extra {
                        cmd: "bench",
                        arg: String::from(arg),
                    })
                }
            };
            Ok(Command::BenchDisk { mib, passes, at })
        }
        _ => Err(ParseError::Usage(BENCH_USAGE)),
    }
}

const DISK_USAGE: &str = "disk | disk sum <lba> <sectors> | disk fill <lba> <sectors> <seed>";
/// Sectors one `disk sum` or `disk fill` covers at most (1 GiB).
const DISK_SECTORS: RangeInclusive<u64> = 1..=1 << 21;

fn disk(args: &mut Args) -> Result<Command> {
    match args.0.next() {
        None => Ok(Command::Disk),
        Some("sum") => {
            let lba = args.num("LBA", 0..=u64::MAX)?;
            let sectors = args.num("sectors", DISK_SECTORS)?;
            Ok(Command::DiskSum { lba, sectors })
        }
        Some("fill") => {
            let lba = args.num("LBA", 0..=u64::MAX)?;
            let sectors = args.num("sectors", DISK_SECTORS)?;
            let seed = args.num("seed", 0..=u64::MAX)?;
            Ok(Command::DiskFill { lba, sectors, seed })
        }
        Some(_) => Err(ParseError::Usage(DISK_USAGE)),
    }
}

const SAVE_USAGE: &str =
    "save <vm> <name> [--diff <parent>] (names: 1-32 printable characters, no `-` first)";
const LOAD_USAGE: &str = "load <name> [--no-prefetch]";
const DELETE_USAGE: &str = "delete <name>";

fn snap_name(args: &mut Args, usage: &'static str) -> Result<SnapName> {
    SnapName::new(args.next("snapshot name")?).ok_or(ParseError::Usage(usage))
}

fn save(args: &mut Args) -> Result<Command> {
    let vm = args.vm()?;
    let name = snap_name(args, SAVE_USAGE)?;
    let parent = match args.0.next() {
        None => None,
        Some("--diff") => Some(snap_name(args, SAVE_USAGE)?),
        Some(_) => return Err(ParseError::Usage(SAVE_USAGE)),
    };
    Ok(Command::Save { vm, name, parent })
}

fn delete(args: &mut Args) -> Result<Command> {
    let name = snap_name(args, DELETE_USAGE)?;
    Ok(Command::Delete { name })
}

fn load(args: &mut Args) -> Result<Command> {
    let name = snap_name(args, LOAD_USAGE)?;
    let prefetch = !flag(args, "--no-prefetch", LOAD_USAGE)?;
    Ok(Command::Load { name, prefetch })
}

/// Whether the optional last word `word` was typed (anything else: `usage`).
fn flag(args: &mut Args, word: &str, usage: &'static str) -> Result<bool> {
    match args.0.next() {
        None => Ok(false),
        Some(w) if w == word => Ok(true),
        Some(_) => Err(ParseError::Usage(usage)),
    }
}

fn sleep(args: &mut Args) -> Result<Command> {
    let ms = args
        .num("ms", 1..=60_000)
        .map_err(|_| ParseError::Usage(SLEEP_USAGE))?;
    Ok(Command::Sleep { ms })
}

/// A hex `u64`, with or without `0x`.
fn hex(arg: &str) -> Option<u64> {
    let digits = arg.strip_prefix("0x").unwrap_or(arg);
    u64::from_str_radix(digits, 16).ok()
}

/// `n` (already checked against `range`) as a narrower integer; the range
/// is repeated so that a too-wide range is an error, not a truncation.
fn narrow<T: TryFrom<u64>>(n: u64, what: &'static str, range: RangeInclusive<u64>) -> Result<T> {
    T::try_from(n).map_err(|_| ParseError::OutOfRange {
        what,
        arg: alloc::format!("{n}"),
        min: *range.start(),
        max: *range.end(),
    })
}

/// The words after the command.
struct Args<'a>(SplitWhitespace<'a>);

impl<'a> Args<'a> {
    fn next(&mut self, what: &'static str) -> Result<&'a str> {
        self.0.next().ok_or(ParseError::Missing(what))
    }

    fn vm(&mut self) -> Result<VmId> {
        let arg = self.next("VM id")?;
        arg.parse()
            .map(VmId)
            .map_err(|_| ParseError::NotVmId(String::from(arg)))
    }

    fn num(&mut self, what: &'static str, range: RangeInclusive<u64>) -> Result<u64> {
        let arg = self.next(what)?;
        check_num(arg, what, range)
    }

    fn opt_num(&mut self, what: &'static str, range: RangeInclusive<u64>) -> Result<Option<u64>> {
        self.0
            .next()
            .map(|arg| check_num(arg, what, range))
            .transpose()
    }

    fn batch(&mut self) -> Result<Option<usize>> {
        self.opt_num("batch", BATCH)?
            .map(|b| narrow(b, "batch", BATCH))
            .transpose()
    }

    /// `[start, end)` from two hex words: the start rounded down to its
    /// page, the end up to a page boundary (an error past the last page).
    fn range(&mut self, what: &'static str, what_end: &'static str) -> Result<PageRange> {
        let arg = self.next(what)?;
        let start = hex(arg).ok_or_else(|| ParseError::NotHex {
            what,
            arg: String::from(arg),
        })? & !(PAGE_SIZE - 1);
        let arg = self.next(what_end)?;
        let end = hex(arg).ok_or_else(|| ParseError::NotHex {
            what: what_end,
            arg: String::from(arg),
        })?;
        let end =
            end.checked_next_multiple_of(PAGE_SIZE)
                .ok_or_else(|| ParseError::EndOverflow {
                    what: what_end,
                    arg: String::from(arg),
                })?;
        PageRange::new(start, end).ok_or(ParseError::EmptyRange { start, end })
    }

    /// Fails on any word left over.
    fn done(mut self, cmd: &'static str) -> Result<()> {
        match self.0.next() {
            None => Ok(()),
            Some(arg) => Err(ParseError::Extra {
                cmd,
                arg: String::from(arg),
            }),
        }
    }
}

fn check_num(arg: &str, what: &'static str, range: RangeInclusive<u64>) -> Result<u64> {
    arg.parse()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| ParseError::OutOfRange {
            what,
            arg: String::from(arg),
            min: *range.start(),
            max: *range.end(),
        })
}
