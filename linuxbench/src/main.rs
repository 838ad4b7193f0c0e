//! `cowbench [MiB]`: Linux's own CoW write fault on MiB (default 16) of
//! anonymous memory, one machine-readable line (see the library). A first,
//! unreported round warms the frames the copies land in, so the figure is
//! Linux's fault and not the first touch of guest memory at stage 2.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mib = match std::env::args().nth(1).map(|a| a.parse::<usize>()) {
        None => 16,
        Some(Ok(m)) if m > 0 => m,
        Some(_) => {
            eprintln!("usage: cowbench [MiB]");
            return ExitCode::from(2);
        }
    };
    let rounds = linuxbench::measure(mib << 20).and_then(|warm| {
        let line = warm.line();
        println!(
            "{}",
            line.replacen("cowbench-linux:", "cowbench-linux warm-up:", 1)
        );
        linuxbench::measure(mib << 20)
    });
    match rounds {
        Ok(r) => {
            println!("{}", r.line());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cowbench: {e}");
            ExitCode::FAILURE
        }
    }
}
