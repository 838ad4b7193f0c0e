//! `save` and `load` (issue 17's snapshots on the disk): each form, and each
//! way a line can be wrong, with the console's message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::{err, ok};
use hypcmd::{Command, SnapName, VmId};

#[test]
fn save_and_load() {
    let name = |s: &str| SnapName::new(s).unwrap();
    assert_eq!(
        ok("save 3 base"),
        Command::Save {
            vm: VmId(3),
            name: name("base"),
            parent: None
        }
    );
    assert_eq!(
        ok("save 3 d1 --diff base"),
        Command::Save {
            vm: VmId(3),
            name: name("d1"),
            parent: Some(name("base"))
        }
    );
    assert_eq!(
        ok("load base"),
        Command::Load {
            name: name("base"),
            prefetch: true
        }
    );
    assert_eq!(
        ok("load base --no-prefetch"),
        Command::Load {
            name: name("base"),
            prefetch: false
        }
    );
    assert_eq!(ok("images"), Command::Images);
    assert_eq!(ok("delete base"), Command::Delete { name: name("base") });
    for bad in [
        "images all",
        "delete",
        "delete a b",
        "delete aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "save",
        "save 3",
        "save 3 -x",
        "save 3 a --diff",
        "save 3 a --dif b",
        "save 3 a --diff b c",
        "load",
        "load a --prefetch",
        "load aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ] {
        assert!(hypcmd::parse(bad).is_err(), "{bad} was accepted");
    }
    let usage = "usage: disk | disk sum <lba> <sectors> | disk fill <lba> <sectors> <seed>";
    assert_eq!(err("disk frob"), usage);
    assert_eq!(err("disk sum"), "missing LBA");
    assert_eq!(err("disk sum 0"), "missing sectors");
    assert_eq!(err("disk sum 0 0"), "bad sectors '0' (1..=2097152)");
    assert_eq!(
        err("disk sum 0 2097153"),
        "bad sectors '2097153' (1..=2097152)"
    );
    assert_eq!(
        err("disk sum -1 1"),
        "bad LBA '-1' (0..=18446744073709551615)"
    );
    assert_eq!(err("disk fill 0 1"), "missing seed");
    assert_eq!(err("disk 1"), usage);
    assert_eq!(
        err("disk sum 0 1 2"),
        "unexpected argument '2' to `disk` (see `help`)"
    );
    assert_eq!(err("bench disk 0"), "bad MiB '0' (1..=1024)");
    assert_eq!(err("bench disk 1025"), "bad MiB '1025' (1..=1024)");
    assert_eq!(err("bench disk 1 0"), "bad passes '0' (1..=15)");
    assert_eq!(err("bench disk 1 16"), "bad passes '16' (1..=15)");
    assert_eq!(
        err("bench disk 1 1 1"),
        "unexpected argument '1' to `bench` (see `help`)"
    );
}
