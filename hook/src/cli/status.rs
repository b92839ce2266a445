//! `nix-tier status`: the tiers, their slots and reservations, and the builds running and waiting.

use std::path::PathBuf;

use nix_tier_hook::dispatch::age;
use nix_tier_hook::history::History;
use nix_tier_hook::output_locks::HeldLocks;
use nix_tier_hook::state::StateDir;
use nix_tier_hook::status::{self, Report};

use crate::CommandResult;

/// Show tiers, slots, reservations, and running and waiting builds machine-wide.
///
/// Reads the state directory the hook uses ($NIX_TIER_STATE_DIR, else $NIX_STATE_DIR/nix-tier).
#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// The hardware profile (default: as the hook finds it).
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
}

/// Runs `nix-tier status`.
pub fn run(args: &Args) -> CommandResult {
    let (profile, _) = super::hook_profile(args.profile.as_deref())?;
    let state_dir = StateDir::from_env();
    let mut state = state_dir.peek()?;
    let held = HeldLocks::read()?;
    // Builds wait only while a broker runs to answer them: a snapshot left by one that is gone
    // keeps its last waiting builds.
    if !held.holds_watcher_lock(&state_dir.path().join(nix_tier_hook::broker::LOCK)) {
        state.waiting.clear();
    }
    // Without a history database (no build finished yet) there are no kills to show.
    let history = match History::open_read_only(state_dir.path())? {
        Some(history) => history.rows(None, 200)?,
        None => Vec::new(),
    };
    let report = status::report(state, &profile, &held, &history, &state_dir.path().display().to_string());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", human(&report));
    }
    Ok(())
}

fn human(report: &Report) -> String {
    let mut out = format!(
        "memory budget: {} of {} MiB reserved\n\n{:<8} {:>5} {:>6} {:>10}\n",
        report.reserved_mib, report.budget_mib, "tier", "jobs", "cores", "memory"
    );
    for (tier, used) in &report.tiers {
        out += &format!("{:<8} {:>5} {:>6} {:>7} MiB\n", tier.as_str(), format!("{}/{}", used.running, used.max_jobs), used.cores, used.memory_mib);
    }
    out += &format!("\nrunning ({}):\n", report.running.len());
    for build in &report.running {
        out += &format!("  {:<7} {:<40} {:>6} MiB  {}\n", build.tier.as_str(), build.name, build.memory_mib, age(build.age_seconds));
    }
    out += &format!("waiting ({}):\n", report.waiting.len());
    for build in &report.waiting {
        out += &format!("  {:<7} {:<40} {}  ({})\n", build.tier.as_str(), build.name, age(build.waiting_seconds), build.reason);
    }
    if !report.recent_kills.is_empty() {
        out += &format!("killed at their memory limit in the last day ({}):\n", report.recent_kills.len());
        let mib = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
        for kill in &report.recent_kills {
            out += &format!(
                "  {:<7} {:<40} limit {} MiB, peak {} MiB, {} ago\n",
                kill.tier.as_str(), kill.name, mib(kill.limit_mib), mib(kill.peak_mib), age(kill.ago_seconds)
            );
        }
    }
    out
}
