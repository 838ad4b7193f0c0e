//! The VM-state blob (docs/SNAPSHOT-STATE.md): encode → decode is the identity, the layout's
//! sizes are the documented ones, and any bytes (random, truncated, flipped, another
//! version) decode to a value or an error, never a panic.

use proptest::prelude::*;
use snapfile::{
    decode_header, decode_state, encode_state, vcpu_len, StateError, StateHeader, VcpuState,
    VmState, STATE_NAME_MAX, STATE_VERSION,
};

/// The hypervisor's EL1 register count (`vm/vcpu.rs`, 26 in docs/SNAPSHOT-STATE.md).
const EL1: usize = 26;

fn vcpu(index: u32, seed: u64) -> VcpuState {
    let mut x = [0u64; 31];
    x.iter_mut()
        .enumerate()
        .for_each(|(i, r)| *r = seed.wrapping_mul(i as u64 + 1));
    let mut q = [0u128; 32];
    q.iter_mut()
        .enumerate()
        .for_each(|(i, r)| *r = u128::from(seed) << (i % 64));
    VcpuState {
        index,
        on: seed.is_multiple_of(2),
        x,
        pc: seed ^ 0x4008_0000,
        pstate: 0x3c5,
        el1: (0..EL1 as u64)
            .map(|i| seed.rotate_left(i as u32))
            .collect(),
        q,
        fpsr: seed >> 3,
        fpcr: seed >> 5,
    }
}

fn state(name: &str, vcpus: u32, devices: Vec<u8>) -> VmState {
    VmState {
        header: StateHeader {
            name: name.into(),
            ram_base: 0x4000_0000,
            ram_size: 256 << 20,
            vcpus,
        },
        virtual_count: 123_456_789,
        vcpus: (0..vcpus)
            .map(|i| vcpu(i, 0x9e37_79b9_7f4a_7c15 ^ u64::from(i)))
            .collect(),
        devices,
    }
}

#[test]
fn round_trip_and_documented_sizes() {
    let s = state("linux", 2, vec![7; 100]);
    let blob = encode_state(&s);
    // magic 8, version 4, base 8, size 8, vCPUs 4, name 4 + 5, virtual count 8.
    assert_eq!(blob.len(), 49 + 2 * 1009 + 100);
    assert_eq!(vcpu_len(EL1), 1009);
    assert_eq!(decode_state(&blob, EL1), Ok(s.clone()));
    let (h, rest) = decode_header(&blob).unwrap();
    assert_eq!(h, s.header);
    assert_eq!(rest.len(), 8 + 2 * 1009 + 100);
}

#[test]
fn long_names_are_cut_at_a_character_boundary() {
    // 63 ASCII bytes and a 2-byte character: a cut at 64 bytes would split it.
    let name = format!("{}é", "a".repeat(STATE_NAME_MAX - 1));
    let blob = encode_state(&state(&name, 1, vec![]));
    let back = decode_state(&blob, EL1).unwrap();
    assert_eq!(back.header.name, "a".repeat(STATE_NAME_MAX - 1));
}

#[test]
fn refusals() {
    let blob = encode_state(&state("vm", 1, vec![1, 2, 3]));
    let mut v2 = blob.clone();
    v2[8..12].copy_from_slice(&(STATE_VERSION + 1).to_le_bytes());
    assert_eq!(
        decode_state(&v2, EL1),
        Err(StateError::Version(STATE_VERSION + 1))
    );
    let mut magic = blob.clone();
    magic[0] ^= 1;
    assert_eq!(decode_state(&magic, EL1), Err(StateError::NoMagic));
    assert_eq!(
        decode_state(&blob, EL1 + 1),
        Err(StateError::El1Count(EL1 as u32))
    );
    // The power flag (after the vCPU's index) must be 0 or 1.
    let power = 36 + 2 + 8 + 4; // header with a 2-byte name, virtual count, index
    let mut flag = blob.clone();
    flag[power] = 2;
    assert_eq!(decode_state(&flag, EL1), Err(StateError::BadVcpu(0)));
    let mut index = blob.clone();
    index[power - 4] = 1;
    assert_eq!(decode_state(&index, EL1), Err(StateError::BadVcpu(0)));
    // A name longer than the layout allows, or not UTF-8.
    let mut long = blob.clone();
    long[32..36].copy_from_slice(&(STATE_NAME_MAX as u32 + 1).to_le_bytes());
    assert_eq!(decode_state(&long, EL1), Err(StateError::BadName));
    let mut utf = blob.clone();
    utf[36] = 0xff;
    assert_eq!(decode_state(&utf, EL1), Err(StateError::BadName));
}

/// Every cut inside the header or the vCPUs is `Short`; a cut in the device bytes (opaque
/// here; the hypervisor's vGIC and UART decoders check them) only shortens them.
#[test]
fn truncation() {
    let s = state("linux", 2, vec![9; 40]);
    let blob = encode_state(&s);
    let fixed = blob.len() - s.devices.len();
    for n in 0..fixed {
        let r = decode_state(&blob[..n], EL1);
        let want = if n < 8 {
            StateError::NoMagic
        } else {
            StateError::Short
        };
        assert_eq!(r, Err(want), "cut at {n}");
    }
    for n in fixed..=blob.len() {
        let back = decode_state(&blob[..n], EL1).unwrap();
        assert_eq!(back.devices, s.devices[..n - fixed]);
    }
}

/// A huge vCPU count in a short blob is refused without reserving memory for it.
#[test]
fn huge_counts_allocate_nothing() {
    let mut blob = encode_state(&state("x", 1, vec![]));
    blob[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(decode_state(&blob, EL1), Err(StateError::Short));
}

fn arb_vcpu(index: u32) -> impl Strategy<Value = VcpuState> {
    (
        any::<bool>(),
        prop::array::uniform31(any::<u64>()),
        any::<[u64; 4]>(),
        prop::collection::vec(any::<u64>(), EL1),
        prop::array::uniform32(any::<u128>()),
    )
        .prop_map(move |(on, x, w, el1, q)| VcpuState {
            index,
            on,
            x,
            pc: w[0],
            pstate: w[1],
            el1,
            q,
            fpsr: w[2],
            fpcr: w[3],
        })
}

fn arb_state() -> impl Strategy<Value = VmState> {
    (1u32..5).prop_flat_map(|n| {
        (
            "\\PC{0,20}",
            any::<[u64; 3]>(),
            (0..n).map(arb_vcpu).collect::<Vec<_>>(),
            prop::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(move |(name, w, vcpus, devices)| VmState {
                header: StateHeader {
                    name,
                    ram_base: w[0],
                    ram_size: w[1],
                    vcpus: n,
                },
                virtual_count: w[2],
                vcpus,
                devices,
            })
    })
}

proptest! {
    #[test]
    fn encode_then_decode_is_identity(s in arb_state()) {
        let blob = encode_state(&s);
        prop_assert_eq!(decode_state(&blob, EL1), Ok(s));
    }

    /// Any bytes: a value or an error, never a panic.
    #[test]
    fn any_bytes_decode_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..4000)) {
        let _ = decode_state(&bytes, EL1);
        let mut framed = b"MHVSTATE\x01\0\0\0".to_vec();
        framed.extend_from_slice(&bytes);
        let _ = decode_state(&framed, EL1);
    }

    /// A flipped byte is refused, or decodes to a different state: never silently the
    /// same one (the store's checksum is what catches value changes).
    #[test]
    fn a_flipped_byte_is_never_the_same_state(s in arb_state(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut blob = encode_state(&s);
        let at = at.index(blob.len());
        blob[at] ^= 1 << bit;
        if let Ok(back) = decode_state(&blob, EL1) {
            prop_assert_ne!(back, s);
        }
    }
}
