//! The Linux guest's images: Debian's current arm64 kernel (the version the
//! `linux-image-arm64` metapackage depends on today) and an initramfs built
//! around Debian's static busybox, fetched with apt and cached in
//! target/linux/. Also the boot-time benchmark against the same kernel
//! booted bare by QEMU. The initramfs also carries linuxbench's static
//! `cowbench` (see anchor.rs).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The init script: mount the pseudo file systems, print the banner the
/// tests and the benchmark wait for, and keep a shell on the console.
const INIT: &str = r#"#!/bin/sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /usr/bin /usr/sbin /sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
hostname mhv-linux
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root PS1='\h:\w\$ '
echo "MHV-LINUX-READY $(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo)"
while true; do setsid cttyhack sh; echo "[init] shell exited, starting another"; done
"#;

pub struct LinuxImages {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

fn dir() -> PathBuf {
    crate::build::target_dir().join("linux")
}

/// The cached images, fetched and built when missing.
pub fn ensure() -> Result<LinuxImages, String> {
    let dir = dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let images = LinuxImages {
        kernel: dir.join("Image"),
        initrd: dir.join("initramfs.cpio"),
    };
    let busybox = dir.join("busybox");
    if !images.kernel.exists() || !busybox.exists() {
        fetch(&dir)?;
    }
    let cowbench = crate::build::cowbench()?;
    let cowbench = std::fs::read(&cowbench).map_err(|e| format!("{}: {e}", cowbench.display()))?;
    // The stamp names what the initramfs was built from: a changed init
    // script or a rebuilt cowbench rebuilds it.
    let stamp = dir.join("init.stamp");
    let built_from = format!("{INIT}cowbench fnv1a64 {:016x}\n", fnv1a(&cowbench));
    if !images.initrd.exists()
        || std::fs::read_to_string(&stamp).ok().as_deref() != Some(&built_from)
    {
        let busybox = std::fs::read(&busybox).map_err(|e| format!("busybox: {e}"))?;
        std::fs::write(&images.initrd, initramfs(&busybox, &cowbench))
            .map_err(|e| format!("initramfs: {e}"))?;
        std::fs::write(&stamp, built_from).map_err(|e| format!("{}: {e}", stamp.display()))?;
        println!("xtask: built {}", images.initrd.display());
    }
    Ok(images)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn output(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{cmd} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_in(dir: &Path, cmd: &str, args: &[&str]) -> Result<(), String> {
    println!("xtask: $ {cmd} {}", args.join(" "));
    let status = Command::new(cmd)
        .current_dir(dir)
        .args(args)
        .status()
        .map_err(|e| format!("{cmd}: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("`{cmd} {}` failed ({status})", args.join(" ")))
}

/// Makes apt see arm64 packages (needs root the first time).
fn enable_arm64() -> Result<(), String> {
    let foreign = output("dpkg", &["--print-foreign-architectures"])?;
    let known = output("apt-cache", &["policy", "linux-image-arm64:arm64"]).unwrap_or_default();
    if foreign.lines().any(|l| l.trim() == "arm64")
        && known.contains("Candidate:")
        && !known.contains("(none)")
    {
        return Ok(());
    }
    let is_root = output("id", &["-u"]).is_ok_and(|o| o.trim() == "0");
    if !is_root {
        return Err("the Linux guest needs Debian's arm64 packages: run `sudo dpkg --add-architecture arm64 && sudo apt-get update` and retry".into());
    }
    run_in(Path::new("/"), "dpkg", &["--add-architecture", "arm64"])?;
    run_in(Path::new("/"), "apt-get", &["update", "-qq"])
}

/// The kernel package the arm64 metapackage points at today.
fn kernel_package() -> Result<String, String> {
    let deps = output("apt-cache", &["depends", "linux-image-arm64:arm64"])?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(|p| p.trim_end_matches(":arm64"))
        .find(|p| p.starts_with("linux-image-"))
        .map(String::from)
        .ok_or_else(|| {
            format!("no kernel dependency in `apt-cache depends linux-image-arm64:arm64`:\n{deps}")
        })
}

/// Downloads the kernel and busybox packages and unpacks what we need.
fn fetch(dir: &Path) -> Result<(), String> {
    enable_arm64()?;
    let pkg = kernel_package()?;
    let dl = dir.join("deb");
    let _ = std::fs::remove_dir_all(&dl);
    std::fs::create_dir_all(&dl).map_err(|e| e.to_string())?;
    run_in(
        &dl,
        "apt-get",
        &[
            "download",
            "-q",
            &format!("{pkg}:arm64"),
            "busybox-static:arm64",
        ],
    )?;
    for entry in std::fs::read_dir(&dl).map_err(|e| e.to_string())? {
        let deb = entry.map_err(|e| e.to_string())?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            let deb = deb.to_string_lossy().into_owned();
            run_in(&dl, "dpkg-deb", &["-x", &deb, "root"])?;
        }
    }
    let root = dl.join("root");
    let vmlinuz = std::fs::read_dir(root.join("boot"))
        .map_err(|e| format!("no /boot in {pkg}: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or(format!("no vmlinuz in {pkg}"))?;
    let image = std::fs::read(&vmlinuz).map_err(|e| e.to_string())?;
    let image = if image.starts_with(&[0x1f, 0x8b]) {
        gunzip(&vmlinuz)?
    } else {
        image
    };
    if image.len() < 64 || &image[56..60] != b"ARM\x64" {
        return Err(format!("{} is not an arm64 Image", vmlinuz.display()));
    }
    std::fs::write(dir.join("Image"), image).map_err(|e| e.to_string())?;
    std::fs::copy(root.join("bin/busybox"), dir.join("busybox"))
        .map_err(|e| format!("busybox: {e}"))?;
    std::fs::write(dir.join("VERSION"), format!("{pkg}\n")).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&dl);
    println!("xtask: Linux guest from {pkg} in {}", dir.display());
    Ok(())
}

fn gunzip(path: &Path) -> Result<Vec<u8>, String> {
    let out = Command::new("gzip")
        .arg("-dc")
        .arg(path)
        .output()
        .map_err(|e| format!("gzip: {e}"))?;
    out.status
        .success()
        .then_some(out.stdout)
        .ok_or_else(|| format!("gzip -dc {} failed", path.display()))
}

/// An uncompressed newc cpio archive: directories, /dev/console (so init
/// has a console before devtmpfs), busybox, /bin/sh, /bin/cowbench
/// (linuxbench: Linux's own CoW fault, timed) and /init. Written here
/// rather than with cpio(1) so it needs neither the tool nor root for the
/// device node.
pub fn initramfs(busybox: &[u8], cowbench: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ino = 1;
    let mut add = |name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
        cpio_entry(&mut out, ino, name, mode, rdev, data);
        ino += 1;
    };
    for d in [
        "bin", "sbin", "dev", "etc", "proc", "root", "sys", "tmp", "usr", "usr/bin", "usr/sbin",
    ] {
        add(d, 0o040755, (0, 0), &[]);
    }
    add("dev/console", 0o020600, (5, 1), &[]);
    add("bin/busybox", 0o100755, (0, 0), busybox);
    add("bin/sh", 0o120777, (0, 0), b"busybox");
    add("bin/cowbench", 0o100755, (0, 0), cowbench);
    add("init", 0o100755, (0, 0), INIT.as_bytes());
    cpio_entry(&mut out, 0, "TRAILER!!!", 0, (0, 0), &[]);
    out
}

fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        write!(out, "{f:08x}").unwrap();
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Seconds from QEMU's start to the init banner, or an error with the console.
fn time_to_banner(mut cmd: Command, timeout: Duration) -> Result<f64, String> {
    let start = Instant::now();
    let mut m = qemu_tests::Machine::spawn("bench", &mut cmd);
    let seen = m.try_expect("MHV-LINUX-READY", timeout);
    let elapsed = start.elapsed().as_secs_f64();
    seen.map(|_| elapsed)
        .map_err(|e| format!("{e}\n{}", m.transcript()))
}

/// Boot time of the Linux guest under the hypervisor against the same
/// kernel and initramfs booted bare at EL1, alternating, in one run.
pub fn bench(hyp: &Path, reps: usize) -> Result<(), String> {
    let images = ensure()?;
    let under = qemu_tests::MachineConfig {
        guest: "linux".into(),
        linux: Some((images.kernel.clone(), images.initrd.clone())),
        ..qemu_tests::MachineConfig::default()
    };
    let timeout = Duration::from_secs(180);
    let (mut hyp_times, mut bare_times, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..reps {
        let b = time_to_banner(qemu_tests::bare_linux_command(&under), timeout)?;
        let h = time_to_banner(under.command(hyp), timeout)?;
        println!(
            "xtask: bench linux boot rep {}: bare {b:.2} s, under the hypervisor {h:.2} s ({:.2}x)",
            i + 1,
            h / b
        );
        bare_times.push(b);
        hyp_times.push(h);
        ratios.push(h / b);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (b, h) = (median(&mut bare_times), median(&mut hyp_times));
    println!("\n| Linux boot to init banner ({reps} reps, median) | seconds |");
    println!("|---|---|");
    println!("| bare QEMU, EL1 (`-kernel Image -initrd`) | {b:.2} |");
    println!("| under the hypervisor | {h:.2} |");
    println!("| ratio of the medians | {:.2}x |", h / b);
    // Each pair ran back to back, so its ratio sees the same machine load.
    println!(
        "| median of the per-rep ratios | {:.2}x |",
        median(&mut ratios)
    );
    Ok(())
}

/// Host frames in use, from the hypervisor's `stats` output
/// ("frames: F free / T total (U used, S shared)"): the last such line.
fn used_frames(text: &str) -> Option<u64> {
    let line = text.lines().rev().find(|l| l.starts_with("frames:"))?;
    let used = line.split('(').nth(1)?.split_whitespace().next()?;
    used.parse().ok()
}

/// Fork latency of a running Linux VM and the host memory each idle fork
/// costs: Linux boots to its shell (release hypervisor, 1 GiB of host RAM,
/// 256 MiB guest, 2 vCPUs), idles, and the console forks it `forks` times
/// (each `fork` times itself inside the hypervisor); `stats` before the
/// forks and after every VM idled for `idle` gives the extra frames. Each
/// child then answers a shell command, so only running forks are counted.
pub fn fork_bench(hyp: &Path, forks: u32, idle: Duration) -> Result<(), String> {
    let images = ensure()?;
    let cfg = qemu_tests::MachineConfig {
        guest: "linux".into(),
        linux: Some((images.kernel.clone(), images.initrd.clone())),
        ..qemu_tests::MachineConfig::default()
    };
    let t = Duration::from_secs(180);
    let mut m = qemu_tests::Machine::spawn("bench-linux-fork", &mut cfg.command(hyp));
    let fail = |m: &qemu_tests::Machine, e: String| format!("{e}\n{}", m.transcript());
    m.try_expect("MHV-LINUX-READY", t)
        .and_then(|_| m.try_expect("# ", t))
        .map_err(|e| fail(&m, e))?;
    std::thread::sleep(idle);
    // Ctrl-A h: the keyboard goes to the hypervisor console.
    m.send("\x01hstats\n");
    let before = m
        .try_expect("vms:", t)
        .map_err(|e| fail(&m, e))
        .and_then(|s| used_frames(&s).ok_or_else(|| format!("no frames line in {s}")))?;
    m.send(&format!("fork 1 {forks}\n"));
    let mut latencies = Vec::new();
    for child in 2..2 + forks {
        let seen = m
            .try_expect(&format!("forked: child vm {child} in "), t)
            .and_then(|_| m.try_expect(" us", t))
            .map_err(|e| fail(&m, e))?;
        let us: f64 = seen
            .trim_end_matches(" us")
            .trim()
            .parse()
            .map_err(|_| format!("bad fork latency {seen:?}"))?;
        latencies.push(us / 1000.0);
    }
    std::thread::sleep(idle);
    m.send("stats\n");
    let after = m
        .try_expect("vms:", t)
        .map_err(|e| fail(&m, e))
        .and_then(|s| used_frames(&s).ok_or_else(|| format!("no frames line in {s}")))?;
    // Every VM still answers (Ctrl-A <vm> Enter gives it the keyboard).
    for vm in 1..2 + forks {
        m.send(&format!("\x01{vm}\recho alive-$((6*{vm}))\n"));
        m.try_expect(&format!("[vm{vm}] alive-{}", 6 * vm), t)
            .map_err(|e| fail(&m, e))?;
    }
    m.send("\x01hquit\n");
    let per_fork = (after.saturating_sub(before)) as f64 * 4096.0 / f64::from(forks) / 1048576.0;
    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "\n| Linux fork ({forks} forks of an idle 256 MiB, 2-vCPU guest; idle {} s) | |",
        idle.as_secs()
    );
    println!("|---|---|");
    println!(
        "| fork latency, median (min - max) | {:.2} ms ({:.2} - {:.2}) |",
        sorted[sorted.len() / 2],
        sorted[0],
        sorted[sorted.len() - 1]
    );
    println!("| host frames used before / after | {before} / {after} |");
    println!("| extra host memory per idle fork | {per_fork:.2} MiB |");
    Ok(())
}
