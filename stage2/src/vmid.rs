//! VMIDs as a cache: a generation allocator with rollover, after the design of Linux's arm64
//! KVM VMID allocator (itself after the arm64 ASID allocator).
//!
//! A VM holds a VMID only while it runs: one that never runs (a snapshot) holds none, and a VM
//! that stopped running keeps its number only until the numbers run out. Each VM has a [`Vmid`],
//! one 64-bit word holding `generation << 16 | number`. A VMID is *current* when its generation
//! is the allocator's. When a vCPU is loaded on a CPU, [`VmidAllocator::load`] revalidates the
//! VM's VMID:
//!
//! - **fast path**: the VMID is current and no rollover raced with us: one compare-and-swap of
//!   this CPU's *active* word, no lock;
//! - **slow path** (under the allocator's spin lock): give the VM a current VMID, keeping its old
//!   number when no other VM took it in this generation; when every number is taken,
//!   **roll over**: bump the generation, empty the bitmap except the numbers the CPUs were
//!   running (*reserved*, so a vCPU running across a rollover keeps a valid VMID without being
//!   reloaded), and invalidate every stage-2 TLB entry on every CPU before any number is handed
//!   out again.
//!
//! # The rules the hypervisor relies on
//!
//! 1. Two VMs loaded at the same time (between [`VmidAllocator::load`] and
//!    [`VmidAllocator::put`]) never have the same number, whatever happened in between.
//! 2. A number taken from one VM and given to another was first invalidated on all CPUs (the
//!    rollover's [`TlbMaintenance::invalidate_all`] runs, complete, before it is handed out).
//! 3. A VM's number changes only while none of its vCPUs is loaded. A VM's *number* (read with
//!    [`Vmid::number`]) is therefore what TLB invalidation for that VM must use, whatever its
//!    generation: a VM running across a rollover keeps a stale-generation word until its next
//!    load but still runs, and caches entries, under that number. Invalidating a number that
//!    meanwhile went to another VM only costs that VM some refills. A VM whose number is 0 never
//!    ran, and has no TLB entries.
//!
//! The CPU count is a const parameter (the per-CPU words are arrays); the VMID width (8 or 16
//! bits) is chosen at run time, as the hypervisor reads it from `ID_AA64MMFR1_EL1`.

use crate::config::VmidBits;
use crate::tlb::TlbMaintenance;
use core::ops::DerefMut;
#[cfg(not(loom))]
use core::sync::atomic::AtomicU64;
use core::sync::atomic::Ordering;
#[cfg(loom)]
use loom::sync::atomic::AtomicU64;

/// The allocator's lock: a spin lock in the hypervisor, loom's mutex when loom explores the
/// interleavings of `load`, `put` and rollover (`--cfg loom`, tests/vmid_loom.rs).
struct Lock<T>(
    #[cfg(not(loom))] spin::Mutex<T>,
    #[cfg(loom)] loom::sync::Mutex<T>,
);

impl<T> Lock<T> {
    fn new(value: T) -> Self {
        #[cfg(not(loom))]
        return Lock(spin::Mutex::new(value));
        #[cfg(loom)]
        return Lock(loom::sync::Mutex::new(value));
    }

    fn lock(&self) -> impl DerefMut<Target = T> + '_ {
        #[cfg(not(loom))]
        return self.0.lock();
        #[cfg(loom)]
        return self.0.lock().unwrap();
    }
}

/// The number sits in the low 16 bits whatever the width, the generation above it.
const GEN_SHIFT: u32 = 16;
const NUMBER_MASK: u64 = (1 << GEN_SHIFT) - 1;
/// The first generation (0 means "never had a VMID").
const GEN_ONE: u64 = 1 << GEN_SHIFT;
/// A CPU's active word while no vCPU is loaded there: not 0 (0 is what a rollover leaves, which
/// sends the next load to the slow path) and number 0 (which is never given out, so a rollover
/// reserves nothing for it).
const INACTIVE: u64 = GEN_ONE;
/// Bitmap words for 16-bit VMIDs.
const MAP_WORDS: usize = (1 << 16) / 64;

fn number(id: u64) -> u16 {
    (id & NUMBER_MASK) as u16
}

/// A VM's VMID: `generation << 16 | number`, 0 until the VM first runs.
#[derive(Debug)]
pub struct Vmid(AtomicU64);

impl Default for Vmid {
    fn default() -> Self {
        Vmid::new()
    }
}

impl Vmid {
    /// No VMID yet.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Vmid(AtomicU64::new(0))
    }

    /// No VMID yet (loom's atomics have no `const` constructor).
    #[cfg(loom)]
    pub fn new() -> Self {
        Vmid(AtomicU64::new(0))
    }

    /// The number the VM runs (or last ran) under, 0 if it never ran. Whatever its generation,
    /// this is the number TLB invalidation for the VM must name (rule 3 of the module docs).
    pub fn number(&self) -> u16 {
        number(self.0.load(Ordering::Acquire))
    }

    /// The raw word (generation and number), for tests and diagnostics.
    pub fn raw(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// State changed only under the lock.
struct Locked<const CPUS: usize> {
    /// Numbers taken in the current generation (bit 0, never given out, always set).
    map: [u64; MAP_WORDS],
    /// Per CPU: the VMID word it was running at the last rollover, kept for it across rollovers
    /// until that CPU loads again.
    reserved: [u64; CPUS],
    /// Where the next search for a free number starts.
    next: u16,
}

impl<const CPUS: usize> Locked<CPUS> {
    fn test_and_set(&mut self, n: u16) -> bool {
        let (w, b) = (n as usize / 64, n % 64);
        let was = self.map[w] & (1 << b) != 0;
        self.map[w] |= 1 << b;
        was
    }

    /// The first free number in `from..=max`.
    fn find_free(&self, from: u16, max: u16) -> Option<u16> {
        let mut n = from as usize;
        while n <= max as usize {
            let word = self.map[n / 64] | ((1u64 << (n % 64)) - 1);
            if word != u64::MAX {
                let free = n / 64 * 64 + word.trailing_ones() as usize;
                return (free <= max as usize).then_some(free as u16);
            }
            n = (n / 64 + 1) * 64;
        }
        None
    }

    /// If some CPU reserved `old` at a rollover, moves that reservation to `new` (the same number
    /// in the current generation) and says so.
    fn update_reserved(&mut self, old: u64, new: u64) -> bool {
        let mut hit = false;
        for r in self.reserved.iter_mut().filter(|r| **r == old) {
            *r = new;
            hit = true;
        }
        hit
    }
}

/// The VMID allocator for `CPUS` physical CPUs (indices `0..CPUS`).
pub struct VmidAllocator<const CPUS: usize> {
    max: u16,
    /// The current generation, already shifted (`generation << 16`).
    generation: AtomicU64,
    /// Per CPU: the VMID word of the VM loaded there, [`INACTIVE`], or 0 after a rollover.
    active: [AtomicU64; CPUS],
    locked: Lock<Locked<CPUS>>,
    rollovers: AtomicU64,
}

impl<const CPUS: usize> VmidAllocator<CPUS> {
    /// An allocator for VMIDs of `bits`; numbers 1..=max are given out (0 is the hypervisor's
    /// "no VM" VMID).
    pub fn new(bits: VmidBits) -> Self {
        let max = match bits {
            VmidBits::Eight => 0xff,
            VmidBits::Sixteen => 0xffff,
        };
        // Each CPU may reserve a number across a rollover; at least one must stay free.
        assert!(CPUS < max as usize, "fewer VMIDs than CPUs");
        let mut map = [0; MAP_WORDS];
        map[0] = 1;
        VmidAllocator {
            max,
            generation: AtomicU64::new(GEN_ONE),
            active: core::array::from_fn(|_| AtomicU64::new(INACTIVE)),
            locked: Lock::new(Locked {
                map,
                reserved: [0; CPUS],
                next: 1,
            }),
            rollovers: AtomicU64::new(0),
        }
    }

    /// The largest number given out.
    pub fn max(&self) -> u16 {
        self.max
    }

    /// Rollovers so far.
    pub fn rollovers(&self) -> u64 {
        self.rollovers.load(Ordering::Relaxed)
    }

    /// The current generation (1 before the first rollover).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire) >> GEN_SHIFT
    }

    fn is_current(&self, id: u64) -> bool {
        id != 0 && (id ^ self.generation.load(Ordering::Acquire)) >> GEN_SHIFT == 0
    }

    /// A vCPU of the VM owning `vm` is being loaded on `cpu`: returns the number to put in
    /// VTTBR_EL2 for as long as it stays loaded (until [`put`](Self::put) on this CPU). The
    /// caller must not be preempted or interrupted by another `load`/`put` on the same `cpu`
    /// between this call and running the guest. `tlb` is used on rollover.
    pub fn load(&self, vm: &Vmid, cpu: usize, tlb: &dyn TlbMaintenance) -> u16 {
        let id = vm.0.load(Ordering::Acquire);
        let old_active = self.active[cpu].load(Ordering::Acquire);
        // A rollover swaps every active word to 0 after bumping the generation: either that swap
        // came first and the exchange fails, or the exchange came first and the rollover sees
        // (and reserves) this VM's number. Either way no rollover slips between check and use.
        if old_active != 0
            && self.is_current(id)
            && self.active[cpu]
                .compare_exchange(old_active, id, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return number(id);
        }
        let mut locked = self.locked.lock();
        let mut id = vm.0.load(Ordering::Acquire);
        if !self.is_current(id) {
            id = self.new_vmid(&mut locked, id, tlb);
            vm.0.store(id, Ordering::Release);
        }
        self.active[cpu].store(id, Ordering::Release);
        number(id)
    }

    /// The vCPU loaded on `cpu` was put: its VM's number need not survive a rollover for this
    /// CPU's sake (a VM not running anywhere need not keep its number).
    pub fn put(&self, cpu: usize) {
        self.active[cpu].store(INACTIVE, Ordering::Release);
    }

    /// A current VMID for a VM whose word is `old` (stale or 0). Lock held.
    fn new_vmid(&self, locked: &mut Locked<CPUS>, old: u64, tlb: &dyn TlbMaintenance) -> u64 {
        let generation = self.generation.load(Ordering::Acquire);
        let n = number(old);
        if n != 0 {
            let renewed = generation | n as u64;
            // Reserved at a rollover because a vCPU of this VM was running: it keeps its number
            // (that vCPU may still be running under it).
            if locked.update_reserved(old, renewed) {
                return renewed;
            }
            // Not taken by another VM in this generation: keep it, no TLB entry needs to go.
            if !locked.test_and_set(n) {
                return renewed;
            }
        }
        let free = locked
            .find_free(locked.next, self.max)
            .or_else(|| locked.find_free(1, self.max));
        let (generation, n) = match free {
            Some(n) => (generation, n),
            None => {
                let generation = self.rollover(locked, tlb);
                let n = locked.find_free(1, self.max);
                (generation, n.expect("a free VMID after rollover"))
            }
        };
        locked.test_and_set(n);
        locked.next = n;
        generation | n as u64
    }

    /// Starts a new generation: only the numbers CPUs are running (or reserved at the previous
    /// rollover and have not reloaded since) stay taken, and every TLB entry goes. Returns the
    /// new generation. Lock held.
    fn rollover(&self, locked: &mut Locked<CPUS>, tlb: &dyn TlbMaintenance) -> u64 {
        // A fast path racing this on another CPU is settled by that CPU's active word alone, not
        // by the order of this bump and the swaps: its exchange either came before the swap (the
        // swap sees, and reserves, its VM's number) or fails on the 0 the swap left. (loom:
        // tests/vmid_loom.rs; bumping after the swaps passes it too.)
        let generation = self.generation.fetch_add(GEN_ONE, Ordering::AcqRel) + GEN_ONE;
        locked.map = [0; MAP_WORDS];
        locked.map[0] = 1;
        for (active, reserved) in self.active.iter().zip(locked.reserved.iter_mut()) {
            let mut id = active.swap(0, Ordering::AcqRel);
            // 0: this CPU has not loaded since the last rollover, still running what it was.
            if id == 0 {
                id = *reserved;
            }
            let n = number(id);
            locked.map[n as usize / 64] |= 1 << (n % 64);
            *reserved = id;
        }
        self.rollovers.fetch_add(1, Ordering::Relaxed);
        // Complete on all CPUs before this returns, so before any number is handed out again:
        // a reused number finds no entry of its previous VM anywhere.
        tlb.invalidate_all();
        generation
    }
}
