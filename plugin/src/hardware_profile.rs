//! The evaluating host's profile: the pinned file when `hardware-profile` is set, else detected
//! once per process (refused in pure evaluation).

use std::path::Path;
use std::sync::OnceLock;

use nix_tier_model::Profile;

use crate::PluginError;

const PURE_EVAL_NEEDS_PIN: &str = "pure evaluation cannot detect the host (the flake evaluation \
     cache would keep a stale value after a hardware change). Pin a profile instead: run \
     'nix-tier profile > /etc/nix/hardware-profile.json' and add \
     'hardware-profile = /etc/nix/hardware-profile.json' to nix.conf \
     (or pass --option hardware-profile FILE).";

/// The host's profile as `builtins.hardwareProfile` returns it.
pub fn load(pinned_path: &str, pure_eval: bool) -> Result<Profile, String> {
    if !pinned_path.is_empty() {
        return Profile::load_pinned(Path::new(pinned_path)).map_err(|e| e.to_string());
    }
    if pure_eval {
        return Err(PURE_EVAL_NEEDS_PIN.to_string());
    }
    static DETECTED: OnceLock<Result<Profile, String>> = OnceLock::new();
    DETECTED.get_or_init(|| Profile::detect().map_err(|e| e.to_string())).clone()
}

/// `builtins.hardwareProfile` as JSON.
pub fn json(pinned_path: &str, pure_eval: bool) -> Result<String, PluginError> {
    let profile = load(pinned_path, pure_eval)
        .map_err(|e| PluginError(format!("builtins.hardwareProfile: {e}")))?;
    Ok(serde_json::to_string(&profile)?)
}
