//! Requests by example: every command the channel takes, every error code a
//! request line can earn, and the answer and event shapes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use hypapi::{answer_err, answer_ok, event, parse_request, request_line, ErrorCode, Map, Value};
use hypcmd::{Command, PageRange, SnapName, VmId};

fn ok(line: &str) -> (Value, Command) {
    let r = parse_request(line).unwrap_or_else(|e| panic!("{line}: {e:?}"));
    (r.id, r.cmd)
}

fn err(line: &str) -> (Value, ErrorCode, String) {
    let e = parse_request(line).expect_err(line);
    (e.id, e.code, e.message)
}

#[test]
fn commands_with_their_fields() {
    assert_eq!(ok(r#"{"id":1,"cmd":"vms"}"#), (1.into(), Command::Vms));
    assert_eq!(
        ok(r#"{"v":1,"id":"a","cmd":"fork","vm":1,"count":4}"#),
        (
            "a".into(),
            Command::Fork {
                vm: VmId(1),
                count: 4
            }
        )
    );
    assert_eq!(
        ok(r#"{"id":2,"cmd":"fork","vm":3}"#).1,
        Command::Fork {
            vm: VmId(3),
            count: 1
        }
    );
    assert_eq!(
        ok(r#"{"id":3,"cmd":"migrate","vm":1,"start":1073741824,"end":"0x40002000","batch":8}"#).1,
        Command::Migrate {
            vm: VmId(1),
            range: PageRange::new(0x4000_0000, 0x4000_2000).unwrap(),
            batch: Some(8)
        }
    );
    assert_eq!(
        ok(r#"{"id":4,"cmd":"rmap","pa":"0x40001000"}"#).1,
        Command::Rmap { pa: 0x4000_1000 }
    );
    assert_eq!(
        ok(r#"{"id":5,"cmd":"restore","vm":1,"snapshot":2}"#).1,
        Command::Restore {
            vm: VmId(1),
            snapshot: VmId(2)
        }
    );
}

#[test]
fn save_and_load_requests() {
    let name = |s: &str| SnapName::new(s).unwrap();
    assert_eq!(
        ok(r#"{"id":1,"cmd":"save","vm":2,"name":"base"}"#).1,
        Command::Save {
            vm: VmId(2),
            name: name("base"),
            parent: None
        }
    );
    assert_eq!(
        ok(r#"{"id":1,"cmd":"save","vm":2,"name":"d1","parent":"base"}"#).1,
        Command::Save {
            vm: VmId(2),
            name: name("d1"),
            parent: Some(name("base"))
        }
    );
    assert_eq!(
        ok(r#"{"id":1,"cmd":"load","name":"base","prefetch":false}"#).1,
        Command::Load {
            name: name("base"),
            prefetch: false
        }
    );
    assert_eq!(
        ok(r#"{"id":1,"cmd":"load","name":"base","prefetch":true}"#).1,
        Command::Load {
            name: name("base"),
            prefetch: true
        }
    );
    assert_eq!(ok(r#"{"id":1,"cmd":"images"}"#).1, Command::Images);
    let delete = Command::Delete { name: name("base") };
    assert_eq!(ok(r#"{"id":1,"cmd":"delete","name":"base"}"#).1, delete);
    let line = request_line(&3.into(), &delete).unwrap();
    assert_eq!(ok(&line), (3.into(), delete));
    for bad in [
        r#"{"id":1,"cmd":"delete"}"#,
        r#"{"id":1,"cmd":"delete","name":"a b"}"#,
        r#"{"id":1,"cmd":"images","name":"a"}"#,
        r#"{"id":1,"cmd":"load","name":"a b"}"#,
        r#"{"id":1,"cmd":"load","name":7}"#,
        r#"{"id":1,"cmd":"load","name":"a","prefetch":1}"#,
        r#"{"id":1,"cmd":"save","vm":1,"name":"a","parent":""}"#,
        r#"{"id":1,"cmd":"save","vm":1,"name":"-a"}"#,
    ] {
        assert!(parse_request(bad).is_err(), "{bad} was accepted");
    }
}

#[test]
fn every_error_code_a_line_can_earn() {
    assert_eq!(err("{").1, ErrorCode::BadJson);
    assert_eq!(err("[1]").1, ErrorCode::BadRequest);
    assert_eq!(err(r#"{"cmd":"vms"}"#).1, ErrorCode::BadRequest, "no id");
    assert_eq!(
        err(r#"{"id":[1],"cmd":"vms"}"#),
        (
            Value::Null,
            ErrorCode::BadRequest,
            err(r#"{"id":[1],"cmd":"vms"}"#).2
        )
    );
    let long = "x".repeat(hypapi::MAX_ID_LEN + 1);
    assert_eq!(
        err(&format!(r#"{{"id":"{long}","cmd":"vms"}}"#)).1,
        ErrorCode::BadRequest
    );
    assert_eq!(
        err(r#"{"id":7,"v":2,"cmd":"vms"}"#).0,
        Value::from(7),
        "the id is kept"
    );
    assert_eq!(err(r#"{"id":7,"v":2,"cmd":"vms"}"#).1, ErrorCode::Version);
    assert_eq!(err(r#"{"id":7}"#).1, ErrorCode::BadRequest);
    assert_eq!(
        err(r#"{"id":7,"cmd":"launch"}"#).1,
        ErrorCode::UnknownCommand
    );
    // Console-only commands are not on the channel.
    for cmd in ["console", "wait", "sleep", "chaos", "bench"] {
        assert_eq!(
            err(&format!(r#"{{"id":7,"cmd":"{cmd}"}}"#)).1,
            ErrorCode::UnknownCommand,
            "{cmd}"
        );
    }
    let bad = [
        r#"{"id":7,"cmd":"pause"}"#,
        r#"{"id":7,"cmd":"pause","vm":-1}"#,
        r#"{"id":7,"cmd":"pause","vm":1.5}"#,
        r#"{"id":7,"cmd":"pause","vm":"1"}"#,
        r#"{"id":7,"cmd":"pause","vm":1,"extra":1}"#,
        r#"{"id":7,"cmd":"fork","vm":1,"count":0}"#,
        r#"{"id":7,"cmd":"fork","vm":1,"count":1001}"#,
        r#"{"id":7,"cmd":"migrate","vm":1,"start":"0x2000","end":"0x1000"}"#,
        r#"{"id":7,"cmd":"migrate","vm":1,"start":"0x1000 0x2","end":"0x3000"}"#,
        r#"{"id":7,"cmd":"rmap","pa":"40001000"}"#,
        r#"{"id":7,"cmd":"vms","vm":4294967296}"#,
        r#"{"id":7,"cmd":"pause","vm":4294967296}"#,
    ];
    for line in bad {
        let (id, code, message) = err(line);
        assert_eq!(
            (id, code),
            (7.into(), ErrorCode::BadArgument),
            "{line}: {message}"
        );
    }
    // The console's own messages.
    assert_eq!(
        err(r#"{"id":7,"cmd":"fork","vm":1,"count":0}"#).2,
        hypcmd::parse("fork 1 0").unwrap_err().to_string()
    );
}

#[test]
fn requests_round_trip_and_console_commands_have_none() {
    let cmd = Command::Evacuate {
        range: PageRange::new(0x4800_0000, 0x4a00_0000).unwrap(),
        batch: None,
    };
    let line = request_line(&9.into(), &cmd).unwrap();
    assert_eq!(
        line,
        r#"{"cmd":"evacuate","end":1241513984,"id":9,"start":1207959552,"v":1}"#
    );
    assert_eq!(ok(&line), (9.into(), cmd));
    assert_eq!(request_line(&1.into(), &Command::Wait { secs: 1 }), None);
    assert_eq!(
        request_line(
            &1.into(),
            &Command::BenchDisk {
                mib: 1,
                passes: 1,
                at: None,
            }
        ),
        None
    );
}

#[test]
fn disk_commands_have_two_word_names() {
    assert_eq!(ok(r#"{"id":1,"cmd":"disk"}"#).1, Command::Disk);
    let sum = Command::DiskSum { lba: 5, sectors: 8 };
    assert_eq!(
        ok(r#"{"id":2,"cmd":"disk sum","lba":5,"sectors":8}"#).1,
        sum
    );
    let line = request_line(&3.into(), &sum).unwrap();
    assert_eq!(
        line,
        r#"{"cmd":"disk sum","id":3,"lba":5,"sectors":8,"v":1}"#
    );
    let fill = Command::DiskFill {
        lba: u64::MAX,
        sectors: 1,
        seed: 9,
    };
    let line = request_line(&4.into(), &fill).unwrap();
    assert_eq!(ok(&line), (4.into(), fill));
    assert_eq!(
        request_line(&5.into(), &Command::Disk).unwrap(),
        r#"{"cmd":"disk","id":5,"v":1}"#
    );
    // The subcommand is the name, not a field.
    assert_eq!(
        err(r#"{"id":6,"cmd":"disk","lba":5,"sectors":8}"#).1,
        ErrorCode::BadArgument
    );
    assert_eq!(
        err(r#"{"id":7,"cmd":"disk sum","lba":5}"#).2,
        "missing field \"sectors\""
    );
    assert_eq!(
        err(r#"{"id":8,"cmd":"disk  sum","lba":5,"sectors":8}"#).1,
        ErrorCode::UnknownCommand
    );
}

#[test]
fn answers_and_events() {
    let mut r = Map::new();
    r.insert("children".into(), vec![2, 3].into());
    assert_eq!(
        answer_ok(&4.into(), r),
        r#"{"id":4,"ok":true,"result":{"children":[2,3]},"v":1}"#
    );
    assert_eq!(
        answer_err(&Value::Null, ErrorCode::NoVm, "no VM 9"),
        r#"{"error":{"code":"no_vm","message":"no VM 9"},"id":null,"ok":false,"v":1}"#
    );
    let mut f = Map::new();
    f.insert("vm".into(), 3.into());
    f.insert("event".into(), "spoofed".into());
    assert_eq!(
        event("vm_exited", f),
        r#"{"event":"vm_exited","v":1,"vm":3}"#
    );
}

#[test]
fn create_and_merge_group_requests() {
    assert_eq!(
        ok(r#"{"id":1,"cmd":"create","guest":"linux"}"#).1,
        hypcmd::parse("create linux").unwrap().unwrap()
    );
    // Flags may be left out independently; the command line is one string.
    assert_eq!(
        ok(r#"{"id":2,"cmd":"create","guest":"test","vcpus":1,"cmdline":"fork-bomb  secs=3"}"#).1,
        hypcmd::parse("create test --vcpus 1 --cmdline fork-bomb secs=3")
            .unwrap()
            .unwrap()
    );
    assert_eq!(
        ok(r#"{"id":3,"cmd":"merge","op":"group","vm":2,"group":5}"#).1,
        Command::MergeGroup {
            vm: VmId(2),
            group: 5
        }
    );
    assert_eq!(ok(r#"{"id":7,"cmd":"merge"}"#).1, Command::Merge);
    assert_eq!(
        ok(r#"{"id":8,"cmd":"merge auto","rate":4096}"#).1,
        Command::MergeAuto { rate: 4096 }
    );
    assert_eq!(ok(r#"{"id":9,"cmd":"merge off"}"#).1, Command::MergeOff);
    assert_eq!(
        ok(r#"{"id":11,"cmd":"merge list","count":20}"#).1,
        Command::MergeList { count: 20 }
    );
    assert_eq!(
        ok(r#"{"id":12,"cmd":"merge list"}"#).1,
        Command::MergeList { count: 8 }
    );
    let (_, code, _) = err(r#"{"id":10,"cmd":"merge auto"}"#);
    assert_eq!(code, ErrorCode::BadArgument);
    // A keyword is one word: spaces would smuggle in arguments.
    let (_, code, msg) = err(r#"{"id":4,"cmd":"create","guest":"linux --mem 1"}"#);
    assert_eq!(code, ErrorCode::BadArgument);
    assert_eq!(msg, r#""guest" must be one word (a string without spaces)"#);
    let (_, code, msg) = err(r#"{"id":5,"cmd":"create","guest":"linux","mem":0}"#);
    assert_eq!(code, ErrorCode::BadArgument);
    assert_eq!(msg, "bad MiB '0' (1..=1048576)");
    let (_, _, msg) = err(r#"{"id":6,"cmd":"create","guest":"linux","cmdline":7}"#);
    assert_eq!(msg, r#""cmdline" must be a string"#);
    let cmd = hypcmd::parse("create linux --mem 64 --cmdline a=b c")
        .unwrap()
        .unwrap();
    let line = request_line(&7.into(), &cmd).unwrap();
    assert_eq!(
        line,
        r#"{"cmd":"create","cmdline":"a=b c","guest":"linux","id":7,"mem":64,"v":1}"#
    );
    assert_eq!(ok(&line), (7.into(), cmd));
}
