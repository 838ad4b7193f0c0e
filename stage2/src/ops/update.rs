//! [`Stage2Table::update_pages`]: many pages changed in one walk, each table descended once.

use super::driver::{OpVisitor, Step, Visit, Walk};
use super::leaf::check_new;
use super::Reserve;
use crate::flush::OpFlush;
use crate::{
    CasError, Descriptor, DescriptorKind, Error, Flusher, LeafInfo, Stage2Table, TableMemory,
    LAST_LEVEL, PAGE_SIZE,
};

/// Compare-and-swaps lost to a racing Access-flag update before the page reports the
/// mismatch: the first attempt and four retries.
const ATTEMPTS: u32 = 5;

/// The visitor: over one run of ascending pages, offers each page's leaf to `f` and installs
/// what it answers.
struct Updater<'a, 'f> {
    ipas: &'a [crate::Ipa],
    /// The next page to handle, and the end of the run.
    k: usize,
    end: usize,
    f: &'f mut dyn FnMut(usize, &LeafInfo) -> Option<Descriptor>,
    done: &'f mut dyn FnMut(usize, Result<(), CasError>),
    /// Attempts of the current page's write that found the slot changed.
    lost: u32,
    /// A write of the current page was asked for and has not landed (yet).
    writing: bool,
}

impl Updater<'_, '_> {
    fn page(&self, k: usize) -> u64 {
        self.ipas[k].raw() & !(PAGE_SIZE - 1)
    }

    /// Whether the next page of the run lies in the slot of `v`.
    fn here(&self, v: &Visit) -> bool {
        self.k < self.end && (v.chunk.start..v.chunk.end).contains(&self.page(self.k))
    }

    /// The current page is handled: on to the next, in this slot again if it is there too.
    fn advance(&mut self, v: &Visit) -> bool {
        self.k += 1;
        self.lost = 0;
        self.writing = false;
        self.here(v)
    }

    fn finish(&mut self, v: &Visit, r: Result<(), CasError>) -> Step<core::convert::Infallible> {
        (self.done)(self.k, r);
        self.skip(v)
    }

    fn skip(&mut self, v: &Visit) -> Step<core::convert::Infallible> {
        if self.advance(v) {
            Step::Again
        } else {
            Step::Next
        }
    }

    /// The current page, in the page slot `v`.
    fn page_slot(&mut self, v: &Visit) -> Step<core::convert::Infallible> {
        if self.writing {
            // The last write found the slot changed (a racing Access-flag update).
            self.writing = false;
            self.lost += 1;
            if self.lost == ATTEMPTS {
                return self.finish(v, Err(CasError::Mismatch(v.desc)));
            }
        }
        let Some(info) = LeafInfo::decode(crate::Ipa::new(self.page(self.k)), v.level, v.desc)
        else {
            return self.skip(v); // an empty slot: nothing to change
        };
        let Some(new) = (self.f)(self.k, &info) else {
            return self.skip(v);
        };
        if let Err(e) = check_new(new, LAST_LEVEL) {
            return self.finish(v, Err(CasError::Invalid(e)));
        }
        self.writing = true;
        Step::Write(new)
    }

    /// Every page of the run in the block (or hole) `v` above the page level: the caller
    /// splits a block and changes the page its own way.
    fn above_pages(&mut self, v: &Visit) {
        while self.here(v) {
            let k = self.k;
            if let Some(info) = LeafInfo::decode(crate::Ipa::new(self.page(k)), v.level, v.desc) {
                if (self.f)(k, &info).is_some() {
                    let found = v.desc;
                    (self.done)(
                        k,
                        Err(CasError::NoSlot {
                            level: v.level,
                            found,
                        }),
                    );
                }
            }
            self.advance(v);
        }
    }
}

impl OpVisitor for Updater<'_, '_> {
    // Never stops: every outcome goes to `done`.
    type Error = core::convert::Infallible;
    const SETTLE: bool = true;

    fn visit(&mut self, v: &Visit) -> Step<Self::Error> {
        if !self.here(v) {
            return Step::Next;
        }
        match v.desc.kind(v.level) {
            DescriptorKind::Table { .. } => Step::Descend,
            _ if v.level == LAST_LEVEL => self.page_slot(v),
            _ => {
                self.above_pages(v);
                Step::Next
            }
        }
    }

    fn written(&mut self, v: &Visit, _: Descriptor) -> bool {
        (self.done)(self.k, Ok(()));
        self.advance(v)
    }
}

/// [`Stage2Table::update_pages`].
pub(crate) fn update_pages<M: TableMemory, F: Flusher + ?Sized>(
    t: &Stage2Table<M>,
    ipas: &[crate::Ipa],
    f: &mut dyn FnMut(usize, &LeafInfo) -> Option<Descriptor>,
    done: &mut dyn FnMut(usize, Result<(), CasError>),
    tlb: &F,
) {
    let flush = &mut OpFlush::new(tlb, t.vttbr());
    let mut u = Updater {
        ipas,
        k: 0,
        end: 0,
        f,
        done,
        lost: 0,
        writing: false,
    };
    let limit = t.cfg.ipa_limit();
    while u.k < ipas.len() {
        if ipas[u.k].raw() >= limit {
            (u.done)(u.k, Err(CasError::Invalid(Error::OutOfRange)));
            u.k += 1;
            continue;
        }
        // A run of ascending pages, reached in one walk: each table holding some is descended
        // into once, and slots without any are passed over without descending.
        let start = u.k;
        u.end = start + 1;
        while u.end < ipas.len() && ipas[u.end].raw() < limit && ipas[u.end] >= ipas[u.end - 1] {
            u.end += 1;
        }
        let walk = Walk::new(t, u.page(start), u.page(u.end - 1) + PAGE_SIZE);
        // Commit only: the visitor never creates or splits, so it needs no pages.
        let r = walk.commit(&mut u, Reserve::empty(&t.mem), flush);
        debug_assert!(
            r.is_ok() && u.k == u.end,
            "stage2: update_pages left a page"
        );
        u.k = u.end;
    }
}
