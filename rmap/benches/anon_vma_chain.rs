//! The 2010 anon_vma_chain experiment, side by side with the design it replaced.
//!
//! A parent VM with 1000 pages forks N children; each child writes every page, so its copies
//! live in its own anon_vma. Child 0 then forks once more, so its pages are shared by exactly
//! two VMs. We time the rmap walk of one such page:
//! - `anon_vma_chain` (this crate): the frame's anon_vma indexes only the regions that can map
//!   it (child 0 and its child), whatever N is;
//! - `flat` (pre-2010 Linux): one anon_vma per fork family, every region of the family on one
//!   list, each checked ("is the page mapped here?") under its VM's stage-2 lock.
//!
//! Run: `cargo bench -p rmap --bench anon_vma_chain`.

use rmap::host::{page_ipa, HostWorld};
use rmap::{Ipa, Pfn, Stage2, Stage2Locked, VmId, VmSet, PAGE_SIZE};
use std::hint::black_box;
use std::ops::ControlFlow;
use std::time::Instant;

const RAM: Ipa = Ipa::new(0x4000_0000);
const PAGES: u64 = 1000;

/// A pre-2010 anon_vma: every region of the fork family on one list.
struct FlatFamily {
    regions: spin::RwLock<Vec<(VmId, Ipa, u64)>>,
}

impl FlatFamily {
    fn walk(&self, world: &HostWorld, pfn: Pfn, index: u64) -> usize {
        let mut found = 0;
        for &(vm, start, pgoff) in self.regions.read().iter() {
            let ipa = start + (index - pgoff) * PAGE_SIZE;
            let hit = world
                .vms
                .with_vm(vm, |s2| s2.lock().lookup(ipa).pfn() == Some(pfn));
            found += usize::from(hit == Some(true));
        }
        found
    }
}

struct Setup {
    world: HostWorld,
    flat: FlatFamily,
    pfn: Pfn,
}

fn build(children: usize) -> Setup {
    let frames = PAGES as usize * (children + 2);
    let world = HostWorld::new(frames, 1, children + 8, 2 * children + 16);
    let parent = world.create_vm(&[(RAM, PAGES)]);
    for i in 0..PAGES {
        parent
            .write(&world.rmap, &world.machine, page_ipa(RAM, i), i)
            .unwrap();
    }
    let mut family = vec![parent.id];
    let mut first = None;
    for _ in 0..children {
        let child = world.fork(&parent).unwrap();
        for i in 0..PAGES {
            child
                .write(&world.rmap, &world.machine, page_ipa(RAM, i), i + 1)
                .unwrap();
        }
        family.push(child.id);
        first.get_or_insert(child);
    }
    let first = first.unwrap();
    let grandchild = world.fork(&first).unwrap();
    family.push(grandchild.id);
    let ipa = page_ipa(RAM, PAGES / 2);
    let pfn = first.s2.lock().lookup(ipa).pfn().unwrap();
    let pgoff = RAM.page_index();
    let flat = FlatFamily {
        regions: spin::RwLock::new(family.iter().map(|&vm| (vm, RAM, pgoff)).collect()),
    };
    Setup { world, flat, pfn }
}

/// Best of 5 batches, in ns per walk.
fn time(iters: u32, mut walk: impl FnMut() -> usize) -> f64 {
    (0..5)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iters {
                black_box(walk());
            }
            start.elapsed().as_nanos() as f64 / f64::from(iters)
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let mut rows = Vec::new();
    for children in [1usize, 10, 100, 1000] {
        let setup = build(children);
        let (w, pfn) = (&setup.world, setup.pfn);
        let index = w.rmap.frames().frame(pfn).index();
        let ours = || {
            let mut n = 0;
            w.rmap.walk(pfn, &w.vms, |_, _: &mut dyn Stage2Locked| {
                n += 1;
                ControlFlow::Continue(())
            });
            n
        };
        assert_eq!(ours(), 2, "the page is mapped by child 0 and its child");
        assert_eq!(setup.flat.walk(w, pfn, index), 2);
        let chain_ns = time(20_000, ours);
        let iters = (2_000_000 / (children as u32 + 2)).max(200);
        let flat_ns = time(iters, || setup.flat.walk(w, pfn, index));
        eprintln!("N={children}: anon_vma_chain {chain_ns:.0} ns, flat {flat_ns:.0} ns");
        rows.push((children, chain_ns, flat_ns));
    }
    let (base_chain, base_flat) = (rows[0].1, rows[0].2);
    println!("\n| children N | anon_vma_chain walk (ns) | ratio vs N=1 | flat anon_vma walk (ns) | ratio vs N=1 |");
    println!("|---:|---:|---:|---:|---:|");
    for (n, chain, flat) in &rows {
        println!(
            "| {n} | {chain:.0} | {:.2}x | {flat:.0} | {:.2}x |",
            chain / base_chain,
            flat / base_flat
        );
    }
    let worst = rows.iter().map(|r| r.1 / base_chain).fold(0.0, f64::max);
    println!("\nanon_vma_chain worst ratio {worst:.2}x (goal: within 2x from 1 to 1000 children)");
}
