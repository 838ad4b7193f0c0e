//! The VMID generation allocator (`stage2::vmid`): unit tests, a property test against a model
//! of its rules, and a threaded test of rollovers while vCPUs stay loaded on other CPUs.

use proptest::prelude::*;
use stage2::{TlbMaintenance, Vmid, VmidAllocator, VmidBits, Vttbr};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};

/// Per-CPU TLBs as "which VM cached entries under number n": `invalidate_all` empties them all
/// (a broadcast), and a CPU running VM `vm` under `n` must find no other VM's entry for `n`.
struct ModelTlb {
    cpus: Vec<Mutex<HashMap<u16, usize>>>,
    flushes: AtomicU64,
}

impl ModelTlb {
    fn new(cpus: usize) -> Self {
        ModelTlb {
            cpus: (0..cpus).map(|_| Mutex::new(HashMap::new())).collect(),
            flushes: AtomicU64::new(0),
        }
    }

    /// CPU `cpu` runs `vm` under `n` and caches an entry. Returns the other VM whose stale entry
    /// it would have hit, if any.
    fn access(&self, cpu: usize, n: u16, vm: usize) -> Option<usize> {
        let mut tlb = self.cpus[cpu].lock().unwrap();
        match tlb.insert(n, vm) {
            Some(other) if other != vm => Some(other),
            _ => None,
        }
    }
}

impl TlbMaintenance for ModelTlb {
    fn invalidate_ipa(&self, _: Vttbr, _: u64, _: u8) {
        unreachable!("the allocator invalidates only everything")
    }
    fn invalidate_vmid(&self, _: Vttbr) {
        unreachable!("the allocator invalidates only everything")
    }
    fn invalidate_icache(&self, _: u64, _: u64) {
        unreachable!("the allocator invalidates only everything")
    }
    fn clean_dcache_poc(&self, _: u64, _: u64) {
        unreachable!("the allocator invalidates only everything")
    }
    fn invalidate_all(&self) {
        for cpu in &self.cpus {
            cpu.lock().unwrap().clear();
        }
        self.flushes.fetch_add(1, Ordering::SeqCst);
    }
}

fn vms(n: usize) -> Vec<Vmid> {
    (0..n).map(|_| Vmid::new()).collect()
}

#[test]
fn a_vm_that_never_ran_has_no_vmid() {
    let vm = Vmid::new();
    assert_eq!((vm.number(), vm.raw()), (0, 0));
}

#[test]
fn numbers_are_distinct_and_stable_within_a_generation() {
    let tlb = ModelTlb::new(2);
    let a: VmidAllocator<2> = VmidAllocator::new(VmidBits::Eight);
    let v = vms(3);
    let n: Vec<u16> = v.iter().map(|vm| a.load(vm, 0, &tlb)).collect();
    assert_eq!(n, [1, 2, 3]);
    a.put(0);
    // Loading again, on any CPU, keeps the number: no lock, no flush.
    assert_eq!(a.load(&v[1], 1, &tlb), 2);
    assert_eq!(a.load(&v[0], 0, &tlb), 1);
    assert_eq!((a.rollovers(), tlb.flushes.load(Ordering::SeqCst)), (0, 0));
    assert_eq!(v[2].number(), 3);
}

/// 8-bit: numbers 1..=255 go out without a rollover; the 256th VM rolls over, with one flush.
#[test]
fn rollover_when_numbers_run_out_8bit() {
    let tlb = ModelTlb::new(2);
    let a: VmidAllocator<2> = VmidAllocator::new(VmidBits::Eight);
    let v = vms(256);
    for (i, vm) in v.iter().take(255).enumerate() {
        assert_eq!(a.load(vm, 0, &tlb) as usize, i + 1);
        a.put(0);
    }
    assert_eq!((a.rollovers(), a.generation()), (0, 1));
    let n = a.load(&v[255], 0, &tlb);
    assert_eq!((a.rollovers(), a.generation()), (1, 2));
    assert_eq!(tlb.flushes.load(Ordering::SeqCst), 1);
    assert!((1..=255).contains(&n));
    a.put(0);
    // VM 0 lost its generation; its number 1 was taken by VM 255 (the search starts again at 1),
    // so it gets another one.
    assert_eq!(n, 1);
    let n0 = a.load(&v[0], 0, &tlb);
    assert_ne!(n0, 1);
    a.put(0);
    // VM 7's number is still free in the new generation: it keeps it.
    assert_eq!(a.load(&v[7], 1, &tlb), 8);
}

#[test]
fn rollover_when_numbers_run_out_16bit() {
    let tlb = ModelTlb::new(1);
    let a: VmidAllocator<1> = VmidAllocator::new(VmidBits::Sixteen);
    assert_eq!(a.max(), 0xffff);
    let v = vms(0x10000);
    for (i, vm) in v.iter().take(0xffff).enumerate() {
        assert_eq!(a.load(vm, 0, &tlb) as usize, i + 1);
    }
    assert_eq!(a.rollovers(), 0);
    // VM 0xfffe is loaded on CPU 0 at the rollover: it is reserved, the new VM gets 1.
    assert_eq!(a.load(&v[0xffff], 0, &tlb), 1);
    assert_eq!(a.rollovers(), 1);
}

/// A vCPU loaded on CPU 1 across two rollovers (never reloaded) keeps its number reserved: no
/// other VM gets it, and its VM reloads elsewhere under the same number.
#[test]
fn a_loaded_vm_keeps_its_number_across_rollovers() {
    let tlb = ModelTlb::new(3);
    let a: VmidAllocator<3> = VmidAllocator::new(VmidBits::Eight);
    let held = Vmid::new();
    let v = vms(600);
    a.load(&v[0], 0, &tlb);
    let n = a.load(&held, 1, &tlb);
    assert_eq!(n, 2);
    for vm in &v[1..] {
        assert_ne!(
            a.load(vm, 0, &tlb),
            n,
            "a reserved number went to another VM"
        );
        a.put(0);
    }
    assert_eq!(a.rollovers(), 2);
    assert_eq!(a.load(&held, 2, &tlb), n);
}

/// A VM put before the rollover is not reserved: its number may go to another VM.
#[test]
fn a_put_vm_is_not_reserved() {
    let tlb = ModelTlb::new(2);
    let a: VmidAllocator<2> = VmidAllocator::new(VmidBits::Eight);
    let v = vms(256);
    for vm in &v {
        a.load(vm, 1, &tlb);
        a.put(1);
    }
    // After the rollover the search started at 1 again: VM 0's number went to VM 255.
    assert_eq!((a.rollovers(), v[255].number()), (1, 1));
}

#[derive(Clone, Debug)]
enum Op {
    Load { vm: usize, cpu: usize },
    Put { cpu: usize },
}

const CPUS: usize = 4;

fn op(vms: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..vms, 0..CPUS).prop_map(|(vm, cpu)| Op::Load { vm, cpu }),
        1 => (0..CPUS).prop_map(|cpu| Op::Put { cpu }),
    ]
}

/// What the rules say, kept from the allocator's answers alone.
#[derive(Default)]
struct Model {
    /// Rollovers seen.
    generation: u64,
    /// Per VM: the generation and number it was last given.
    held: HashMap<usize, (u64, u16)>,
    /// Per CPU: the VM loaded there and its number.
    loaded: [Option<(usize, u16)>; CPUS],
    /// Numbers taken in the current generation, and by which VM.
    taken: HashMap<u16, usize>,
}

impl Model {
    /// Checks one `load` that returned `n` (after `rolled` rollovers, 0 or 1, during it).
    fn check_load(&mut self, vm: usize, cpu: usize, n: u16, rolled: u64) -> Result<(), String> {
        if !(1..=255).contains(&n) || rolled > 1 {
            return Err(format!("number {n}, {rolled} rollovers in one load"));
        }
        let elsewhere = self.loaded.iter().flatten().find(|(v, _)| *v == vm);
        if let Some(&(_, m)) = elsewhere {
            if n != m || rolled != 0 {
                return Err(format!(
                    "vm {vm} loaded elsewhere as {m}, now {n} ({rolled} rollovers)"
                ));
            }
        }
        if rolled == 1 {
            // No rollover while a number was free; the loaded VMs are reserved.
            if self.taken.len() != 255 {
                return Err(format!("rollover with {} numbers taken", self.taken.len()));
            }
            self.generation += 1;
            self.taken = self.loaded.iter().flatten().map(|&(v, m)| (m, v)).collect();
        }
        if let Some(&(g, m)) = self.held.get(&vm) {
            if g == self.generation && n != m {
                return Err(format!("vm {vm} renumbered {m} -> {n} within a generation"));
            }
            if rolled == 0 && !self.taken.contains_key(&m) && n != m {
                return Err(format!("vm {vm} lost its free number {m} for {n}"));
            }
        }
        if let Some(&other) = self.taken.get(&n).filter(|&&o| o != vm) {
            return Err(format!("vm {vm} got {n}, vm {other}'s in this generation"));
        }
        self.taken.insert(n, vm);
        self.held.insert(vm, (self.generation, n));
        self.loaded[cpu] = Some((vm, n));
        Ok(())
    }
}

fn run_ops(ops: &[Op]) -> Result<u64, String> {
    let tlb = ModelTlb::new(CPUS);
    let a: VmidAllocator<CPUS> = VmidAllocator::new(VmidBits::Eight);
    let v = vms(400);
    let mut model = Model::default();
    for op in ops {
        match *op {
            Op::Put { cpu } => {
                a.put(cpu);
                model.loaded[cpu] = None;
            }
            Op::Load { vm, cpu } => {
                // A CPU runs one vCPU at a time: the previous one is put first.
                a.put(cpu);
                model.loaded[cpu] = None;
                let before = a.rollovers();
                let n = a.load(&v[vm], cpu, &tlb);
                let rolled = a.rollovers() - before;
                model.check_load(vm, cpu, n, rolled)?;
                if a.rollovers() != tlb.flushes.load(Ordering::SeqCst) {
                    return Err("a rollover without exactly one invalidate_all".into());
                }
                if let Some(other) = tlb.access(cpu, n, vm) {
                    return Err(format!("vm {vm} hit vm {other}'s stale entry for {n}"));
                }
                // Every loaded vCPU keeps running, and caching, under its number.
                for (c, l) in model.loaded.iter().enumerate() {
                    if let Some((lv, ln)) = *l {
                        if let Some(other) = tlb.access(c, ln, lv) {
                            return Err(format!("cpu {c}: vm {lv} hit vm {other}'s entry"));
                        }
                    }
                }
            }
        }
    }
    Ok(a.rollovers())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random loads and puts of 400 VMs on 4 CPUs with 8-bit VMIDs follow the model's rules.
    #[test]
    fn allocator_follows_the_model(
        ops in prop::collection::vec(op(400), 1..2000),
    ) {
        run_ops(&ops).map_err(TestCaseError::fail)?;
    }
}

/// The proptest above is not vacuous: a long random run rolls over many times.
#[test]
fn model_run_rolls_over() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let ops: Vec<Op> = (0..20_000)
        .map(|_| {
            let r = xorshift(&mut seed);
            let (vm, cpu) = ((r >> 8) as usize % 400, (r >> 40) as usize % CPUS);
            if r.is_multiple_of(5) {
                Op::Put { cpu }
            } else {
                Op::Load { vm, cpu }
            }
        })
        .collect();
    let rollovers = run_ops(&ops).unwrap();
    assert!(rollovers >= 20, "only {rollovers} rollovers");
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Which VM each number is loaded for, and on how many CPUs.
type Registry = Mutex<HashMap<u16, (usize, usize)>>;

fn register(reg: &Registry, n: u16, vm: usize) {
    let mut reg = reg.lock().unwrap();
    let e = reg.entry(n).or_insert((vm, 0));
    assert_eq!(e.0, vm, "vms {} and {vm} loaded at once under {n}", e.0);
    e.1 += 1;
}

fn unregister(reg: &Registry, n: u16) {
    let mut reg = reg.lock().unwrap();
    let e = reg.get_mut(&n).unwrap();
    e.1 -= 1;
    if e.1 == 0 {
        reg.remove(&n);
    }
}

/// 4 "CPU" threads load 300 VMs (8-bit VMIDs) at random; CPU 3 keeps one VM loaded for
/// thousands of accesses at a time, across rollovers, while CPUs 0-2 load and put. Checks: no
/// two VMs loaded at the same time share a number, and no CPU ever runs a VM under a number
/// while it caches another VM's entry for it (each reuse was flushed first).
#[test]
fn rollover_while_vcpus_stay_loaded_elsewhere() {
    const THREADS: usize = 4;
    const HOLDER: usize = 3;
    let tlb = Arc::new(ModelTlb::new(THREADS));
    let alloc: Arc<VmidAllocator<THREADS>> = Arc::new(VmidAllocator::new(VmidBits::Eight));
    let v: Arc<Vec<Vmid>> = Arc::new(vms(300));
    let reg: Arc<Registry> = Arc::default();
    let start = Arc::new(Barrier::new(THREADS));
    let done = Arc::new(AtomicBool::new(false));
    // Rollovers that happened while CPU 3 held a VM loaded.
    let held_across = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..THREADS)
        .map(|cpu| {
            let (tlb, alloc, v, reg) = (tlb.clone(), alloc.clone(), v.clone(), reg.clone());
            let (start, done, held_across) = (start.clone(), done.clone(), held_across.clone());
            std::thread::spawn(move || {
                let mut seed = 0x2545_f491_4f6c_dd1d ^ ((cpu as u64 + 1) * 0x1000_0001);
                let mut loads = 0u64;
                start.wait();
                while if cpu == HOLDER {
                    loads < 20
                } else {
                    !done.load(Ordering::Relaxed)
                } {
                    let vm = xorshift(&mut seed) as usize % v.len();
                    let rollovers = alloc.rollovers();
                    let n = alloc.load(&v[vm], cpu, &*tlb);
                    register(&reg, n, vm);
                    let accesses = if cpu == HOLDER {
                        300
                    } else {
                        1 + n as usize % 4
                    };
                    for _ in 0..accesses {
                        if let Some(other) = tlb.access(cpu, n, vm) {
                            panic!("cpu {cpu}: vm {vm} under {n} hit vm {other}'s stale entry");
                        }
                        if cpu == HOLDER {
                            std::thread::yield_now();
                        }
                    }
                    unregister(&reg, n);
                    alloc.put(cpu);
                    if cpu == HOLDER {
                        held_across.fetch_add(alloc.rollovers() - rollovers, Ordering::Relaxed);
                    }
                    loads += 1;
                }
                if cpu == HOLDER {
                    done.store(true, Ordering::Relaxed);
                }
                loads
            })
        })
        .collect();
    let loads: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let (rollovers, across) = (alloc.rollovers(), held_across.load(Ordering::Relaxed));
    eprintln!("{loads} loads, {rollovers} rollovers, {across} while CPU 3 held a VM");
    assert!(
        across >= 20,
        "only {across} rollovers while a VM stayed loaded"
    );
    assert_eq!(rollovers, tlb.flushes.load(Ordering::SeqCst));
}
