//! Unit tests of the walker's own contract (what `tests/walker.rs` cannot see from outside).

use super::driver::{After, Maintenance, NoMaintenance, OpVisitor, Step, Visit, Walk};
use crate::{Descriptor, DescriptorKind, HostMemory, S2Config, Stage2Table, VmidBits};
use crate::{LAST_LEVEL, PAGE_SIZE};
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
