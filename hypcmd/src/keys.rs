//! Console focus keys: which console the keyboard goes to, typed in-band on
//! the one UART. Ctrl-A is a prefix, as in `screen`:
//!
//! | keys | effect |
//! |---|---|
//! | Ctrl-A Ctrl-A | cycle: hypervisor → VM → … → hypervisor |
//! | Ctrl-A `<digits>` Enter | the keyboard goes to that VM |
//! | Ctrl-A `h` | the keyboard goes to the hypervisor (`hyp>`) |
//! | Ctrl-A `a` | a literal Ctrl-A for the focused console |
//! | Ctrl-A anything else | nothing, and a one-line reminder of these keys |
//!
//! [`Keys`] is a total state machine over bytes: every byte gives a [`Key`],
//! and no sequence of bytes can make it hold more than ten digits.

/// The prefix byte (Ctrl-A).
pub const CTRL_A: u8 = 0x01;

/// The reminder printed when a prefix is followed by an unknown key.
pub const KEYS_HELP: &str =
    "Ctrl-A Ctrl-A: next console; Ctrl-A <vm> Enter: that VM; Ctrl-A h: hypervisor; Ctrl-A a: a literal Ctrl-A";

/// What one typed byte means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    /// An ordinary byte for whichever console has the keyboard.
    Input(u8),
    /// Part of a prefix sequence; nothing to do yet.
    Pending,
    /// Move the keyboard to the next console (Ctrl-A Ctrl-A).
    Cycle,
    /// Move the keyboard to the hypervisor console (Ctrl-A h).
    Hypervisor,
    /// Move the keyboard to this VM (Ctrl-A digits Enter); whether it exists
    /// is the hypervisor's question.
    Vm(u32),
    /// The prefix was followed by something that is not a focus key (or a
    /// number too long to be a VM id): it is dropped; show [`KEYS_HELP`].
    Unknown,
}

/// The prefix state: idle, after Ctrl-A, or reading a VM number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Keys {
    state: State,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum State {
    #[default]
    Idle,
    Prefix,
    /// The number so far and how many digits were typed.
    Number(u32, u8),
}

/// More digits than a `u32` VM id can have.
const MAX_DIGITS: u8 = 10;

impl Keys {
    /// No prefix in progress.
    pub const fn new() -> Keys {
        Keys { state: State::Idle }
    }

    /// Reads one byte.
    pub fn feed(&mut self, b: u8) -> Key {
        let (next, key) = match (self.state, b) {
            (State::Idle, CTRL_A) => (State::Prefix, Key::Pending),
            (State::Idle, b) => (State::Idle, Key::Input(b)),
            (State::Prefix, CTRL_A) => (State::Idle, Key::Cycle),
            (State::Prefix, b'h') => (State::Idle, Key::Hypervisor),
            (State::Prefix, b'a') => (State::Idle, Key::Input(CTRL_A)),
            (State::Prefix, d @ b'0'..=b'9') => {
                (State::Number(u32::from(d - b'0'), 1), Key::Pending)
            }
            (State::Number(n, len), b'\r' | b'\n') => (State::Idle, number(n, len)),
            (State::Number(n, len), d @ b'0'..=b'9') => {
                let more = n
                    .checked_mul(10)
                    .and_then(|n| n.checked_add(u32::from(d - b'0')));
                match more {
                    Some(m) if len < MAX_DIGITS => (State::Number(m, len + 1), Key::Pending),
                    _ => (State::Idle, Key::Unknown),
                }
            }
            (State::Number(_, 1), 0x7f | 0x08) => (State::Prefix, Key::Pending),
            (State::Number(n, len), 0x7f | 0x08) => (State::Number(n / 10, len - 1), Key::Pending),
            (State::Prefix | State::Number(..), _) => (State::Idle, Key::Unknown),
        };
        self.state = next;
        key
    }

    /// Whether a prefix sequence is in progress.
    pub fn pending(&self) -> bool {
        self.state != State::Idle
    }
}

/// A complete number: a VM id (VM ids start at 1; 0 is no VM).
fn number(n: u32, len: u8) -> Key {
    debug_assert!(len > 0);
    if n == 0 {
        Key::Unknown
    } else {
        Key::Vm(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn feed(bytes: &[u8]) -> Vec<Key> {
        let mut k = Keys::default();
        bytes.iter().map(|&b| k.feed(b)).collect()
    }

    #[test]
    fn ordinary_bytes_pass() {
        assert_eq!(feed(b"ls\n"), [b'l', b's', b'\n'].map(Key::Input));
    }

    #[test]
    fn prefix_keys() {
        assert_eq!(feed(&[CTRL_A, CTRL_A]), [Key::Pending, Key::Cycle]);
        assert_eq!(feed(&[CTRL_A, b'h']), [Key::Pending, Key::Hypervisor]);
        assert_eq!(feed(&[CTRL_A, b'a']), [Key::Pending, Key::Input(CTRL_A)]);
        assert_eq!(
            feed(&[CTRL_A, b'x', b'y']),
            [Key::Pending, Key::Unknown, Key::Input(b'y')]
        );
    }

    #[test]
    fn vm_numbers() {
        assert_eq!(feed(b"\x01200\r").last(), Some(&Key::Vm(200)));
        assert_eq!(feed(b"\x0112\x7f3\n").last(), Some(&Key::Vm(13)));
        assert_eq!(feed(b"\x010\r").last(), Some(&Key::Unknown));
        assert_eq!(feed(b"\x014294967295\r").last(), Some(&Key::Vm(u32::MAX)));
        assert_eq!(
            feed(b"\x014294967296").last(),
            Some(&Key::Unknown),
            "overflows u32"
        );
        assert_eq!(feed(b"\x0112x").last(), Some(&Key::Unknown));
        assert_eq!(
            feed(b"\x011\x7fh").last(),
            Some(&Key::Hypervisor),
            "erased to the prefix"
        );
    }
}
