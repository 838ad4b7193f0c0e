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

/// Cargo's target directory (`CARGO_TARGET_DIR`, `build.target-dir` or
/// `target/`), as `cargo metadata` reports it; asked once.
pub fn target_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .current_dir(root())
            .output();
        out.ok()
            .filter(|o| o.status.success())
            .and_then(|o| json_string(&String::from_utf8_lossy(&o.stdout), "target_directory"))
            .map(PathBuf::from)
            .unwrap_or_else(|| root().join("target"))
    })
    .clone()
}

/// The string value of the first `"key":"..."` in a JSON text (enough for
/// `cargo metadata`'s flat `target_directory`; handles `\\` and `\"`).
fn json_string(json: &str, key: &str) -> Option<String> {
    let start = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let mut out = String::new();
    let mut chars = json[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => out.push(chars.next()?),
            c => out.push(c),
        }
    }
    None
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
    let target = target_dir();
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

/// The target of linuxbench's `cowbench`, the Linux guest's static program;
/// its linker (rust-lld) and static linking are set in .cargo/config.toml.
pub const LINUX_TARGET: &str = "aarch64-unknown-linux-musl";

/// Builds linuxbench's `cowbench` (always optimised: it is a measurement)
/// and returns the path of the static arm64 executable.
pub fn cowbench() -> Result<PathBuf, String> {
    cargo(
        &[
            "build",
            "-p",
            "linuxbench",
            "--target",
            LINUX_TARGET,
            "--release",
        ],
        &[],
    )?;
    Ok(target_dir().join(LINUX_TARGET).join("release/cowbench"))
}

/// clippy -D warnings on the host crates, on the bare-metal ones and on
/// the Linux guest's program.
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
    )?;
    cargo(
        &[
            "clippy",
            "-p",
            "linuxbench",
            "--target",
            LINUX_TARGET,
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )
}

#[cfg(test)]
mod tests {
    use super::json_string;

    #[test]
    fn target_directory_is_read_from_cargo_metadata_json() {
        let json = r#"{"packages":[],"target_directory":"/tmp/x \"y\"\\z","version":1}"#;
        assert_eq!(
            json_string(json, "target_directory").as_deref(),
            Some(r#"/tmp/x "y"\z"#)
        );
        assert_eq!(json_string(json, "workspace_root"), None);
        assert_eq!(
            json_string(r#"{"target_directory":"/unterminated"#, "target_directory"),
            None
        );
    }

    #[test]
    fn the_target_directory_follows_cargo_target_dir() {
        // cargo metadata is what honours CARGO_TARGET_DIR and config files.
        let dir = super::target_dir();
        assert!(dir.is_absolute(), "{}", dir.display());
    }
}
