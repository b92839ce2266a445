//! The plan behind `builtins.optimizeFor`: which compiler flags, system features and package
//! switches a derivation gets for a target CPU, and the tier the build hook will give it.
//!
//! Pure: the inputs are the caller's options, facts the plugin read from the derivation
//! ([`Facts`]), Nix's `system-features`, and the evaluating host's profile; the output
//! ([`Plan`]) is applied by the plugin, with Nix code it writes for the plan, through
//! `override`/`overrideAttrs`.
//! docs/optimize-for.md documents the interface.
//!
//! What does not change the built code stays out of the derivation (out paths are kept): the
//! tier and its cores are the hook's business, unless the caller opts in (`tier`, `pinCores`).

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

/// The variables a plan may write. The plugin reports where the package keeps each of them
/// ([`Facts::exported`], [`Facts::hidden`]).
pub const VARIABLES: &[&str] = &[
    CFLAGS_BEFORE,
    CFLAGS_AFTER,
    RUSTFLAGS,
    NIX_RUSTFLAGS,
    "GOAMD64",
    "NIX_BUILD_CORES",
];

/// cc-wrapper puts this variable before the command's own arguments (as `gcc.arch`'s
/// `cc-cflags-before`), so a source file's own `-march` still wins.
const CFLAGS_BEFORE: &str = "NIX_CFLAGS_COMPILE_BEFORE";
/// cc-wrapper puts this variable after the command's own arguments: the last `-O` wins.
const CFLAGS_AFTER: &str = "NIX_CFLAGS_COMPILE";
/// Cargo ignores its other rustflags sources once this is set.
const RUSTFLAGS: &str = "RUSTFLAGS";
/// nixpkgs' rustc wrapper appends this variable to every rustc command.
const NIX_RUSTFLAGS: &str = "NIX_RUSTFLAGS";
const PGO_SWITCHES: [&str; 2] = ["enableOptimizations", "enablePGO"];
const LTO_SWITCHES: [&str; 1] = ["enableLTO"];

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
    /// Mark the derivation with this tier (`NIX_TIER`, read by the hook); changes its out path.
    pub tier: Option<Tier>,
    /// Write the tier's cores into the derivation as `NIX_BUILD_CORES`; changes its out path.
    #[serde(default)]
    pub pin_cores: bool,
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

/// What the plugin read from the derivation (before any earlier `optimizeFor`).
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// The derivation's `name`.
    pub name: String,
    /// Its `pname`, when it has one.
    pub pname: Option<String>,
    /// Its `requiredSystemFeatures`.
    pub required_system_features: Vec<String>,
    /// Whether it has `overrideAttrs` (was made by `stdenv.mkDerivation`).
    pub has_override_attrs: bool,
    /// Whether it has `cargoDeps` (a Rust package).
    pub has_cargo_deps: bool,
    /// Whether it has `goModules` or `vendorHash` (a Go package).
    pub has_go_modules: bool,
    /// The arguments its `override` accepts; read only when [`Prepared::switches_to_check`]
    /// has some or the package has a package set.
    pub override_args: Vec<String>,
    /// `stdenv.cc`, when its stdenv has a C compiler (not stdenvNoCC, runCommand).
    pub compiler: Option<Compiler>,
    /// `__structuredAttrs`: only `env` reaches the builder's environment.
    pub structured_attrs: bool,
    /// Of [`VARIABLES`], those the package sets where the builder sees them.
    pub exported: Vec<String>,
    /// Of [`VARIABLES`], those the package keeps at the top level of a structured-attrs
    /// derivation, where stdenv does not export them (and `env` may not repeat them).
    pub hidden: Vec<String>,
    /// Of [`Prepared::switches_to_check`], those already on: `override { switch = true; }`
    /// gives the same derivation.
    pub switches_on: Vec<String>,
    /// Whether it is a C compiler itself (`isGNU`/`isClang`): its switches build features
    /// into the compiler rather than optimise it.
    pub is_compiler: bool,
    /// Whether it has a package set built on itself (`withPackages`, as interpreters do).
    pub has_package_set: bool,
}

/// The C compiler of a derivation's stdenv.
#[derive(Debug, Clone)]
pub struct Compiler {
    /// `stdenv.cc.isGNU`.
    pub gnu: bool,
    /// `stdenv.cc.isClang`.
    pub clang: bool,
    /// `stdenv.cc.version`.
    pub version: Option<String>,
}

/// The changes to make, applied by the plugin. A variable goes where the package keeps it: at
/// the top level when the package has it there, else in `env`. Plans compare and hash by value,
/// so that one evaluation can share a plan among the many packages that get the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Plan {
    /// Variables to append to, space-separated, after the package's own value.
    pub append: BTreeMap<String, String>,
    /// Variables to set.
    pub set: BTreeMap<String, String>,
    /// Top-level derivation attributes for Nix and the hook, not for the builder.
    pub attributes: BTreeMap<String, String>,
    /// Hardening features to add to `hardeningDisable`.
    pub hardening_disable: Vec<String>,
    /// Features to add to `requiredSystemFeatures` (none it already has).
    pub system_features: Vec<String>,
    /// Arguments for the package's `override`.
    pub override_args: BTreeMap<String, bool>,
    /// Pass the result as the package's `self` argument, so that its package set
    /// (`withPackages`, `pkgs`) is built on the optimised package.
    pub pass_self: bool,
    /// Messages for the user, printed once per evaluation.
    pub warnings: Vec<String>,
    /// What was done and why, exposed as `passthru.nixTier`.
    pub info: PlanInfo,
}

/// The record of a plan, for users (`drv.nixTier`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanInfo {
    /// The microarchitecture built for.
    pub target: String,
    /// The build tier the hook gives the build under this profile.
    pub tier: Tier,
    /// Why the build has that tier.
    pub tier_reason: String,
    /// The tier's cores, the hook's CPU quota for the build.
    pub cores: u32,
    /// The adaptations made, in order.
    pub applied: Vec<String>,
    /// Adaptations asked for that the package already has.
    pub already_on: Vec<String>,
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

/// What a call's options resolve to, the same for every derivation they are applied to: the
/// parsed options, the profile and the checked target. Made once by [`prepare`] and reused.
#[derive(Debug)]
pub struct Prepared {
    options: Options,
    profile: Profile,
    target: std::sync::Arc<Microarchitecture>,
    /// What the target gives every package, computed once.
    derived: Derived,
}

/// The target's names and flags.
#[derive(Debug)]
struct Derived {
    gccarch_feature: Option<String>,
    llvm_cpu: String,
    goamd64: Option<String>,
    /// `-march` flags per compiler, as archspec spells them.
    compiler_flags: std::sync::Mutex<BTreeMap<CompilerKey, Result<String, String>>>,
}

/// A compiler: whether it is clang, and its version.
type CompilerKey = (bool, Option<String>);

/// What a package's name decides in its plan: whether it is opted out (and why) and which of
/// the profile's rules matches it. Two packages with the same facts but their names and the
/// same class get plans that differ at most where the plan quotes the name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NameClass {
    opted_out: Option<String>,
    rule: Option<usize>,
}

impl Prepared {
    /// The class of the package called `name` (its `pname`, else its derivation name).
    pub fn name_class(&self, name: &str, pname: Option<&str>) -> NameClass {
        let name = pname.unwrap_or_else(|| package_name(name));
        NameClass {
            opted_out: opted_out(&self.options, name).map(str::to_string),
            rule: self.profile.build.rules.iter().position(|rule| rule.pattern.matches(name)),
        }
    }

    /// The `override` switches whose state the plans need ([`Facts::switches_on`]): those that
    /// turn on what the options ask for. Finding that a switch is on evaluates the package
    /// twice, so nothing else is checked.
    pub fn switches_to_check(&self) -> Vec<&'static str> {
        let mut switches = Vec::new();
        if self.options.pgo {
            switches.extend(PGO_SWITCHES);
        }
        if self.options.lto {
            switches.extend(LTO_SWITCHES);
        }
        switches
    }
}

/// Resolves the caller's `options` (JSON): parses them, finds the profile and the target and
/// checks that the host can run it. `host` yields the evaluating host's profile; it is only
/// called when needed.
pub fn prepare(options_json: &str, host: impl FnOnce() -> Result<Profile, String>) -> Result<Prepared, OptimizeError> {
    let options = parse_options(options_json)?;
    let mut host = Some(host);
    let mut host_profile = || host.take().map(|h| h().map_err(OptimizeError::Host)).unwrap();
    let profile = match &options.profile {
        Some(value) => Profile::from_json_str(&value.to_string(), "the profile given to builtins.optimizeFor")?,
        None => host_profile()?,
    };
    let target_name = options.target.clone().unwrap_or_else(|| profile.cpu.microarchitecture.clone());
    let target = find_target(&target_name)?;
    if !options.for_another_machine {
        match &options.profile {
            None => check_host_can_run(&target, &profile)?,
            Some(_) => check_host_can_run(&target, &host_profile()?)?,
        }
    }
    let derived = Derived {
        gccarch_feature: gccarch_feature(&target),
        llvm_cpu: detect::llvm_cpu_name(&target),
        goamd64: detect::goamd64(&target),
        compiler_flags: Default::default(),
    };
    Ok(Prepared { options, profile, target, derived })
}

/// Makes the plan for `facts` from the caller's `options` (JSON): [`prepare`], then
/// [`plan_prepared`].
pub fn plan(
    options_json: &str,
    facts: &Facts,
    system_features: Option<&BTreeSet<String>>,
    host: impl FnOnce() -> Result<Profile, String>,
) -> Result<Plan, OptimizeError> {
    plan_prepared(&prepare(options_json, host)?, facts, system_features)
}

/// Makes the plan for `facts` under `prepared` options. `system_features` are Nix's
/// `system-features` where the plugin runs, when known.
pub fn plan_prepared(
    prepared: &Prepared,
    facts: &Facts,
    system_features: Option<&BTreeSet<String>>,
) -> Result<Plan, OptimizeError> {
    let Prepared { options, profile, target, derived } = prepared;
    if !facts.has_override_attrs {
        return Err(OptimizeError::NotOverridable(facts.name.clone()));
    }
    let mut plan = Plan {
        append: BTreeMap::new(),
        set: BTreeMap::new(),
        attributes: BTreeMap::new(),
        hardening_disable: Vec::new(),
        system_features: Vec::new(),
        override_args: BTreeMap::new(),
        pass_self: false,
        warnings: Vec::new(),
        info: PlanInfo {
            target: target.name().to_string(),
            tier: Tier::Light,
            tier_reason: String::new(),
            cores: 0,
            applied: Vec::new(),
            already_on: Vec::new(),
            skipped: BTreeMap::new(),
        },
    };
    let name = facts.pname.as_deref().unwrap_or_else(|| package_name(&facts.name));
    match opted_out(options, name) {
        Some(reason) => {
            plan.info.skipped.insert("cpu-flags".into(), format!("{name} is opted out: {reason}"));
        }
        None => {
            add_c_flags(&mut plan, options, facts, target, derived);
            add_rust_and_go(&mut plan, facts, target, derived);
        }
    }
    add_switches(&mut plan, options, facts, name);
    if !options.for_another_machine {
        warn_unbuildable(&mut plan, target, system_features);
    }
    plan.system_features.retain(|feature| !facts.required_system_features.contains(feature));
    add_tier(&mut plan, options, facts, profile, name);
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

/// The system feature Nix requires of a machine that builds code for `target`, as nixpkgs
/// names it (`gccarch-<gcc.arch>`, make-derivation.nix): x86-64 targets only, since nixpkgs
/// adds none on other architectures.
pub fn gccarch_feature(target: &Microarchitecture) -> Option<String> {
    (target.family().name() == "x86_64").then(|| format!("gccarch-{}", detect::gcc_target(target).arch))
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

fn is_hidden(facts: &Facts, variable: &str) -> bool {
    facts.hidden.iter().any(|v| v == variable)
}

/// Why a variable the package keeps out of the builder's reach is not written.
fn hidden_reason(variable: &str) -> String {
    format!(
        "the package sets {variable} at the top level under __structuredAttrs, where the builder \
         does not see it, and env may not repeat it; move the package's {variable} into env"
    )
}

/// `-march`/`-mtune` before the package's own flags, `-O` after them.
fn add_c_flags(plan: &mut Plan, options: &Options, facts: &Facts, target: &Microarchitecture, derived: &Derived) {
    let Some(compiler) = facts.compiler.as_ref() else {
        plan.info.skipped.insert(
            "cpu-flags".into(),
            format!(
                "{} is built without a C compiler (its stdenv has no cc, as with stdenvNoCC and \
                 runCommand): nothing in it is compiled; optimise the packages it wraps instead",
                facts.name
            ),
        );
        return;
    };
    let family = if compiler.clang { "clang" } else { "gcc" };
    let flags = derived
        .compiler_flags
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .entry((compiler.clang, compiler.version.clone()))
        .or_insert_with(|| detect::compiler_flags(target, family, compiler.version.as_deref()))
        .clone();
    match flags {
        Ok(march) => {
            plan.append.insert(CFLAGS_BEFORE.into(), march);
            plan.info.applied.push("march".into());
            // nixpkgs' convention: gccarch-<gcc.arch>, whatever this compiler version spells.
            if let Some(feature) = &derived.gccarch_feature {
                plan.system_features.push(feature.clone());
                plan.info.applied.push("system-features".into());
            }
        }
        Err(reason) => {
            plan.info.skipped.insert("march".into(), reason);
        }
    }
    let Some(level) = options.opt_level else { return };
    if is_hidden(facts, CFLAGS_AFTER) {
        plan.info.skipped.insert(level.to_string(), hidden_reason(CFLAGS_AFTER));
        return;
    }
    plan.append.insert(CFLAGS_AFTER.into(), level.to_string());
    plan.info.applied.push(level.to_string());
    match level.0 {
        "0" => {
            // cc-wrapper's fortify hardening adds -D_FORTIFY_SOURCE, which glibc refuses to
            // honour without optimisation (a #warning, fatal under -Werror).
            plan.hardening_disable.extend(["fortify".to_string(), "fortify3".to_string()]);
            plan.info.applied.push("hardeningDisable=fortify".into());
            plan.warnings.push(
                "builtins.optimizeFor: optLevel = 0 disables the fortify hardening of the packages it \
                 is applied to (-D_FORTIFY_SOURCE needs optimisation); use optLevel = 1 or more to \
                 keep it"
                    .into(),
            );
        }
        "fast" => plan.warnings.push(
            "builtins.optimizeFor: optLevel = \"fast\" (-Ofast) enables -ffast-math, which breaks \
             IEEE floating-point semantics (NaN and infinity checks, signed zeros, rounding): \
             numerical code may compute different results"
                .into(),
        ),
        _ => {}
    }
}

fn add_rust_and_go(plan: &mut Plan, facts: &Facts, target: &Microarchitecture, derived: &Derived) {
    if facts.has_cargo_deps {
        let cpu = &derived.llvm_cpu;
        // Appending keeps the package's own RUSTFLAGS; without one, RUSTFLAGS would hide
        // cargo's other rustflags sources, so the rustc wrapper's variable is used.
        let variable = if facts.exported.iter().any(|v| v == RUSTFLAGS) { RUSTFLAGS } else { NIX_RUSTFLAGS };
        plan.append.insert(variable.into(), format!("-C target-cpu={cpu}"));
        plan.info.applied.push("rust-target-cpu".into());
    }
    if facts.has_go_modules {
        match derived.goamd64.clone() {
            Some(_) if is_hidden(facts, "GOAMD64") => {
                plan.info.skipped.insert("goamd64".into(), hidden_reason("GOAMD64"));
            }
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

fn add_switches(plan: &mut Plan, options: &Options, facts: &Facts, name: &str) {
    let accepts = |arg: &str| facts.override_args.iter().any(|a| a == arg);
    let mut switch = |wanted: bool, what: &str, candidates: &[&str]| {
        if !wanted {
            return;
        }
        let found = candidates.iter().find(|c| accepts(c));
        let skipped = match found {
            _ if facts.is_compiler => format!(
                "{name} is a compiler: its {} switch builds a feature into the compiler, it does \
                 not optimise it",
                candidates.join(" or ")
            ),
            None => format!("the package's override has no {} switch", candidates.join(" or ")),
            Some(arg) if facts.switches_on.iter().any(|on| on == arg) => {
                plan.info.already_on.push(format!("{what} ({arg} is already true)"));
                return;
            }
            Some(arg) => {
                plan.override_args.insert(arg.to_string(), true);
                plan.info.applied.push(what.to_string());
                return;
            }
        };
        plan.info.skipped.insert(what.to_string(), skipped);
    };
    switch(options.pgo, "pgo", &PGO_SWITCHES);
    switch(options.lto, "lto", &LTO_SWITCHES);
    if facts.has_package_set && accepts("self") {
        plan.pass_self = true;
        plan.info.applied.push("self".into());
    }
}

/// Nix refuses a build whose required features it lacks: say so at evaluation, with the fix.
fn warn_unbuildable(plan: &mut Plan, target: &Microarchitecture, system_features: Option<&BTreeSet<String>>) {
    let Some(features) = system_features else { return };
    let missing: Vec<&String> = plan.system_features.iter().filter(|f| !features.contains(*f)).collect();
    if let [feature, ..] = missing.as_slice() {
        plan.warnings.push(format!(
            "builtins.optimizeFor: Nix's system-features here lack {feature}, so Nix refuses to build \
             packages optimised for {target} on this machine; add the line \
             `extra-system-features = {feature}` to nix.conf (lib.nixConf and the home-manager and \
             NixOS modules write it, with the inferior architectures, from the pinned profile)",
            target = target.name()
        ));
    }
}

/// The tier the hook will give the build; written into the derivation only on request.
fn add_tier(plan: &mut Plan, options: &Options, facts: &Facts, profile: &Profile, name: &str) {
    let decision = profile.build.classify(name, &facts.required_system_features, options.tier);
    let cores = profile.build.tiers.get(decision.tier).cores;
    if let Some(tier) = options.tier {
        plan.attributes.insert(TIER_ATTRIBUTE.into(), tier.as_str().into());
        plan.info.applied.push("tier".into());
    }
    if options.pin_cores {
        plan.set.insert("NIX_BUILD_CORES".into(), cores.to_string());
        plan.info.applied.push("cores".into());
    }
    plan.info.tier = decision.tier;
    plan.info.tier_reason = decision.reason;
    plan.info.cores = cores;
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
            has_override_attrs: true,
            compiler: Some(Compiler { gnu: true, clang: false, version: Some(gcc_version.into()) }),
            ..Facts::default()
        }
    }

    fn host() -> Result<Profile, String> {
        Profile::detect().map_err(|e| e.to_string())
    }

    fn plan_for(options: &str, facts: &Facts) -> Plan {
        plan(options, facts, None, host).unwrap()
    }

    const SKYLAKE: &str = r#"{ "target": "skylake", "forAnotherMachine": true"#;

    #[test]
    fn opt_level_applies_even_when_the_compiler_cannot_target_the_cpu() {
        let options = format!("{SKYLAKE}, \"optLevel\": 3 }}");
        let old_gcc = plan_for(&options, &facts("4.1"));
        assert_eq!(old_gcc.append.get("NIX_CFLAGS_COMPILE").map(String::as_str), Some("-O3"));
        assert!(!old_gcc.append.contains_key("NIX_CFLAGS_COMPILE_BEFORE"));
        assert!(old_gcc.info.skipped["march"].contains("gcc 4.1 cannot target skylake"));
        assert!(old_gcc.system_features.is_empty());

        let gcc12 = plan_for(&options, &facts("12.2.0"));
        assert_eq!(gcc12.append["NIX_CFLAGS_COMPILE_BEFORE"], "-march=skylake -mtune=skylake");
        assert_eq!(gcc12.append["NIX_CFLAGS_COMPILE"], "-O3");
        assert_eq!(gcc12.system_features, ["gccarch-skylake"]);
    }

    #[test]
    fn rules_match_the_pname_as_given() {
        let mut profile = host().unwrap();
        profile.build.rules = vec![crate::Rule { pattern: crate::Pattern::new("tool-3d").unwrap(), tier: Tier::Heavy }];
        let options = serde_json::json!({ "profile": profile, "forAnotherMachine": true, "target": "x86_64" });
        let planned = plan_for(&options.to_string(), &facts("12.2.0"));
        assert_eq!(planned.info.tier, Tier::Heavy, "{}", planned.info.tier_reason);
    }

    #[test]
    fn tier_and_cores_stay_out_of_the_derivation_unless_asked() {
        let planned = plan_for(&format!("{SKYLAKE} }}"), &facts("12.2.0"));
        assert!(planned.attributes.is_empty() && !planned.set.contains_key("NIX_BUILD_CORES"), "{planned:?}");
        let asked = plan_for(&format!("{SKYLAKE}, \"tier\": \"medium\", \"pinCores\": true }}"), &facts("12.2.0"));
        assert_eq!(asked.attributes[TIER_ATTRIBUTE], "medium");
        assert_eq!(asked.set["NIX_BUILD_CORES"], asked.info.cores.to_string());
    }

    #[test]
    fn a_derivation_without_a_compiler_is_skipped_with_the_reason() {
        let no_cc = Facts { compiler: None, ..facts("12.2.0") };
        let planned = plan_for(&format!("{SKYLAKE}, \"optLevel\": 3 }}"), &no_cc);
        assert!(planned.append.is_empty() && planned.system_features.is_empty(), "{planned:?}");
        assert!(planned.info.applied.is_empty(), "{:?}", planned.info.applied);
        assert!(planned.info.skipped["cpu-flags"].contains("without a C compiler"));
    }

    #[test]
    fn rust_flags_keep_cargo_sources() {
        let rust = Facts { has_cargo_deps: true, ..facts("12.2.0") };
        let planned = plan_for(&format!("{SKYLAKE} }}"), &rust);
        assert_eq!(planned.append["NIX_RUSTFLAGS"], "-C target-cpu=skylake");
        assert!(!planned.append.contains_key("RUSTFLAGS"));
        let own = Facts { exported: vec!["RUSTFLAGS".into()], ..rust.clone() };
        assert_eq!(plan_for(&format!("{SKYLAKE} }}"), &own).append["RUSTFLAGS"], "-C target-cpu=skylake");
        // A RUSTFLAGS cargo never sees (top level under structured attrs) is no reason to use it.
        let hidden = Facts { hidden: vec!["RUSTFLAGS".into()], structured_attrs: true, ..rust };
        assert!(plan_for(&format!("{SKYLAKE} }}"), &hidden).append.contains_key("NIX_RUSTFLAGS"));
    }

    #[test]
    fn hidden_variables_are_not_written() {
        let hidden = Facts { hidden: vec!["NIX_CFLAGS_COMPILE".into()], structured_attrs: true, ..facts("12.2.0") };
        let planned = plan_for(&format!("{SKYLAKE}, \"optLevel\": 2 }}"), &hidden);
        assert!(!planned.append.contains_key("NIX_CFLAGS_COMPILE"));
        assert!(planned.info.skipped["-O2"].contains("__structuredAttrs"));
        assert!(planned.append.contains_key("NIX_CFLAGS_COMPILE_BEFORE"));
    }

    #[test]
    fn no_gccarch_feature_off_x86_64() {
        let options = r#"{ "target": "neoverse_n1", "forAnotherMachine": true }"#;
        let planned = plan_for(options, &facts("12.2.0"));
        assert!(planned.append["NIX_CFLAGS_COMPILE_BEFORE"].contains("neoverse-n1"), "{planned:?}");
        assert!(planned.system_features.is_empty(), "{:?}", planned.system_features);
    }

    #[test]
    fn switches_already_on_and_compilers_are_not_claimed() {
        let python = Facts {
            override_args: vec!["enableLTO".into(), "enableOptimizations".into(), "self".into()],
            switches_on: vec!["enableLTO".into()],
            has_package_set: true,
            ..facts("12.2.0")
        };
        let planned = plan_for(&format!("{SKYLAKE}, \"lto\": true, \"pgo\": true }}"), &python);
        assert_eq!(planned.override_args, BTreeMap::from([("enableOptimizations".to_string(), true)]));
        assert_eq!(planned.info.already_on, ["lto (enableLTO is already true)"]);
        assert!(planned.pass_self && planned.info.applied.contains(&"self".to_string()));

        let gcc = Facts { override_args: vec!["enableLTO".into()], is_compiler: true, ..facts("12.2.0") };
        let planned = plan_for(&format!("{SKYLAKE}, \"lto\": true }}"), &gcc);
        assert!(planned.override_args.is_empty());
        assert!(planned.info.skipped["lto"].contains("is a compiler"), "{:?}", planned.info.skipped);
    }

    #[test]
    fn risky_levels_are_handled_with_a_message() {
        let o0 = plan_for(&format!("{SKYLAKE}, \"optLevel\": 0 }}"), &facts("12.2.0"));
        assert_eq!(o0.hardening_disable, ["fortify", "fortify3"]);
        assert!(o0.warnings[0].contains("fortify"));
        let fast = plan_for(&format!("{SKYLAKE}, \"optLevel\": \"fast\" }}"), &facts("12.2.0"));
        assert!(fast.hardening_disable.is_empty());
        assert!(fast.warnings[0].contains("IEEE"));
    }

    #[test]
    fn a_missing_system_feature_is_named_with_the_line_to_add() {
        let profile = host().unwrap();
        let options = serde_json::json!({ "profile": profile, "target": "x86_64" }).to_string();
        let features = BTreeSet::from(["big-parallel".to_string()]);
        let planned = plan(&options, &facts("12.2.0"), Some(&features), host).unwrap();
        assert!(planned.warnings[0].contains("extra-system-features = gccarch-x86-64"), "{:?}", planned.warnings);
        let features = BTreeSet::from(["gccarch-x86-64".to_string()]);
        assert!(plan(&options, &facts("12.2.0"), Some(&features), host).unwrap().warnings.is_empty());
    }
}
