//! Microarchitecture detection and compiler targets from archspec's data.
//!
//! archspec 0.2 keeps its Linux detector private and reads `/proc/cpuinfo` itself, so this
//! module ports its algorithm (`archspec::cpu::detect`, Linux x86_64 and aarch64) onto
//! archspec's public microarchitecture tree and schema, which lets recorded cpuinfo texts be
//! classified. The one deliberate difference: ties are broken by name, where archspec's
//! result depends on hash-map order.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use archspec::cpu::Microarchitecture;
use archspec::schema::{Compiler, CompilerSet, MicroarchitecturesSchema};

use crate::profile::GccTarget;

/// What the profile records about the CPU's microarchitecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// archspec's name, e.g. `skylake`, `zen3`, `neoverse_n1`.
    pub microarchitecture: String,
    /// gcc's spelling of the nearest generic ancestor, e.g. `x86-64-v3`, `armv8.2-a`.
    pub isa_level: String,
    /// gcc `-march`/`-mtune` names.
    pub gcc: GccTarget,
    /// LLVM cpu name for `rustc -C target-cpu`.
    pub rust_target_cpu: String,
    /// `GOAMD64` level on x86_64.
    pub goamd64: Option<String>,
}

/// The CPU as the kernel describes it, the input of detection.
pub(crate) struct Observed<'a> {
    /// Rust architecture name: `x86_64`, `aarch64`, ….
    pub arch: &'a str,
    /// archspec vendor name: `vendor_id` on x86, the mapped `CPU implementer` on aarch64.
    pub vendor: &'a str,
    /// The feature flags.
    pub features: &'a BTreeSet<String>,
    /// `CPU part` on aarch64.
    pub cpu_part: Option<&'a str>,
}

/// The archspec vendor name of an aarch64 `CPU implementer` code such as `0x41`.
pub(crate) fn arm_vendor(implementer: &str) -> Option<&'static str> {
    MicroarchitecturesSchema::schema()
        .conversions
        .arm_vendors
        .get(implementer)
        .map(String::as_str)
}

/// Classifies the observed CPU and derives its compiler targets.
pub(crate) fn target(observed: &Observed<'_>) -> Target {
    match best_match(observed) {
        Some(uarch) => target_of(uarch),
        None => Target {
            microarchitecture: observed.arch.to_string(),
            isa_level: observed.arch.to_string(),
            gcc: GccTarget {
                arch: observed.arch.to_string(),
                tune: observed.arch.to_string(),
            },
            rust_target_cpu: "generic".to_string(),
            goamd64: None,
        },
    }
}

/// The compiler targets of a known microarchitecture.
fn target_of(uarch: &Microarchitecture) -> Target {
    Target {
        microarchitecture: uarch.name().to_string(),
        isa_level: isa_level(uarch),
        gcc: gcc_target(uarch),
        rust_target_cpu: llvm_cpu_name(uarch),
        goamd64: goamd64(uarch),
    }
}

/// The ISA level of `uarch`: its nearest generic ancestor (itself if generic) in gcc's
/// `-march` spelling, e.g. `x86-64-v3` or `armv8.2-a`; else the ancestor's name with `-`.
pub fn isa_level(uarch: &Microarchitecture) -> String {
    let isa = isa_ancestor(uarch);
    newest_flags(isa, "gcc")
        .and_then(|flags| flags.march)
        .unwrap_or_else(|| isa.name().replace('_', "-"))
}

/// gcc names for `uarch` from archspec's newest gcc entry: `-march` (else the ISA level) as
/// `arch`, and `-mtune` or `-mcpu` (else `arch`) as `tune`. Without a gcc entry both are
/// the archspec name with `-` for `_`.
pub fn gcc_target(uarch: &Microarchitecture) -> GccTarget {
    let Some(flags) = newest_flags(uarch, "gcc") else {
        let name = uarch.name().replace('_', "-");
        return GccTarget {
            arch: name.clone(),
            tune: name,
        };
    };
    let arch = flags.march.unwrap_or_else(|| isa_level(uarch));
    let tune = flags.mtune.or(flags.mcpu).unwrap_or_else(|| arch.clone());
    GccTarget { arch, tune }
}

/// The LLVM CPU name for `rustc -C target-cpu`, from archspec's newest clang entry (clang
/// takes LLVM names): its `-mcpu`, or its `-march` on x86_64; else `generic`.
pub fn llvm_cpu_name(uarch: &Microarchitecture) -> String {
    let is_x86_64 = uarch.family().name() == "x86_64";
    newest_flags(uarch, "clang")
        .and_then(|flags| match flags.mcpu {
            Some(cpu) => Some(cpu),
            None if is_x86_64 => flags.march,
            None => None,
        })
        .unwrap_or_else(|| "generic".to_string())
}

/// The `GOAMD64` level (`v1` … `v4`) of `uarch`'s ISA level; `None` unless x86_64.
pub fn goamd64(uarch: &Microarchitecture) -> Option<String> {
    if uarch.family().name() != "x86_64" {
        return None;
    }
    let level = isa_ancestor(uarch)
        .name()
        .strip_prefix("x86_64_")
        .unwrap_or("v1");
    Some(level.to_string())
}

/// The nearest generic ancestor of `uarch` (itself if generic): the ISA level.
fn isa_ancestor(uarch: &Microarchitecture) -> &Microarchitecture {
    std::iter::once(uarch)
        .chain(uarch.ancestors().iter().map(Arc::as_ref))
        .filter(|m| m.vendor() == "generic")
        .max_by_key(|m| (m.ancestors().len(), m.name()))
        .unwrap_or(uarch)
}

/// archspec's best match for the observed CPU (the port of `TargetDetector::detect`).
fn best_match(observed: &Observed<'_>) -> Option<&'static Microarchitecture> {
    let candidates = compatible(observed);
    let best_generic = candidates
        .iter()
        .copied()
        .filter(|m| m.vendor() == "generic")
        .max_by_key(|m| rank(m))?;

    // Only descendants of the best generic level count, so a missing niche feature (one a
    // BIOS can switch off) does not demote the CPU to an old microarchitecture.
    let generic_nodes = node_set(best_generic);
    let mut best: Vec<&Microarchitecture> = candidates
        .into_iter()
        .filter(|m| m.name() != best_generic.name() && node_set(m).is_superset(&generic_nodes))
        .collect();

    // A matching cpu part separates aarch64 cores with equal features (neoverse_n2/v2).
    if let Some(part) = observed.cpu_part {
        if best.iter().any(|m| cpu_part(m) == Some(part)) {
            best.retain(|m| cpu_part(m) == Some(part));
        }
    }

    Some(
        best.into_iter()
            .max_by_key(|m| rank(m))
            .unwrap_or(best_generic),
    )
}

/// The known microarchitectures the observed CPU can run code for.
fn compatible(observed: &Observed<'_>) -> Vec<&'static Microarchitecture> {
    let known = Microarchitecture::known_targets();
    let runs = |m: &Microarchitecture| {
        (m.vendor() == "generic" || m.vendor() == observed.vendor)
            && schema_features(m.name())
                .iter()
                .all(|feature| observed.features.contains(feature))
    };
    match observed.arch {
        "x86_64" => known
            .values()
            .map(Arc::as_ref)
            .filter(|m| m.family().name() == "x86_64" && runs(m))
            .collect(),
        "aarch64" => known
            .values()
            .map(Arc::as_ref)
            .filter(|m| {
                // Generic armv8.x levels cannot be told apart from features; archspec only
                // considers the root and reaches the levels as ancestors.
                (m.vendor() != "generic" || m.name() == "aarch64")
                    && m.family().name() == "aarch64"
                    && runs(m)
            })
            .collect(),
        other => known.get(other).map(Arc::as_ref).into_iter().collect(),
    }
}

/// Ordering of candidates: deeper in the tree first, then more features, then name.
fn rank(m: &Microarchitecture) -> (usize, usize, &str) {
    (
        m.ancestors().len(),
        schema_features(m.name()).len(),
        m.name(),
    )
}

/// The names of `m` and all its ancestors.
fn node_set(m: &Microarchitecture) -> HashSet<&str> {
    std::iter::once(m.name())
        .chain(m.ancestors().iter().map(|a| a.name()))
        .collect()
}

/// The features code built for `target` needs that `host_features` (as /proc/cpuinfo spells
/// them) lack, sorted: what archspec requires of `target` and of all its ancestors.
pub fn missing_features(target: &Microarchitecture, host_features: &BTreeSet<String>) -> Vec<String> {
    let mut missing: BTreeSet<&str> = BTreeSet::new();
    for name in node_set(target) {
        for feature in schema_features(name) {
            // The one name archspec and the kernel spell differently (Linux: "pni").
            let spelled = if feature == "sse3" { "pni" } else { feature.as_str() };
            if !host_features.contains(feature) && !host_features.contains(spelled) {
                missing.insert(feature);
            }
        }
    }
    missing.into_iter().map(str::to_string).collect()
}

/// The features archspec requires for the microarchitecture `name`.
fn schema_features(name: &str) -> &'static [String] {
    MicroarchitecturesSchema::schema()
        .microarchitectures
        .get(name)
        .map_or(&[], |m| m.features.as_slice())
}

/// The `cpupart` archspec records for `m` (aarch64).
fn cpu_part(m: &Microarchitecture) -> Option<&'static str> {
    MicroarchitecturesSchema::schema()
        .microarchitectures
        .get(m.name())
        .and_then(|entry| entry.cpupart.as_deref())
}

/// The names in a compiler's flags for one microarchitecture.
#[derive(Debug, Default, PartialEq, Eq)]
struct Flags {
    /// `-march=` value.
    march: Option<String>,
    /// `-mtune=` value.
    mtune: Option<String>,
    /// `-mcpu=` value.
    mcpu: Option<String>,
}

/// The flags of the newest entry archspec lists for `compiler` (`gcc`, `clang`) on `m`:
/// the entry whose version range starts highest, preferring open-ended ranges.
fn newest_flags(m: &Microarchitecture, compiler: &str) -> Option<Flags> {
    newest_entry(m, compiler).map(|entry| parse_flags(&entry_flags(m, entry)))
}

/// The entry for the newest versions of `compiler`.
fn newest_entry(m: &Microarchitecture, compiler: &str) -> Option<&'static Compiler> {
    compiler_entries(m, compiler).iter().max_by_key(|entry| {
        let (low, high) = entry
            .versions
            .split_once(':')
            .unwrap_or((&entry.versions, ""));
        (version_key(low), high.is_empty())
    })
}

/// archspec's flag entries for `compiler` (`gcc`, `clang`, …) targeting `m`.
fn compiler_entries(m: &Microarchitecture, compiler: &str) -> &'static [Compiler] {
    let entries = MicroarchitecturesSchema::schema()
        .microarchitectures
        .get(m.name())
        .and_then(|schema| schema.compilers.as_ref())
        .and_then(|compilers| compilers.get(compiler));
    match entries {
        Some(CompilerSet::Several(several)) => several,
        Some(CompilerSet::Single(single)) => std::slice::from_ref(single),
        None => &[],
    }
}

/// An entry's flags with its placeholders filled in.
fn entry_flags(m: &Microarchitecture, entry: &Compiler) -> String {
    let name = entry.name.as_deref().unwrap_or(m.name());
    entry
        .flags
        .replace("{name}", name)
        .replace("{family}", m.family().name())
}

/// The flags archspec gives `compiler` (`gcc` or `clang`) at `version` for targeting `m`, e.g.
/// `-march=skylake -mtune=skylake`, or for gcc 10 and `x86_64_v3` the explicit feature flags;
/// the newest entry when the version is unknown. The error says why there are none.
pub fn compiler_flags(m: &Microarchitecture, compiler: &str, version: Option<&str>) -> Result<String, String> {
    let entries = compiler_entries(m, compiler);
    let entry = match version {
        Some(version) => entries.iter().find(|entry| version_in_range(version, &entry.versions)),
        None => newest_entry(m, compiler),
    };
    entry
        .map(|entry| entry_flags(m, entry))
        .ok_or_else(|| match version {
            Some(version) if !entries.is_empty() => format!("{compiler} {version} cannot target {}", m.name()),
            _ => format!("archspec has no {compiler} flags for {}", m.name()),
        })
}

/// Whether `version` lies in an archspec range `low:high` (either side may be empty; `high`
/// matches as a prefix, so `11.0` includes `11.0.4`).
fn version_in_range(version: &str, range: &str) -> bool {
    let (low, high) = range.split_once(':').unwrap_or((range, range));
    let v = version_key(version);
    let above_low = low.is_empty() || v >= version_key(low);
    let below_high = high.is_empty() || {
        let h = version_key(high);
        v.iter().take(h.len()).copied().collect::<Vec<_>>() <= h
    };
    above_low && below_high
}

/// Numeric components of a version like `10.3` (non-numeric parts count as 0).
fn version_key(version: &str) -> Vec<u64> {
    version
        .split('.')
        .filter(|part| !part.is_empty())
        .map(|part| part.parse().unwrap_or(0))
        .collect()
}

/// Picks `-march=`, `-mtune=` and `-mcpu=` out of a flag string.
fn parse_flags(flags: &str) -> Flags {
    let mut parsed = Flags::default();
    for token in flags.split_whitespace() {
        if let Some(value) = token.strip_prefix("-march=") {
            parsed.march = Some(value.to_string());
        } else if let Some(value) = token.strip_prefix("-mtune=") {
            parsed.mtune = Some(value.to_string());
        } else if let Some(value) = token.strip_prefix("-mcpu=") {
            parsed.mcpu = Some(value.to_string());
        }
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(name: &str) -> &'static Microarchitecture {
        Microarchitecture::known_targets()
            .get(name)
            .map(Arc::as_ref)
            .expect("archspec knows the name")
    }

    #[test]
    fn isa_levels_are_gcc_spellings() {
        assert_eq!(target_of(known("x86_64")).isa_level, "x86-64");
        assert_eq!(target_of(known("haswell")).isa_level, "x86-64-v3");
        assert_eq!(target_of(known("sapphirerapids")).isa_level, "x86-64-v4");
        assert_eq!(target_of(known("neoverse_v1")).isa_level, "armv8.4-a");
        assert_eq!(target_of(known("aarch64")).isa_level, "armv8-a");
    }

    #[test]
    fn newest_entry_wins_even_out_of_order() {
        // haswell lists gcc 4.8's "core-avx2" after the newer open-ended entry.
        assert_eq!(target_of(known("haswell")).gcc.arch, "haswell");
        // m1 lists gcc 15.1's -mcpu entry after gcc 8's -march entry.
        let m1 = target_of(known("m1"));
        assert_eq!(m1.gcc.tune, "apple-m1");
        assert_eq!(m1.gcc.arch, "armv8.4-a");
    }

    #[test]
    fn generic_targets() {
        let v3 = target_of(known("x86_64_v3"));
        assert_eq!(
            v3.gcc,
            GccTarget {
                arch: "x86-64-v3".into(),
                tune: "generic".into()
            }
        );
        assert_eq!(v3.rust_target_cpu, "x86-64-v3");
        assert_eq!(v3.goamd64.as_deref(), Some("v3"));
        assert_eq!(target_of(known("x86_64")).goamd64.as_deref(), Some("v1"));
        assert_eq!(target_of(known("aarch64")).rust_target_cpu, "generic");
    }

    #[test]
    fn unknown_architecture_falls_back_to_its_name() {
        let features = BTreeSet::new();
        let target = target(&Observed {
            arch: "loongarch64",
            vendor: "generic",
            features: &features,
            cpu_part: None,
        });
        assert_eq!(target.microarchitecture, "loongarch64");
        assert_eq!(target.rust_target_cpu, "generic");
        assert_eq!(target.goamd64, None);
    }

    #[test]
    fn flags_parse() {
        assert_eq!(
            parse_flags("-march=armv8.2-a+fp16 -mtune=cortex-a72"),
            Flags {
                march: Some("armv8.2-a+fp16".into()),
                mtune: Some("cortex-a72".into()),
                mcpu: None
            }
        );
        assert_eq!(version_key("10.3"), [10, 3]);
        assert!(version_key("") < version_key("4.2.0"));
    }
}
