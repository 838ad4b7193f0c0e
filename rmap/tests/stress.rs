//! Host stress: real threads faulting, forking, destroying (two "vCPU" owners of VM families),
//! migrating and reclaiming (two background threads) at once, for a bounded time; and
//! swap-ins racing MEM_RELEASE and the reuse of freed swap slots. Pages carry
//! checksums, so a torn copy or a lost write shows up on read; each owner keeps the exact
//! expected contents of its VMs. At the end every VM is destroyed and nothing may leak.
//! A third region takes 2 MiB first-touch blocks (the owners' `fault_block`), which forks
//! share as blocks and faults, migration and reclaim split; every access goes through the
//! host TLB model, whose failures `HostWorld::check` reports.

use rmap::host::{page_ipa, HostVm, HostWorld, BLOCK_PAGES};
use rmap::{Error, Skip};
use rmap::{Ipa, Pfn};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const RAM: Ipa = Ipa::new(0x4000_0000);
/// Where a VM's 2 MiB first-touch block goes (a region of exactly one block).
const BLOCK: Ipa = RAM.offset(0x40_0000);
const REGIONS: [(Ipa, u64); 3] = [(RAM, 24), (RAM.offset(0x20_0000), 8), (BLOCK, BLOCK_PAGES)];
const RUN: Duration = Duration::from_millis(2500);

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The pages the tests touch: the first two regions and a few pages of the block region.
fn ipas() -> Vec<Ipa> {
    REGIONS[..2]
        .iter()
        .flat_map(|&(s, n)| (0..n).map(move |i| page_ipa(s, i)))
        .chain([0, 1, 100, 511].map(|i| page_ipa(BLOCK, i)))
        .collect()
}

fn owner(world: Arc<HostWorld>, stop: Arc<AtomicBool>, seed: u64, ops: Arc<AtomicU64>) {
    let mut rng = Rng(seed);
    let pages = ipas();
    let mut vms: Vec<(Arc<HostVm>, BTreeMap<Ipa, u64>)> = Vec::new();
    let (rmap, m) = (&world.rmap, &world.machine);
    while !stop.load(Ordering::Relaxed) {
        ops.fetch_add(1, Ordering::Relaxed);
        match rng.below(20) {
            0 if vms.len() < 4 => vms.push((world.create_vm(&REGIONS), BTreeMap::new())),
            1 if !vms.is_empty() && vms.len() < 4 => {
                let i = rng.below(vms.len());
                match world.fork(&vms[i].0) {
                    Ok(child) => {
                        let model = vms[i].1.clone();
                        vms.push((child, model));
                    }
                    Err(Error::OutOfFrames) => {}
                    Err(e) => panic!("fork: {e:?}"),
                }
            }
            2 if vms.len() > 1 => {
                let (vm, _) = vms.swap_remove(rng.below(vms.len()));
                world.destroy(&vm);
            }
            3..=11 if !vms.is_empty() => {
                let n = vms.len();
                let (vm, model) = &mut vms[rng.below(n)];
                let ipa = pages[rng.below(pages.len())];
                let value = rng.next();
                match vm.write(rmap, m, ipa, value) {
                    Ok(()) => {
                        model.insert(ipa, value);
                    }
                    Err(Error::OutOfFrames) => {}
                    Err(e) => panic!("write: {e:?}"),
                }
            }
            12 if !vms.is_empty() => {
                let (vm, _) = &vms[rng.below(vms.len())];
                world.fault_block(vm, BLOCK);
            }
            _ if !vms.is_empty() => {
                let (vm, model) = &vms[rng.below(vms.len())];
                let ipa = pages[rng.below(pages.len())];
                match vm.read(rmap, m, ipa) {
                    Ok(got) => assert_eq!(got, model.get(&ipa).copied().unwrap_or(0), "{ipa:#x}"),
                    Err(Error::OutOfFrames) => {}
                    Err(e) => panic!("read: {e:?}"),
                }
            }
            _ => {}
        }
    }
    finish(&world, vms);
}

/// An owner's last step: every VM reads what it last wrote, then goes.
fn finish(world: &HostWorld, vms: Vec<(Arc<HostVm>, BTreeMap<Ipa, u64>)>) {
    let (rmap, m) = (&world.rmap, &world.machine);
    for (vm, model) in &vms {
        for (&ipa, &value) in model {
            assert_eq!(vm.read(rmap, m, ipa).unwrap(), value);
        }
    }
    for (vm, _) in vms {
        world.destroy(&vm);
    }
}

fn mover(
    world: Arc<HostWorld>,
    stop: Arc<AtomicBool>,
    seed: u64,
    reclaim: bool,
    ops: Arc<AtomicU64>,
) {
    let mut rng = Rng(seed);
    let frames = world.rmap.frames();
    while !stop.load(Ordering::Relaxed) {
        if !reclaim && rng.below(4) == 0 {
            move_folio(&world, &mut rng);
            continue;
        }
        if rng.below(2) == 0 {
            batch_move(&world, &mut rng, reclaim);
            ops.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let pfn = frames.base() + rng.below(frames.len()) as u64;
        if !frames.frame(pfn).is_mapped() {
            continue;
        }
        ops.fetch_add(1, Ordering::Relaxed);
        let result = if reclaim {
            world.rmap.referenced(pfn, &world.vms);
            world
                .rmap
                .reclaim_frame(&world.vms, &world.machine, &world.machine, pfn)
                .map(|_| ())
        } else {
            world
                .rmap
                .migrate_frame(&world.vms, &world.machine, pfn)
                .map(|_| ())
        };
        match result {
            Ok(())
            | Err(Error::NotMapped | Error::Busy | Error::OutOfFrames | Error::OutOfSwap) => {}
            Err(e) => panic!("mover: {e:?}"),
        }
    }
}

/// Block migration of the folio of a random frame a block maps, racing the owners' faults
/// (splits), forks (of blocks and of the migration entries) and destroys.
fn move_folio(world: &HostWorld, rng: &mut Rng) {
    let frames = world.rmap.frames();
    let pfn = frames.base() + rng.below(frames.len()) as u64;
    if frames.entire_mapcount(pfn) == 0 {
        return;
    }
    match world.rmap.migrate_folio(&world.vms, &world.machine, pfn) {
        Ok(_) => {
            FOLIOS_MOVED.fetch_add(1, Ordering::Relaxed);
        }
        Err(Error::NotMapped | Error::Busy | Error::OutOfFrames) => {}
        Err(e) => panic!("move_folio: {e:?}"),
    }
}

/// Folios moved whole by the movers (reported by the test).
static FOLIOS_MOVED: AtomicU64 = AtomicU64::new(0);

/// The hypervisor's path: a batch of up to 64 frames from a random run of the frame table
/// (mapped or not, several anon_vmas), migrated or reclaimed with one walk per anon_vma.
fn batch_move(world: &HostWorld, rng: &mut Rng, reclaim: bool) {
    let frames = world.rmap.frames();
    let start = rng.below(frames.len());
    let len = 1 + rng.below(64);
    let batch: Vec<Pfn> = (start..(start + len).min(frames.len()))
        .map(|i| frames.base() + i as u64)
        .collect();
    let skips: Vec<Skip> = if reclaim {
        let mut out = Vec::new();
        let m = &world.machine;
        world
            .rmap
            .reclaim_frames(&world.vms, m, m, &batch, &mut out);
        out.into_iter().filter_map(Result::err).collect()
    } else {
        let mut out = Vec::new();
        world
            .rmap
            .migrate_frames(&world.vms, &world.machine, &batch, &mut out);
        out.into_iter().filter_map(Result::err).collect()
    };
    // Busy frames, and frames of a VM being destroyed meanwhile (unreachable), are expected
    // under load; a batch never fails for any other reason here (no temporary regions;
    // memory and swap are large enough).
    assert!(
        skips.iter().all(|s| matches!(
            s,
            Skip::NotMapped | Skip::Locked | Skip::Pinned | Skip::Unreachable
        )),
        "{skips:?}"
    );
}

#[test]
fn threads_fault_fork_migrate_reclaim_destroy() {
    let world = Arc::new(HostWorld::new(3072, 8, 512, 4096));
    let stop = Arc::new(AtomicBool::new(false));
    let ops: Vec<Arc<AtomicU64>> = (0..4).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut handles = Vec::new();
    for (i, seed) in [0x1234_5678u64, 0x9abc_def1].into_iter().enumerate() {
        let (w, s, o) = (world.clone(), stop.clone(), ops[i].clone());
        handles.push(thread::spawn(move || owner(w, s, seed, o)));
    }
    for (i, reclaim) in [false, true].into_iter().enumerate() {
        let (w, s, o) = (world.clone(), stop.clone(), ops[2 + i].clone());
        handles.push(thread::spawn(move || {
            mover(w, s, 0x5555 + i as u64, reclaim, o)
        }));
    }
    let start = Instant::now();
    while start.elapsed() < RUN {
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("worker panicked");
    }
    let counts: Vec<u64> = ops.iter().map(|o| o.load(Ordering::Relaxed)).collect();
    println!(
        "ops: owners {:?}, migrations {} ({} folios whole), reclaims {}",
        &counts[..2],
        counts[2],
        FOLIOS_MOVED.load(Ordering::Relaxed),
        counts[3]
    );
    assert!(
        counts.iter().all(|&c| c > 0),
        "every thread made progress: {counts:?}"
    );
    world.check().unwrap();
    let cached = world.rmap.swap_cache_entries();
    let refs = world.machine.swap_refs();
    assert!(
        cached.is_empty(),
        "swap cache left {cached:?}, slot refs {refs:?}"
    );
    assert_eq!(world.machine.allocated(), 0);
    assert_eq!(world.rmap.live_anon_vmas(), 0);
    assert_eq!(world.rmap.live_chains(), 0);
}

/// A value for page `ipa` of fork family `family`: a read that finds another family's or
/// another page's value saw a swap slot reused under a fault (a cross-VM leak).
fn tagged(family: u64, ipa: Ipa, n: u64) -> u64 {
    family << 56 | (ipa.page_index() & 0xff_ffff) << 32 | (n & 0xffff_ffff)
}

/// MEM_RELEASE racing swap-in (issue 12, item 3): VMs A and C (a fork of A) and an unrelated
/// B; one thread writes and releases their pages (MEM_RELEASE holds only the region list's
/// read lock, so it races faults), two read them (concurrent swap-ins of one entry and of
/// shared slots), one reclaims (swap entries; freed slot numbers are reused at once). Every
/// read returns 0 or a value of the same family and page.
#[test]
fn swap_in_races_mem_release_and_slot_reuse() {
    let world = Arc::new(HostWorld::new(512, 8, 256, 1024));
    let (w, m) = (&world, &world.machine);
    let a = w.create_vm(&REGIONS);
    for ipa in ipas() {
        a.write(&w.rmap, m, ipa, tagged(1, ipa, 0)).unwrap();
    }
    let c = w.fork(&a).unwrap();
    let b = w.create_vm(&REGIONS);
    for ipa in ipas() {
        b.write(&w.rmap, m, ipa, tagged(2, ipa, 0)).unwrap();
    }
    let vms = Arc::new([(a, 1), (c, 1), (b, 2)]);
    let stop = Arc::new(AtomicBool::new(false));
    let ops: Vec<Arc<AtomicU64>> = (0..4).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut handles = Vec::new();
    for (i, o) in ops.iter().enumerate() {
        let (w, s, o, vms) = (world.clone(), stop.clone(), o.clone(), vms.clone());
        handles.push(thread::spawn(move || {
            release_race_worker(i, &w, &s, &o, &vms[..])
        }));
    }
    thread::sleep(RUN / 2);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("worker panicked");
    }
    let counts: Vec<u64> = ops.iter().map(|o| o.load(Ordering::Relaxed)).collect();
    println!("ops: writer/releaser, readers, reclaimer {counts:?}");
    assert!(counts.iter().all(|&c| c > 0), "progress: {counts:?}");
    world.check().unwrap();
    for (vm, _) in vms.iter() {
        world.destroy(vm);
    }
    world.check().unwrap();
    assert!(world.machine.swap_refs().is_empty());
    assert_eq!(world.machine.allocated(), 0);
    assert_eq!(world.rmap.live_anon_vmas(), 0);
}

/// One thread of [`swap_in_races_mem_release_and_slot_reuse`]: 0 writes and releases, 1 and 2
/// read, 3 reclaims.
fn release_race_worker(
    i: usize,
    w: &HostWorld,
    stop: &AtomicBool,
    ops: &AtomicU64,
    vms: &[(Arc<HostVm>, u64)],
) {
    let mut rng = Rng(0x7777 + i as u64);
    let pages = ipas();
    while !stop.load(Ordering::Relaxed) {
        ops.fetch_add(1, Ordering::Relaxed);
        let (vm, family) = &vms[rng.below(vms.len())];
        let ipa = pages[rng.below(pages.len())];
        match i {
            0 if rng.below(2) == 0 => vm.release(&w.rmap, &w.machine, ipa).unwrap(),
            0 => {
                let value = tagged(*family, ipa, rng.next());
                vm.write(&w.rmap, &w.machine, ipa, value).unwrap();
            }
            1 | 2 => {
                let got = vm.read(&w.rmap, &w.machine, ipa).unwrap();
                let want = tagged(*family, ipa, 0) >> 32;
                assert!(got == 0 || got >> 32 == want, "{ipa:#x}: {got:#x}");
            }
            _ if rng.below(2) == 0 => batch_move(w, &mut rng, true),
            _ => {
                let frames = w.rmap.frames();
                let pfn = frames.base() + rng.below(frames.len()) as u64;
                let r = w.rmap.reclaim_frame(&w.vms, &w.machine, &w.machine, pfn);
                assert!(!matches!(r, Err(Error::OutOfSwap)), "{r:?}");
            }
        }
    }
}
