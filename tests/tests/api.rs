//! The control channel end to end (issue 19): requests over the unix socket
//! QEMU serves for the hypervisor's virtio-console, answered by the console's
//! command layer, with a Linux guest running. Framing errors (a line over the
//! cap, bytes that are not UTF-8) are answered and leave the channel usable.

use qemu_tests::api::{socket_path, ApiClient};
use qemu_tests::{linux_config, Machine, MachineConfig};
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(240);
const REPLY: Duration = Duration::from_secs(60);

/// The next line from the channel that is an answer (events have no `id`).
fn answer(client: &mut ApiClient, m: &Machine) -> String {
    loop {
        let line = client
            .read_line(REPLY)
            .expect("read from the api socket")
            .unwrap_or_else(|| panic!("no answer in {REPLY:?}\n{}", m.transcript()));
        if line.contains("\"id\":") {
            return line;
        }
    }
}

#[test]
fn api_answers_requests_and_survives_bad_lines() {
    let sock = socket_path("api-linux");
    let cfg = MachineConfig {
        api: Some(sock.clone()),
        ..linux_config()
    };
    let mut m = Machine::boot("api-linux", &cfg);
    m.expect("[hyp] control channel: virtio-console at 0x", BOOT);
    m.expect("MHV-LINUX-READY", BOOT);
    let mut client = ApiClient::connect(&sock, REPLY).expect("connect to the api socket");

    client.send_line(r#"{"id":1,"cmd":"vms"}"#).unwrap();
    let a = answer(&mut client, &m);
    assert!(a.contains(r#""id":1"#) && a.contains(r#""ok":true"#), "{a}");

    // 70 KiB in one line: over the 64 KiB cap, answered once as too long.
    let long = format!(r#"{{"id":2,"cmd":"vms","pad":"{}"}}"#, "x".repeat(70 << 10));
    client.send_line(&long).unwrap();
    let a = answer(&mut client, &m);
    assert!(a.contains(r#""code":"too_long""#), "{a}");

    client.send_bytes(b"\xff\xfe\xfd\n").unwrap();
    let a = answer(&mut client, &m);
    assert!(a.contains(r#""code":"bad_json""#), "{a}");

    // Still in step: the next answer is the next request's.
    client.send_line(r#"{"id":"after","cmd":"vms"}"#).unwrap();
    let a = answer(&mut client, &m);
    assert!(
        a.contains(r#""id":"after""#) && a.contains(r#""ok":true"#),
        "{a}"
    );

    // A client that goes away and a new one: the channel serves the new one.
    drop(client);
    let mut client = ApiClient::connect(&sock, REPLY).expect("reconnect to the api socket");
    client.send_line(r#"{"id":3,"cmd":"vms"}"#).unwrap();
    let a = answer(&mut client, &m);
    assert!(a.contains(r#""id":3"#) && a.contains(r#""ok":true"#), "{a}");

    m.send("poweroff -f\n");
    m.expect("[hyp] vm 1 (linux) stopped", REPLY);
    // The machine stays up for the channel's client until it says `quit`.
    client.send_line(r#"{"id":4,"cmd":"quit"}"#).unwrap();
    let status = m.wait_exit(REPLY);
    m.assert_no_hyp_fault();
    assert_eq!(status, 0, "exit status\n{}", m.transcript());
    let _ = std::fs::remove_file(&sock);
}

/// The test guest idling (cheap under TCG), with the channel attached.
fn idle_machine(name: &str) -> (Machine, ApiClient, std::path::PathBuf) {
    let sock = socket_path(name);
    let cfg = MachineConfig {
        api: Some(sock.clone()),
        vcpus: Some(1),
        guest_args: Some("idle beat_ms=500".into()),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot(name, &cfg);
    m.expect("GUEST: idle: heartbeat 1 ", BOOT);
    let client = ApiClient::connect(&sock, REPLY).expect("connect to the api socket");
    (m, client, sock)
}

/// The error code of an answer line.
fn code(a: &serde_json::Value) -> &str {
    a["error"]["code"].as_str().unwrap_or("")
}

#[test]
fn api_structured_results_requests_in_flight_and_bad_clients() {
    let (mut m, mut c, sock) = idle_machine("api-idle");
    let vms = c.call("vms", serde_json::json!({}), REPLY).unwrap();
    assert_eq!(vms["vms"][0]["id"], 1, "{vms}");
    assert_eq!(vms["vms"][0]["state"], "running", "{vms}");
    assert!(
        vms["text"][0].as_str().unwrap().contains("id  name"),
        "the console's lines too: {vms}"
    );

    // Two requests in flight: answered in order, each with its id.
    c.send_line(r#"{"id":"f","cmd":"fork","vm":1}"#).unwrap();
    c.send_line(r#"{"id":"s","cmd":"stats"}"#).unwrap();
    let (fork, stats) = (c.answer(REPLY).unwrap(), c.answer(REPLY).unwrap());
    assert_eq!((&fork["id"], &stats["id"]), (&"f".into(), &"s".into()));
    assert_eq!(fork["result"]["children"], serde_json::json!([2]), "{fork}");
    assert_eq!(stats["result"]["vms"], 2, "{stats}");

    // Bad requests: each gets its error code, none stops anything.
    for (line, want) in [
        ("not json at all", "bad_json"),
        (r#"{"id":[1],"cmd":"vms"}"#, "bad_request"),
        (r#"{"id":1,"v":9,"cmd":"vms"}"#, "version"),
        (r#"{"id":1,"cmd":"launch"}"#, "unknown_command"),
        (r#"{"id":1,"cmd":"wait","secs":1}"#, "unknown_command"),
        (r#"{"id":1,"cmd":"fork","vm":"one"}"#, "bad_argument"),
        (
            r#"{"id":1,"cmd":"fork","vm":1,"count":5000}"#,
            "bad_argument",
        ),
        (r#"{"id":1,"cmd":"pause","vm":99}"#, "no_vm"),
        (r#"{"id":1,"cmd":"resume","vm":1}"#, "wrong_state"),
        (
            r#"{"id":1,"cmd":"migrate","vm":1,"start":0,"end":4096}"#,
            "bad_argument",
        ),
        (&"[".repeat(200), "bad_json"), // deeper than serde_json's recursion limit
    ] {
        c.send_line(line).unwrap();
        let a = c.answer(REPLY).unwrap();
        assert_eq!((code(&a), &a["ok"]), (want, &false.into()), "{line} -> {a}");
    }

    // A client that leaves mid-request: the command still runs to the end.
    // (It leaves once the hypervisor has had time to read the line: bytes
    // still in the socket when a client closes it are QEMU's to drop.)
    c.send_line(r#"{"id":100,"cmd":"snapshot","vm":1,"count":40}"#)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(c);
    let mut c = ApiClient::connect(&sock, REPLY).expect("reconnect");
    let stats = c.stats(REPLY).unwrap();
    assert_eq!(stats["vms"], 42, "vm 1, its fork and 40 snapshots: {stats}");
    // Its answer went to whoever was connected when it was written: the
    // channel has no connections (docs/API.md), so a client matches ids.
    assert!(c.stray.iter().all(|a| a["id"] == 100), "{:?}", c.stray);

    // Events: the fork's end is pushed without a request.
    c.call("destroy", serde_json::json!({"vm": 2}), REPLY)
        .unwrap();
    let deadline = std::time::Instant::now() + REPLY;
    while !c
        .events
        .iter()
        .any(|e| e["event"] == "vm_exited" && e["vm"] == 2)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no vm_exited event: {:?}",
            c.events
        );
        let _ = c.stats(REPLY).unwrap();
    }
    let vms = c.call("vms", serde_json::json!({}), REPLY).unwrap();
    assert_eq!(vms["vms"][0]["state"], "running", "vm 1 untouched: {vms}");
    m.assert_no_hyp_fault();
    let _ = std::fs::remove_file(&sock);
}
