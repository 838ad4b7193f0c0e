//! Installs what a fresh Debian machine lacks: the bare-metal Rust targets
//! and the static arm64 Linux one (linuxbench's `cowbench`, linked by the
//! toolchain's rust-lld against the musl the target ships), llvm-tools
//! (objcopy for the guest image), and QEMU.

use std::process::Command;

const TARGETS: [&str; 3] = [
    "aarch64-unknown-none-softfloat",
    "aarch64-unknown-none",
    crate::build::LINUX_TARGET,
];

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    println!("xtask: $ {cmd} {}", args.join(" "));
    let status = Command::new(cmd)
        .args(args)
        .status()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{cmd} {}` failed ({status})", args.join(" ")))
    }
}

pub fn ensure() -> Result<(), String> {
    rust_targets()?;
    qemu()
}

fn rust_targets() -> Result<(), String> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    let installed = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for t in TARGETS {
        if !installed.lines().any(|l| l.trim() == t) {
            run("rustup", &["target", "add", t])?;
        }
    }
    let clippy = Command::new("cargo").args(["clippy", "--version"]).output();
    if !clippy.is_ok_and(|o| o.status.success()) {
        run("rustup", &["component", "add", "clippy"])?;
    }
    if crate::build::objcopy().is_none() {
        run("rustup", &["component", "add", "llvm-tools-preview"])?;
    }
    Ok(())
}

fn qemu() -> Result<(), String> {
    if have("qemu-system-aarch64") {
        return Ok(());
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if !is_root {
        return Err("qemu-system-aarch64 is missing: run `sudo apt-get install -y qemu-system-arm` (Debian) and retry".into());
    }
    run("apt-get", &["update", "-qq"])?;
    run("apt-get", &["install", "-y", "-qq", "qemu-system-arm"])
}

/// The cargo-mutants release `cargo xtask mutants` was scored with (docs/TESTING.md).
const CARGO_MUTANTS: &str = "27.1.0";

/// Installs cargo-mutants (only `cargo xtask mutants` needs it) unless that release is there.
pub fn cargo_mutants() -> Result<(), String> {
    let out = Command::new("cargo")
        .args(["mutants", "--version"])
        .output();
    let have = out.is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout).trim() == format!("cargo-mutants {CARGO_MUTANTS}")
    });
    if have {
        return Ok(());
    }
    run(
        "cargo",
        &[
            "install",
            "--locked",
            &format!("cargo-mutants@{CARGO_MUTANTS}"),
        ],
    )
}
