//! Build tiers and the default tier formula.
//!
//! Every build runs in one of three [`Tier`]s. A tier's [`TierLimits`] say how many builds
//! of that tier may run at once (`maxJobs`), how many cores each gets (`cores`, the hook's CPU
//! quota) and how much memory each may use (`memoryMiB`).
//!
//! # Default formula
//!
//! With `T` hardware threads and `M` MiB of RAM (swap and zram are not counted):
//!
//! * system reserve `R = clamp(M / 8, 1024, M / 2)`: an eighth of RAM, at least 1 GiB,
//!   but never more than half of RAM;
//! * memory budget `B = max(1, M - R)`: what all tier builds together may reserve;
//! * tier share `S = B - B / 4`: each tier at full parallelism uses at most three quarters
//!   of the budget, leaving a quarter for builds of the other tiers;
//! * **light**: `l = clamp(S / 2048, 1, T)` jobs (one per thread while each still gets
//!   2 GiB), `clamp(T / 4, 1, 2)` cores and `S / l` MiB each;
//! * **medium**: `m = min(clamp(T / 4, 1, 4), l)` jobs (one per 4 threads, at most 4, never
//!   more than light), `max(1, T / m)` cores and `S / m` MiB each;
//! * **heavy**: 1 job with all `T` threads as cores and `S` MiB.
//!
//! All divisions round down. Every tier satisfies `maxJobs * memoryMiB <= S <= B`, so a tier
//! running at full parallelism never oversubscribes the budget, and a heavier tier never
//! gets less memory per build than a lighter one; cores may be oversubscribed
//! (CPU contention only slows builds down, memory contention kills them).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Memory a light build should get before the formula lowers light parallelism, in MiB.
pub const LIGHT_MIN_MEMORY_MIB: u64 = 2048;

/// Least memory the system reserve keeps out of the budget, in MiB (unless RAM is tiny).
pub const MIN_SYSTEM_RESERVE_MIB: u64 = 1024;

/// How heavy a build is; decides its job, core and memory limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Large builds run one at a time with the whole CPU (compilers, browsers, PGO runtimes).
    Heavy,
    /// Builds that need a few cores and a few GiB.
    Medium,
    /// Small builds that run many at once with few cores each.
    Light,
}

impl Tier {
    /// All tiers, heaviest first.
    pub const ALL: [Tier; 3] = [Tier::Heavy, Tier::Medium, Tier::Light];

    /// The tier's place in [`Tier::ALL`], to keep a figure per tier in an array.
    pub fn index(self) -> usize {
        match self {
            Tier::Heavy => 0,
            Tier::Medium => 1,
            Tier::Light => 2,
        }
    }

    /// The tier's name as spelled in profiles: `heavy`, `medium` or `light`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Heavy => "heavy",
            Tier::Medium => "medium",
            Tier::Light => "light",
        }
    }
}

impl std::str::FromStr for Tier {
    type Err = String;

    /// Parses `heavy`, `medium` or `light`.
    fn from_str(text: &str) -> Result<Tier, String> {
        Tier::ALL
            .into_iter()
            .find(|tier| tier.as_str() == text)
            .ok_or_else(|| format!("unknown tier \"{text}\"; expected heavy, medium or light"))
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Limits for the builds of one tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierLimits {
    /// How many builds of this tier may run at the same time (at least 1).
    pub max_jobs: u32,
    /// Cores each build of this tier gets: the hook's CPU quota (at least 1).
    pub cores: u32,
    /// Memory each build of this tier may use, in MiB (at least 1, at most the budget).
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
}

/// The limits of all three tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierTable {
    /// Limits of [`Tier::Heavy`].
    pub heavy: TierLimits,
    /// Limits of [`Tier::Medium`].
    pub medium: TierLimits,
    /// Limits of [`Tier::Light`].
    pub light: TierLimits,
}

impl TierTable {
    /// The limits of `tier`.
    pub fn get(&self, tier: Tier) -> &TierLimits {
        match tier {
            Tier::Heavy => &self.heavy,
            Tier::Medium => &self.medium,
            Tier::Light => &self.light,
        }
    }

    /// The limits of `tier`, to change them.
    pub fn get_mut(&mut self, tier: Tier) -> &mut TierLimits {
        match tier {
            Tier::Heavy => &mut self.heavy,
            Tier::Medium => &mut self.medium,
            Tier::Light => &mut self.light,
        }
    }

    /// Each tier with its limits, heaviest first.
    pub fn iter(&self) -> impl Iterator<Item = (Tier, &TierLimits)> {
        Tier::ALL
            .into_iter()
            .map(move |tier| (tier, self.get(tier)))
    }
}

/// The system reserve for `total_mib` MiB of RAM: `clamp(M / 8, 1024, M / 2)`.
pub fn system_reserve_mib(total_mib: u64) -> u64 {
    (total_mib / 8)
        .max(MIN_SYSTEM_RESERVE_MIB)
        .min(total_mib / 2)
}

/// The memory budget for `total_mib` MiB of RAM: `max(1, M - reserve)`.
pub fn memory_budget_mib(total_mib: u64) -> u64 {
    (total_mib - system_reserve_mib(total_mib)).max(1)
}

/// The default tiers for `threads` hardware threads and a memory budget of `budget_mib`
/// MiB, by the formula in the [module documentation](self).
pub fn default_tiers(threads: u32, budget_mib: u64) -> TierTable {
    let threads = threads.max(1);
    let budget = budget_mib.max(1);
    let share = budget - budget / 4;

    let light_jobs = u32::try_from(share / LIGHT_MIN_MEMORY_MIB)
        .unwrap_or(u32::MAX)
        .clamp(1, threads);
    let medium_jobs = (threads / 4).clamp(1, 4).min(light_jobs);

    TierTable {
        heavy: TierLimits {
            max_jobs: 1,
            cores: threads,
            memory_mib: share,
        },
        medium: TierLimits {
            max_jobs: medium_jobs,
            cores: (threads / medium_jobs).max(1),
            memory_mib: share / u64::from(medium_jobs),
        },
        light: TierLimits {
            max_jobs: light_jobs,
            cores: (threads / 4).clamp(1, 2),
            memory_mib: share / u64::from(light_jobs),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn eight_threads_sixteen_gib() {
        // The machine of ADR-028: 8 threads, 16 GiB of RAM.
        let budget = memory_budget_mib(16384);
        assert_eq!(budget, 14336);
        let tiers = default_tiers(8, budget);
        let row = |t: &TierLimits| (t.max_jobs, t.cores, t.memory_mib);
        assert_eq!(row(&tiers.heavy), (1, 8, 10752));
        assert_eq!(row(&tiers.medium), (2, 4, 5376));
        assert_eq!(row(&tiers.light), (5, 2, 2150));
    }

    #[test]
    fn tiny_machine_keeps_half_its_ram() {
        assert_eq!(system_reserve_mib(1024), 512);
        assert_eq!(memory_budget_mib(1024), 512);
        let tiers = default_tiers(1, 512);
        assert_eq!(tiers.light.max_jobs, 1);
        assert_eq!(tiers.medium.cores, 1);
    }

    #[test]
    fn tiers_iterate_heaviest_first() {
        let tiers = default_tiers(4, 4096);
        let names: Vec<String> = tiers.iter().map(|(t, _)| t.to_string()).collect();
        assert_eq!(names, ["heavy", "medium", "light"]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn default_tiers_never_oversubscribe_memory(
            threads in 1u32..=1024,
            total_mib in 1u64..=(16u64 << 20),
        ) {
            let budget = memory_budget_mib(total_mib);
            prop_assert!(budget <= total_mib);
            prop_assert!(budget >= 1);
            let tiers = default_tiers(threads, budget);
            prop_assert_eq!(tiers.heavy.max_jobs, 1);
            prop_assert_eq!(tiers.heavy.cores, threads);
            for (tier, limits) in tiers.iter() {
                prop_assert!(limits.max_jobs >= 1, "{tier}: {limits:?}");
                prop_assert!(limits.cores >= 1, "{tier}: {limits:?}");
                prop_assert!(limits.cores <= threads, "{tier}: {limits:?}");
                prop_assert!(limits.memory_mib >= 1, "{tier}: {limits:?}");
                prop_assert!(
                    u64::from(limits.max_jobs) * limits.memory_mib <= budget,
                    "{tier}: {limits:?} over budget {budget}"
                );
            }
            prop_assert!(tiers.light.max_jobs >= tiers.medium.max_jobs);
            prop_assert!(tiers.heavy.memory_mib >= tiers.medium.memory_mib);
            prop_assert!(tiers.medium.memory_mib >= tiers.light.memory_mib);
        }
    }
}
