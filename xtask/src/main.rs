//! `cargo xtask run|test|bench|build`: installs what is missing, builds the
//! guest and hypervisor images, and runs them under QEMU.

mod build;
mod qemu;
mod setup;

use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  run [--smp N] [--mem SIZE] [--cpu MODEL] [--guest test|none] [--vcpus N]
      [--guest-mem SIZE] [--guest-args ARGS] [--script \"cmd; cmd\"] [--gdb] [--release]
                 build everything and boot the hypervisor with its default guest
  test           clippy, host tests of every crate, then the QEMU scenarios in tests/
  bench          benchmarks (results belong in docs/BENCHMARKS.md)
  build          build the images only
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => qemu::run(&args[1..]),
        Some("test") => test(),
        Some("bench") => bench(),
        Some("build") => setup::ensure()
            .and_then(|_| build::images(false))
            .map(|_| ()),
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Everything that proves it works, cheapest first.
fn test() -> Result<(), String> {
    setup::ensure()?;
    let images = build::images(false)?;
    build::clippy(&images)?;
    build::cargo(
        &[
            "test",
            "--workspace",
            "--exclude",
            "hyp",
            "--exclude",
            "guest",
            "--exclude",
            "qemu-tests",
        ],
        &[],
    )?;
    build::cargo(
        &["test", "-p", "qemu-tests", "--", "--test-threads=1"],
        &[
            ("HYP_ELF", images.hyp.to_str().unwrap()),
            ("MHV_QEMU", "qemu-system-aarch64"),
        ],
    )?;
    println!("xtask: all tests passed");
    Ok(())
}

fn bench() -> Result<(), String> {
    setup::ensure()?;
    build::cargo(&["bench", "-p", "rmap", "--bench", "anon_vma_chain"], &[])?;
    println!("xtask: record the tables above in docs/BENCHMARKS.md with this command");
    Ok(())
}
