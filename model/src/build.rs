//! How builds share the machine: the memory budget, the tiers and package-name rules.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::tiers::{self, Tier, TierTable};

/// The `build` section of a profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Build {
    /// Memory all tier builds together may reserve, in MiB.
    #[serde(rename = "memoryBudgetMiB")]
    pub memory_budget_mib: u64,
    /// The tier of a build no rule matches.
    pub default_tier: Tier,
    /// Package-name rules, tried in order; the first match decides the tier. May be
    /// omitted in JSON (no rules).
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// The limits of each tier.
    pub tiers: TierTable,
    /// How tiers' `maxJobs` hold once builds have a history. Omitted in JSON when it is the
    /// default, [`Mode::Learned`].
    #[serde(default, skip_serializing_if = "Mode::is_learned")]
    pub mode: Mode,
    /// In [`Mode::Learned`], the tiers whose `maxJobs` still caps every build (e.g. `["heavy"]`
    /// where heavy builds each want every core). Omitted in JSON when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caps: Vec<Tier>,
}

/// How tiers' `maxJobs` hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    /// A build whose memory reservation was learned from its package's past builds is held by
    /// the memory budget (and Nix's own `max-jobs`), not by its tier's `maxJobs`, unless the tier
    /// is in `caps`: the measured figures do the packing. Builds without history keep their
    /// tier's limits, which are the guess until something is learned.
    #[default]
    Learned,
    /// Every build is held to its tier's `maxJobs`.
    Tiers,
}

impl Mode {
    fn is_learned(&self) -> bool {
        *self == Mode::Learned
    }
}

impl Build {
    /// Whether a build of `tier` is held to the tier's `maxJobs`: always in [`Mode::Tiers`] or
    /// for a capped tier; otherwise only while its reservation is not `learned`.
    pub fn job_slots_bind(&self, tier: Tier, learned: bool) -> bool {
        self.mode == Mode::Tiers || !learned || self.caps.contains(&tier)
    }
}

impl Build {
    /// The default build section for `threads` hardware threads and `total_memory_mib` MiB of
    /// RAM: the budget and tiers of the [formula](crate::tiers), default tier light, no rules.
    pub fn default_for(threads: u32, total_memory_mib: u64) -> Build {
        let memory_budget_mib = tiers::memory_budget_mib(total_memory_mib);
        Build {
            memory_budget_mib,
            default_tier: Tier::Light,
            rules: Vec::new(),
            tiers: tiers::default_tiers(threads, memory_budget_mib),
            mode: Mode::Learned,
            caps: Vec::new(),
        }
    }

    /// Classifies the build of `package` (a name without version: a `pname`, or
    /// [`package_name`] of a derivation name), in this order: the tier it is `marked` with (by
    /// `optimizeFor`), the first rule matching the package, `big-parallel` in its
    /// `requiredSystemFeatures` (heavy), else the default tier.
    pub fn classify(&self, package: &str, required_features: &[String], marked: Option<Tier>) -> Classification {
        let decided = |tier: Tier, reason: String| Classification { tier, reason };
        if let Some(tier) = marked {
            return decided(tier, format!("marked {tier}"));
        }
        if let Some(rule) = self.rules.iter().find(|rule| rule.pattern.matches(package)) {
            return decided(rule.tier, format!("rule \"{}\" matches {package}", rule.pattern));
        }
        if required_features.iter().any(|f| f == BIG_PARALLEL) {
            return decided(Tier::Heavy, format!("requiredSystemFeatures has {BIG_PARALLEL}"));
        }
        decided(self.default_tier, "the default tier".to_string())
    }
}

/// The system feature nixpkgs gives its heaviest builds (kernels, compilers, browsers).
pub const BIG_PARALLEL: &str = "big-parallel";

/// A build's tier and the rule that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    /// The tier.
    pub tier: Tier,
    /// Why, for `nix-tier explain` and `drv.nixTier.tierReason`.
    pub reason: String,
}

/// A rule putting matching packages into a tier, e.g. `{ "match": "nodejs*", "tier": "heavy" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Which package names the rule applies to.
    #[serde(rename = "match")]
    pub pattern: Pattern,
    /// The tier of the matching builds.
    pub tier: Tier,
}

/// A package-name pattern: matched against the derivation name without its version.
///
/// * `nodejs` matches exactly `nodejs` (not `nodejs-slim`);
/// * `python3*` matches names starting with `python3`;
/// * `*-unwrapped` matches names ending with `-unwrapped`;
/// * `*llvm*` matches names containing `llvm`; `*` matches every name.
///
/// A `*` anywhere else is rejected; matching is case-sensitive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Pattern(String);

/// Why a package-name pattern was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The pattern is the empty string.
    #[error("a pattern must not be empty; use \"*\" to match every package")]
    Empty,
    /// The pattern has a `*` that is neither its first nor its last character.
    #[error(
        "pattern \"{0}\" has a '*' in the middle; '*' may only start or end a pattern \
         (e.g. \"python3*\", \"*-unwrapped\")"
    )]
    InnerStar(String),
}

impl Pattern {
    /// Parses `text`, rejecting empty patterns and `*` in the middle.
    pub fn new(text: &str) -> Result<Pattern, PatternError> {
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        if Self::split(text).1.contains('*') {
            return Err(PatternError::InnerStar(text.to_string()));
        }
        Ok(Pattern(text.to_string()))
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` (a package name without version) matches.
    pub fn matches(&self, name: &str) -> bool {
        match Self::split(&self.0) {
            (false, core, false) => name == core,
            (false, core, true) => name.starts_with(core),
            (true, core, false) => name.ends_with(core),
            (true, core, true) => name.contains(core),
        }
    }

    /// Splits off one leading and one trailing `*`: (leading?, core, trailing?).
    fn split(text: &str) -> (bool, &str, bool) {
        let (leading, rest) = match text.strip_prefix('*') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        match rest.strip_suffix('*') {
            Some(core) => (leading, core, true),
            None => (leading, rest, false),
        }
    }
}

impl TryFrom<String> for Pattern {
    type Error = PatternError;

    fn try_from(text: String) -> Result<Pattern, PatternError> {
        Pattern::new(&text)
    }
}

impl From<Pattern> for String {
    fn from(pattern: Pattern) -> String {
        pattern.0
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The package name of a derivation name, as Nix's `builtins.parseDrvName` splits it: all
/// before the first `-` that is followed by a non-letter (`nodejs-slim-22.1.0` → `nodejs-slim`).
pub fn package_name(drv_name: &str) -> &str {
    let bytes = drv_name.as_bytes();
    bytes
        .windows(2)
        .position(|pair| pair[0] == b'-' && !pair[1].is_ascii_alphabetic())
        .map_or(drv_name, |dash| &drv_name[..dash])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_with(rules: &[(&str, Tier)]) -> Build {
        Build {
            rules: rules
                .iter()
                .map(|(text, tier)| Rule {
                    pattern: Pattern::new(text).expect("valid test pattern"),
                    tier: *tier,
                })
                .collect(),
            ..Build::default_for(8, 16384)
        }
    }

    #[test]
    fn package_names_follow_parse_drv_name() {
        assert_eq!(package_name("nodejs-22.11.0"), "nodejs");
        assert_eq!(package_name("nodejs-slim-22.11.0"), "nodejs-slim");
        assert_eq!(package_name("python3.12-numpy-2.1.0"), "python3.12-numpy");
        assert_eq!(package_name("hello"), "hello");
        assert_eq!(package_name("foo-"), "foo-");
        assert_eq!(package_name("linux-6.6.1-modules"), "linux");
    }

    #[test]
    fn patterns_match_exactly_or_by_star() {
        let exact = Pattern::new("nodejs").expect("valid");
        assert!(exact.matches("nodejs"));
        assert!(!exact.matches("nodejs-slim"));
        assert!(Pattern::new("python3*")
            .expect("valid")
            .matches("python3.12-numpy"));
        assert!(Pattern::new("*-unwrapped")
            .expect("valid")
            .matches("chromium-unwrapped"));
        assert!(Pattern::new("*llvm*")
            .expect("valid")
            .matches("rocm-llvm-libs"));
        assert!(Pattern::new("*").expect("valid").matches("anything"));
        assert!(!Pattern::new("*llvm*").expect("valid").matches("gcc"));
    }

    #[test]
    fn bad_patterns_are_rejected() {
        assert_eq!(Pattern::new(""), Err(PatternError::Empty));
        assert_eq!(
            Pattern::new("py*thon"),
            Err(PatternError::InnerStar("py*thon".to_string()))
        );
        assert!(Pattern::new("**x").is_err());
    }

    #[test]
    fn classification_order_is_mark_rule_big_parallel_default() {
        let build = build_with(&[("nodejs", Tier::Heavy), ("node*", Tier::Medium)]);
        let tier = |name: &str, features: &[&str], marked| {
            let features: Vec<String> = features.iter().map(|f| f.to_string()).collect();
            build.classify(package_name(name), &features, marked).tier
        };
        assert_eq!(tier("nodejs-22.11.0", &[], None), Tier::Heavy);
        assert_eq!(tier("node-gyp-10.0.1", &[], None), Tier::Medium);
        assert_eq!(tier("hello-2.12.1", &[], None), Tier::Light);
        assert_eq!(tier("llvm-18.1.0", &["big-parallel"], None), Tier::Heavy);
        assert_eq!(tier("node-gyp-10.0.1", &["big-parallel"], None), Tier::Medium);
        assert_eq!(tier("nodejs-22.11.0", &[], Some(Tier::Light)), Tier::Light);
        let why = build.classify("node-gyp", &[], None).reason;
        assert!(why.contains("node*") && why.contains("node-gyp"), "{why}");
    }
}
