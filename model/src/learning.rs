//! Learning a build's memory reservation and limit from the peaks of its past builds.
//!
//! The build hook reserves memory for every build it admits. Without history that is the
//! tier's `memoryMiB`, sized for the largest build the tier may hold; most builds use far less.
//! Once a package has been built, its measured peaks say what it really needs.
//!
//! # The rule
//!
//! Given the memory peaks of a package's recent **successful** builds (newest first) and its
//! tier's `memoryMiB`:
//!
//! 1. Use at most the [`MAX_SAMPLES`] (20) newest peaks: old builds of a package that has since
//!    grown (or shrunk) should stop counting.
//! 2. Without any peak, reserve the tier's `memoryMiB` and limit the build to it
//!    ([`ReservationSource::Tier`]).
//! 3. Otherwise take the 95th percentile by nearest rank, `p95 = sorted[ceil(0.95 n) - 1]`
//!    (with up to 19 samples that is the largest peak, with 20 the second largest: one
//!    outlier among 20 builds is forgiven), **reserve** `clamp(p95, 64 MiB, memoryMiB)` and
//!    **limit** the build to `clamp(ceil(p95 × 1.25), 64 MiB, memoryMiB)`
//!    ([`ReservationSource::Learned`]).
//!
//! The reservation is what the memory budget packs; the limit is where the build's cgroup
//! stops it. Between the two, a build that needs more than last time is not killed: the
//! watcher reads what its cgroup uses and the lease table counts that instead of the
//! reservation ([`crate::leases::LeaseTable::in_use`]), so no further build is admitted into
//! memory it took. This is how cluster schedulers size work (Kubernetes' requests and limits):
//! pack by what was measured, bound by a margin over it.
//!
//! Why these figures:
//!
//! * **p95, not the mean**: the reservation follows the high end of the observed peaks, so a
//!   build that does what it did before never takes more than it reserved.
//! * **no margin on the reservation**: a margin reserves, for every build, memory that only a
//!   build which grows would use, and keeps the largest builds from ever running side by side
//!   (bench/scheduling (e): with × 1.25 reserved, its two largest builds never fit together in
//!   the budget, whatever the order). Growth is paid for when it happens, by counting the memory
//!   in use.
//! * **× 1.25 for the limit**: peaks vary with the inputs (a new version, more tests, a different
//!   parallel schedule); a quarter on top of the worst observed case absorbs ordinary growth.
//!   What lies beyond it is no longer ordinary: the build is killed at its limit, says so in its
//!   log, and sends its package back to the tier's figures (below).
//! * **from the first build**: a rebuild builds each package once, so waiting for several builds
//!   would leave the tiers' guesses in charge for as many rebuilds. Up to 19 peaks the p95 is the
//!   largest anyway, so more builds add observations of the maximum, not another rule.
//! * **at least 64 MiB**: tiny builds (writing a file, copying a script) still need a shell,
//!   the builder's own memory and page cache; reserving less would only make the budget's
//!   arithmetic pretend. 64 MiB is small next to any tier, so it rarely binds.
//! * **at most the tier's `memoryMiB`**: learning only ever lowers a reservation or a limit. The
//!   tier's figure stays the ceiling the profile promises per build; a package that needs more
//!   belongs in a heavier tier (a profile rule), not in a larger learned figure.
//!
//! What the budget then promises: the reservations of the running builds, each counted at what
//! it uses once that is more, fit in it whenever a build is admitted. Builds admitted before
//! another grew may together use up to their limits: at most a quarter more than their learned
//! reservations, which the system reserve outside the budget (an eighth of RAM by default,
//! docs/profile.md) absorbs for ordinary growth.
//!
//! Which builds count is up to the caller: the broker passes the succeeded builds of the
//! package *since its last OOM kill* ([`Learned::peaks`], which the command line reads from
//! the history as the broker does), so a build killed
//! for lack of memory sends the package back to the tier's figure until it has succeeded again.
//! Failed builds are ignored (their peaks say nothing about what a whole build needs).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Tier;

/// Fewest peaks from which a reservation is learned.
pub const MIN_SAMPLES: usize = 1;


/// Most peaks (the newest) a reservation is learned from.
pub const MAX_SAMPLES: usize = 20;

/// The percentile of the peaks the reservation covers.
pub const PERCENTILE: u32 = 95;

/// The margin of a learned limit over the percentile, as a fraction
/// `LIMIT_MARGIN_NUM / LIMIT_MARGIN_DEN` (1.25).
pub const LIMIT_MARGIN_NUM: u64 = 5;
/// See [`LIMIT_MARGIN_NUM`].
pub const LIMIT_MARGIN_DEN: u64 = 4;

/// The smallest learned reservation or limit, MiB (unless the tier's figure is smaller still).
pub const FLOOR_MIB: u64 = 64;

/// How long a build of `tier` is guessed to run when its package has no history,
/// milliseconds: what orders waiting builds longest first before anything is learned.
pub fn guessed_wall_ms(tier: Tier) -> u64 {
    match tier {
        Tier::Heavy => 30 * 60_000,
        Tier::Medium => 5 * 60_000,
        Tier::Light => 30_000,
    }
}

/// The memory a build reserves, the limit it runs under, and where the figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// Memory to reserve, MiB: what the budget packs.
    pub memory_mib: u64,
    /// The memory limit of its cgroup, MiB: at least `memory_mib`.
    pub limit_mib: u64,
    /// Where it comes from.
    pub source: ReservationSource,
}

/// Where a reservation comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationSource {
    /// The tier's `memoryMiB`: too few past builds to learn from.
    Tier,
    /// Learned from past builds.
    Learned {
        /// How many peaks it was learned from (at most [`MAX_SAMPLES`]).
        samples: usize,
        /// Their 95th percentile (nearest rank), MiB.
        p95_mib: u64,
    },
}

impl ReservationSource {
    /// `"tier"` or `"learned"`, as `nix-tier explain --json` spells it.
    pub fn as_str(&self) -> &'static str {
        match self {
            ReservationSource::Tier => "tier",
            ReservationSource::Learned { .. } => "learned",
        }
    }
}

impl fmt::Display for ReservationSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReservationSource::Tier => f.write_str("the tier's memoryMiB"),
            ReservationSource::Learned { samples, p95_mib } => {
                let builds = if *samples == 1 { "build" } else { "builds" };
                write!(f, "learned from {samples} {builds} (p95 {p95_mib} MiB)")
            }
        }
    }
}

/// The reservation and limit of a build whose package peaked at `peaks_mib` (MiB, newest
/// first) in its past builds, in a tier whose `memoryMiB` is `tier_limit_mib`. See the
/// [module docs](self) for the rule.
pub fn reservation(peaks_mib: &[u64], tier_limit_mib: u64) -> Reservation {
    let mut recent: Vec<u64> = peaks_mib.iter().take(MAX_SAMPLES).copied().collect();
    if recent.len() < MIN_SAMPLES {
        return Reservation { memory_mib: tier_limit_mib, limit_mib: tier_limit_mib, source: ReservationSource::Tier };
    }
    recent.sort_unstable();
    let p95_mib = nearest_rank(&recent, PERCENTILE).expect("at least MIN_SAMPLES peaks");
    // ceil(p95 × 5/4) without overflow.
    let margin = (u128::from(p95_mib) * u128::from(LIMIT_MARGIN_NUM)).div_ceil(u128::from(LIMIT_MARGIN_DEN));
    let within_tier = |mib: u64| mib.max(FLOOR_MIB).min(tier_limit_mib);
    Reservation {
        memory_mib: within_tier(p95_mib),
        limit_mib: within_tier(u64::try_from(margin).unwrap_or(u64::MAX)),
        source: ReservationSource::Learned { samples: recent.len(), p95_mib },
    }
}

/// How a build ended, as the history records it (and learning counts it: only a success's
/// figures count, and an OOM kill sets its package's learning back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// It succeeded.
    Succeeded,
    /// It failed (not for lack of memory, as far as the watcher saw).
    Failed,
    /// The kernel's OOM killer ended it (the cgroup hit its memory limit).
    OomKilled,
}

impl Outcome {
    /// `succeeded`, `failed` or `oom-killed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::OomKilled => "oom-killed",
        }
    }
}

impl FromStr for Outcome {
    type Err = String;

    fn from_str(text: &str) -> Result<Outcome, String> {
        [Outcome::Succeeded, Outcome::Failed, Outcome::OomKilled]
            .into_iter()
            .find(|o| o.as_str() == text)
            .ok_or_else(|| format!("unknown outcome \"{text}\""))
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the build history says of each package, kept in memory by the process that records the
/// builds (the broker), so that deciding about a build reads no database; the command line
/// reads it from the history too (`nix_tier_hook::history::History::learned`). Builds may be
/// recorded into it in any order.
#[derive(Debug, Default, Clone)]
pub struct Learned {
    packages: HashMap<String, PackageRecord>,
}

/// One package's newest figures.
#[derive(Debug, Default, Clone)]
struct PackageRecord {
    /// Its newest succeeded builds that have a peak, as (start, peak MiB), newest first, at most
    /// [`MAX_SAMPLES`]: every answer is among them.
    peaks: Vec<(u64, u64)>,
    /// Its newest succeeded builds, as (start, wall time ms), newest first, at most
    /// [`MAX_SAMPLES`].
    walls: Vec<(u64, u64)>,
    /// When its latest build killed for lack of memory started.
    last_oom_started: Option<u64>,
}

/// Puts `(started, value)` among `newest` (newest first; of equal starts, the one recorded last
/// first) and keeps the [`MAX_SAMPLES`] newest.
fn keep_newest(newest: &mut Vec<(u64, u64)>, started: u64, value: u64) {
    let at = newest.partition_point(|(s, _)| *s > started);
    newest.insert(at, (started, value));
    newest.truncate(MAX_SAMPLES);
}

impl Learned {
    /// Counts a finished build of `package` that started at `started_unix_ms`.
    pub fn record(&mut self, package: &str, started_unix_ms: u64, outcome: Outcome, wall_ms: u64, peak_mib: Option<u64>) {
        let record = self.packages.entry(package.to_string()).or_default();
        match outcome {
            Outcome::Succeeded => {
                keep_newest(&mut record.walls, started_unix_ms, wall_ms);
                if let Some(peak) = peak_mib {
                    keep_newest(&mut record.peaks, started_unix_ms, peak);
                }
            }
            Outcome::OomKilled => {
                record.last_oom_started = record.last_oom_started.max(Some(started_unix_ms));
            }
            Outcome::Failed => {}
        }
    }

    /// The peaks (MiB, newest first) `package`'s reservation is learned from ([`reservation`]):
    /// of its succeeded builds that started after its latest OOM kill, at most [`MAX_SAMPLES`].
    pub fn peaks(&self, package: &str) -> Vec<u64> {
        let Some(record) = self.packages.get(package) else { return Vec::new() };
        record
            .peaks
            .iter()
            .take_while(|(started, _)| record.last_oom_started.is_none_or(|oom| *started > oom))
            .map(|(_, peak)| *peak)
            .collect()
    }

    /// How long `package`'s builds take, milliseconds: the median (the upper one of an even
    /// count) wall time of its newest succeeded builds, at most [`MAX_SAMPLES`]; `None` without
    /// any.
    pub fn expected_wall_ms(&self, package: &str) -> Option<u64> {
        let mut walls: Vec<u64> = self.packages.get(package)?.walls.iter().map(|(_, wall)| *wall).collect();
        walls.sort_unstable();
        walls.get(walls.len() / 2).copied()
    }
}

/// The `percent`th percentile of `sorted` (ascending) by nearest rank:
/// `sorted[ceil(percent/100 × n) - 1]`, the smallest value at least `percent`% of the values
/// do not exceed. `None` when `sorted` is empty; `percent` is capped at 100.
pub fn nearest_rank(sorted: &[u64], percent: u32) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    let rank = (n * percent.min(100) as usize).div_ceil(100).max(1);
    Some(sorted[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn no_samples_use_the_tier() {
        assert_eq!(reservation(&[], 4096), Reservation { memory_mib: 4096, limit_mib: 4096, source: ReservationSource::Tier });
    }

    #[test]
    fn one_sample_is_learned_from() {
        let r = reservation(&[100], 4096);
        assert_eq!(r, Reservation { memory_mib: 100, limit_mib: 125, source: ReservationSource::Learned { samples: 1, p95_mib: 100 } });
        assert_eq!(r.source.to_string(), "learned from 1 build (p95 100 MiB)");
        let two = reservation(&[100, 201], 4096);
        assert_eq!((two.memory_mib, two.limit_mib), (201, 252));
    }

    #[test]
    fn three_samples_reserve_their_p95_and_limit_it_times_1_25() {
        // p95 of three is the largest; 330 × 1.25 = 412.5 → 413.
        let r = reservation(&[300, 330, 250], 8192);
        assert_eq!(r, Reservation { memory_mib: 330, limit_mib: 413, source: ReservationSource::Learned { samples: 3, p95_mib: 330 } });
        assert_eq!(r.source.to_string(), "learned from 3 builds (p95 330 MiB)");
    }

    #[test]
    fn only_the_twenty_newest_count_and_one_outlier_in_twenty_is_forgiven() {
        let mut peaks = vec![100; 20];
        peaks[7] = 5000; // one outlier among the 20 newest
        peaks.push(9000); // 21st newest: ignored
        let r = reservation(&peaks, 8192);
        assert_eq!(r.source, ReservationSource::Learned { samples: 20, p95_mib: 100 });
        assert_eq!((r.memory_mib, r.limit_mib), (100, 125));
        // Two outliers among 20: p95 is an outlier.
        peaks[8] = 4000;
        assert_eq!(reservation(&peaks, 8192).source, ReservationSource::Learned { samples: 20, p95_mib: 4000 });
    }

    #[test]
    fn floor_and_ceiling() {
        let tiny = reservation(&[1, 2, 3], 8192);
        assert_eq!((tiny.memory_mib, tiny.limit_mib), (FLOOR_MIB, FLOOR_MIB));
        let small_tier = reservation(&[1, 2, 3], 32);
        assert_eq!((small_tier.memory_mib, small_tier.limit_mib), (32, 32));
        let capped = reservation(&[7000, 7000, 7000], 8192);
        assert_eq!((capped.memory_mib, capped.limit_mib), (7000, 8192));
        assert_eq!(capped.source, ReservationSource::Learned { samples: 3, p95_mib: 7000 });
        let largest = reservation(&[u64::MAX; 3], u64::MAX);
        assert_eq!((largest.memory_mib, largest.limit_mib), (u64::MAX, u64::MAX));
    }

    #[test]
    fn learned_keeps_the_newest_and_forgets_peaks_before_an_oom_kill() {
        let mut learned = Learned::default();
        assert_eq!((learned.peaks("p"), learned.expected_wall_ms("p")), (vec![], None));
        for started in 0..30 {
            learned.record("p", started, Outcome::Succeeded, 1000 + started, Some(started));
        }
        learned.record("p", 100, Outcome::Failed, 1, Some(1));
        // Recorded out of order (builds end in another order than they start).
        learned.record("p", 5, Outcome::Succeeded, 1, Some(999));
        assert_eq!(learned.peaks("p"), (10..30).rev().collect::<Vec<u64>>());
        assert_eq!(learned.expected_wall_ms("p"), Some(1020));
        learned.record("p", 25, Outcome::OomKilled, 1, None);
        assert_eq!(learned.peaks("p"), vec![29, 28, 27, 26]);
        // An earlier OOM kill recorded later moves nothing.
        learned.record("p", 20, Outcome::OomKilled, 1, None);
        assert_eq!(learned.peaks("p"), vec![29, 28, 27, 26]);
        // Walls count whatever the OOM kills; a build without a peak still has one.
        learned.record("p", 40, Outcome::Succeeded, 5000, None);
        assert_eq!(learned.peaks("p"), vec![29, 28, 27, 26]);
        assert_eq!(learned.expected_wall_ms("p"), Some(1021));
        assert_eq!(learned.peaks("other"), Vec::<u64>::new());
    }

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(nearest_rank(&[], 95), None);
        assert_eq!(nearest_rank(&[5], 95), Some(5));
        assert_eq!(nearest_rank(&[1, 2, 3, 4], 50), Some(2));
        assert_eq!(nearest_rank(&[1, 2, 3, 4, 5], 50), Some(3));
        let twenty: Vec<u64> = (1..=20).collect();
        assert_eq!(nearest_rank(&twenty, 95), Some(19));
        assert_eq!(nearest_rank(&twenty[..19], 95), Some(19));
        assert_eq!(nearest_rank(&twenty, 100), Some(20));
        assert_eq!(nearest_rank(&twenty, 0), Some(1));
    }

    proptest! {
        #[test]
        fn reservation_stays_within_bounds(peaks in proptest::collection::vec(0u64..1 << 40, 0..40), limit in 0u64..1 << 41) {
            let r = reservation(&peaks, limit);
            prop_assert!(r.memory_mib >= FLOOR_MIB.min(limit), "{r:?} below the floor");
            prop_assert!(r.memory_mib <= r.limit_mib, "{r:?} reserves more than its limit");
            prop_assert!(r.limit_mib <= limit, "{r:?} above the tier's {limit}");
            match r.source {
                ReservationSource::Tier => {
                    prop_assert!(peaks.is_empty());
                    prop_assert_eq!((r.memory_mib, r.limit_mib), (limit, limit));
                }
                ReservationSource::Learned { samples, p95_mib } => {
                    prop_assert_eq!(samples, peaks.len().min(MAX_SAMPLES));
                    prop_assert!(peaks[..samples].contains(&p95_mib));
                    // Within the tier, the reservation is the p95 and the limit has its margin.
                    if p95_mib <= limit {
                        prop_assert_eq!(r.memory_mib, p95_mib.max(FLOOR_MIB.min(limit)));
                    }
                    if u128::from(p95_mib) * 5 <= u128::from(limit) * 4 {
                        prop_assert!(r.limit_mib >= p95_mib + p95_mib / 4);
                    }
                    // At least 95% of the samples fit in the reservation's p95.
                    let covered = peaks[..samples].iter().filter(|&&p| p <= p95_mib).count();
                    prop_assert!(covered * 100 >= samples * 95);
                }
            }
        }
    }
}
