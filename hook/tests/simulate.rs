//! `nix-tier simulate` end to end: a real derivation closure instantiated by Nix, durations and
//! peaks from a real history database, and workload files with mistakes in them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix_tier_hook::history::History;
use serde_json::Value;
use tempfile::TempDir;

mod common;

use common::{json, nix_tier, succeeded_build};

/// A pinned profile: this host's, with a budget of 1000 MiB, heavy 1 job of 800 MiB, medium 2 of
/// 400 MiB, light 4 of 100 MiB.
fn profile(dir: &Path) -> PathBuf {
    let detected = Command::new(env!("CARGO_BIN_EXE_nix-tier")).arg("profile").output().expect("nix-tier profile");
    assert!(detected.status.success(), "{}", String::from_utf8_lossy(&detected.stderr));
    let mut profile: Value = serde_json::from_slice(&detected.stdout).expect("profile JSON");
    profile["build"]["memoryBudgetMiB"] = 1000.into();
    profile["build"]["tiers"]["heavy"] = serde_json::json!({ "maxJobs": 1, "cores": 1, "memoryMiB": 800 });
    profile["build"]["tiers"]["medium"] = serde_json::json!({ "maxJobs": 2, "cores": 1, "memoryMiB": 400 });
    profile["build"]["tiers"]["light"] = serde_json::json!({ "maxJobs": 4, "cores": 1, "memoryMiB": 100 });
    let path = dir.join("hardware-profile.json");
    fs::write(&path, serde_json::to_vec_pretty(&profile).expect("JSON")).expect("write profile");
    path
}

/// `top-1.0` needs `compiler-1.0` (marked heavy) and `tool-1.0`, instantiated by the real
/// nix-instantiate in a store of its own.
fn closure(dir: &Path) -> PathBuf {
    let expr = r#"
      let mk = name: attrs: derivation ({ inherit name; builder = "/bin/sh"; system = builtins.currentSystem; } // attrs);
          compiler = mk "compiler-1.0" { NIX_TIER = "heavy"; };
          tool = mk "tool-1.0" { };
      in mk "top-1.0" { inherit compiler tool; }"#;
    let conf = dir.join("conf");
    fs::create_dir_all(&conf).expect("conf dir");
    let out = Command::new("nix-instantiate")
        .args(["--expr", expr])
        .env("NIX_STORE_DIR", dir.join("store"))
        .env("NIX_STATE_DIR", dir.join("state"))
        .env("NIX_LOG_DIR", dir.join("log"))
        .env("NIX_CONF_DIR", &conf)
        .output()
        .expect("nix-instantiate runs (Nix is installed by ./scripts/test)");
    assert!(out.status.success(), "nix-instantiate: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).expect("UTF-8").trim())
}

fn record(history: &History, package: &str, wall_ms: u64, peak_mib: u64, cpu_ms: u64) {
    history.record(&succeeded_build(&format!("{package}-1.0"), 1_767_225_600_000, wall_ms, cpu_ms, peak_mib)).expect("record");
}

#[test]
fn a_closure_runs_with_the_history_durations_and_the_tiers_guesses() {
    let dir = TempDir::new().expect("tempdir");
    let state = dir.path().join("state-dir");
    let profile = profile(dir.path());
    let top = closure(dir.path());
    let top_arg = top.to_str().expect("UTF-8 path");
    let args = ["simulate", top_arg, "--profile", profile.to_str().unwrap(), "--max-jobs", "4", "--threads", "2", "--nix-costs", "0:0:0", "--json"];

    // No history: compiler (heavy) is guessed at 30 min, tool and top (light) at 30 s.
    let guessed = json(&nix_tier(&state, &args));
    assert_eq!(guessed["builds"], 3);
    assert_eq!(guessed["prediction"]["makespanMs"], 30 * 60_000 + 30_000);

    // The history says 10 min and 2 min, with peaks that fit; top stays a guess. The compiler
    // wants 2 threads (20 min of CPU in 10), the tool half of one: on 2 threads both run at 0.8
    // of their speed until the tool ends at 150 s; the compiler, with 480 s left, ends at 630 s,
    // and top (30 s) at 660 s.
    let history = History::open(&state).expect("history");
    record(&history, "compiler", 600_000, 500, 1_200_000);
    record(&history, "tool", 120_000, 50, 60_000);
    drop(history);
    let known = json(&nix_tier(&state, &args));
    let prediction = &known["prediction"];
    assert_eq!(prediction["makespanMs"], 660_000);
    let runs = prediction["runs"].as_array().expect("runs");
    let compiler = runs.iter().find(|r| r["name"] == "compiler-1.0").expect("compiler's run");
    assert_eq!(compiler["tier"], "heavy");
    assert_eq!((&compiler["reservedMiB"], &compiler["limitMiB"]), (&Value::from(500), &Value::from(625)), "learned: 500 MiB, limit × 1.25");
    assert!(compiler["learned"].as_bool().unwrap());
    let top_run = runs.iter().find(|r| r["name"] == "top-1.0").expect("top's run");
    assert_eq!(top_run["startMs"], 630_000, "top starts when both its inputs are built");
    assert_eq!(prediction["cpuUtilisation"], Value::Null, "top has no CPU time in the history");

    // Nix alone on 300 MiB: the compiler's 500 MiB peak is killed, top is never built.
    let alone = json(&nix_tier(&state, &[&args[..], &["--no-hook", "--memory-mib", "300"]].concat()));
    let outcomes: Vec<&str> = alone["prediction"]["runs"].as_array().unwrap().iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes.iter().filter(|o| **o == "oom-killed").count(), 1, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| **o == "not-built").count(), 1, "{outcomes:?}");

    // Built outputs are not built again: with tool's output in the store, two builds remain.
    let tool_drv = nix_tier_model::Derivation::read(&top).unwrap().input_derivations.into_keys().find(|d| d.ends_with("tool-1.0.drv")).unwrap();
    let tool_out = nix_tier_model::Derivation::read(Path::new(&tool_drv)).unwrap().outputs["out"].path.clone();
    fs::write(&tool_out, "built").expect("write tool's output");
    assert_eq!(json(&nix_tier(&state, &args))["builds"], 2);

    // For people: the makespan and the waits per tier.
    let text = nix_tier(&state, &args[..args.len() - 1]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("makespan      10 min 30 s"), "the compiler alone, then top: {text}");
    assert!(text.contains("heavy:"), "{text}");
}

#[test]
fn workload_mistakes_name_the_build_and_the_fix() {
    let dir = TempDir::new().expect("tempdir");
    let profile = profile(dir.path());
    let cases = [
        (r#"{"builds": [{"name": "a", "tier": "light", "ms": 1, "mib": 1, "deps": ["b"]}]}"#, "build \"a\" needs \"b\", which is not listed"),
        (
            r#"{"builds": [{"name": "a", "tier": "light", "ms": 1, "mib": 1, "deps": ["b"]}, {"name": "b", "tier": "light", "ms": 1, "mib": 1, "deps": ["a"]}]}"#,
            "depends on itself through its dependencies",
        ),
        (r#"{"builds": [{"name": "a", "tier": "huge", "ms": 1, "mib": 1}]}"#, "expected {\"builds\""),
        (r#"{"builds": [{"name": "a", "tier": "light", "ms": 1, "mib": 1}, {"name": "a", "tier": "light", "ms": 1, "mib": 1}]}"#, "listed twice"),
    ];
    for (text, message) in cases {
        let file = dir.path().join("workload.json");
        fs::write(&file, text).expect("write workload");
        let out = nix_tier(&dir.path().join("state"), &["simulate", "--workload", file.to_str().unwrap(), "--profile", profile.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text} was accepted");
        assert!(stderr.contains(message) && stderr.contains("workload.json"), "{text}: {stderr}");
    }
    // Listed out of order is fine: dependencies are found by name.
    let file = dir.path().join("workload.json");
    fs::write(&file, r#"{"builds": [{"name": "top", "tier": "light", "ms": 1000, "mib": 1, "deps": ["dep"]}, {"name": "dep", "tier": "light", "ms": 2000, "mib": 1}]}"#).unwrap();
    let out = json(&nix_tier(
        &dir.path().join("state"),
        &["simulate", "--workload", file.to_str().unwrap(), "--profile", profile.to_str().unwrap(), "--nix-costs", "0:0:0", "--json"],
    ));
    assert_eq!(out["prediction"]["makespanMs"], 3000);
}
