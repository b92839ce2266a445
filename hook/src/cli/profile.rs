//! `nix-tier profile`: print the detected hardware profile, or check a pinned one.

use std::fmt::Write as _;
use std::path::PathBuf;

use nix_tier_model::Profile;

use crate::CommandResult;

/// Print the detected hardware profile as JSON, or check a pinned profile.
///
/// Pin the detected profile with 'nix-tier profile > /etc/nix/hardware-profile.json', edit
/// it (e.g. the build tiers), and check it with 'nix-tier profile --check FILE'.
#[derive(clap::Args)]
pub struct Args {
    /// Validate the profile in FILE instead of detecting the host.
    #[arg(long, value_name = "FILE")]
    check: Option<PathBuf>,
}

/// Runs `nix-tier profile`.
pub fn run(args: &Args) -> CommandResult {
    match &args.check {
        Some(path) => {
            let profile = Profile::load_pinned(path)?;
            println!("{}: ok ({})", path.display(), summary(&profile));
        }
        None => println!("{}", Profile::detect()?.to_json_pretty()),
    }
    Ok(())
}

/// `schemaVersion 1, skylake, tiers heavy 1/8/10752 medium … as maxJobs/cores/memoryMiB`.
fn summary(profile: &Profile) -> String {
    let mut text = format!(
        "schemaVersion {}, {}, tiers",
        profile.schema_version, profile.cpu.microarchitecture
    );
    for (tier, limits) in profile.build.tiers.iter() {
        // Writing to a String cannot fail.
        let _ = write!(
            text,
            " {tier} {}/{}/{}",
            limits.max_jobs, limits.cores, limits.memory_mib
        );
    }
    text.push_str(" as maxJobs/cores/memoryMiB");
    text
}
