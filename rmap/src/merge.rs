//! Same-page merging (Linux's `try_to_merge_one_page` / `write_protect_page` /
//! `replace_page`): two guest pages the caller found identical become one read-only merged
//! frame, or a page joins an existing merged frame (a stable-tree hit).
//!
//! Rule for pages already shared within a fork family: every mapper of the page's frame is
//! redirected (the frame's whole family walk), so a forked page shared by N VMs merges in
//! one call; Linux merges only pages with one mapper, because it works per `mm`, but here
//! the walk reaches every mapper and redirecting them all is what saves the frame.
//!
//! Locking: both frames try-locked (level 2, never waited for: the caller retries later),
//! then each frame's family root read-locked (3) for its walk, each mapper's stage-2 lock
//! (4) per change, and the stable node (5) to count. Page states:
//! `Mapped{p, rw} -> Mapped{p, ro}` (write-protect both, [`Transition::WriteProtect`]),
//! then, if the contents are still equal, `Mapped{b, ro} -> Mapped{a, ro, merged}`
//! ([`Transition::Merge`]); `b` is freed when its last mapping goes.
//!
//! [`Transition::WriteProtect`]: mmtypes::Transition::WriteProtect
//! [`Transition::Merge`]: mmtypes::Transition::Merge

use crate::backend::{FrameAllocator, PageState, Stage2Locked, VmSet};
use crate::frame::FrameGuard;
use crate::ksm::ItemKey;
use crate::walk::Mapper;
use crate::{Ipa, Pfn, Rmap, VmId};
use core::ops::ControlFlow;

/// Broken variant (issue 16's race): the merge trusts the caller's comparison and does not
/// compare again once both pages are write-protected, so a racing write is lost.
const MUTATE_MERGE_WITHOUT_RECHECK: bool = cfg!(feature = "mutate-merge-without-recheck");

/// One side of a merge: a guest page, the frame the caller found mapped there, and the
/// trust group its VM is in. The caller reads the frame from the VM's stage 2 while it
/// knows the VM's tables are live (its scan holds the VM); the merge never looks a VM up by
/// id (a VM being destroyed may already have freed its tables, lesson 5): it checks that
/// the frame's reverse map reaches `(vm, ipa)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergePage {
    /// The VM.
    pub vm: VmId,
    /// The page (any address in it).
    pub ipa: Ipa,
    /// The frame the caller found mapped at `ipa`.
    pub pfn: Pfn,
    /// The VM's trust group: pages merge only within one group.
    pub group: u32,
}

/// Why a merge did not happen. Nothing is left half-done: at worst a page stays
/// write-protected (its next write takes a copy-on-write fault that reuses the frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeError {
    /// The pages (or the merged frame) belong to different trust groups.
    OtherGroup,
    /// A page is not mapped (invalid, swapped, a VM gone) or not a guest anonymous page.
    NotMapped,
    /// Both pages already map the same frame.
    Same,
    /// Both pages are in different merged frames already.
    BothMerged,
    /// A frame is locked or pinned by someone else, or mapped where a walk cannot reach or
    /// change it (a temporary region, a block that cannot be split): try later.
    Busy,
    /// The contents differ (after write-protecting: a racing write wins).
    Differ,
    /// No memory for a stable node or an item, or the merged frame has the map limit's
    /// mappings.
    NoMemory,
}

impl Rmap {
    /// Merges page `b` into page `a` (or `a` into `b` if only `b` is merged already): after
    /// this both map one read-only merged frame and `b`'s old frame is freed once its last
    /// mapping goes. Returns the merged frame. The caller compared the contents; they are
    /// compared again ([`FrameAllocator::same_contents`]) after both are write-protected.
    /// A side whose frame is merged already (a stable-tree hit) needs no `(vm, ipa)`: only
    /// its `pfn` and `group` are used.
    pub fn merge<V: VmSet, A: FrameAllocator>(
        &self,
        vms: &V,
        alloc: &A,
        a: MergePage,
        b: MergePage,
    ) -> Result<Pfn, MergeError> {
        if a.group != b.group {
            return Err(MergeError::OtherGroup);
        }
        if a.pfn == b.pfn {
            return Err(MergeError::Same);
        }
        let (fa, fb) = (self.frames.get(a.pfn), self.frames.get(b.pfn));
        let (fa, fb) = fa.zip(fb).ok_or(MergeError::NotMapped)?;
        let (a, b) = match (fa.is_merged(), fb.is_merged()) {
            (true, true) => return Err(MergeError::BothMerged),
            (false, true) => (b, a),
            _ => (a, b),
        };
        if !self.frames.frame(a.pfn).try_pin() {
            return Err(MergeError::NotMapped);
        }
        let result = if self.frames.frame(b.pfn).try_pin() {
            let r = self.merge_pinned(vms, alloc, a, b);
            self.put_frame(b.pfn, alloc);
            r
        } else {
            Err(MergeError::NotMapped)
        };
        self.put_frame(a.pfn, alloc);
        result
    }

    fn merge_pinned<V: VmSet, A: FrameAllocator>(
        &self,
        vms: &V,
        alloc: &A,
        a: MergePage,
        b: MergePage,
    ) -> Result<Pfn, MergeError> {
        let (group, pa, pb) = (a.group, a.pfn, b.pfn);
        let ga = self.frames.try_lock(pa).ok_or(MergeError::Busy)?;
        let gb = self.frames.try_lock(pb).ok_or(MergeError::Busy)?;
        let (fa, fb) = (ga.frame(), gb.frame());
        let usable = |f: &crate::Frame| f.is_mapped() && (f.is_merged() || f.anon_slot().is_some());
        if !usable(fa) || !usable(fb) || fb.is_merged() {
            return Err(MergeError::NotMapped);
        }
        if fa.pinned_by_others() || fb.pinned_by_others() {
            return Err(MergeError::Busy);
        }
        if let Some(node) = self.stable_of(fa) {
            if self.node_group(node) != group {
                return Err(MergeError::OtherGroup);
            }
        }
        self.write_protect_all(&gb, vms, b)?;
        if !fa.is_merged() {
            self.write_protect_all(&ga, vms, a)?;
        }
        // Linux's `pages_identical` after `write_protect_page`: a write that raced the
        // caller's comparison landed before the write-protect, and shows here.
        if !MUTATE_MERGE_WITHOUT_RECHECK && !alloc.same_contents(pa, pb) {
            return Err(MergeError::Differ);
        }
        if !fa.is_merged() {
            self.make_stable(&ga, group)?;
        }
        self.redirect_all(&ga, &gb, vms)?;
        Ok(pa)
    }

    /// Makes every mapping of the locked anonymous frame read-only; `NotMapped` if none is
    /// `page`'s, `Busy` if some mapping could not be reached or changed (it may still be
    /// writable).
    pub(crate) fn write_protect_all<V: VmSet>(
        &self,
        guard: &FrameGuard<'_>,
        vms: &V,
        page: MergePage,
    ) -> Result<(), MergeError> {
        let pfn = guard.pfn();
        let pin = self.get_anon_vma(pfn).ok_or(MergeError::NotMapped)?;
        let (mut read_only, mut found) = (0, false);
        let index = guard.frame().index();
        self.walk_pinned(
            &pin,
            index,
            pfn,
            vms,
            |m: &Mapper, s2: &mut dyn Stage2Locked| {
                found |= m.vm == page.vm && m.ipa == page.ipa.page();
                if let PageState::Mapped { writable, .. } = m.entry {
                    let ro = PageState::Mapped {
                        pfn,
                        writable: false,
                    };
                    if !writable || s2.compare_exchange(m.ipa, m.entry, ro).is_ok() {
                        read_only += 1;
                    }
                }
                ControlFlow::Continue(())
            },
        );
        if !found {
            Err(MergeError::NotMapped)
        } else if read_only == guard.frame().mapcount() {
            Ok(())
        } else {
            Err(MergeError::Busy)
        }
    }

    /// Makes the locked, write-protected anonymous frame merged: a stable node with one
    /// item, its family's, counting its mappings. Under the family's read lock, so no fork
    /// copies a mapping of it between the count and the flag (fork holds the write lock and
    /// counts merged frames' new mappings itself).
    fn make_stable(&self, guard: &FrameGuard<'_>, group: u32) -> Result<(), MergeError> {
        let frame = guard.frame();
        let anon_vma = self.frame_anon_vma(frame).ok_or(MergeError::NotMapped)?;
        let root = self.anon(anon_vma).root();
        let _family = self.lock_family_read(root);
        let key = (root, frame.index());
        if self.new_stable(frame, group, key, frame.mapcount()) {
            Ok(())
        } else {
            Err(MergeError::NoMemory)
        }
    }

    /// Points every read-only mapping of the locked frame `gb` at the locked merged frame
    /// `ga`, counting them in `b`'s family's item. `Busy` if some mapping stayed on `b`
    /// (unreachable, or a block that cannot be split): both frames are consistent then.
    fn redirect_all<V: VmSet>(
        &self,
        ga: &FrameGuard<'_>,
        gb: &FrameGuard<'_>,
        vms: &V,
    ) -> Result<(), MergeError> {
        let (pa, pb) = (ga.pfn(), gb.pfn());
        let node = self.stable_of(ga.frame()).expect("made stable");
        let pin = self.get_anon_vma(pb).ok_or(MergeError::NotMapped)?;
        let root = self.anon(pin.handle()).root();
        let index = gb.frame().index();
        let key: ItemKey = (root, index);
        // The item first (count 0), so a fork copying a redirected mapping finds it.
        self.add_item(node, key, 0).ok_or(MergeError::NoMemory)?;
        let family = self.lock_family_read(pin.handle());
        let mut moved = 0;
        let mut full = false;
        let _ = self.walk_family(&family, pin.handle(), index, pb, vms, &mut |m, s2| {
            let old = PageState::Mapped {
                pfn: pb,
                writable: false,
            };
            if m.entry != old {
                return ControlFlow::Continue(());
            }
            if !ga.frame().try_inc_map(self.map_limit) {
                full = true;
                return ControlFlow::Break(());
            }
            let new = PageState::Mapped {
                pfn: pa,
                writable: false,
            };
            if s2.compare_exchange(m.ipa, old, new).is_ok() {
                let last = gb.frame().dec_map();
                debug_assert!(!last, "the merger's pin keeps the frame");
                moved += 1;
            } else {
                let last = ga.frame().dec_map();
                debug_assert!(!last, "the merger's pin keeps the frame");
            }
            ControlFlow::Continue(())
        });
        self.count_item(node, self.find_item(node, key), moved);
        drop(family);
        self.prune_items(node);
        match (full, gb.frame().is_mapped()) {
            (true, _) => Err(MergeError::NoMemory),
            (false, true) => Err(MergeError::Busy),
            (false, false) => Ok(()),
        }
    }
}
