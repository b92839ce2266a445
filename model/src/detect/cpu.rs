//! The CPU from `/proc/cpuinfo`.

use std::collections::{BTreeSet, HashSet};

use super::uarch::{self, Observed};
use super::{read_required, DetectError, HostPaths};
use crate::profile::Cpu;

/// Reads `<root>/proc/cpuinfo` and describes the CPU of a host whose Rust architecture name
/// is `arch` (`std::env::consts::ARCH` for the running host).
pub fn read_cpu(paths: &HostPaths, arch: &str) -> Result<Cpu, DetectError> {
    let path = paths.cpuinfo();
    let text = read_required(&path)?;
    cpu_from_cpuinfo(&text, arch).ok_or(DetectError::Malformed {
        path,
        problem: "lists no processor",
    })
}

/// Describes the CPU from the text of `/proc/cpuinfo` on an `arch` host (`x86_64`,
/// `aarch64`, …); `None` when the text lists no `processor` entry.
///
/// The microarchitecture is archspec's best match for the vendor and feature flags (`flags`
/// on x86, `Features` on aarch64) of the first processor (and its `CPU part` on aarch64). Threads are the `processor` entries;
/// physical cores are the distinct (`physical id`, `core id`) pairs, or the threads when
/// the kernel prints no topology (as on aarch64).
pub fn cpu_from_cpuinfo(text: &str, arch: &str) -> Option<Cpu> {
    let processors: Vec<Block<'_>> = blocks(text)
        .filter(|block| block.get("processor").is_some())
        .collect();
    let first = processors.first()?;

    let features: BTreeSet<String> = first
        .get("flags")
        .or_else(|| first.get("Features"))
        .unwrap_or_default()
        .split_ascii_whitespace()
        .map(str::to_string)
        .collect();

    let (vendor, match_vendor) = vendor(first, arch);
    let target = uarch::target(&Observed {
        arch,
        vendor: match_vendor,
        features: &features,
        cpu_part: first.get("CPU part"),
    });

    let threads = u32::try_from(processors.len()).unwrap_or(u32::MAX);
    let cores: HashSet<(&str, &str)> = processors
        .iter()
        .filter_map(|block| Some((block.get("physical id")?, block.get("core id")?)))
        .collect();
    let physical_cores = match u32::try_from(cores.len()).unwrap_or(u32::MAX) {
        0 => threads,
        n => n,
    };

    Some(Cpu {
        vendor,
        model_name: first.get("model name").map(str::to_string),
        microarchitecture: target.microarchitecture,
        isa_level: target.isa_level,
        gcc: target.gcc,
        rust_target_cpu: target.rust_target_cpu,
        goamd64: target.goamd64,
        features: features.into_iter().collect(),
        physical_cores,
        threads,
    })
}

/// The vendor to record and the archspec vendor name to match against.
///
/// On aarch64 the `CPU implementer` code is mapped to archspec's vendor name (`0x41` →
/// `ARM`); an unknown code is recorded as is and matches only generic targets.
fn vendor<'a>(first: &Block<'a>, arch: &str) -> (String, &'a str) {
    if arch == "aarch64" {
        let implementer = first.get("CPU implementer").unwrap_or("generic");
        return match uarch::arm_vendor(implementer) {
            Some(name) => (name.to_string(), name),
            None => (implementer.to_string(), "generic"),
        };
    }
    match first.get("vendor_id") {
        Some(vendor) => (vendor.to_string(), vendor),
        None => ("generic".to_string(), "generic"),
    }
}

/// One blank-line separated block of `key : value` lines.
struct Block<'a> {
    /// The lines as trimmed (key, value) pairs, in order.
    fields: Vec<(&'a str, &'a str)>,
}

impl<'a> Block<'a> {
    /// The value of the first line whose key is `key`.
    fn get(&self, key: &str) -> Option<&'a str> {
        self.fields
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, value)| *value)
    }
}

/// Splits cpuinfo text into blocks; lines without `:` are ignored.
fn blocks(text: &str) -> impl Iterator<Item = Block<'_>> {
    text.split("\n\n").filter_map(|chunk| {
        let fields: Vec<(&str, &str)> = chunk
            .lines()
            .filter_map(|line| line.split_once(':'))
            .map(|(key, value)| (key.trim(), value.trim()))
            .collect();
        (!fields.is_empty()).then_some(Block { fields })
    })
}
