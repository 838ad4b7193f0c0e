//! `create` and `merge group` (issue 16's independent VMs and trust groups):
//! each form, and each way a line can be wrong, with the console's message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::{err, ok};
use hypcmd::{Command, Create, Guest, VmId, Words};

fn create(guest: Guest, mem: Option<u64>, vcpus: Option<usize>, cmdline: Option<&str>) -> Command {
    Command::Create(Create {
        guest,
        mem_mib: mem,
        vcpus,
        cmdline: cmdline.map(|c| Words::new(c).unwrap()),
    })
}

#[test]
fn create_takes_a_guest_and_optional_flags() {
    assert_eq!(ok("create linux"), create(Guest::Linux, None, None, None));
    assert_eq!(ok("create test"), create(Guest::Test, None, None, None));
    assert_eq!(
        ok("create linux --mem 512 --vcpus 2"),
        create(Guest::Linux, Some(512), Some(2), None)
    );
    // Any order; the last of a repeated flag counts.
    assert_eq!(
        ok("create linux --vcpus 1 --mem 64 --vcpus 3"),
        create(Guest::Linux, Some(64), Some(3), None)
    );
}

#[test]
fn the_command_line_is_the_rest_of_the_line() {
    assert_eq!(
        ok("create linux --mem 256 --cmdline console=ttyAMA0  rdinit=/init --mem 9"),
        create(
            Guest::Linux,
            Some(256),
            None,
            Some("console=ttyAMA0 rdinit=/init --mem 9")
        )
    );
    // The first word that is no flag starts the test guest's arguments.
    assert_eq!(
        ok("create test --vcpus 1 fork-bomb secs=3"),
        create(Guest::Test, None, Some(1), Some("fork-bomb secs=3"))
    );
    // Both spellings are one value, printed with `--cmdline`.
    assert_eq!(ok("create test a b"), ok("create test --cmdline a b"));
    assert_eq!(
        ok("create test a  b").to_string(),
        "create test --cmdline a b"
    );
}

#[test]
fn create_errors_name_what_is_wrong() {
    let usage = "usage: create linux|test [--mem MiB] [--vcpus N] [--cmdline ARGS...]";
    assert_eq!(err("create"), usage);
    assert_eq!(err("create windows"), usage);
    assert_eq!(err("create linux --mme 5"), usage);
    assert_eq!(err("create linux --mem"), "missing MiB");
    assert_eq!(err("create linux --mem 0"), "bad MiB '0' (1..=1048576)");
    assert_eq!(
        err("create linux --mem 1048577"),
        "bad MiB '1048577' (1..=1048576)"
    );
    assert_eq!(err("create test --vcpus 17"), "bad vCPUs '17' (1..=16)");
    assert_eq!(err("create linux --cmdline"), "missing command line");
}

#[test]
fn merge_group_takes_a_vm_and_a_group() {
    assert_eq!(
        ok("merge group 3 7"),
        Command::MergeGroup {
            vm: VmId(3),
            group: 7
        }
    );
    assert_eq!(ok("merge group 3 7").to_string(), "merge group 3 7");
    assert_eq!(ok("merge"), Command::Merge, "a bare merge is a pass");
    assert_eq!(ok("merge auto 4096"), Command::MergeAuto { rate: 4096 });
    assert_eq!(ok("merge off"), Command::MergeOff);
    assert_eq!(ok("merge list"), Command::MergeList { count: 8 });
    assert_eq!(ok("merge list 100"), Command::MergeList { count: 100 });
    assert_eq!(ok("merge list 5").to_string(), "merge list 5");
    assert_eq!(err("merge list 0"), "bad count '0' (1..=4096)");
    assert_eq!(ok("bench merge 1024"), Command::BenchMerge { pages: 1024 });
    assert_eq!(ok("bench merge 7").to_string(), "bench merge 7");
    assert_eq!(err("bench merge"), "missing pages");
    assert_eq!(err("merge auto"), "missing pages per second");
    assert_eq!(
        err("merge auto 0"),
        "bad pages per second '0' (1..=16777216)"
    );
    assert_eq!(
        err("merge grup 1 2"),
        "usage: merge | merge auto <pages-per-second> | merge off | merge group <vm> <group> | merge list [n]"
    );
    assert_eq!(err("merge group 1"), "missing group");
    assert_eq!(err("merge group x 1"), "'x' is not a VM id");
    assert_eq!(err("merge group 1 0"), "bad group '0' (1..=1000000)");
    assert_eq!(
        err("merge group 1 2 3"),
        "unexpected argument '3' to `merge` (see `help`)"
    );
}
