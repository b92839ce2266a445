//! `builtins.optimizeFor`: the plan for one derivation, made by `nix_tier_model::optimize`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::SystemTime;

use nix_tier_model::optimize::{self, Facts, Prepared, SWITCHES, VARIABLES};

use crate::{hardware_profile, PluginError};

/// The Nix glue (`{ inspect; apply; }`), given the model's lists of variables and switches.
pub fn glue() -> &'static str {
    static GLUE: LazyLock<String> = LazyLock::new(|| {
        let list = |names: &[&str]| names.iter().map(|n| format!("\"{n}\" ")).collect::<String>();
        format!(
            "({}) {{ variables = [ {}]; switches = [ {}]; }}",
            include_str!("../nix/optimize-for.nix"),
            list(VARIABLES),
            list(SWITCHES)
        )
    });
    &GLUE
}

/// The plan as JSON, for the glue to apply, and the warnings not yet shown in this process.
/// `system_features` is Nix's `system-features` setting, space-separated.
pub fn plan_json(
    options_json: &str,
    facts_json: &str,
    system_features: &str,
    pinned_path: &str,
    pure_eval: bool,
) -> Result<(String, Vec<String>), PluginError> {
    let facts: Facts = serde_json::from_str(facts_json)
        .map_err(|e| PluginError(format!("builtins.optimizeFor: internal error reading the derivation's facts: {e}")))?;
    let features: BTreeSet<String> = system_features.split_whitespace().map(str::to_string).collect();
    let prepared = prepared(options_json, pinned_path, pure_eval)?;
    let mut plan = optimize::plan_prepared(&prepared, &facts, Some(&features))?;
    let warnings = first_time(std::mem::take(&mut plan.warnings));
    Ok((serde_json::to_string(&plan)?, warnings))
}

/// The options resolved, once per distinct options (and pinned profile file) in this process:
/// an overlay applies the same options to many packages, and resolving them (profile, archspec
/// target, host check) costs more than planning one derivation.
fn prepared(options_json: &str, pinned_path: &str, pure_eval: bool) -> Result<Arc<Prepared>, PluginError> {
    type Key = (String, String, Option<SystemTime>, bool);
    static CACHE: LazyLock<Mutex<HashMap<Key, Arc<Prepared>>>> = LazyLock::new(Default::default);
    // A pinned file edited during the evaluation is read again.
    let modified = (!pinned_path.is_empty())
        .then(|| std::fs::metadata(pinned_path).and_then(|m| m.modified()).ok())
        .flatten();
    let key = (options_json.to_string(), pinned_path.to_string(), modified, pure_eval);
    if let Some(prepared) = CACHE.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(Arc::clone(prepared));
    }
    let prepared = Arc::new(optimize::prepare(options_json, || hardware_profile::load(pinned_path, pure_eval))?);
    CACHE.lock().unwrap_or_else(|p| p.into_inner()).insert(key, Arc::clone(&prepared));
    Ok(prepared)
}

/// The warnings not shown before: one evaluation optimises many packages alike.
fn first_time(warnings: Vec<String>) -> Vec<String> {
    static SHOWN: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Default::default);
    if warnings.is_empty() {
        return warnings;
    }
    let mut shown = SHOWN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    warnings.into_iter().filter(|w| shown.insert(w.clone())).collect()
}
