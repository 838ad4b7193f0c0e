//! The world of `model.rs`'s random operation sequences: the operations, and one stage-2 table
//! with its recording TLB and the reference model (IPA page -> state), each operation run
//! against the table and the model alike, asserting what the crate reports on the way
//! (results, reported leaves, block levels). `check.rs` compares the two after a step.

mod check;

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
        let tlb = &self.tlb;
        match op {
            Op::Map {
                page,
                npages,
                frame,
                perm,
                device,
                blocks,
            } => {
                let (ipa, len) = self.range(page, npages);
                let attrs = S2Attrs {
                    perm: Perm {
                        exec: perm.exec && !device,
                        ..perm
                    },
                    mem: if device {
                        MemType::Device
                    } else {
                        MemType::Normal
                    },
                    sw: 0,
                };
                let pa = self.frame(frame);
                let occupied = self.pages_in(ipa, len).any(|p| self.model.contains_key(&p));
                let r = if blocks {
                    self.table.map(Ipa::new(ipa), Pa::new(pa), len, attrs, tlb)
                } else {
                    self.table
                        .map_pages(Ipa::new(ipa), Pa::new(pa), len, attrs, tlb)
                };
                if occupied {
                    assert_eq!(r, Err(Error::AlreadyMapped));
                }
                r?;
                for (i, p) in self.pages_in(ipa, len).enumerate() {
                    self.model
                        .insert(p, mapped(pa + i as u64 * PAGE, attrs.perm, device));
                }
            }
            Op::MapBlock {
                block,
                frame_block,
                perm,
            } => {
                let ipa = self.ipa(block * 512);
                let pa = self.frame(frame_block * 512);
                let occupied = self
                    .pages_in(ipa, 512 * PAGE)
                    .any(|p| self.model.contains_key(&p));
                let r = self.table.map(
                    Ipa::new(ipa),
                    Pa::new(pa),
                    512 * PAGE,
                    S2Attrs::normal(perm),
                    tlb,
                );
                assert_eq!(r.is_err(), occupied || r == Err(Error::NoMemory));
                r?;
                if ipa.is_multiple_of(2 << 20) {
                    assert_eq!(
                        self.table.lookup(Ipa::new(ipa)).unwrap().level,
                        2,
                        "2 MiB block expected"
                    );
                }
                for (i, p) in self.pages_in(ipa, 512 * PAGE).enumerate() {
                    self.model
                        .insert(p, mapped(pa + i as u64 * PAGE, perm, false));
                }
            }
            Op::Unmap { page, npages } => {
                let (ipa, len) = self.range(page, npages);
                let mut reported = BTreeMap::new();
                let removed = self.table.unmap(Ipa::new(ipa), len, tlb, |l: &LeafInfo| {
                    let start = l.ipa.raw();
                    assert!(
                        start >= ipa && start + l.size() <= ipa + len,
                        "reported leaf outside the range"
                    );
                    for (i, p) in (start..start + l.size()).step_by(PAGE as usize).enumerate() {
                        let pa = l.pa_of(Ipa::new(start + i as u64 * PAGE));
                        reported.insert(p, pa.map(Pa::raw));
                    }
                })?;
                let mut expect_removed = 0;
                for p in self.pages_in(ipa, len) {
                    let old = self.model.remove(&p);
                    match old {
                        Some(PageState::Mapped { pa, .. }) => {
                            expect_removed += PAGE;
                            assert_eq!(reported.remove(&p), Some(Some(pa)));
                        }
                        Some(PageState::Software(_)) => assert_eq!(reported.remove(&p), Some(None)),
                        None => {}
                    }
                }
                assert!(
                    reported.is_empty(),
                    "reported pages that were not mapped: {reported:?}"
                );
                assert_eq!(removed, expect_removed);
            }
            Op::Protect { page, npages, perm } => {
                let (ipa, len) = self.range(page, npages);
                self.table.protect(Ipa::new(ipa), len, perm, tlb)?;
                for p in self.pages_in(ipa, len) {
                    match self.model.get_mut(&p) {
                        Some(PageState::Mapped {
                            read,
                            write,
                            exec,
                            device,
                            ..
                        }) => {
                            (*read, *write, *exec) = (perm.read, perm.write, perm.exec && !*device);
                        }
                        // A migration entry put back must not be writable either.
                        Some(PageState::Software(stage2::PageState::Migrating {
                            writable,
                            ..
                        })) => *writable &= perm.write,
                        Some(PageState::Software(_)) | None => {}
                    }
                }
            }
            Op::Split { page } => {
                let ipa = self.ipa(page);
                let r = self.table.split_block(Ipa::new(ipa), tlb);
                match self.model.get(&ipa) {
                    Some(PageState::Mapped { .. }) => {
                        r?;
                        assert_eq!(self.table.lookup(Ipa::new(ipa)).unwrap().level, 3);
                    }
                    _ => assert_eq!(r, Err(Error::NotMapped)),
                }
            }
            Op::SetSoftware { page, entry } => {
                let ipa = self.ipa(page);
                let old = self.table.set_software(Ipa::new(ipa), entry, tlb)?;
                let was = self.model.insert(ipa, PageState::Software(entry));
                match (old, was) {
                    (None, None) => {}
                    (Some(l), Some(PageState::Mapped { pa, .. })) => {
                        assert_eq!((l.level, l.pa_of(Ipa::new(ipa))), (3, Some(Pa::new(pa))))
                    }
                    (Some(l), Some(PageState::Software(e))) => assert_eq!(l.software(), Some(e)),
                    other => panic!("set_software returned {other:?}"),
                }
            }
            Op::CasPerm { page, perm } => self.cas_perm(self.ipa(page), perm)?,
            Op::CasRemap { page, frame } => {
                let ipa = self.ipa(page);
                let Some(l) = self.table.lookup(Ipa::new(ipa)) else {
                    return Ok(false);
                };
                let Some(m) = l.mapping().filter(|_| l.level == 3) else {
                    return Ok(false);
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
            Op::UpdateRemap {
                page,
                npages,
                frame,
            } => {
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
                    if let Some(PageState::Mapped { pa: p, young, .. }) =
                        self.model.get_mut(&ipas[k].raw())
                    {
                        (*p, *young) = (new_pa(k), true);
                    }
                }
            }
            Op::CasStale { page } => {
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
            Op::ClearYoung { page } => {
                let ipa = self.ipa(page);
                let pages = self.leaf_pages(ipa);
                let want = matches!(
                    self.model.get(&ipa),
                    Some(PageState::Mapped { young: true, .. })
                );
                assert_eq!(self.table.test_and_clear_young(Ipa::new(ipa)), want);
                self.set_young(&pages, false);
                return Ok(true);
            }
            Op::MkYoung { page } => {
                let ipa = self.ipa(page);
                let pages = self.leaf_pages(ipa);
                let want = matches!(self.model.get(&ipa), Some(PageState::Mapped { .. }));
                assert_eq!(self.table.mkyoung(Ipa::new(ipa)), want);
                self.set_young(&pages, true);
            }
        }
        Ok(false)
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
