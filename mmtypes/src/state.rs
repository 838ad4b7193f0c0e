//! What a stage-2 slot says about a guest page, and how that may change.
//!
//! One enum, [`PageState`], is the vocabulary of the reverse map (`rmap`, which decides every
//! change), of the stage-2 table (`stage2`, which keeps the non-valid states in invalid
//! descriptors) and of the hypervisor (`hyp`, which applies the changes to its tables).
//! Break-before-make's transient owner token is not a page state: it never leaves
//! `stage2`'s descriptor encoding.
//!
//! `ZeroPage` is Linux's `ZERO_PAGE` mapped by a special PTE (`pte_special`, KSM's
//! `use_zero_pages`): a valid, read-only mapping of the one shared zero frame the hypervisor
//! allocates at boot. It names no frame: the frame is not in the reverse map, not counted,
//! never migrated, reclaimed or freed, so only the stage-2 adapter knows its address.
//! Same-page merging puts an all-zero page there; a write to it maps a fresh zeroed frame.
//!
//! # Transitions
//!
//! Every change of a slot is one row of this table. Writable is `w`, read-only `ro`; `p`
//! and `q` are frames, `q ≠ p`. Every change also holds the VM's stage-2 lock (DESIGN level 4),
//! so that column lists only what is held besides. [`PageState::check_transition`] encodes
//! the table and returns the row; `rmap`'s host backend calls it on every change (a failure
//! panics: it is a bug in the reverse map), the hypervisor's adapter (`hypmm`) in debug
//! builds, on every path that changes a leaf. The operation is not passed in: the pair of
//! states names the row, so the check needs nothing from the trait's callers.
//!
//! | from | to | [`Transition`] | operation | also held |
//! |---|---|---|---|---|
//! | `Invalid` | `Mapped(q, w)` | `FirstTouch` | a first-touch fault maps a fresh zeroed frame | region list (read) |
//! | `Invalid` | `Mapped(p, ro)`, `Migrating(p, ro)`, `Swapped(s)`, `ZeroPage` | `Share` | fork fills the child with its parent's entries; snapshot restore reinstalls the snapshot's; the UART image is mapped | parent's stage-2 lock, both region lists |
//! | `Mapped(p, w)` | `Mapped(p, ro)` | `WriteProtect` | fork write-protects the parent; same-page merging write-protects both pages before comparing them | child's stage-2 lock (nested); merge: frame lock, anon_vma (read) |
//! | `Migrating(p, w)` | `Migrating(p, ro)` | `WriteProtect` | fork write-protects a parent's page under migration | child's stage-2 lock (nested) |
//! | `Mapped(p, ro)` | `Mapped(p, w)` | `CowReuse` | a write fault on a frame this VM alone maps makes it writable in place | frame lock |
//! | `Mapped(p, ro)` | `Mapped(q, w)` | `CowCopy` | a write fault on a shared frame maps a copy (always for a merged frame: unmerge) | frame pin (frame lock for a merged frame) |
//! | `ZeroPage` | `Mapped(q, w)` | `CowCopy` | a write fault on the zero page maps a fresh zeroed frame (nothing to copy) | region list (read) |
//! | `Mapped(p, ro)` | `Mapped(q, ro)` | `Merge` | same-page merging points a write-protected mapping at an identical merged frame `q` (`rmap::merge`) | both frames' locks, the family's anon_vma (read) |
//! | `Mapped(p, ro)` | `ZeroPage` | `Merge` | same-page merging points a write-protected all-zero page at the zero page (`rmap::merge_zero`) | the frame's lock, the family's anon_vma (read) |
//! | `Mapped(p, x)` | `Migrating(p, x)` | `Unmap` | migration or reclaim takes the mapping away (`try_to_migrate`) | frame lock, anon_vma (read) |
//! | `Migrating(p, x)` | `Mapped(q, x)` | `Remap` | migration is done: the new frame goes in (`remove_migration_ptes`) | frame lock, anon_vma (read) |
//! | `Migrating(p, x)` | `Mapped(p, x)` | `Remap` | migration or reclaim backs off: the frame goes back | frame lock, anon_vma (read) |
//! | `Migrating(p, x)` | `Swapped(s)` | `SwapOut` | reclaim stored the frame in slot `s` | frame lock, anon_vma (read) |
//! | `Swapped(s)` | `Mapped(q, w)` | `SwapIn` | a fault reads the slot into a fresh frame of its own | region list (read), a slot reference |
//! | `Swapped(s)` | `Mapped(q, ro)` | `SwapIn` | a fault maps the slot's shared frame from the swap cache | region list (read), a slot reference |
//! | any but `Invalid` | `Invalid` | `Release` | MEM_RELEASE (region list read), VM teardown and snapshot restore (region list write), a failed fork fill taken back, the UART image unmapped (UART lock) | as the operation says |
//!
//! A 2 MiB block leaf changes as one entry through the same rows, named by the states of its
//! first page (block migration: `Unmap` to a block-sized migration entry and `Remap` to a
//! block of the new run; fork's `WriteProtect` of such an entry); page `i` of a block is
//! [`PageState::page`]`(i)` of it.
//!
//! Everything else is refused, in particular: a state into itself (not a change), a frame
//! changing under a writable mapping, `Swapped` straight to `Migrating`, `Mapped` straight to
//! `Swapped` (reclaim goes through `Migrating`, so a fault waits for the frame lock instead of
//! reading a slot not yet written), a copied `Migrating(p, w)` (a fork child's entry is
//! read-only), a migration entry naming another frame than the mapping it replaces,
//! `Remap`/`SwapOut` that change the mapping's permission, and every change of `ZeroPage`
//! other than the three above (migration and reclaim never see it: it is in no reverse map;
//! a writable mapping goes to it only through a write-protect first).

use crate::addr::Pfn;
use core::fmt;

/// What a stage-2 slot says about one guest page (see the module documentation for how it
/// may change).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageState {
    /// Nothing mapped: a guest access faults and the fault maps a frame.
    Invalid,
    /// A valid mapping of a host frame.
    Mapped {
        /// The host frame.
        pfn: Pfn,
        /// Writable (false for copy-on-write sharing and read-only images).
        writable: bool,
    },
    /// The frame is being moved (migration or reclaim): a fault waits until the frame's lock
    /// bit clears and retries (Linux's migration entry).
    Migrating {
        /// The frame being moved.
        pfn: Pfn,
        /// Whether the mapping it replaced was writable (the mapping put back will be).
        writable: bool,
    },
    /// The page's contents are in the swap store (Linux's swap entry). It keeps no
    /// permission: a swap-in decides afresh (writable for a frame of its own, read-only for
    /// the swap cache's shared frame), as Linux's `do_swap_page` does for an exclusive page.
    Swapped {
        /// The store's slot.
        slot: u64,
    },
    /// A valid read-only mapping of the hypervisor's one shared zero frame (Linux's
    /// `ZERO_PAGE`): reads see zeroes, a write faults and maps a fresh zeroed frame. Not
    /// counted or reverse-mapped anywhere, so it carries no frame number.
    ZeroPage,
}

/// The rows of the transition table (the module documentation): which operation a change
/// is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transition {
    /// `Invalid → Mapped(q, w)`: a first-touch fault.
    FirstTouch,
    /// `Invalid → Mapped(ro) | Migrating(ro) | Swapped | ZeroPage`: fork fill, snapshot
    /// restore, a read-only image.
    Share,
    /// `Mapped(p, w) → Mapped(p, ro)`, `Migrating(p, w) → Migrating(p, ro)`: fork.
    WriteProtect,
    /// `Mapped(p, ro) → Mapped(p, w)`: copy-on-write, sole owner.
    CowReuse,
    /// `Mapped(p, ro) → Mapped(q, w)`: copy-on-write copy; `ZeroPage → Mapped(q, w)`: a
    /// write to the zero page.
    CowCopy,
    /// `Mapped(p, ro) → Mapped(q, ro) | ZeroPage`: same-page merging redirects a read-only
    /// mapping to an identical merged frame, or an all-zero one to the zero page.
    Merge,
    /// `Mapped(p, x) → Migrating(p, x)`: migration or reclaim begins.
    Unmap,
    /// `Migrating(p, x) → Mapped(q or p, x)`: migration ends or backs off.
    Remap,
    /// `Migrating(p, x) → Swapped(s)`: reclaim ends.
    SwapOut,
    /// `Swapped(s) → Mapped(q)`: swap-in.
    SwapIn,
    /// `any → Invalid`: release, teardown, restore.
    Release,
}

/// A change the transition table does not allow: a bug in whoever asked for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadTransition {
    /// The state the slot held.
    pub from: PageState,
    /// The state asked for.
    pub to: PageState,
}

impl fmt::Display for BadTransition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "page-state transition {:?} -> {:?} is not in the table",
            self.from, self.to
        )
    }
}

impl PageState {
    /// Which row of the transition table changing `from` into `to` is, or why it is none.
    pub fn check_transition(from: PageState, to: PageState) -> Result<Transition, BadTransition> {
        use PageState::*;
        use Transition::*;
        let row = match (from, to) {
            (Invalid, Invalid) => None,
            (_, Invalid) => Some(Release),
            (Invalid, Mapped { writable: true, .. }) => Some(FirstTouch),
            (
                Invalid,
                Mapped {
                    writable: false, ..
                },
            )
            | (
                Invalid,
                Migrating {
                    writable: false, ..
                },
            )
            | (Invalid, Swapped { .. })
            | (Invalid, ZeroPage) => Some(Share),
            (ZeroPage, Mapped { writable: true, .. }) => Some(CowCopy),
            (
                Mapped {
                    writable: false, ..
                },
                ZeroPage,
            ) => Some(Merge),
            (
                Mapped {
                    pfn: p,
                    writable: w,
                },
                Mapped {
                    pfn: q,
                    writable: x,
                },
            ) => match (w, x, p == q) {
                (true, false, true) => Some(WriteProtect),
                (false, true, true) => Some(CowReuse),
                (false, true, false) => Some(CowCopy),
                (false, false, false) => Some(Merge),
                _ => None,
            },
            (
                Migrating {
                    pfn: p,
                    writable: w,
                },
                Migrating {
                    pfn: q,
                    writable: x,
                },
            ) => (p == q && w && !x).then_some(WriteProtect),
            (
                Mapped {
                    pfn: p,
                    writable: w,
                },
                Migrating {
                    pfn: q,
                    writable: x,
                },
            ) => (p == q && w == x).then_some(Unmap),
            (Migrating { writable: w, .. }, Mapped { writable: x, .. }) => {
                (w == x).then_some(Remap)
            }
            (Migrating { .. }, Swapped { .. }) => Some(SwapOut),
            (Swapped { .. }, Mapped { .. }) => Some(SwapIn),
            _ => None,
        };
        row.ok_or(BadTransition { from, to })
    }

    /// The state of page `i` of a leaf whose first page is `self` (a block maps consecutive
    /// frames, and a block-sized migration entry stands for as many: page `i`'s names frame
    /// `pfn + i`, whose lock a fault on it waits for); states without a frame are the same
    /// for every page.
    pub fn page(self, i: u64) -> PageState {
        match self {
            PageState::Mapped { pfn, writable } => PageState::Mapped {
                pfn: pfn + i,
                writable,
            },
            PageState::Migrating { pfn, writable } => PageState::Migrating {
                pfn: pfn + i,
                writable,
            },
            other => other,
        }
    }

    /// The frame a mapping or migration entry refers to.
    pub fn pfn(self) -> Option<Pfn> {
        match self {
            PageState::Mapped { pfn, .. } | PageState::Migrating { pfn, .. } => Some(pfn),
            PageState::Invalid | PageState::Swapped { .. } | PageState::ZeroPage => None,
        }
    }

    /// A valid mapping of a frame (what the MMU translates; every other state but
    /// `ZeroPage` faults, and that one on a write).
    pub fn is_mapped(self) -> bool {
        matches!(self, PageState::Mapped { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::PageState::{self, *};
    use super::Transition::{self, *};
    use crate::Pfn;

    const P: Pfn = Pfn::new(5);
    const Q: Pfn = Pfn::new(9);

    fn mapped(pfn: Pfn, writable: bool) -> PageState {
        Mapped { pfn, writable }
    }

    fn migrating(pfn: Pfn, writable: bool) -> PageState {
        Migrating { pfn, writable }
    }

    /// Every row of the module documentation's table, with each permission it allows.
    fn rows() -> [(PageState, PageState, Transition); 24] {
        let s = Swapped { slot: 3 };
        [
            (Invalid, mapped(Q, true), FirstTouch),
            (Invalid, mapped(P, false), Share),
            (Invalid, migrating(P, false), Share),
            (Invalid, s, Share),
            (mapped(P, true), mapped(P, false), WriteProtect),
            (migrating(P, true), migrating(P, false), WriteProtect),
            (mapped(P, false), mapped(P, true), CowReuse),
            (mapped(P, false), mapped(Q, true), CowCopy),
            (mapped(P, false), mapped(Q, false), Merge),
            (mapped(P, true), migrating(P, true), Unmap),
            (mapped(P, false), migrating(P, false), Unmap),
            (migrating(P, true), mapped(Q, true), Remap),
            (migrating(P, false), mapped(P, false), Remap),
            (migrating(P, true), s, SwapOut),
            (s, mapped(Q, true), SwapIn),
            (s, mapped(Q, false), SwapIn),
            (mapped(P, true), Invalid, Release),
            (migrating(P, false), Invalid, Release),
            (s, Invalid, Release),
            (mapped(P, false), Invalid, Release),
            (Invalid, ZeroPage, Share),
            (ZeroPage, mapped(Q, true), CowCopy),
            (mapped(P, false), ZeroPage, Merge),
            (ZeroPage, Invalid, Release),
        ]
    }

    #[test]
    fn every_row_of_the_table_is_accepted() {
        for (from, to, row) in rows() {
            assert_eq!(
                PageState::check_transition(from, to),
                Ok(row),
                "{from:?} -> {to:?}"
            );
        }
    }

    #[test]
    fn changes_outside_the_table_are_refused() {
        let s = Swapped { slot: 3 };
        let refused = [
            (Invalid, Invalid),
            (mapped(P, true), mapped(P, true)),
            (s, s),
            (s, migrating(P, true)),
            (Invalid, migrating(P, true)),
            (mapped(P, true), s),
            (mapped(P, true), mapped(Q, true)),
            (mapped(P, true), mapped(Q, false)),
            (mapped(P, true), migrating(Q, true)),
            (mapped(P, true), migrating(P, false)),
            (migrating(P, true), mapped(Q, false)),
            (migrating(P, false), mapped(P, true)),
            (migrating(P, true), migrating(Q, true)),
            (migrating(P, false), migrating(P, true)),
            (s, Swapped { slot: 4 }),
            (ZeroPage, ZeroPage),
            (mapped(P, true), ZeroPage),
            (ZeroPage, mapped(Q, false)),
            (ZeroPage, migrating(Q, false)),
            (migrating(P, false), ZeroPage),
            (ZeroPage, s),
            (s, ZeroPage),
        ];
        for (from, to) in refused {
            let err = PageState::check_transition(from, to).unwrap_err();
            assert_eq!((err.from, err.to), (from, to));
        }
    }

    #[test]
    fn a_block_state_names_each_page_frame() {
        assert_eq!(mapped(P, true).page(2), mapped(Pfn::new(7), true));
        assert_eq!(migrating(P, true).page(2), migrating(Pfn::new(7), true));
        assert_eq!(mapped(P, true).pfn(), Some(P));
        assert_eq!(Swapped { slot: 1 }.pfn(), None);
        assert_eq!(ZeroPage.page(2), ZeroPage);
        assert_eq!(ZeroPage.pfn(), None);
    }
}
