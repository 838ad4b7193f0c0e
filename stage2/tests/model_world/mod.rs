//! The world of `model.rs`'s random operation sequences: the operations, and one stage-2 table
//! with its recording TLB and the reference model (IPA page -> state), each operation run
//! against the table and the model alike, asserting what the crate reports on the way
//! (results, reported leaves, block levels). `ops.rs` runs the operations that map, unmap or
//! change ranges; the single-entry ones (compare-exchange, `update_pages`, access flag) are
//! here. `check.rs` compares the two after a step.

mod check;
mod ops;

use crate::common::{Oracle, PageState};
use stage2::*;
use std::collections::BTreeMap;

pub const WINDOW_PAGES: u64 = 2048; // 8 MiB: four 2 MiB blocks
pub const PAGE: u64 = 4096;

#[derive(Clone, Copy, Debug)]
pub struct Setup {
    pub parange: u8,
    pub ipa_bits: u8,
    pub base: u64,
    pub frames: u64,
}

#[derive(Clone, Copy, Debug)]
pub enum Op {
    Map {
        page: u64,
        npages: u64,
        frame: u64,
        perm: Perm,
        device: bool,
        blocks: bool,
    },
    MapBlock {
        block: u64,
        frame_block: u64,
        perm: Perm,
    },
    Unmap {
        page: u64,
        npages: u64,
    },
    Protect {
        page: u64,
        npages: u64,
        perm: Perm,
    },
    Split {
        page: u64,
    },
    SetSoftware {
        page: u64,
        entry: stage2::PageState,
    },
    CasPerm {
        page: u64,
        perm: Perm,
    },
    CasRemap {
        page: u64,
        frame: u64,
    },
    /// `update_pages` remapping every other page of a run to consecutive frames.
    UpdateRemap {
        page: u64,
        npages: u64,
        frame: u64,
    },
    CasStale {
        page: u64,
    },
    ClearYoung {
        page: u64,
    },
    MkYoung {
        page: u64,
    },
}

pub type Model = BTreeMap<u64, PageState>;

pub struct World<'m> {
    pub setup: Setup,
    pub mem: &'m HostMemory,
    pub table: Stage2Table<&'m HostMemory>,
    pub tlb: RecordingTlb,
    pub model: Model,
}

fn mapped(pa: u64, perm: Perm, device: bool) -> PageState {
    PageState::Mapped {
        pa,
        read: perm.read,
        write: perm.write,
        exec: perm.exec && !device,
        device,
        young: true,
        sw: 0,
    }
}

impl World<'_> {
    fn ipa(&self, page: u64) -> u64 {
        self.setup.base + page * PAGE
    }

    fn frame(&self, frame: u64) -> u64 {
        self.setup.frames + frame * PAGE
    }

    fn oracle(&self) -> Oracle<'_> {
        Oracle::new(self.mem, self.table.vtcr(), self.table.vttbr().raw())
    }

    /// Clamps `[page, page + npages)` to the window; returns (ipa, len).
    fn range(&self, page: u64, npages: u64) -> (u64, u64) {
        let n = npages.min(WINDOW_PAGES - page);
        (self.ipa(page), n * PAGE)
    }

    fn pages_in(&self, ipa: u64, len: u64) -> impl Iterator<Item = u64> {
        (ipa..ipa + len).step_by(PAGE as usize)
    }

    /// The pages of the leaf holding `ipa`, per the crate's lookup.
    fn leaf_pages(&self, ipa: u64) -> Vec<u64> {
        match self.table.lookup(Ipa::new(ipa)) {
            Some(l) => self.pages_in(l.ipa.raw(), l.size()).collect(),
            None => vec![],
        }
    }

    /// Runs one op against the table and the model. Returns whether the op may leave AF
    /// cleared without an invalidation.
    pub fn apply(&mut self, op: Op) -> Result<bool, Error> {
        match op {
            Op::Map {
                page,
                npages,
                frame,
                perm,
                device,
                blocks,
            } => self.map(page, npages, frame, perm, device, blocks)?,
            Op::MapBlock {
                block,
                frame_block,
                perm,
            } => self.map_block(block, frame_block, perm)?,
            Op::Unmap { page, npages } => self.unmap(page, npages)?,
            Op::Protect { page, npages, perm } => self.protect(page, npages, perm)?,
            Op::Split { page } => self.split(page)?,
            Op::SetSoftware { page, entry } => self.set_software(page, entry)?,
            Op::CasPerm { page, perm } => self.cas_perm(self.ipa(page), perm)?,
            Op::CasRemap { page, frame } => self.cas_remap(page, frame),
            Op::UpdateRemap {
                page,
                npages,
                frame,
            } => self.update_remap(page, npages, frame),
            Op::CasStale { page } => self.cas_stale(page),
            Op::ClearYoung { page } => {
                self.clear_young(page);
                return Ok(true);
            }
            Op::MkYoung { page } => self.mkyoung(page),
        }
        Ok(false)
    }

    /// Remaps the page at `page`, if it is a page leaf, to `frame` by compare-exchange; the
    /// exchange must succeed. Holes, blocks and software entries are left alone.
    fn cas_remap(&mut self, page: u64, frame: u64) {
        let tlb = &self.tlb;
        let ipa = self.ipa(page);
        let Some(l) = self.table.lookup(Ipa::new(ipa)) else {
            return;
        };
        let Some(m) = l.mapping().filter(|_| l.level == 3) else {
            return;
        };
        let pa = self.frame(frame);
        let new = Descriptor::page(pa, m.attrs).unwrap();
        self.table
            .compare_exchange_leaf(Ipa::new(ipa), 3, l.desc, new, tlb)
            .unwrap();
        if let Some(PageState::Mapped { pa: p, young, .. }) = self.model.get_mut(&ipa) {
            (*p, *young) = (pa, true);
        }
    }

    /// `update_pages` remapping every other page of the clamped run to consecutive frames;
    /// the model follows exactly the pages the crate reports as changed.
    fn update_remap(&mut self, page: u64, npages: u64, frame: u64) {
        let tlb = &self.tlb;
        let (ipa, len) = self.range(page, npages);
        let ipas: Vec<Ipa> = (ipa..ipa + len)
            .step_by(2 * PAGE as usize)
            .map(Ipa::new)
            .collect();
        let frames = self.setup.frames;
        let new_pa = |k: usize| frames + (frame + k as u64) % 4096 * PAGE;
        let mut changed = Vec::new();
        self.table.update_pages(
            &ipas,
            &mut |k, l| {
                let m = l.mapping()?;
                Descriptor::page(new_pa(k), m.attrs).ok()
            },
            &mut |k, r| {
                if r.is_ok() {
                    changed.push(k);
                }
            },
            tlb,
        );
        for k in changed {
            if let Some(PageState::Mapped { pa: p, young, .. }) = self.model.get_mut(&ipas[k].raw())
            {
                (*p, *young) = (new_pa(k), true);
            }
        }
    }

    /// A compare-exchange with a stale expected descriptor must fail with `Mismatch` carrying
    /// the entry actually there, and change nothing.
    fn cas_stale(&mut self, page: u64) {
        let tlb = &self.tlb;
        let ipa = self.ipa(page);
        if let Some(l) = self.table.lookup(Ipa::new(ipa)) {
            let stale = Descriptor::from_raw(l.desc.raw() ^ (1 << 20));
            let r = self.table.compare_exchange_leaf(
                Ipa::new(ipa),
                l.level,
                stale,
                Descriptor::EMPTY,
                tlb,
            );
            assert_eq!(r, Err(CasError::Mismatch(l.desc)));
        }
    }

    /// `test_and_clear_young` must report whether the page was mapped and young; the whole
    /// leaf holding it is aged.
    fn clear_young(&mut self, page: u64) {
        let ipa = self.ipa(page);
        let pages = self.leaf_pages(ipa);
        let want = matches!(
            self.model.get(&ipa),
            Some(PageState::Mapped { young: true, .. })
        );
        assert_eq!(self.table.test_and_clear_young(Ipa::new(ipa)), want);
        self.set_young(&pages, false);
    }

    /// `mkyoung` must report whether the page is mapped; the whole leaf holding it is young.
    fn mkyoung(&mut self, page: u64) {
        let ipa = self.ipa(page);
        let pages = self.leaf_pages(ipa);
        let want = matches!(self.model.get(&ipa), Some(PageState::Mapped { .. }));
        assert_eq!(self.table.mkyoung(Ipa::new(ipa)), want);
        self.set_young(&pages, true);
    }

    fn set_young(&mut self, pages: &[u64], to: bool) {
        for p in pages {
            if let Some(PageState::Mapped { young, .. }) = self.model.get_mut(p) {
                *young = to;
            }
        }
    }

    fn cas_perm(&mut self, ipa: u64, perm: Perm) -> Result<(), Error> {
        let tlb = &self.tlb;
        let Some(l) = self.table.lookup(Ipa::new(ipa)) else {
            // A hole: fill it with a page (we hold the "stage-2 lock": single-threaded).
            let new = Descriptor::page(self.setup.frames, S2Attrs::normal(Perm::RW)).unwrap();
            match self
                .table
                .compare_exchange_leaf(Ipa::new(ipa), 3, Descriptor::EMPTY, new, tlb)
            {
                Ok(()) => {
                    self.model
                        .insert(ipa, mapped(self.setup.frames, Perm::RW, false));
                }
                Err(CasError::NoSlot { level, found }) => assert!(level < 3 && found.is_empty()),
                Err(e) => panic!("{e:?}"),
            }
            return Ok(());
        };
        match l.leaf {
            Leaf::Mapped(m) => {
                let perm = Perm {
                    exec: perm.exec && m.attrs.mem == MemType::Normal,
                    ..perm
                };
                self.table
                    .compare_exchange_leaf(
                        Ipa::new(ipa),
                        l.level,
                        l.desc,
                        l.desc.with_perm(perm),
                        tlb,
                    )
                    .unwrap();
                for p in self.pages_in(l.ipa.raw(), l.size()) {
                    if let Some(PageState::Mapped {
                        read, write, exec, ..
                    }) = self.model.get_mut(&p)
                    {
                        (*read, *write, *exec) = (perm.read, perm.write, perm.exec);
                    }
                }
            }
            Leaf::Software(_) => {
                // A migration entry keeps the permission it was given.
                let e = stage2::PageState::Migrating {
                    pfn: Pfn::new(ipa >> 12),
                    writable: perm.write,
                };
                let new = Descriptor::software(e).unwrap();
                self.table
                    .compare_exchange_leaf(Ipa::new(ipa), 3, l.desc, new, tlb)
                    .unwrap();
                self.model.insert(ipa, PageState::Software(e));
            }
        }
        Ok(())
    }
}
