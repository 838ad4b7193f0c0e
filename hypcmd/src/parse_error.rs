//! Why a console line is not a command, and the console's message for it.

use crate::PAGE_SIZE;
use alloc::string::String;
use core::fmt;

/// Why a console line is not a command. `Display` is the console's message
/// (printed after `error: `).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// The first word is no command.
    Unknown(String),
    /// A required argument is absent; names it.
    Missing(&'static str),
    /// A VM id that is not a decimal `u32`.
    NotVmId(String),
    /// An address that is not a hex `u64`.
    NotHex {
        /// Which argument: its name in the usage ("address", "IPA end"...).
        what: &'static str,
        /// The word as typed.
        arg: String,
    },
    /// A decimal number that is not one, or outside its allowed range.
    OutOfRange {
        /// Which number: its name in the usage ("count", "seconds"...).
        what: &'static str,
        /// The word as typed.
        arg: String,
        /// Smallest value allowed.
        min: u64,
        /// Largest value allowed.
        max: u64,
    },
    /// A range end that rounds up past the last page of the address space.
    EndOverflow {
        /// Which end: "IPA end" or "PA end".
        what: &'static str,
        /// The word as typed.
        arg: String,
    },
    /// A range whose page-aligned end is not above its start.
    EmptyRange {
        /// The start, rounded down to its page.
        start: u64,
        /// The end, rounded up to a page boundary.
        end: u64,
    },
    /// A command whose arguments are checked as a whole: its usage line.
    Usage(&'static str),
    /// A word after the last argument `cmd` takes.
    Extra {
        /// The command's name.
        cmd: &'static str,
        /// The first word too many, as typed.
        arg: String,
    },
}

/// At most this many characters of a typed word are echoed in a message
/// (a pasted megabyte stays one line of error).
const ECHO_CHARS: usize = 40;

/// A typed word, shortened for a message.
struct Echo<'a>(&'a str);

impl fmt::Display for Echo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.chars();
        for c in chars.by_ref().take(ECHO_CHARS) {
            write!(f, "{c}")?;
        }
        if chars.next().is_some() {
            f.write_str("...")?;
        }
        Ok(())
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Unknown(cmd) => write!(f, "unknown command '{}' (try `help`)", Echo(cmd)),
            ParseError::Missing(what) => write!(f, "missing {what}"),
            ParseError::NotVmId(arg) => write!(f, "'{}' is not a VM id", Echo(arg)),
            ParseError::NotHex { what, arg } => write!(f, "'{}' is not a hex {what}", Echo(arg)),
            ParseError::OutOfRange {
                what,
                arg,
                min,
                max,
            } => write!(f, "bad {what} '{}' ({min}..={max})", Echo(arg)),
            ParseError::EndOverflow { what, arg } => write!(
                f,
                "{what} '{}' rounds up past the last page (at most {:#x})",
                Echo(arg),
                u64::MAX - (PAGE_SIZE - 1)
            ),
            ParseError::EmptyRange { start, end } => write!(f, "empty range {start:#x}..{end:#x}"),
            ParseError::Usage(usage) => write!(f, "usage: {usage}"),
            ParseError::Extra { cmd, arg } => write!(
                f,
                "unexpected argument '{}' to `{cmd}` (see `help`)",
                Echo(arg)
            ),
        }
    }
}
