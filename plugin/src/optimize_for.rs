//! `builtins.optimizeFor`: the plan for one derivation, made by `nix_tier_model::optimize`.
//!
//! `builtins.optimizeFor options` resolves the options once ([`prepare`]) and gives a function
//! of derivations bound to a handle. For each derivation the shim reads the answers to
//! [`FACT_QUERIES`] from it and makes one call ([`plan`]); the plan comes back as a number, the
//! same for every derivation that gets the same plan, so the shim parses each distinct plan
//! once ([`plan_json`]) and applies it with the Nix glue (plugin/nix/optimize-for.nix).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::SystemTime;

use nix_tier_model::optimize::{self, Compiler, Facts, NameClass, Plan, Prepared, VARIABLES};
use serde::Deserialize;
use serde_json::Value;

use crate::ffi::Planned;
use crate::{hardware_profile, PluginError};

/// The Nix glue (`{ overrideFacts; apply; }`).
pub fn glue() -> &'static str {
    include_str!("../nix/optimize-for.nix")
}

/// What the shim reads from a derivation, space-separated attribute paths: `?path` whether the
/// attribute is there (its value is not forced), `!path` whether it is there and not null,
/// `path` its value as JSON (null when absent). A path through something that is not an
/// attribute set is absent, as with Nix's `or`. The answers before `|` (the names) come in one
/// list, the others in a second: [`Query`], then for each of [`VARIABLES`] whether the package
/// keeps it at the top level, in `env`.
pub static FACT_QUERIES: LazyLock<String> = LazyLock::new(|| {
    let variables = VARIABLES.iter().flat_map(|v| [format!("?{v}"), format!("?env.{v}")]);
    let others = Query::ALL.iter().map(|q| q.path().to_string()).chain(variables).collect::<Vec<_>>();
    format!("name pname | {}", others.join(" "))
});

/// The facts read from every derivation besides its names, in the order of their answers.
#[derive(Clone, Copy)]
enum Query {
    RequiredSystemFeatures,
    HasOverrideAttrs,
    HasOverride,
    HasCargoDeps,
    HasGoModules,
    HasVendorHash,
    HasPackageSet,
    IsGnu,
    IsClang,
    StructuredAttrs,
    HasCompiler,
    CompilerIsGnu,
    CompilerIsClang,
    CompilerVersion,
}

impl Query {
    const ALL: [Query; 14] = [
        Query::RequiredSystemFeatures,
        Query::HasOverrideAttrs,
        Query::HasOverride,
        Query::HasCargoDeps,
        Query::HasGoModules,
        Query::HasVendorHash,
        Query::HasPackageSet,
        Query::IsGnu,
        Query::IsClang,
        Query::StructuredAttrs,
        Query::HasCompiler,
        Query::CompilerIsGnu,
        Query::CompilerIsClang,
        Query::CompilerVersion,
    ];

    fn path(self) -> &'static str {
        match self {
            Query::RequiredSystemFeatures => "requiredSystemFeatures",
            Query::HasOverrideAttrs => "?overrideAttrs",
            Query::HasOverride => "?override",
            Query::HasCargoDeps => "?cargoDeps",
            Query::HasGoModules => "?goModules",
            Query::HasVendorHash => "?vendorHash",
            Query::HasPackageSet => "?withPackages",
            Query::IsGnu => "isGNU",
            Query::IsClang => "isClang",
            Query::StructuredAttrs => "__structuredAttrs",
            // stdenvNoCC and runCommand have `cc = null`.
            Query::HasCompiler => "!stdenv.cc",
            Query::CompilerIsGnu => "stdenv.cc.isGNU",
            Query::CompilerIsClang => "stdenv.cc.isClang",
            Query::CompilerVersion => "stdenv.cc.version",
        }
    }
}

/// What the glue's `overrideFacts` read, when [`plan`] asked for it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OverrideFacts {
    override_args: Vec<String>,
    switches_on: Vec<String>,
}

/// One application of `builtins.optimizeFor` to its options. Its plans are numbered in the
/// order they were first made; the shim keeps each one's Nix value under that number.
struct Application {
    prepared: Arc<Prepared>,
    system_features: BTreeSet<String>,
    numbers: HashMap<Plan, u32>,
    plans: Vec<Plan>,
    /// Decisions by the answers besides the names and by the names' class, kept when they do
    /// not quote the name: most packages of an evaluation share one, and finding it again
    /// costs less than reading the answers and planning.
    decided: HashMap<NameClass, foldhash::HashMap<String, Decision>>,
}

/// Every application made in this process, by handle. Handles are never reused, so a handle
/// names one application of one evaluator even when a process has several.
static APPLICATIONS: LazyLock<Mutex<Vec<Application>>> = LazyLock::new(Default::default);

/// What [`plan`] tells the shim about one derivation.
#[derive(Clone)]
enum Decision {
    /// The plan with this number.
    Plan(u32),
    /// Ask again with what the glue's `overrideFacts` reads for these switches (JSON).
    NeedsOverrideFacts(String),
}

/// Resolves `options_json` for the derivations it will be applied to and returns the handle of
/// this application. `system_features` is Nix's `system-features` setting, space-separated.
pub fn prepare(
    options_json: &str,
    system_features: &str,
    pinned_path: &str,
    pure_eval: bool,
) -> Result<u64, PluginError> {
    let application = Application {
        prepared: prepared(options_json, pinned_path, pure_eval)?,
        system_features: system_features.split_whitespace().map(str::to_string).collect(),
        numbers: HashMap::new(),
        plans: Vec::new(),
        decided: HashMap::new(),
    };
    let mut applications = lock(&APPLICATIONS);
    applications.push(application);
    Ok(applications.len() as u64 - 1)
}

/// The plan for the derivation whose facts the shim read for application `handle`:
/// `names_json` is `[name, pname]`, `answers_json` the other answers to [`FACT_QUERIES`],
/// followed by what the glue's `overrideFacts` read when a previous call asked for it.
pub fn plan(handle: u64, names_json: &str, answers_json: &str) -> Result<Planned, PluginError> {
    let (name, pname): (Value, Value) = serde_json::from_str(names_json)
        .map_err(|e| internal(format!("reading the derivation's names: {e}")))?;
    let name = name.as_str().ok_or_else(|| {
        PluginError(format!("builtins.optimizeFor: the derivation's name is not a string but {name}"))
    })?;
    let pname = pname.as_str();
    let mut applications = lock(&APPLICATIONS);
    let application = applications
        .get_mut(usize::try_from(handle).unwrap_or(usize::MAX))
        .ok_or_else(|| internal(format!("no application {handle}")))?;
    let class = application.prepared.name_class(name, pname);
    let known = application.decided.get(&class).and_then(|decided| decided.get(answers_json));
    let (decision, warnings) = match known {
        Some(decision) => (decision.clone(), Vec::new()),
        None => {
            let answers: Vec<Value> = serde_json::from_str(answers_json)
                .map_err(|e| internal(format!("reading the derivation's facts: {e}")))?;
            let (decision, warnings, shared) = decide(application, facts(name, pname, &answers)?)?;
            if shared {
                application.decided.entry(class).or_default().insert(answers_json.to_string(), decision.clone());
            }
            (decision, warnings)
        }
    };
    Ok(match decision {
        Decision::Plan(plan) => Planned { override_switches: String::new(), plan, warnings },
        Decision::NeedsOverrideFacts(switches) => Planned { override_switches: switches, plan: 0, warnings },
    })
}

/// The decision for `facts`, its warnings not yet shown, and whether packages with the same
/// answers and name class may share it (their plans do not quote the name).
fn decide(
    application: &mut Application,
    (facts, override_read, has_override): (Facts, bool, bool),
) -> Result<(Decision, Vec<String>, bool), PluginError> {
    let prepared = &application.prepared;
    if !override_read && has_override {
        let switches = prepared.switches_to_check();
        if !switches.is_empty() || facts.has_package_set {
            return Ok((Decision::NeedsOverrideFacts(serde_json::to_string(&switches)?), Vec::new(), true));
        }
    }
    let features = Some(&application.system_features);
    let mut plan = optimize::plan_prepared(prepared, &facts, features)?;
    let warnings = first_time(std::mem::take(&mut plan.warnings));
    // A name of the same class that the plan would quote differently.
    const OTHER: &str = "\u{1}";
    let other = Facts { name: OTHER.into(), pname: Some(OTHER.into()), ..facts.clone() };
    let shared = prepared.name_class(OTHER, Some(OTHER)) == prepared.name_class(&facts.name, facts.pname.as_deref())
        && optimize::plan_prepared(prepared, &other, features)
            .is_ok_and(|other| Plan { warnings: Vec::new(), ..other } == plan);
    let next = u32::try_from(application.plans.len()).map_err(|_| internal("too many plans".into()))?;
    let number = *application.numbers.entry(plan).or_insert_with_key(|plan| {
        application.plans.push(plan.clone());
        next
    });
    Ok((Decision::Plan(number), warnings, shared))
}

/// Plan `number` of application `handle` as JSON, for the glue's `apply`.
pub fn plan_json(handle: u64, number: u32) -> Result<String, PluginError> {
    let applications = lock(&APPLICATIONS);
    let plan = usize::try_from(handle)
        .ok()
        .and_then(|h| applications.get(h))
        .and_then(|application| application.plans.get(number as usize))
        .ok_or_else(|| internal(format!("no plan {number} in application {handle}")))?;
    Ok(serde_json::to_string(plan)?)
}

/// [`Facts`] from the names and the other answers to [`FACT_QUERIES`], in their order, with
/// whether `overrideFacts` was read (it follows the answers) and whether there is `override`.
fn facts(name: &str, pname: Option<&str>, answers: &[Value]) -> Result<(Facts, bool, bool), PluginError> {
    let expected = Query::ALL.len() + 2 * VARIABLES.len();
    let override_facts: Option<OverrideFacts> = match answers.len() {
        n if n == expected => None,
        n if n == expected + 1 => Some(serde_json::from_value(answers[expected].clone())?),
        n => return Err(internal(format!("{n} answers to {expected} queries"))),
    };
    let answer = |q: Query| &answers[q as usize];
    let on = |q: Query| *answer(q) == Value::Bool(true);
    let text = |q: Query| answer(q).as_str().map(str::to_string);
    let required_system_features = match answer(Query::RequiredSystemFeatures) {
        Value::Array(features) => features.iter().filter_map(|f| f.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    };
    let structured_attrs = on(Query::StructuredAttrs);
    // With structured attributes only `env` reaches the builder (stdenv's setup exports it).
    let kept = |top: bool| -> Vec<String> {
        let variables = &answers[Query::ALL.len()..expected];
        VARIABLES
            .iter()
            .enumerate()
            .filter(|&(i, _)| variables[2 * i + usize::from(!top)] == Value::Bool(true))
            .map(|(_, v)| v.to_string())
            .collect()
    };
    let (exported, hidden) = if structured_attrs {
        (kept(false), kept(true))
    } else {
        (kept(true), Vec::new())
    };
    let compiler = on(Query::HasCompiler).then(|| Compiler {
        gnu: on(Query::CompilerIsGnu),
        clang: on(Query::CompilerIsClang),
        version: text(Query::CompilerVersion),
    });
    let facts = Facts {
        name: name.to_string(),
        pname: pname.map(str::to_string),
        required_system_features,
        has_override_attrs: on(Query::HasOverrideAttrs),
        has_cargo_deps: on(Query::HasCargoDeps),
        has_go_modules: on(Query::HasGoModules) || on(Query::HasVendorHash),
        has_package_set: on(Query::HasPackageSet),
        is_compiler: on(Query::IsGnu) || on(Query::IsClang),
        structured_attrs,
        exported,
        hidden,
        compiler,
        override_args: override_facts.as_ref().map(|o| o.override_args.clone()).unwrap_or_default(),
        switches_on: override_facts.as_ref().map(|o| o.switches_on.clone()).unwrap_or_default(),
    };
    Ok((facts, override_facts.is_some(), on(Query::HasOverride)))
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
    if let Some(prepared) = lock(&CACHE).get(&key) {
        return Ok(Arc::clone(prepared));
    }
    let prepared = Arc::new(optimize::prepare(options_json, || hardware_profile::load(pinned_path, pure_eval))?);
    lock(&CACHE).insert(key, Arc::clone(&prepared));
    Ok(prepared)
}

/// The warnings not shown before: one evaluation optimises many packages alike.
fn first_time(warnings: Vec<String>) -> Vec<String> {
    static SHOWN: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Default::default);
    if warnings.is_empty() {
        return warnings;
    }
    let mut shown = lock(&SHOWN);
    warnings.into_iter().filter(|w| shown.insert(w.clone())).collect()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn internal(what: String) -> PluginError {
    PluginError(format!("builtins.optimizeFor: internal error {what}; please report it"))
}


#[cfg(test)]
mod tests {
    use super::*;

    /// The answers after the names for a plain C package, with or without a compiler.
    fn answers(compiler: bool) -> String {
        let mut answers: Vec<Value> = Query::ALL
            .iter()
            .map(|query| match query {
                Query::HasOverrideAttrs => Value::Bool(true),
                Query::HasCompiler | Query::CompilerIsGnu => Value::Bool(compiler),
                Query::CompilerIsClang => Value::Bool(false),
                Query::CompilerVersion => Value::from("12.2.0"),
                Query::RequiredSystemFeatures | Query::IsGnu | Query::IsClang | Query::StructuredAttrs => Value::Null,
                _ => Value::Bool(false),
            })
            .collect();
        answers.extend(VARIABLES.iter().flat_map(|_| [Value::Bool(false), Value::Bool(false)]));
        Value::Array(answers).to_string()
    }

    fn plan_of(handle: u64, name: &str, compiler: bool) -> (u32, String) {
        let names = serde_json::json!([format!("{name}-1.0"), name]).to_string();
        let number = plan(handle, &names, &answers(compiler)).unwrap().plan;
        (number, plan_json(handle, number).unwrap())
    }

    #[test]
    fn packages_share_a_plan_unless_it_depends_on_their_name() {
        let options = r#"{ "target": "x86_64", "forAnotherMachine": true, "optLevel": 3 }"#;
        let handle = prepare(options, "", "", false).unwrap();
        let (alpha, _) = plan_of(handle, "alpha", true);
        assert_eq!(plan_of(handle, "beta", true).0, alpha, "the same facts, another name");
        let (gsl, json) = plan_of(handle, "gsl", true);
        assert_ne!(gsl, alpha);
        assert!(json.contains("gsl is opted out"), "{json}");
        assert_eq!(plan_of(handle, "alpha", true).0, alpha, "an opted-out package is not remembered for others");
        // Without a compiler the reason quotes the name: each package gets its own.
        let (_, json) = plan_of(handle, "alpha", false);
        assert!(json.contains("alpha-1.0 is built without a C compiler"), "{json}");
        let (_, json) = plan_of(handle, "beta", false);
        assert!(json.contains("beta-1.0 is built without a C compiler"), "{json}");
    }
}
