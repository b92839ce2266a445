//! The bridge between the C++ shim (cpp-shim/shim.cc) and Rust.
//!
//! Every function here returns `Result`: cxx turns an `Err` into a C++ `rust::Error`, which the
//! shim rethrows as a positioned Nix evaluation error. Panics are caught before they reach cxx
//! (which would abort Nix) and reported as errors too.

#[cxx::bridge(namespace = "nix_tier")]
mod bridge {
    /// optimizeFor's plan for one derivation.
    struct Planned {
        /// The plan, as JSON for the glue's `apply`.
        plan_json: String,
        /// Warnings for the user, each shown once per process.
        warnings: Vec<String>,
    }

    extern "Rust" {
        /// JSON of the hardware profile: the file at `pinned_path` when not empty, else detected.
        fn hardware_profile_json(pinned_path: &str, pure_eval: bool) -> Result<String>;

        /// The Nix source of optimizeFor's glue (`{ inspect; apply; }`).
        fn optimize_for_glue() -> &'static str;

        /// The plan for `builtins.optimizeFor`: what to change in a derivation.
        /// `system_features` is Nix's `system-features` setting, space-separated.
        fn optimize_plan(
            options_json: &str,
            facts_json: &str,
            system_features: &str,
            pinned_path: &str,
            pure_eval: bool,
        ) -> Result<Planned>;
    }
}

use crate::{catch_panics, PluginError};

fn hardware_profile_json(pinned_path: &str, pure_eval: bool) -> Result<String, PluginError> {
    catch_panics(|| crate::hardware_profile::json(pinned_path, pure_eval))
}

fn optimize_for_glue() -> &'static str {
    crate::optimize_for::glue()
}

fn optimize_plan(
    options_json: &str,
    facts_json: &str,
    system_features: &str,
    pinned_path: &str,
    pure_eval: bool,
) -> Result<bridge::Planned, PluginError> {
    catch_panics(|| {
        let (plan_json, warnings) =
            crate::optimize_for::plan_json(options_json, facts_json, system_features, pinned_path, pure_eval)?;
        Ok(bridge::Planned { plan_json, warnings })
    })
}
