//! Unit tests of the walker's own contract (what `tests/walker.rs` cannot see from outside).

use super::driver::{After, Maintenance, NoMaintenance, OpVisitor, Step, Visit, Walk};
use crate::{Descriptor, DescriptorKind, HostMemory, S2Config, Stage2Table, VmidBits};
use crate::{LAST_LEVEL, PAGE_SIZE};
use std::format;
use std::vec::Vec;

/// Creates tables down to the last level and records what each `table_post` is shown.
#[derive(Default)]
struct CreatePath {
    posts: Vec<(u8, Descriptor)>,
}

impl OpVisitor for CreatePath {
    type Error = ();

    fn visit(&mut self, v: &Visit) -> Step<()> {
        match v.desc.kind(v.level) {
            DescriptorKind::Empty if v.level < LAST_LEVEL => Step::Create,
            DescriptorKind::Table { .. } => Step::Descend,
            _ => Step::Next,
        }
    }

    fn table_post(&mut self, v: &Visit) -> After<()> {
        self.posts.push((v.level, v.desc));
        After::Keep
    }
}

/// After a subtree the visitor sees the table descriptor that links it, also for a table
/// the same visit created (not the empty value the slot held before).
#[test]
fn table_post_sees_the_table_descriptor_of_a_created_table() {
    let mem = HostMemory::new(16);
    let cfg = S2Config::new(2, 40, VmidBits::Sixteen).unwrap();
    let t = Stage2Table::new(cfg, 1, &mem).unwrap();
    let mut op = CreatePath::default();
    Walk::new(&t, 0, PAGE_SIZE)
        .run(&mut op, &mut NoMaintenance)
        .unwrap();
    // 40-bit IPA: level-1 root; tables created in its slot and in the level-2 slot.
    let levels: Vec<u8> = op.posts.iter().map(|p| p.0).collect();
    assert_eq!(levels, [2, 1], "deepest first");
    for (level, desc) in op.posts {
        let (_, slot) = t.find_slot(0, level).unwrap();
        assert!(desc.is_table(level), "level {level}: {desc:?}");
        assert_eq!(
            desc.raw(),
            slot.load(crate::sync::atomic::Ordering::Relaxed)
        );
    }
}

/// `NoMaintenance` serves walks whose writes owe no maintenance; each of its methods is a
/// debug-build guard that such a walk never asks for any.
#[cfg(debug_assertions)]
mod no_maintenance {
    use super::*;

    #[test]
    #[should_panic(expected = "changed a live entry")]
    fn refuses_an_invalidation() {
        NoMaintenance.changed(0, 3);
    }

    #[test]
    #[should_panic(expected = "break-before-make")]
    fn refuses_a_break() {
        NoMaintenance.break_now(0, 3);
    }

    #[test]
    #[should_panic(expected = "executable")]
    fn refuses_icache_maintenance() {
        NoMaintenance.icache(0, PAGE_SIZE);
    }

    #[test]
    #[should_panic(expected = "unlinked a table")]
    fn refuses_a_vmid_invalidation() {
        NoMaintenance.vmid_now();
    }
}

/// Records every visit and post, and answers by what it sees: descend into tables, create
/// tables in empty slots, split blocks, flip the Access flag of a page once, and unlink
/// tables left empty. The answers cover every step a one-page walk can take.
#[derive(Default)]
struct Recorder {
    log: Vec<(bool, u8, u64, u64)>,
    flipped: bool,
}

impl OpVisitor for Recorder {
    type Error = ();

    fn visit(&mut self, v: &Visit) -> Step<()> {
        self.log.push((false, v.level, v.chunk.base, v.desc.raw()));
        match v.desc.kind(v.level) {
            DescriptorKind::Table { .. } => Step::Descend,
            DescriptorKind::Empty if v.level < LAST_LEVEL => Step::Create,
            DescriptorKind::Leaf { .. } if v.level < LAST_LEVEL => Step::Split,
            DescriptorKind::Leaf { young, .. } if !self.flipped => {
                self.flipped = true;
                Step::Write(v.desc.with_young(!young))
            }
            _ => Step::Next,
        }
    }

    fn table_post(&mut self, v: &Visit) -> After<()> {
        self.log.push((true, v.level, v.chunk.base, v.desc.raw()));
        After::Unlink
    }
}

/// The one-page walk (a loop down the levels) shows the visitor the same slots, acts on the
/// same answers and leaves the same table as the general recursion, over holes, pages, a
/// 2 MiB block and an empty slot at each level.
#[test]
fn one_page_walk_matches_the_recursion() {
    use crate::{Ipa, Pa, Perm, RecordingTlb, S2Attrs};
    fn build(mem: &HostMemory) -> Stage2Table<&HostMemory> {
        let rw = S2Attrs::normal(Perm::new(true, true, false));
        let cfg = S2Config::new(2, 40, VmidBits::Sixteen).unwrap();
        let t = Stage2Table::new(cfg, 1, mem).unwrap();
        let (pa, tlb) = (Pa::new(0x8000_0000), RecordingTlb::default());
        t.map(Ipa::new(0x4000_0000), pa, 2 << 20, rw, &tlb).unwrap();
        t.map_pages(Ipa::new(0x4040_0000), pa, 2 * PAGE_SIZE, rw, &tlb)
            .unwrap();
        t
    }
    let pages = [
        0x4000_0000,
        0x4010_3000,
        0x4040_0000,
        0x4040_1000,
        0x4040_5000,
        0x1_0000_0000,
    ];
    for ipa in pages {
        let (a, b) = (HostMemory::new(64), HostMemory::new(64));
        let (ta, tb) = (build(&a), build(&b));
        let (mut ra, mut rb) = (Recorder::default(), Recorder::default());
        let looped = Walk::new(&ta, ipa, ipa + PAGE_SIZE);
        let mut recursive = Walk::new(&tb, ipa, ipa + PAGE_SIZE);
        recursive.recurse = true;
        looped.run(&mut ra, &mut NoFlushMaint).unwrap();
        recursive.run(&mut rb, &mut NoFlushMaint).unwrap();
        assert_eq!(ra.log, rb.log, "ipa {ipa:#x}: visits and posts");
        assert!(
            ra.log.len() >= 2,
            "ipa {ipa:#x}: the walk visited {:?}",
            ra.log
        );
        for probe in pages {
            let (la, lb) = (ta.lookup(Ipa::new(probe)), tb.lookup(Ipa::new(probe)));
            assert_eq!(
                format!("{la:?}"),
                format!("{lb:?}"),
                "ipa {ipa:#x}, probe {probe:#x}"
            );
        }
        assert_eq!(ta.stats(), tb.stats(), "ipa {ipa:#x}: counters");
    }
}

/// Maintenance that records nothing: the two tables are compared by their contents.
struct NoFlushMaint;

impl Maintenance for NoFlushMaint {
    fn changed(&mut self, _: u64, _: u8) {}
    fn break_now(&self, _: u64, _: u8) {}
    fn icache(&self, _: u64, _: u64) {}
    fn vmid_now(&mut self) {}
}
