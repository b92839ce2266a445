//! `builtins.optimizeFor`: the plan for one derivation, made by `nix_tier_model::optimize`.
//!
//! `builtins.optimizeFor options` resolves the options once ([`prepare`]) and gives a function
//! of derivations bound to a handle. For each derivation the shim reads the answers to
//! [`FACT_QUERIES`] from it and makes one call ([`plan`]); the plan comes back as a number, the
//! same for every derivation that gets the same plan, so the shim turns each distinct plan into
//! a Nix function once ([`plan_code`], the code from [`crate::apply`]) and applies it.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::SystemTime;

use nix_tier_model::optimize::{self, Compiler, Facts, NameClass, Plan, Prepared, VARIABLES};
use serde::Deserialize;
use serde_json::Value;

use crate::ffi::{PlanCode, Planned};
use crate::{apply, hardware_profile, PluginError};

/// The Nix glue (`{ overrideFacts; }`).
pub fn glue() -> &'static str {
    include_str!("../nix/optimize-for.nix")
}

/// What the shim reads from a derivation, space-separated attribute paths, each after its
/// kind: `?path` whether the attribute is there (its value is not forced), `!path` whether it
/// is there and not null, `=path` whether it is `true`, a bare `path` its value. A path through
/// something that is not an attribute set is absent, as with Nix's `or`. The answers before `|`
/// (the names) go to [`plan`] as one argument, the others as a second: [`Query`], then for each
/// of [`VARIABLES`] whether the package has it at the top level, then for each whether in `env`.
///
/// The answers follow one another without separators (see [`Answers`]): `?`, `!` and `=` each
/// `1` or `0`; a value `n` when absent, else `s` and its text when it is a string, or `j` and
/// its JSON otherwise, either ended by a NUL byte (which Nix strings and JSON text never hold).
pub static FACT_QUERIES: LazyLock<String> = LazyLock::new(|| {
    let variables = VARIABLES.iter().map(|v| format!("?{v}")).chain(VARIABLES.iter().map(|v| format!("?env.{v}")));
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
            Query::IsGnu => "=isGNU",
            Query::IsClang => "=isClang",
            Query::StructuredAttrs => "=__structuredAttrs",
            // stdenvNoCC and runCommand have `cc = null`.
            Query::HasCompiler => "!stdenv.cc",
            Query::CompilerIsGnu => "=stdenv.cc.isGNU",
            Query::CompilerIsClang => "=stdenv.cc.isClang",
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
    /// The numbers of the Nix code of the plans made so far ([`apply::source`]), by that code.
    shapes: HashMap<String, u32>,
    /// Decisions by the answers besides the names and by the names' class, kept when they do
    /// not quote the name: most packages of an evaluation share one, and finding it again
    /// costs less than reading the answers and planning.
    decided: foldhash::HashMap<NameClass, foldhash::HashMap<Vec<u8>, Decision>>,
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
        shapes: HashMap::new(),
        decided: Default::default(),
    };
    let mut applications = lock(&APPLICATIONS);
    applications.push(application);
    Ok(applications.len() as u64 - 1)
}

/// The plan for the derivation whose facts the shim read for application `handle`: `names` are
/// the answers to the queries of [`FACT_QUERIES`] before `|`, `answers` the others, followed by
/// what the glue's `overrideFacts` read (a value answer) when a previous call asked for it.
pub fn plan(handle: u64, names: &[u8], answers: &[u8]) -> Result<Planned, PluginError> {
    let mut read = Answers(names);
    let name = match read.value()? {
        Answer::Text(name) => text(name),
        other => {
            let shown = other.json()?;
            return Err(PluginError(format!("builtins.optimizeFor: the derivation's name is not a string but {shown}")));
        }
    };
    let pname = match read.value()? {
        Answer::Text(pname) => Some(text(pname)),
        _ => None,
    };
    let mut applications = lock(&APPLICATIONS);
    let application = applications
        .get_mut(usize::try_from(handle).unwrap_or(usize::MAX))
        .ok_or_else(|| internal(format!("no application {handle}")))?;
    let class = application.prepared.name_class(&name, pname.as_deref());
    let known = application.decided.get(&class).and_then(|decided| decided.get(answers));
    let (decision, warnings) = match known {
        Some(decision) => (decision.clone(), Vec::new()),
        None => {
            let (decision, warnings, shared) = decide(application, facts(&name, pname.as_deref(), answers)?)?;
            if shared {
                application.decided.entry(class).or_default().insert(answers.to_vec(), decision.clone());
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

/// The Nix code of plan `number` of application `handle`, with its record.
pub fn plan_code(handle: u64, number: u32) -> Result<PlanCode, PluginError> {
    let mut applications = lock(&APPLICATIONS);
    let application = usize::try_from(handle)
        .ok()
        .and_then(|h| applications.get_mut(h))
        .ok_or_else(|| internal(format!("no application {handle}")))?;
    let plan = application
        .plans
        .get(number as usize)
        .ok_or_else(|| internal(format!("no plan {number} in application {handle}")))?;
    let source = apply::source(plan);
    // The record goes to the code as a Nix string, which it parses only when it is used.
    let info = serde_json::to_string(&serde_json::to_string(&plan.info)?)?;
    let next = u32::try_from(application.shapes.len()).map_err(|_| internal("too many plans".into()))?;
    let shape = *application.shapes.entry(source.clone()).or_insert(next);
    Ok(PlanCode { shape, source, info })
}

/// The answers the shim wrote for [`FACT_QUERIES`], read one after another.
struct Answers<'a>(&'a [u8]);

/// The answer to a query of a value.
enum Answer<'a> {
    /// The attribute is not there.
    Absent,
    /// A string's text.
    Text(&'a [u8]),
    /// Another value, as JSON.
    Json(&'a [u8]),
}

impl<'a> Answers<'a> {
    /// The answer to a `?`, `!` or `=` query.
    fn flag(&mut self) -> Result<bool, PluginError> {
        let (&first, rest) = self.0.split_first().ok_or_else(|| internal("too few answers".into()))?;
        self.0 = rest;
        match first {
            b'1' => Ok(true),
            b'0' => Ok(false),
            other => Err(internal(format!("the answer {:?} to a yes-or-no query", other as char))),
        }
    }

    /// The answer to a query of a value.
    fn value(&mut self) -> Result<Answer<'a>, PluginError> {
        let (&kind, rest) = self.0.split_first().ok_or_else(|| internal("too few answers".into()))?;
        if kind == b'n' {
            self.0 = rest;
            return Ok(Answer::Absent);
        }
        let end = rest.iter().position(|&b| b == 0).ok_or_else(|| internal("an unended answer".into()))?;
        let (text, rest) = (&rest[..end], &rest[end + 1..]);
        self.0 = rest;
        match kind {
            b's' => Ok(Answer::Text(text)),
            b'j' => Ok(Answer::Json(text)),
            other => Err(internal(format!("an answer of kind {:?}", other as char))),
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Answer<'_> {
    /// The value as JSON.
    fn json(&self) -> Result<Value, PluginError> {
        Ok(match self {
            Answer::Absent => Value::Null,
            Answer::Text(string) => Value::String(text(string).into_owned()),
            Answer::Json(json) => serde_json::from_slice(json)
                .map_err(|e| internal(format!("reading the derivation's facts: {e}")))?,
        })
    }
}

/// A string's text, its bytes that are not UTF-8 replaced.
fn text(bytes: &[u8]) -> Cow<'_, str> {
    std::str::from_utf8(bytes).map_or_else(|_| String::from_utf8_lossy(bytes), Cow::Borrowed)
}

/// [`Facts`] from the names and the other answers to [`FACT_QUERIES`], with whether
/// `overrideFacts` was read (it follows the answers) and whether there is `override`.
fn facts(name: &str, pname: Option<&str>, answers: &[u8]) -> Result<(Facts, bool, bool), PluginError> {
    let mut read = Answers(answers);
    let mut flags = [false; Query::ALL.len()];
    let mut required_system_features = Vec::new();
    let mut compiler_version = None;
    for query in Query::ALL {
        match query {
            Query::RequiredSystemFeatures => {
                if let Value::Array(features) = read.value()?.json()? {
                    required_system_features =
                        features.iter().filter_map(|f| f.as_str().map(str::to_string)).collect();
                }
            }
            Query::CompilerVersion => {
                if let Answer::Text(version) = read.value()? {
                    compiler_version = Some(text(version).into_owned());
                }
            }
            _ => {
                flags[query as usize] = read.flag()?;
            }
        }
    }
    let on = |q: Query| flags[q as usize];
    let on_top = VARIABLES.iter().map(|_| read.flag()).collect::<Result<Vec<_>, _>>()?;
    let in_env = VARIABLES.iter().map(|_| read.flag()).collect::<Result<Vec<_>, _>>()?;
    let override_facts: Option<OverrideFacts> =
        if read.is_empty() { None } else { Some(serde_json::from_value(read.value()?.json()?)?) };
    if !read.is_empty() {
        return Err(internal("more answers than queries".into()));
    }
    let structured_attrs = on(Query::StructuredAttrs);
    // With structured attributes only `env` reaches the builder (stdenv's setup exports it).
    let kept = |places: &[bool]| -> Vec<String> {
        VARIABLES.iter().zip(places).filter(|(_, &kept)| kept).map(|(v, _)| v.to_string()).collect()
    };
    let (exported, hidden) = if structured_attrs {
        (kept(&in_env), kept(&on_top))
    } else {
        (kept(&on_top), Vec::new())
    };
    let compiler = on(Query::HasCompiler).then(|| Compiler {
        gnu: on(Query::CompilerIsGnu),
        clang: on(Query::CompilerIsClang),
        version: compiler_version,
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

    /// The answer of a string value, as the shim writes it.
    fn string_answer(value: &str) -> String {
        format!("s{value}\0")
    }

    /// The answers after the names for a plain C package, with or without a compiler.
    fn answers(compiler: bool) -> String {
        let flag = |on: bool| if on { "1" } else { "0" }.to_string();
        let mut answers: String = Query::ALL
            .iter()
            .map(|query| match query {
                Query::HasOverrideAttrs => flag(true),
                Query::HasCompiler | Query::CompilerIsGnu => flag(compiler),
                Query::CompilerVersion => string_answer("12.2.0"),
                Query::RequiredSystemFeatures => "n".into(),
                _ => flag(false),
            })
            .collect();
        answers.extend(VARIABLES.iter().chain(VARIABLES).map(|_| flag(false)));
        answers
    }

    /// The number, shape and record of the plan for package `name`.
    fn plan_of(handle: u64, name: &str, compiler: bool) -> (u32, u32, String) {
        let names = string_answer(&format!("{name}-1.0")) + &string_answer(name);
        let number = plan(handle, names.as_bytes(), answers(compiler).as_bytes()).unwrap().plan;
        let code = plan_code(handle, number).unwrap();
        (number, code.shape, code.info)
    }

    #[test]
    fn packages_share_a_plan_unless_it_depends_on_their_name() {
        let options = r#"{ "target": "x86_64", "forAnotherMachine": true, "optLevel": 3 }"#;
        let handle = prepare(options, "", "", false).unwrap();
        let (alpha, _, _) = plan_of(handle, "alpha", true);
        assert_eq!(plan_of(handle, "beta", true).0, alpha, "the same facts, another name");
        let (gsl, _, info) = plan_of(handle, "gsl", true);
        assert_ne!(gsl, alpha);
        assert!(info.contains("gsl is opted out"), "{info}");
        assert_eq!(plan_of(handle, "alpha", true).0, alpha, "an opted-out package is not remembered for others");
        // Without a compiler the reason quotes the name: each package gets its own plan, all
        // of them the same code.
        let (alpha, shape, info) = plan_of(handle, "alpha", false);
        assert!(info.contains("alpha-1.0 is built without a C compiler"), "{info}");
        let (beta, beta_shape, info) = plan_of(handle, "beta", false);
        assert!(info.contains("beta-1.0 is built without a C compiler"), "{info}");
        assert_ne!(alpha, beta);
        assert_eq!(shape, beta_shape);
    }

    #[test]
    fn a_name_that_is_no_string_is_named_in_the_error() {
        let handle = prepare(r#"{ "target": "x86_64", "forAnotherMachine": true }"#, "", "", false).unwrap();
        let error = plan(handle, b"j[1]\0n", answers(true).as_bytes()).err().unwrap();
        assert_eq!(error.to_string(), "builtins.optimizeFor: the derivation's name is not a string but [1]");
        let error = plan(handle, b"s\0n", b"1").err().unwrap();
        assert!(error.to_string().contains("internal error"), "{error}");
    }
}
