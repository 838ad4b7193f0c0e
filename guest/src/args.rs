//! Bootargs (`/chosen/bootargs`): whitespace-separated tokens.
//!
//! - a mode name (`selftest`, `wild`, see `modes::Mode`); the first one wins,
//!   default `selftest`;
//! - `mem=<MiB>`: size of the selftest area (decimal MiB), or `mem=max` for
//!   all RAM above the image (less a margin); default 64 MiB;
//! - `wild=<hex>`: the address the `wild` mode reads (with or without `0x`).
//!
//! Other tokens (e.g. `console=...`) are ignored.

use crate::modes::Mode;
use crate::report::{reason, Reason};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemSize {
    MiB(usize),
    Max,
}

pub struct Args {
    pub mode: Mode,
    pub mem: Option<MemSize>,
    pub wild: Option<u64>,
}

impl Args {
    pub fn parse(bootargs: &str) -> Result<Self, Reason> {
        let mut args = Args {
            mode: Mode::Selftest,
            mem: None,
            wild: None,
        };
        let mut mode = None;
        for token in bootargs.split_ascii_whitespace() {
            if let Some(v) = token.strip_prefix("mem=") {
                args.mem = Some(parse_mem(v).ok_or_else(|| reason!("bad bootarg {token}"))?);
            } else if let Some(v) = token.strip_prefix("wild=") {
                args.wild = Some(parse_hex(v).ok_or_else(|| reason!("bad bootarg {token}"))?);
            } else if let Some(m) = Mode::from_name(token) {
                mode.get_or_insert(m);
            }
        }
        args.mode = mode.unwrap_or(Mode::Selftest);
        Ok(args)
    }
}

fn parse_mem(v: &str) -> Option<MemSize> {
    match v {
        "max" => Some(MemSize::Max),
        _ => v.parse().ok().filter(|&m| m > 0).map(MemSize::MiB),
    }
}

fn parse_hex(v: &str) -> Option<u64> {
    let digits = v
        .strip_prefix("0x")
        .or_else(|| v.strip_prefix("0X"))
        .unwrap_or(v);
    u64::from_str_radix(digits, 16).ok()
}
