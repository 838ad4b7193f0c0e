//! Each console command, and each way a line can be wrong, with the message
//! the console prints for it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::{err, ok};
use hypcmd::{parse, Command, Focus, PageRange, ParseError, VmId};

fn range(start: u64, end: u64) -> PageRange {
    PageRange::new(start, end).unwrap()
}

#[test]
fn blank_lines_are_no_command() {
    for line in ["", " ", "\t  \t", "\u{a0}\u{2003}"] {
        assert_eq!(parse(line), Ok(None), "{line:?}");
    }
}

#[test]
fn console_takes_a_vm_or_hyp() {
    assert_eq!(ok("console 7"), Command::Console(Focus::Vm(VmId(7))));
    assert_eq!(ok("console hyp"), Command::Console(Focus::Hypervisor));
    assert_eq!(err("console"), "missing VM id or `hyp`");
    assert_eq!(err("console vm1"), "'vm1' is not a VM id");
    assert_eq!(
        err("console 1 2"),
        "unexpected argument '2' to `console` (see `help`)"
    );
}

#[test]
fn commands_without_arguments() {
    assert_eq!(ok("help"), Command::Help);
    assert_eq!(ok("  vms  "), Command::Vms);
    assert_eq!(ok("stats"), Command::Stats);
    assert_eq!(ok("quit"), Command::Quit);
    assert_eq!(
        err("vms 1"),
        "unexpected argument '1' to `vms` (see `help`)"
    );
    assert_eq!(
        err("quit now"),
        "unexpected argument 'now' to `quit` (see `help`)"
    );
}

#[test]
fn vm_commands() {
    assert_eq!(ok("pause 1"), Command::Pause(VmId(1)));
    assert_eq!(ok("resume 2"), Command::Resume(VmId(2)));
    assert_eq!(ok("destroy 4294967295"), Command::Destroy(VmId(u32::MAX)));
    assert_eq!(
        ok("snapshot 3"),
        Command::Snapshot {
            vm: VmId(3),
            count: 1
        }
    );
    assert_eq!(
        ok("restore 1 2"),
        Command::Restore {
            vm: VmId(1),
            snapshot: VmId(2)
        }
    );
    assert_eq!(err("pause"), "missing VM id");
    assert_eq!(err("destroy x"), "'x' is not a VM id");
    assert_eq!(err("resume 4294967296"), "'4294967296' is not a VM id");
    assert_eq!(err("snapshot -1"), "'-1' is not a VM id");
    assert_eq!(err("restore 1"), "missing VM id");
    assert_eq!(err("restore x 1"), "'x' is not a VM id");
    assert_eq!(
        err("pause 1 2"),
        "unexpected argument '2' to `pause` (see `help`)"
    );
}

#[test]
fn fork_counts() {
    assert_eq!(
        ok("fork 1"),
        Command::Fork {
            vm: VmId(1),
            count: 1
        }
    );
    assert_eq!(
        ok("fork 1 8"),
        Command::Fork {
            vm: VmId(1),
            count: 8
        }
    );
    assert_eq!(
        ok("fork 1 1000"),
        Command::Fork {
            vm: VmId(1),
            count: 1000
        }
    );
    assert_eq!(err("fork"), "missing VM id");
    assert_eq!(err("fork 1 0"), "bad count '0' (1..=1000)");
    assert_eq!(err("fork 1 1001"), "bad count '1001' (1..=1000)");
    assert_eq!(err("fork 1 -3"), "bad count '-3' (1..=1000)");
    assert_eq!(
        err("fork 1 99999999999999999999"),
        "bad count '99999999999999999999' (1..=1000)"
    );
    assert_eq!(
        err("fork 1 2 3"),
        "unexpected argument '3' to `fork` (see `help`)"
    );
}

#[test]
fn snapshot_counts() {
    assert_eq!(
        ok("snapshot 1 1000"),
        Command::Snapshot {
            vm: VmId(1),
            count: 1000
        }
    );
    assert_eq!(
        ok("snapshot 7 4"),
        Command::Snapshot {
            vm: VmId(7),
            count: 4
        }
    );
    assert_eq!(err("snapshot"), "missing VM id");
    assert_eq!(err("snapshot 1 0"), "bad count '0' (1..=1000)");
    assert_eq!(err("snapshot 1 1001"), "bad count '1001' (1..=1000)");
    assert_eq!(err("snapshot x 2"), "'x' is not a VM id");
    assert_eq!(
        err("snapshot 1 2 3"),
        "unexpected argument '3' to `snapshot` (see `help`)"
    );
}

#[test]
fn rmap_takes_hex() {
    assert_eq!(ok("rmap 0x40000000"), Command::Rmap { pa: 0x4000_0000 });
    assert_eq!(ok("rmap ffffffffffffffff"), Command::Rmap { pa: u64::MAX });
    assert_eq!(err("rmap"), "missing physical address");
    assert_eq!(err("rmap 0xg"), "'0xg' is not a hex address");
    assert_eq!(err("rmap 0x"), "'0x' is not a hex address");
    assert_eq!(
        err("rmap 10000000000000000"),
        "'10000000000000000' is not a hex address"
    );
}

#[test]
fn migrate_ranges_are_page_aligned() {
    assert_eq!(
        ok("migrate 1 0x40000000 0x50000000"),
        Command::Migrate {
            vm: VmId(1),
            range: range(0x4000_0000, 0x5000_0000),
            batch: None
        }
    );
    assert_eq!(
        ok("migrate 2 40000123 40001001 64"),
        Command::Migrate {
            vm: VmId(2),
            range: range(0x4000_0000, 0x4000_2000),
            batch: Some(64)
        }
    );
    assert_eq!(err("migrate 1"), "missing IPA");
    assert_eq!(err("migrate 1 40000000"), "missing IPA end");
    assert_eq!(err("migrate 1 zz 40000000"), "'zz' is not a hex IPA");
    assert_eq!(err("migrate 1 0 zz"), "'zz' is not a hex IPA end");
    assert_eq!(
        err("migrate 1 40001000 40001000"),
        "empty range 0x40001000..0x40001000"
    );
    assert_eq!(err("migrate 1 40000000 0 1"), "empty range 0x40000000..0x0");
    assert_eq!(
        err("migrate 1 40000000 50000000 0"),
        "bad batch '0' (1..=4096)"
    );
    assert_eq!(
        err("migrate 1 40000000 50000000 4097"),
        "bad batch '4097' (1..=4096)"
    );
}

#[test]
fn range_ends_past_the_last_page_are_errors_not_overflows() {
    // The lines that panicked `next_multiple_of` in a debug build.
    let overflow =
        "IPA end 'fffffffffffffff1' rounds up past the last page (at most 0xfffffffffffff000)";
    assert_eq!(err("migrate 1 40000000 fffffffffffffff1"), overflow);
    assert_eq!(
        err("online 0 ffffffffffffffff"),
        "PA end 'ffffffffffffffff' rounds up past the last page (at most 0xfffffffffffff000)"
    );
    assert_eq!(
        ok("online 0 fffffffffffff000"),
        Command::Online {
            range: range(0, 0xffff_ffff_ffff_f000)
        }
    );
    assert_eq!(
        ok("evacuate ffffffffffffe123 fffffffffffff000"),
        Command::Evacuate {
            range: range(0xffff_ffff_ffff_e000, 0xffff_ffff_ffff_f000),
            batch: None
        }
    );
    assert_eq!(
        err("evacuate ffffffffffffffff fffffffffffff000"),
        "empty range 0xfffffffffffff000..0xfffffffffffff000"
    );
}

#[test]
fn evacuate_online_reclaim() {
    assert_eq!(
        ok("evacuate 0x48000000 0x4a000000 16"),
        Command::Evacuate {
            range: range(0x4800_0000, 0x4a00_0000),
            batch: Some(16)
        }
    );
    assert_eq!(err("evacuate"), "missing PA");
    assert_eq!(err("online 1000"), "missing PA end");
    assert_eq!(
        err("online 1000 2000 3"),
        "unexpected argument '3' to `online` (see `help`)"
    );
    assert_eq!(
        ok("reclaim 20000"),
        Command::Reclaim {
            pages: 20000,
            batch: None
        }
    );
    assert_eq!(
        ok("reclaim 16777216 4096"),
        Command::Reclaim {
            pages: 1 << 24,
            batch: Some(4096)
        }
    );
    assert_eq!(err("reclaim"), "missing page count");
    assert_eq!(err("reclaim 0"), "bad page count '0' (1..=16777216)");
    assert_eq!(
        err("reclaim 16777217"),
        "bad page count '16777217' (1..=16777216)"
    );
    assert_eq!(err("reclaim 1 x"), "bad batch 'x' (1..=4096)");
}

#[test]
fn chaos_and_wait() {
    assert_eq!(
        ok("chaos 25"),
        Command::Chaos {
            secs: 25,
            seed: 1,
            max_vms: 12
        }
    );
    assert_eq!(
        ok("chaos 25 18446744073709551615 8"),
        Command::Chaos {
            secs: 25,
            seed: u64::MAX,
            max_vms: 8
        }
    );
    assert_eq!(err("chaos"), "missing seconds");
    assert_eq!(err("chaos 601"), "bad seconds '601' (1..=600)");
    assert_eq!(
        err("chaos 1 18446744073709551616"),
        "bad seed '18446744073709551616' (0..=18446744073709551615)"
    );
    assert_eq!(err("chaos 1 1 65"), "bad max VMs '65' (1..=64)");
    assert_eq!(ok("wait 150"), Command::Wait { secs: 150 });
    assert_eq!(err("wait 0"), "bad seconds '0' (1..=3600)");
    assert_eq!(err("wait"), "missing seconds");
}

#[test]
fn benches() {
    assert_eq!(
        ok("bench fork 64"),
        Command::BenchFork {
            mib: 64,
            forks: None
        }
    );
    assert_eq!(
        ok("bench fork 64 11"),
        Command::BenchFork {
            mib: 64,
            forks: Some(11)
        }
    );
    assert_eq!(err("bench fork 64 0"), "bad forks '0' (1..=1000)");
    assert_eq!(
        ok("bench migrate 10 1024 64"),
        Command::BenchMigrate {
            mappers: 10,
            pages: 1024,
            batch: 64,
            blocks: false
        }
    );
    assert_eq!(
        ok("bench migrate 100 1024 512 blocks"),
        Command::BenchMigrate {
            mappers: 100,
            pages: 1024,
            batch: 512,
            blocks: true
        }
    );
    assert_eq!(
        ok("bench reclaim 2048 1"),
        Command::BenchReclaim {
            pages: 2048,
            batch: 1
        }
    );
    let fork_usage = "usage: bench fork <MiB> [forks (1..=1000): only fork]";
    assert_eq!(err("bench fork"), fork_usage);
    assert_eq!(err("bench fork 4097"), fork_usage);
    let usage = "usage: bench fork <MiB> [forks] | bench migrate <mappers> <pages> <batch> [blocks] | bench reclaim <pages> <batch> | bench merge <pages> | bench disk [MiB] [passes] [at <lba>]";
    assert_eq!(err("bench"), usage);
    assert_eq!(err("bench frob"), usage);
    assert_eq!(err("bench migrate 201 1 1"), "bad mappers '201' (1..=200)");
    assert_eq!(
        err("bench migrate 1 65537 1"),
        "bad pages '65537' (1..=65536)"
    );
    assert_eq!(err("bench migrate 1 1"), "missing batch");
    assert_eq!(err("bench migrate 1 1 1 block"), usage);
    assert_eq!(err("bench reclaim 1 0"), "bad batch '0' (1..=4096)");
    assert_eq!(
        err("bench reclaim 1 1 1"),
        "unexpected argument '1' to `bench` (see `help`)"
    );
}

#[test]
fn disk_commands() {
    assert_eq!(ok("disk"), Command::Disk);
    assert_eq!(
        ok("disk sum 0 2048"),
        Command::DiskSum {
            lba: 0,
            sectors: 2048
        }
    );
    assert_eq!(
        ok("disk fill 18446744073709551615 1 7"),
        Command::DiskFill {
            lba: u64::MAX,
            sectors: 1,
            seed: 7
        }
    );
    let bench = |mib, passes, at| Command::BenchDisk { mib, passes, at };
    assert_eq!(ok("bench disk"), bench(64, 5, None));
    assert_eq!(ok("bench disk 256"), bench(256, 5, None));
    assert_eq!(ok("bench disk 54 1"), bench(54, 1, None));
    assert_eq!(ok("bench disk 54 1 at 131"), bench(54, 1, Some(131)));
    assert_eq!(err("bench disk 54 1 at"), "missing LBA");
    assert_eq!(
        err("bench disk 54 1 at x"),
        "bad LBA 'x' (0..=18446744073709551615)"
    );
    assert_eq!(
        err("bench disk 54 1 x 3"),
        "unexpected argument 'x' to `bench` (see `help`)"
    );
    assert_eq!(
        err("bench disk 54 1 at 8 9"),
        "unexpected argument '9' to `bench` (see `help`)"
    );
}

#[test]
fn sleep() {
    assert_eq!(ok("sleep 300"), Command::Sleep { ms: 300 });
    let usage = "usage: sleep <ms> (1..=60000; delays the next script command)";
    for line in ["sleep", "sleep 0", "sleep 60001", "sleep x"] {
        assert_eq!(err(line), usage, "{line}");
    }
}

#[test]
fn unknown_words_and_long_arguments() {
    assert_eq!(
        err("frobnicate"),
        "unknown command 'frobnicate' (try `help`)"
    );
    assert_eq!(err("HELP"), "unknown command 'HELP' (try `help`)");
    assert_eq!(err("héllo wörld"), "unknown command 'héllo' (try `help`)");
    // A pasted line is echoed shortened, on a char boundary.
    let long = "é".repeat(10_000);
    assert_eq!(
        err(&long),
        format!("unknown command '{}...' (try `help`)", "é".repeat(40))
    );
    assert!(matches!(parse(&long), Err(ParseError::Unknown(w)) if w.len() == 20_000));
}

#[test]
fn display_is_the_console_syntax() {
    for line in [
        "help",
        "fork 1 8",
        "snapshot 3 1000",
        "restore 1 2",
        "rmap 0x40000000",
        "migrate 1 0x40000000 0x50000000",
        "migrate 1 0x40000000 0x50000000 64",
        "evacuate 0x48000000 0x4a000000",
        "online 0x48000000 0x4a000000",
        "reclaim 20000 512",
        "chaos 25 12345 8",
        "bench migrate 1 1024 512",
        "bench migrate 10 1024 512 blocks",
        "bench reclaim 2048 64",
        "bench fork 64",
        "sleep 300",
        "wait 60",
        "disk",
        "disk sum 10 20",
        "disk fill 10 20 30",
        "bench disk 64 5",
        "images",
        "delete base",
    ] {
        assert_eq!(ok(line).to_string(), line);
    }
}

#[test]
fn help_lists_every_command() {
    for word in [
        "help",
        "vms",
        "stats",
        "pause",
        "resume",
        "destroy",
        "fork",
        "snapshot",
        "restore",
        "rmap",
        "migrate",
        "evacuate",
        "online",
        "reclaim",
        "chaos",
        "wait",
        "bench fork",
        "bench migrate",
        "bench reclaim",
        "sleep",
        "console",
        "quit",
        "disk",
        "disk sum",
        "disk fill",
        "bench disk",
        "images",
        "delete",
    ] {
        assert!(hypcmd::HELP.contains(&format!("  {word} ")), "{word}");
    }
}

#[test]
fn page_ranges_are_non_empty_and_aligned() {
    assert!(PageRange::new(0, 0).is_none());
    assert!(PageRange::new(0x2000, 0x1000).is_none());
    assert!(PageRange::new(0x1001, 0x2000).is_none());
    assert!(PageRange::new(0x1000, 0x2001).is_none());
    let r = PageRange::new(0, 0xffff_ffff_ffff_f000).unwrap();
    assert_eq!(
        (r.start(), r.end(), r.last_page()),
        (0, 0xffff_ffff_ffff_f000, 0xffff_ffff_ffff_e000)
    );
    assert_eq!(r.to_string(), "0x0 0xfffffffffffff000");
}
