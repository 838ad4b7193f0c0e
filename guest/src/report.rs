//! The end of every run: one `GUEST RESULT:` line, then power off.
//!
//! Under this project's hypervisor (DTB node `/hypervisor` compatible with
//! `mhv,hypervisor`) the guest exits with HVC_EXIT and its status (0 = pass);
//! otherwise, or if that returns, with PSCI SYSTEM_OFF.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::{cpu, psci};

/// Why a run failed: a short single-line text, formatted without a heap.
pub struct Reason {
    buf: [u8; 200],
    len: usize,
}

impl Reason {
    pub fn new(args: fmt::Arguments) -> Self {
        let mut r = Self {
            buf: [0; 200],
            len: 0,
        };
        // Writing never fails; overlong text is truncated.
        let _ = r.write_fmt(args);
        r
    }

    pub fn as_str(&self) -> &str {
        // Only whole chars are ever appended, so this cannot fail.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

impl Write for Reason {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            // Keep the result on one line.
            let c = if c == '\n' || c == '\r' { ' ' } else { c };
            let mut tmp = [0; 4];
            let bytes = c.encode_utf8(&mut tmp).as_bytes();
            if self.len + bytes.len() > self.buf.len() {
                break;
            }
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        }
        Ok(())
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `reason!("...", args)` builds a [`Reason`].
macro_rules! reason {
    ($($arg:tt)*) => {
        $crate::report::Reason::new(format_args!($($arg)*))
    };
}
pub(crate) use reason;

/// Set by the first vCPU to report; any later one just parks.
static FINISHED: AtomicBool = AtomicBool::new(false);

pub fn finish(result: Result<(), Reason>) -> ! {
    match result {
        Ok(()) => pass(),
        Err(r) => fail(format_args!("{r}")),
    }
}

pub fn pass() -> ! {
    end(None)
}

pub fn fail(why: fmt::Arguments) -> ! {
    end(Some(why))
}

fn end(failure: Option<fmt::Arguments>) -> ! {
    if FINISHED.swap(true, Ordering::AcqRel) {
        cpu::halt();
    }
    match failure {
        None => println!("GUEST RESULT: PASS"),
        Some(why) => println!("GUEST RESULT: FAIL {}", Reason::new(why)),
    }
    psci::power_off(u64::from(failure.is_some()))
}
