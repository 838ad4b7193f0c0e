//! Properties: no line makes the request parser panic (arbitrary strings,
//! and JSON objects built from the protocol's own field names and edge
//! values), an accepted request is one the console parser accepts too, and
//! every command the channel takes round-trips through its request line.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use hypapi::{parse_request, request_line, Value};
use hypcmd::{Command, Create, Guest, PageRange, SnapName, VmId, Words, PAGE_SIZE};
use proptest::prelude::*;

const NAMES: &[&str] = &[
    "id", "v", "cmd", "vm", "count", "start", "end", "batch", "pa", "pages", "snapshot", "x",
    "guest", "mem", "vcpus", "cmdline", "op", "group",
];
const CMDS: &[&str] = &[
    "help", "vms", "stats", "quit", "pause", "resume", "destroy", "fork", "snapshot", "restore",
    "rmap", "migrate", "evacuate", "online", "reclaim", "wait", "console", "", "create", "merge",
];

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "0",
            "1",
            "-1",
            "1.5",
            "1e3",
            "4096",
            "4097",
            "1000",
            "1001",
            "4294967295",
            "4294967296",
            "18446744073709551615",
            "18446744073709551616",
            "null",
            "true",
            "[]",
            "{}",
            "\"0x1000\"",
            "\"0xfffffffffffff000\"",
            "\"0x\"",
            "\"zz\"",
            "\"1\"",
            "\"linux\"",
            "\"test\"",
            "\"group\"",
            "\"--mem 5\"",
            "\"a  b\"",
            "\"\"",
        ])
        .prop_map(String::from),
        prop::sample::select(CMDS.to_vec()).prop_map(|c| format!("{c:?}")),
        any::<u64>().prop_map(|n| n.to_string()),
    ]
}

fn object() -> impl Strategy<Value = String> {
    prop::collection::vec((prop::sample::select(NAMES.to_vec()), value()), 0..8).prop_map(
        |fields| {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
            format!("{{{}}}", body.join(","))
        },
    )
}

fn command() -> impl Strategy<Value = Command> {
    let vm = (1u32..10).prop_map(VmId);
    let range = (0u64..1 << 30, 1u64..1 << 20).prop_map(|(s, n)| {
        let start = s * PAGE_SIZE;
        PageRange::new(start, start + n * PAGE_SIZE).unwrap()
    });
    let batch = prop::option::of(1usize..=4096);
    prop_oneof![
        Just(Command::Vms),
        Just(Command::Stats),
        vm.clone().prop_map(Command::Pause),
        (vm.clone(), 1u32..=1000).prop_map(|(vm, count)| Command::Fork { vm, count }),
        (vm.clone(), 1u32..=1000).prop_map(|(vm, count)| Command::Snapshot { vm, count }),
        (vm.clone(), vm.clone()).prop_map(|(vm, snapshot)| Command::Restore { vm, snapshot }),
        any::<u64>().prop_map(|pa| Command::Rmap { pa }),
        (vm, range.clone(), batch.clone()).prop_map(|(vm, range, batch)| Command::Migrate {
            vm,
            range,
            batch
        }),
        (range.clone(), batch.clone())
            .prop_map(|(range, batch)| Command::Evacuate { range, batch }),
        range.prop_map(|range| Command::Online { range }),
        (1u64..=1 << 24, batch).prop_map(|(pages, batch)| Command::Reclaim { pages, batch }),
        prop_oneof![
            Just(Command::Disk),
            (any::<u64>(), 1u64..=1 << 21)
                .prop_map(|(lba, sectors)| Command::DiskSum { lba, sectors }),
            (any::<u64>(), 1u64..=1 << 21, any::<u64>())
                .prop_map(|(lba, sectors, seed)| Command::DiskFill { lba, sectors, seed }),
        ],
        create().prop_map(Command::Create),
        ((1u32..10).prop_map(VmId), 1u32..=hypcmd::MAX_GROUP)
            .prop_map(|(vm, group)| Command::MergeGroup { vm, group }),
        prop_oneof![
            Just(Command::Merge),
            Just(Command::MergeOff),
            (1u64..=hypcmd::MAX_MERGE_RATE).prop_map(|rate| Command::MergeAuto { rate }),
            (1u64..=hypcmd::MAX_MERGE_LIST).prop_map(|count| Command::MergeList { count }),
        ],
        prop_oneof![
            (1u32..10, name(), prop::option::of(name())).prop_map(|(vm, name, parent)| {
                Command::Save {
                    vm: VmId(vm),
                    name,
                    parent,
                }
            }),
            (name(), any::<bool>()).prop_map(|(name, prefetch)| Command::Load { name, prefetch }),
        ],
    ]
}

fn create() -> impl Strategy<Value = Create> {
    let guest = prop_oneof![Just(Guest::Linux), Just(Guest::Test)];
    let words = prop::collection::vec("[^\\s]{1,12}|--mem|--vcpus|--cmdline|7", 1..5)
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

/// Valid snapshot names (hypcmd's rule), some looking like options.
fn name() -> impl Strategy<Value = SnapName> {
    "[!-,.-~][!-~]{0,31}".prop_map(|s| SnapName::new(&s).expect("a valid name"))
}

proptest! {
    #[test]
    fn any_string_is_a_request_or_an_error(line in ".{0,200}") {
        let _ = parse_request(&line);
    }

    #[test]
    fn protocol_shaped_objects_never_panic_and_agree_with_the_console(line in object()) {
        if let Ok(req) = parse_request(&line) {
            let again = request_line(&req.id, &req.cmd).expect("an accepted command is on the channel");
            prop_assert_eq!(parse_request(&again).map(|r| r.cmd), Ok(req.cmd.clone()));
            prop_assert_eq!(hypcmd::parse(&req.cmd.to_string()), Ok(Some(req.cmd)));
        }
    }

    #[test]
    fn commands_round_trip(cmd in command(), id in any::<u32>()) {
        let line = request_line(&Value::from(id), &cmd).expect("on the channel");
        let req = parse_request(&line).expect("its own line parses");
        prop_assert_eq!(req.id, Value::from(id));
        prop_assert_eq!(req.cmd, cmd);
    }
}
