//! Properties: no line and no bootargs string makes a parser panic (arbitrary
//! unicode, arbitrary bytes, and lines built from console words and edge
//! numbers, which is how overflows are found), and every valid command
//! printed in the console syntax parses back to itself.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use hypcmd::bootargs::{parse_range, parse_size, BootArgs};
use hypcmd::{
    parse, Command, Create, Focus, Guest, PageRange, SnapName, VmId, Words, MAX_GROUP, PAGE_SIZE,
};
use proptest::prelude::*;

/// A parse that succeeded must describe itself: printing it and parsing
/// again gives the same command.
fn check_line(line: &str) {
    if let Ok(Some(cmd)) = parse(line) {
        assert_eq!(parse(&cmd.to_string()), Ok(Some(cmd.clone())), "{line:?}");
    }
    // Messages are total too.
    if let Err(e) = parse(line) {
        let _ = e.to_string();
    }
}

/// Numbers near every boundary the parser checks, in hex and decimal.
fn number() -> impl Strategy<Value = String> {
    let edge = prop_oneof![
        Just(0u64),
        Just(1),
        Just(PAGE_SIZE - 1),
        Just(PAGE_SIZE),
        Just(4096 + 1),
        Just(1000),
        Just(1001),
        Just(60_000),
        Just(1 << 24),
        Just(u32::MAX as u64),
        Just(u32::MAX as u64 + 1),
        Just(u64::MAX - PAGE_SIZE),
        Just(u64::MAX - PAGE_SIZE + 1),
        Just(u64::MAX - 1),
        Just(u64::MAX),
        any::<u64>(),
        0u64..0x1_0000_0000,
    ];
    prop_oneof![
        2 => edge.clone().prop_map(|n| format!("{n}")),
        3 => edge.clone().prop_map(|n| format!("{n:x}")),
        2 => edge.prop_map(|n| format!("{n:#x}")),
        1 => prop::sample::select(&[
            "18446744073709551616", "10000000000000000", "0x10000000000000000", "-1", "+5",
            "0x", "0x0x10", "",
        ][..]).prop_map(String::from),
        1 => "[0-9a-fA-Fx+-]{0,24}",
    ]
}

const COMMANDS: &[&str] = &[
    "help", "vms", "stats", "pause", "resume", "destroy", "fork", "snapshot", "restore", "rmap",
    "migrate", "evacuate", "online", "reclaim", "chaos", "wait", "bench", "sleep", "quit",
    "console", "hyp", "disk", "create", "merge",
];

/// A console-like line: a command word (usually), then arguments that are
/// mostly numbers, with the `bench` subcommands in their place.
fn console_line() -> impl Strategy<Value = String> {
    let first = prop_oneof![
        9 => prop::sample::select(COMMANDS).prop_map(String::from),
        1 => any::<String>(),
    ];
    let arg = prop_oneof![
        8 => number(),
        1 => prop::sample::select(&["fork", "migrate", "reclaim", "disk", "sum", "fill", "x", "é"][..]).prop_map(String::from),
        1 => prop::sample::select(&["linux", "test", "--mem", "--vcpus", "--cmdline", "--", "group"][..]).prop_map(String::from),
        1 => any::<String>(),
    ];
    (first, prop::collection::vec(arg, 0..6), "[ \t]{1,3}").prop_map(|(first, rest, sep)| {
        let mut line = first;
        for w in rest {
            line.push_str(&sep);
            line.push_str(&w);
        }
        line
    })
}

fn vm() -> impl Strategy<Value = VmId> {
    any::<u32>().prop_map(VmId)
}

fn page_range() -> impl Strategy<Value = PageRange> {
    let last = u64::MAX / PAGE_SIZE; // pages 0..last end at most at the last page
    (0..last, 1..=last)
        .prop_filter("non-empty", |(a, b)| a < b)
        .prop_map(|(a, b)| PageRange::new(a * PAGE_SIZE, b * PAGE_SIZE).unwrap())
}

fn batch() -> impl Strategy<Value = usize> {
    1usize..=4096
}

fn command() -> impl Strategy<Value = Command> {
    use Command::*;
    prop_oneof![
        prop_oneof![Just(Help), Just(Vms), Just(Stats), Just(Quit)],
        prop_oneof![
            vm().prop_map(Pause),
            vm().prop_map(Resume),
            vm().prop_map(Destroy),
            vm().prop_map(|vm| Console(Focus::Vm(vm))),
            Just(Console(Focus::Hypervisor)),
        ],
        (vm(), 1u32..=1000).prop_map(|(vm, count)| Fork { vm, count }),
        (vm(), 1u32..=1000).prop_map(|(vm, count)| Snapshot { vm, count }),
        (vm(), vm()).prop_map(|(vm, snapshot)| Restore { vm, snapshot }),
        any::<u64>().prop_map(|pa| Rmap { pa }),
        (vm(), page_range(), prop::option::of(batch())).prop_map(|(vm, range, batch)| Migrate {
            vm,
            range,
            batch
        }),
        (page_range(), prop::option::of(batch()))
            .prop_map(|(range, batch)| Evacuate { range, batch }),
        page_range().prop_map(|range| Online { range }),
        (1u64..=1 << 24, prop::option::of(batch()))
            .prop_map(|(pages, batch)| Reclaim { pages, batch }),
        (1u64..=600, any::<u64>(), 1usize..=64).prop_map(|(secs, seed, max_vms)| Chaos {
            secs,
            seed,
            max_vms
        }),
        (1u64..=3600).prop_map(|secs| Wait { secs }),
        (1u64..=4096, prop::option::of(1u32..=1000))
            .prop_map(|(mib, forks)| BenchFork { mib, forks }),
        (1u64..=200, 1u64..=65536, batch(), any::<bool>()).prop_map(
            |(mappers, pages, batch, blocks)| BenchMigrate {
                mappers,
                pages,
                batch,
                blocks
            }
        ),
        (1u64..=65536, batch()).prop_map(|(pages, batch)| BenchReclaim { pages, batch }),
        (1u64..=60_000).prop_map(|ms| Sleep { ms }),
        prop_oneof![
            Just(Disk),
            (any::<u64>(), 1u64..=1 << 21).prop_map(|(lba, sectors)| DiskSum { lba, sectors }),
            (any::<u64>(), 1u64..=1 << 21, any::<u64>())
                .prop_map(|(lba, sectors, seed)| DiskFill { lba, sectors, seed }),
            (1u64..=1024, 1u32..=15, proptest::option::of(any::<u64>()))
                .prop_map(|(mib, passes, at)| BenchDisk { mib, passes, at }),
        ],
        create().prop_map(Create),
        (vm(), 1u32..=MAX_GROUP).prop_map(|(vm, group)| MergeGroup { vm, group }),
        prop_oneof![
            Just(Merge),
            Just(MergeOff),
            (1u64..=hypcmd::MAX_MERGE_RATE).prop_map(|rate| MergeAuto { rate }),
            (1u64..=hypcmd::MAX_MERGE_LIST).prop_map(|count| MergeList { count }),
            (1u64..=65536).prop_map(|pages| BenchMerge { pages }),
        ],
        prop_oneof![
            (vm(), snap_name(), prop::option::of(snap_name()))
                .prop_map(|(vm, name, parent)| { Save { vm, name, parent } }),
            (snap_name(), any::<bool>()).prop_map(|(name, prefetch)| Load { name, prefetch }),
            Just(Images),
            snap_name().prop_map(|name| Delete { name }),
        ],
    ]
}

/// `create` with any flags and a command line of arbitrary non-blank words
/// (which may themselves look like flags after `--cmdline`).
fn create() -> impl Strategy<Value = Create> {
    let guest = prop_oneof![Just(Guest::Linux), Just(Guest::Test)];
    let words = prop::collection::vec("[^\\s]{1,12}|--mem|--vcpus|5", 1..5)
        .prop_map(|w| Words::new(&w.join(" ")));
    (
        guest,
        prop::option::of(1u64..=1 << 20),
        prop::option::of(1usize..=16),
        prop::option::of(words),
    )
        .prop_map(|(guest, mem_mib, vcpus, cmdline)| Create {
            guest,
            mem_mib,
            vcpus,
            cmdline: cmdline.flatten(),
        })
}

/// Valid snapshot names: printable ASCII, 1 to 32 bytes, no `-` first.
fn snap_name() -> impl Strategy<Value = SnapName> {
    "[!-,.-~][!-~]{0,31}".prop_map(|s| SnapName::new(&s).expect("the pattern is a valid name"))
}

/// A bootargs-like line: `key=value` words with edge sizes and ranges.
fn bootargs_line() -> impl Strategy<Value = String> {
    let key = prop::sample::select(
        &[
            "guest", "vcpus", "mem", "args", "script", "stay", "kernel", "initrd", "x", "",
        ][..],
    );
    let size = (
        number(),
        prop::sample::select(&["", "K", "k", "M", "g", "G", "T"][..]),
    )
        .prop_map(|(n, u)| format!("{n}{u}"));
    let value = prop_oneof![
        size,
        (number(), number()).prop_map(|(a, b)| format!("{a}:{b}")),
        any::<String>(),
    ];
    let word = (key, prop::option::of(value)).prop_map(|(k, v)| match v {
        Some(v) => format!("{k}={v}"),
        None => k.to_string(),
    });
    (
        prop::collection::vec(word, 0..8),
        prop::option::of(any::<String>()),
    )
        .prop_map(|(words, tail)| {
            let mut line = words.join(" ");
            if let Some(tail) = tail {
                line.push_str(" -- ");
                line.push_str(&tail);
            }
            line
        })
}

fn check_bootargs(line: &str) {
    let args = BootArgs::parse(line);
    let [kernel, initrd] = BootArgs::image_ranges(line);
    // The reserved ranges are the ones the full parse found.
    assert_eq!((kernel, initrd), (args.kernel, args.initrd), "{line:?}");
    for r in [kernel, initrd].into_iter().flatten() {
        assert!(r.base.checked_add(r.size).is_some());
    }
    for word in line.split_whitespace() {
        let _ = parse_size(word);
        let _ = parse_range(word);
    }
}

proptest! {
    // Structured lines are where the deep paths are: more cases.
    #![proptest_config(ProptestConfig::with_cases(16384))]

    #[test]
    fn console_like_lines_parse_or_are_rejected(line in console_line()) {
        check_line(&line);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn any_unicode_line_parses_or_is_rejected(line in any::<String>()) {
        check_line(&line);
    }

    #[test]
    fn any_bytes_parse_or_are_rejected(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_line(&String::from_utf8_lossy(&bytes));
    }


    #[test]
    fn every_command_round_trips_through_its_syntax(cmd in command()) {
        let line = cmd.to_string();
        prop_assert_eq!(parse(&line), Ok(Some(cmd.clone())), "{}", line);
        // Spacing is not syntax.
        let spaced = format!("\t {} \t", line.replace(' ', "   "));
        prop_assert_eq!(parse(&spaced), Ok(Some(cmd)), "{}", spaced);
    }

    #[test]
    fn any_bootargs_parse_without_panic(line in any::<String>()) {
        check_bootargs(&line);
    }

    #[test]
    fn any_bootargs_bytes_parse_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_bootargs(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn bootargs_like_lines_parse_without_panic(line in bootargs_line()) {
        check_bootargs(&line);
    }
}
