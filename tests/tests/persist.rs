//! Snapshots that outlive the machine (issue 17): a VM saved to the
//! hypervisor's disk (`save`) and loaded lazily by a later QEMU (`restore=`
//! at boot, or `load`), its memory faulted in from the disk.
//!
//! - Linux: files in tmpfs and their md5s, and the guest's uptime, survive a
//!   save, QEMU's exit and a restore in a new QEMU; a chain of a full save
//!   and two diffs restores to the newest, the full save still to itself;
//!   a restored VM forked 4 times at once has 4 answering shells, and a
//!   child reads a file its parent had not touched since its load.
//! - The test guest: damaged images (a flipped byte in page data, in the
//!   header; a truncated file; another format version; a VM larger than the
//!   disk) are refused, or stop only the VM that faults the bad page, and
//!   the machine and its other VMs run on.
//!
//! `images` and `delete`: `persist_images.rs`.

use qemu_tests::{linux_config, DiskConfig, Machine, MachineConfig};
use std::path::PathBuf;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(240);
const REPLY: Duration = Duration::from_secs(120);

/// Ctrl-A h: the keyboard goes to the hypervisor.
const HYP: &str = "\x01h";

/// Ctrl-A <vm> Enter: the keyboard goes to that VM.
fn to_vm(m: &mut Machine, vm: u32) {
    m.send(&format!("\x01{vm}\r"));
    m.expect(&format!("[console: vm {vm}]"), REPLY);
}

fn to_hyp(m: &mut Machine) {
    m.send(HYP);
    m.expect("[console: hypervisor]", REPLY);
}

/// A fresh disk file path for test `name` (removed first).
fn disk_path(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("mhv-persist-{name}-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// Waits for `TAG=` followed by a value of `len` chars that all pass `ok`
/// (the shell's echo of the command line itself has `TAG=$(` there).
fn value(m: &mut Machine, tag: &str, ok: fn(char) -> bool) -> String {
    let needle = format!("{tag}=");
    loop {
        m.expect(&needle, REPLY);
        // Let the rest of the line arrive: a loaded machine's guest can
        // print it in pieces, well apart.
        let until = std::time::Instant::now() + REPLY;
        let v: String = loop {
            let t = m.transcript();
            let rest = &t[t.rfind(&needle).unwrap() + needle.len()..];
            if rest.contains('\n') || std::time::Instant::now() > until {
                break rest.chars().take_while(|&c| ok(c)).collect();
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if !v.is_empty() {
            return v;
        }
    }
}

fn md5_of(m: &mut Machine, tag: &str, file: &str) -> String {
    m.send(&format!("echo {tag}=$(md5sum < {file} | cut -c1-32)\n"));
    let v = value(m, tag, |c| c.is_ascii_hexdigit());
    assert_eq!(v.len(), 32, "md5 of {file}: {v}");
    v
}

fn uptime(m: &mut Machine, tag: &str) -> u64 {
    m.send(&format!("echo {tag}=$(cut -d. -f1 /proc/uptime)\n"));
    value(m, tag, |c| c.is_ascii_digit()).parse().unwrap()
}

fn write_file(m: &mut Machine, file: &str, kib: u32) {
    m.send(&format!(
        "dd if=/dev/urandom of={file} bs=1k count={kib} 2>/dev/null; echo WROTE-{kib}\n"
    ));
    m.expect(&format!("WROTE-{kib}\r\n"), REPLY);
}

/// Saves vm 1 from the hypervisor console; returns the reply's lines.
fn save(m: &mut Machine, cmd: &str, name: &str) -> String {
    to_hyp(m);
    m.send(&format!("{cmd}\n"));
    let mut reply = m.expect(&format!("saved as '{name}'"), REPLY);
    reply += &m.expect("page data at bytes", REPLY);
    reply
}

/// Pages of a save's reply written in place from the guest's frames.
fn in_place(reply: &str) -> u64 {
    let Some(at) = reply.find(" pages written in place") else {
        return 0;
    };
    let digits = reply[..at].rsplit(|c: char| !c.is_ascii_digit()).next();
    digits.and_then(|d| d.parse().ok()).unwrap_or(0)
}

#[test]
fn linux_saved_to_disk_resumes_in_a_new_machine_with_its_files_and_clock() {
    let path = disk_path("linux");
    let started = std::time::Instant::now();
    let cfg = MachineConfig {
        disk: Some(DiskConfig::new(&path)),
        ..linux_config()
    };
    let mut m = Machine::boot("persist-linux-save", &cfg);
    m.expect("MHV-LINUX-READY", BOOT);
    m.expect("# ", BOOT);
    write_file(&mut m, "/tmp/a", 2048);
    let md5_a = md5_of(&mut m, "MDA", "/tmp/a");
    // A full save of Linux stores its pages raw (LZ4 does not pay on this
    // host), most of them written to the disk from the guest's frames where
    // they lie: what the restores and forks below read back.
    let base = save(&mut m, "save 1 base", "base");
    assert!(in_place(&base) > 1000, "few pages written in place: {base}");
    to_vm(&mut m, 1);
    write_file(&mut m, "/tmp/b", 1024);
    let md5_b = md5_of(&mut m, "MDB", "/tmp/b");
    save(&mut m, "save 1 d1 --diff base", "d1");
    to_vm(&mut m, 1);
    m.send("rm /tmp/a; echo GONE\n");
    m.expect("GONE\r\n", REPLY);
    write_file(&mut m, "/tmp/c", 512);
    let md5_c = md5_of(&mut m, "MDC", "/tmp/c");
    let up_saved = uptime(&mut m, "UPS");
    save(&mut m, "save 1 d2 --diff d1", "d2");
    // The log is relative to d2 now: a diff against anything else is refused.
    m.send("save 1 d3 --diff base\n");
    m.expect(
        "error: the VM's dirty log is relative to its save 'd2', not 'base'",
        REPLY,
    );
    m.send("quit\n");
    assert_eq!(m.wait_exit(REPLY), 0);
    m.assert_no_hyp_fault();
    let saved_at = started.elapsed();

    // A new QEMU: the newest diff, then the full save, then forks of it.
    let cfg = MachineConfig {
        guest: "none".into(),
        disk: Some(DiskConfig::new(&path)),
        restore: Some("d2".into()),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("persist-linux-restore", &cfg);
    m.expect("'d2' loaded as vm 1", BOOT);
    let up = uptime(&mut m, "UPR");
    assert!(
        up >= up_saved,
        "uptime {up} s after restore, {up_saved} s at save"
    );
    assert_eq!(md5_of(&mut m, "RB", "/tmp/b"), md5_b);
    assert_eq!(md5_of(&mut m, "RC", "/tmp/c"), md5_c);
    migrate_and_reclaim_vm1(&mut m);
    assert_eq!(md5_of(&mut m, "MB", "/tmp/b"), md5_b);
    assert_eq!(md5_of(&mut m, "MC", "/tmp/c"), md5_c);
    m.send("ls /tmp/a 2>&1 | grep -c 'No such'\n");
    m.expect("\n1\r\n", REPLY);

    // Forked right away, before it reads /tmp/a: a load writes its pages'
    // entries per 2 MiB chunk on first touch (no prefetch here), and a fork
    // must first write the ones still pending, or a child would find /tmp/a's
    // pages empty.
    to_hyp(&mut m);
    m.send("load base --no-prefetch\n");
    m.expect("'base' loaded as vm 2", REPLY);
    m.send("fork 2 4\n");
    for child in 3..=6 {
        m.expect(&format!("vm 2 forked: child vm {child}"), REPLY);
    }
    to_vm(&mut m, 3);
    assert_eq!(md5_of(&mut m, "CA", "/tmp/a"), md5_a);
    to_vm(&mut m, 2);
    assert_eq!(md5_of(&mut m, "BA", "/tmp/a"), md5_a);
    m.send("ls /tmp/b 2>&1 | grep -c 'No such'\n");
    m.expect("[vm2] 1\r\n", REPLY);
    for child in 3..=6 {
        to_vm(&mut m, child);
        m.send(&format!("echo child-$((6*{child}))-alive\n"));
        m.expect(&format!("[vm{child}] child-{}-alive", 6 * child), REPLY);
    }
    to_hyp(&mut m);
    m.send("quit\n");
    assert_eq!(m.wait_exit(REPLY), 0);
    m.assert_no_hyp_fault();
    println!(
        "linux persist: saved in {saved_at:?}, whole test {:?}",
        started.elapsed()
    );
    let _ = std::fs::remove_file(&path);
}

/// The number after the last `needle` in the transcript (waiting for it).
fn number_after(m: &mut Machine, needle: &str) -> u64 {
    m.expect(needle, REPLY);
    std::thread::sleep(Duration::from_millis(300));
    let t = m.transcript();
    let at = t.rfind(needle).unwrap() + needle.len();
    let digits: String = t[at..].chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {needle:?}"))
}

/// A restored VM's memory is ordinary memory (its pages read in so far are
/// frames; the rest stay disk-backed swap entries): its frames migrate and
/// are reclaimed to the compressed store, and vm 1 gets the keyboard back.
fn migrate_and_reclaim_vm1(m: &mut Machine) {
    let t0 = std::time::Instant::now();
    to_hyp(m);
    m.send("migrate 1 0x40000000 0x50000000\n");
    let moved = number_after(m, "migrate vm 1 0x40000000..0x50000000: moved ");
    assert!(moved > 0, "no frame of the restored VM migrated");
    m.send("reclaim 4096\n");
    let reclaimed = number_after(m, "reclaim: reclaimed ");
    assert!(reclaimed > 0, "no frame reclaimed");
    to_vm(m, 1);
    println!(
        "restored vm 1: {moved} frames migrated, {reclaimed} reclaimed, in {:?}",
        t0.elapsed()
    );
}

/// Where the last `save` put its image: (first sector, end sector, page
/// data start byte, end byte), from its "image at sectors" line.
fn extent(text: &str) -> (u64, u64, u64, u64) {
    let line = text.rsplit("image at sectors ").next().unwrap();
    let line = line.lines().next().unwrap().trim();
    let (sectors, bytes) = line.split_once(", page data at bytes ").unwrap();
    let range = |r: &str, hex: bool| -> (u64, u64) {
        let (a, b) = r.split_once("..").unwrap();
        let n = |w: &str| match hex {
            true => u64::from_str_radix(w.trim_start_matches("0x"), 16).unwrap(),
            false => w.parse().unwrap(),
        };
        (n(a), n(b))
    };
    let (s0, s1) = range(sectors, false);
    let (b0, b1) = range(bytes, true);
    (s0, s1, b0, b1)
}

/// `save <vm> <name>` at the hypervisor console; where its image went.
fn save_at(m: &mut Machine, vm: u32, name: &str) -> (u64, u64, u64, u64) {
    command(
        m,
        &format!("save {vm} {name}"),
        &format!("saved as '{name}'"),
    );
    m.expect("page data at bytes", REPLY);
    m.expect("\n", REPLY);
    extent(&m.transcript())
}

/// A machine with the test guest idling as vm 1 and the disk at `path`.
fn test_machine(name: &str, path: &std::path::Path) -> Machine {
    let cfg = MachineConfig {
        vcpus: Some(1),
        guest_mem: Some("32M".into()),
        guest_args: Some("idle beat_ms=300".into()),
        disk: Some(DiskConfig {
            size: 2 << 20,
            ..DiskConfig::new(path)
        }),
        ..MachineConfig::default()
    };
    Machine::boot(name, &cfg)
}

/// The page count of the load just answered ("N pages on the disk"): the
/// test guest's non-zero pages, which change with its build.
fn pages_on_disk(m: &mut Machine) -> u64 {
    let seen = m.expect(" pages on the disk", REPLY);
    let seen = seen.trim_end_matches(" pages on the disk");
    seen.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Runs a console command and waits for its answer.
fn command(m: &mut Machine, cmd: &str, answer: &str) -> String {
    m.command(cmd, answer, REPLY)
}

fn flip(path: &std::path::Path, byte: u64) {
    let mut data = std::fs::read(path).unwrap();
    data[byte as usize] ^= 0x5a;
    std::fs::write(path, data).unwrap();
}

#[test]
fn damaged_images_are_refused_and_only_the_faulting_vm_stops() {
    let path = disk_path("damage");
    let mut m = test_machine("persist-damage-save", &path);
    m.expect("GUEST: idle: heartbeat 1", BOOT);
    let a = save_at(&mut m, 1, "a");
    let b = save_at(&mut m, 1, "b");
    assert!(a.1 <= b.0 && a.2 < a.3 && a.3 <= a.1 * 512, "{a:?} {b:?}");
    // An in-memory snapshot is saved as it is (the saves' own snapshots
    // took vm ids too).
    command(&mut m, "snapshot 1", "snapshot of vm 1 is vm ");
    m.expect("\n", REPLY);
    let t = m.transcript();
    let snap =
        qemu_tests::number_after(&t[t.rfind("snapshot of vm 1").unwrap()..], "is vm ").unwrap();
    command(
        &mut m,
        &format!("save {snap} snap"),
        &format!("vm {snap} saved as 'snap'"),
    );
    command(
        &mut m,
        "save 1 a",
        "error: snapshot store: a snapshot with this name exists",
    );
    // Fill the 2 MiB disk: the save that does not fit is refused.
    let mut refused = false;
    for i in 0..64 {
        m.send(&format!("save 1 fill{i}\n"));
        let deadline = std::time::Instant::now() + REPLY;
        loop {
            let t = m.transcript();
            if t.contains("error: snapshot store: no space") {
                refused = true;
                break;
            }
            if t.contains(&format!("saved as 'fill{i}'")) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "save {i} got no answer:\n{t}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        if refused {
            break;
        }
    }
    assert!(refused, "the disk never filled:\n{}", m.transcript());
    // The VM that could not be saved runs on.
    let beats = m.transcript().matches("heartbeat").count();
    command(&mut m, "sleep 1000", "hyp>");
    std::thread::sleep(Duration::from_secs(2));
    assert!(m.transcript().matches("heartbeat").count() > beats);
    command(&mut m, "quit", "exiting with status 0");
    assert_eq!(m.wait_exit(REPLY), 0);
    m.assert_no_hyp_fault();

    // A byte of a's page data and one of b's header.
    flip(&path, (a.2 + a.3) / 2);
    flip(&path, b.0 * 512 + 64);
    // The boot guest (vm 1) and the intact snapshot (vm 2) run throughout.
    let mut m = test_machine("persist-damage-load", &path);
    m.expect("GUEST: idle: heartbeat 1", BOOT);
    let mark = m.cursor();
    command(&mut m, "load snap", "'snap' loaded as vm 2");
    let n = pages_on_disk(&mut m);
    // The prefetch (another CPU) may be done before the load's reply.
    m.expect_since(mark, &format!("all {n} pages of 'snap' loaded"), REPLY);
    command(
        &mut m,
        "load b",
        "error: snapshot store: checksum mismatch in the image header",
    );
    command(
        &mut m,
        "load nosuch",
        "error: snapshot store: no such snapshot",
    );
    // Its first guest entry (on the other CPU) may fault the damaged page
    // before the load's reply is printed.
    let mark = m.cursor();
    command(&mut m, "load a", "'a' loaded as vm 3");
    m.expect_since(mark, "of its disk image failed its checksum", REPLY);
    m.expect_since(mark, "vm 3 (test) stopped, status 2", REPLY);
    // The others were untouched.
    m.expect("[vm1] GUEST: idle: heartbeat", REPLY);
    m.expect("[vm2] GUEST: idle: heartbeat", REPLY);
    let vms = command(&mut m, "vms", "  2   snapshot    running");
    assert!(vms.contains("  1   test        running"), "{vms}");
    command(&mut m, "quit", "exiting with status 2");
    assert_eq!(m.wait_exit(REPLY), 2);
    m.assert_no_hyp_fault();

    // A truncated disk, then a store of another format version: version 1,
    // whose page checksums were XXH3.
    let full = std::fs::read(&path).unwrap();
    std::fs::write(&path, &full[..full.len() / 2]).unwrap();
    let mut m = test_machine("persist-damage-truncated", &path);
    m.expect("GUEST: idle: heartbeat 1", BOOT);
    command(
        &mut m,
        "load snap",
        "error: snapshot store: device truncated",
    );
    command(&mut m, "quit", "exiting with status 0");
    assert_eq!(m.wait_exit(REPLY), 0);
    let mut other = full.clone();
    other[8] = 1;
    std::fs::write(&path, &other).unwrap();
    let mut m = test_machine("persist-damage-version", &path);
    m.expect("GUEST: idle: heartbeat 1", BOOT);
    command(
        &mut m,
        "load snap",
        "error: snapshot store: format version 1 (this build reads 2)",
    );
    // A save refuses it too, and does not format over it.
    command(
        &mut m,
        "save 1 x",
        "error: snapshot store: format version 1",
    );
    command(&mut m, "quit", "exiting with status 0");
    assert_eq!(m.wait_exit(REPLY), 0);
    assert!(
        std::fs::read(&path).unwrap() == other,
        "the store was written"
    );
    m.assert_no_hyp_fault();
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_loaded_vm_saves_the_order_it_touched_its_pages_in() {
    let path = disk_path("touch");
    let mut m = test_machine("persist-touch", &path);
    m.expect("GUEST: idle: heartbeat 1", BOOT);
    command(&mut m, "save 1 t", "vm 1 saved as 't'");
    // (The save's own snapshot was vm 2.) No prefetch: with it, the idle
    // guest, waiting in WFI for its next heartbeat, could have every page
    // loaded for it before it touched one (1 run in 12 did).
    command(&mut m, "load t --no-prefetch", "'t' loaded as vm 3");
    let n = pages_on_disk(&mut m);
    m.expect("[vm3] GUEST: idle: heartbeat", REPLY);
    // Its next save records the pages it faulted in itself, in order (the
    // save's own reads are not its touches); a VM never loaded has none.
    command(&mut m, "save 3 t2", "vm 3 saved as 't2'");
    let touched = m.expect(" pages in its touch order", REPLY);
    let touched = touched.trim_end_matches(" pages in its touch order");
    let touched: u64 = touched.split_whitespace().last().unwrap().parse().unwrap();
    assert!(
        (1..n).contains(&touched),
        "touch order of {touched} of {n} pages"
    );
    command(&mut m, "save 1 t3", "vm 1 saved as 't3'");
    m.expect("  0 pages in its touch order", REPLY);
    command(&mut m, "quit", "exiting with status 0");
    assert_eq!(m.wait_exit(REPLY), 0);
    m.assert_no_hyp_fault();
    let _ = std::fs::remove_file(&path);
}
