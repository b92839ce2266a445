//! `nix-tier profile` end to end: detect, pin, check.

use std::fs;
use std::process::{Command, Output};

use tempfile::TempDir;

fn nix_tier(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nix-tier"))
        .args(args)
        .output()
        .expect("nix-tier runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn detected_profile_pins_and_checks_ok() {
    let detected = nix_tier(&["profile"]);
    assert!(detected.status.success(), "{}", text(&detected.stderr));
    let json: serde_json::Value = serde_json::from_slice(&detected.stdout).expect("JSON");
    assert_eq!(json["schemaVersion"], 1);
    assert_eq!(json["source"], "detected");
    let microarchitecture = json["cpu"]["microarchitecture"]
        .as_str()
        .expect("a microarchitecture");

    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("hardware-profile.json");
    fs::write(&path, &detected.stdout).expect("pin");
    let path = path.to_str().expect("UTF-8 path");

    let checked = nix_tier(&["profile", "--check", path]);
    assert!(checked.status.success(), "{}", text(&checked.stderr));
    let stdout = text(&checked.stdout);
    assert!(
        stdout.starts_with(&format!(
            "{path}: ok (schemaVersion 1, {microarchitecture}, tiers heavy 1/"
        )),
        "{stdout}"
    );
    assert!(
        stdout.trim_end().ends_with("as maxJobs/cores/memoryMiB)"),
        "{stdout}"
    );
}

#[test]
fn bad_profile_fails_with_message() {
    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("hw.json");
    fs::write(&path, r#"{ "schemaVersion": 7 }"#).expect("write");
    let path = path.to_str().expect("UTF-8 path");

    let checked = nix_tier(&["profile", "--check", path]);
    assert_eq!(checked.status.code(), Some(1));
    assert!(checked.stdout.is_empty());
    let stderr = text(&checked.stderr);
    assert!(
        stderr.contains(&format!(
            "hardware profile {path}: schemaVersion 7 is not supported; \
             this nix-tier reads schemaVersion 1"
        )),
        "{stderr}"
    );
}

#[test]
fn missing_profile_says_how_to_create_it() {
    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("absent.json");
    let path = path.to_str().expect("UTF-8 path");
    let checked = nix_tier(&["profile", "--check", path]);
    assert_eq!(checked.status.code(), Some(1));
    let stderr = text(&checked.stderr);
    assert!(
        stderr.contains(&format!("run 'nix-tier profile > {path}' to create one")),
        "{stderr}"
    );
}
