//! What a stage-2 slot holds, as the table's operations report it: a valid
//! leaf's mapping, a software page state, and why a compare-and-swap failed.

use crate::descriptor::{Descriptor, DescriptorKind, S2Attrs};
use crate::{level_size, Error};
use mmtypes::{Ipa, Pa, PageState};

/// What a non-empty leaf slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leaf {
    /// A valid block or page.
    Mapped(Mapping),
    /// A page state kept in an invalid descriptor (`Migrating` or `Swapped`).
    Software(PageState),
}

/// A valid block or page mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Output address of the start of the leaf (aligned to its size).
    pub pa: Pa,
    /// Attributes.
    pub attrs: S2Attrs,
    /// Access flag.
    pub young: bool,
}

/// A non-empty leaf slot as found by a lookup or a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafInfo {
    /// First IPA the slot translates (aligned to [`LeafInfo::size`]).
    pub ipa: Ipa,
    /// Level of the slot: 1 (1 GiB block), 2 (2 MiB block) or 3 (4 KiB page).
    pub level: u8,
    /// The raw descriptor read (what to pass as `expected` to
    /// [`Stage2Table::compare_exchange_leaf`]).
    pub desc: Descriptor,
    /// The decoded content.
    pub leaf: Leaf,
}

impl LeafInfo {
    /// Decodes `desc` found at `level` for the slot holding `ipa`; `None` for an empty slot,
    /// a table descriptor, a slot a break-before-make holds ([`Descriptor::LOCKED`]) or an
    /// unknown pattern.
    #[inline]
    pub fn decode(ipa: Ipa, level: u8, desc: Descriptor) -> Option<Self> {
        let leaf = match desc.kind(level) {
            DescriptorKind::Leaf { pa, attrs, young } => Leaf::Mapped(Mapping {
                pa: Pa::new(pa),
                attrs,
                young,
            }),
            DescriptorKind::Software(e) => Leaf::Software(e),
            _ => return None,
        };
        Some(LeafInfo {
            ipa: ipa.align_down(level_size(level)),
            level,
            desc,
            leaf,
        })
    }

    /// Bytes translated by the slot.
    pub fn size(&self) -> u64 {
        level_size(self.level)
    }

    /// The PA that `ipa` (inside this leaf) translates to, for a valid leaf.
    pub fn pa_of(&self, ipa: Ipa) -> Option<Pa> {
        match self.leaf {
            Leaf::Mapped(m) => Some(m.pa + (ipa - self.ipa)),
            Leaf::Software(_) => None,
        }
    }

    /// The mapping, for a valid leaf.
    pub fn mapping(&self) -> Option<Mapping> {
        match self.leaf {
            Leaf::Mapped(m) => Some(m),
            Leaf::Software(_) => None,
        }
    }

    /// The page state kept in an invalid descriptor, for one.
    pub fn software(&self) -> Option<PageState> {
        match self.leaf {
            Leaf::Software(e) => Some(e),
            Leaf::Mapped(_) => None,
        }
    }
}

/// Why [`Stage2Table::compare_exchange_leaf`] did not store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CasError {
    /// The slot did not hold `expected`; it holds this (possibly a table descriptor if the block
    /// was split, or [`Descriptor::LOCKED`] while another updater is mid-way).
    Mismatch(Descriptor),
    /// The walk for the IPA ended above the requested level, at a non-table slot of `level`
    /// holding `found` (e.g. the page's table was never created, or was replaced by a block).
    NoSlot {
        /// Level where the walk ended.
        level: u8,
        /// What that slot holds.
        found: Descriptor,
    },
    /// The request itself is wrong (`OutOfRange`, `BadDescriptor`, `BadAttrs`).
    Invalid(Error),
}
