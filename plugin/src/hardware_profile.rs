//! The evaluating host's profile: the pinned file when `hardware-profile` is set, else detected
//! once per process (refused in pure evaluation).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

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
        return load_pinned_cached(Path::new(pinned_path));
    }
    if pure_eval {
        return Err(PURE_EVAL_NEEDS_PIN.to_string());
    }
    static DETECTED: OnceLock<Result<Profile, String>> = OnceLock::new();
    DETECTED.get_or_init(|| Profile::detect().map_err(|e| e.to_string())).clone()
}

/// The pinned profile, read again only when the file changes: `optimizeFor` asks for it once per
/// derivation, so an evaluation of thousands of packages must not parse it thousands of times.
fn load_pinned_cached(path: &Path) -> Result<Profile, String> {
    type Cached = (PathBuf, Option<SystemTime>, Profile);
    static CACHE: Mutex<Option<Cached>> = Mutex::new(None);
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut cache = CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((cached_path, cached_modified, profile)) = cache.as_ref() {
        if cached_path == path && modified.is_some() && *cached_modified == modified {
            return Ok(profile.clone());
        }
    }
    let profile = Profile::load_pinned(path).map_err(|e| e.to_string())?;
    *cache = Some((path.to_path_buf(), modified, profile.clone()));
    Ok(profile)
}

/// `builtins.hardwareProfile` as JSON.
pub fn json(pinned_path: &str, pure_eval: bool) -> Result<String, PluginError> {
    let profile = load(pinned_path, pure_eval)
        .map_err(|e| PluginError(format!("builtins.hardwareProfile: {e}")))?;
    Ok(serde_json::to_string(&profile)?)
}
