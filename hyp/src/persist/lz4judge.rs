//! Whether a save compresses its pages with LZ4: judged on the first pages
//! of a boot's first save (LZ4's time per page against the device time of
//! the bytes it saves), then kept for the boot's later saves.

use super::save::Split;
use snapfile::Writer;

/// Judges LZ4 once the trial has its numbers, and keeps the verdict for
/// the boot's later saves.
pub(super) fn judge_lz4(w: &mut Writer<'_>, split: &mut Split) {
    if split.lz4_verdict.is_some() {
        return;
    }
    split.lz4_verdict = lz4_pays(w.costs());
    if let Some(v) = split.lz4_verdict {
        *LZ4_VERDICT.lock() = Some((v, 0));
        w.set_compress(v.0);
    } else if w.costs().lz4_pages >= LZ4_TRIAL {
        // Tried on enough pages: raw until the first device batch has timed
        // the disk and the verdict is in.
        w.set_compress(false);
    }
}

/// Most pages the save's next window may stage: while the trial is on, the
/// pages it still has to compress, so it compresses no more than
/// [`LZ4_TRIAL`] (a window is otherwise 128 pages, staged before the next
/// look at the verdict).
pub(super) fn window_cap(w: &Writer<'_>, split: &Split) -> u32 {
    let tried = w.costs().lz4_pages;
    match split.lz4_verdict.is_none() && tried < LZ4_TRIAL {
        true => (LZ4_TRIAL - tried) as u32,
        false => u32::MAX,
    }
}

/// Pages LZ4 is tried on before it is judged: a page's compression time
/// varies little, and the gap the verdict has to see is wide either way
/// (under TCG 88-230 us a page to compress against 0.3 us to write what it
/// saves; on silicon about 1-2 us against a few). Each trial page costs that
/// compression: 128 pages took 11-12 ms of a 90-110 ms first save, 32 take
/// about 3.
const LZ4_TRIAL: u64 = 32;

/// The last LZ4 verdict of this boot and how many saves have used it since.
/// The CPU's compression speed and the disk's do not change within a boot,
/// and the trial is the largest single part of a save under TCG (55-222 ms
/// of ~600 compressed pages), so later saves reuse it; every
/// `LZ4_REJUDGE`th save judges afresh, in case the device's speed moved.
static LZ4_VERDICT: spin::Mutex<Option<(Lz4Verdict, u32)>> = spin::Mutex::new(None);

/// Whether LZ4 pays, and its nanoseconds per page against those writing the
/// bytes it saves would take (`lz4_pays`).
type Lz4Verdict = (bool, u64, u64);

/// Saves that reuse a verdict before one judges again.
const LZ4_REJUDGE: u32 = 16;

/// The verdict to reuse for this save, if any (and counts the use).
pub(super) fn lz4_verdict_cached() -> Option<Lz4Verdict> {
    let mut cached = LZ4_VERDICT.lock();
    let (verdict, uses) = cached.as_mut()?;
    *uses += 1;
    (*uses <= LZ4_REJUDGE).then_some(*verdict)
}

/// Whether compressing pays for itself in time: LZ4's time per page against
/// the device time of the bytes it saves per page (both measured in this
/// save, once the trial pages and a full device write are done). When the
/// CPU compresses slower than the device writes, as under QEMU's TCG, pages
/// are stored raw from then on: a larger image, written sooner (an idle
/// 256 MiB Linux is still under 64 MiB raw). `None` until known.
fn lz4_pays(c: snapfile::Costs) -> Option<(bool, u64, u64)> {
    if c.lz4_pages < LZ4_TRIAL || c.device_bytes < snapfile::BATCH as u64 {
        return None;
    }
    let ns = |ticks: u128| crate::arch::timer::ticks_to_ns(ticks.min(u128::from(u64::MAX)) as u64);
    let lz4 = ns(u128::from(c.lz4) / u128::from(c.lz4_pages));
    let saved = u128::from(c.lz4_saved) / u128::from(c.lz4_pages);
    let write = ns(u128::from(c.device) * saved / u128::from(c.device_bytes));
    Some((lz4 <= write, lz4, write))
}
