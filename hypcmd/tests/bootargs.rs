//! The hypervisor's bootargs: each key, bad values, sizes that overflow.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use hypcmd::bootargs::{parse_range, parse_size, BootArgs, ImageRange};

#[test]
fn sizes() {
    assert_eq!(parse_size("256M"), Some(256 << 20));
    assert_eq!(parse_size("1g"), Some(1 << 30));
    assert_eq!(parse_size("65536K"), Some(64 << 20));
    assert_eq!(parse_size("4096"), Some(4096));
    assert_eq!(parse_size("17179869183G"), Some(17_179_869_183 << 30));
    for bad in [
        "",
        "M",
        "99999999999G",
        "17179869184G",
        "18446744073709551616",
        "-1M",
        "1T",
        "1MM",
        "1é",
    ] {
        assert_eq!(parse_size(bad), None, "{bad:?}");
    }
}

#[test]
fn ranges() {
    assert_eq!(
        parse_range("0x60000000:1234"),
        Some(ImageRange {
            base: 0x6000_0000,
            size: 1234
        })
    );
    assert_eq!(
        parse_range("10:0x10"),
        Some(ImageRange { base: 10, size: 16 })
    );
    assert_eq!(
        parse_range("0xffffffffffffffff:0"),
        Some(ImageRange {
            base: u64::MAX,
            size: 0
        })
    );
    for bad in [
        "",
        ":",
        "1",
        "1:",
        ":1",
        "0xffffffffffffffff:1",
        "1:2:3",
        "0x:1",
        "x:1",
    ] {
        assert_eq!(parse_range(bad), None, "{bad:?}");
    }
}

#[test]
fn defaults() {
    let a = BootArgs::parse("");
    assert_eq!(
        (a.guest, a.vcpus, a.mem, a.guest_args, a.script, a.stay),
        ("test", None, 256 << 20, "", "", false)
    );
    assert_eq!((a.kernel, a.initrd, a.vms), (None, None, 1));
    assert!(a.ignored.is_empty());
}

#[test]
fn vms_counts_independent_default_vms() {
    assert_eq!(BootArgs::parse("vms=4").vms, 4);
    assert_eq!(BootArgs::parse("vms=64").vms, 64);
    for bad in ["vms=0", "vms=65", "vms=x", "vms="] {
        let a = BootArgs::parse(bad);
        assert_eq!((a.vms, a.ignored.as_slice()), (1, &[bad][..]), "{bad}");
    }
}

#[test]
fn every_key() {
    let line = "guest=linux vcpus=2 mem=1G args=selftest,mem=8 script=vms;stats stay=1 kernel=0x60000000:100 initrd=0x70000000:0x200";
    let a = BootArgs::parse(line);
    assert_eq!(a.guest, "linux");
    assert_eq!(a.vcpus, Some(2));
    assert_eq!(a.mem, 1 << 30);
    assert_eq!(a.guest_args, "selftest,mem=8");
    assert_eq!(a.script, "vms;stats");
    assert!(a.stay);
    assert_eq!(
        a.kernel,
        Some(ImageRange {
            base: 0x6000_0000,
            size: 100
        })
    );
    assert_eq!(
        a.initrd,
        Some(ImageRange {
            base: 0x7000_0000,
            size: 0x200
        })
    );
    assert!(a.ignored.is_empty());
    assert_eq!(BootArgs::image_ranges(line), [a.kernel, a.initrd]);
}

#[test]
fn bad_words_are_listed_and_the_rest_still_counts() {
    let a =
        BootArgs::parse("mem=99999999999G vcpus=-1 frob kernel=0xffffffffffffffff:2 mem=8M x=y");
    assert_eq!(
        a.ignored,
        [
            "mem=99999999999G",
            "vcpus=-1",
            "frob",
            "kernel=0xffffffffffffffff:2",
            "x=y"
        ]
    );
    assert_eq!(a.mem, 8 << 20);
    assert_eq!(a.kernel, None);
    assert_eq!(
        BootArgs::image_ranges("kernel=0xffffffffffffffff:2"),
        [None, None]
    );
}

#[test]
fn the_guest_tail_is_verbatim() {
    let a = BootArgs::parse("guest=linux args=x -- console=ttyAMA0 a=b,c -- d");
    assert_eq!(a.guest_args, "console=ttyAMA0 a=b,c -- d");
    assert!(a.ignored.is_empty());
    let a = BootArgs::parse("guest=linux --");
    assert_eq!((a.guest, a.guest_args), ("linux", ""));
    // Image words after `--` are the guest's, not the hypervisor's.
    assert_eq!(
        BootArgs::image_ranges("guest=linux -- kernel=1:1"),
        [None, None]
    );
    let a = BootArgs::parse("kernel=1:1 kernel=2:2");
    assert_eq!(
        BootArgs::image_ranges("kernel=1:1 kernel=2:2"),
        [a.kernel, None]
    );
}

#[test]
fn restore_takes_a_snapshot_name() {
    let a = BootArgs::parse("restore=linux-1 stay=1");
    assert_eq!(a.restore.as_ref().map(|n| n.as_str()), Some("linux-1"));
    assert!(a.ignored.is_empty());
    assert_eq!(BootArgs::parse("").restore, None);
    let bad = BootArgs::parse("restore= restore=-x");
    assert_eq!(bad.restore, None);
    assert_eq!(bad.ignored, ["restore=", "restore=-x"]);
}
