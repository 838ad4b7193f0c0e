//! Merged frames (Linux's KSM pages): one read-only frame mapped by VMs of different fork
//! families. A merged frame carries a stable node instead of an anon_vma (`FRAME_MERGED`,
//! its `index` naming the node's pool slot); the node lists rmap items, each naming a
//! family's root anon_vma (a pinned reference) and the page offset at which that family's
//! regions map the frame, with how many of the frame's mappings it accounts for. A walk of
//! a merged frame visits each item's family at that offset (`rmap_walk_ksm`).
//!
//! Items are keyed by family root, not by the anon_vma the page had: every region of a
//! family is linked to its root (lesson 3), so the root's chains at the offset reach every
//! mapper in the family, and a fork child's mappings belong to its parent's item. So each
//! mapping of a merged frame belongs to exactly one item, and fork needs no new item.
//!
//! Counts: `sum(item.maps) == frame.mapcount()` is kept exactly by the paths that know the
//! mapping's region (merge, fork, CoW unmerge, zap, MEM_RELEASE); the two region-blind
//! paths ([`Rmap::remove_rmap`], [`Rmap::add_anon_rmap`], e.g. snapshot restore) mark the
//! node `dirty` instead, which stops items being dropped on a zero count until a migration
//! or reclaim of the frame recounts them by walking. Items are added and dropped only under
//! the frame lock, so a walker holding it may copy the item list and walk without the node
//! lock (a leaf lock, `Level::STABLE_NODE`). A node lives exactly as long as its frame is
//! merged: the frame's last reference frees the node and its items.

use crate::anon_vma::AnonHandle;
use crate::backend::{Stage2Locked, VmSet};
use crate::frame::Frame;
use crate::lock::{Level, OrderedMutex};
use crate::pool::Handle;
use crate::region::Region;
use crate::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use crate::walk::Mapper;
use crate::{Ipa, Pfn, Rmap};
use alloc::vec::Vec;
use core::ops::ControlFlow;

/// A generation-checked handle to a [`StableNode`].
pub type StableHandle = Handle<StableNode>;
/// A generation-checked handle to an [`RmapItem`].
pub type ItemHandle = Handle<RmapItem>;

/// A merged frame's reverse map (Linux's `ksm_stable_node`).
pub struct StableNode {
    inner: OrderedMutex<NodeInner>,
}

impl Default for StableNode {
    fn default() -> Self {
        StableNode {
            inner: OrderedMutex::new(Level::STABLE_NODE, "stable_node", NodeInner::default()),
        }
    }
}

/// What the node lock guards.
#[derive(Default)]
pub(crate) struct NodeInner {
    /// The trust group every mapper was merged under.
    pub(crate) group: u32,
    /// A region-blind path changed the mapcount: item counts are not exact (see the module
    /// documentation) and may not be used to drop items until a recount.
    pub(crate) dirty: bool,
    pub(crate) items: Vec<ItemHandle>,
}

/// One family's share of a merged frame (Linux's `ksm_rmap_item` on a stable node).
#[derive(Default)]
pub struct RmapItem {
    root: AtomicU64,
    index: AtomicU64,
    /// Mappings of the frame this family holds (changed under the node lock).
    maps: AtomicU32,
}

/// An item as seen by [`Rmap::stable_items`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ItemInfo {
    /// The family's root anon_vma (pinned by the item).
    pub root: AnonHandle,
    /// The page offset at which the family maps the frame.
    pub index: u64,
    /// How many of the frame's mappings the family holds (exact unless the node is dirty).
    pub maps: u32,
}

/// A merged frame's stable node, as [`Rmap::stable_info`] sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StableInfo {
    /// The trust group its mappers were merged under.
    pub group: u32,
    /// Whether the item counts may be inexact (a region-blind path changed the mapcount
    /// since the last recount).
    pub dirty: bool,
    /// One item per (family, page offset) mapping the frame.
    pub items: Vec<ItemInfo>,
}

/// Counters for `stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// Merged frames (stable nodes).
    pub merged_frames: usize,
    /// Rmap items: (family, offset) pairs mapping a merged frame.
    pub items: usize,
    /// Stage-2 mappings of merged frames.
    pub mappings: u64,
    /// Frames saved: mappings beyond the first of each merged frame.
    pub saved: u64,
}

/// The item key of a mapping: its family's root and its page offset.
pub(crate) type ItemKey = (AnonHandle, u64);

impl Rmap {
    /// The stable node of a merged frame (exact under the frame lock, or while the caller
    /// holds a stage-2 lock showing a mapping of it).
    pub(crate) fn stable_of(&self, frame: &Frame) -> Option<&StableNode> {
        let handle = self.stable_pool.current(frame.stable_slot()?)?;
        self.stable_pool.get(handle)
    }

    /// The item key of the mapping at `ipa` in `region`.
    pub(crate) fn item_key(&self, region: &Region, ipa: Ipa) -> Option<ItemKey> {
        let own = region.anon_vma()?;
        Some((self.anon(own).root(), region.index_of(ipa)))
    }

    fn item(&self, handle: ItemHandle) -> &RmapItem {
        self.item_pool.get(handle).expect("a node's item is live")
    }

    fn item_info(&self, handle: ItemHandle) -> ItemInfo {
        let item = self.item(handle);
        ItemInfo {
            root: AnonHandle::from_raw(item.root.load(Ordering::Acquire)),
            index: item.index.load(Ordering::Acquire),
            maps: item.maps.load(Ordering::Acquire),
        }
    }

    /// A merged frame's stable node as it is now (for `rmap <pa>`, stats and checks);
    /// `None` if `pfn` is not merged. A snapshot: exact while the caller keeps the frame
    /// locked or the world quiescent (the node lock keeps each listed item alive).
    pub fn stable_info(&self, pfn: Pfn) -> Option<StableInfo> {
        let node = self.stable_of(self.frames.get(pfn)?)?;
        let inner = node.inner.lock();
        Some(StableInfo {
            group: inner.group,
            dirty: inner.dirty,
            items: inner.items.iter().map(|&h| self.item_info(h)).collect(),
        })
    }

    /// Merged-frame counters (iterates the frame table for the mapping count).
    pub fn merge_stats(&self) -> MergeStats {
        let mappings: u64 = self
            .frames
            .iter()
            .filter(|(_, f)| f.is_merged())
            .map(|(_, f)| u64::from(f.mapcount()))
            .sum();
        let merged_frames = self.stable_pool.live();
        MergeStats {
            merged_frames,
            items: self.item_pool.live(),
            mappings,
            saved: mappings.saturating_sub(merged_frames as u64),
        }
    }

    /// Makes the locked frame `frame` merged with a new node of `group` and one item, `key`,
    /// holding `maps` mappings. `Err` (nothing changed) when memory is short.
    pub(crate) fn new_stable(&self, frame: &Frame, group: u32, key: ItemKey, maps: u32) -> bool {
        let Ok(node) = self.stable_pool.alloc(|_, _| {}) else {
            return false;
        };
        let value = self.stable_pool.get(node).expect("just allocated");
        {
            let mut inner = value.inner.lock();
            inner.group = group;
            inner.dirty = false;
            inner.items.clear();
        }
        if self.add_item(value, key, maps).is_none() {
            self.free_node(node);
            return false;
        }
        frame.set_stable(node.index() as u32);
        true
    }

    /// Finds or creates `key`'s item in `node` and adds `maps` to it; `None` if memory is
    /// short. The caller holds the frame lock (items change only under it).
    pub(crate) fn add_item(&self, node: &StableNode, key: ItemKey, maps: u32) -> Option<()> {
        let mut inner = node.inner.lock();
        if let Some(&h) = inner.items.iter().find(|&&h| self.item_key_of(h) == key) {
            self.item(h).maps.fetch_add(maps, Ordering::AcqRel);
            return Some(());
        }
        inner.items.try_reserve(1).ok()?;
        let item = self
            .item_pool
            .alloc(|_, item| {
                item.root.store(key.0.raw(), Ordering::Release);
                item.index.store(key.1, Ordering::Release);
                item.maps.store(maps, Ordering::Release);
            })
            .ok()?;
        // The item's pin on the family root: a mapped member keeps the root alive, so it is
        // live now.
        self.anon_pool.get_ref(key.0);
        inner.items.push(item);
        Some(())
    }

    fn item_key_of(&self, handle: ItemHandle) -> ItemKey {
        let info = self.item_info(handle);
        (info.root, info.index)
    }

    /// One more (`up`) or one fewer (taken back) mapping of merged `pfn` through `key`, by a
    /// path that copies another mapping of the same family: fork (under the parent's
    /// stage-2 lock showing it) or snapshot restore (under the frame lock). That mapping
    /// keeps the item alive, and a count taken back never reaches 0 here.
    pub(crate) fn merged_count(&self, pfn: Pfn, key: Option<ItemKey>, up: bool) {
        let node = self.stable_of(self.frames.frame(pfn)).expect("merged");
        let mut inner = node.inner.lock();
        let found = key.and_then(|key| {
            inner
                .items
                .iter()
                .find(|&&h| self.item_key_of(h) == key)
                .copied()
        });
        match found {
            Some(h) if up => {
                self.item(h).maps.fetch_add(1, Ordering::AcqRel);
            }
            Some(h) if self.item(h).maps.load(Ordering::Acquire) > 0 => {
                self.item(h).maps.fetch_sub(1, Ordering::AcqRel);
            }
            _ => inner.dirty = true,
        }
    }

    /// The trust group a merged frame's node was made for.
    pub(crate) fn node_group(&self, node: &StableNode) -> u32 {
        node.inner.lock().group
    }

    /// The handle of `key`'s item (the caller holds the frame lock and added it).
    pub(crate) fn find_item(&self, node: &StableNode, key: ItemKey) -> ItemHandle {
        let inner = node.inner.lock();
        *inner
            .items
            .iter()
            .find(|&&h| self.item_key_of(h) == key)
            .expect("item added under the frame lock")
    }

    /// A region-blind path added or dropped a mapping of merged `pfn`.
    pub(crate) fn merged_blind(&self, pfn: Pfn) {
        if let Some(node) = self.stable_of(self.frames.frame(pfn)) {
            node.inner.lock().dirty = true;
        }
    }

    /// One mapping of merged `pfn` through `key` went (the caller holds the frame lock);
    /// the item goes with its last mapping unless the counts are dirty.
    pub(crate) fn merged_unmapped_locked(&self, pfn: Pfn, key: Option<ItemKey>) {
        let Some(node) = self.stable_of(self.frames.frame(pfn)) else {
            return;
        };
        let mut inner = node.inner.lock();
        let at = key.and_then(|key| inner.items.iter().position(|&h| self.item_key_of(h) == key));
        let Some(at) = at else {
            inner.dirty = true;
            return;
        };
        let item = self.item(inner.items[at]);
        let old = item.maps.load(Ordering::Acquire);
        if old == 0 {
            inner.dirty = true; // counted blind: not ours to fix
            return;
        }
        item.maps.store(old - 1, Ordering::Release);
        if old == 1 && !inner.dirty {
            let gone = inner.items.swap_remove(at);
            drop(inner);
            self.free_item(gone);
        }
    }

    /// A copy of the item list (the caller holds the frame lock, which keeps it as is);
    /// `None` if memory for it is short.
    pub(crate) fn item_list(&self, node: &StableNode) -> Option<Vec<(ItemHandle, ItemKey)>> {
        let inner = node.inner.lock();
        let mut out = Vec::new();
        out.try_reserve(inner.items.len()).ok()?;
        out.extend(inner.items.iter().map(|&h| (h, self.item_key_of(h))));
        Some(out)
    }

    /// Sets every item's count to 0 (a migration or reclaim unmapped them all: the walk
    /// that puts them back counts them again) and clears `dirty`.
    pub(crate) fn reset_counts(&self, node: &StableNode) {
        let mut inner = node.inner.lock();
        for &h in &inner.items {
            self.item(h).maps.store(0, Ordering::Release);
        }
        inner.dirty = false;
    }

    /// Adds `n` to item `h`'s count.
    pub(crate) fn count_item(&self, node: &StableNode, h: ItemHandle, n: u32) {
        let _inner = node.inner.lock();
        self.item(h).maps.fetch_add(n, Ordering::AcqRel);
    }

    /// Takes one mapping off item `h`'s count (a migration or reclaim unmapped it); a count
    /// already at 0 was inexact, and says so.
    pub(crate) fn uncount_item(&self, node: &StableNode, h: ItemHandle) {
        let mut inner = node.inner.lock();
        let maps = &self.item(h).maps;
        match maps.load(Ordering::Acquire) {
            0 => inner.dirty = true,
            n => maps.store(n - 1, Ordering::Release),
        }
    }

    /// Drops the items with no mapping (the caller holds the frame lock, counts exact).
    pub(crate) fn prune_items(&self, node: &StableNode) {
        let mut gone = Vec::new();
        {
            let mut inner = node.inner.lock();
            if inner.dirty {
                return;
            }
            let mut k = 0;
            while k < inner.items.len() {
                if self.item(inner.items[k]).maps.load(Ordering::Acquire) == 0 {
                    gone.push(inner.items.swap_remove(k));
                } else {
                    k += 1;
                }
            }
        }
        gone.into_iter().for_each(|h| self.free_item(h));
    }

    fn free_item(&self, handle: ItemHandle) {
        let root = self.item_key_of(handle).0;
        if self.item_pool.put(handle) {
            self.item_pool.recycle(handle);
        }
        self.put_anon_vma(root);
    }

    fn free_node(&self, node: StableHandle) {
        let value = self.stable_pool.get(node).expect("live node");
        let items = core::mem::take(&mut value.inner.lock().items);
        items.into_iter().for_each(|h| self.free_item(h));
        if self.stable_pool.put(node) {
            self.stable_pool.recycle(node);
        }
    }

    /// The merged frame's last reference went: its node and items go too.
    pub(crate) fn release_stable(&self, frame: &Frame) {
        if let Some(handle) = frame
            .stable_slot()
            .and_then(|s| self.stable_pool.current(s))
        {
            self.free_node(handle);
        }
    }

    /// Walks every verified mapping of `pfn` through `items` (item keys whose roots the
    /// caller keeps alive: the frame lock or its own references), calling `f(k, mapper, stage 2)` with the item's position `k`: each
    /// item's family root is read-locked, its chains at the item's offset visited, each
    /// VM's leaf verified under its stage-2 lock (`rmap_walk_ksm`).
    pub(crate) fn walk_items<V: VmSet>(
        &self,
        pfn: Pfn,
        items: &[(ItemHandle, ItemKey)],
        vms: &V,
        mut f: impl FnMut(usize, &Mapper, &mut dyn Stage2Locked) -> ControlFlow<()>,
    ) {
        for (k, &(_, (root, index))) in items.iter().enumerate() {
            let family = self.lock_family_read(root);
            let mut g = |m: &Mapper, s2: &mut dyn Stage2Locked| f(k, m, s2);
            if self
                .walk_family(&family, root, index, pfn, vms, &mut g)
                .is_break()
            {
                return;
            }
        }
    }

    /// [`Rmap::walk`] of a merged frame, without its frame lock (lesson 4's lockless
    /// walker): pin the node slot the frame names (increment-if-not-zero with a generation
    /// check), copy its items taking a reference on each family root under the node lock
    /// (an item's own reference keeps the root alive meanwhile), let the node go, then walk
    /// each family; every mapping is verified under its VM's stage-2 lock, so a node that
    /// moved to another frame (migration) or lost items meanwhile only finds less.
    pub(crate) fn walk_merged<V: VmSet>(
        &self,
        pfn: Pfn,
        vms: &V,
        mut f: impl FnMut(usize, &Mapper, &mut dyn Stage2Locked) -> ControlFlow<()>,
    ) -> bool {
        let Some(roots) = self.pin_item_roots(pfn) else {
            return false;
        };
        self.walk_items(pfn, &roots, vms, &mut f);
        roots
            .into_iter()
            .for_each(|(_, (root, _))| self.put_anon_vma(root));
        true
    }

    /// The item keys of merged `pfn`'s node, each root pinned for the caller.
    fn pin_item_roots(&self, pfn: Pfn) -> Option<Vec<(ItemHandle, ItemKey)>> {
        let frame = self.frames.get(pfn)?;
        let handle = self.stable_pool.current(frame.stable_slot()?)?;
        let recycle = |stale| self.stable_pool.recycle(stale);
        let node = self.stable_pool.try_get(handle, recycle)?;
        let keys = {
            let inner = node.inner.lock();
            let mut keys = Vec::new();
            if keys.try_reserve(inner.items.len()).is_ok() {
                for &h in &inner.items {
                    let key = self.item_key_of(h);
                    self.anon_pool.get_ref(key.0);
                    keys.push((h, key));
                }
            }
            keys
        };
        if self.stable_pool.put(handle) {
            self.stable_pool.recycle(handle);
        }
        Some(keys)
    }

    /// Live stable nodes and items (leak checks).
    pub fn live_merge_objects(&self) -> (usize, usize) {
        (self.stable_pool.live(), self.item_pool.live())
    }
}
