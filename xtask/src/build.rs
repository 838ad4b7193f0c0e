//! Builds the guest (an arm64 Image) and the hypervisor ELF that embeds it.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Images {
    pub guest: PathBuf,
    pub hyp: PathBuf,
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs cargo in the workspace root with extra environment.
pub fn cargo(args: &[&str], env: &[(&str, &str)]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("xtask: $ cargo {}", args.join(" "));
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root()).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd.status().map_err(|e| format!("cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`cargo {}` failed", args.join(" ")))
    }
}

/// llvm-objcopy from the toolchain's llvm-tools component, if installed.
pub fn objcopy() -> Option<PathBuf> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    let sysroot = String::from_utf8(out.stdout).ok()?;
    let host = Command::new("rustc").arg("-vV").output().ok()?;
    let host = String::from_utf8(host.stdout).ok()?;
    let triple = host.lines().find_map(|l| l.strip_prefix("host: "))?;
    let path = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(triple)
        .join("bin/llvm-objcopy");
    path.exists().then_some(path)
}

pub fn images(release: bool) -> Result<Images, String> {
    let profile = if release { "release" } else { "debug" };
    // The guest is always optimised: its self-check is the workload.
    cargo(
        &[
            "build",
            "-p",
            "guest",
            "--target",
            "aarch64-unknown-none",
            "--release",
        ],
        &[],
    )?;
    let target = root().join("target");
    let guest_elf = target.join("aarch64-unknown-none/release/guest");
    let guest = target.join("guest.bin");
    let objcopy =
        objcopy().ok_or("llvm-objcopy not found (rustup component add llvm-tools-preview)")?;
    let status = Command::new(objcopy)
        .args(["-O", "binary"])
        .arg(&guest_elf)
        .arg(&guest)
        .status()
        .map_err(|e| format!("objcopy: {e}"))?;
    if !status.success() {
        return Err("objcopy of the guest failed".into());
    }
    let mut args = vec![
        "build",
        "-p",
        "hyp",
        "--target",
        "aarch64-unknown-none-softfloat",
    ];
    if release {
        args.push("--release");
    }
    cargo(&args, &[("HYP_GUEST_IMAGE", guest.to_str().unwrap())])?;
    let hyp = target
        .join("aarch64-unknown-none-softfloat")
        .join(profile)
        .join("hyp");
    Ok(Images { guest, hyp })
}

/// clippy -D warnings on the host crates and on the bare-metal ones.
pub fn clippy(images: &Images) -> Result<(), String> {
    let env = [("HYP_GUEST_IMAGE", images.guest.to_str().unwrap())];
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"], &[])?;
    // The QEMU scenarios are not a default member (they need the images).
    cargo(
        &[
            "clippy",
            "-p",
            "qemu-tests",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    cargo(
        &[
            "clippy",
            "-p",
            "hyp",
            "--target",
            "aarch64-unknown-none-softfloat",
            "--",
            "-D",
            "warnings",
        ],
        &env,
    )?;
    cargo(
        &[
            "clippy",
            "-p",
            "guest",
            "--target",
            "aarch64-unknown-none",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )
}
