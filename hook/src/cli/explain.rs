//! `nix-tier explain`: a derivation's tier, the rule that decided it, what it reserves and its
//! memory limit.

use std::path::PathBuf;

use nix_tier_hook::dispatch::place;
use nix_tier_hook::history::History;
use nix_tier_hook::state::StateDir;
use nix_tier_model::build::package_name;
use nix_tier_model::learning::ReservationSource;
use nix_tier_model::Derivation;

use crate::CommandResult;

/// Show the tier of a derivation, the rule that decided it, the memory it reserves and its
/// memory limit.
///
/// The reservation and the limit are learned from the package's past builds in the build history
/// ($NIX_TIER_STATE_DIR/history.sqlite, else $NIX_STATE_DIR/nix-tier/history.sqlite) once there
/// are enough; see docs/enforcement.md, "Learning".
#[derive(clap::Args)]
pub struct Args {
    /// The .drv file (e.g. from 'nix-instantiate').
    drv: PathBuf,
    /// The hardware profile (default: as the hook finds it).
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `nix-tier explain`.
pub fn run(args: &Args) -> CommandResult {
    let (profile, origin) = super::hook_profile(args.profile.as_deref())?;
    let drv = Derivation::read(&args.drv)?;
    // What the history says of every package, as the broker reads it when it starts.
    let figures = History::open_read_only(StateDir::from_env().path()).and_then(|h| h.map(|h| h.learned()).transpose());
    let known = figures.as_ref().ok().and_then(Option::as_ref);
    let placement = place(&profile, &drv, known);
    let history_error = figures.as_ref().err().map(ToString::to_string);
    let tier = placement.classification.tier;
    let limits = profile.build.tiers.get(tier);
    let package = package_name(&placement.name);
    // How many builds the rule saw (for "1 of 3 builds needed").
    let samples = match placement.memory_source {
        ReservationSource::Learned { samples, .. } => samples,
        ReservationSource::Tier => known.map_or(0, |known| known.peaks(package).len()),
    };
    let why = match (placement.memory_source, &history_error) {
        (ReservationSource::Learned { p95_mib, .. }, _) if p95_mib > placement.memory_mib => {
            format!("{}, capped at the {tier} tier's memoryMiB", placement.memory_source)
        }
        (ReservationSource::Learned { .. }, _) => placement.memory_source.to_string(),
        (ReservationSource::Tier, Some(error)) => format!("the {tier} tier's memoryMiB (build history unavailable: {error})"),
        (ReservationSource::Tier, None) => format!("the {tier} tier's memoryMiB (no successful build of {package} yet)"),
    };
    let limit = match placement.memory_source {
        ReservationSource::Learned { .. } if placement.limit_mib == limits.memory_mib => {
            format!("the p95 × 1.25, capped at the {tier} tier's memoryMiB")
        }
        ReservationSource::Learned { .. } => "the p95 × 1.25".to_string(),
        ReservationSource::Tier => format!("the {tier} tier's memoryMiB"),
    };
    if args.json {
        let learned = match placement.memory_source {
            ReservationSource::Learned { samples, p95_mib } => serde_json::json!({ "samples": samples, "p95MiB": p95_mib }),
            ReservationSource::Tier => serde_json::Value::Null,
        };
        let json = serde_json::json!({
            "drv": args.drv, "name": placement.name, "package": package, "tier": tier,
            "reason": placement.classification.reason,
            "memoryMiB": placement.memory_mib, "memorySource": placement.memory_source.as_str(),
            "memoryReason": why, "limitMiB": placement.limit_mib, "limitReason": limit, "learned": learned, "historySamples": samples,
            "historyError": history_error, "tierMemoryMiB": limits.memory_mib,
            "cores": limits.cores, "maxJobs": limits.max_jobs, "profile": origin,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!("{}: tier {tier} ({})", placement.name, placement.classification.reason);
        println!("  reserves {} MiB: {why}", placement.memory_mib);
        println!("  limited to {} MiB: {limit}", placement.limit_mib);
        println!("  {} cores; {} such builds at once", limits.cores, limits.max_jobs);
        println!("  profile: {origin}");
    }
    Ok(())
}
