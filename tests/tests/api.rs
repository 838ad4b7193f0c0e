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
    let status = m.wait_exit(REPLY);
    m.assert_no_hyp_fault();
    assert_eq!(status, 0, "exit status\n{}", m.transcript());
    let _ = std::fs::remove_file(&sock);
}
