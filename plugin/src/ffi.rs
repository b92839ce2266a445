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

    /// The Nix code of one plan of an application.
    struct PlanCode {
        /// The number of `source` in the application: plans that differ only in their record
        /// have the same code.
        shape: u32,
        /// Nix source of a function of the plan's record that returns the function of
        /// derivations applying the plan.
        source: String,
        /// The plan's record, `passthru.nixTier` without `original`: JSON of its JSON text.
        info: String,
    }

    extern "Rust" {
        /// JSON of the hardware profile: the file at `pinned_path` when not empty, else detected.
        fn hardware_profile_json(pinned_path: &str, pure_eval: bool) -> Result<String>;

        /// The Nix source of optimizeFor's glue (`{ overrideFacts; }`).
        fn optimize_for_glue() -> &'static str;

        /// What to read from each derivation: attribute paths, space-separated (`?path`
        /// whether it is there, `!path` whether it is there and not null, `=path` whether it
        /// is `true`, `path` its value); the answers before `|` go to `names`, the others to
        /// `answers`, written as plugin/src/optimize_for.rs's `FACT_QUERIES` says.
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

        /// The plan for one derivation given to application `handle`: `names` are the answers
        /// before `|`, `answers` the others, followed by what `overrideFacts` read (as the
        /// answer of a value) when the previous call asked for it.
        fn optimize_plan(handle: u64, names: &[u8], answers: &[u8]) -> Result<Planned>;

        /// The Nix code of plan `plan` of application `handle`.
        fn optimize_plan_code(handle: u64, plan: u32) -> Result<PlanCode>;
    }
}

pub(crate) use bridge::{PlanCode, Planned};

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

fn optimize_plan(handle: u64, names: &[u8], answers: &[u8]) -> Result<Planned, PluginError> {
    catch_panics(|| crate::optimize_for::plan(handle, names, answers))
}

fn optimize_plan_code(handle: u64, plan: u32) -> Result<PlanCode, PluginError> {
    catch_panics(|| crate::optimize_for::plan_code(handle, plan))
}
