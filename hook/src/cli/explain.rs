//! `nix-tier explain`: a derivation's tier, the rule that decided it, and what it reserves.

use std::path::PathBuf;

use nix_tier_hook::dispatch::place;
use nix_tier_model::Derivation;

use crate::CommandResult;

/// Show the tier of a derivation, the rule that decided it, and the memory it reserves.
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
    let placement = place(&profile, &drv);
    let tier = placement.classification.tier;
    let limits = profile.build.tiers.get(tier);
    if args.json {
        let json = serde_json::json!({
            "drv": args.drv, "name": placement.name, "tier": tier,
            "reason": placement.classification.reason,
            "memoryMiB": placement.memory_mib, "memorySource": "tier",
            "cores": limits.cores, "maxJobs": limits.max_jobs, "profile": origin,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!("{}: tier {tier} ({})", placement.name, placement.classification.reason);
        println!("  reserves {} MiB (the {tier} tier's memoryMiB), {} cores; {} such builds at once", placement.memory_mib, limits.cores, limits.max_jobs);
        println!("  profile: {origin}");
    }
    Ok(())
}
