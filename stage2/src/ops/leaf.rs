//! Single-leaf operations: software entries, compare-and-swap, Access flag.

use super::split::{page_slot, path_cost};
use super::{cas, load_settled, locked, Reserve};
use crate::flush::OpFlush;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::{
    level_size, CasError, Descriptor, DescriptorKind, Error, Flusher, LeafInfo, Stage2Table,
    TableMemory, LAST_LEVEL, PAGE_SIZE,
};
use mmtypes::{Ipa, PageState};

/// [`Stage2Table::set_software`].
pub(crate) fn set_software<M: TableMemory, F: Flusher + ?Sized>(
    t: &Stage2Table<M>,
    ipa: u64,
    entry: PageState,
    tlb: &F,
) -> Result<Option<LeafInfo>, Error> {
    let new = Descriptor::software(entry)?;
    let mut reserve = Reserve::new(&t.mem, path_cost(t, ipa)?)?;
    let mut flush = OpFlush::new(tlb, t.vttbr());
    let slot =
        page_slot(t, ipa, true, &mut reserve, &mut flush).map_err(|_| Error::BadDescriptor)?;
    let base = ipa & !(PAGE_SIZE - 1);
    loop {
        let old = load_settled(slot);
        if cas(slot, old, new).is_ok() {
            t.counters.account(LAST_LEVEL, old, new);
            if old.is_valid() {
                flush.changed(base, LAST_LEVEL);
            }
            return Ok(LeafInfo::decode(Ipa::new(base), LAST_LEVEL, old));
        }
    }
}

/// Checks `new` may be stored in a leaf slot of `level`.
fn check_new(new: Descriptor, level: u8) -> Result<(), Error> {
    match new.kind(level) {
        DescriptorKind::Empty | DescriptorKind::Leaf { .. } | DescriptorKind::Locked => Ok(()),
        DescriptorKind::Software(_) if level == LAST_LEVEL => Ok(()),
        _ => Err(Error::BadDescriptor),
    }
}

/// Whether changing the valid `old` into `new` needs a TLB invalidation: anything but setting
/// the Access flag or changing software bits.
fn needs_invalidation(old: Descriptor, new: Descriptor) -> bool {
    const AF: u64 = 1 << 10;
    const SW: u64 = 0xF << 55;
    let af_set = if new.raw() & AF != 0 { AF } else { 0 };
    !new.is_valid() || (old.raw() ^ new.raw()) & !SW & !af_set != 0
}

/// [`Stage2Table::compare_exchange_leaf`].
pub(crate) fn compare_exchange_leaf<M: TableMemory, F: Flusher + ?Sized>(
    t: &Stage2Table<M>,
    ipa: u64,
    level: u8,
    expected: Descriptor,
    new: Descriptor,
    tlb: &F,
) -> Result<(), CasError> {
    if !(t.cfg.start_level().max(1)..=LAST_LEVEL).contains(&level) {
        return Err(CasError::Invalid(Error::BadDescriptor));
    }
    check_new(new, level).map_err(CasError::Invalid)?;
    if expected.is_table(level) {
        // Tables are linked and unlinked only by structural operations.
        return Err(CasError::Invalid(Error::BadDescriptor));
    }
    let (found, slot) = t.find_slot(ipa, level).map_err(CasError::Invalid)?;
    if found != level {
        let d = Descriptor::from_raw(slot.load(Ordering::Acquire));
        return Err(CasError::NoSlot {
            level: found,
            found: d,
        });
    }
    let base = ipa & !(level_size(level) - 1);
    let flush = &mut OpFlush::new(tlb, t.vttbr());
    cas_slot(t, slot, base, level, expected, new, true, flush)
}

/// The checked change of one leaf slot: break-before-make when a valid entry gets another
/// output address or attributes, otherwise one CAS; the invalidation the change owes goes to
/// `flush`. `icache`: make the I-cache coherent before a frame becomes executable.
#[allow(clippy::too_many_arguments)]
fn cas_slot<M: TableMemory, F: Flusher + ?Sized>(
    t: &Stage2Table<M>,
    slot: &AtomicU64,
    base: u64,
    level: u8,
    expected: Descriptor,
    new: Descriptor,
    icache: bool,
    flush: &mut OpFlush<'_, F>,
) -> Result<(), CasError> {
    let bbm = expected.is_valid() && new.is_valid() && expected.bbm_bits() != new.bbm_bits();
    let was_exec = expected.is_valid() && expected.perm().exec && !bbm;
    if icache && new.is_valid() && new.perm().exec && !was_exec {
        flush.icache(new.output_address(level), level_size(level));
    }
    if bbm {
        #[cfg(not(feature = "mutate-bbm-blind-lock"))]
        cas(slot, expected, Descriptor::from_raw(locked())).map_err(CasError::Mismatch)?;
        // Broken variant: the break takes the slot without comparing, so an Access-flag
        // update (or another remap) between the caller's read and here is overwritten.
        #[cfg(feature = "mutate-bbm-blind-lock")]
        slot.store(locked(), Ordering::Release);
        flush.break_now(base, level);
        slot.store(new.raw(), Ordering::Release);
    } else {
        cas(slot, expected, new).map_err(CasError::Mismatch)?;
        if expected.is_valid() && needs_invalidation(expected, new) {
            flush.changed(base, level);
        }
    }
    t.counters.account(level, expected, new);
    Ok(())
}

/// [`Stage2Table::update_pages`].
pub(crate) fn update_pages<M: TableMemory, F: Flusher + ?Sized>(
    t: &Stage2Table<M>,
    ipas: &[Ipa],
    f: &mut dyn FnMut(usize, &LeafInfo) -> Option<Descriptor>,
    done: &mut dyn FnMut(usize, Result<(), CasError>),
    tlb: &F,
) {
    let flush = &mut OpFlush::new(tlb, t.vttbr());
    // The last-level table of the previous page, by the 2 MiB it covers.
    let mut table: Option<(u64, u64)> = None;
    for (k, &ipa) in ipas.iter().enumerate() {
        let base = ipa.raw() & !(PAGE_SIZE - 1);
        let span = base & !(level_size(LAST_LEVEL - 1) - 1);
        let (level, slot) = match table {
            Some((at, pa)) if at == span => (LAST_LEVEL, t.slot(pa, LAST_LEVEL, base)),
            _ => match leaf_table(t, base) {
                Ok((level, slot, pa)) => {
                    table = pa.map(|pa| (span, pa));
                    (level, slot)
                }
                Err(e) => {
                    done(k, Err(CasError::Invalid(e)));
                    continue;
                }
            },
        };
        // A hardware Access-flag update may race with us: read again and ask again.
        let mut tries = 0;
        loop {
            let expected = load_settled(slot);
            let Some(info) = LeafInfo::decode(Ipa::new(base), level, expected) else {
                break; // an empty slot: nothing to change
            };
            let Some(new) = f(k, &info) else {
                break;
            };
            if level != LAST_LEVEL {
                // A block: the caller splits it and changes the page its own way.
                done(
                    k,
                    Err(CasError::NoSlot {
                        level,
                        found: expected,
                    }),
                );
                break;
            }
            let r = check_new(new, level)
                .map_err(CasError::Invalid)
                .and_then(|()| cas_slot(t, slot, base, level, expected, new, false, flush));
            if matches!(r, Err(CasError::Mismatch(_))) && tries < 4 {
                tries += 1;
                continue;
            }
            done(k, r);
            break;
        }
    }
}

/// The slot translating page `ipa` at the last level it reaches (a block stops the walk
/// higher), and the last-level table holding it, if it is one.
fn leaf_table<M: TableMemory>(
    t: &Stage2Table<M>,
    ipa: u64,
) -> Result<(u8, &AtomicU64, Option<u64>), Error> {
    let (level, slot, table) = t.find_slot_in(ipa, LAST_LEVEL)?;
    Ok((level, slot, (level == LAST_LEVEL).then_some(table)))
}

/// Sets or clears the Access flag of the valid leaf translating `ipa`. Returns whether a valid
/// leaf was found (setting) or whether the flag was set (clearing).
pub(crate) fn update_young<M: TableMemory>(t: &Stage2Table<M>, ipa: u64, young: bool) -> bool {
    let Ok((level, slot)) = t.find_slot(ipa, LAST_LEVEL) else {
        return false;
    };
    loop {
        let d = Descriptor::from_raw(slot.load(Ordering::Acquire));
        if !matches!(d.kind(level), DescriptorKind::Leaf { .. }) {
            return false;
        }
        if d.young() == young {
            return young;
        }
        if cas(slot, d, d.with_young(young)).is_ok() {
            return true;
        }
    }
}
