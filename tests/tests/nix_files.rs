//! The Nix-native packaging (flake.nix, nix/): every .nix file parses; nix/lib.nix evaluated by
//! the real Nix on real profiles; the nix.conf fragment it writes accepted by Nix, the plugin and
//! the hook; the NixOS and home-manager modules and the package expressions evaluated with a
//! stub module system and stub packages (nix/testing/: nixpkgs is not available here); and
//! docs/reference.md equal to what scripts/gen-reference generates.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix_tier_tests::{binary, plugin_path, stderr, target_dir, NixSandbox};
use serde_json::{json, Value};

/// The repository's root directory.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A file of the repository as a Nix path literal.
fn repo_path(relative: &str) -> String {
    repo().join(relative).display().to_string()
}

/// `s` as a Nix string literal.
fn nix_string(s: &str) -> String {
    serde_json::to_string(s).unwrap().replace("${", "\\${")
}

/// A JSON value as a Nix expression (through a file, so no quoting can go wrong).
fn nix_json(sandbox: &NixSandbox, name: &str, value: &Value) -> String {
    let path = sandbox.write(&format!("json/{name}.json"), &value.to_string());
    format!("(builtins.fromJSON (builtins.readFile {}))", path.display())
}

/// `import nix/lib.nix`.
fn lib() -> String {
    format!("(import {})", repo_path("nix/lib.nix"))
}

/// `nix-tier profile`: this machine's profile.
fn detected_profile() -> Value {
    let out = Command::new(binary("nix-tier")).arg("profile").output().unwrap();
    assert!(out.status.success(), "nix-tier profile failed: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `nix-tier profile --check FILE`: the one-line summary, or the error.
fn check_profile(path: &Path) -> Result<String, String> {
    let out = Command::new(binary("nix-tier")).args(["profile", "--check"]).arg(path).output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(stderr(&out))
    }
}

/// `(maxJobs, cores, memoryMiB)` of each tier, heavy first, from a `--check` summary
/// (`… tiers heavy 1/7/14336 medium 3/4/6144 light 12/2/2048 as maxJobs/cores/memoryMiB)`).
fn summary_tiers(summary: &str) -> Vec<(u64, u64, u64)> {
    let words: Vec<&str> = summary.split_whitespace().collect();
    ["heavy", "medium", "light"]
        .iter()
        .map(|tier| {
            let at = words.iter().position(|w| w == tier).unwrap_or_else(|| panic!("no {tier} in {summary:?}"));
            let n: Vec<u64> = words[at + 1].split('/').map(|n| n.parse().unwrap()).collect();
            (n[0], n[1], n[2])
        })
        .collect()
}

/// `(maxJobs, cores, memoryMiB)` of each tier, heavy first, of a profile's `build`.
fn build_tiers(build: &Value) -> Vec<(u64, u64, u64)> {
    ["heavy", "medium", "light"]
        .iter()
        .map(|tier| {
            let t = &build["tiers"][tier];
            (t["maxJobs"].as_u64().unwrap(), t["cores"].as_u64().unwrap(), t["memoryMiB"].as_u64().unwrap())
        })
        .collect()
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().unwrap_or_else(|| panic!("not a list: {value}")).iter().map(|v| v.as_str().unwrap().to_string()).collect()
}

/// The ADR-028 profile of docs/guide-adr-028.md (its first ```json block).
fn guide_profile() -> Value {
    let guide = fs::read_to_string(repo().join("docs/guide-adr-028.md")).unwrap();
    let start = guide.find("```json\n").expect("a json block in the guide") + "```json\n".len();
    let end = start + guide[start..].find("```").unwrap();
    serde_json::from_str(&guide[start..end]).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Parsing and nix/lib.nix

fn nix_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            let top = dir == repo();
            if name.starts_with('.') || (top && ["target", "target-model", "build"].contains(&name.as_str())) {
                continue;
            }
            nix_files(&path, found);
        } else if name.ends_with(".nix") {
            found.push(path);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    let sandbox = NixSandbox::with_conf("");
    let mut files = Vec::new();
    nix_files(&repo(), &mut files);
    for expected in ["flake.nix", "nix/lib.nix", "nix/nixos-module.nix", "nix/home-manager-module.nix", "nix/package.nix"] {
        assert!(files.contains(&repo().join(expected)), "{expected} not found among {files:?}");
    }
    for file in &files {
        let out = sandbox.command("nix-instantiate").arg("--parse").arg(file).output().unwrap();
        assert!(out.status.success(), "{} does not parse:\n{}", file.display(), stderr(&out));
    }
}

#[test]
fn lib_passes_its_own_checks() {
    let sandbox = NixSandbox::with_conf("");
    let checks = repo_path("nix/testing/lib-checks.nix");
    let result = sandbox.eval_json(&format!("let c = import {checks}; in {{ inherit (c) failures details; n = builtins.length (builtins.attrNames c.checks); }}"));
    assert_eq!(result["failures"], json!([]), "nix/testing/lib-checks.nix failed: {:#}", result["details"]);
    assert!(result["n"].as_u64().unwrap() >= 20, "{result}");
}

#[test]
fn lib_on_the_detected_profile() {
    let sandbox = NixSandbox::with_conf("");
    let profile = detected_profile();
    let p = nix_json(&sandbox, "detected", &profile);
    let mut bare = profile.clone();
    bare.as_object_mut().unwrap().remove("build");
    let bare = nix_json(&sandbox, "bare", &bare);
    let l = lib();
    let got = sandbox.eval_json(&format!(
        "{{ gcc = {l}.gccPlatform {p}; host = {l}.hostPlatform {p}; gccarch = {l}.gccarchFeatures {p}; \
           features = {l}.systemFeatures {p}; maxJobs = {l}.maxJobs {p}; build = {l}.buildOf {p}; \
           formula = {l}.buildOf {bare}; }}"
    ));

    let cpu = &profile["cpu"];
    assert_eq!(got["gcc"], json!({ "gcc": cpu["gcc"] }));
    assert_eq!(got["host"], json!({ "system": profile["system"], "gcc": cpu["gcc"] }));

    // The CPU's own arch, its ISA level and every level below; none above.
    let gccarch = strings(&got["gccarch"]);
    let arch = cpu["gcc"]["arch"].as_str().unwrap();
    let isa = cpu["isaLevel"].as_str().unwrap();
    assert_eq!(gccarch[0], format!("gccarch-{arch}"), "{gccarch:?}");
    assert!(gccarch.contains(&format!("gccarch-{isa}")), "{gccarch:?}");
    let levels = ["x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4"];
    if let Some(at) = levels.iter().position(|l| *l == isa) {
        for (i, level) in levels.iter().enumerate() {
            let feature = format!("gccarch-{level}");
            assert_eq!(gccarch.contains(&feature), i <= at, "{isa} host, {feature}: {gccarch:?}");
        }
    }
    let features = strings(&got["features"]);
    for f in ["nixos-test", "benchmark", "big-parallel", "kvm"].iter().map(|s| s.to_string()).chain(gccarch) {
        assert!(features.contains(&f), "{f} missing from {features:?}");
    }

    // `nix-tier profile` writes the formula's build section: lib computes the same one.
    assert_eq!(got["build"], profile["build"]);
    assert_eq!(got["formula"], profile["build"], "lib.defaultBuild differs from the model's formula");
    let max = build_tiers(&profile["build"]).iter().map(|t| t.0).max().unwrap();
    assert_eq!(got["maxJobs"].as_u64(), Some(max));
}

#[test]
fn lib_default_build_matches_the_model_on_other_machines() {
    let sandbox = NixSandbox::with_conf("");
    let base = detected_profile();
    for (threads, total) in [(1, 512), (2, 1500), (4, 4096), (8, 16384), (16, 65536), (64, 262_144), (3, 100_000)] {
        let mut profile = base.clone();
        profile.as_object_mut().unwrap().remove("build");
        profile["cpu"]["threads"] = json!(threads);
        profile["cpu"]["physicalCores"] = json!(1);
        profile["memory"]["totalMiB"] = json!(total);
        let path = sandbox.write(&format!("machine-{threads}-{total}.json"), &profile.to_string());
        let summary = check_profile(&path).unwrap_or_else(|e| panic!("{threads} threads, {total} MiB: {e}"));
        let ours = sandbox.eval_json(&format!("{}.defaultBuild {}", lib(), nix_json(&sandbox, "m", &profile)));
        assert_eq!(build_tiers(&ours), summary_tiers(&summary), "{threads} threads, {total} MiB: {summary}");
    }
}

#[test]
fn the_example_profile_is_the_guides_and_nix_tier_accepts_it() {
    let example = repo().join("nix/examples/skylake.json");
    let text = fs::read_to_string(&example).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), guide_profile(), "nix/examples/skylake.json differs from docs/guide-adr-028.md");
    let summary = check_profile(&example).unwrap();
    assert_eq!(summary_tiers(&summary), vec![(1, 7, 14336), (3, 4, 6144), (12, 2, 2048)]);

    let sandbox = NixSandbox::with_conf("");
    let got = sandbox.eval_json(&format!(
        "let l = {}; p = l.profileFromJSON {}; in {{ f = l.gccarchFeatures p; j = l.maxJobs p; }}",
        lib(),
        example.display()
    ));
    assert_eq!(strings(&got["f"]), ["gccarch-skylake", "gccarch-x86-64-v3", "gccarch-x86-64-v2", "gccarch-x86-64"]);
    assert_eq!(got["j"], 12);
}

/// The detected profile with `overrides` merged by lib.mergeProfile, written by lib.profileJSON.
fn profile_from_settings(sandbox: &NixSandbox, name: &str, overrides: &Value) -> (PathBuf, Value) {
    let base = nix_json(sandbox, &format!("{name}-base"), &detected_profile());
    let over = nix_json(sandbox, &format!("{name}-over"), overrides);
    let text = sandbox.eval_json(&format!("let l = {}; in l.profileJSON (l.mergeProfile {base} {over})", lib()));
    let text = text.as_str().unwrap();
    (sandbox.write(&format!("{name}.json"), text), serde_json::from_str(text).unwrap())
}

#[test]
fn profile_settings_become_a_profile_nix_tier_accepts() {
    let sandbox = NixSandbox::with_conf("");
    let overrides = json!({
        "build": {
            "memoryBudgetMiB": 4000,
            "rules": [ { "match": "nodejs*", "tier": "heavy" } ],
            "tiers": { "heavy": { "maxJobs": 1, "cores": 2, "memoryMiB": 3000 },
                       "medium": { "maxJobs": 2, "cores": 1, "memoryMiB": 1500 },
                       "light": { "maxJobs": 3, "cores": 1, "memoryMiB": 777 } }
        }
    });
    let (path, profile) = profile_from_settings(&sandbox, "settings", &overrides);
    let summary = check_profile(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(summary_tiers(&summary), vec![(1, 2, 3000), (2, 1, 1500), (3, 1, 777)], "{summary}");
    assert_eq!(profile["build"]["rules"][0]["match"], "nodejs*");
    assert_eq!(profile["cpu"], detected_profile()["cpu"], "the merge kept the detected cpu");

    // A bad setting is caught by the same check.
    let (bad, _) = profile_from_settings(&sandbox, "bad", &json!({ "build": { "tiers": { "light": { "cores": 0 } } } }));
    assert!(check_profile(&bad).is_err());
}

// ---------------------------------------------------------------------------------------------
// The nix.conf fragment, with the real Nix, plugin and hook

/// `lib.nixConf { … }` with the release plugin and hook.
fn nix_conf(sandbox: &NixSandbox, plugin: bool, hook: bool, profile: &Path) -> String {
    let mut args = format!("profile = {};", nix_string(&profile.display().to_string()));
    if plugin {
        args += &format!(" plugin = {};", nix_string(&plugin_path().display().to_string()));
    }
    if hook {
        args += &format!(" hook = {};", nix_string(&binary("nix-tier-hook").display().to_string()));
    }
    sandbox.eval_json(&format!("{}.nixConf {{ {args} }}", lib())).as_str().unwrap().to_string()
}

#[test]
fn nix_conf_fragment_loads_the_plugin_with_the_pinned_profile() {
    let scratch = NixSandbox::with_conf("");
    let (profile_path, mut profile) =
        profile_from_settings(&scratch, "pinned", &json!({ "build": { "defaultTier": "medium" } }));
    let fragment = nix_conf(&scratch, true, false, &profile_path);
    assert!(fragment.contains(&format!("hardware-profile = {}\n", profile_path.display())), "{fragment}");
    assert!(!fragment.contains("build-hook"), "{fragment}");

    let sandbox = NixSandbox::with_conf(&fragment);
    let out = sandbox.eval_with("builtins.hardwareProfile", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("unknown setting"), "{}", stderr(&out));
    let evaluated: Value = serde_json::from_slice(&out.stdout).unwrap();
    profile["source"] = json!("pinned");
    assert_eq!(evaluated, profile);

    // What NixOS and home-manager check before installing a nix.conf: `nix show-config` with
    // no unknown setting, and the values as written.
    let out = sandbox.command("nix").args(["--extra-experimental-features", "nix-command", "show-config"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("unknown setting"), "{}", stderr(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains(&format!("hardware-profile = {}\n", profile_path.display())), "{shown}");
    assert!(shown.contains(&format!("plugin-files = {}\n", plugin_path().display())), "{shown}");
}

#[test]
fn nix_conf_fragment_runs_the_hook_with_the_profile_and_state_directory() {
    let scratch = NixSandbox::with_conf("");
    // A rule only this profile has, so the history shows that the hook used it.
    let (profile_path, profile) = profile_from_settings(
        &scratch,
        "hook",
        &json!({ "build": { "rules": [ { "match": "nix-conf-probe", "tier": "medium" } ] } }),
    );
    let fragment = nix_conf(&scratch, true, true, &profile_path);
    for line in ["build-hook = ", "build-poll-interval = 0\n", "max-jobs = ", "extra-system-features = "] {
        assert!(fragment.contains(line), "{line:?} missing from\n{fragment}");
    }
    let sandbox = NixSandbox::with_conf(&fragment);
    let state = sandbox.path().join("tier-state");

    // Nix 2.25 to 2.33 lose build-hook from the system nix.conf (this sandbox's NIX_CONF_DIR;
    // fixed in 2.34, NixOS/nix#15083); on those the documented workaround, `build-hook` in
    // NIX_CONFIG (what the NixOS module gives the daemon), is what is tested.
    let version = nix_tier_tests::nix_version();
    let minor: Option<u32> = version.strip_prefix("2.").and_then(|rest| rest.split('.').next()?.parse().ok());
    let loses_build_hook = minor.is_some_and(|minor| (25..34).contains(&minor));
    let hook = fragment.lines().find_map(|line| line.strip_prefix("build-hook = ")).unwrap();
    let nix_config = if loses_build_hook { format!("build-hook = {hook}") } else { String::new() };

    // A build that needs the CPU's gccarch feature: Nix refuses it unless extra-system-features
    // took effect.
    let arch = profile["cpu"]["gcc"]["arch"].as_str().unwrap();
    let expr = format!(
        "derivation {{ name = \"nix-conf-probe-1.0\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
           args = [ \"-c\" \"/bin/sleep 1; echo ok > $out\" ]; requiredSystemFeatures = [ \"gccarch-{arch}\" ]; }}"
    );
    let out = sandbox
        .command("nix-build")
        .args(["--no-out-link", "-E", &expr])
        .env("NIX_CONFIG", &nix_config)
        .env("NIX_TIER_STATE_DIR", &state)
        .output()
        .unwrap();
    assert!(out.status.success(), "nix-build failed:\n{}", stderr(&out));
    assert!(state.join("state.json").is_file(), "the hook did not use NIX_TIER_STATE_DIR {}", state.display());

    // The hook's watcher records the build once Nix releases its output lock.
    let history = || {
        let out = sandbox
            .command(binary("nix-tier"))
            .args(["history", "--json"])
            .env("NIX_TIER_STATE_DIR", &state)
            .output()
            .unwrap();
        assert!(out.status.success(), "nix-tier history failed: {}", stderr(&out));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let build = loop {
        let h = history();
        if let Some(b) = h["builds"].as_array().unwrap().iter().find(|b| b["package"] == "nix-conf-probe") {
            break b.clone();
        }
        assert!(Instant::now() < deadline, "the build never reached the history in {}: {h:#}", state.display());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(build["tier"], "medium", "the hook did not read the pinned profile: {build:#}");
    assert_eq!(build["outcome"], "succeeded", "{build:#}");

    // nix-tier status reads the same directory and, with NIX_TIER_PROFILE, the same profile.
    let out = sandbox
        .command(binary("nix-tier"))
        .args(["status", "--json"])
        .env("NIX_TIER_STATE_DIR", &state)
        .env("NIX_TIER_PROFILE", &profile_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "nix-tier status failed: {}", stderr(&out));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["stateDir"], json!(state.display().to_string()));
    assert_eq!(status["budgetMiB"], profile["build"]["memoryBudgetMiB"]);
}

// ---------------------------------------------------------------------------------------------
// The modules, with the stub module system of nix/testing/

/// The NixOS fixtures: nixpkgs' current nix-daemon.nix (with nix.daemonUser) or its previous form.
const NIXOS: &str = "import NIXOS { }";
const NIXOS_PREVIOUS: &str = "import NIXOS { daemonUserOption = false; }";

/// The Nix expression evaluating `module` beside the fixtures of its module system (`fixtures`,
/// with NIXOS standing for nix/testing/nixos.nix; home-manager's for the home-manager module),
/// with the user's `definitions` (a Nix attribute set; `profile` in it is
/// nix/examples/skylake.json) and `nix.package` a stub Nix of `nix_version`.
fn module_expr(module: &str, fixtures: &str, definitions: &str, nix_version: Option<&str>) -> String {
    let fixtures = if module.contains("home-manager") {
        format!("import {}", repo_path("nix/testing/home-manager.nix"))
    } else {
        fixtures.replace("NIXOS", &repo_path("nix/testing/nixos.nix"))
    };
    let (version, package) = match nix_version {
        Some(v) => (v, "[ { nix.package = pkgs.nix; } ]"),
        None => ("2.8.0", "[ ]"),
    };
    format!(
        "let pkgs = import {stub} {{ nixVersion = \"{version}\"; }}; profile = {example}; \
             definitions = {definitions}; \
             e = import {eval} {{ module = {module}; inherit pkgs; fixtures = {fixtures}; \
                 definitions = (if builtins.isList definitions then definitions else [ definitions ]) ++ {package}; }}; \
         in e",
        stub = repo_path("nix/testing/stub-pkgs.nix"),
        example = repo_path("nix/examples/skylake.json"),
        eval = repo_path("nix/testing/eval-module.nix"),
        module = repo_path(module),
    )
}

/// `expr` (a Nix expression of `e`, the evaluation of `module_expr` with nixpkgs' current
/// nix-daemon.nix), evaluated with a writable store: profiles are copied there.
fn eval_in(sandbox: &NixSandbox, expr: &str, module: &str, definitions: &str, nix_version: Option<&str>) -> Value {
    let out = sandbox.eval_with(&format!("(e: {expr}) ({})", module_expr(module, NIXOS, definitions, nix_version)), &["--read-write-mode"]);
    assert!(out.status.success(), "evaluating {expr} of {module} with {definitions} failed:\n{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `attr` of the evaluation of `module_expr` with nixpkgs' current nix-daemon.nix.
fn eval_module(sandbox: &NixSandbox, module: &str, definitions: &str, nix_version: Option<&str>, attr: &str) -> Value {
    eval_in(sandbox, &format!("e.{attr}"), module, definitions, nix_version)
}

/// The error evaluating `attr` gives (the evaluation must fail).
fn module_error(sandbox: &NixSandbox, module: &str, definitions: &str, attr: &str) -> String {
    sandbox.eval_error(&format!("(e: e.{attr}) ({})", module_expr(module, NIXOS, definitions, Some("2.8.0"))), &["--read-write-mode"])
}

fn option<'a>(docs: &'a Value, name: &str) -> &'a Value {
    docs.as_array().unwrap().iter().find(|o| o["name"] == name).unwrap_or_else(|| panic!("no option {name}"))
}

fn assert_documented(docs: &Value, prefix: &str) {
    for o in docs.as_array().unwrap() {
        let name = o["name"].as_str().unwrap();
        assert!(name.starts_with(prefix), "{name} outside {prefix}");
        assert!(o["description"].as_str().is_some_and(|d| d.len() > 20), "{name}: no description: {o}");
        assert!(o["type"].as_str().is_some_and(|t| !t.is_empty()), "{name}: no type: {o}");
        assert!(o["default"]["text"].as_str().is_some(), "{name}: no default: {o}");
    }
}

/// The store path the sandbox's Nix wrote `path` as, with its text.
fn store_file(sandbox: &NixSandbox, path: &Value) -> String {
    let path = path.as_str().unwrap_or_else(|| panic!("not a path: {path}"));
    let store = sandbox.path().join("store");
    assert!(Path::new(path).starts_with(&store), "{path} is not in the store {}", store.display());
    fs::read_to_string(path).unwrap()
}

#[test]
fn nixos_module_declares_typed_documented_options() {
    let sandbox = NixSandbox::with_conf("");
    let docs = eval_module(&sandbox, "nix/nixos-module.nix", "{ }", Some("2.8.0"), "docs");
    assert_documented(&docs, "services.nix-tier.");
    let names: BTreeSet<&str> = docs.as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    for wanted in [
        "enable", "package", "profile", "profileSettings", "plugin.enable", "plugin.package", "hook.enable",
        "pollInterval", "stateDirectory", "gccarchFeatures", "cgroups.enable", "cgroups.root",
    ] {
        assert!(names.contains(format!("services.nix-tier.{wanted}").as_str()), "{wanted} not declared: {names:?}");
    }
    let check = |name: &str, ty: &str, default: &str| {
        let o = option(&docs, &format!("services.nix-tier.{name}"));
        assert_eq!((o["type"].as_str().unwrap(), o["default"]["text"].as_str().unwrap()), (ty, default), "{name}");
    };
    check("enable", "boolean", "false");
    check("profile", "null or absolute path", "null");
    check("profileSettings", "hardware profile fields (docs/profile.md)", "{ }");
    check("pollInterval", "unsigned integer, meaning >=0", "0");
    check("stateDirectory", "string", "\"/var/lib/nix-tier\"");
    check("cgroups.root", "string", "\"/sys/fs/cgroup/system.slice/nix-daemon.service\"");
    // Defaults that depend on the system's Nix are documented, not evaluated.
    for name in ["plugin.enable", "hook.enable"] {
        assert_eq!(option(&docs, &format!("services.nix-tier.{name}"))["default"]["markdown"], true, "{name}");
    }
}

#[test]
fn nixos_module_configures_nix_conf_and_the_daemon() {
    let sandbox = NixSandbox::with_conf("");
    let typical = "{ services.nix-tier = { enable = true; inherit profile; }; }";
    let config = eval_module(&sandbox, "nix/nixos-module.nix", typical, Some("2.8.0"), "config");
    let settings = &config["nix"]["settings"];

    let plugin = strings(&settings["plugin-files"]);
    assert!(plugin.len() == 1 && plugin[0].ends_with("-nix-tier-plugin-0.1.0/lib/libnix_tier_loader.so"), "{plugin:?}");
    // The profile, copied to the store.
    let profile_file = settings["hardware-profile"].as_str().unwrap();
    let copied = store_file(&sandbox, &settings["hardware-profile"]);
    assert_eq!(copied, fs::read_to_string(repo().join("nix/examples/skylake.json")).unwrap());
    let hook = settings["build-hook"].as_str().unwrap();
    assert!(hook.ends_with("-nix-tier-0.1.0/bin/nix-tier-hook"), "{settings}");
    assert_eq!(settings["build-poll-interval"], 0);
    assert_eq!(settings["max-jobs"], 12);
    assert_eq!(
        strings(&settings["system-features"]),
        ["nixos-test", "benchmark", "big-parallel", "kvm", "gccarch-skylake", "gccarch-x86-64-v3", "gccarch-x86-64-v2", "gccarch-x86-64"]
    );

    let daemon = &config["systemd"]["services"]["nix-daemon"];
    assert_eq!(daemon["environment"]["NIX_TIER_STATE_DIR"], "/var/lib/nix-tier");
    assert_eq!(daemon["environment"]["NIX_TIER_PROFILE"], profile_file);
    assert_eq!(daemon["environment"]["NIX_TIER_CGROUP_ROOT"], "/sys/fs/cgroup/system.slice/nix-daemon.service");
    assert_eq!(daemon["environment"]["NIX_CONFIG"], json!(format!("build-hook = {hook}")));
    // nixpkgs' own settings stay; the command line is the packaged unit's.
    assert_eq!(daemon["serviceConfig"], json!({ "Delegate": "yes", "DelegateSubgroup": "supervisor", "LimitNOFILE": 1048576 }));
    // The broker runs from boot and before the daemon, as root (no User), with the hook's
    // environment.
    assert_eq!(
        config["systemd"]["services"]["nix-tier-broker"],
        json!({
            "description": "nix-tier build admission broker",
            "wantedBy": ["multi-user.target", "nix-daemon.service"],
            "before": ["nix-daemon.service"],
            "environment": {
                "NIX_TIER_STATE_DIR": "/var/lib/nix-tier",
                "NIX_TIER_PROFILE": profile_file,
                "NIX_TIER_CGROUP_ROOT": "/sys/fs/cgroup/system.slice/nix-daemon.service",
            },
            "serviceConfig": { "ExecStart": format!("{hook} --broker --stay"), "Restart": "always", "RestartSec": "1s" },
            "path": [],
        })
    );
    assert_eq!(config["systemd"]["tmpfiles"]["rules"], json!(["d /var/lib/nix-tier 0700 root - - -"]));
    assert_eq!(config["environment"]["variables"]["NIX_TIER_STATE_DIR"], "/var/lib/nix-tier");
    assert_eq!(config["environment"]["etc"]["nix/hardware-profile.json"]["source"], profile_file);
    assert!(config["environment"]["systemPackages"][0].as_str().unwrap().ends_with("-nix-tier-0.1.0"));
    assert_eq!(config["warnings"], json!([]));
    assert!(config["assertions"].as_array().unwrap().iter().all(|a| a["assertion"] == true), "{}", config["assertions"]);

    // max-jobs is only a default: the user's own value wins.
    let own = "{ services.nix-tier = { enable = true; inherit profile; }; nix.settings.max-jobs = 4; }";
    assert_eq!(eval_module(&sandbox, "nix/nixos-module.nix", own, Some("2.8.0"), "config.nix.settings.max-jobs"), 4);

    // Disabled: the configuration is the one without the module.
    let parts = "config.nix.settings // { inherit (e.config) systemd environment warnings assertions; }";
    let disabled = eval_module(&sandbox, "nix/nixos-module.nix", "{ services.nix-tier.profile = profile; }", Some("2.8.0"), parts);
    let without = sandbox.eval_json(&format!(
        "(e: e.{parts}) ({})",
        module_expr("nix/nixos-module.nix", NIXOS, "{ }", Some("2.8.0")).replace(&format!("module = {}", repo_path("nix/nixos-module.nix")), "module = (_: { })")
    ));
    assert_eq!(disabled, without);
}

#[test]
fn nixos_module_follows_the_nix_version() {
    let sandbox = NixSandbox::with_conf("");
    let typical = "{ services.nix-tier = { enable = true; inherit profile; }; }";

    // Nix 2.28: the plugin, built against it; the hook in nix.conf and, because 2.25 to 2.33 lose
    // it from there, in the daemon's NIX_CONFIG; the unit's command line is left alone.
    let config = eval_module(&sandbox, "nix/nixos-module.nix", typical, Some("2.28.3"), "config");
    let settings = &config["nix"]["settings"];
    let plugin_files = strings(&settings["plugin-files"]);
    assert!(plugin_files.len() == 1 && plugin_files[0].ends_with("/lib/libnix_tier_loader.so"), "{settings}");
    let hook = settings["build-hook"].as_str().unwrap();
    let daemon = &config["systemd"]["services"]["nix-daemon"];
    assert_eq!(daemon["environment"]["NIX_CONFIG"], json!(format!("build-hook = {hook}")));
    assert!(daemon["serviceConfig"].get("ExecStart").is_none(), "{daemon}");
    assert!(daemon["environment"]["NIX_TIER_PROFILE"].as_str().unwrap().ends_with("-hardware-profile.json"));

    // Nix 2.20 has no branch in the compat header: no plugin by default, and forcing it is
    // refused by an assertion.
    let settings = eval_module(&sandbox, "nix/nixos-module.nix", typical, Some("2.20.1"), "config.nix.settings");
    assert!(settings.get("plugin-files").is_none() && settings.get("hardware-profile").is_none(), "{settings}");
    let forced = "{ services.nix-tier = { enable = true; inherit profile; plugin.enable = true; }; }";
    let assertions = eval_module(&sandbox, "nix/nixos-module.nix", forced, Some("2.20.1"), "config.assertions");
    assert!(assertions.as_array().unwrap().iter().any(|a| a["assertion"] == false && a["message"].as_str().unwrap().contains("2.20.1")));

    // Lix 2.93 still speaks the text protocol; Lix 2.94 does not: there the hook is off by
    // default, every assertion holds, and a warning says what works.
    let hook_on = |version: &str| eval_module(&sandbox, "nix/nixos-module.nix", typical, Some(version), "config.services.nix-tier.hook.enable");
    assert_eq!((hook_on("2.93.3"), hook_on("2.94.0")), (json!(true), json!(false)));
    let config = eval_module(&sandbox, "nix/nixos-module.nix", typical, Some("2.94.0"), "config");
    assert!(config["assertions"].as_array().unwrap().iter().all(|a| a["assertion"] == true), "{}", config["assertions"]);
    assert!(config["nix"]["settings"].get("build-hook").is_none() && config["systemd"]["services"]["nix-daemon"]["environment"].get("NIX_CONFIG").is_none());
    let warnings = strings(&config["warnings"]);
    assert!(warnings.len() == 1 && warnings[0].contains("Lix 2.94.0") && warnings[0].contains("What works") && warnings[0].contains("gccarch-*"), "{warnings:?}");
    assert!(config["nix"]["settings"]["system-features"].to_string().contains("gccarch-skylake"));
    // Asked for anyway, it is refused.
    let forced = "{ services.nix-tier = { enable = true; inherit profile; hook.enable = true; }; }";
    let assertions = eval_module(&sandbox, "nix/nixos-module.nix", forced, Some("2.94.0"), "config.assertions");
    assert!(assertions.as_array().unwrap().iter().any(|a| a["assertion"] == false && a["message"].as_str().unwrap().contains("hook.enable")));

    // Nix 2.35.0 and 2.35.1 can lose the wake-ups of builds waiting for a max-jobs slot: one
    // warning names the bug and the fix; 2.34 and 2.35.2 get none.
    for version in ["2.35.0", "2.35.1"] {
        let warnings = strings(&eval_module(&sandbox, "nix/nixos-module.nix", typical, Some(version), "config.warnings"));
        assert!(warnings.len() == 1 && warnings[0].contains(&format!("Nix {version} ")) && warnings[0].contains("nix#16005") && warnings[0].contains("2.35.2 or later"), "{version}: {warnings:?}");
    }
    for version in ["2.34.8", "2.35.2"] {
        assert_eq!(eval_module(&sandbox, "nix/nixos-module.nix", typical, Some(version), "config.warnings"), json!([]), "{version}");
    }
}

/// Nix 2.26, Debian trixie's source package built by scripts/check-newer-nix (its `nix`,
/// runnable on this host); None (outside CI) when it is missing.
fn trixie_nix() -> Option<Command> {
    let nix = repo().join("build/newer-nix/bin/nix");
    if !nix.is_file() {
        let missing = format!("Nix 2.26 ({}) is missing: run scripts/check-newer-nix", nix.display());
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{missing}");
        eprintln!("skipping the Nix 2.26 part: {missing}");
        return None;
    }
    Some(Command::new(nix))
}

/// The `build-hook` a Nix (`nix`, a command for the `nix` program) takes from `nix_conf` as
/// /etc/nix/nix.conf and `nix_config` as NIX_CONFIG, as `nix show-config` reports it.
fn effective_build_hook(sandbox: &NixSandbox, mut nix: Command, nix_conf: &str, nix_config: Option<&str>) -> String {
    let conf = sandbox.path().join("daemon-conf");
    fs::create_dir_all(&conf).unwrap();
    fs::write(conf.join("nix.conf"), format!("{nix_conf}\nbuild-users-group =\nsubstituters =\n")).unwrap();
    nix.args(["--extra-experimental-features", "nix-command", "show-config"])
        .env("NIX_CONF_DIR", &conf)
        .env("NIX_USER_CONF_FILES", conf.join("none"))
        .env("NIX_STORE_DIR", sandbox.path().join("store"))
        .env("NIX_STATE_DIR", sandbox.path().join("state"))
        .env_remove("NIX_CONFIG");
    if let Some(value) = nix_config {
        nix.env("NIX_CONFIG", value);
    }
    let out = nix.output().unwrap();
    assert!(out.status.success(), "nix show-config failed: {}", stderr(&out));
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = shown.lines().find(|l| l.starts_with("build-hook = ")).unwrap_or_else(|| panic!("no build-hook in {shown}"));
    line["build-hook = ".len()..].to_string()
}

/// The command line systemd runs for a unit's `ExecStart` list: the last entry after the last
/// empty one (which clears what came before), or the packaged unit's when nothing overrides it.
fn effective_exec_start(service_config: &Value) -> Option<String> {
    let entries = strings(service_config.get("ExecStart")?);
    let start = entries.iter().rposition(|e| e.is_empty()).map_or(0, |i| i + 1);
    assert_eq!(entries.len() - start, 1, "a service must start one command: {entries:?}");
    Some(entries[start].clone())
}

#[test]
fn nixos_module_keeps_the_hook_with_every_daemon_form() {
    let sandbox = NixSandbox::with_conf("");
    let forms = [
        ("previous nix-daemon.nix", NIXOS_PREVIOUS, "{ }"),
        ("root daemon", NIXOS, "{ }"),
        ("unprivileged daemon", NIXOS, "{ nix.daemonUser = \"nix-daemon\"; }"),
    ];
    for version in ["2.8.0", "2.28.3"] {
        for (form, fixtures, daemon) in forms {
            let definitions = format!("[ {{ services.nix-tier = {{ enable = true; inherit profile; plugin.enable = false; }}; }} {daemon} ]");
            let expr = module_expr("nix/nixos-module.nix", fixtures, &definitions, Some(version));
            let out = sandbox.eval_with(
                &format!("(e: {{ inherit (e.config.systemd.services) nix-daemon nix-tier-broker; hook = e.config.nix.settings.build-hook; conf = e.config.environment.etc.\"nix/nix.conf\".source.text; tmpfiles = e.config.systemd.tmpfiles.rules; }}) ({expr})"),
                &["--read-write-mode"],
            );
            assert!(out.status.success(), "{form}, Nix {version}: {}", stderr(&out));
            let config: Value = serde_json::from_slice(&out.stdout).unwrap();
            let daemon = &config["nix-daemon"];
            let hook = config["hook"].as_str().unwrap();
            // The daemon that starts is nixpkgs' own: the unit's, or the unprivileged wrapper.
            let exec = effective_exec_start(&daemon["serviceConfig"]);
            match form {
                "unprivileged daemon" => {
                    let exec = exec.unwrap_or_else(|| panic!("{form}: no ExecStart: {daemon}"));
                    assert!(exec.contains("nix-daemon-nswrapper") && !exec.contains("build-hook"), "{form}: {exec}");
                }
                _ => assert_eq!(exec, None, "{form}, Nix {version}: {daemon}"),
            }
            // The broker and the state directory are the user the daemon's hooks run as.
            let user = if form == "unprivileged daemon" { "nix-daemon" } else { "root" };
            assert_eq!(config["nix-tier-broker"]["serviceConfig"].get("User").and_then(Value::as_str).unwrap_or("root"), user, "{form}");
            assert!(strings(&config["tmpfiles"]).iter().any(|r| r.starts_with("d ") && r.contains(&format!(" 0700 {user} "))), "{form}: {}", config["tmpfiles"]);
            // Whatever starts gets the hook from its environment, as every Nix reads it.
            let nix_config = daemon["environment"]["NIX_CONFIG"].as_str().unwrap_or_else(|| panic!("{form}: no NIX_CONFIG: {daemon}"));
            let nix_conf = config["conf"].as_str().unwrap();
            assert!(nix_conf.contains(&format!("build-hook = {hook}\n")), "{nix_conf}");
            assert_eq!(effective_build_hook(&sandbox, Command::new("nix"), nix_conf, Some(nix_config)), hook, "Nix 2.8, {form}");
            if let Some(nix) = trixie_nix() {
                assert_eq!(effective_build_hook(&sandbox, nix, nix_conf, Some(nix_config)), hook, "Nix 2.26, {form}");
            }
        }
    }
    // What NIX_CONFIG is for: Nix 2.26 loses build-hook from /etc/nix/nix.conf alone; 2.8 keeps it.
    let alone = "build-hook = /nix-tier/hook";
    assert_eq!(effective_build_hook(&sandbox, Command::new("nix"), alone, None), "/nix-tier/hook");
    if let Some(nix) = trixie_nix() {
        assert_ne!(effective_build_hook(&sandbox, nix, alone, None), "/nix-tier/hook", "Nix 2.26 kept build-hook from nix.conf");
    }
}

#[test]
fn nixos_module_leaves_the_daemon_alone_when_nix_is_disabled() {
    let sandbox = NixSandbox::with_conf("");
    let definitions = "{ services.nix-tier = { enable = true; inherit profile; }; nix.enable = false; }";
    let config = eval_in(&sandbox, "{ inherit (e.config) systemd environment assertions; }", "nix/nixos-module.nix", definitions, Some("2.28.3"));
    assert_eq!(config["systemd"]["services"], json!({}), "the daemon unit was touched");
    assert_eq!(config["environment"]["etc"], json!({}));
    assert_eq!(config["environment"]["systemPackages"], json!([]));
    let failed: Vec<&Value> = config["assertions"].as_array().unwrap().iter().filter(|a| a["assertion"] == false).collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    let message = failed[0]["message"].as_str().unwrap();
    assert!(message.contains("nix.enable") && message.contains("services.nix-tier.enable = false"), "{message}");
}

#[test]
fn modules_copy_the_profile_to_the_store_and_name_the_option_when_it_is_missing() {
    let sandbox = NixSandbox::with_conf("");
    let text = fs::read_to_string(repo().join("nix/examples/skylake.json")).unwrap();
    let file = sandbox.write("etc/hardware-profile.json", &text);
    let as_string = nix_string(&file.display().to_string());
    let missing = nix_string(&sandbox.path().join("etc/absent.json").display().to_string());
    for (module, option, file_of) in [
        ("nix/nixos-module.nix", "services.nix-tier", "config.environment.variables.NIX_TIER_PROFILE"),
        ("nix/home-manager-module.nix", "programs.nix-tier", "config.home.sessionVariables.NIX_TIER_PROFILE"),
    ] {
        // An absolute string is copied to the store too.
        let definitions = format!("{{ {option} = {{ enable = true; profile = {as_string}; }}; }}");
        let path = eval_module(&sandbox, module, &definitions, Some("2.8.0"), file_of);
        assert_eq!(store_file(&sandbox, &path), text, "{module}");
        // A missing file is an error naming the option and the fix, whether anything reads the
        // profile at evaluation time or not.
        for extra in ["", "plugin.enable = false; hook.enable = false;"] {
            let definitions = format!("{{ {option} = {{ enable = true; profile = {missing}; {extra} }}; }}");
            let error = module_error(&sandbox, module, &definitions, file_of);
            assert!(error.contains(&format!("{option}.profile: ")) && error.contains("does not exist") && error.contains("nix-tier profile >"), "{module}: {error}");
        }
        // A relative string is not a path.
        let definitions = format!("{{ {option} = {{ enable = true; profile = \"hardware-profile.json\"; }}; }}");
        let error = module_error(&sandbox, module, &definitions, file_of);
        assert!(error.contains(&format!("option `{option}.profile' is not of type `null or absolute path'")), "{module}: {error}");
    }
}

/// Whether the model (and so the hook, which loads a pinned profile with it) accepts `profile`.
fn model_accepts(profile: &Value) -> Result<(), String> {
    nix_tier_model::Profile::from_json_str(&profile.to_string(), "test").map(|_| ()).map_err(|e| e.to_string())
}

#[test]
fn modules_refuse_profiles_the_hook_would_refuse_naming_the_option() {
    let sandbox = NixSandbox::with_conf("");
    let example: Value = serde_json::from_str(&fs::read_to_string(repo().join("nix/examples/skylake.json")).unwrap()).unwrap();
    let bad_file = sandbox.write("zero-threads.json", &{
        let mut p = example.clone();
        p["cpu"]["threads"] = json!(0);
        p.to_string()
    });
    // (settings, the option named, the field named, what the merged profile would be for the hook)
    let cases: Vec<(String, &str, &str, Option<Value>)> = vec![
        ("profileSettings.build.tiers.light.maxJobs = \"12\";".into(), "profileSettings", "build.tiers.light.maxJobs", Some(json!({"build": {"tiers": {"light": {"maxJobs": "12"}}}}))),
        ("profileSettings.build.tiers.heavy = \"big\";".into(), "profileSettings", "build.tiers.heavy", Some(json!({"build": {"tiers": {"heavy": "big"}}}))),
        ("profileSettings.build.rules = [ { match = \"gcc*\"; tier = \"huge\"; } ];".into(), "profileSettings", "build.rules[0].tier", Some(json!({"build": {"rules": [{"match": "gcc*", "tier": "huge"}]}}))),
        ("profileSettings.build.rules = [ { match = \"g*cc\"; tier = \"heavy\"; } ];".into(), "profileSettings", "build.rules[0].match", Some(json!({"build": {"rules": [{"match": "g*cc", "tier": "heavy"}]}}))),
        ("profileSettings.build.defaultTier = 3;".into(), "profileSettings", "build.defaultTier", Some(json!({"build": {"defaultTier": 3}}))),
        ("profileSettings.build.tiers.heavy.maxJobs = 0;".into(), "profileSettings", "build.tiers.heavy.maxJobs", Some(json!({"build": {"tiers": {"heavy": {"maxJobs": 0}}}}))),
        ("profileSettings.build.tiers.heavy.memoryMiB = 99999999;".into(), "profile", "build.tiers.heavy.memoryMiB", Some(json!({"build": {"tiers": {"heavy": {"memoryMiB": 99999999}}}}))),
        ("profileSettings.cpu.threadz = 4;".into(), "profileSettings", "cpu.threadz", Some(json!({"cpu": {"threadz": 4}}))),
        (format!("profile = {};", nix_string(&bad_file.display().to_string())), "profile", "cpu.threads", None),
    ];
    for (module, option) in [("nix/nixos-module.nix", "services.nix-tier"), ("nix/home-manager-module.nix", "programs.nix-tier")] {
        for (settings, named, field, merged) in &cases {
            let profile = if settings.starts_with("profile =") { "" } else { "inherit profile;" };
            let definitions = format!("{{ {option} = {{ enable = true; {profile} {settings} }}; }}");
            let error = module_error(&sandbox, module, &definitions, "config.assertions ++ [ e.config.nix.settings ]");
            assert!(error.contains(&format!("{option}.{named}")) && error.contains(&format!("field {field}: ")), "{module}, {settings}: {error}");
            assert!(error.contains("docs/profile.md"), "{module}, {settings}: no fix named: {error}");
            // The hook would indeed refuse it.
            let mut whole = example.clone();
            if let Some(over) = merged {
                merge_json(&mut whole, over);
            } else {
                whole = serde_json::from_str(&fs::read_to_string(&bad_file).unwrap()).unwrap();
            }
            assert!(model_accepts(&whole).is_err(), "{settings}: the model accepts what the module refuses");
        }
        // Settings without a file must be a whole profile, and say so.
        let definitions = format!("{{ {option} = {{ enable = true; profileSettings.build.tiers.heavy.cores = 7; }}; }}");
        let error = module_error(&sandbox, module, &definitions, "config.assertions ++ [ e.config.nix.settings ]");
        assert!(error.contains(&format!("{option}.profileSettings")) && error.contains("whole profile") && error.contains("field cpu: missing"), "{module}: {error}");
    }
}

/// `over` merged into `base` as lib.mergeProfile does: objects recursively, anything else replaced.
fn merge_json(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(base), Value::Object(over)) => {
            for (key, value) in over {
                merge_json(base.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
        (base, over) => *base = over.clone(),
    }
}

/// A profile with every optional part present, so that every field of the schema appears.
fn full_profile() -> Value {
    let mut profile: Value = serde_json::from_str(&fs::read_to_string(repo().join("nix/examples/skylake.json")).unwrap()).unwrap();
    profile["source"] = json!("pinned");
    profile["gpus"] = json!([{ "vendor": "nvidia", "driver": "nvidia", "pciId": "10de:2684" }]);
    profile["build"]["rules"] = json!([{ "match": "nodejs*", "tier": "heavy" }]);
    profile
}

/// Variants of `value` at `path` for a `lib.profileSchema` type: each wrong in one way, or
/// right in another (null, a missing optional field).
fn mutations(schema: &Value, value: &Value, path: &mut Vec<Value>, out: &mut Vec<(Vec<Value>, Option<Value>)>) {
    let mut push = |replacement: Option<Value>| out.push((path.clone(), replacement));
    match schema["kind"].as_str().unwrap() {
        "string" | "pattern" => {
            push(Some(json!(5)));
            push(Some(json!("")));
            push(Some(json!("a*b")));
        }
        "integer" => {
            for n in [json!(-1), json!(0), json!(1), json!(4_294_967_295u64), json!(4_294_967_296u64), json!("1"), json!(1.5)] {
                push(Some(n));
            }
        }
        "enum" => {
            push(Some(json!("bogus")));
            push(Some(json!(3)));
        }
        "nullOr" => {
            push(Some(Value::Null));
            if !value.is_null() {
                mutations(&schema["of"], value, path, out);
            }
        }
        "list" => {
            push(Some(json!("x")));
            push(Some(json!([])));
            if let Some(first) = value.get(0) {
                path.push(json!(0));
                mutations(&schema["of"], first, path, out);
                path.pop();
            }
        }
        "object" => {
            push(Some(json!("x")));
            let mut with_unknown = value.clone();
            with_unknown["unknownField"] = json!(1);
            push(Some(with_unknown));
            for (name, field) in schema["fields"].as_object().unwrap() {
                path.push(json!(name));
                out.push((path.clone(), None));
                if let Some(v) = value.get(name) {
                    mutations(field, v, path, out);
                }
                path.pop();
            }
        }
        other => panic!("unknown kind {other}"),
    }
}

/// `profile` with the value at `path` replaced, or removed (None).
fn mutated(profile: &Value, path: &[Value], replacement: &Option<Value>) -> Value {
    let Some((last, parents)) = path.split_last() else {
        return replacement.clone().expect("the profile itself is replaced, not removed");
    };
    let mut result = profile.clone();
    let mut at = &mut result;
    for step in parents {
        at = match step {
            Value::String(name) => &mut at[name.as_str()],
            index => &mut at[index.as_u64().unwrap() as usize],
        };
    }
    match (last, replacement) {
        (Value::String(name), Some(v)) => at[name.as_str()] = v.clone(),
        (Value::String(name), None) => {
            at.as_object_mut().unwrap().remove(name);
        }
        (index, Some(v)) => at[index.as_u64().unwrap() as usize] = v.clone(),
        (_, None) => unreachable!("list entries are not removed"),
    }
    result
}

#[test]
fn lib_profile_schema_accepts_and_rejects_what_the_model_does() {
    // One source of truth: the model's Profile (the hook loads pinned profiles with it). The
    // schema in nix/lib.nix must agree with it on the full profile and on every variant.
    let sandbox = NixSandbox::with_conf("");
    let schema = sandbox.eval_json(&format!("{}.profileSchema", lib()));
    let full = full_profile();
    model_accepts(&full).unwrap();
    let mut variants = Vec::new();
    mutations(&schema, &full, &mut Vec::new(), &mut variants);
    assert!(variants.len() > 150, "only {} variants", variants.len());
    let profiles: Vec<Value> = std::iter::once(full.clone()).chain(variants.iter().map(|(path, r)| mutated(&full, path, r))).collect();
    let errors = sandbox.eval_json(&format!("map {}.profileErrors {}", lib(), nix_json(&sandbox, "variants", &json!(profiles))));
    let errors = errors.as_array().unwrap();
    assert_eq!(errors[0], json!([]), "the full profile: {}", errors[0]);
    for (profile, nix_errors) in profiles.iter().zip(errors).skip(1) {
        let model = model_accepts(profile);
        let nix_errors = strings(nix_errors);
        assert_eq!(model.is_ok(), nix_errors.is_empty(), "model: {model:?}; lib.profileErrors: {nix_errors:?}; profile: {profile}");
        if let Err(message) = model {
            // The field the model names is among those lib names.
            let field = message.split(": field ").nth(1).and_then(|rest| rest.split(':').next()).unwrap_or("");
            assert!(nix_errors.iter().any(|e| e.starts_with(&format!("field {field}"))), "model: {message}; lib: {nix_errors:?}");
        }
    }
}

#[test]
fn nixos_module_without_profile_hook_or_cgroups() {
    let sandbox = NixSandbox::with_conf("");
    let config = eval_module(&sandbox, "nix/nixos-module.nix", "{ services.nix-tier = { enable = true; cgroups.enable = false; }; }", Some("2.8.0"), "config");
    let settings = &config["nix"]["settings"];
    assert!(settings.get("hardware-profile").is_none() && settings.get("system-features") == Some(&json!(["nixos-test", "benchmark", "big-parallel", "kvm"])), "{settings}");
    assert_eq!(settings["max-jobs"], "auto");
    assert!(settings.get("build-hook").is_some());
    assert_eq!(config["warnings"].as_array().unwrap().len(), 1, "a warning says nothing is pinned");
    let daemon = &config["systemd"]["services"]["nix-daemon"];
    assert!(daemon["serviceConfig"].get("Delegate").is_none() && daemon["environment"].get("NIX_TIER_CGROUP_ROOT").is_none(), "{daemon}");
    let broker = &config["systemd"]["services"]["nix-tier-broker"];
    assert_eq!(broker["environment"], json!({ "NIX_TIER_STATE_DIR": "/var/lib/nix-tier" }), "{broker}");
    assert_eq!(broker["serviceConfig"]["ExecStart"], json!(format!("{} --broker --stay", settings["build-hook"].as_str().unwrap())));

    let config = eval_module(&sandbox, "nix/nixos-module.nix", "{ services.nix-tier = { enable = true; inherit profile; hook.enable = false; }; }", Some("2.8.0"), "config");
    let settings = &config["nix"]["settings"];
    assert!(settings.get("build-hook").is_none() && settings["max-jobs"] == "auto", "{settings}");
    assert!(settings.get("plugin-files").is_some() && settings["system-features"].to_string().contains("gccarch-skylake"), "{settings}");
    let daemon = &config["systemd"]["services"]["nix-daemon"];
    assert!(daemon["serviceConfig"].get("Delegate").is_none() && daemon["environment"].get("NIX_CONFIG").is_none(), "{daemon}");
    assert!(config["systemd"]["services"].get("nix-tier-broker").is_none(), "a broker without the hook: {}", config["systemd"]["services"]);
}

#[test]
fn nixos_module_profile_settings_write_a_profile_nix_tier_accepts() {
    let sandbox = NixSandbox::with_conf("");
    let definitions = "{ services.nix-tier = { enable = true; inherit profile; \
                          profileSettings.build.tiers.light = { maxJobs = 10; cores = 2; memoryMiB = 2048; }; }; }";
    let settings = eval_module(&sandbox, "nix/nixos-module.nix", definitions, Some("2.8.0"), "config.nix.settings");
    let written = store_file(&sandbox, &settings["hardware-profile"]);
    let path = sandbox.write("from-settings.json", &written);
    let summary = check_profile(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(summary_tiers(&summary), vec![(1, 7, 14336), (3, 4, 6144), (10, 2, 2048)], "{summary}");
    assert_eq!(settings["max-jobs"], 10);

    // Two definitions merge as nixpkgs merges attribute sets of anything.
    let split = "[ { services.nix-tier = { enable = true; inherit profile; profileSettings.build.tiers.light.maxJobs = 10; }; } \
                  { services.nix-tier.profileSettings.build.tiers.light.cores = 1; } ]";
    let light = eval_module(&sandbox, "nix/nixos-module.nix", split, Some("2.8.0"), "config.services.nix-tier.profileSettings");
    assert_eq!(light, json!({ "build": { "tiers": { "light": { "maxJobs": 10, "cores": 1 } } } }));
}

#[test]
fn home_manager_module_sets_the_users_nix_conf() {
    let sandbox = NixSandbox::with_conf("");
    let docs = eval_module(&sandbox, "nix/home-manager-module.nix", "{ }", Some("2.8.0"), "docs");
    assert_documented(&docs, "programs.nix-tier.");
    let hook_doc = option(&docs, "programs.nix-tier.hook.enable")["description"].as_str().unwrap().to_string();
    assert!(hook_doc.contains("Single-user") && hook_doc.contains("/etc/nix/nix.conf"), "{hook_doc}");

    let typical = "{ programs.nix-tier = { enable = true; inherit profile; }; }";
    let config = eval_module(&sandbox, "nix/home-manager-module.nix", typical, Some("2.8.0"), "config");
    let settings = &config["nix"]["settings"];
    assert_eq!(settings.as_object().unwrap().keys().collect::<Vec<_>>(), ["extra-system-features", "hardware-profile", "plugin-files"], "{settings}");
    // The plugin alone needs the gccarch features too: optimizeFor's builds require them.
    assert_eq!(strings(&settings["extra-system-features"])[0], "gccarch-skylake");
    store_file(&sandbox, &settings["hardware-profile"]);
    assert!(config["home"]["packages"][0].as_str().unwrap().ends_with("-nix-tier-0.1.0"));
    assert_eq!(config["home"]["sessionVariables"]["NIX_TIER_PROFILE"], settings["hardware-profile"]);
    let conf = eval_module(&sandbox, "nix/home-manager-module.nix", typical, Some("2.8.0"), "config.xdg.configFile.\"nix/nix.conf\".source.text");
    assert!(conf.as_str().unwrap().contains(&format!("hardware-profile = {}\n", settings["hardware-profile"].as_str().unwrap())), "{conf}");
    assert!(config["assertions"].as_array().unwrap().iter().all(|a| a["assertion"] == true), "{}", config["assertions"]);

    // Single-user: the hook, max-jobs and the gccarch features in the user's nix.conf too.
    let single = "{ programs.nix-tier = { enable = true; inherit profile; hook.enable = true; }; }";
    let settings = eval_module(&sandbox, "nix/home-manager-module.nix", single, Some("2.8.0"), "config.nix.settings");
    assert!(settings["build-hook"].as_str().unwrap().ends_with("/bin/nix-tier-hook"));
    assert_eq!(settings["build-poll-interval"], 0);
    assert_eq!(settings["max-jobs"], 12);
    assert_eq!(strings(&settings["extra-system-features"])[0], "gccarch-skylake");
    // Not on Lix 2.94, which dropped the text hook protocol.
    let assertions = eval_module(&sandbox, "nix/home-manager-module.nix", single, Some("2.94.0"), "config.assertions");
    assert!(assertions.as_array().unwrap().iter().any(|a| a["assertion"] == false && a["message"].as_str().unwrap().contains("hook.enable")));

    // Nix 2.35.0 and 2.35.1 can lose the wake-ups of builds waiting for a max-jobs slot.
    let warnings = strings(&eval_module(&sandbox, "nix/home-manager-module.nix", typical, Some("2.35.1"), "config.warnings"));
    assert!(warnings.len() == 1 && warnings[0].starts_with("programs.nix-tier: Nix 2.35.1 ") && warnings[0].contains("nix#16005"), "{warnings:?}");
    assert_eq!(eval_module(&sandbox, "nix/home-manager-module.nix", typical, Some("2.35.2"), "config.warnings"), json!([]));
    assert_eq!(eval_module(&sandbox, "nix/home-manager-module.nix", typical, None, "config.warnings"), json!([]));

    // Without nix.package the plugin is off by default; asked for, an assertion explains.
    let settings = eval_module(&sandbox, "nix/home-manager-module.nix", typical, None, "config.nix.settings");
    assert_eq!(settings, json!({}));
    let forced = "{ programs.nix-tier = { enable = true; plugin.enable = true; }; }";
    let assertions = eval_module(&sandbox, "nix/home-manager-module.nix", forced, None, "config.assertions");
    assert!(assertions.as_array().unwrap().iter().any(|a| a["assertion"] == false && a["message"].as_str().unwrap().contains("nix.package")));
}

#[test]
fn modules_reject_undeclared_options_as_nixpkgs_does() {
    let sandbox = NixSandbox::with_conf("");
    let error = module_error(&sandbox, "nix/nixos-module.nix", "{ services.nix-tier.enabled = true; }", "config.services");
    assert!(error.contains("The option `services.nix-tier.enabled' does not exist"), "{error}");
    // So nix-tier's module must not define nix.daemonUser: nixpkgs before 2026-02 does not
    // declare it.
    let expr = module_expr("nix/nixos-module.nix", NIXOS_PREVIOUS, "{ nix.daemonUser = \"x\"; }", Some("2.8.0"));
    let error = sandbox.eval_error(&format!("(e: e.config.nix) ({expr})"), &[]);
    assert!(error.contains("The option `nix.daemonUser' does not exist"), "{error}");
}

// ---------------------------------------------------------------------------------------------
// Package expressions and the flake, with stub packages

#[test]
fn package_expressions_ask_for_the_right_build() {
    let sandbox = NixSandbox::with_conf("");
    let stub = repo_path("nix/testing/stub-pkgs.nix");
    let args = |file: &str, extra: &str| {
        sandbox.eval_json(&format!(
            "let pkgs = import {stub} {{ nixVersion = \"2.8.0\"; }}; d = pkgs.callPackage {} {extra}; \
             in builtins.removeAttrs d.buildRustPackageArgs [ \"src\" \"cargoLock\" ] // {{ lock = toString d.buildRustPackageArgs.cargoLock.lockFile; }}",
            repo_path(file)
        ))
    };
    let cli = args("nix/nix-tier.nix", "{ }");
    assert_eq!(cli["pname"], "nix-tier");
    assert_eq!(cli["cargoBuildFlags"], json!(["-p", "nix-tier-hook"]));
    assert_eq!(cli["doCheck"], false);
    assert_eq!(cli["lock"], json!(repo_path("Cargo.lock")));
    let version = fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    assert!(version.contains(&format!("version = \"{}\"", cli["version"].as_str().unwrap())));

    let tests = args("nix/nix-tier.nix", "{ runTests = true; }");
    assert_eq!(tests["doCheck"], true);
    assert_eq!(tests["cargoTestFlags"], json!(["--workspace", "--exclude", "nix-tier-plugin", "--exclude", "nix-tier-tests"]));

    let plugin = args("nix/package.nix", "{ }");
    assert_eq!(plugin["pname"], "nix-tier-plugin");
    assert_eq!(plugin["cargoBuildFlags"], json!(["-p", "nix-tier-plugin"]));
    let inputs = strings(&plugin["buildInputs"]);
    assert!(inputs[0].ends_with("-nix-2.8.0-dev"), "Nix's dev output first: {inputs:?}");
    assert!(plugin["NIX_TIER_NIX_INCLUDE"].as_str().unwrap().ends_with("-nix-2.8.0-dev/include"));
    assert_eq!(plugin["preConfigure"], "", "Nix 2.8 is supported");
    // The loader is what plugin-files names; the build sits beside it under the version the
    // built Nix reports.
    let install = plugin["installPhase"].as_str().unwrap();
    assert!(install.contains("-nix-2.8.0/bin/nix-instantiate --version"), "{install}");
    assert!(install.contains("$out/lib/nix-tier-plugin/$version/libnix_tier_plugin.so"), "{install}");
    assert!(install.contains("-o \"$out/lib/libnix_tier_loader.so\" loader/nix-tier-loader.cc"), "{install}");

    // Nix 2.24 onwards builds too; a Nix without a branch stops the build at once, saying why.
    let pre_configure = |version: &str| {
        sandbox.eval_json(&format!(
            "let pkgs = import {stub} {{ nixVersion = \"{version}\"; }}; in (pkgs.callPackage {} {{ }}).buildRustPackageArgs.preConfigure",
            repo_path("nix/package.nix")
        ))
    };
    assert_eq!(pre_configure("2.28.3"), "", "Nix 2.28 is supported");
    let other = pre_configure("2.20.1");
    let other = other.as_str().unwrap();
    assert!(other.contains("Nix 2.20.1") && other.contains("nix-compat.hh") && other.contains("exit 1"), "{other}");
}

#[test]
fn plugin_support_matches_the_compat_header() {
    // nix/lib.nix's pluginSupportsNix must say what cpp-shim/nix-compat.hh's version guard says:
    // the guard (everything up to its #error) is run through the C preprocessor for each version.
    let header = fs::read_to_string(repo().join("cpp-shim/nix-compat.hh")).unwrap();
    let guard = &header[..header.find("#error").expect("the version guard's #error")];
    let sandbox = NixSandbox::with_conf("");
    let lib = repo_path("nix/lib.nix");
    // Lix (2.90 to 2.99) is told apart by nix/lib.nix alone: its versions mean nothing to the header.
    let versions: Vec<(u32, u32)> = (0..=40).flat_map(|minor| [(1, minor), (2, minor)]).chain([(3, 0)]).collect();
    let source = sandbox.path().join("guard.h");
    fs::write(&source, format!("{guard}unsupported\n#else\nsupported\n#endif\n")).unwrap();
    let header_says: Vec<bool> = versions
        .iter()
        .map(|(major, minor)| {
            let out = Command::new("cpp")
                .args(["-P", &format!("-DNIX_TIER_NIX_VERSION_MAJOR={major}"), &format!("-DNIX_TIER_NIX_VERSION_MINOR={minor}")])
                .arg(&source)
                .output()
                .expect("run cpp");
            assert!(out.status.success(), "cpp failed: {}", stderr(&out));
            String::from_utf8_lossy(&out.stdout).trim() == "supported"
        })
        .collect();
    let names: Vec<String> = versions.iter().map(|(major, minor)| format!("{major}.{minor}.1")).collect();
    let quoted: Vec<String> = names.iter().map(|name| format!("\"{name}\"")).collect();
    let lib_says = sandbox.eval_json(&format!("map (import {lib}).pluginSupportsNix [ {} ]", quoted.join(" ")));
    for ((version, header), lib) in names.iter().zip(&header_says).zip(lib_says.as_array().unwrap()) {
        assert_eq!(&json!(header), lib, "Nix {version}: the compat header and pluginSupportsNix disagree");
    }
}

#[test]
fn flake_outputs_have_the_promised_shape() {
    let sandbox = NixSandbox::with_conf("");
    let stub = repo_path("nix/testing/stub-pkgs.nix");
    let got = sandbox.eval_json(&format!(
        "let
           pkgs = import {stub} {{ }};
           nixpkgs = {{
             legacyPackages = {{ x86_64-linux = pkgs; aarch64-linux = pkgs; }};
             lib.nixosSystem = _: throw \"nixpkgs is not available here\";
           }};
           flake = import {flake};
           outputs = flake.outputs {{ inherit self nixpkgs; }};
           self = outputs // {{ outPath = {root}; }};
           names = builtins.mapAttrs (_: builtins.attrNames);
         in {{
           inputs = builtins.attrNames flake.inputs;
           top = builtins.attrNames outputs;
           packages = names outputs.packages;
           checks = names outputs.checks;
           pnames = builtins.mapAttrs (_: p: p.pname) outputs.packages.x86_64-linux;
           testsRun = outputs.checks.x86_64-linux.tests.buildRustPackageArgs.doCheck;
           libIsLib = builtins.attrNames outputs.lib == builtins.attrNames (import {lib});
           nixos = outputs.nixosModules.default == {nixos};
           hm = outputs.homeManagerModules.default == {hm};
           overlay = builtins.attrNames (outputs.overlays.default pkgs pkgs);
         }}",
        flake = repo_path("flake.nix"),
        root = repo().display(),
        lib = repo_path("nix/lib.nix"),
        nixos = repo_path("nix/nixos-module.nix"),
        hm = repo_path("nix/home-manager-module.nix"),
    ));
    assert_eq!(got["inputs"], json!(["nixpkgs"]));
    for output in ["checks", "homeManagerModules", "lib", "nixosModules", "overlays", "packages"] {
        assert!(strings(&got["top"]).contains(&output.to_string()), "{output} missing: {}", got["top"]);
    }
    let systems = json!(["default", "nix-tier", "nix-tier-plugin"]);
    assert_eq!(got["packages"], json!({ "aarch64-linux": systems, "x86_64-linux": systems }));
    // The plugin check loads the x86_64 example profile.
    let checks = json!(["nix-files", "nixos-module", "tests"]);
    let x86_checks = json!(["nix-files", "nixos-module", "plugin", "tests"]);
    assert_eq!(got["checks"], json!({ "aarch64-linux": checks, "x86_64-linux": x86_checks }));
    assert_eq!(got["pnames"], json!({ "default": "nix-tier", "nix-tier": "nix-tier", "nix-tier-plugin": "nix-tier-plugin" }));
    assert_eq!(got["testsRun"], true);
    assert_eq!((got["libIsLib"].as_bool(), got["nixos"].as_bool(), got["hm"].as_bool()), (Some(true), Some(true), Some(true)));
    assert_eq!(got["overlay"], json!(["nix-tier", "nix-tier-plugin"]));
}

// ---------------------------------------------------------------------------------------------
// docs/reference.md

#[test]
fn reference_is_generated_from_the_sources() {
    let sandbox = NixSandbox::with_conf("");
    let generated = sandbox.path().join("reference.md");
    let out = Command::new(repo().join("scripts/gen-reference"))
        .arg(&generated)
        .env("NIX_TIER_TARGET_DIR", target_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "scripts/gen-reference failed:\n{}", stderr(&out));
    let generated = fs::read_to_string(&generated).unwrap();
    let committed = fs::read_to_string(repo().join("docs/reference.md")).unwrap();
    if generated != committed {
        let line = generated.lines().zip(committed.lines()).position(|(a, b)| a != b).unwrap_or_else(|| generated.lines().count().min(committed.lines().count()));
        panic!(
            "docs/reference.md is out of date: run scripts/gen-reference and commit the result.\n\
             First difference at line {}:\n  generated: {:?}\n  committed: {:?}",
            line + 1,
            generated.lines().nth(line),
            committed.lines().nth(line)
        );
    }
    for section in ["## Builtins", "## nix.conf settings", "## Commands", "## Environment variables", "## Hardware profile schema", "## NixOS options", "## home-manager options", "## Nix library"] {
        assert!(generated.contains(&format!("\n{section}\n")), "{section} missing");
    }
}
