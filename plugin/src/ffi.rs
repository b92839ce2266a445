//! The bridge between the C++ shim (cpp-shim/shim.cc) and Rust.
//!
//! Every function here returns `Result`: cxx turns an `Err` into a C++ `rust::Error`, which the
//! shim rethrows as a positioned Nix evaluation error. Panics are caught before they reach cxx
//! (which would abort Nix) and reported as errors too.

#[cxx::bridge(namespace = "nix_tier")]
mod bridge {
    /// optimizeFor's decision for one derivation.
    struct Planned {
        /// When not empty, a JSON list of switches: evaluate the glue's `overrideFacts` with it
        /// and ask again with the answer.
        override_switches: String,
        /// The plan's number in its application, the same for every derivation with this plan.
        plan: u32,
        /// Warnings for the user, each shown once per process.
        warnings: Vec<String>,
    }

    extern "Rust" {
        /// JSON of the hardware profile: the file at `pinned_path` when not empty, else detected.
        fn hardware_profile_json(pinned_path: &str, pure_eval: bool) -> Result<String>;

        /// The Nix source of optimizeFor's glue (`{ overrideFacts; apply; }`).
        fn optimize_for_glue() -> &'static str;

        /// What to read from each derivation: attribute paths, space-separated (`?path`
        /// whether it is there, `!path` whether it is there and not null, `path` its value);
        /// the answers before `|` go to `names_json`, the others to `answers_json`.
        fn optimize_fact_queries() -> &'static str;

        /// Resolves `builtins.optimizeFor`'s options once for the derivations they will be
        /// applied to; returns the handle of this application. `system_features` is Nix's
        /// `system-features` setting, space-separated.
        fn optimize_prepare(
            options_json: &str,
            system_features: &str,
            pinned_path: &str,
            pure_eval: bool,
        ) -> Result<u64>;

        /// The plan for one derivation given to application `handle`: `names_json` is the
        /// list of the answers before `|`, `answers_json` the list of the others, followed by
        /// what `overrideFacts` read when the previous answer asked for it.
        fn optimize_plan(handle: u64, names_json: &str, answers_json: &str) -> Result<Planned>;

        /// Plan `plan` of application `handle`, as JSON for the glue's `apply`.
        fn optimize_plan_json(handle: u64, plan: u32) -> Result<String>;
    }
}

pub(crate) use bridge::Planned;

use crate::{catch_panics, PluginError};

fn hardware_profile_json(pinned_path: &str, pure_eval: bool) -> Result<String, PluginError> {
    catch_panics(|| crate::hardware_profile::json(pinned_path, pure_eval))
}

fn optimize_for_glue() -> &'static str {
    crate::optimize_for::glue()
}

fn optimize_fact_queries() -> &'static str {
    &crate::optimize_for::FACT_QUERIES
}

fn optimize_prepare(
    options_json: &str,
    system_features: &str,
    pinned_path: &str,
    pure_eval: bool,
) -> Result<u64, PluginError> {
    catch_panics(|| crate::optimize_for::prepare(options_json, system_features, pinned_path, pure_eval))
}

fn optimize_plan(handle: u64, names_json: &str, answers_json: &str) -> Result<Planned, PluginError> {
    catch_panics(|| crate::optimize_for::plan(handle, names_json, answers_json))
}

fn optimize_plan_json(handle: u64, plan: u32) -> Result<String, PluginError> {
    catch_panics(|| crate::optimize_for::plan_json(handle, plan))
}
