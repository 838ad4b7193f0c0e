//! Same-page merging into the shared zero page (Linux KSM's `use_zero_pages`:
//! `try_to_merge_one_page` with the zero page as `kpage`, `replace_page` installing a
//! special PTE of `my_zero_pfn`): a guest page found all-zero stops mapping a frame of its
//! own and maps [`PageState::ZeroPage`] instead. The zero page is in no reverse map and
//! counted nowhere, so nothing here touches a stable node; the old frame loses each mapping
//! as a zap would and is freed with the last one.
//!
//! Every mapper of the frame (its whole fork family) is redirected, as [`Rmap::merge`] does.
//! The zero page reveals nothing about any VM (every VM could read zeroes from a page of its
//! own), so this works across trust groups.
//!
//! Locking: the frame try-locked (level 2, never waited for), its family root read-locked
//! (3) for the walk, each mapper's stage-2 lock (4) per change. Page states:
//! `Mapped{p, rw} -> Mapped{p, ro}` ([`Transition::WriteProtect`]), then, if the frame is
//! still all zero, `Mapped{p, ro} -> ZeroPage` ([`Transition::Merge`]), each change with its
//! break-before-make and TLB invalidation done by the table before the mapping's reference
//! is dropped.
//!
//! [`Transition::WriteProtect`]: mmtypes::Transition::WriteProtect
//! [`Transition::Merge`]: mmtypes::Transition::Merge

use crate::backend::{FrameAllocator, PageState, VmSet};
use crate::frame::FrameGuard;
use crate::merge::{MergeError, MergePage};
use crate::Rmap;
use core::ops::ControlFlow;

/// Broken variant: the contents are not checked again once the page is write-protected, so
/// a guest write that raced the caller's check is lost.
const MUTATE_ZERO_WITHOUT_RECHECK: bool = cfg!(feature = "mutate-merge-without-recheck");

impl Rmap {
    /// Maps every mapping of `page`'s frame to the shared zero page if the frame is all zero
    /// ([`FrameAllocator::is_zero`], checked after every mapping is write-protected; the
    /// caller's own check is a hint). Returns how many mappings now map the zero page; the
    /// frame is freed with its last mapping. `page.group` is not used: the zero page is
    /// shared by every group. A merged frame is left alone (`NotMapped`).
    pub fn merge_zero<V: VmSet, A: FrameAllocator>(
        &self,
        vms: &V,
        alloc: &A,
        page: MergePage,
    ) -> Result<u32, MergeError> {
        let frame = self.frames.get(page.pfn).ok_or(MergeError::NotMapped)?;
        if frame.is_merged() || !frame.try_pin() {
            return Err(MergeError::NotMapped);
        }
        let result = self.merge_zero_pinned(vms, alloc, page);
        // Our pin may be the frame's last reference now.
        self.put_frame(page.pfn, alloc);
        result
    }

    fn merge_zero_pinned<V: VmSet, A: FrameAllocator>(
        &self,
        vms: &V,
        alloc: &A,
        page: MergePage,
    ) -> Result<u32, MergeError> {
        let guard = self.frames.try_lock(page.pfn).ok_or(MergeError::Busy)?;
        let frame = guard.frame();
        if !frame.is_mapped() || frame.is_merged() || frame.anon_slot().is_none() {
            return Err(MergeError::NotMapped);
        }
        if frame.pinned_by_others() {
            return Err(MergeError::Busy);
        }
        self.write_protect_all(&guard, vms, page)?;
        // A write that raced the caller's check landed before the write-protect.
        if !MUTATE_ZERO_WITHOUT_RECHECK && !alloc.is_zero(page.pfn) {
            return Err(MergeError::Differ);
        }
        self.redirect_to_zero(&guard, vms)
    }

    /// Points every read-only mapping of the locked, write-protected frame at the zero page
    /// and drops the mappings' references (the caller's pin keeps the frame until it lets
    /// go). `Busy` if some mapping stayed (unreachable, a block that cannot be split).
    fn redirect_to_zero<V: VmSet>(
        &self,
        guard: &FrameGuard<'_>,
        vms: &V,
    ) -> Result<u32, MergeError> {
        let pfn = guard.pfn();
        let pin = self.get_anon_vma(pfn).ok_or(MergeError::NotMapped)?;
        let family = self.lock_family_read(pin.handle());
        let index = guard.frame().index();
        let old = PageState::Mapped {
            pfn,
            writable: false,
        };
        let mut moved = 0;
        let _ = self.walk_family(&family, pin.handle(), index, pfn, vms, &mut |m, s2| {
            // The table's CAS does the break-before-make and waits for the invalidation
            // (no deferral): no TLB may still translate to the frame once its mapping goes.
            if m.entry == old && s2.compare_exchange(m.ipa, old, PageState::ZeroPage).is_ok() {
                let last = guard.frame().dec_map();
                debug_assert!(!last, "the merger's pin keeps the frame");
                moved += 1;
            }
            ControlFlow::Continue(())
        });
        if guard.frame().is_mapped() {
            Err(MergeError::Busy)
        } else {
            Ok(moved)
        }
    }
}
