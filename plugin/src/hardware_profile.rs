//! `builtins.hardwareProfile`: a pinned profile, or the host detected once per process.

use std::path::Path;
use std::sync::OnceLock;

use nix_tier_model::Profile;

use crate::PluginError;

/// The profile as JSON: read from `pinned_path` when set, else detected (refused in pure mode).
pub fn json(pinned_path: &str, pure_eval: bool) -> Result<String, PluginError> {
    if !pinned_path.is_empty() {
        let profile = Profile::load_pinned(Path::new(pinned_path))?;
        return Ok(serde_json::to_string(&profile)?);
    }
    if pure_eval {
        return Err(PluginError(
            "builtins.hardwareProfile: pure evaluation cannot detect the host (the flake evaluation \
             cache would keep a stale value after a hardware change). Pin a profile instead: run \
             'nix-tier profile > /etc/nix/hardware-profile.json' and add \
             'hardware-profile = /etc/nix/hardware-profile.json' to nix.conf \
             (or pass --option hardware-profile FILE)."
                .to_string(),
        ));
    }
    static DETECTED: OnceLock<Result<String, String>> = OnceLock::new();
    DETECTED
        .get_or_init(|| {
            Profile::detect()
                .map_err(|e| e.to_string())
                .and_then(|p| serde_json::to_string(&p).map_err(|e| e.to_string()))
        })
        .clone()
        .map_err(PluginError)
}
