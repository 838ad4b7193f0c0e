//! `mhvctl`: see the library docs (`src/lib.rs`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = match mhvctl::parse_args(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mhvctl: {e}");
            return ExitCode::from(2);
        }
    };
    let mut client = match mhvctl::Client::connect(&args.api) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mhvctl: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(cmd) = args.command else {
        return follow_events(&mut client);
    };
    let json = args.json;
    let mut on_event = |line: &str| {
        if json {
            println!("{line}");
        }
    };
    match client.request(&cmd, args.timeout, &mut on_event) {
        Ok((line, answer)) => {
            let (text, ok) = mhvctl::render(&answer);
            if json {
                println!("{line}");
            } else if ok {
                println!("{text}");
            } else {
                eprintln!("{text}");
            }
            ExitCode::from(if ok { 0 } else { 1 })
        }
        Err(e) => {
            eprintln!("mhvctl: {e}");
            ExitCode::from(2)
        }
    }
}

/// `mhvctl events`: prints event lines until the channel closes.
fn follow_events(client: &mut mhvctl::Client) -> ExitCode {
    loop {
        let deadline = Instant::now() + Duration::from_secs(3600);
        match client.read(deadline) {
            Ok((line, v)) if v.get("event").is_some() => println!("{line}"),
            Ok(_) => {}
            Err(e) if e.starts_with("no answer") => {}
            Err(e) => {
                eprintln!("mhvctl: {e}");
                return ExitCode::from(2);
            }
        }
    }
}
