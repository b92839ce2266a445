//! `builtins.optimizeFor`: the plan for one derivation, made by `nix_tier_model::optimize`.

use nix_tier_model::optimize::{self, Facts};

use crate::{hardware_profile, PluginError};

/// The plan as JSON, for the Nix glue in `plugin/nix/optimize-for.nix` to apply.
pub fn plan_json(
    options_json: &str,
    facts_json: &str,
    pinned_path: &str,
    pure_eval: bool,
) -> Result<String, PluginError> {
    let facts: Facts = serde_json::from_str(facts_json)
        .map_err(|e| PluginError(format!("builtins.optimizeFor: internal error reading the derivation's facts: {e}")))?;
    let plan = optimize::plan(options_json, &facts, || hardware_profile::load(pinned_path, pure_eval))?;
    Ok(serde_json::to_string(&plan)?)
}
