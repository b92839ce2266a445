//! Tier admission: whether a build may start now, given the builds already running.
//!
//! The policy (pure; the build hook feeds it the machine-wide state):
//!
//! 1. **Job slots.** A build starts only while fewer than its tier's `maxJobs` builds of that tier
//!    run; in learned mode ([`crate::build::Mode::Learned`]) a build whose reservation was learned
//!    skips this (the budget packs it), unless its tier is capped.
//! 2. **Memory budget.** The reservations of running builds plus its own must fit in
//!    `build.memoryBudgetMiB`. A build that could never fit (nothing else runs and it still does
//!    not) is admitted alone rather than left waiting forever.
//! 3. **No starvation of heavy builds.** Once a heavy build waits, a lighter build is admitted
//!    only if it cannot delay it: the memory the waiting heavy build needs must still be free
//!    when the running heavy builds end. With `reserved` the running reservations, `heavy` the
//!    part of them held by heavy builds, `waiting` the oldest waiting heavy build's reservation
//!    and `new` the candidate's: `reserved + new - heavy + waiting <= budget`.

use std::fmt;

use crate::{Build, Tier};

/// A running (or candidate) build's claim on the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Claim {
    /// Its tier.
    pub tier: Tier,
    /// The memory reserved for it, in MiB.
    pub memory_mib: u64,
    /// Whether `memory_mib` was learned from its package's past builds.
    pub learned: bool,
}

/// The decision for one build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Start it now.
    Admit,
    /// Not now; the reason says what it waits for.
    Wait(WaitReason),
}

/// What a build waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitReason {
    /// Its tier's job slots are all taken.
    TierFull {
        /// The tier.
        tier: Tier,
        /// Builds of that tier running.
        running: u32,
        /// The tier's `maxJobs`.
        max_jobs: u32,
    },
    /// The memory budget cannot hold its reservation now.
    Memory {
        /// Its reservation, MiB.
        needed_mib: u64,
        /// Budget not reserved by running builds, MiB.
        free_mib: u64,
    },
    /// Starting it could delay a heavy build that is already waiting.
    HeavyWaiting {
        /// The waiting heavy build's reservation, MiB.
        heavy_mib: u64,
    },
    /// Its Nix worker has not yet asked about all its ready builds and no heavy build runs: room
    /// is kept for a heavy build it may ask about next.
    HeavyExpected {
        /// A heavy build's reservation (its tier's), MiB.
        heavy_mib: u64,
    },
    /// A waiting build of a higher [`crate::leases::Rank`] (expected to run longer, or as long
    /// and needed by more builds) could start now and would no longer fit.
    LongerFirst {
        /// How long that build is expected to run, milliseconds.
        expected_ms: u64,
        /// How many derivations not built yet need it (0 when not known).
        dependents: u32,
    },
}

impl fmt::Display for WaitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitReason::TierFull { tier, running, max_jobs } => {
                write!(f, "{tier} tier {running}/{max_jobs} busy")
            }
            WaitReason::Memory { needed_mib, free_mib } => {
                write!(f, "memory budget: needs {needed_mib} MiB, {free_mib} MiB free")
            }
            WaitReason::HeavyWaiting { heavy_mib } => {
                write!(f, "a waiting heavy build needs {heavy_mib} MiB first")
            }
            WaitReason::HeavyExpected { heavy_mib } => {
                write!(f, "{heavy_mib} MiB kept for a heavy build until Nix has asked about every ready build")
            }
            WaitReason::LongerFirst { expected_ms, dependents } => {
                write!(f, "a waiting build expected to take {} s", expected_ms.div_ceil(1000))?;
                if *dependents > 0 {
                    write!(f, " and needed by {dependents} unbuilt derivations")?;
                }
                f.write_str(" starts first")
            }
        }
    }
}

/// What the policy reads of the running builds: how many of each tier, and the memory they
/// reserve in all and as heavy builds. Summed once, it decides any number of candidates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Running {
    per_tier: [u32; 3],
    reserved_mib: u64,
    heavy_mib: u64,
}

impl Running {
    /// The builds holding `claims`.
    pub fn of(claims: &[Claim]) -> Running {
        claims.iter().fold(Running::default(), |running, claim| running.with(*claim))
    }

    /// These builds and one more, holding `claim`.
    pub fn with(mut self, claim: Claim) -> Running {
        self.per_tier[claim.tier.index()] += 1;
        // Saturating: profile figures have no upper bound, and an overflow must not admit.
        self.reserved_mib = self.reserved_mib.saturating_add(claim.memory_mib);
        if claim.tier == Tier::Heavy {
            self.heavy_mib = self.heavy_mib.saturating_add(claim.memory_mib);
        }
        self
    }

    fn is_empty(&self) -> bool {
        self.per_tier.iter().all(|n| *n == 0)
    }
}


/// Decides whether `candidate` may start while `running` builds hold their claims.
/// `waiting_heavy` is the reservation of the oldest heavy build waiting (other than the
/// candidate itself), if any.
pub fn decide(build: &Build, running: &[Claim], waiting_heavy: Option<u64>, candidate: Claim) -> Admission {
    decide_among(build, &Running::of(running), waiting_heavy, candidate)
}

/// [`decide`] with the running builds summed already.
pub fn decide_among(build: &Build, running: &Running, waiting_heavy: Option<u64>, candidate: Claim) -> Admission {
    let limits = build.tiers.get(candidate.tier);
    let same_tier = running.per_tier[candidate.tier.index()];
    if same_tier >= limits.max_jobs && build.job_slots_bind(candidate.tier, candidate.learned) {
        return Admission::Wait(WaitReason::TierFull {
            tier: candidate.tier,
            running: same_tier,
            max_jobs: limits.max_jobs,
        });
    }
    let reserved = running.reserved_mib;
    let with_candidate = reserved.saturating_add(candidate.memory_mib);
    let budget = build.memory_budget_mib;
    if with_candidate > budget && !running.is_empty() {
        return Admission::Wait(WaitReason::Memory {
            needed_mib: candidate.memory_mib,
            free_mib: budget.saturating_sub(reserved),
        });
    }
    if let (Some(heavy_mib), true) = (waiting_heavy, candidate.tier != Tier::Heavy) {
        if with_candidate.saturating_sub(running.heavy_mib).saturating_add(heavy_mib) > budget {
            return Admission::Wait(WaitReason::HeavyWaiting { heavy_mib });
        }
    }
    Admission::Admit
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::build;

    #[test]
    fn learned_builds_are_packed_by_the_budget_unless_capped() {
        let mut b = build();
        b.mode = crate::build::Mode::Learned;
        let learned = Claim { tier: Tier::Heavy, memory_mib: 200, learned: true };
        let running = [learned];
        assert_eq!(decide(&b, &running, None, learned), Admission::Admit, "the heavy slot no longer binds");
        assert!(matches!(decide(&b, &running, None, claim(Tier::Heavy)), Admission::Wait(WaitReason::TierFull { .. })));
        b.caps = vec![Tier::Heavy];
        assert!(matches!(decide(&b, &running, None, learned), Admission::Wait(WaitReason::TierFull { .. })));
        // The budget still binds: 5 × 200 = 1000.
        b.caps.clear();
        assert!(matches!(decide(&b, &[learned; 5], None, learned), Admission::Wait(WaitReason::Memory { .. })));
    }

    fn claim(tier: Tier) -> Claim {
        Claim { tier, memory_mib: build().tiers.get(tier).memory_mib, learned: false }
    }

    #[test]
    fn job_slots_bind_per_tier() {
        let b = build();
        assert_eq!(decide(&b, &[], None, claim(Tier::Heavy)), Admission::Admit);
        assert!(matches!(
            decide(&b, &[claim(Tier::Heavy)], None, claim(Tier::Heavy)),
            Admission::Wait(WaitReason::TierFull { running: 1, max_jobs: 1, .. })
        ));
        let four_light = [claim(Tier::Light); 4];
        assert!(matches!(decide(&b, &four_light, None, claim(Tier::Light)), Admission::Wait(_)));
        assert_eq!(decide(&b, &four_light, None, claim(Tier::Medium)), Admission::Admit);
    }

    #[test]
    fn memory_budget_binds_across_tiers() {
        let b = build();
        let running = [claim(Tier::Heavy), claim(Tier::Medium)];
        assert_eq!(
            decide(&b, &running, None, claim(Tier::Medium)),
            Admission::Wait(WaitReason::Memory { needed_mib: 300, free_mib: 100 })
        );
        assert_eq!(decide(&b, &running, None, claim(Tier::Light)), Admission::Admit);
    }

    #[test]
    fn a_build_larger_than_the_budget_runs_alone() {
        let b = build();
        let huge = Claim { tier: Tier::Heavy, memory_mib: 5000, learned: false };
        assert_eq!(decide(&b, &[], None, huge), Admission::Admit);
        assert!(matches!(decide(&b, &[claim(Tier::Light)], None, huge), Admission::Wait(_)));
    }

    #[test]
    fn lighter_builds_cannot_delay_a_waiting_heavy_build() {
        let b = build();
        // Heavy waits for memory held by two medium builds: no new light build may start.
        let running = [claim(Tier::Medium), claim(Tier::Medium)];
        assert_eq!(decide(&b, &running, None, claim(Tier::Light)), Admission::Admit);
        assert_eq!(
            decide(&b, &running, Some(600), claim(Tier::Light)),
            Admission::Wait(WaitReason::HeavyWaiting { heavy_mib: 600 })
        );
        // Heavy waits for the heavy slot: light builds that leave room for it still start.
        let running = [claim(Tier::Heavy)];
        assert_eq!(decide(&b, &running, Some(600), claim(Tier::Light)), Admission::Admit);
        let running = [claim(Tier::Heavy), claim(Tier::Light), claim(Tier::Light), claim(Tier::Light)];
        assert_eq!(decide(&b, &running, Some(600), claim(Tier::Light)), Admission::Admit);
        let running = [claim(Tier::Heavy), claim(Tier::Light), claim(Tier::Light), claim(Tier::Light), claim(Tier::Light)];
        assert!(matches!(decide(&b, &running, Some(600), claim(Tier::Medium)), Admission::Wait(_)));
    }

    #[test]
    fn admitted_sets_never_exceed_limits() {
        // Greedy admission of any sequence keeps every tier within maxJobs and the budget.
        let b = build();
        let order = [Tier::Light, Tier::Heavy, Tier::Medium, Tier::Light, Tier::Medium, Tier::Light,
            Tier::Heavy, Tier::Light, Tier::Light, Tier::Medium];
        for rotation in 0..order.len() {
            let mut running: Vec<Claim> = Vec::new();
            for tier in order.iter().cycle().skip(rotation).take(order.len()) {
                if decide(&b, &running, None, claim(*tier)) == Admission::Admit {
                    running.push(claim(*tier));
                }
            }
            assert!(running.iter().map(|c| c.memory_mib).sum::<u64>() <= b.memory_budget_mib);
            for tier in Tier::ALL {
                let n = running.iter().filter(|c| c.tier == tier).count() as u32;
                assert!(n <= b.tiers.get(tier).max_jobs);
            }
        }
    }
}
