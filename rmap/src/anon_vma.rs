//! `AnonVma`: the object a frame's metadata points at, heading the chains of every region that
//! may map frames of that lineage. One lock per fork family, on the root (DESIGN lesson 3).
//!
//! Safe-Rust layout of Linux's "everything in the family is protected by the root's rwsem":
//! the root slot's lock guards a [`Family`] holding every member's [`Node`] (its chain index and
//! its `num_children` / `num_active_regions` counters), keyed by the member's handle. Locking the
//! root is therefore the only way to reach any member's chains. The per-slot fields that a
//! lockless walker reads before it holds any lock (`root`, `parent`) are atomics.

use crate::chain::ChainHandle;
use crate::interval::IntervalIndex;
use crate::lock::{Level, OrderedReadGuard, OrderedRwLock, OrderedWriteGuard};
use crate::pool::Handle;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::{Error, Rmap};
use alloc::collections::BTreeMap;

/// A generation-checked handle to an [`AnonVma`].
pub type AnonHandle = Handle<AnonVma>;

/// One anon_vma slot. Lives forever in the type-stable pool; re-initialised on allocation.
pub struct AnonVma {
    root: AtomicU64,
    parent: AtomicU64,
    family: OrderedRwLock<Family>,
}

impl Default for AnonVma {
    fn default() -> Self {
        AnonVma {
            root: AtomicU64::new(0),
            parent: AtomicU64::new(0),
            family: OrderedRwLock::new(Level::ANON_VMA, "anon_vma.root", Family::default()),
        }
    }
}

impl AnonVma {
    /// The family's root (itself for a root). Stable while the caller holds a reference.
    pub fn root(&self) -> AnonHandle {
        AnonHandle::from_raw(self.root.load(Ordering::Acquire))
    }

    /// The anon_vma this one was forked from (itself for a root).
    pub fn parent(&self) -> AnonHandle {
        AnonHandle::from_raw(self.parent.load(Ordering::Acquire))
    }

    /// The family lock. Only meaningful on a root.
    pub(crate) fn family(&self) -> &OrderedRwLock<Family> {
        &self.family
    }
}

/// Per-member state, protected by the root's lock.
#[derive(Default, Debug)]
pub struct Node {
    /// Chains of the regions that may map this anon_vma's frames, by page-offset range.
    pub(crate) chains: IntervalIndex<ChainHandle>,
    /// Anon_vmas forked directly from this one that still have chains (CVE-2022-42703 fix:
    /// counted exactly, not folded into one "degree").
    pub num_children: u32,
    /// Regions whose own anon_vma this is.
    pub num_active_regions: u32,
}

impl Node {
    /// Number of chains linked here.
    pub fn chain_count(&self) -> usize {
        self.chains.len()
    }
}

/// Everything a root's lock protects: the nodes of all members of the fork family.
#[derive(Default, Debug)]
pub struct Family {
    nodes: BTreeMap<u64, Node>,
}

impl Family {
    /// A member's node, if it has one (members with no chains left have none).
    pub fn node(&self, anon_vma: AnonHandle) -> Option<&Node> {
        self.nodes.get(&anon_vma.raw())
    }

    pub(crate) fn node_mut(&mut self, anon_vma: AnonHandle) -> &mut Node {
        self.nodes
            .get_mut(&anon_vma.raw())
            .unwrap_or_else(|| panic!("anon_vma {anon_vma:?} has no node in its family"))
    }

    pub(crate) fn try_node_mut(&mut self, anon_vma: AnonHandle) -> Option<&mut Node> {
        self.nodes.get_mut(&anon_vma.raw())
    }

    pub(crate) fn insert(&mut self, anon_vma: AnonHandle) {
        let old = self.nodes.insert(anon_vma.raw(), Node::default());
        debug_assert!(old.is_none());
    }

    pub(crate) fn remove(&mut self, anon_vma: AnonHandle) -> Option<Node> {
        self.nodes.remove(&anon_vma.raw())
    }

    /// Every member that has a node, with its node (for inspection and host checks).
    pub fn iter(&self) -> impl Iterator<Item = (AnonHandle, &Node)> {
        self.nodes
            .iter()
            .map(|(&raw, node)| (AnonHandle::from_raw(raw), node))
    }

    /// Members that still have a node.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no member has a node (a root about to be freed).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

impl Rmap {
    /// The slot behind a handle (stale or not).
    pub(crate) fn anon(&self, handle: AnonHandle) -> &AnonVma {
        &self.anon_pool.slot(handle).value
    }

    /// Allocates an anon_vma: a new root, or a child of `parent` (which then pins the root, as
    /// Linux's children hold a reference on their root). Not yet in any family; the caller
    /// inserts it under the root's write lock before publishing it anywhere (lesson 1).
    pub(crate) fn alloc_anon_vma(&self, parent: Option<AnonHandle>) -> Result<AnonHandle, Error> {
        let root = parent.map(|p| self.anon(p).root());
        if let Some(root) = root {
            self.anon_pool.get_ref(root);
        }
        let made = self.anon_pool.alloc(|me, av| {
            av.root.store(root.unwrap_or(me).raw(), Ordering::Relaxed);
            av.parent
                .store(parent.unwrap_or(me).raw(), Ordering::Relaxed);
        });
        made.map_err(|_| {
            if let Some(root) = root {
                self.put_anon_vma(root);
            }
            Error::OutOfAnonVmas
        })
    }

    /// Write-locks the family `member` belongs to (caller holds a reference or the region lock
    /// of a region linked to it, so `member` and its root are live).
    pub(crate) fn lock_family_write(&self, member: AnonHandle) -> OrderedWriteGuard<'_, Family> {
        let root = self.anon(member).root();
        self.anon(root).family().write()
    }

    /// Read-locks the family `member` belongs to (same precondition).
    pub fn lock_family_read(&self, member: AnonHandle) -> OrderedReadGuard<'_, Family> {
        let root = self.anon(member).root();
        self.anon(root).family().read()
    }

    /// Drops a reference; the last one frees the slot and then drops the root's reference.
    pub(crate) fn put_anon_vma(&self, handle: AnonHandle) {
        let mut next = Some(handle);
        while let Some(handle) = next.take() {
            if self.anon_pool.put(handle) {
                next = self.free_anon_vma(handle);
            }
        }
    }

    /// Returns the slot to the pool; the root to put next, if any.
    pub(crate) fn free_anon_vma(&self, handle: AnonHandle) -> Option<AnonHandle> {
        let root = self.anon(handle).root();
        debug_assert!(
            root != handle || self.anon(handle).family().read().is_empty(),
            "root freed with members left"
        );
        self.anon_pool.recycle(handle);
        (root != handle).then_some(root)
    }

    /// Live anon_vmas.
    pub fn live_anon_vmas(&self) -> usize {
        self.anon_pool.live()
    }
}
