//! Framing of a byte stream into text lines, for the control channel (one
//! JSON object per line, issue 19): total over any input. A line longer than
//! the cap is not kept growing; its bytes are dropped up to its newline and it
//! is reported once, as [`LineError::TooLong`]. A line that is not UTF-8 is
//! reported as [`LineError::NotUtf8`]. The reader of the channel (a remote
//! client, possibly buggy or hostile) can so neither exhaust the hypervisor's
//! heap nor stop it.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Longest line kept by default: 64 KiB, far above any request.
pub const DEFAULT_CAP: usize = 64 << 10;

/// Why a line was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineError {
    /// The line passed the cap; its bytes up to the newline were discarded.
    TooLong,
    /// The line's bytes are not UTF-8.
    NotUtf8,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LineError::TooLong => "line too long",
            LineError::NotUtf8 => "line is not UTF-8",
        })
    }
}

/// Collects bytes into lines. `\n` ends a line; a `\r` just before it is
/// dropped, so `\r\n` clients work too.
#[derive(Debug)]
pub struct LineAssembler {
    buf: Vec<u8>,
    cap: usize,
    /// The current line passed the cap: drop bytes until its newline.
    discarding: bool,
}

impl LineAssembler {
    /// An assembler keeping lines of at most `cap` bytes (newline excluded).
    pub const fn new(cap: usize) -> Self {
        LineAssembler {
            buf: Vec::new(),
            cap,
            discarding: false,
        }
    }

    /// Feeds one byte: a finished line (without its newline) or the error
    /// ending a bad one, else `None`.
    pub fn push(&mut self, b: u8) -> Option<Result<String, LineError>> {
        if b == b'\n' {
            if core::mem::take(&mut self.discarding) {
                return None;
            }
            let mut line = core::mem::take(&mut self.buf);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Some(String::from_utf8(line).map_err(|_| LineError::NotUtf8));
        }
        if self.discarding {
            return None;
        }
        if self.buf.len() >= self.cap {
            // Reported now, once; the rest of the line is dropped unseen.
            self.discarding = true;
            self.buf = Vec::new();
            return Some(Err(LineError::TooLong));
        }
        self.buf.push(b);
        None
    }

    /// Bytes held for the unfinished line.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use alloc::vec;
    use proptest::prelude::*;

    fn feed(a: &mut LineAssembler, bytes: &[u8]) -> Vec<Result<String, LineError>> {
        bytes.iter().filter_map(|&b| a.push(b)).collect()
    }

    #[test]
    fn splits_lines_and_strips_cr() {
        let mut a = LineAssembler::new(16);
        let out = feed(&mut a, b"{\"id\":1}\nab\r\n\npart");
        assert_eq!(
            out,
            vec![Ok("{\"id\":1}".into()), Ok("ab".into()), Ok(String::new())]
        );
        assert_eq!(a.pending(), 4);
    }

    #[test]
    fn a_long_line_is_reported_once_and_the_next_line_survives() {
        let mut a = LineAssembler::new(4);
        let out = feed(&mut a, b"abcd\nabcdefghij\nok\n");
        assert_eq!(
            out,
            vec![Ok("abcd".into()), Err(LineError::TooLong), Ok("ok".into())]
        );
        assert_eq!(a.pending(), 0);
    }

    #[test]
    fn non_utf8_is_an_error_line() {
        let mut a = LineAssembler::new(16);
        let out = feed(&mut a, b"\xff\xfe\nx\n");
        assert_eq!(out, vec![Err(LineError::NotUtf8), Ok("x".into())]);
    }

    proptest! {
        /// Any bytes: one result per newline, except for lines over the cap,
        /// which give one `TooLong` each, reported before their newline; the
        /// buffer never passes the cap.
        #[test]
        fn total_and_bounded(bytes in proptest::collection::vec(any::<u8>(), 0..600), cap in 1usize..40) {
            let mut a = LineAssembler::new(cap);
            let mut results = 0;
            for &b in &bytes {
                if let Some(r) = a.push(b) {
                    results += 1;
                    if let Ok(line) = r {
                        prop_assert!(line.len() <= cap);
                    }
                }
                prop_assert!(a.pending() <= cap);
            }
            let lines = bytes.split(|&b| b == b'\n').count() - 1;
            let long_tail = usize::from(a.discarding);
            prop_assert_eq!(results, lines + long_tail);
        }
    }
}
