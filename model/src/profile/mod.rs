//! The hardware profile: schema, detection and (in `load`) pinned files.
//!
//! Serialized as camelCase JSON with `schemaVersion: 1`; `docs/profile.md` is the schema
//! reference. Deserializing with serde fills defaults (see [`Profile::from_json_str`]) but
//! checks neither the schema version nor the limits; use `from_json_str` for that.

mod error;
mod load;
mod validate;

use serde::{Deserialize, Serialize};

use crate::build::Build;
use crate::detect::{self, cpu, gpu, memory, DetectError, HostPaths};

pub use error::ProfileError;

/// The schema version this crate reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// A hardware profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", from = "load::RawProfile")]
pub struct Profile {
    /// Always [`SCHEMA_VERSION`] in a valid profile.
    pub schema_version: u32,
    /// Whether the profile was detected or pinned.
    pub source: Source,
    /// The Nix system string, e.g. `x86_64-linux`.
    pub system: String,
    /// The CPU.
    pub cpu: Cpu,
    /// The RAM.
    pub memory: Memory,
    /// Swap space.
    pub swap: Swap,
    /// Display controllers.
    pub gpus: Vec<Gpu>,
    /// How builds share the machine.
    pub build: Build,
}

/// Where a profile came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Detected on the running host.
    Detected,
    /// Loaded from a pinned file.
    Pinned,
}

/// The CPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cpu {
    /// `vendor_id` on x86 (`GenuineIntel`, `AuthenticAMD`); on aarch64 archspec's name for
    /// the `CPU implementer` (`ARM`, `Ampere`), or the code itself when unknown.
    pub vendor: String,
    /// The `model name` line, `null` when the kernel prints none (aarch64).
    #[serde(default)]
    pub model_name: Option<String>,
    /// archspec's microarchitecture name, e.g. `skylake`, `zen3`, `neoverse_n1`.
    pub microarchitecture: String,
    /// The nearest generic ancestor in gcc's spelling: `x86-64`, `x86-64-v2` … `x86-64-v4`
    /// on x86_64, `armv8-a`, `armv8.2-a` … on aarch64.
    pub isa_level: String,
    /// Names for `stdenv.hostPlatform.gcc.arch` and `.tune`.
    pub gcc: GccTarget,
    /// LLVM CPU name for `rustc -C target-cpu`.
    pub rust_target_cpu: String,
    /// `GOAMD64` level `v1` … `v4`; `null` except on x86_64.
    #[serde(default)]
    pub goamd64: Option<String>,
    /// Feature flags as `/proc/cpuinfo` spells them (`flags` or `Features`), sorted.
    pub features: Vec<String>,
    /// Physical cores.
    pub physical_cores: u32,
    /// Hardware threads.
    pub threads: u32,
}

/// gcc target names, as nixpkgs' `stdenv.hostPlatform.gcc` expects them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GccTarget {
    /// The `-march` name: `skylake`, `znver3`, `x86-64-v3`, `armv8.2-a`, ….
    pub arch: String,
    /// The `-mtune` name: `skylake`, `generic`, `neoverse-n1` (gcc's `-mcpu` on aarch64), ….
    pub tune: String,
}

/// The RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Memory {
    /// Total RAM (`MemTotal`), in MiB.
    #[serde(rename = "totalMiB")]
    pub total_mib: u64,
}

/// Swap space.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Swap {
    /// Total swap (`SwapTotal`, zram swap included), in MiB.
    #[serde(rename = "totalMiB")]
    pub total_mib: u64,
    /// Configured zram devices.
    #[serde(default)]
    pub zram: Vec<Zram>,
}

/// A configured zram device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Zram {
    /// The block device name, e.g. `zram0`.
    pub device: String,
    /// Its uncompressed size (`disksize`), in MiB.
    #[serde(rename = "sizeMiB")]
    pub size_mib: u64,
    /// The selected compression algorithm, e.g. `zstd`.
    #[serde(default)]
    pub algorithm: Option<String>,
}

/// A display controller (PCI class `0x03`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Gpu {
    /// `nvidia`, `amd`, `intel`, or the PCI vendor id (e.g. `1af4`).
    pub vendor: String,
    /// The bound kernel driver, e.g. `nvidia`, `amdgpu`, `i915`; `null` when none.
    #[serde(default)]
    pub driver: Option<String>,
    /// `vendor:device` PCI ids, e.g. `10de:2684`.
    pub pci_id: String,
}

impl Profile {
    /// Detects the running host: reads `/proc/cpuinfo`, `/proc/meminfo`, `/sys/block/zram*`
    /// and `/sys/bus/pci/devices`, and derives the default [`Build`].
    ///
    /// Cheap enough for every Nix evaluation: a few small files and archspec's bundled data.
    pub fn detect() -> Result<Profile, DetectError> {
        Profile::detect_at(&HostPaths::host(), std::env::consts::ARCH)
    }

    /// Detects a host whose files lie under `paths` and whose Rust architecture name is
    /// `arch` (see [`detect::cpu::cpu_from_cpuinfo`]).
    pub fn detect_at(paths: &HostPaths, arch: &str) -> Result<Profile, DetectError> {
        let cpu = cpu::read_cpu(paths, arch)?;
        let meminfo = memory::read_meminfo(paths)?;
        let build = Build::default_for(cpu.threads, meminfo.total_mib);
        Ok(Profile {
            schema_version: SCHEMA_VERSION,
            source: Source::Detected,
            system: detect::nix_system(arch),
            cpu,
            memory: Memory {
                total_mib: meminfo.total_mib,
            },
            swap: Swap {
                total_mib: meminfo.swap_total_mib,
                zram: memory::read_zram(paths),
            },
            gpus: gpu::read_gpus(paths),
            build,
        })
    }

    /// The profile as compact JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a profile has only string map keys")
    }

    /// The profile as indented JSON, ready to be pinned.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("a profile has only string map keys")
    }
}
