//! The stress test's bookkeeping: a VM slot (the VM, its vCPU count, run gate, snapshot and
//! the exact contents its vCPUs wrote), a seeded generator and the counters it reports.

use rmap::host::{HostVm, HostWorld};
use rmap::{Error, Ipa};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// xorshift64*, seeded through splitmix64 (any seed, 0 included, gives a good sequence).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A page value naming the lineage (a VM and its clones) and page that wrote it, so a read
/// that finds another VM's or another page's value is caught; never 0.
pub fn tagged(lineage: u64, ipa: Ipa, n: u64) -> u64 {
    lineage << 56 | (ipa.page_index() & 0xff_ffff) << 32 | (n & 0xffff_ffff) | 1
}

/// What happened, for the report (and the run's own sanity asserts).
#[derive(Default, Debug)]
pub struct Counters {
    pub overlapping: AtomicU64,
    pub releases: AtomicU64,
    pub blocks: AtomicU64,
    pub dead_vcpu_ops: AtomicU64,
    pub snapshots: AtomicU64,
    /// Guest operations and snapshots refused: no frame or table page, a full pool.
    pub memory_failures: AtomicU64,
    pub pool_failures: AtomicU64,
    pub restores: AtomicU64,
    pub restore_failures: AtomicU64,
    pub destroys: AtomicU64,
    pub moved: AtomicU64,
    pub mover_failures: AtomicU64,
    /// Same-page merges made, and refused because the pages differed.
    pub merged: AtomicU64,
    pub merge_differ: AtomicU64,
}

impl Counters {
    /// Counts an operation that ran out of memory, table pages or pool slots (the only
    /// failures allowed); panics on any other error.
    pub fn failed(&self, e: Error, what: &str) {
        let counter = match e {
            Error::OutOfFrames => &self.memory_failures,
            Error::OutOfAnonVmas | Error::OutOfChains => &self.pool_failures,
            e => panic!("{what} failed: {e:?}"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A fork of the slot's VM that never runs, and the exact owned contents it was taken with.
pub struct Snapshot {
    pub vm: Arc<HostVm>,
    pub model: BTreeMap<Ipa, u64>,
}

/// A running VM and everything its threads share.
pub struct Slot {
    pub vm: Arc<HostVm>,
    /// The tag this VM's writes carry, and every tag its pages may hold (a clone's parent's).
    pub lineage: u64,
    lineages: Vec<u64>,
    pub vcpus: usize,
    /// vCPUs hold it for read per operation; a snapshot or restore for write (quiesced).
    pub gate: RwLock<()>,
    /// Exact value of each owned page (absent: 0).
    pub model: Mutex<BTreeMap<Ipa, u64>>,
    pub snapshot: Mutex<Option<Snapshot>>,
    /// A restore ran out of table pages: the VM must not run until it is finished.
    pub pending_restore: AtomicBool,
    /// Destroyed this round (under its vCPUs).
    pub dead: AtomicBool,
    /// vCPU operations begun and vCPU threads finished this round.
    pub ops: AtomicU64,
    pub finished: AtomicUsize,
    /// vCPUs inside an operation now.
    pub active: AtomicUsize,
}

impl Slot {
    pub fn new(vm: Arc<HostVm>, lineage: u64, vcpus: usize) -> Self {
        Slot {
            vm,
            lineage,
            lineages: vec![lineage],
            vcpus,
            gate: RwLock::new(()),
            model: Mutex::default(),
            snapshot: Mutex::new(None),
            pending_restore: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            ops: AtomicU64::new(0),
            finished: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
        }
    }

    /// A clone of this slot's VM (`vm`, forked from it) as a new slot that inherits its
    /// contents and accepts its tags.
    pub fn clone_into(&self, vm: Arc<HostVm>, lineage: u64, vcpus: usize) -> Slot {
        let slot = Slot::new(vm, lineage, vcpus);
        *slot.model.lock().unwrap() = self.model.lock().unwrap().clone();
        Slot {
            lineages: [&self.lineages[..], &[lineage]].concat(),
            ..slot
        }
    }

    pub fn set(&self, ipa: Ipa, value: u64) {
        let mut model = self.model.lock().unwrap();
        if value == 0 {
            model.remove(&ipa);
        } else {
            model.insert(ipa, value);
        }
    }

    pub fn get(&self, ipa: Ipa) -> u64 {
        self.model.lock().unwrap().get(&ipa).copied().unwrap_or(0)
    }

    /// A shared page holds 0 or a value this VM's lineage wrote to this very page.
    pub fn assert_lineage(&self, ipa: Ipa, got: u64) {
        let page = got >> 32 & 0xff_ffff;
        assert!(
            got == 0
                || (self.lineages.contains(&(got >> 56)) && page == ipa.page_index() & 0xff_ffff),
            "{:?} (lineages {:?}) read {got:#x} at {ipa:#x}: another VM's or page's value",
            self.vm.id,
            self.lineages
        );
    }

    /// At a quiescent point: owned pages hold exactly what was last written (a restore's
    /// snapshot values, 0 after a release), shared pages a value of the lineage; the
    /// snapshot still holds what the VM held when it was taken.
    pub fn check_contents(&self, w: &HostWorld, owned: &[Ipa], shared: &[Ipa]) {
        if self.dead.load(Ordering::SeqCst) {
            return;
        }
        let m = &w.machine;
        if !self.pending_restore.load(Ordering::SeqCst) {
            for &ipa in owned {
                assert_eq!(
                    self.vm.peek(m, ipa),
                    self.get(ipa),
                    "{:?} {ipa:#x}",
                    self.vm.id
                );
            }
            shared
                .iter()
                .for_each(|&ipa| self.assert_lineage(ipa, self.vm.peek(m, ipa)));
        }
        if let Some(s) = self.snapshot.lock().unwrap().as_ref() {
            for &ipa in owned {
                let want = s.model.get(&ipa).copied().unwrap_or(0);
                assert_eq!(s.vm.peek(m, ipa), want, "snapshot {:?} {ipa:#x}", s.vm.id);
            }
            shared
                .iter()
                .for_each(|&ipa| self.assert_lineage(ipa, s.vm.peek(m, ipa)));
        }
    }

    pub fn next_round(&self) {
        self.ops.store(0, Ordering::SeqCst);
        self.finished.store(0, Ordering::SeqCst);
    }

    /// Destroys the VM (unless it already was) and its snapshot.
    pub fn destroy(self, w: &HostWorld) {
        if let Some(s) = self.snapshot.into_inner().unwrap() {
            w.destroy(&s.vm);
        }
        if !self.dead.load(Ordering::SeqCst) {
            w.destroy(&self.vm);
        }
    }
}
