//! What the stage-2 adapter needs from the machine it runs on.

use platform::board::MAX_CPUS;
use rmap::Pa;
use stage2::{S2Config, TableMemory, TlbMaintenance, VmidAllocator, Vttbr};

/// The machine under the adapter: hyp's EL2 (frame allocator, `TLBI`/`DC`
/// instructions, `MPIDR`-derived CPU index) or a host model in tests.
///
/// Implemented by a small handle (hyp's is zero-sized) that every
/// [`crate::GuestMemory`] keeps a copy of; the adapter is generic over it, so
/// the hypervisor's calls are static and inlined.
pub trait Machine {
    /// Where stage-2 table pages come from.
    type Tables: TableMemory;
    /// Broadcast (inner-shareable) TLB and cache maintenance.
    type Tlb: TlbMaintenance;

    /// A table-page source for a new VM's table.
    fn tables(&self) -> Self::Tables;

    /// The broadcast maintenance.
    fn tlb(&self) -> &Self::Tlb;

    /// Invalidates what may translate `ipa` under `vttbr` on this CPU only
    /// (`TLBI IPAS2E1` + `VMALLE1`, non-shareable barriers): no other CPU can
    /// hold the VM's entries.
    fn invalidate_ipa_local(&self, vttbr: Vttbr, ipa: u64);

    /// Invalidates every entry of `vttbr`'s VMID on this CPU only.
    fn invalidate_vmid_local(&self, vttbr: Vttbr);

    /// This physical CPU's index, below [`MAX_CPUS`].
    fn cpu_index(&self) -> usize;

    /// `DSB ISH`: every earlier memory access (descriptor stores) is observed
    /// by every CPU of the inner-shareable domain before any later one.
    fn dsb_ish(&self);

    /// The VMID allocator every VM of this machine draws from.
    fn vmids(&self) -> &VmidAllocator<MAX_CPUS>;

    /// The stage-2 configuration every VM of this machine uses (FWB or not).
    fn config(&self) -> S2Config;

    /// The one shared zero frame (allocated at boot with the stage-2 tables, zeroed and
    /// cleaned to the PoC, never written, freed or moved): what a `PageState::ZeroPage`
    /// entry maps. Not a guest frame: rmap's frame table may not cover it.
    fn zero_page(&self) -> Pa;

    /// A free guest (movable) frame's physical address, contents undefined.
    fn alloc_frame(&self) -> Option<Pa>;

    /// `pages` (a power of two) zeroed contiguous guest frames aligned to
    /// `pages` frames (a 2 MiB block), or None.
    fn alloc_contiguous_zeroed(&self, pages: usize) -> Option<Pa>;

    /// `pages` (a power of two) contiguous guest frames aligned to `pages`
    /// frames, contents undefined (block migration's target, which the copy
    /// overwrites), or None. Each frame is freed on its own later
    /// ([`Machine::free_frame`]). The default zeroes them needlessly.
    fn alloc_contiguous(&self, pages: usize) -> Option<Pa> {
        self.alloc_contiguous_zeroed(pages)
    }

    /// The reverse map's frame table: a block split moves that mapping's
    /// count of its folio to per-page counts there (`FrameTable::split_entire`).
    fn frame_table(&self) -> &rmap::FrameTable;

    /// Returns a guest frame to the allocator.
    fn free_frame(&self, pa: Pa);

    /// Returns `pages` contiguous guest frames from `pa`, all unused now
    /// (a folio that moved whole). The default frees them one by one.
    fn free_contiguous(&self, pa: Pa, pages: usize) {
        (0..pages as u64).for_each(|i| self.free_frame(pa + i * crate::PAGE_SIZE));
    }

    /// Zeroes the frame at `pa` through the hypervisor's cacheable map.
    ///
    /// # Safety
    ///
    /// The caller owns the frame (just allocated) and nothing maps it yet.
    unsafe fn zero_frame(&self, pa: Pa);

    /// Copies the frame at `src` into the frame at `dst`.
    ///
    /// # Safety
    ///
    /// `dst` is the caller's alone to write for the copy: freshly allocated,
    /// or mapped only by a stopped VM whose stage-2 lock the caller holds (a
    /// restore in place); `src` is pinned by the caller for the copy (locked,
    /// or its writers replaced by migration entries); they are distinct
    /// frames.
    unsafe fn copy_frame(&self, dst: Pa, src: Pa);

    /// Whether the frames at `a` and `b` hold the same bytes (same-page merging's final
    /// comparison, read through the hypervisor's cacheable map).
    ///
    /// # Safety
    ///
    /// Both are RAM frames the caller pinned; no guest can write either (every mapping is
    /// read-only and invalidated) for the duration of the call.
    unsafe fn frames_equal(&self, a: Pa, b: Pa) -> bool;

    /// A checksum of the frame's bytes: the merge scanner's test of whether
    /// a page is still changing and its key for finding identical pages. A
    /// hint only (`Rmap::merge` compares the bytes): the frame may change
    /// while it is read.
    ///
    /// # Safety
    ///
    /// `pa` is a RAM frame. A guest may write it meanwhile: the read must
    /// tolerate that (volatile loads at EL2), and the value may be stale.
    unsafe fn frame_hash(&self, pa: Pa) -> u64;
}
