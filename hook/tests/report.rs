//! `nix-tier report` end to end: the real command draws the newest run of a real history
//! database (rows recorded through the library) and the run `nix-tier simulate` predicts for a
//! workload, and the SVGs parse with one bar per build.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{build_section, nix_tier, write_profile};
use nix_tier_hook::history::{BuildRecord, History, Outcome};
use nix_tier_model::Tier;
use serde_json::Value;
use tempfile::TempDir;

mod common;

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The detected profile with `build_section`'s tiers in a 3000 MiB budget, pinned in `dir`.
fn profile(dir: &Path) -> PathBuf {
    let path = dir.join("hardware-profile.json");
    write_profile(&path, build_section(3000));
    path
}

/// The elements of an SVG whose class starts with `class`, as (class, title) pairs.
fn elements(svg: &str, class: &str) -> Vec<(String, String)> {
    let document = roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("the SVG does not parse ({e}):\n{svg}"));
    assert_eq!(document.root_element().tag_name().name(), "svg");
    document
        .descendants()
        .filter_map(|n| {
            let classes = n.attribute("class")?;
            (classes.split(' ').next() == Some(class)).then(|| {
                let title = n.children().find(|c| c.has_tag_name("title")).and_then(|t| t.text()).unwrap_or_default();
                (classes.to_string(), title.to_string())
            })
        })
        .collect()
}

fn build(name: &str, tier: Tier, started_s: u64, wall_s: u64, waited_ms: Option<u64>) -> BuildRecord {
    BuildRecord {
        drv: format!("/nix/store/00000000000000000000000000000000-{name}-1.0.drv"),
        package: name.to_string(),
        version: "1.0".to_string(),
        tier,
        started_unix_ms: 1_767_225_600_000 + started_s * 1000,
        // Nix registers the outputs after the lease ended.
        wall_ms: wall_s * 1000 + 500,
        leased_ms: Some(wall_s * 1000),
        cpu_ms: None,
        peak_mib: Some(120),
        limit_mib: Some(200),
        outcome: Outcome::Succeeded,
        waited_ms,
    }
}

#[test]
fn report_draws_the_newest_recorded_run() {
    let dir = TempDir::new().expect("tempdir");
    let state = dir.path().join("state");
    let profile = profile(dir.path());
    let profile_arg = profile.to_str().expect("UTF-8 path");
    let svg_path = dir.path().join("run.svg");
    let svg_arg = svg_path.to_str().expect("UTF-8 path");

    let none = nix_tier(&state, &["report", "--output", svg_arg]);
    assert!(!none.status.success());
    assert!(stderr(&none).contains("no builds recorded yet in") && stderr(&none).contains("nix-tier report simulate"), "{}", stderr(&none));

    let history = History::open(&state).expect("open history");
    // An earlier run, then 10 minutes later this one: three builds at once at most (libb takes
    // the slot liba's lease left), two waited.
    history.record(&build("earlier", Tier::Light, 0, 5, Some(0))).expect("record");
    for row in [
        build("compiler", Tier::Heavy, 600, 30, Some(0)),
        build("liba", Tier::Medium, 600, 10, None),
        build("libb", Tier::Medium, 610, 10, Some(10_000)),
        build("tool", Tier::Light, 605, 2, Some(0)),
        BuildRecord { outcome: Outcome::OomKilled, ..build("hog", Tier::Light, 625, 3, Some(20_000)) },
    ] {
        history.record(&row).expect("record");
    }
    drop(history);

    let out = nix_tier(&state, &["report", "--output", svg_arg, "--profile", profile_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("5 builds over 30.0 s from"), "{}", String::from_utf8_lossy(&out.stdout));
    let svg = fs::read_to_string(&svg_path).expect("the SVG was written");
    let bars = elements(&svg, "build");
    assert_eq!(bars.len(), 5, "one bar per build of the newest run: {bars:?}");
    assert!(bars.iter().all(|(_, title)| !title.starts_with("earlier")), "{bars:?}");
    assert!(bars.contains(&("build light failed".to_string(), "hog-1.0 (light)\nwaited 20.0 s, started at 25.0 s, ran 3.0 s\npeak 120 MiB, reserved 200 MiB; oom-killed".to_string())), "{bars:?}");
    assert_eq!(elements(&svg, "wait").len(), 2, "libb and hog waited");
    assert_eq!(elements(&svg, "slot").len(), 3, "three builds at once at most");
    assert!(svg.contains("budget 3000 MiB") && svg.contains("heavy: 1 at once, 1000 MiB"), "the profile's budget and tiers");

    // --since: every build since then, the earlier run too.
    let out = nix_tier(&state, &["report", "-o", svg_arg, "--profile", profile_arg, "--since", "1767225600000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(elements(&fs::read_to_string(&svg_path).expect("SVG"), "build").len(), 6);
    let out = nix_tier(&state, &["report", "-o", svg_arg, "--profile", profile_arg, "--since", "1767229200000"]);
    assert!(stderr(&out).contains("no builds recorded since 2026-01-01 01:00 UTC in"), "{}", stderr(&out));

    // An unwritable output is named.
    let out = nix_tier(&state, &["report", "-o", "/nonexistent/run.svg", "--profile", profile_arg]);
    assert!(!out.status.success() && stderr(&out).contains("/nonexistent/run.svg"), "{}", stderr(&out));
}

#[test]
fn report_simulate_draws_the_predicted_run() {
    let dir = TempDir::new().expect("tempdir");
    let state = dir.path().join("state");
    let profile = profile(dir.path());
    let workload = dir.path().join("workload.json");
    // Two heavy builds (one at a time), three medium (two at a time), a light one on top.
    let builds = serde_json::json!({"builds": [
        {"name": "heavy-a", "tier": "heavy", "ms": 4000, "mib": 300},
        {"name": "heavy-b", "tier": "heavy", "ms": 4000, "mib": 300},
        {"name": "med-a", "tier": "medium", "ms": 3000, "mib": 100},
        {"name": "med-b", "tier": "medium", "ms": 3000, "mib": 100},
        {"name": "med-c", "tier": "medium", "ms": 3000, "mib": 100},
        {"name": "top", "tier": "light", "ms": 1000, "mib": 10, "deps": ["heavy-a", "heavy-b", "med-a", "med-b", "med-c"]},
    ]});
    fs::write(&workload, builds.to_string()).expect("write workload");
    let scenario = ["--workload", workload.to_str().expect("UTF-8"), "--profile", profile.to_str().expect("UTF-8"), "--no-history"];
    let svg_path = dir.path().join("predicted.svg");

    let mut args = vec!["report", "simulate", "--output", svg_path.to_str().expect("UTF-8")];
    args.extend(scenario);
    let out = nix_tier(&state, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let svg = fs::read_to_string(&svg_path).expect("the SVG was written");

    let mut args = vec!["simulate", "--json"];
    args.extend(scenario);
    let simulated = nix_tier(&state, &args);
    assert!(simulated.status.success(), "{}", stderr(&simulated));
    let prediction: Value = serde_json::from_slice(&simulated.stdout).expect("JSON");
    let prediction = &prediction["prediction"];

    let bars = elements(&svg, "build");
    assert_eq!(bars.len(), 6, "{bars:?}");
    assert_eq!(bars.iter().filter(|(class, _)| class == "build heavy").count(), 2);
    let waited = prediction["runs"].as_array().expect("runs").iter().filter(|r| r["startMs"].as_u64() > r["readyMs"].as_u64()).count();
    assert!(waited >= 2, "heavy-b and med-c wait: {prediction}");
    assert_eq!(elements(&svg, "wait").len(), waited);
    assert_eq!(elements(&svg, "slot").len() as u64, prediction["mostAtOnce"].as_u64().expect("mostAtOnce"));
    assert!(svg.contains("budget 3000 MiB"));

    // The history's arguments do not mix with a simulation's.
    let out = nix_tier(&state, &["report", "--since", "5", "simulate", "-o", "x.svg", "--workload", "w.json"]);
    assert!(!out.status.success() && stderr(&out).contains("cannot be used with"), "{}", stderr(&out));
}
