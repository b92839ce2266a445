//! The subcommands of `nix-tier`, one module each with an `Args` struct and a `run` function.

pub mod explain;
pub mod history;
pub mod profile;
pub mod report;
pub mod simulate;
pub mod status;
pub mod tune;

use std::path::{Path, PathBuf};

use nix_tier_hook::config;
use nix_tier_hook::protocol::Settings;
use nix_tier_model::Profile;

/// The profile the hook would use, for commands run outside Nix: `--profile FILE`, else as the
/// hook finds it (see `config::profile_path`). Also says which file, or that it was detected.
pub fn hook_profile(explicit: Option<&Path>) -> Result<(Profile, String), String> {
    let path: Option<PathBuf> = explicit.map(Path::to_path_buf).or_else(|| config::profile_path(&Settings::new()));
    let origin = path.as_ref().map_or_else(|| "detected".to_string(), |p| p.display().to_string());
    match path {
        Some(path) => Profile::load_pinned(&path).map_err(|e| e.to_string()).map(|p| (p, origin)),
        None => Profile::detect().map_err(|e| e.to_string()).map(|p| (p, origin)),
    }
}
