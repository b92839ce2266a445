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
    for line in ["build-hook = ", "build-poll-interval = 1\n", "max-jobs = ", "extra-system-features = "] {
        assert!(fragment.contains(line), "{line:?} missing from\n{fragment}");
    }
    let sandbox = NixSandbox::with_conf(&fragment);
    let state = sandbox.path().join("tier-state");

    // Nix 2.25 to 2.33 lose build-hook from the system nix.conf (this sandbox's NIX_CONF_DIR); on
    // those the documented workaround, the daemon's `--option build-hook`, is what is tested.
    let version = nix_tier_tests::nix_version();
    let hook_on_command_line = sandbox.eval_json(&format!("{}.buildHookNeedsCommandLine {}", lib(), nix_string(&version)));
    let hook = fragment.lines().find_map(|line| line.strip_prefix("build-hook = ")).unwrap();
    let hook_option = if hook_on_command_line == json!(true) { vec!["--option", "build-hook", hook] } else { vec![] };

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
        .args(&hook_option)
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

/// `nix/testing/eval-module.nix` of `module` with the user's `definitions` (a Nix expression;
/// `profile` in it is nix/examples/skylake.json) and a stub Nix of `nix_version`.
fn eval_module(sandbox: &NixSandbox, module: &str, definitions: &str, nix_version: Option<&str>, attr: &str) -> Value {
    let (version, nix) = match nix_version {
        Some(v) => (v, "pkgs.nix"),
        None => ("2.8.0", "null"),
    };
    sandbox.eval_json(&format!(
        "let pkgs = import {stub} {{ nixVersion = \"{version}\"; }}; profile = {example}; \
             e = import {eval} {{ module = {module}; inherit pkgs; definitions = {definitions}; external = {{ nix.package = {nix}; }}; }}; \
         in e.{attr}",
        stub = repo_path("nix/testing/stub-pkgs.nix"),
        example = repo_path("nix/examples/skylake.json"),
        eval = repo_path("nix/testing/eval-module.nix"),
        module = repo_path(module),
    ))
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

#[test]
fn nixos_module_declares_typed_documented_options() {
    let sandbox = NixSandbox::with_conf("");
    let docs = eval_module(&sandbox, "nix/nixos-module.nix", "{ }", Some("2.8.0"), "docs");
    assert_documented(&docs, "services.nix-tier.");
    let names: BTreeSet<&str> = docs.as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    for wanted in [
        "enable", "package", "profile", "profileSettings", "plugin.enable", "plugin.package", "hook.enable",
        "hook.daemonCommandLine", "pollInterval", "stateDirectory", "gccarchFeatures", "cgroups.enable", "cgroups.root",
    ] {
        assert!(names.contains(format!("services.nix-tier.{wanted}").as_str()), "{wanted} not declared: {names:?}");
    }
    let check = |name: &str, ty: &str, default: &str| {
        let o = option(&docs, &format!("services.nix-tier.{name}"));
        assert_eq!((o["type"].as_str().unwrap(), o["default"]["text"].as_str().unwrap()), (ty, default), "{name}");
    };
    check("enable", "boolean", "false");
    check("profile", "null or path", "null");
    check("profileSettings", "attribute set of anything", "{ }");
    check("pollInterval", "positive integer, meaning >0", "1");
    check("stateDirectory", "string", "\"/var/lib/nix-tier\"");
    check("cgroups.root", "string", "\"/sys/fs/cgroup/system.slice/nix-daemon.service\"");
    check("hook.enable", "boolean", "true");
    // Defaults that depend on the system's Nix are documented, not evaluated.
    assert_eq!(option(&docs, "services.nix-tier.plugin.enable")["default"]["markdown"], true);
}

#[test]
fn nixos_module_configures_nix_conf_and_the_daemon() {
    let sandbox = NixSandbox::with_conf("");
    let typical = "{ services.nix-tier = { enable = true; inherit profile; }; }";
    let config = eval_module(&sandbox, "nix/nixos-module.nix", typical, Some("2.8.0"), "config");
    let settings = &config["nix"]["settings"];

    let plugin = strings(&settings["plugin-files"]);
    assert!(plugin.len() == 1 && plugin[0].ends_with("-nix-tier-plugin-0.1.0/lib/libnix_tier_loader.so"), "{plugin:?}");
    let profile_file = settings["hardware-profile"].as_str().unwrap();
    assert!(profile_file.ends_with("-skylake.json"), "{profile_file}");
    assert!(settings["build-hook"].as_str().unwrap().ends_with("-nix-tier-0.1.0/bin/nix-tier-hook"), "{settings}");
    assert_eq!(settings["build-poll-interval"], 1);
    assert_eq!(settings["max-jobs"], 12);
    assert_eq!(
        strings(&settings["system-features"]),
        ["nixos-test", "benchmark", "big-parallel", "kvm", "gccarch-skylake", "gccarch-x86-64-v3", "gccarch-x86-64-v2", "gccarch-x86-64"]
    );

    let daemon = &config["systemd"]["services"]["nix-daemon"];
    assert_eq!(daemon["environment"]["NIX_TIER_STATE_DIR"], "/var/lib/nix-tier");
    assert_eq!(daemon["environment"]["NIX_TIER_PROFILE"], profile_file);
    assert_eq!(daemon["environment"]["NIX_TIER_CGROUP_ROOT"], "/sys/fs/cgroup/system.slice/nix-daemon.service");
    assert_eq!(daemon["serviceConfig"], json!({ "Delegate": "yes", "DelegateSubgroup": "supervisor" }), "Nix 2.8 needs no ExecStart");
    assert_eq!(config["systemd"]["tmpfiles"]["rules"], json!(["d /var/lib/nix-tier 0700 root root - -"]));
    assert_eq!(config["environment"]["variables"]["NIX_TIER_STATE_DIR"], "/var/lib/nix-tier");
    assert_eq!(config["environment"]["etc"]["nix/hardware-profile.json"]["source"], profile_file);
    assert!(config["environment"]["systemPackages"][0].as_str().unwrap().ends_with("-nix-tier-0.1.0"));
    assert_eq!(config["warnings"], json!([]));
    assert!(config["assertions"].as_array().unwrap().iter().all(|a| a["assertion"] == true), "{}", config["assertions"]);

    // max-jobs is only a default: the user's own value wins.
    let raw = eval_module(&sandbox, "nix/nixos-module.nix", typical, Some("2.8.0"), "raw");
    assert_eq!(raw["nix"]["settings"]["max-jobs"]["priority"], 1000);

    // Disabled: nothing at all.
    let off = eval_module(&sandbox, "nix/nixos-module.nix", "{ }", Some("2.8.0"), "config");
    assert_eq!(off, json!({}));
}

#[test]
fn nixos_module_follows_the_nix_version() {
    let sandbox = NixSandbox::with_conf("");
    let typical = "{ services.nix-tier = { enable = true; inherit profile; }; }";

    // Nix 2.28: the plugin, built against it, and the hook on the daemon's command line, because
    // 2.25 to 2.33 ignore build-hook in nix.conf.
    let config = eval_module(&sandbox, "nix/nixos-module.nix", typical, Some("2.28.3"), "config");
    let settings = &config["nix"]["settings"];
    let plugin_files = strings(&settings["plugin-files"]);
    assert!(plugin_files.len() == 1 && plugin_files[0].ends_with("/lib/libnix_tier_loader.so"), "{settings}");
    assert!(settings["hardware-profile"].as_str().unwrap().ends_with("-skylake.json"), "{settings}");
    let hook = settings["build-hook"].as_str().unwrap();
    let exec = strings(&config["systemd"]["services"]["nix-daemon"]["serviceConfig"]["ExecStart"]);
    assert_eq!(exec[0], "");
    assert!(exec[1].starts_with('@') && exec[1].contains("-nix-2.28.3/bin/nix-daemon nix-daemon --daemon"), "{exec:?}");
    assert!(exec[1].ends_with(&format!("--option build-hook {hook}")), "{exec:?}");
    // The hook still finds the profile, through the daemon's environment.
    assert!(config["systemd"]["services"]["nix-daemon"]["environment"]["NIX_TIER_PROFILE"].as_str().unwrap().ends_with("-skylake.json"));

    // Nix 2.34 reads build-hook from nix.conf again.
    let config = eval_module(&sandbox, "nix/nixos-module.nix", typical, Some("2.34.0"), "config");
    assert!(config["systemd"]["services"]["nix-daemon"]["serviceConfig"].get("ExecStart").is_none());

    // Nix 2.20 has no branch in the compat header: no plugin by default, and forcing it is
    // refused by an assertion.
    let settings = eval_module(&sandbox, "nix/nixos-module.nix", typical, Some("2.20.1"), "config.nix.settings");
    assert!(settings.get("plugin-files").is_none() && settings.get("hardware-profile").is_none(), "{settings}");
    let forced = "{ services.nix-tier = { enable = true; inherit profile; plugin.enable = true; }; }";
    let assertions = eval_module(&sandbox, "nix/nixos-module.nix", forced, Some("2.20.1"), "config.assertions");
    assert!(assertions.as_array().unwrap().iter().any(|a| a["assertion"] == false && a["message"].as_str().unwrap().contains("2.20.1")));
    // So is the hook on Lix 2.94, which dropped the text hook protocol.
    let assertions = eval_module(&sandbox, "nix/nixos-module.nix", typical, Some("2.94.0"), "config.assertions");
    assert!(assertions.as_array().unwrap().iter().any(|a| a["assertion"] == false));
}

#[test]
fn nixos_module_without_profile_hook_or_cgroups() {
    let sandbox = NixSandbox::with_conf("");
    let config = eval_module(
        &sandbox,
        "nix/nixos-module.nix",
        "{ services.nix-tier = { enable = true; cgroups.enable = false; }; }",
        Some("2.8.0"),
        "config",
    );
    let settings = &config["nix"]["settings"];
    assert!(settings.get("hardware-profile").is_none() && settings.get("max-jobs").is_none() && settings.get("system-features").is_none(), "{settings}");
    assert!(settings.get("build-hook").is_some());
    assert_eq!(config["warnings"].as_array().unwrap().len(), 1, "a warning says nothing is pinned");
    let daemon = &config["systemd"]["services"]["nix-daemon"];
    assert!(daemon.get("serviceConfig").is_none() && daemon["environment"].get("NIX_TIER_CGROUP_ROOT").is_none(), "{daemon}");

    let config = eval_module(&sandbox, "nix/nixos-module.nix", "{ services.nix-tier = { enable = true; inherit profile; hook.enable = false; }; }", Some("2.8.0"), "config");
    let settings = &config["nix"]["settings"];
    assert!(settings.get("build-hook").is_none() && settings.get("max-jobs").is_none(), "{settings}");
    assert!(settings.get("plugin-files").is_some() && settings.get("system-features").is_some(), "{settings}");
    assert!(config["systemd"]["services"]["nix-daemon"].get("serviceConfig").is_none());

    // A typo in an option name is an error, as in nixpkgs.
    let out = sandbox.eval_with(
        &format!(
            "(import {} {{ module = {}; definitions = {{ services.nix-tier.enabled = true; }}; }}).values",
            repo_path("nix/testing/eval-module.nix"),
            repo_path("nix/nixos-module.nix")
        ),
        &[],
    );
    assert!(!out.status.success() && stderr(&out).contains("services.nix-tier.enabled"), "{}", stderr(&out));
}

#[test]
fn nixos_module_profile_settings_write_a_profile_nix_tier_accepts() {
    let sandbox = NixSandbox::with_conf("");
    let definitions = "{ services.nix-tier = { enable = true; inherit profile; \
                          profileSettings.build.tiers.light = { maxJobs = 10; cores = 2; memoryMiB = 2048; }; }; }";
    let config = eval_module(&sandbox, "nix/nixos-module.nix", definitions, Some("2.8.0"), "config");
    // The stub writeText keeps its text: the JSON the module writes.
    let written = eval_module(&sandbox, "nix/nixos-module.nix", definitions, Some("2.8.0"), "config.nix.settings.hardware-profile.text");
    let path = sandbox.write("from-settings.json", written.as_str().unwrap());
    let summary = check_profile(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(summary_tiers(&summary), vec![(1, 7, 14336), (3, 4, 6144), (10, 2, 2048)], "{summary}");
    assert_eq!(config["nix"]["settings"]["max-jobs"], 10);
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
    assert_eq!(settings.as_object().unwrap().keys().collect::<Vec<_>>(), ["hardware-profile", "plugin-files"], "{settings}");
    assert!(settings["hardware-profile"].as_str().unwrap().ends_with("-skylake.json"));
    assert!(config["home"]["packages"][0].as_str().unwrap().ends_with("-nix-tier-0.1.0"));
    assert_eq!(config["home"]["sessionVariables"]["NIX_TIER_PROFILE"], settings["hardware-profile"]);

    // Single-user: the hook, max-jobs and the gccarch features in the user's nix.conf too.
    let single = "{ programs.nix-tier = { enable = true; inherit profile; hook.enable = true; }; }";
    let settings = eval_module(&sandbox, "nix/home-manager-module.nix", single, Some("2.8.0"), "config.nix.settings");
    assert!(settings["build-hook"].as_str().unwrap().ends_with("/bin/nix-tier-hook"));
    assert_eq!(settings["max-jobs"], 12);
    assert_eq!(strings(&settings["extra-system-features"])[0], "gccarch-skylake");

    // Without nix.package the plugin is off by default; asked for, an assertion explains.
    let settings = eval_module(&sandbox, "nix/home-manager-module.nix", typical, None, "config.nix or { }");
    assert_eq!(settings, json!({}));
    let forced = "{ programs.nix-tier = { enable = true; plugin.enable = true; }; }";
    let assertions = eval_module(&sandbox, "nix/home-manager-module.nix", forced, None, "config.assertions");
    assert!(assertions.as_array().unwrap().iter().any(|a| a["assertion"] == false && a["message"].as_str().unwrap().contains("nix.package")));
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
