//! mhvctl against a fake hypervisor on a unix socket: what it sends is a
//! request the real parser accepts, events before the answer are skipped
//! (or printed with --json), and each kind of answer gives its output and
//! exit status.

use hypapi::{answer_err, answer_ok, event, parse_request, ErrorCode, Map, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::Command;

/// Serves connections: answers each request with `answer(request id, cmd text)`.
fn serve(name: &str, answer: fn(&Value, &str) -> Option<String>) -> PathBuf {
    let path = std::env::temp_dir().join(format!("mhvctl-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let s = s.unwrap();
            let mut w = s.try_clone().unwrap();
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { break };
                let req = parse_request(&line).expect("mhvctl sends valid requests");
                let _ = writeln!(w, "{}", event("vm_exited", Map::new()));
                if let Some(a) = answer(&req.id, &req.cmd.to_string()) {
                    let _ = writeln!(w, "{a}");
                }
            }
        }
    });
    path
}

fn mhvctl(path: &PathBuf, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mhvctl"))
        .arg("--api")
        .arg(path)
        .args(args)
        .output()
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (
        out.status.code().unwrap(),
        text(out.stdout),
        text(out.stderr),
    )
}

fn ok_with_text(id: &Value, cmd: &str) -> Option<String> {
    let mut r = Map::new();
    r.insert(
        "text".into(),
        vec![format!("ran {cmd}"), "second line".into()].into(),
    );
    r.insert("children".into(), vec![2].into());
    Some(answer_ok(id, r))
}

#[test]
fn an_answer_prints_the_console_lines() {
    let path = serve("ok", ok_with_text);
    let (code, out, _) = mhvctl(&path, &["fork", "1", "4"]);
    assert_eq!((code, out.as_str()), (0, "ran fork 1 4\nsecond line\n"));
}

#[test]
fn json_prints_events_and_the_answer_line() {
    let path = serve("json", ok_with_text);
    let (code, out, _) = mhvctl(&path, &["--json", "vms"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(code, 0);
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].contains("\"event\":\"vm_exited\""));
    let answer: Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(answer["result"]["children"], Value::from(vec![2]));
}

#[test]
fn an_error_answer_exits_1_with_its_code() {
    let path = serve("err", |id, _| {
        Some(answer_err(id, ErrorCode::NoVm, "no VM 9 (see `vms`)"))
    });
    let (code, _, err) = mhvctl(&path, &["pause", "9"]);
    assert_eq!(code, 1);
    assert_eq!(err.trim(), "error (no_vm): no VM 9 (see `vms`)");
}

#[test]
fn bad_words_console_only_commands_and_silence_exit_2() {
    let path = serve("silent", |_, _| None);
    let (code, _, err) = mhvctl(&path, &["fork", "one"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("'one' is not a VM id"), "{err}");
    let (code, _, err) = mhvctl(&path, &["wait", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("console-only"), "{err}");
    let (code, _, err) = mhvctl(&path, &["--timeout", "1", "stats"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no answer"), "{err}");
}
