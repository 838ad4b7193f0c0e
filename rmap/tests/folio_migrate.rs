//! Block migration (`Rmap::migrate_folio`, and `migrate_frames` preferring it): a 2 MiB block
//! forked into several VMs moves whole with one block change to a migration entry and one
//! back per mapper, no split, one flush per VM; contents and counts stay right and the old
//! run is freed; a fault on a page of the block migration entry waits for the migration;
//! a folio one mapper split (before, or while the migration starts) and a machine without a
//! free aligned run fall back to page migration.

use rmap::folio::FOLIO_PAGES;
use rmap::host::{page_ipa, HostMachine, HostVm, HostWorld, BLOCK_PAGES};
use rmap::{Error, Fault, FrameAllocator, Ipa, PageState, Pfn, Stage2, Stage2Locked};
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const RAM: Ipa = Ipa::new(0x4000_0000);
/// Pages written before the fork and read back after the migration.
const SAMPLE: [u64; 5] = [0, 1, 3, 255, 511];

fn world(frames: usize) -> HostWorld {
    HostWorld::new(frames, 4, 1024, 4096)
}

/// A VM whose RAM is one first-touch block with `SAMPLE` written, forked into `children`
/// more (siblings and grandchildren); returns every VM and the folio's first frame.
fn forked_block(w: &HostWorld, children: usize) -> (Vec<Arc<HostVm>>, Pfn) {
    let a = w.create_vm(&[(RAM, BLOCK_PAGES)]);
    assert!(w.fault_block(&a, RAM));
    for &i in &SAMPLE {
        a.write(&w.rmap, &w.machine, page_ipa(RAM, i), 100 + i)
            .unwrap();
    }
    let head = a.s2.lock().lookup(RAM).pfn().unwrap();
    let mut vms = vec![a];
    for k in 0..children {
        let parent = vms[k / 2].clone();
        vms.push(w.fork(&parent).unwrap());
    }
    // Every VM reads its pages (its TLB model caches them): the flush must clear them.
    for vm in &vms {
        assert_eq!(vm.read(&w.rmap, &w.machine, page_ipa(RAM, 3)).unwrap(), 103);
    }
    (vms, head)
}

/// Every VM maps the folio at `head` with one block entry and reads `SAMPLE` back.
fn check_moved(w: &HostWorld, vms: &[Arc<HostVm>], head: Pfn) {
    for vm in vms {
        assert_eq!(vm.s2.blocks(), vec![RAM], "{:?} keeps a block", vm.id);
        assert_eq!(vm.s2.lock().lookup(RAM).pfn(), Some(head));
        for &i in &SAMPLE {
            let got = vm.read(&w.rmap, &w.machine, page_ipa(RAM, i)).unwrap();
            assert_eq!(got, 100 + i, "page {i} of {:?}", vm.id);
        }
    }
    let frames = w.rmap.frames();
    assert_eq!(frames.entire_mapcount(head), vms.len() as u32);
    for p in head.run(FOLIO_PAGES) {
        let f = frames.frame(p);
        assert_eq!(
            (f.mapcount(), f.refcount()),
            (1, 1),
            "frame {p:#x}: the share"
        );
    }
    w.check().unwrap();
}

#[test]
fn a_forked_block_moves_whole_with_one_change_each_way_per_mapper() {
    for children in [0, 1, 5, 12] {
        let w = world(2048);
        let (vms, head) = forked_block(&w, children);
        let (changes, tables) = (w.hw().block_changes(), w.hw().tables_allocated());
        let new = w.rmap.migrate_folio(&w.vms, &w.machine, head + 7).unwrap() - 7;
        assert!(new.is_aligned(FOLIO_PAGES) && new != head);
        let mappers = vms.len() as u64;
        assert_eq!(
            w.hw().block_changes() - changes,
            2 * mappers,
            "one change each way"
        );
        assert_eq!(w.hw().tables_allocated(), tables, "no block was split");
        assert!(head.run(FOLIO_PAGES).all(|p| w.machine.is_free(p)));
        assert_eq!(w.rmap.frames().entire_mapcount(head), 0);
        check_moved(&w, &vms, new);
        vms.iter().for_each(|vm| w.destroy(vm));
        assert_eq!(w.machine.allocated(), 0);
    }
}

#[test]
fn a_batch_holding_a_whole_folio_moves_it_whole() {
    let w = world(2048);
    let (vms, head) = forked_block(&w, 3);
    // A page frame of another VM's, a repeat and the folio's frames in reverse order.
    let other = w.create_vm(&[(RAM, 4)]);
    other.write(&w.rmap, &w.machine, RAM, 7).unwrap();
    let page = other.s2.lock().lookup(RAM).pfn().unwrap();
    let mut batch: Vec<Pfn> = head.run(FOLIO_PAGES).rev().collect();
    batch.insert(100, page);
    batch.push(head + 9);
    let changes = w.hw().block_changes();
    let mut out = Vec::new();
    w.rmap.migrate_frames(&w.vms, &w.machine, &batch, &mut out);
    assert_eq!(w.hw().block_changes() - changes, 2 * vms.len() as u64);
    let new = vms[0].s2.lock().lookup(RAM).pfn().unwrap();
    assert_ne!(new, head);
    for (k, &p) in batch.iter().enumerate() {
        let want = match p {
            _ if p == page => other
                .s2
                .lock()
                .lookup(RAM)
                .pfn()
                .ok_or(rmap::Skip::NotMapped),
            _ if k == batch.len() - 1 => Err(rmap::Skip::Locked),
            _ => Ok(new + (p - head)),
        };
        assert_eq!(out[k], want, "position {k}");
    }
    assert_ne!(out[100], Ok(page), "the page frame moved too");
    assert_eq!(other.read(&w.rmap, &w.machine, RAM).unwrap(), 7);
    check_moved(&w, &vms, new);
}

/// A frame allocator that runs a test's code once, when the migration allocates its run or
/// when it copies (its migration entries are in place then, and the old frames locked).
struct Hooked<'a> {
    m: &'a HostMachine,
    on_alloc: RefCell<Option<Box<dyn FnOnce() + 'a>>>,
    on_copy: RefCell<Option<Box<dyn FnOnce() + 'a>>>,
}

impl<'a> Hooked<'a> {
    fn new(m: &'a HostMachine) -> Self {
        Hooked {
            m,
            on_alloc: RefCell::new(None),
            on_copy: RefCell::new(None),
        }
    }
}

impl FrameAllocator for Hooked<'_> {
    fn alloc(&self) -> Option<Pfn> {
        self.m.alloc()
    }
    fn alloc_folio(&self) -> Option<Pfn> {
        if let Some(hook) = self.on_alloc.take() {
            hook();
        }
        self.m.alloc_folio()
    }
    fn free(&self, pfn: Pfn) {
        self.m.free(pfn)
    }
    fn zero(&self, pfn: Pfn) {
        self.m.zero(pfn)
    }
    fn copy(&self, dst: Pfn, src: Pfn) {
        if let Some(hook) = self.on_copy.take() {
            hook();
        }
        self.m.copy(dst, src)
    }
    fn same_contents(&self, a: Pfn, b: Pfn) -> bool {
        self.m.same_contents(a, b)
    }
    fn is_zero(&self, pfn: Pfn) -> bool {
        self.m.is_zero(pfn)
    }
}

#[test]
fn a_fault_on_a_block_migration_entry_waits_for_the_migration() {
    let w = world(2048);
    let a = w.create_vm(&[(RAM, BLOCK_PAGES)]);
    assert!(w.fault_block(&a, RAM));
    a.write(&w.rmap, &w.machine, page_ipa(RAM, 3), 5).unwrap();
    let head = a.s2.lock().lookup(RAM).pfn().unwrap();
    let stored = AtomicBool::new(false);
    let new = std::thread::scope(|s| {
        let writer = RefCell::new(None);
        let alloc = Hooked::new(&w.machine);
        *alloc.on_copy.borrow_mut() = Some(Box::new(|| {
            // Every page reads as its own frame's migration entry; a fault on one waits
            // for that frame's lock, which the migration holds. (On another thread: this
            // one holds the frame locks, below the region list a fault takes.)
            let check = || {
                for i in [0, 3, 200, 511] {
                    let ipa = page_ipa(RAM, i);
                    let entry = a.s2.lock().lookup(ipa);
                    let want = PageState::Migrating {
                        pfn: head + i,
                        writable: true,
                    };
                    assert_eq!(entry, want, "page {i}");
                    let fault = w
                        .rmap
                        .handle_fault(&a.regions, &a.s2, &w.machine, &w.machine, ipa, true);
                    assert_eq!(fault, Ok(Fault::Retry(Some(head + i))));
                    assert!(w.rmap.frames().frame(head + i).is_locked());
                }
            };
            s.spawn(check).join().unwrap();
            // A vCPU storing meanwhile waits, and its store lands in the new frame.
            let (a, w, stored) = (&a, &w, &stored);
            *writer.borrow_mut() = Some(s.spawn(move || {
                a.write(&w.rmap, &w.machine, page_ipa(RAM, 3), 6).unwrap();
                stored.store(true, Ordering::SeqCst);
            }));
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!stored.load(Ordering::SeqCst), "the store did not wait");
        }));
        let new = w.rmap.migrate_folio(&w.vms, &alloc, head).unwrap();
        writer.take().unwrap().join().unwrap();
        new
    });
    assert_ne!(new, head);
    assert_eq!(a.s2.lock().lookup(page_ipa(RAM, 3)).pfn(), Some(new + 3));
    assert_eq!(a.read(&w.rmap, &w.machine, page_ipa(RAM, 3)).unwrap(), 6);
    w.check().unwrap();
}

#[test]
fn a_folio_a_mapper_split_moves_page_by_page() {
    let w = world(2048);
    let (vms, head) = forked_block(&w, 2);
    // The second VM releases a page: its block is split, its pages counted on the frames.
    vms[1]
        .release(&w.rmap, &w.machine, page_ipa(RAM, 40))
        .unwrap();
    let changes = w.hw().block_changes();
    let r = w.rmap.migrate_folio(&w.vms, &w.machine, head);
    assert_eq!(r, Err(Error::Busy));
    assert_eq!(w.hw().block_changes(), changes, "nothing changed");
    w.check().unwrap();
    let mut out = Vec::new();
    let batch: Vec<Pfn> = head.run(FOLIO_PAGES).collect();
    w.rmap.migrate_frames(&w.vms, &w.machine, &batch, &mut out);
    assert_eq!(w.hw().block_changes(), changes, "moved page by page");
    assert!(out.iter().all(Result::is_ok), "{out:?}");
    for vm in &vms {
        assert!(vm.s2.blocks().is_empty(), "split for page migration");
        for &i in &SAMPLE {
            assert_eq!(
                vm.read(&w.rmap, &w.machine, page_ipa(RAM, i)).unwrap(),
                100 + i
            );
        }
    }
    w.check().unwrap();
}

#[test]
fn a_split_while_the_migration_starts_puts_the_blocks_back() {
    let w = world(2048);
    let (vms, head) = forked_block(&w, 2);
    let alloc = Hooked::new(&w.machine);
    let victim = vms[2].clone();
    let w_ref = &w;
    // After the counts were checked and before any block changes: a release splits one.
    *alloc.on_alloc.borrow_mut() = Some(Box::new(move || {
        // Another thread: this one holds the folio's frame locks (level 2), below the
        // region list the release takes.
        std::thread::scope(|s| {
            s.spawn(|| {
                let ipa = page_ipa(RAM, 40);
                victim.release(&w_ref.rmap, &w_ref.machine, ipa).unwrap();
            });
        });
    }));
    let r = w.rmap.migrate_folio(&w.vms, &alloc, head);
    assert_eq!(r, Err(Error::Busy));
    assert_eq!(vms[0].s2.blocks(), vec![RAM], "put back");
    assert_eq!(vms[1].s2.blocks(), vec![RAM], "put back");
    assert!(vms[2].s2.blocks().is_empty());
    assert_eq!(w.rmap.frames().entire_mapcount(head), 2);
    for vm in &vms {
        for &i in &SAMPLE {
            assert_eq!(
                vm.read(&w.rmap, &w.machine, page_ipa(RAM, i)).unwrap(),
                100 + i
            );
        }
    }
    w.check().unwrap();
    assert!(head.run(FOLIO_PAGES).all(|p| !w.machine.is_free(p)));
}

#[test]
fn without_a_free_aligned_run_the_frames_move_page_by_page() {
    // Two aligned runs and some more: the block takes one, a page breaks the other.
    let w = world(1024 + 64);
    let (vms, head) = forked_block(&w, 1);
    let other = w.create_vm(&[(RAM, 4)]);
    other.write(&w.rmap, &w.machine, RAM, 7).unwrap();
    assert_eq!(
        w.rmap.migrate_folio(&w.vms, &w.machine, head),
        Err(Error::OutOfFrames)
    );
    let changes = w.hw().block_changes();
    let mut out = Vec::new();
    let batch: Vec<Pfn> = head.run(FOLIO_PAGES).collect();
    w.rmap.migrate_frames(&w.vms, &w.machine, &batch, &mut out);
    assert!(out.iter().all(Result::is_ok), "{out:?}");
    assert_eq!(w.hw().block_changes(), changes);
    for vm in &vms {
        for &i in &SAMPLE {
            assert_eq!(
                vm.read(&w.rmap, &w.machine, page_ipa(RAM, i)).unwrap(),
                100 + i
            );
        }
    }
    w.check().unwrap();
}

#[test]
fn a_fork_during_the_copy_gets_the_pages_migration_entries() {
    let w = world(2048);
    // One writable block: the fork must write-protect its migration entry (in place).
    let (vms, head) = forked_block(&w, 0);
    let child = std::sync::Mutex::new(None);
    let alloc = Hooked::new(&w.machine);
    let (parent, w_ref, slot) = (vms[0].clone(), &w, &child);
    *alloc.on_copy.borrow_mut() = Some(Box::new(move || {
        std::thread::scope(|s| {
            s.spawn(|| *slot.lock().unwrap() = Some(w_ref.fork(&parent).unwrap()));
        });
    }));
    let new = w.rmap.migrate_folio(&w.vms, &alloc, head).unwrap();
    let child = child.lock().unwrap().take().unwrap();
    assert_eq!(
        vms[0].s2.blocks(),
        vec![RAM],
        "the parent's entry stayed one block"
    );
    let ro = PageState::Mapped {
        pfn: new,
        writable: false,
    };
    assert_eq!(vms[0].s2.lock().lookup(RAM), ro);
    assert!(child.s2.blocks().is_empty(), "the child got pages");
    for vm in [&vms[0], &child] {
        assert_eq!(vm.s2.lock().lookup(page_ipa(RAM, 9)).pfn(), Some(new + 9));
        for &i in &SAMPLE {
            assert_eq!(
                vm.read(&w.rmap, &w.machine, page_ipa(RAM, i)).unwrap(),
                100 + i
            );
        }
    }
    w.check().unwrap();
    // The parent's block is read-only now: its write copies, and the child keeps its value.
    vms[0]
        .write(&w.rmap, &w.machine, page_ipa(RAM, 3), 9)
        .unwrap();
    assert_eq!(
        child.read(&w.rmap, &w.machine, page_ipa(RAM, 3)).unwrap(),
        103
    );
    w.check().unwrap();
}

/// An owner thread forks, destroys, reads (every read checks the value: a lost or torn copy
/// shows) and now and then writes (a copy-on-write split) VMs sharing blocks, while a mover
/// thread migrates whichever folio a block maps, whole. Then the world is checked and torn
/// down with nothing left.
#[test]
fn block_migration_races_faults_forks_and_destroys() {
    let w = Arc::new(HostWorld::new(4096, 8, 1024, 4096));
    let stop = Arc::new(AtomicBool::new(false));
    let (wm, sm) = (w.clone(), stop.clone());
    let mover = std::thread::spawn(move || {
        let (frames, mut moved, mut x) = (wm.rmap.frames(), 0u64, 0x2545_f491u64);
        while !sm.load(Ordering::Relaxed) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let pfn = frames.base() + x % frames.len() as u64;
            if frames.entire_mapcount(pfn) == 0 {
                continue;
            }
            match wm.rmap.migrate_folio(&wm.vms, &wm.machine, pfn) {
                Ok(_) => moved += 1,
                Err(Error::Busy | Error::NotMapped | Error::OutOfFrames) => {}
                Err(e) => panic!("{e:?}"),
            }
        }
        moved
    });
    let mut vms: Vec<(Arc<HostVm>, [u64; 5])> = Vec::new();
    let mut x = 0x9e37_79b9u64;
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_millis(1500) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let pick = (x >> 8) as usize % vms.len().max(1);
        match x % 16 {
            // A new block, if an aligned run is left (copy-on-write pages fragment memory).
            0 if vms.len() < 6 => {
                let a = w.create_vm(&[(RAM, BLOCK_PAGES)]);
                if !w.fault_block(&a, RAM) {
                    w.destroy(&a);
                    continue;
                }
                for &i in &SAMPLE {
                    a.write(&w.rmap, &w.machine, page_ipa(RAM, i), 100 + i)
                        .unwrap();
                }
                vms.push((a, SAMPLE.map(|i| 100 + i)));
            }
            1 | 2 if !vms.is_empty() && vms.len() < 6 => {
                if let Ok(child) = w.fork(&vms[pick].0) {
                    vms.push((child, vms[pick].1));
                }
            }
            3 if vms.len() > 1 => w.destroy(&vms.swap_remove(pick).0),
            4 if !vms.is_empty() => {
                let (vm, model) = &mut vms[pick];
                let k = (x >> 20) as usize % SAMPLE.len();
                vm.write(&w.rmap, &w.machine, page_ipa(RAM, SAMPLE[k]), x >> 40)
                    .unwrap();
                model[k] = x >> 40;
            }
            _ if !vms.is_empty() => {
                let (vm, model) = &vms[pick];
                for (k, &i) in SAMPLE.iter().enumerate() {
                    let got = vm.read(&w.rmap, &w.machine, page_ipa(RAM, i)).unwrap();
                    assert_eq!(got, model[k], "page {i} of {:?}", vm.id);
                }
            }
            _ => {}
        }
    }
    stop.store(true, Ordering::Relaxed);
    let moved = mover.join().unwrap();
    println!("folios moved whole: {moved}");
    assert!(moved > 0, "no block migration ran");
    w.check().unwrap();
    vms.drain(..).for_each(|(vm, _)| w.destroy(&vm));
    w.check().unwrap();
    assert_eq!(w.machine.allocated(), 0);
}

/// Found by `tests/model.rs` (CI, 4 December 2026): with no table page to spare, a write by
/// a block's sole mapper (its parent destroyed) re-homed the written page's frame to the
/// writer's anon_vma before it found the block could not be split. The write failed, but the
/// folio's frames were left in two anon_vmas, and its whole migration refused (Busy) for
/// good. Now the failed write changes nothing, and the block moves whole.
#[test]
fn a_write_that_cannot_split_the_block_leaves_the_folio_whole() {
    let w = world(2048);
    let (vms, head) = forked_block(&w, 1);
    w.destroy(&vms[0]);
    let child = &vms[1];
    w.hw().set_table_budget(Some(0));
    let wrote = child.write(&w.rmap, &w.machine, page_ipa(RAM, 0), 7);
    assert_eq!(wrote, Err(Error::OutOfFrames));
    let frames = w.rmap.frames();
    let slot = frames.frame(head).anon_slot();
    assert!(head
        .run(FOLIO_PAGES)
        .all(|p| frames.frame(p).anon_slot() == slot));
    w.hw().set_table_budget(None);
    let new = w.rmap.migrate_folio(&w.vms, &w.machine, head).unwrap();
    check_moved(&w, &vms[1..], new);
    w.check().unwrap();
}
