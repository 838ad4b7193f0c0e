//! `images` and `delete <name>` (issue 17's store, from the console): the
//! saves are listed, and a delete refuses what something still needs (a
//! diff's parent, an image a loaded VM still reads pages from) until it no
//! longer does. A diff against a name deleted and saved again by another VM
//! is refused: the VM's dirty log is not relative to that image. A save's
//! own snapshot is destroyed after it, by an idle CPU. The store kept in
//! memory between commands is read again after a write over its sectors.
//! `disk fill` and `bench disk` refuse the sectors a loaded VM still reads.
//!
//! A Linux save (split between two CPUs) that runs out of disk half way is
//! refused, and leaves the guest running and no snapshot behind.

use qemu_tests::{linux_config, DiskConfig, Machine, MachineConfig};
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(240);
const REPLY: Duration = Duration::from_secs(120);

fn command(m: &mut Machine, line: &str, answer: &str) -> String {
    m.command(line, answer, REPLY)
}

/// The VM id in the last "<needle>N" of the transcript.
fn vm_after(m: &Machine, needle: &str) -> u32 {
    let t = m.transcript();
    qemu_tests::number_after(&t[t.rfind(needle).unwrap()..], needle).unwrap() as u32
}

/// The first sector of the image saved as `name` (its save's report).
fn sectors_of(m: &Machine, name: &str) -> u64 {
    let t = m.transcript();
    let saved = &t[t.find(&format!("saved as '{name}'")).unwrap()..];
    qemu_tests::number_after(saved, "image at sectors ").unwrap()
}

#[test]
fn images_are_deleted_only_when_nothing_needs_them() {
    let path = std::env::temp_dir().join(format!("mhv-persist-delete-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let cfg = MachineConfig {
        vcpus: Some(1),
        guest_mem: Some("32M".into()),
        guest_args: Some("idle beat_ms=300".into()),
        disk: Some(DiskConfig {
            size: 16 << 20,
            ..DiskConfig::new(&path)
        }),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("persist-delete", &cfg);
    m.expect("GUEST: idle: heartbeat 1", BOOT);
    command(&mut m, "save 1 a", "vm 1 saved as 'a'");
    // The save's own snapshot (vm 2) is destroyed by another CPU, while the
    // saving one finishes (its line may come before or after the answer).
    let deadline = std::time::Instant::now() + REPLY;
    while !m
        .transcript()
        .contains("[hyp] vm 2 (snapshot) stopped, status 0")
    {
        assert!(std::time::Instant::now() < deadline, "{}", m.transcript());
        std::thread::sleep(Duration::from_millis(50));
    }
    command(
        &mut m,
        "save 1 b --diff a",
        "vm 1 saved as 'b' (diff of 'a')",
    );
    command(&mut m, "images", "2 snapshots; ");
    let t = m.transcript();
    let list = &t[t.rfind("seq  name").unwrap()..];
    assert!(
        list.contains(" a ") && list.contains("diff of 'a'"),
        "{list}"
    );
    // A diff's parent stays while the diff does.
    command(
        &mut m,
        "delete a",
        "error: snapshot store: the snapshot is the parent of another",
    );
    // An image a loaded VM still reads from stays while the VM does.
    command(&mut m, "load b --no-prefetch", "'b' loaded as vm ");
    let loaded = vm_after(&m, "loaded as vm ");
    command(&mut m, "images", &format!("(vm {loaded} reads it)"));
    command(
        &mut m,
        "delete b",
        &format!("error: vm {loaded} was loaded from this image and still reads pages from it"),
    );
    // Nor do `disk fill` and `bench disk` write where it (or its parent)
    // still has pages to read: it would read the bench's bytes and stop.
    let refused = format!("error: those sectors hold snapshot 'b' (or its parents), which vm {loaded} was loaded from");
    for name in ["b", "a"] {
        let at = sectors_of(&m, name);
        command(&mut m, &format!("disk fill {at} 1 7"), &refused);
        command(&mut m, &format!("bench disk 1 1 at {at}"), &refused);
    }
    command(&mut m, "disk fill 30000 8 7", "written and flushed");
    command(&mut m, &format!("destroy {loaded}"), "hyp>");
    m.expect(&format!("[hyp] vm {loaded} ("), REPLY);
    command(&mut m, "delete b", "deleted 'b' (");
    command(&mut m, "delete a", "deleted 'a' (");
    command(&mut m, "delete a", "error: snapshot store: ");
    // A name deleted and saved again by another VM is another image: vm 1's
    // dirty log is not relative to it, and a diff against it is refused.
    command(&mut m, "save 1 c", "vm 1 saved as 'c'");
    command(&mut m, "delete c", "deleted 'c' (");
    command(&mut m, "fork 1", "vm 1 forked: child vm ");
    let child = vm_after(&m, "forked: child vm ");
    command(
        &mut m,
        &format!("save {child} c"),
        &format!("vm {child} saved as 'c'"),
    );
    command(
        &mut m,
        "save 1 d --diff c",
        "error: the image of that name on the disk is not the one this VM's dirty log is relative to",
    );
    command(&mut m, "images", "1 snapshots; ");
    // The store's superblock and TOC stay in memory between commands, but
    // not past a write over them: a bench over them puts them back, a fill
    // damages them, and the next command reads the disk and finds it.
    command(
        &mut m,
        "bench disk 1 1 at 18446744073709551615",
        "error: sectors 18446744073709551615..",
    );
    command(&mut m, "bench disk 1 1 at 0", "bench disk: 1 MiB");
    command(&mut m, "images", "1 snapshots; ");
    command(&mut m, "disk fill 0 1 7", "written and flushed");
    command(&mut m, "images", "error: snapshot store: ");
    // vm 1 ran on through all of it.
    let beats = m.transcript().matches("heartbeat").count();
    command(&mut m, "sleep 1000", "hyp>");
    std::thread::sleep(Duration::from_secs(2));
    assert!(m.transcript().matches("heartbeat").count() > beats);
    command(&mut m, "quit", "exiting with status");
    m.assert_no_hyp_fault();
    let _ = std::fs::remove_file(&path);
}

/// Rows of `vms`: the lines after its header up to the next prompt.
fn vm_rows(m: &mut Machine) -> Vec<String> {
    let before = m.transcript().len();
    command(m, "vms", "id  name");
    m.expect("hyp>", REPLY);
    let t = m.transcript();
    let t = &t[before..];
    let from = t.find("id  name").unwrap();
    let table = &t[from..from + t[from..].find("hyp>").unwrap()];
    table
        .lines()
        .skip(1)
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_linux_save_out_of_disk_half_way_stops_cleanly() {
    let path = std::env::temp_dir().join(format!("mhv-persist-nospace-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let cfg = MachineConfig {
        disk: Some(DiskConfig {
            size: 24 << 20,
            ..DiskConfig::new(&path)
        }),
        ..linux_config()
    };
    let mut m = Machine::boot("persist-nospace", &cfg);
    m.expect("MHV-LINUX-READY", BOOT);
    m.expect("# ", BOOT);
    m.send("\x01h");
    m.expect("[console: hypervisor]", REPLY);
    // The idle image is about 54 MiB: the stream outgrows the 24 MiB disk
    // with both CPUs staging pages.
    command(&mut m, "save 1 full", "error: snapshot store: no space");
    command(&mut m, "images", "0 snapshots; ");
    // The save's snapshots (its own, and the helper's if one ran) are gone.
    let deadline = std::time::Instant::now() + REPLY;
    loop {
        let rows = vm_rows(&mut m);
        if rows.len() == 1 && rows[0].trim_start().starts_with("1 ") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{rows:?}");
    }
    m.send("\x011\r");
    m.expect("[console: vm 1]", REPLY);
    m.send("echo ALIVE-$((6*7))\n");
    m.expect("ALIVE-42", REPLY);
    m.send("\x01hquit\n");
    assert_eq!(m.wait_exit(REPLY), 0);
    m.assert_no_hyp_fault();
    let _ = std::fs::remove_file(&path);
}
