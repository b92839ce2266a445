//! Profiles: detection on fake roots, JSON round trips, and every load error.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use nix_tier_model::detect::HostPaths;
use nix_tier_model::{hardware_profile_json, Build, Profile, ProfileError, Source, Tier, Zram};
use serde_json::{json, Value};
use tempfile::TempDir;

const MEMINFO: &str = "MemTotal:       16384000 kB\nMemFree:        12000000 kB\n\
                       SwapTotal:       8388604 kB\nSwapFree:        8388604 kB\n";

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/cpuinfo/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    fs::read_to_string(path).expect("fixture is readable")
}

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
    fs::write(path, text).expect("write");
}

/// A fake root with the given cpuinfo, 16000 MiB of RAM, two zram devices (one configured)
/// and three PCI devices (an NVIDIA GPU with driver, an Intel GPU without, a NIC).
fn fake_root(cpuinfo: &str) -> TempDir {
    let root = TempDir::new().expect("tempdir");
    let r = root.path();
    write(&r.join("proc/cpuinfo"), cpuinfo);
    write(&r.join("proc/meminfo"), MEMINFO);
    write(&r.join("sys/block/zram0/disksize"), "8589934592\n");
    write(
        &r.join("sys/block/zram0/comp_algorithm"),
        "lzo lzo-rle lz4 [zstd]\n",
    );
    write(&r.join("sys/block/zram1/disksize"), "0\n");
    write(&r.join("sys/block/vda/size"), "1000\n");
    let pci = r.join("sys/bus/pci/devices");
    for (address, class, vendor, device) in [
        ("0000:01:00.0", "0x030000", "0x10de", "0x2684"),
        ("0000:00:02.0", "0x030000", "0x8086", "0x4680"),
        ("0000:00:1f.6", "0x020000", "0x8086", "0x15fa"),
    ] {
        write(&pci.join(address).join("class"), &format!("{class}\n"));
        write(&pci.join(address).join("vendor"), &format!("{vendor}\n"));
        write(&pci.join(address).join("device"), &format!("{device}\n"));
    }
    fs::create_dir_all(r.join("sys/bus/pci/drivers/nvidia")).expect("mkdir");
    symlink(
        "../../../bus/pci/drivers/nvidia",
        pci.join("0000:01:00.0/driver"),
    )
    .expect("symlink");
    root
}

fn detected(cpuinfo: &str, arch: &str) -> Profile {
    let root = fake_root(cpuinfo);
    Profile::detect_at(&HostPaths::new(root.path()), arch).expect("fake root detects")
}

#[test]
fn detects_a_fake_x86_64_root() {
    let profile = detected(&fixture("skylake-i7-6700k.txt"), "x86_64");
    assert_eq!(profile.schema_version, 1);
    assert_eq!(profile.source, Source::Detected);
    assert_eq!(profile.system, "x86_64-linux");
    assert_eq!(profile.cpu.microarchitecture, "skylake");
    assert_eq!(profile.memory.total_mib, 16000);
    assert_eq!(profile.swap.total_mib, 8191);
    assert_eq!(
        profile.swap.zram,
        [Zram {
            device: "zram0".into(),
            size_mib: 8192,
            algorithm: Some("zstd".into())
        }]
    );
    let gpus: Vec<(&str, Option<&str>, &str)> = profile
        .gpus
        .iter()
        .map(|g| (g.vendor.as_str(), g.driver.as_deref(), g.pci_id.as_str()))
        .collect();
    assert_eq!(
        gpus,
        [
            ("intel", None, "8086:4680"),
            ("nvidia", Some("nvidia"), "10de:2684")
        ]
    );
    assert_eq!(profile.build, Build::default_for(2, 16000));
}

#[test]
fn detects_a_fake_aarch64_root() {
    let profile = detected(&fixture("neoverse-n1-graviton2.txt"), "aarch64");
    assert_eq!(profile.system, "aarch64-linux");
    assert_eq!(profile.cpu.microarchitecture, "neoverse_n1");
    assert_eq!(profile.cpu.goamd64, None);
}

#[test]
fn detection_requires_cpuinfo_and_meminfo() {
    let root = TempDir::new().expect("tempdir");
    let paths = HostPaths::new(root.path());
    let err = Profile::detect_at(&paths, "x86_64").expect_err("no cpuinfo");
    assert!(err.to_string().contains("proc/cpuinfo"), "{err}");

    write(
        &root.path().join("proc/cpuinfo"),
        &fixture("zen3-ryzen9-5950x.txt"),
    );
    write(&root.path().join("proc/meminfo"), "MemFree: 1 kB\n");
    let err = Profile::detect_at(&paths, "x86_64").expect_err("no MemTotal");
    assert!(err.to_string().contains("MemTotal"), "{err}");
}

#[test]
fn json_round_trips() {
    let profile = detected(&fixture("zen4-ryzen9-7950x.txt"), "x86_64");
    let pretty = profile.to_json_pretty();
    assert_eq!(
        Profile::from_json_str(&pretty, "pretty").expect("parses"),
        profile
    );
    let compact = profile.to_json();
    assert_eq!(
        Profile::from_json_str(&compact, "compact").expect("parses"),
        profile
    );
    let value: Value = serde_json::from_str(&compact).expect("json");
    assert_eq!(value["schemaVersion"], 1);
    assert_eq!(value["source"], "detected");
    assert_eq!(value["cpu"]["isaLevel"], "x86-64-v4");
    assert_eq!(value["cpu"]["gcc"]["arch"], "znver4");
    assert_eq!(value["memory"]["totalMiB"], 16000);
    assert_eq!(value["build"]["defaultTier"], "light");
    assert!(value["build"]["tiers"]["heavy"]["memoryMiB"].is_u64());
    assert!(value["cpu"]["goamd64"] == "v4");
}

/// A valid profile as JSON, for the error tests to break.
fn valid() -> Value {
    let profile = detected(&fixture("skylake-i7-6700k.txt"), "x86_64");
    serde_json::from_str(&profile.to_json()).expect("json")
}

/// Writes `text` to `<dir>/hw.json` and returns the load error message.
fn load_error(text: &str) -> (String, ProfileError) {
    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("hw.json");
    fs::write(&path, text).expect("write");
    let err = Profile::load_pinned(&path).expect_err("the profile is invalid");
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    (message, err)
}

fn load_error_after(edit: impl FnOnce(&mut Value)) -> String {
    let mut value = valid();
    edit(&mut value);
    load_error(&serde_json::to_string_pretty(&value).expect("json")).0
}

fn at<'a>(value: &'a mut Value, pointer: &str) -> &'a mut Value {
    value.pointer_mut(pointer).expect("pointer exists")
}

fn remove(value: &mut Value, pointer: &str, key: &str) {
    at(value, pointer)
        .as_object_mut()
        .expect("object")
        .remove(key);
}

#[test]
fn pinned_profiles_load_as_pinned() {
    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("hw.json");
    fs::write(&path, valid().to_string()).expect("write");
    let profile = Profile::load_pinned(&path).expect("valid");
    assert_eq!(profile.source, Source::Pinned);
    let json = hardware_profile_json(Some(&path)).expect("valid");
    assert!(json.contains("\"source\":\"pinned\""), "{json}");
}

#[test]
fn hand_written_minimal_profile_gets_defaults() {
    let text = json!({
        "schemaVersion": 1,
        "system": "x86_64-linux",
        "cpu": {
            "vendor": "GenuineIntel",
            "microarchitecture": "skylake",
            "isaLevel": "x86-64-v3",
            "gcc": { "arch": "skylake", "tune": "skylake" },
            "rustTargetCpu": "skylake",
            "features": ["avx2"],
            "physicalCores": 4,
            "threads": 8
        },
        "memory": { "totalMiB": 16384 }
    });
    let profile = Profile::from_json_str(&text.to_string(), "minimal").expect("valid");
    assert_eq!(profile.source, Source::Pinned);
    assert_eq!(profile.build, Build::default_for(8, 16384));
    assert!(profile.gpus.is_empty());
    assert_eq!(profile.swap.total_mib, 0);
    assert_eq!(profile.cpu.goamd64, None);
}

#[test]
fn rules_parse_and_decide_tiers() {
    let mut value = valid();
    *at(&mut value, "/build/rules") = json!([
        { "match": "nodejs", "tier": "heavy" },
        { "match": "python3*", "tier": "medium" }
    ]);
    let profile = Profile::from_json_str(&value.to_string(), "rules").expect("valid");
    assert_eq!(profile.build.classify("nodejs", &[], None).tier, Tier::Heavy);
    assert_eq!(profile.build.classify("python3", &[], None).tier, Tier::Medium);
    assert_eq!(profile.build.classify("hello", &[], None).tier, Tier::Light);
}

#[test]
fn missing_file_says_how_to_create_it() {
    let dir = TempDir::new().expect("tempdir");
    let path: PathBuf = dir.path().join("absent.json");
    let err = Profile::load_pinned(&path).expect_err("absent");
    assert!(matches!(err, ProfileError::NotFound { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "hardware profile {0} does not exist; run 'nix-tier profile > {0}' to create one",
            path.display()
        )
    );
    assert!(hardware_profile_json(Some(&path)).is_err());
}

#[test]
fn unreadable_file_is_named() {
    let dir = TempDir::new().expect("tempdir");
    let err = Profile::load_pinned(dir.path()).expect_err("a directory");
    assert!(matches!(err, ProfileError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("cannot read it"), "{err}");
}

#[test]
fn bad_json_has_line_and_column() {
    let (message, err) = load_error("{\n  \"schemaVersion\": 1,\n  \"system\": x86_64\n}");
    assert!(
        matches!(err, ProfileError::Syntax { line: 3, .. }),
        "{err:?}"
    );
    assert!(
        message.contains("invalid JSON at line 3 column"),
        "{message}"
    );
    assert!(message.contains("fix the syntax"), "{message}");

    let (message, _) = load_error("");
    assert!(message.contains("invalid JSON"), "{message}");

    let mut text = valid().to_string();
    text.push_str(" {}");
    let (message, _) = load_error(&text);
    assert!(message.contains("trailing characters"), "{message}");
}

#[test]
fn non_object_is_refused() {
    let (message, _) = load_error("[1, 2]");
    assert!(message.contains("must be a JSON object"), "{message}");
}

#[test]
fn wrong_type_names_field_and_expectation() {
    let message = load_error_after(|v| *at(v, "/cpu/threads") = json!("eight"));
    assert!(
        message.contains(
            "field cpu.threads: expected an unsigned integer (at most 4294967295), found string \"eight\""
        ),
        "{message}"
    );
    assert!(message.contains("(line "), "{message}");

    let message = load_error_after(|v| *at(v, "/build/tiers/heavy/maxJobs") = json!(-1));
    assert!(
        message.contains("field build.tiers.heavy.maxJobs: expected an unsigned integer (at most 4294967295), found integer -1"),
        "{message}"
    );

    let message = load_error_after(|v| *at(v, "/source") = json!(3));
    assert!(
        message.contains("field source: expected a string"),
        "{message}"
    );

    let message = load_error_after(|v| *at(v, "/gpus") = json!({}));
    assert!(
        message.contains("field gpus: expected an array, found an object"),
        "{message}"
    );
}

#[test]
fn missing_field_names_its_path() {
    let message = load_error_after(|v| remove(v, "/cpu", "threads"));
    assert!(
        message.contains("field cpu.threads: missing; add it"),
        "{message}"
    );
    let message = load_error_after(|v| remove(v, "", "memory"));
    assert!(
        message.contains("field memory: missing; add it"),
        "{message}"
    );
    let message = load_error_after(|v| remove(v, "", "schemaVersion"));
    assert!(
        message.contains("field schemaVersion: missing; add \"schemaVersion\": 1"),
        "{message}"
    );
}

#[test]
fn unknown_field_is_named() {
    let message = load_error_after(|v| {
        *at(v, "/build/tiers/heavy") = json!({
            "maxjobs": 1, "cores": 8, "memoryMiB": 1024
        })
    });
    assert!(
        message.contains(
            "field build.tiers.heavy.maxjobs: unknown field; remove it or fix its spelling"
        ),
        "{message}"
    );
    assert!(message.contains("maxJobs"), "{message}");
}

#[test]
fn unknown_tier_and_bad_pattern() {
    let message = load_error_after(|v| {
        *at(v, "/build/rules") = json!([{ "match": "nodejs", "tier": "huge" }]);
    });
    assert!(message.contains("field build.rules[0].tier: \"huge\" is not allowed; expected one of heavy, medium, light"), "{message}");

    let message = load_error_after(|v| {
        *at(v, "/build/rules") = json!([{ "match": "no*de", "tier": "heavy" }]);
    });
    assert!(
        message.contains("field build.rules[0].match: pattern \"no*de\""),
        "{message}"
    );
    assert!(message.contains("may only start or end"), "{message}");
}

#[test]
fn unsupported_schema_version() {
    let (message, err) = load_error(&json!({ "schemaVersion": 7 }).to_string());
    assert!(matches!(err, ProfileError::UnsupportedSchemaVersion { .. }));
    assert!(
        message.contains("schemaVersion 7 is not supported; this nix-tier reads schemaVersion 1"),
        "{message}"
    );
    let message = load_error_after(|v| *at(v, "/schemaVersion") = json!("1"));
    assert!(
        message.contains("field schemaVersion: expected an unsigned integer"),
        "{message}"
    );
}

#[test]
fn limits_are_checked() {
    let message = load_error_after(|v| *at(v, "/build/tiers/medium/maxJobs") = json!(0));
    assert!(
        message.contains("field build.tiers.medium.maxJobs: must be at least 1, found 0"),
        "{message}"
    );
    let message = load_error_after(|v| *at(v, "/build/tiers/light/cores") = json!(0));
    assert!(
        message.contains("field build.tiers.light.cores: must be at least 1"),
        "{message}"
    );
    let message = load_error_after(|v| {
        *at(v, "/build/memoryBudgetMiB") = json!(4096);
        *at(v, "/build/tiers/heavy/memoryMiB") = json!(8192);
    });
    assert!(
        message.contains(
            "field build.tiers.heavy.memoryMiB: 8192 exceeds build.memoryBudgetMiB (4096); \
             lower it or raise the budget"
        ),
        "{message}"
    );
    let message = load_error_after(|v| *at(v, "/cpu/threads") = json!(0));
    assert!(
        message.contains("field cpu.threads: must be at least 1"),
        "{message}"
    );
    let message = load_error_after(|v| *at(v, "/cpu/goamd64") = json!("v5"));
    assert!(
        message.contains("field cpu.goamd64: \"v5\" is not allowed"),
        "{message}"
    );
}
