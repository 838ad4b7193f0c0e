//! Typed addresses: a guest's intermediate physical address ([`Ipa`]), a host physical address
//! ([`Pa`]) and a host frame number ([`Pfn`]).
//!
//! What converts into what is deliberate: an `Ipa` never becomes a `Pa` (only a stage-2
//! table knows the translation), and no `From<u64>` exists, so an argument of the wrong kind
//! is a type error, not a silent bug. Offsets are plain `u64` byte (or page) counts.

use core::fmt;
use core::ops::{Add, AddAssign, Sub};

/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
/// Size of a page (the translation granule) and of a frame, in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// The parts every byte address has: construction, the raw value, offsets, alignment.
macro_rules! byte_address {
    ($name:ident, $what:literal) => {
        #[doc = $what]
        #[repr(transparent)]
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(u64);

        impl $name {
            /// Address zero.
            pub const ZERO: Self = Self(0);
            /// The highest address (an open upper bound: "to the end").
            pub const MAX: Self = Self(u64::MAX);

            /// The address with raw value `raw` (the hardware boundary: registers,
            /// descriptors, the device tree).
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// The raw value (for the hardware, and for arithmetic this type does not offer).
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// Rounded down to a multiple of `size` (a power of two).
            pub const fn align_down(self, size: u64) -> Self {
                debug_assert!(size.is_power_of_two());
                Self(self.0 & !(size - 1))
            }

            /// Rounded up to a multiple of `size` (a power of two).
            pub const fn align_up(self, size: u64) -> Self {
                debug_assert!(size.is_power_of_two());
                Self((self.0 + size - 1) & !(size - 1))
            }

            /// A multiple of `size` (a power of two).
            pub const fn is_aligned(self, size: u64) -> bool {
                debug_assert!(size.is_power_of_two());
                self.0 & (size - 1) == 0
            }

            /// The start of the page holding this address.
            pub const fn page(self) -> Self {
                self.align_down(PAGE_SIZE)
            }

            /// The byte offset inside its page.
            pub const fn page_offset(self) -> u64 {
                self.0 & (PAGE_SIZE - 1)
            }

            /// The page number: the address divided by [`PAGE_SIZE`].
            pub const fn page_index(self) -> u64 {
                self.0 >> PAGE_SHIFT
            }

            /// `self - bytes`, or zero if that would be below it.
            pub const fn saturating_sub(self, bytes: u64) -> Self {
                Self(self.0.saturating_sub(bytes))
            }

            /// `self + bytes` in a constant expression (`+` is not `const`).
            pub const fn offset(self, bytes: u64) -> Self {
                Self(self.0 + bytes)
            }

            /// `self + bytes`, or `None` on overflow.
            pub const fn checked_add(self, bytes: u64) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// The start of each page in `[self, end)` (`self` page-aligned).
            pub fn pages_to(self, end: Self) -> impl Iterator<Item = Self> + Clone {
                (self.0..end.0).step_by(PAGE_SIZE as usize).map(Self)
            }
        }

        impl Add<u64> for $name {
            type Output = Self;
            fn add(self, bytes: u64) -> Self {
                Self(self.0 + bytes)
            }
        }

        impl AddAssign<u64> for $name {
            fn add_assign(&mut self, bytes: u64) {
                self.0 += bytes;
            }
        }

        impl Sub<u64> for $name {
            type Output = Self;
            fn sub(self, bytes: u64) -> Self {
                Self(self.0 - bytes)
            }
        }

        /// The distance in bytes from `other` up to `self`.
        impl Sub for $name {
            type Output = u64;
            fn sub(self, other: Self) -> u64 {
                self.0 - other.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

byte_address!(
    Ipa,
    "A guest intermediate physical address (the input of a VM's stage-2 translation)."
);
byte_address!(
    Pa,
    "A host physical address (the output of stage-2 translation)."
);

impl Pa {
    /// The frame holding this address (its offset in the frame is dropped).
    pub const fn pfn(self) -> Pfn {
        Pfn(self.0 >> PAGE_SHIFT)
    }
}

/// A host frame number: a [`Pa`] divided by [`PAGE_SIZE`]. Frames are counted, so offsets
/// are in frames, not bytes.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pfn(u64);

impl Pfn {
    /// The frame with raw number `raw`.
    pub const fn new(raw: u64) -> Self {
        Pfn(raw)
    }

    /// The raw frame number (an index into per-frame tables, the hardware's `ADDR` field).
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The frame's first byte.
    pub const fn pa(self) -> Pa {
        Pa(self.0 << PAGE_SHIFT)
    }

    /// A multiple of `frames` (a power of two): the first frame of an aligned run.
    pub const fn is_aligned(self, frames: u64) -> bool {
        debug_assert!(frames.is_power_of_two());
        self.0 & (frames - 1) == 0
    }

    /// How many frames `self` lies above `base`, or `None` if below it.
    pub const fn checked_offset_from(self, base: Pfn) -> Option<u64> {
        self.0.checked_sub(base.0)
    }

    /// The frames `self, self + 1, ..` (`count` of them).
    pub fn run(self, count: u64) -> impl DoubleEndedIterator<Item = Pfn> + Clone {
        (self.0..self.0 + count).map(Pfn)
    }
}

impl Add<u64> for Pfn {
    type Output = Pfn;
    fn add(self, frames: u64) -> Pfn {
        Pfn(self.0 + frames)
    }
}

impl AddAssign<u64> for Pfn {
    fn add_assign(&mut self, frames: u64) {
        self.0 += frames;
    }
}

impl Sub<u64> for Pfn {
    type Output = Pfn;
    fn sub(self, frames: u64) -> Pfn {
        Pfn(self.0 - frames)
    }
}

/// The number of frames from `other` up to `self`.
impl Sub for Pfn {
    type Output = u64;
    fn sub(self, other: Pfn) -> u64 {
        self.0 - other.0
    }
}

impl fmt::Debug for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pfn({:#x})", self.0)
    }
}

impl fmt::Display for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::LowerHex for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_and_address_convert_both_ways() {
        let pa = Pa::new(0x4000_1234);
        assert_eq!(pa.pfn(), Pfn::new(0x40001));
        assert_eq!(pa.pfn().pa(), Pa::new(0x4000_1000));
        assert_eq!(pa.page_offset(), 0x234);
    }

    #[test]
    fn offsets_and_alignment() {
        let ipa = Ipa::new(0x20_1000);
        assert_eq!(ipa + PAGE_SIZE, Ipa::new(0x20_2000));
        assert_eq!(Ipa::new(0x20_3000) - ipa, 0x2000);
        assert_eq!(ipa.align_down(2 << 20), Ipa::new(0x20_0000));
        assert_eq!(ipa.align_up(2 << 20), Ipa::new(0x40_0000));
        assert!(ipa.is_aligned(PAGE_SIZE) && !ipa.is_aligned(2 << 20));
        assert_eq!(Ipa::new(0x1fff).page(), Ipa::new(0x1000));
        let pages: [Ipa; 2] = [Ipa::new(0x1000), Ipa::new(0x2000)];
        assert!(Ipa::new(0x1000).pages_to(Ipa::new(0x3000)).eq(pages));
        assert_eq!(Pfn::new(7) + 2, Pfn::new(9));
        assert_eq!(Pfn::new(9) - Pfn::new(7), 2);
        assert!(Pfn::new(512).is_aligned(512) && !Pfn::new(513).is_aligned(512));
        assert!(Pfn::new(3).run(2).eq([Pfn::new(3), Pfn::new(4)]));
    }

    #[test]
    fn formats_in_hex() {
        extern crate std;
        use std::format;
        assert_eq!(format!("{:?}", Ipa::new(0x1000)), "Ipa(0x1000)");
        assert_eq!(format!("{}", Pa::new(0x1000)), "0x1000");
        assert_eq!(format!("{:#x}", Pfn::new(0x10)), "0x10");
    }
}
