//! The build history end to end: rows recorded through the library, read back by the real
//! `nix-tier history` and used by the real `nix-tier explain` to learn the reservation.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{json, nix_tier};

use nix_tier_hook::history::{package_and_version, BuildRecord, History, Outcome};
use nix_tier_model::learning;
use nix_tier_model::Tier;
use serde_json::Value;
use tempfile::TempDir;

/// A real .drv for `pkg-1.0` marked medium, instantiated by Nix in its own store; written by hand
/// in the same format where Nix is not installed.
fn pkg_drv(dir: &Path) -> PathBuf {
    let expr = r#"derivation { name = "pkg-1.0"; builder = "/bin/sh"; system = builtins.currentSystem; NIX_TIER = "medium"; }"#;
    fs::create_dir_all(dir.join("conf")).expect("conf dir");
    let instantiated = Command::new("nix-instantiate")
        .args(["--expr", expr])
        .env("NIX_STORE_DIR", dir.join("store"))
        .env("NIX_STATE_DIR", dir.join("state"))
        .env("NIX_LOG_DIR", dir.join("log"))
        .env("NIX_CONF_DIR", dir.join("conf"))
        .output();
    match instantiated {
        Ok(out) if out.status.success() => PathBuf::from(String::from_utf8(out.stdout).expect("UTF-8").trim()),
        other => {
            eprintln!("nix-instantiate unavailable ({other:?}); writing the .drv by hand");
            let out = "/nix/store/cigrlfxhf4q7vfhlb1vsd6n2p6z0l4cy-pkg-1.0";
            let path = dir.join("pkg-1.0.drv");
            fs::write(
                &path,
                format!(
                    r#"Derive([("out","{out}","","")],[],[],"x86_64-linux","/bin/sh",[],[("NIX_TIER","medium"),("builder","/bin/sh"),("name","pkg-1.0"),("out","{out}"),("system","x86_64-linux")])"#
                ),
            )
            .expect("write drv");
            path
        }
    }
}

fn build(drv: &Path, started: u64, peak: u64, outcome: Outcome) -> BuildRecord {
    let (package, version) = package_and_version("pkg-1.0");
    BuildRecord {
        drv: drv.display().to_string(),
        package,
        version,
        tier: Tier::Medium,
        started_unix_ms: 1_767_225_600_000 + started * 60_000,
        wall_ms: 90_000 + started,
        leased_ms: Some(89_000 + started),
        cpu_ms: Some(120_000),
        peak_mib: Some(peak),
        limit_mib: Some(4096),
        outcome,
        waited_ms: Some(started * 100),
    }
}

#[test]
fn explain_learns_from_past_builds_and_history_lists_them() {
    let dir = TempDir::new().expect("tempdir");
    let state = dir.path().join("state-dir");
    let profile_path = dir.path().join("hardware-profile.json");
    let detected = Command::new(env!("CARGO_BIN_EXE_nix-tier")).arg("profile").output().expect("nix-tier profile");
    assert!(detected.status.success(), "{}", String::from_utf8_lossy(&detected.stderr));
    fs::write(&profile_path, &detected.stdout).expect("pin profile");
    let profile: Value = serde_json::from_slice(&detected.stdout).expect("profile JSON");
    let tier_mib = profile["build"]["tiers"]["medium"]["memoryMiB"].as_u64().expect("medium memoryMiB");

    let drv = pkg_drv(dir.path());
    let drv_arg = drv.to_str().expect("UTF-8 path");
    let profile_arg = profile_path.to_str().expect("UTF-8 path");
    let explain = || json(&nix_tier(&state, &["explain", drv_arg, "--profile", profile_arg, "--json"]));

    // No history: the tier's figure.
    let first = explain();
    assert_eq!(first["name"], "pkg-1.0");
    assert_eq!(first["package"], "pkg");
    assert_eq!(first["tier"], "medium");
    assert_eq!(first["memorySource"], "tier");
    assert_eq!(first["memoryMiB"], tier_mib);
    assert_eq!(first["historySamples"], 0);
    assert_eq!(first["historyError"], Value::Null);

    let human = nix_tier(&state, &["explain", drv_arg, "--profile", profile_arg]);
    let human = String::from_utf8_lossy(&human.stdout).into_owned();
    assert!(human.contains("the medium tier's memoryMiB (no successful build of pkg yet)"), "{human}");

    // Two successful builds (a failed one says nothing): learned.
    let history = History::open(&state).expect("open history");
    history.record(&build(&drv, 1, 300, Outcome::Succeeded)).expect("record");
    history.record(&build(&drv, 2, 999, Outcome::Failed)).expect("record");
    history.record(&build(&drv, 3, 250, Outcome::Succeeded)).expect("record");
    let two = explain();
    assert_eq!(two["memorySource"], "learned", "{two}");
    assert_eq!(two["memoryMiB"], learning::reservation(&[250, 300], tier_mib).memory_mib);
    assert_eq!(two["historySamples"], 2);

    // The third successful build: reserves the p95, 330 MiB, limited to 330 × 1.25 = 412.5 → 413.
    history.record(&build(&drv, 4, 330, Outcome::Succeeded)).expect("record");
    let learned = explain();
    let expected = learning::reservation(&[330, 250, 300], tier_mib);
    assert_eq!(learned["memorySource"], "learned", "{learned}");
    assert_eq!(learned["memoryMiB"], expected.memory_mib);
    assert_eq!(learned["limitMiB"], expected.limit_mib);
    assert_eq!(learned["learned"]["samples"], 3);
    assert_eq!(learned["learned"]["p95MiB"], 330);
    if tier_mib >= 413 {
        assert_eq!((expected.memory_mib, expected.limit_mib), (330, 413));
        let human = nix_tier(&state, &["explain", drv_arg, "--profile", profile_arg]);
        let human = String::from_utf8_lossy(&human.stdout).into_owned();
        assert!(human.contains("reserves 330 MiB: learned from 3 builds (p95 330 MiB)"), "{human}");
        assert!(human.contains("limited to 413 MiB: the p95 × 1.25"), "{human}");
    }

    // An OOM kill sends it back to the tier's figure.
    history.record(&build(&drv, 5, 413, Outcome::OomKilled)).expect("record");
    let reset = explain();
    assert_eq!(reset["memorySource"], "tier");
    assert_eq!(reset["memoryMiB"], tier_mib);

    // nix-tier history --json: newest first, and the summary.
    history.record(&BuildRecord { package: "other".into(), ..build(&drv, 6, 10, Outcome::Succeeded) }).expect("record");
    let all = json(&nix_tier(&state, &["history", "--json"]));
    let builds = all["builds"].as_array().expect("builds");
    assert_eq!(builds.len(), 6);
    assert_eq!(builds[0]["package"], "other");
    assert_eq!(builds[1]["outcome"], "oom-killed");
    assert_eq!(builds[1]["peakMiB"], 413);
    assert_eq!(builds[1]["limitMiB"], 4096);
    assert_eq!((&builds[1]["waitedMs"], &builds[1]["leasedMs"]), (&500.into(), &89_005.into()));
    assert_eq!(builds[1]["version"], "1.0");
    assert_eq!(builds[1]["drv"], drv_arg);
    let summary = all["summary"].as_array().expect("summary");
    assert_eq!(summary.len(), 2);
    let pkg = &summary[1];
    assert_eq!(pkg["package"], "pkg");
    assert_eq!(pkg["builds"], 5);
    assert_eq!(pkg["failures"], 1);
    assert_eq!(pkg["oomKills"], 1);
    assert_eq!(pkg["p95PeakMiB"], 330);
    assert_eq!(pkg["maxPeakMiB"], 999);
    assert_eq!(pkg["lastTier"], "medium");

    let only = json(&nix_tier(&state, &["history", "--json", "--package", "pkg", "--limit", "2"]));
    assert_eq!(only["builds"].as_array().map(Vec::len), Some(2));
    assert_eq!(only["builds"][0]["outcome"], "oom-killed");
    assert_eq!(only["summary"].as_array().map(Vec::len), Some(1));

    let table = nix_tier(&state, &["history"]);
    assert!(table.status.success());
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.contains("recent builds (6):") && table.contains("packages (2):"), "{table}");
    assert!(table.contains("2026-01-01 00:05") && table.contains("oom-killed") && table.contains("413/4096"), "{table}");
}

#[test]
fn explain_says_when_a_learned_reservation_is_capped_at_the_tier() {
    let dir = TempDir::new().expect("tempdir");
    let state = dir.path().join("state-dir");
    let profile_path = dir.path().join("hardware-profile.json");
    let detected = Command::new(env!("CARGO_BIN_EXE_nix-tier")).arg("profile").output().expect("nix-tier profile");
    assert!(detected.status.success(), "{}", String::from_utf8_lossy(&detected.stderr));
    // A medium tier of 256 MiB, below what the package has been seen to use.
    let mut profile: Value = serde_json::from_slice(&detected.stdout).expect("profile JSON");
    profile["build"]["tiers"]["medium"]["memoryMiB"] = 256.into();
    fs::write(&profile_path, serde_json::to_vec(&profile).expect("JSON")).expect("pin profile");

    let drv = pkg_drv(dir.path());
    let history = History::open(&state).expect("open history");
    for (started, peak) in [(1, 300), (2, 280), (3, 310)] {
        history.record(&build(&drv, started, peak, Outcome::Succeeded)).expect("record");
    }
    let args = ["explain", drv.to_str().expect("UTF-8 path"), "--profile", profile_path.to_str().expect("UTF-8 path")];
    let explained = json(&nix_tier(&state, &[&args[..], &["--json"]].concat()));
    assert_eq!(explained["memorySource"], "learned", "{explained}");
    assert_eq!((&explained["memoryMiB"], &explained["limitMiB"]), (&256.into(), &256.into()), "{explained}");
    assert_eq!(explained["learned"]["p95MiB"], 310);
    let human = nix_tier(&state, &args);
    let human = String::from_utf8_lossy(&human.stdout).into_owned();
    assert!(human.contains("reserves 256 MiB: learned from 3 builds (p95 310 MiB), capped at the medium tier's memoryMiB"), "{human}");
    assert!(human.contains("limited to 256 MiB: the p95 × 1.25, capped at the medium tier's memoryMiB"), "{human}");
}

#[test]
fn history_refuses_a_symlinked_database() {
    let dir = TempDir::new().expect("tempdir");
    let state = dir.path().join("state-dir");
    fs::create_dir(&state).expect("state dir");
    std::os::unix::fs::symlink(dir.path().join("elsewhere.sqlite"), state.join("history.sqlite")).expect("symlink");
    let out = nix_tier(&state, &["history", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("symlink"), "{stderr}");
    assert!(!dir.path().join("elsewhere.sqlite").exists());
}
