//! `nix-tier tune` end to end: a real derivation closure (instantiated by Nix in its own store)
//! and a build history written through the library; the proposal is written, checked by the real
//! `nix-tier profile --check`, placed by `nix-tier explain`, and predicted again by
//! `nix-tier simulate` with the written profile.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use nix_tier_hook::history::History;
use nix_tier_tests::{stderr, NixSandbox};
use serde_json::Value;

use common::{json, nix_tier, succeeded_build, write_profile};

/// `top-1.0` needing `big-1.0` and `small1-1.0` … `small4-1.0`, none of them marked with a tier
/// (so rules place them), instantiated in the sandbox's store; the paths of top's and big's .drv.
fn closure(nix: &NixSandbox) -> (PathBuf, PathBuf) {
    let expr = r#"
      let mk = name: deps: derivation { inherit name deps; builder = "/bin/sh"; system = builtins.currentSystem; };
          big = mk "big-1.0" [];
          smalls = map (i: mk "small${toString i}-1.0" []) [1 2 3 4];
      in { top = mk "top-1.0" ([big] ++ smalls); inherit big; }"#;
    let out = nix.command("nix-instantiate").args(["--expr", expr]).output().expect("nix-instantiate runs (install Nix: scripts/setup)");
    assert!(out.status.success(), "nix-instantiate failed:\n{}", stderr(&out));
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let paths: Vec<PathBuf> = text.lines().map(PathBuf::from).collect();
    let find = |name: &str| paths.iter().find(|p| p.to_string_lossy().ends_with(name)).cloned().unwrap_or_else(|| panic!("{name} in {text}"));
    (find("-top-1.0.drv"), find("-big-1.0.drv"))
}

/// Three builds of `big` that peaked at 1200 MiB (over the light tier's 1000) and one of `top`;
/// the small packages were never built.
fn history(state: &Path) {
    let history = History::open(state).expect("open the history");
    let row = |name: &str, at: u64, wall_ms: u64, peak: u64| succeeded_build(name, 1_767_225_600_000 + at * 600_000, wall_ms, wall_ms, peak);
    for at in 0..3 {
        history.record(&row("big-1.0", at, 60_000, 1200)).expect("record big");
    }
    history.record(&row("top-1.0", 3, 10_000, 50)).expect("record top");
}

/// This machine's profile with a build section whose light tier is too small for `big`: budget
/// 4976 MiB, heavy 1 × 3000, medium 1 × 1500, light 2 × 1000.
fn profile(dir: &Path) -> PathBuf {
    let tier = |max_jobs: u32, memory_mib: u64| serde_json::json!({ "maxJobs": max_jobs, "cores": 1, "memoryMiB": memory_mib });
    let path = dir.join("current.json");
    write_profile(&path, serde_json::json!({
        "memoryBudgetMiB": BUDGET_MIB, "defaultTier": "light",
        "tiers": { "heavy": tier(1, 3000), "medium": tier(1, 1500), "light": tier(2, 1000) },
    }));
    path
}

/// The budget, and the memory the builds have (`--memory-mib`): no room to raise the budget.
const BUDGET_MIB: u64 = 4976;

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut names: Vec<PathBuf> = fs::read_dir(dir).expect("read dir").map(|e| e.expect("entry").path()).collect();
    names.sort();
    names
}

#[test]
fn tune_moves_a_package_over_its_tier_and_writes_a_profile_that_predicts_what_it_said() {
    let nix = NixSandbox::with_conf("");
    let (top, big) = closure(&nix);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    history(&state);
    let current = profile(dir.path());
    let (top, current_arg) = (top.to_str().unwrap(), current.to_str().unwrap());
    let memory = BUDGET_MIB.to_string();
    let scenario = [top, "--profile", current_arg, "--max-jobs", "6", "--memory-mib", &memory];

    // Without --write: the comparison, and nothing written.
    let before = files(dir.path());
    let text = nix_tier(&state, &[&["tune"], &scenario[..]].concat());
    assert!(text.status.success(), "{}", stderr(&text));
    let text = String::from_utf8(text.stdout).expect("UTF-8");
    assert!(text.contains("makespan") && text.contains("proposed"), "{text}");
    assert!(text.contains("new rule         \"big\" → heavy (was light; peaks at 1200 MiB)"), "{text}");
    assert!(text.contains("Nothing written"), "{text}");
    assert_eq!(files(dir.path()), before, "tune without --write writes nothing");

    // With --write and --json.
    let written = dir.path().join("proposed.json");
    let tuned = json(&nix_tier(&state, &[&["tune", "--json", "--write", written.to_str().unwrap()], &scenario[..]].concat()));
    let (now, then) = (&tuned["current"]["prediction"], &tuned["proposed"]["prediction"]);
    // Today big (learned 1500 MiB, capped at light's 1000) is killed at its limit and top is
    // never built; moved, every build succeeds. Medium's figure holds it too, but in heavy it
    // starts the small builds a second sooner: beside a running heavy build no room is kept for
    // another while Nix first asks about its builds, so they start at once rather than at Nix's
    // next wake-up.
    assert_eq!(now["outcomes"]["over-limit"], 1, "{tuned:#}");
    assert_eq!(now["outcomes"]["not-built"], 1, "{tuned:#}");
    assert_eq!(then["outcomes"]["built"], 6, "{tuned:#}");
    assert_eq!(then["outcomes"]["over-limit"], 0, "{tuned:#}");
    assert_eq!(then["outcomes"]["oom-killed"], 0, "{tuned:#}");
    assert_eq!(tuned["moved"], serde_json::json!([{ "package": "big", "from": "light", "to": "heavy", "peakMiB": 1200 }]));
    assert_eq!(tuned["proposed"]["build"]["rules"], serde_json::json!([{ "match": "big", "tier": "heavy" }]));
    assert_eq!(tuned["written"], written.to_str().unwrap());

    // The four small builds (no history: 30 s each, light's 1000 MiB) two at a time beside big
    // (60 s) in heavy, then top (10 s): a minute and ten seconds, and Nix's own costs.
    let makespan = then["makespanMs"].as_u64().expect("a makespan");
    assert!((70_000..71_000).contains(&makespan), "{tuned:#}");

    // The file is a pinned profile the hook accepts ...
    let check = nix_tier(&state, &["profile", "--check", written.to_str().unwrap()]);
    assert!(check.status.success(), "{}", stderr(&check));
    let text = fs::read_to_string(&written).expect("read the written profile");
    let pinned: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(pinned["source"], "pinned");
    let before: Value = serde_json::from_str(&fs::read_to_string(&current).expect("read the profile")).expect("JSON");
    assert_eq!((&pinned["cpu"], &pinned["memory"]), (&before["cpu"], &before["memory"]), "the rest of the profile is kept");
    // ... which places big by its new rule ...
    let explained = json(&nix_tier(&state, &["explain", "--json", "--profile", written.to_str().unwrap(), big.to_str().unwrap()]));
    assert_eq!(explained["tier"], "heavy");
    assert_eq!(explained["reason"], "rule \"big\" matches big");
    // ... and predicts what tune said.
    let simulated = json(&nix_tier(&state, &["simulate", "--json", top, "--profile", written.to_str().unwrap(), "--max-jobs", "6", "--memory-mib", &memory]));
    assert_eq!(simulated["prediction"]["makespanMs"], then["makespanMs"], "{simulated:#}");
}

#[test]
fn tune_refuses_nix_alone_and_a_write_it_cannot_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let workload = dir.path().join("workload.json");
    fs::write(&workload, r#"{"builds": [{"name": "a-1", "tier": "light", "ms": 1000, "mib": 10}]}"#).expect("write the workload");
    let state = dir.path().join("state");
    let w = workload.to_str().unwrap();
    let alone = nix_tier(&state, &["tune", "--workload", w, "--no-hook"]);
    assert!(!alone.status.success());
    assert!(stderr(&alone).contains("drop --no-hook"), "{}", stderr(&alone));
    let nowhere = dir.path().join("missing/profile.json");
    let failed = nix_tier(&state, &["tune", "--workload", w, "--write", nowhere.to_str().unwrap()]);
    assert!(!failed.status.success());
    assert!(stderr(&failed).contains(&format!("--write {}", nowhere.display())), "{}", stderr(&failed));
}
