//! Microarchitecture detection on recorded `/proc/cpuinfo` texts of real CPUs.

use nix_tier_model::detect::cpu::cpu_from_cpuinfo;
use nix_tier_model::{Cpu, GccTarget};

/// What a fixture must detect as.
struct Expected {
    microarchitecture: &'static str,
    isa_level: &'static str,
    gcc: (&'static str, &'static str),
    rust_target_cpu: &'static str,
    goamd64: Option<&'static str>,
    threads: u32,
    physical_cores: u32,
}

fn detect(fixture: &str, arch: &str) -> Cpu {
    let path = format!(
        "{}/tests/fixtures/cpuinfo/{fixture}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).expect("fixture is readable");
    cpu_from_cpuinfo(&text, arch).expect("fixture lists processors")
}

fn check(fixture: &str, arch: &str, expected: Expected) -> Cpu {
    let cpu = detect(fixture, arch);
    assert_eq!(
        cpu.microarchitecture, expected.microarchitecture,
        "{fixture}"
    );
    assert_eq!(cpu.isa_level, expected.isa_level, "{fixture}");
    assert_eq!(
        cpu.gcc,
        GccTarget {
            arch: expected.gcc.0.to_string(),
            tune: expected.gcc.1.to_string()
        },
        "{fixture}"
    );
    assert_eq!(cpu.rust_target_cpu, expected.rust_target_cpu, "{fixture}");
    assert_eq!(cpu.goamd64.as_deref(), expected.goamd64, "{fixture}");
    assert_eq!(cpu.threads, expected.threads, "{fixture}");
    assert_eq!(cpu.physical_cores, expected.physical_cores, "{fixture}");
    let mut sorted = cpu.features.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        cpu.features, sorted,
        "{fixture}: features sorted and unique"
    );
    cpu
}

#[test]
fn skylake_client_i7_6700k() {
    let cpu = check(
        "skylake-i7-6700k.txt",
        "x86_64",
        Expected {
            microarchitecture: "skylake",
            isa_level: "x86-64-v3",
            gcc: ("skylake", "skylake"),
            rust_target_cpu: "skylake",
            goamd64: Some("v3"),
            threads: 2,
            physical_cores: 2,
        },
    );
    assert_eq!(cpu.vendor, "GenuineIntel");
    assert_eq!(
        cpu.model_name.as_deref(),
        Some("Intel(R) Core(TM) i7-6700K CPU @ 4.00GHz")
    );
    assert!(cpu.features.iter().any(|f| f == "avx2"));
}

#[test]
fn cascade_lake_xeon_two_sockets() {
    // Processors 0 and 20 share a core id on different sockets; 40 is 0's SMT sibling.
    check(
        "cascadelake-xeon-gold-6248.txt",
        "x86_64",
        Expected {
            microarchitecture: "cascadelake",
            isa_level: "x86-64-v4",
            gcc: ("cascadelake", "cascadelake"),
            rust_target_cpu: "cascadelake",
            goamd64: Some("v4"),
            threads: 3,
            physical_cores: 2,
        },
    );
}

#[test]
fn zen3_ryzen_5950x_smt_siblings() {
    let cpu = check(
        "zen3-ryzen9-5950x.txt",
        "x86_64",
        Expected {
            microarchitecture: "zen3",
            isa_level: "x86-64-v3",
            gcc: ("znver3", "znver3"),
            rust_target_cpu: "znver3",
            goamd64: Some("v3"),
            threads: 2,
            physical_cores: 1,
        },
    );
    assert_eq!(cpu.vendor, "AuthenticAMD");
}

#[test]
fn zen4_ryzen_7950x_avx512() {
    check(
        "zen4-ryzen9-7950x.txt",
        "x86_64",
        Expected {
            microarchitecture: "zen4",
            isa_level: "x86-64-v4",
            gcc: ("znver4", "znver4"),
            rust_target_cpu: "znver4",
            goamd64: Some("v4"),
            threads: 2,
            physical_cores: 2,
        },
    );
}

#[test]
fn alder_lake_hybrid_is_skylake_in_archspec_0_2() {
    // archspec 0.2's data has no alderlake entry; without AVX-512 the best Intel match
    // is skylake. Processors 0 and 1 are one P-core's threads, 16 is an E-core.
    check(
        "alderlake-i7-12700k.txt",
        "x86_64",
        Expected {
            microarchitecture: "skylake",
            isa_level: "x86-64-v3",
            gcc: ("skylake", "skylake"),
            rust_target_cpu: "skylake",
            goamd64: Some("v3"),
            threads: 3,
            physical_cores: 2,
        },
    );
}

#[test]
fn neoverse_n1_graviton2() {
    let cpu = check(
        "neoverse-n1-graviton2.txt",
        "aarch64",
        Expected {
            microarchitecture: "neoverse_n1",
            isa_level: "armv8.2-a",
            gcc: ("armv8.2-a", "neoverse-n1"),
            rust_target_cpu: "neoverse-n1",
            goamd64: None,
            threads: 2,
            physical_cores: 2,
        },
    );
    assert_eq!(cpu.vendor, "ARM");
    assert_eq!(cpu.model_name, None);
    assert!(cpu.features.iter().any(|f| f == "asimddp"));
}

#[test]
fn neoverse_v1_graviton3() {
    check(
        "neoverse-v1-graviton3.txt",
        "aarch64",
        Expected {
            microarchitecture: "neoverse_v1",
            isa_level: "armv8.4-a",
            gcc: ("armv8.4-a", "neoverse-v1"),
            rust_target_cpu: "neoverse-v1",
            goamd64: None,
            threads: 2,
            physical_cores: 2,
        },
    );
}

#[test]
fn unknown_arm_implementer_falls_back_to_generic_aarch64() {
    let text = "processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0xfe\nCPU part\t: 0x001\n";
    let cpu = cpu_from_cpuinfo(text, "aarch64").expect("one processor");
    assert_eq!(cpu.vendor, "0xfe");
    assert_eq!(cpu.microarchitecture, "aarch64");
    assert_eq!(cpu.isa_level, "armv8-a");
    assert_eq!(cpu.rust_target_cpu, "generic");
}

#[test]
fn text_without_processors_is_refused() {
    assert!(cpu_from_cpuinfo("", "x86_64").is_none());
    assert!(cpu_from_cpuinfo("garbage\n", "x86_64").is_none());
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
#[test]
fn host_detection_agrees_with_archspec() {
    let text = std::fs::read_to_string("/proc/cpuinfo").expect("host cpuinfo");
    let ours = cpu_from_cpuinfo(&text, std::env::consts::ARCH).expect("host processors");
    let theirs = archspec::cpu::host().expect("archspec detects the host");
    assert_eq!(ours.microarchitecture, theirs.name());
}
