//! The hypervisor's disk (issue 17): a raw file QEMU attaches as a
//! virtio-blk device (`MachineConfig::disk`), driven by the hypervisor
//! itself. The host writes the file and checks what the hypervisor reads
//! (`disk sum`: FNV-1a 64, recomputed here), and reads the file after QEMU
//! exits to check what it wrote (`disk fill`: a seeded pattern, recomputed
//! here) and what `bench disk` must not have changed. The checksum and the
//! pattern are implemented here independently of the hypervisor's code.

use qemu_tests::api::{socket_path, ApiClient};
use qemu_tests::{DiskConfig, Machine, MachineConfig};
use std::path::{Path, PathBuf};
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(60);
const REPLY: Duration = Duration::from_secs(120);
const SECTOR: u64 = 512;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What `disk fill <lba> <sectors> <seed>` writes (docs/TESTING.md): the
/// little-endian u64 at disk byte 8k is splitmix64(seed ^ k).
fn fill_pattern(lba: u64, sectors: u64, seed: u64) -> Vec<u8> {
    let first = lba * SECTOR / 8;
    (first..first + sectors * SECTOR / 8)
        .flat_map(|k| splitmix64(seed ^ k).to_le_bytes())
        .collect()
}

/// `len` pseudo-random bytes from `seed` (printed, so a failure can be replayed).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    (0..len.div_ceil(8) as u64)
        .flat_map(|i| splitmix64(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ i).to_le_bytes())
        .take(len)
        .collect()
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let seed = t.as_nanos() as u64 ^ std::process::id() as u64;
    println!("disk test seed {seed}");
    seed
}

/// A fresh disk file path for test `name` (removed first).
fn disk_path(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("mhv-disk-{name}-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// A machine with no guest and a disk at `path`, running `script`.
fn machine(name: &str, path: &Path, script: &str) -> Machine {
    let cfg = MachineConfig {
        guest: "none".into(),
        disk: Some(DiskConfig::new(path)),
        script: Some(script.into()),
        ..MachineConfig::default()
    };
    Machine::boot(name, &cfg)
}

fn sum_line(lba: u64, sectors: u64, sum: u64) -> String {
    format!("disk sum {lba} {sectors}: fnv1a64 = {sum:#018x}")
}

/// FNV-1a of `sectors` of `data` from `lba`.
fn sum_of(data: &[u8], lba: u64, sectors: u64) -> u64 {
    fnv1a(&data[(lba * SECTOR) as usize..((lba + sectors) * SECTOR) as usize])
}

#[test]
fn disk_reads_what_the_host_wrote_and_refuses_past_the_end() {
    let path = disk_path("read");
    let cap = (40 << 20) / SECTOR + 3; // not a whole MiB: the last sectors count
    let data = random_bytes((cap * SECTOR) as usize, seed());
    std::fs::write(&path, &data).unwrap();
    // Spans over a 1 MiB request boundary (sector 2048) and the last sector.
    let reads = [(0, 1), (2047, 4100), (cap - 1, 1), (0, cap)];
    let mut script = String::from("disk");
    for (lba, n) in reads {
        script += &format!("; disk sum {lba} {n}");
    }
    script += &format!("; disk sum {cap} 1; disk fill {} 2 1; quit", cap - 1);
    let mut m = machine("disk-read", &path, &script);
    m.expect("[hyp] disk: 40 MiB (virtio-blk at 0x", BOOT);
    m.expect(
        &format!("disk: {cap} sectors of 512 bytes (40 MiB), read-write"),
        REPLY,
    );
    for (lba, n) in reads {
        m.expect(&sum_line(lba, n, sum_of(&data, lba, n)), REPLY);
    }
    let past = |lba: u64, n: u64| {
        format!(
            "error: sectors {lba}..{} are past the end of the disk ({cap} sectors)",
            lba + n
        )
    };
    m.expect(&past(cap, 1), REPLY);
    m.expect(&past(cap - 1, 2), REPLY);
    assert_eq!(m.wait_exit(REPLY), 0);
    m.assert_no_hyp_fault();
    // The refused fill wrote nothing.
    assert!(
        std::fs::read(&path).unwrap() == data,
        "the disk file changed"
    );
    let _ = std::fs::remove_file(&path);
}

/// `bench disk <mib>`'s write and read MiB/s.
fn bench_numbers(line: &str) -> (u64, u64) {
    let after = |key: &str| {
        qemu_tests::number_after(line, key).unwrap_or_else(|| panic!("no {key:?} in {line}"))
    };
    (after("disk write = "), after(", read = "))
}

#[test]
fn bench_disk_reports_throughput_and_leaves_the_file_as_it_was() {
    let path = disk_path("bench");
    let data = random_bytes(48 << 20, seed());
    std::fs::write(&path, &data).unwrap();
    let mut m = machine(
        "disk-bench",
        &path,
        "bench disk 32; disk; disk sum 32768 65536; bench disk 64; quit",
    );
    m.expect("bench disk: 32 MiB in 1024 KiB requests: ", REPLY);
    let line = m.expect("\n", REPLY);
    let (write, read) = bench_numbers(&line);
    assert!(write > 0 && read > 0, "{line}");
    println!("bench disk: 32 MiB in 1024 KiB requests: {line}");
    // The bench waited for queued writes asleep, woken by the device's
    // interrupt (routed to the waiting CPU): not only by the 1 ms poll.
    m.expect("waits for the device: ", REPLY);
    let waits = m.expect(" by the poll", REPLY);
    let woken = qemu_tests::number_after(&waits, "").unwrap_or(0);
    println!("waits for the device: {waits}");
    assert!(woken > 0, "no wait ended by the disk's interrupt: {waits}");
    // The hypervisor reads back the original bytes right after the bench,
    // which wrote the disk's last 32 MiB (sectors 32768..98304).
    m.expect(&sum_line(32768, 65536, sum_of(&data, 32768, 65536)), REPLY);
    // A region past the end is refused before anything is written.
    m.expect(
        "error: sectors 0..131072 are past the end of the disk (98304 sectors)",
        REPLY,
    );
    assert_eq!(m.wait_exit(REPLY), 0);
    m.assert_no_hyp_fault();
    assert!(
        std::fs::read(&path).unwrap() == data,
        "bench disk changed the disk file"
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn disk_and_control_channel_together_and_writes_survive_a_second_boot() {
    let path = disk_path("api");
    let sock = socket_path("disk-api");
    let cfg = MachineConfig {
        guest: "none".into(),
        api: Some(sock.clone()),
        // Missing: the harness creates it, sparse, at the default 1 GiB.
        disk: Some(DiskConfig::new(&path)),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("disk-api", &cfg);
    m.expect("[hyp] control channel: virtio-console at 0x", BOOT);
    m.expect("[hyp] disk: 1024 MiB (virtio-blk at 0x", BOOT);
    let mut c = ApiClient::connect(&sock, REPLY).expect("connect to the api socket");
    let info = c.call("disk", serde_json::json!({}), REPLY).unwrap();
    assert_eq!(info["sectors"], 2 << 20, "{info}");
    assert_eq!(info["sector_size"], 512, "{info}");
    assert_eq!(info["readonly"], false, "{info}");
    let (lba, n, seed) = (5000u64, 3000u64, 0xfeed_f00d_u64);
    let fill = serde_json::json!({"lba": lba, "sectors": n, "seed": seed});
    c.call("disk fill", fill, REPLY).unwrap();
    let expected = fill_pattern(lba, n, seed);
    let sum = c
        .call(
            "disk sum",
            serde_json::json!({"lba": lba, "sectors": n}),
            REPLY,
        )
        .unwrap();
    assert_eq!(sum["fnv1a64"], format!("{:#018x}", fnv1a(&expected)));
    let past = serde_json::json!({"lba": 2u64 << 20, "sectors": 1});
    let err = c.call("disk sum", past, REPLY).unwrap_err();
    assert!(
        err.contains("bad_argument") && err.contains("past the end"),
        "{err}"
    );
    let err = c.call("bench", serde_json::json!({}), REPLY).unwrap_err();
    assert!(err.contains("unknown_command"), "{err}");
    c.send_line(r#"{"id":"q","cmd":"quit"}"#).unwrap();
    assert_eq!(m.wait_exit(REPLY), 0);
    m.assert_no_hyp_fault();
    let _ = std::fs::remove_file(&sock);

    // The host sees the pattern where it was written, and nothing else.
    let file = std::fs::read(&path).unwrap();
    assert_eq!(file.len() as u64, 1 << 30);
    let at = (lba * SECTOR) as usize;
    assert!(file[at..at + expected.len()] == expected[..], "pattern");
    assert!(file[..at].iter().all(|&b| b == 0), "bytes before the fill");
    assert!(file[at + expected.len()..].iter().all(|&b| b == 0), "after");

    // A second boot reads the same bytes back.
    let script = format!("disk sum {lba} {n}; quit");
    let mut m = machine("disk-second-boot", &path, &script);
    m.expect(&sum_line(lba, n, fnv1a(&expected)), REPLY);
    assert_eq!(m.wait_exit(REPLY), 0);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_read_only_disk_refuses_writes() {
    let path = disk_path("ro");
    let data = random_bytes(4 << 20, seed());
    std::fs::write(&path, &data).unwrap();
    let mut disk = DiskConfig::new(&path);
    disk.readonly = true;
    let cfg = MachineConfig {
        guest: "none".into(),
        disk: Some(disk),
        script: Some("disk; disk fill 0 1 1; bench disk 1; disk sum 0 8; quit".into()),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("disk-ro", &cfg);
    m.expect("[hyp] disk: 4 MiB, read-only (virtio-blk at 0x", BOOT);
    m.expect("disk: 8192 sectors of 512 bytes (4 MiB), read-only", REPLY);
    for cmd in ["disk fill 0 1 1", "bench disk 1"] {
        m.expect(&format!("hyp> {cmd}"), REPLY);
        m.expect("error: the disk is read-only", REPLY);
    }
    m.expect(&sum_line(0, 8, sum_of(&data, 0, 8)), REPLY);
    assert_eq!(m.wait_exit(REPLY), 0);
    assert!(std::fs::read(&path).unwrap() == data, "the file changed");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn without_a_disk_the_commands_say_so_and_nothing_stops() {
    // The test guest runs meanwhile and must still pass.
    let cfg = MachineConfig {
        vcpus: Some(1),
        guest_args: Some("selftest mem=16".into()),
        script: Some("disk; bench disk 1; disk sum 0 1; vms".into()),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("disk-none", &cfg);
    m.expect("[hyp] no disk (no virtio-blk device)", BOOT);
    let no_disk = "error: no disk: none was attached at boot (`cargo xtask run --disk FILE`)";
    for cmd in ["disk", "bench disk 1", "disk sum 0 1"] {
        m.expect(&format!("hyp> {cmd}"), REPLY);
        m.expect(no_disk, REPLY);
    }
    m.expect("hyp> vms", REPLY);
    m.expect("GUEST RESULT: PASS", Duration::from_secs(240));
    assert_eq!(m.wait_exit(REPLY), 0);
    m.assert_no_hyp_fault();
}
