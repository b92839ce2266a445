//! What `nix-tier status` reports: tiers, slots, reservations, running and waiting builds.

use serde::Serialize;
use std::collections::BTreeMap;

use nix_tier_model::{Profile, Tier};

use crate::history::{BuildRecord, Outcome};
use crate::output_locks::HeldLocks;
use crate::state::{self, State};

/// A snapshot of the machine's tiered builds.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The state directory read.
    pub state_dir: String,
    /// Memory all tier builds may reserve, MiB.
    #[serde(rename = "budgetMiB")]
    pub budget_mib: u64,
    /// Memory reserved by running builds, MiB.
    #[serde(rename = "reservedMiB")]
    pub reserved_mib: u64,
    /// Per tier: limits and use.
    pub tiers: BTreeMap<Tier, TierUse>,
    /// Running builds, oldest first.
    pub running: Vec<RunningBuild>,
    /// Waiting builds, oldest first.
    pub waiting: Vec<WaitingBuild>,
    /// Builds the kernel killed at their memory limit in the last day, newest first.
    pub recent_kills: Vec<Kill>,
}

/// A build killed at its memory limit.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Kill {
    /// The .drv path.
    pub drv: String,
    /// Package and version.
    pub name: String,
    /// Its tier.
    pub tier: Tier,
    /// Its memory limit, MiB.
    #[serde(rename = "limitMiB")]
    pub limit_mib: Option<u64>,
    /// Its peak, MiB.
    #[serde(rename = "peakMiB")]
    pub peak_mib: Option<u64>,
    /// Seconds since it started.
    pub ago_seconds: u64,
}

/// How far back `recent_kills` looks.
pub const KILLS_SHOWN_FOR_SECONDS: u64 = 24 * 3600;

/// One tier's limits and how much of them is in use.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TierUse {
    /// `maxJobs`.
    pub max_jobs: u32,
    /// Builds running.
    pub running: u32,
    /// Cores per build.
    pub cores: u32,
    /// Memory per build, MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
}

/// A running build.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunningBuild {
    /// The .drv path.
    pub drv: String,
    /// Its name.
    pub name: String,
    /// Its tier.
    pub tier: Tier,
    /// Its reservation, MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// Seconds since it was admitted.
    pub age_seconds: u64,
}

/// A waiting build.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaitingBuild {
    /// The .drv path.
    pub drv: String,
    /// Its name.
    pub name: String,
    /// Its tier.
    pub tier: Tier,
    /// Seconds since it first waited.
    pub waiting_seconds: u64,
    /// Why it waits.
    pub reason: String,
}

/// Builds the report from `state` (builds whose output locks are gone are left out),
/// `profile`, and the `history` rows (newest first) for recent kills.
pub fn report(mut state: State, profile: &Profile, held: &HeldLocks, history: &[BuildRecord], state_dir: &str) -> Report {
    let now = state::now();
    state.running.retain(|lease| lease.lock_files.iter().any(|f| held.holds(f, lease.nix_pid)));
    state.running.sort_by_key(|l| l.started);
    state.waiting.sort_by_key(|w| w.since);
    let tiers = profile
        .build
        .tiers
        .iter()
        .map(|(tier, limits)| {
            let running = state.running.iter().filter(|l| l.tier == tier).count() as u32;
            (tier, TierUse { max_jobs: limits.max_jobs, running, cores: limits.cores, memory_mib: limits.memory_mib })
        })
        .collect();
    Report {
        state_dir: state_dir.to_string(),
        budget_mib: profile.build.memory_budget_mib,
        reserved_mib: state.running.iter().map(|l| l.memory_mib).sum(),
        tiers,
        running: state
            .running
            .iter()
            .map(|l| RunningBuild {
                drv: l.drv.clone(),
                name: l.name.clone(),
                tier: l.tier,
                memory_mib: l.memory_mib,
                age_seconds: now.saturating_sub(l.started),
            })
            .collect(),
        waiting: state
            .waiting
            .iter()
            .map(|w| WaitingBuild {
                drv: w.drv.clone(),
                name: w.name.clone(),
                tier: w.tier,
                waiting_seconds: now.saturating_sub(w.since),
                reason: w.reason.clone(),
            })
            .collect(),
        recent_kills: history
            .iter()
            .filter(|row| row.outcome == Outcome::OomKilled)
            .map(|row| Kill {
                drv: row.drv.clone(),
                name: format!("{}-{}", row.package, row.version).trim_end_matches('-').to_string(),
                tier: row.tier,
                limit_mib: row.limit_mib,
                peak_mib: row.peak_mib,
                ago_seconds: (now * 1000).saturating_sub(row.started_unix_ms) / 1000,
            })
            .filter(|kill| kill.ago_seconds <= KILLS_SHOWN_FOR_SECONDS)
            .collect(),
    }
}
