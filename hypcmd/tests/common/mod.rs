//! What the command tests share: a line that must parse, or must not.

use hypcmd::{parse, Command};

/// The command `line` parses to (panics if it is empty or an error).
pub fn ok(line: &str) -> Command {
    match parse(line) {
        Ok(Some(c)) => c,
        other => panic!("{line:?}: {other:?}"),
    }
}

/// The console's message for `line` (panics if it parses).
pub fn err(line: &str) -> String {
    match parse(line) {
        Err(e) => e.to_string(),
        other => panic!("{line:?} should be an error: {other:?}"),
    }
}
