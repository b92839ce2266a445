//! Shared model of nix-tier: the hardware profile, its detection, and build tiers.
//!
//! A [`Profile`] describes the machine Nix builds on (CPU microarchitecture and compiler
//! targets, memory, swap, GPUs) and how builds share it ([`Build`]: a memory budget and
//! three [`Tier`]s with per-build job, core and memory limits). A profile is either
//! detected on the host ([`Profile::detect`]) or pinned in a JSON file
//! ([`Profile::load_pinned`]); `docs/profile.md` documents the JSON schema.
//!
//! This crate needs no Nix headers: the Nix plugin receives profiles as JSON (see
//! [`hardware_profile_json`]) and the `nix-tier` binary uses the types directly.

#![warn(missing_docs)]

pub mod admission;
pub mod build;
pub mod derivation;
pub mod detect;
pub mod files;
pub mod leases;
pub mod learning;
pub mod optimize;
pub mod profile;
pub mod simulate;
pub mod tiers;
pub mod tune;

use std::path::Path;

pub use build::{Build, Pattern, Rule};
pub use derivation::{Derivation, DerivationError, DerivationOutput, OutputKind};
pub use detect::DetectError;
pub use profile::{Cpu, GccTarget, Gpu, Memory, Profile, ProfileError, Source, Swap, Zram};
pub use tiers::{Tier, TierLimits, TierTable};

/// Returns the hardware profile as compact JSON: the pinned profile at `pinned` when given
/// (validated, with `source` set to `"pinned"`), else the profile detected on this host.
///
/// This is the one call the Nix plugin needs; errors render as complete user-facing messages.
pub fn hardware_profile_json(pinned: Option<&Path>) -> Result<String, ProfileError> {
    let profile = match pinned {
        Some(path) => Profile::load_pinned(path)?,
        None => Profile::detect()?,
    };
    Ok(profile.to_json())
}

#[cfg(test)]
mod test_fixtures {
    use crate::tiers::{TierLimits, TierTable};
    use crate::{Build, Tier};

    /// The build section the policy's tests share: heavy 1 job of 600 MiB, medium 2 of 300,
    /// light 4 of 100, a budget of 1000 MiB, tier mode (every build held to its tier's maxJobs).
    pub fn build() -> Build {
        let limits = |max_jobs, memory_mib| TierLimits { max_jobs, cores: 1, memory_mib };
        Build {
            memory_budget_mib: 1000,
            default_tier: Tier::Light,
            rules: Vec::new(),
            tiers: TierTable { heavy: limits(1, 600), medium: limits(2, 300), light: limits(4, 100) },
            mode: crate::build::Mode::Tiers,
            caps: Vec::new(),
        }
    }
}
