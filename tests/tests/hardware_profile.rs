//! `builtins.hardwareProfile` inside the real nix-instantiate of this machine.

use std::collections::BTreeSet;
use std::fs;
use std::process::Command;

use nix_tier_tests::{binary, stderr, NixSandbox};
use serde_json::Value;

const PROFILE: &str = "builtins.hardwareProfile";

fn proc_cpuinfo_flags() -> BTreeSet<String> {
    let text = fs::read_to_string("/proc/cpuinfo").unwrap();
    text.lines()
        .find(|l| l.starts_with("flags") || l.starts_with("Features"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

fn mem_total_mib() -> f64 {
    let text = fs::read_to_string("/proc/meminfo").unwrap();
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

fn nproc() -> u64 {
    let out = Command::new("nproc").arg("--all").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().parse().unwrap()
}

/// `nix-tier profile` written to a file inside the sandbox.
fn pin_detected_profile(sandbox: &NixSandbox) -> (std::path::PathBuf, Value) {
    let out = Command::new(binary("nix-tier")).arg("profile").output().unwrap();
    assert!(out.status.success(), "nix-tier profile failed: {}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let path = sandbox.write("hw.json", &text);
    (path, serde_json::from_str(&text).unwrap())
}

#[test]
fn detected_profile_matches_the_host() {
    let sandbox = NixSandbox::with_plugin("");
    let profile = sandbox.eval_json(PROFILE);

    assert_eq!(profile["schemaVersion"], 1);
    assert_eq!(profile["source"], "detected");
    assert_eq!(profile["cpu"]["threads"].as_u64().unwrap(), nproc());
    let mem = profile["memory"]["totalMiB"].as_f64().unwrap();
    let host = mem_total_mib();
    assert!((mem - host).abs() <= host * 0.01, "memory {mem} MiB vs /proc/meminfo {host} MiB");

    let features: BTreeSet<String> = profile["cpu"]["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    let missing: Vec<_> = proc_cpuinfo_flags().difference(&features).cloned().collect();
    assert!(missing.is_empty(), "features missing from the profile: {missing:?}");

    for tier in ["heavy", "medium", "light"] {
        let t = &profile["build"]["tiers"][tier];
        assert!(t["maxJobs"].as_u64().unwrap() >= 1, "{tier}: {t}");
        assert!(t["cores"].as_u64().unwrap() >= 1, "{tier}: {t}");
        let reserved = t["maxJobs"].as_u64().unwrap() * t["memoryMiB"].as_u64().unwrap();
        assert!(reserved as f64 <= mem, "{tier} oversubscribes memory: {t}");
    }
}

#[test]
fn profile_is_a_lazy_constant_not_a_function() {
    let sandbox = NixSandbox::with_plugin("");
    let out = sandbox.eval_json(&format!("builtins.isAttrs {PROFILE}"));
    assert_eq!(out, Value::Bool(true));
    // Not forced unless used: a bad pinned file does not break evaluations that ignore it.
    let sandbox = NixSandbox::with_plugin("hardware-profile = /nonexistent/profile.json");
    assert_eq!(sandbox.eval_json("builtins ? hardwareProfile"), Value::Bool(true));
}

#[test]
fn pinned_profile_round_trips() {
    let sandbox = NixSandbox::with_plugin("");
    let (path, mut written) = pin_detected_profile(&sandbox);
    let pinned = NixSandbox::with_plugin(&format!("hardware-profile = {}", path.display()));
    let evaluated = pinned.eval_json(PROFILE);
    written["source"] = Value::from("pinned");
    assert_eq!(evaluated, written);

    // The same through --option, as a flake user passing it on the command line would.
    let out = sandbox.eval_with(PROFILE, &["--option", "hardware-profile", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let evaluated: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(evaluated["source"], "pinned");
}

#[test]
fn bad_pinned_profiles_are_named_errors() {
    let sandbox = NixSandbox::with_plugin("");
    let (_, good) = pin_detected_profile(&sandbox);

    let mut wrong_type = good.clone();
    wrong_type["cpu"]["threads"] = Value::from("eight");
    let mut wrong_version = good.clone();
    wrong_version["schemaVersion"] = Value::from(7);
    let mut missing_field = good.clone();
    missing_field["memory"].as_object_mut().unwrap().remove("totalMiB");

    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("missing.json", String::new(), vec!["does not exist", "nix-tier profile"]),
        ("bad.json", "{ \"schemaVersion\": 1,".to_string(), vec!["line 1"]),
        ("type.json", wrong_type.to_string(), vec!["cpu.threads", "eight"]),
        ("version.json", wrong_version.to_string(), vec!["schemaVersion", "7"]),
        ("field.json", missing_field.to_string(), vec!["memory", "totalMiB"]),
    ];
    for (name, contents, expected) in cases {
        let path = if contents.is_empty() {
            sandbox.path().join(name)
        } else {
            sandbox.write(name, &contents)
        };
        let err = sandbox.eval_error(PROFILE, &["--option", "hardware-profile", path.to_str().unwrap()]);
        assert!(err.contains(path.to_str().unwrap()), "{name}: error does not name the file:\n{err}");
        for fragment in expected {
            assert!(err.contains(fragment), "{name}: error lacks {fragment:?}:\n{err}");
        }
    }
}

#[test]
fn pure_evaluation_needs_a_pinned_profile() {
    let sandbox = NixSandbox::with_plugin("");
    let err = sandbox.eval_error(PROFILE, &["--option", "pure-eval", "true"]);
    assert!(err.contains("pure evaluation") && err.contains("hardware-profile"), "{err}");

    let (path, _) = pin_detected_profile(&sandbox);
    let out = sandbox.eval_with(
        &format!("{PROFILE}.cpu.microarchitecture"),
        &["--option", "pure-eval", "true", "--option", "hardware-profile", path.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}
