//! Properties of the console focus keys: any byte stream is read without a
//! panic, an Enter always ends a prefix sequence (the keyboard cannot get
//! stuck in it), bytes without Ctrl-A pass through untouched, and a typed
//! VM number reaches the VM it names.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use hypcmd::keys::{Key, Keys, CTRL_A};
use proptest::prelude::*;

/// Bytes rich in the ones the state machine looks at.
fn byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        Just(CTRL_A),
        Just(b'h'),
        Just(b'a'),
        Just(b'\r'),
        Just(b'\n'),
        Just(0x7f),
        b'0'..=b'9',
        any::<u8>(),
    ]
}

proptest! {
    #[test]
    fn an_enter_always_ends_a_prefix(bytes in prop::collection::vec(byte(), 0..64)) {
        let mut keys = Keys::default();
        for b in bytes {
            let _ = keys.feed(b);
        }
        let _ = keys.feed(b'\r');
        prop_assert!(!keys.pending());
    }

    #[test]
    fn bytes_without_ctrl_a_pass_through(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut keys = Keys::default();
        for b in bytes.into_iter().filter(|&b| b != CTRL_A) {
            prop_assert_eq!(keys.feed(b), Key::Input(b));
        }
    }

    #[test]
    fn a_typed_vm_number_names_that_vm(vm in 1u32.., enter in prop_oneof![Just(b'\r'), Just(b'\n')]) {
        let mut keys = Keys::default();
        prop_assert_eq!(keys.feed(CTRL_A), Key::Pending);
        for d in vm.to_string().bytes() {
            prop_assert_eq!(keys.feed(d), Key::Pending);
        }
        prop_assert_eq!(keys.feed(enter), Key::Vm(vm));
        prop_assert!(!keys.pending());
    }
}
