//! The operations of `World::apply` that map, unmap or change ranges, each run against the
//! table and the model alike, asserting what the crate reports on the way.

use super::{mapped, World, PAGE};
use crate::common::PageState;
use stage2::*;
use std::collections::BTreeMap;

impl World<'_> {
    /// `map` (blocks where alignment allows) or `map_pages` of the clamped run: must fail with
    /// `AlreadyMapped` if any page of it is occupied; on success the model maps every page.
    pub(super) fn map(
        &mut self,
        page: u64,
        npages: u64,
        frame: u64,
        perm: Perm,
        device: bool,
        blocks: bool,
    ) -> Result<(), Error> {
        let tlb = &self.tlb;
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
        Ok(())
    }

    /// `map` of one 2 MiB-sized run of 512 pages: fails exactly when occupied or out of
    /// memory; where the IPA is 2 MiB-aligned it must be a level-2 block.
    pub(super) fn map_block(
        &mut self,
        block: u64,
        frame_block: u64,
        perm: Perm,
    ) -> Result<(), Error> {
        let tlb = &self.tlb;
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
        Ok(())
    }

    /// `unmap` of the clamped run: every reported leaf lies inside it, the reported pages are
    /// exactly the model's (mapped with their PA, software entries without), and the count
    /// removed is the mapped bytes.
    pub(super) fn unmap(&mut self, page: u64, npages: u64) -> Result<(), Error> {
        let tlb = &self.tlb;
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
        Ok(())
    }

    /// `protect` of the clamped run: mapped pages take the permission (never executable if
    /// device), a migration entry loses write if the permission has none.
    pub(super) fn protect(&mut self, page: u64, npages: u64, perm: Perm) -> Result<(), Error> {
        let tlb = &self.tlb;
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
                Some(PageState::Software(stage2::PageState::Migrating { writable, .. })) => {
                    *writable &= perm.write
                }
                Some(PageState::Software(_)) | None => {}
            }
        }
        Ok(())
    }

    /// `split_block` at a page: succeeds where the model maps it, leaving a level-3 page there;
    /// anywhere else it must fail with `NotMapped`.
    pub(super) fn split(&mut self, page: u64) -> Result<(), Error> {
        let tlb = &self.tlb;
        let ipa = self.ipa(page);
        let r = self.table.split_block(Ipa::new(ipa), tlb);
        match self.model.get(&ipa) {
            Some(PageState::Mapped { .. }) => {
                r?;
                assert_eq!(self.table.lookup(Ipa::new(ipa)).unwrap().level, 3);
            }
            _ => assert_eq!(r, Err(Error::NotMapped)),
        }
        Ok(())
    }

    /// `set_software` at a page: the leaf it returns must be what the model had there (a
    /// level-3 page of the same PA, the same software entry, or nothing).
    pub(super) fn set_software(
        &mut self,
        page: u64,
        entry: stage2::PageState,
    ) -> Result<(), Error> {
        let tlb = &self.tlb;
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
        Ok(())
    }
}
