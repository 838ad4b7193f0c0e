//! Side-by-side timing for the benchmarks (issue 18): a baseline and a
//! subject run in interleaved pairs, and the result is the median of the
//! per-pair ratios, with their min and max.
//!
//! Why: QEMU's speed (and so the baseline's) drifts and can be bimodal
//! within one run on a shared machine. A pair's two runs see nearly the same
//! machine, so their ratio cancels the drift; the median of ratios ignores a
//! pair that straddled a change of speed; min and max show the spread.
//! Which of the two goes first alternates, so neither always runs on a warm
//! (or cold) cache.

use crate::console::error::CmdError;
use alloc::vec::Vec;
use core::fmt;

/// Pairs per benchmark (at least 5, as issue 18 asks).
pub const PAIRS: usize = 5;

/// The times (counter ticks) of every pair.
pub struct Pairs {
    /// Baseline time of each pair.
    pub base: Vec<u64>,
    /// Subject time of each pair.
    pub subject: Vec<u64>,
}

/// Runs `n` pairs of `base` and `subject`, alternating which goes first;
/// stops at the first error.
pub fn interleave(
    n: usize,
    mut base: impl FnMut() -> Result<u64, CmdError>,
    mut subject: impl FnMut() -> Result<u64, CmdError>,
) -> Result<Pairs, CmdError> {
    let mut p = Pairs {
        base: Vec::with_capacity(n),
        subject: Vec::with_capacity(n),
    };
    for i in 0..n {
        if i % 2 == 0 {
            p.base.push(base()?);
            p.subject.push(subject()?);
        } else {
            p.subject.push(subject()?);
            p.base.push(base()?);
        }
    }
    Ok(p)
}

/// The median of `v` (the lower middle for an even count); 0 when empty.
pub fn median(v: &[u64]) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len().saturating_sub(1) / 2).copied().unwrap_or(0)
}

impl Pairs {
    /// Baseline time / subject time per pair, in hundredths.
    fn ratios(&self) -> Vec<u64> {
        self.base
            .iter()
            .zip(&self.subject)
            .map(|(&b, &s)| b.saturating_mul(100) / s.max(1))
            .collect()
    }

    /// The median, min and max of the per-pair ratios baseline/subject.
    pub fn ratio(&self) -> Ratio {
        let r = self.ratios();
        Ratio {
            median: median(&r),
            min: r.iter().copied().min().unwrap_or(0),
            max: r.iter().copied().max().unwrap_or(0),
            pairs: r.len(),
        }
    }
}

/// A ratio's median, min and max, in hundredths.
#[derive(Clone, Copy, Debug)]
pub struct Ratio {
    /// Median of the per-pair ratios (x100).
    pub median: u64,
    /// Smallest (x100).
    pub min: u64,
    /// Largest (x100).
    pub max: u64,
    /// How many pairs.
    pub pairs: usize,
}

/// `n.nn`.
struct Hundredths(u64);

impl fmt::Display for Hundredths {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

impl fmt::Display for Ratio {
    /// `1.23x (min 1.01x, max 1.40x, median of 5 interleaved pairs)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}x (min {}x, max {}x, median of {} interleaved pairs)",
            Hundredths(self.median),
            Hundredths(self.min),
            Hundredths(self.max),
            self.pairs
        )
    }
}
