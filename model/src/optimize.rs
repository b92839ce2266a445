//! The plan behind `builtins.optimizeFor`: which compiler flags, system features, package
//! switches and build tier a derivation gets for a target CPU.
//!
//! Pure: the inputs are the caller's options, facts the plugin's Nix glue read from the
//! derivation ([`Facts`]), and the evaluating host's profile; the output ([`Plan`]) is applied by
//! that glue through `override`/`overrideAttrs`. docs/optimize-for.md documents the interface.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use archspec::cpu::Microarchitecture;
use serde::{Deserialize, Serialize};

use crate::build::package_name;
use crate::detect;
use crate::{Profile, ProfileError, Tier};

/// Packages known to break under aggressive CPU flags (see nixpkgs reports); the user's `optOut`
/// is merged over this list.
pub const DEFAULT_OPT_OUT: &[(&str, &str)] = &[
    ("libvorbis", "test failures with -march=znver4"),
    ("gsl", "test failures with -march=icelake"),
    ("opencolorio", "FMA contraction changes its results"),
    ("simde", "AVX-512 miscompilation with GCC 14"),
];

/// The derivation attribute that names a build's tier; the build hook reads it from the .drv.
pub const TIER_ATTRIBUTE: &str = "NIX_TIER";

/// The caller's options (the first argument of `builtins.optimizeFor`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Options {
    /// The machine the build is for; the host's profile when absent.
    pub profile: Option<serde_json::Value>,
    /// An archspec microarchitecture name; the profile's microarchitecture when absent.
    pub target: Option<String>,
    /// The `-O` level to add; the package's own when absent.
    pub opt_level: Option<OptLevel>,
    /// Ask for link-time optimisation through the package's `enableLTO` switch.
    #[serde(default)]
    pub lto: bool,
    /// Ask for profile-guided optimisation (`enableOptimizations` or `enablePGO`).
    #[serde(default)]
    pub pgo: bool,
    /// The build tier; classified from the profile when absent.
    pub tier: Option<Tier>,
    /// Allow targets the evaluating host cannot run.
    #[serde(default)]
    pub for_another_machine: bool,
    /// Package name → whether to leave it unoptimised, merged over [`DEFAULT_OPT_OUT`].
    #[serde(default)]
    pub opt_out: BTreeMap<String, bool>,
}

/// An optimisation level: `-O0` to `-O3`, `-Os`, `-Oz` or `-Ofast`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptLevel(&'static str);

impl<'de> Deserialize<'de> for OptLevel {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const LEVELS: [&str; 7] = ["0", "1", "2", "3", "s", "z", "fast"];
        let value = serde_json::Value::deserialize(deserializer)?;
        let text = match &value {
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::String(s) => s.clone(),
            _ => String::new(),
        };
        LEVELS.iter().find(|level| **level == text).map(|level| OptLevel(level)).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "expected 0, 1, 2, 3, \"s\", \"z\" or \"fast\", found {value}"
            ))
        })
    }
}

/// What the plugin's Nix glue read from the derivation (before any earlier `optimizeFor`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Facts {
    /// The derivation's `name`.
    pub name: String,
    /// Its `pname`, when it has one.
    pub pname: Option<String>,
    /// Its `requiredSystemFeatures`.
    #[serde(default)]
    pub required_system_features: Vec<String>,
    /// Whether it has `overrideAttrs` (was made by `stdenv.mkDerivation`).
    pub has_override_attrs: bool,
    /// Whether it has `cargoDeps` (a Rust package).
    pub has_cargo_deps: bool,
    /// Whether it has `goModules` or `vendorHash` (a Go package).
    pub has_go_modules: bool,
    /// The arguments its `override` accepts.
    #[serde(default)]
    pub override_args: Vec<String>,
    /// `stdenv.cc`, when it has one.
    pub compiler: Option<Compiler>,
}

/// The C compiler of a derivation's stdenv.
#[derive(Debug, Clone, Deserialize)]
pub struct Compiler {
    /// `stdenv.cc.isGNU`.
    pub gnu: bool,
    /// `stdenv.cc.isClang`.
    pub clang: bool,
    /// `stdenv.cc.version`.
    pub version: Option<String>,
}

/// The changes to make, applied by the Nix glue.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// Variables to append to, space-separated, after the package's own value.
    pub append: BTreeMap<String, String>,
    /// Variables to set.
    pub set: BTreeMap<String, String>,
    /// Features to add to `requiredSystemFeatures`.
    pub system_features: Vec<String>,
    /// Arguments for the package's `override`.
    pub override_args: BTreeMap<String, bool>,
    /// What was done and why, exposed as `passthru.nixTier`.
    pub info: PlanInfo,
}

/// The record of a plan, for users (`drv.nixTier`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanInfo {
    /// The microarchitecture built for.
    pub target: String,
    /// The build tier.
    pub tier: Tier,
    /// Why the build has that tier.
    pub tier_reason: String,
    /// The tier's cores, set as `NIX_BUILD_CORES`.
    pub cores: u32,
    /// The adaptations made, in order.
    pub applied: Vec<String>,
    /// Adaptations not made, with the reason.
    pub skipped: BTreeMap<String, String>,
}

/// Why `optimizeFor` refused.
#[derive(Debug, thiserror::Error)]
pub enum OptimizeError {
    /// The options are malformed.
    #[error("builtins.optimizeFor: option {path}: {message}")]
    Option {
        /// Where in the options.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The profile given as an option is invalid.
    #[error("builtins.optimizeFor: {0}")]
    Profile(#[from] ProfileError),
    /// The host profile could not be had (pure evaluation without a pinned profile, say).
    #[error("builtins.optimizeFor: {0}")]
    Host(String),
    /// The target names no microarchitecture.
    #[error(
        "builtins.optimizeFor: unknown microarchitecture '{0}'; expected a name as archspec \
         spells it, such as skylake, icelake, znver3, x86_64_v3 or neoverse_n1 \
         ('nix-tier profile' shows this host's)"
    )]
    UnknownTarget(String),
    /// The host cannot run the target's code.
    #[error(
        "builtins.optimizeFor: this machine ({host}) cannot run code built for {target}: it lacks \
         the CPU features {missing}; choose a target it can run, or pass \
         forAnotherMachine = true if the build is meant for another machine"
    )]
    HostCannotRun {
        /// The host's microarchitecture.
        host: String,
        /// The requested target.
        target: String,
        /// Missing features, comma-separated.
        missing: String,
    },
    /// The derivation cannot be changed the nixpkgs way.
    #[error(
        "builtins.optimizeFor: {0} has no overrideAttrs; optimizeFor changes derivations made by \
         stdenv.mkDerivation"
    )]
    NotOverridable(String),
}

/// Makes the plan for `facts` from the caller's `options` (JSON). `host` yields the evaluating
/// host's profile; it is only called when needed.
pub fn plan(
    options_json: &str,
    facts: &Facts,
    host: impl FnOnce() -> Result<Profile, String>,
) -> Result<Plan, OptimizeError> {
    let options = parse_options(options_json)?;
    if !facts.has_override_attrs {
        return Err(OptimizeError::NotOverridable(facts.name.clone()));
    }
    let mut host = Some(host);
    let mut host_profile = || host.take().map(|h| h().map_err(OptimizeError::Host)).unwrap();
    let profile = match &options.profile {
        Some(value) => Profile::from_json_str(&value.to_string(), "the profile given to builtins.optimizeFor")?,
        None => host_profile()?,
    };
    let target_name = options.target.clone().unwrap_or_else(|| profile.cpu.microarchitecture.clone());
    let target = find_target(&target_name)?;
    if !options.for_another_machine {
        check_host_can_run(&target, &match &options.profile {
            None => profile.clone(),
            Some(_) => host_profile()?,
        })?;
    }

    let mut plan = Plan {
        append: BTreeMap::new(),
        set: BTreeMap::new(),
        system_features: Vec::new(),
        override_args: BTreeMap::new(),
        info: PlanInfo {
            target: target.name().to_string(),
            tier: Tier::Light,
            tier_reason: String::new(),
            cores: 0,
            applied: Vec::new(),
            skipped: BTreeMap::new(),
        },
    };
    let name = facts.pname.as_deref().unwrap_or_else(|| package_name(&facts.name));
    match opted_out(&options, name) {
        Some(reason) => {
            plan.info.skipped.insert("cpu-flags".into(), format!("{name} is opted out: {reason}"));
        }
        None => add_cpu_flags(&mut plan, &options, facts, &target),
    }
    add_switches(&mut plan, &options, facts);

    let decision = profile.build.classify(name, &facts.required_system_features, options.tier);
    let cores = profile.build.tiers.get(decision.tier).cores;
    plan.set.insert(TIER_ATTRIBUTE.into(), decision.tier.as_str().into());
    plan.set.insert("NIX_BUILD_CORES".into(), cores.to_string());
    plan.info.tier = decision.tier;
    plan.info.tier_reason = decision.reason;
    plan.info.cores = cores;
    plan.info.applied.push("tier".into());
    Ok(plan)
}

fn parse_options(options_json: &str) -> Result<Options, OptimizeError> {
    let value: serde_json::Value = serde_json::from_str(options_json).map_err(|e| OptimizeError::Option {
        path: "(all)".into(),
        message: e.to_string(),
    })?;
    // A profile on its own (builtins.hardwareProfile) is shorthand for { profile = …; }.
    if value.get("schemaVersion").is_some() {
        return Ok(Options { profile: Some(value), ..Options::default() });
    }
    serde_path_to_error::deserialize(value).map_err(|e| OptimizeError::Option {
        path: match e.path().to_string().as_str() {
            "." => "(all)".to_string(),
            path => path.to_string(),
        },
        message: e.inner().to_string(),
    })
}

/// Looks a microarchitecture up by archspec name; `x86-64-v3` style spellings are accepted.
pub fn find_target(name: &str) -> Result<std::sync::Arc<Microarchitecture>, OptimizeError> {
    let targets = Microarchitecture::known_targets();
    targets
        .get(name)
        .or_else(|| targets.get(&name.replace('-', "_")))
        .cloned()
        .ok_or_else(|| OptimizeError::UnknownTarget(name.to_string()))
}

fn check_host_can_run(target: &Microarchitecture, host: &Profile) -> Result<(), OptimizeError> {
    let host_features: BTreeSet<String> = host.cpu.features.iter().cloned().collect();
    let host_family = find_target(&host.cpu.microarchitecture)
        .map(|m| m.family().name().to_string())
        .unwrap_or_default();
    let mut missing = detect::missing_features(target, &host_features);
    if target.family().name() != host_family {
        missing.insert(0, format!("the {} instruction set", target.family().name()));
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(OptimizeError::HostCannotRun {
        host: host.cpu.microarchitecture.clone(),
        target: target.name().to_string(),
        missing: missing.join(", "),
    })
}

fn opted_out<'a>(options: &'a Options, name: &str) -> Option<&'a str> {
    match options.opt_out.get(name) {
        Some(true) => Some("listed in optOut"),
        Some(false) => None,
        None => DEFAULT_OPT_OUT.iter().find(|(n, _)| *n == name).map(|(_, reason)| *reason),
    }
}

fn add_cpu_flags(plan: &mut Plan, options: &Options, facts: &Facts, target: &Microarchitecture) {
    let compiler = facts.compiler.as_ref();
    let family = match compiler {
        Some(c) if c.clang => "clang",
        _ => "gcc",
    };
    let version = compiler.and_then(|c| c.version.as_deref());
    let mut cflags = Vec::new();
    match detect::compiler_flags(target, family, version) {
        Ok(march) => {
            cflags.push(march);
            plan.info.applied.push("march".into());
            // nixpkgs' convention: gccarch-<gcc.arch>, whatever this compiler version spells.
            plan.system_features.push(format!("gccarch-{}", detect::gcc_target(target).arch));
            plan.info.applied.push("system-features".into());
        }
        Err(reason) => {
            plan.info.skipped.insert("march".into(), reason);
        }
    }
    if let Some(level) = options.opt_level {
        cflags.push(level.to_string());
        plan.info.applied.push(level.to_string());
    }
    if !cflags.is_empty() {
        plan.append.insert("NIX_CFLAGS_COMPILE".into(), cflags.join(" "));
    }
    if facts.has_cargo_deps {
        let cpu = detect::llvm_cpu_name(target);
        plan.append.insert("RUSTFLAGS".into(), format!("-C target-cpu={cpu}"));
        plan.info.applied.push("rust-target-cpu".into());
    }
    if facts.has_go_modules {
        match detect::goamd64(target) {
            Some(level) => {
                plan.set.insert("GOAMD64".into(), level);
                plan.info.applied.push("goamd64".into());
            }
            None => {
                plan.info.skipped.insert("goamd64".into(), format!("{} is not x86-64", target.name()));
            }
        }
    }
}

fn add_switches(plan: &mut Plan, options: &Options, facts: &Facts) {
    let accepts = |arg: &str| facts.override_args.iter().any(|a| a == arg);
    let mut switch = |wanted: bool, what: &str, candidates: &[&str]| {
        if !wanted {
            return;
        }
        match candidates.iter().find(|c| accepts(c)) {
            Some(arg) => {
                plan.override_args.insert(arg.to_string(), true);
                plan.info.applied.push(what.to_string());
            }
            None => {
                plan.info.skipped.insert(
                    what.to_string(),
                    format!("the package's override has no {} switch", candidates.join(" or ")),
                );
            }
        }
    };
    switch(options.pgo, "pgo", &["enableOptimizations", "enablePGO"]);
    switch(options.lto, "lto", &["enableLTO"]);
}

impl fmt::Display for OptLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-O{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(gcc_version: &str) -> Facts {
        Facts {
            name: "tool-3d-1.0".into(),
            pname: Some("tool-3d".into()),
            required_system_features: vec![],
            has_override_attrs: true,
            has_cargo_deps: false,
            has_go_modules: false,
            override_args: vec![],
            compiler: Some(Compiler { gnu: true, clang: false, version: Some(gcc_version.into()) }),
        }
    }

    fn host() -> Result<Profile, String> {
        Profile::detect().map_err(|e| e.to_string())
    }

    #[test]
    fn opt_level_applies_even_when_the_compiler_cannot_target_the_cpu() {
        let options = r#"{ "target": "skylake", "optLevel": 3, "forAnotherMachine": true }"#;
        let old_gcc = plan(options, &facts("4.1"), host).unwrap();
        assert_eq!(old_gcc.append.get("NIX_CFLAGS_COMPILE").map(String::as_str), Some("-O3"));
        assert!(old_gcc.info.skipped["march"].contains("gcc 4.1 cannot target skylake"));
        assert!(old_gcc.system_features.is_empty());

        let gcc12 = plan(options, &facts("12.2.0"), host).unwrap();
        assert_eq!(gcc12.append["NIX_CFLAGS_COMPILE"], "-march=skylake -mtune=skylake -O3");
        assert_eq!(gcc12.system_features, ["gccarch-skylake"]);
    }

    #[test]
    fn rules_match_the_pname_as_given() {
        let mut profile = host().unwrap();
        profile.build.rules = vec![crate::Rule { pattern: crate::Pattern::new("tool-3d").unwrap(), tier: Tier::Heavy }];
        let options = serde_json::json!({ "profile": profile, "forAnotherMachine": true, "target": "x86_64" });
        let planned = plan(&options.to_string(), &facts("12.2.0"), host).unwrap();
        assert_eq!(planned.info.tier, Tier::Heavy, "{}", planned.info.tier_reason);
    }
}
