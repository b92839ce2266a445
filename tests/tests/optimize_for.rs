//! `builtins.optimizeFor` (docs/optimize-for.md) against the real Nix of this machine, on the
//! nixpkgs-lite fixture (tests/fixtures/nixpkgs-lite): a pure-Nix stand-in for nixpkgs'
//! mkDerivation, overrideAttrs and override, with one package per language case.
//!
//! What the plugin did is read back from the .drv files Nix writes (their environment), from
//! `passthru.nixTier`, from what the builder saw (the fixture's builds record their environment
//! and every compiler command line) and, end to end, from the machine code of programs built
//! both ways. Every test has its own store (NixSandbox), so they run in parallel.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix_tier_tests::{stderr, NixSandbox};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Expressions over the fixture
// ---------------------------------------------------------------------------------------------

fn fixture_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/nixpkgs-lite");
    fs::canonicalize(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// The version of the host's gcc, which the fixture's builds run (`stdenv.cc.version`).
fn host_gcc_version() -> String {
    let out = Command::new("gcc").arg("-dumpfullversion").output().expect("run gcc");
    assert!(out.status.success(), "gcc -dumpfullversion failed: {}", stderr(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The Rust toolchain the fixture's Rust package builds with (cargo and rustc, not rustup's
/// proxies, which need a HOME the builder lacks).
fn rust_toolchain() -> String {
    let out = Command::new("rustc").args(["--print", "sysroot"]).output().expect("run rustc");
    assert!(out.status.success(), "rustc --print sysroot failed: {}", stderr(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `body` evaluated with `pkgs` (the fixture), `lib`, `profile` (builtins.hardwareProfile, only
/// forced when used) and `optimizeFor` in scope. `body` starts on line 2, column 3 of «string».
fn with_pkgs(body: &str) -> String {
    with_pkgs_gcc(&host_gcc_version(), body)
}

/// Instantiates `body` (a derivation) with nix-instantiate, which writes the .drv (an `--eval`
/// of `.drvPath` would only compute its path), and returns the .drv's path.
fn instantiate(sandbox: &NixSandbox, body: &str) -> PathBuf {
    let expr = with_pkgs(body);
    let out = sandbox
        .command("nix-instantiate")
        .args(["--expr", &expr])
        .output()
        .expect("run nix-instantiate");
    assert!(out.status.success(), "instantiating {body} failed:\n{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let path = PathBuf::from(text.lines().last().expect("nix-instantiate printed a path").trim());
    assert!(path.is_file(), "{} is not a file", path.display());
    path
}

/// Builds `body` (a derivation) with nix-build and `extra` arguments; returns the output path.
fn build(sandbox: &NixSandbox, body: &str, extra: &[&str]) -> PathBuf {
    let expr = with_pkgs(body);
    let out = sandbox
        .command("nix-build")
        .args(["--no-out-link"])
        .args(extra)
        .args(["--expr", &expr])
        .output()
        .expect("run nix-build");
    assert!(out.status.success(), "building {body} failed:\n{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(text.lines().last().expect("nix-build printed a path").trim())
}

fn eval(sandbox: &NixSandbox, body: &str) -> Value {
    sandbox.eval_json(&with_pkgs(body))
}

fn eval_error(sandbox: &NixSandbox, body: &str) -> String {
    sandbox.eval_error(&with_pkgs(body), &[])
}

// ---------------------------------------------------------------------------------------------
// Reading .drv files
// ---------------------------------------------------------------------------------------------

/// A term of the ATerm syntax .drv files are written in.
#[derive(Debug)]
enum ATerm {
    Str(String),
    List(Vec<ATerm>),
    Tuple(Vec<ATerm>),
    App(String, Vec<ATerm>),
}

struct ATermParser<'a> {
    text: &'a [u8],
    at: usize,
}

impl ATermParser<'_> {
    fn parse(text: &str) -> ATerm {
        let mut p = ATermParser {
            text: text.as_bytes(),
            at: 0,
        };
        let term = p.term();
        assert_eq!(p.at, p.text.len(), "trailing text after the derivation");
        term
    }

    fn peek(&self) -> u8 {
        *self.text.get(self.at).expect("derivation text ended early")
    }

    fn expect(&mut self, byte: u8) {
        assert_eq!(
            self.peek() as char,
            byte as char,
            "unexpected character at byte {}",
            self.at
        );
        self.at += 1;
    }

    fn term(&mut self) -> ATerm {
        match self.peek() {
            b'"' => ATerm::Str(self.string()),
            b'[' => ATerm::List(self.sequence(b'[', b']')),
            b'(' => ATerm::Tuple(self.sequence(b'(', b')')),
            _ => {
                let start = self.at;
                while self.peek().is_ascii_alphanumeric() {
                    self.at += 1;
                }
                let name = String::from_utf8(self.text[start..self.at].to_vec()).unwrap();
                ATerm::App(name, self.sequence(b'(', b')'))
            }
        }
    }

    fn sequence(&mut self, open: u8, close: u8) -> Vec<ATerm> {
        self.expect(open);
        let mut items = Vec::new();
        while self.peek() != close {
            if !items.is_empty() {
                self.expect(b',');
            }
            items.push(self.term());
        }
        self.expect(close);
        items
    }

    fn string(&mut self) -> String {
        self.expect(b'"');
        let mut bytes = Vec::new();
        loop {
            let c = self.peek();
            self.at += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let escaped = self.peek();
                    self.at += 1;
                    bytes.push(match escaped {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        other => other,
                    });
                }
                other => bytes.push(other),
            }
        }
        String::from_utf8(bytes).expect("derivation strings are UTF-8")
    }
}

/// The environment of the derivation at `drv` (the last field of `Derive(...)`).
fn drv_env(drv: &Path) -> BTreeMap<String, String> {
    let text = fs::read_to_string(drv).unwrap_or_else(|e| panic!("{}: {e}", drv.display()));
    let ATerm::App(name, fields) = ATermParser::parse(&text) else {
        panic!("{}: not Derive(...)", drv.display())
    };
    assert_eq!(name, "Derive", "{}", drv.display());
    let Some(ATerm::List(pairs)) = fields.last() else {
        panic!("{}: no environment", drv.display())
    };
    pairs
        .iter()
        .map(|pair| match pair {
            ATerm::Tuple(kv) => match kv.as_slice() {
                [ATerm::Str(k), ATerm::Str(v)] => (k.clone(), v.clone()),
                other => panic!("bad environment entry {other:?}"),
            },
            other => panic!("bad environment entry {other:?}"),
        })
        .collect()
}

/// One binding of a .drv's environment as `nix-store --query --binding` reports it, or None.
fn query_binding(sandbox: &NixSandbox, drv: &Path, name: &str) -> Option<String> {
    let out = sandbox
        .command("nix-store")
        .args(["--query", "--binding", name])
        .arg(drv)
        .output()
        .expect("run nix-store");
    if !out.status.success() {
        let err = stderr(&out);
        assert!(
            err.contains("has no attribute") || err.contains(name),
            "nix-store --query failed: {err}"
        );
        return None;
    }
    let text = String::from_utf8(out.stdout).unwrap();
    Some(text.strip_suffix('\n').unwrap_or(&text).to_string())
}

fn binding<'a>(env: &'a BTreeMap<String, String>, name: &str) -> &'a str {
    env.get(name)
        .unwrap_or_else(|| panic!("the .drv has no {name}; it has {:?}", env.keys().collect::<Vec<_>>()))
}

fn words(s: &str) -> Vec<&str> {
    s.split_whitespace().collect()
}

// ---------------------------------------------------------------------------------------------
// The profile
// ---------------------------------------------------------------------------------------------

/// What the tests need from the evaluated `builtins.hardwareProfile`.
struct Host {
    profile: Value,
}

impl Host {
    fn of(sandbox: &NixSandbox) -> Host {
        Host {
            profile: sandbox.eval_json("builtins.hardwareProfile"),
        }
    }

    fn microarchitecture(&self) -> &str {
        self.profile["cpu"]["microarchitecture"]
            .as_str()
            .expect("cpu.microarchitecture")
    }

    fn gcc_arch(&self) -> &str {
        self.profile["cpu"]["gcc"]["arch"]
            .as_str()
            .unwrap_or_else(|| panic!("no cpu.gcc.arch in {}", self.profile["cpu"]))
    }

    /// `-mtune=` expected after `-march=`: the profile's when it records one.
    fn gcc_tune(&self) -> Option<&str> {
        self.profile["cpu"]["gcc"]["tune"].as_str()
    }

    fn features(&self) -> Vec<&str> {
        self.profile["cpu"]["features"]
            .as_array()
            .expect("cpu.features")
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect()
    }

    fn has(&self, feature: &str) -> bool {
        self.features().contains(&feature)
    }

    fn is_x86_64(&self) -> bool {
        std::env::consts::ARCH == "x86_64"
    }

    fn cores(&self, tier: &str) -> String {
        let cores = &self.profile["build"]["tiers"][tier]["cores"];
        cores
            .as_u64()
            .unwrap_or_else(|| panic!("no build.tiers.{tier}.cores"))
            .to_string()
    }

    /// `system-features` for a nix-build that may run builds optimised for this host.
    fn system_features(&self) -> String {
        format!(
            "gccarch-{} big-parallel benchmark nixos-test kvm",
            self.gcc_arch()
        )
    }
}

/// Asserts what optimizeFor wrote into `env` (a .drv's environment, or what the builder saw):
/// `-march=<arch>` and a `-mtune=` in NIX_CFLAGS_COMPILE_BEFORE, where a source file's own flags
/// still win, and NIX_CFLAGS_COMPILE the package's `original` (plus `-O<level>` when asked).
fn assert_cpu_flags(host: &Host, env: &BTreeMap<String, String>, original: &str, opt_level: Option<&str>) {
    let before = binding(env, "NIX_CFLAGS_COMPILE_BEFORE");
    let added = words(before);
    let march = format!("-march={}", host.gcc_arch());
    assert!(added.contains(&march.as_str()), "{march} not in NIX_CFLAGS_COMPILE_BEFORE {before:?}");
    match host.gcc_tune() {
        Some(tune) => {
            let mtune = format!("-mtune={tune}");
            assert!(added.contains(&mtune.as_str()), "{mtune} not in {before:?}")
        }
        None => assert!(added.iter().any(|w| w.starts_with("-mtune=")), "no -mtune= in {before:?}"),
    }
    let expected = match opt_level {
        Some(level) => words(original).into_iter().map(String::from).chain([format!("-O{level}")]).collect::<Vec<_>>(),
        None => words(original).into_iter().map(String::from).collect(),
    };
    let flags = env.get("NIX_CFLAGS_COMPILE").map(String::as_str).unwrap_or("");
    assert_eq!(words(flags), expected, "NIX_CFLAGS_COMPILE: the package's own flags, then the level asked for");
}

/// Asserts that the JSON text of `value` mentions one of `keywords` (case-insensitively).
fn assert_mentions(value: &Value, keywords: &[&str], what: &str) {
    let text = value.to_string().to_lowercase();
    assert!(
        keywords.iter().any(|k| text.contains(&k.to_lowercase())),
        "{what} mentions none of {keywords:?}: {value}"
    );
}

/// Out paths are kept: neither the tier nor its cores are written unless asked for.
fn assert_untiered(env: &BTreeMap<String, String>) {
    for name in ["NIX_TIER", "NIX_BUILD_CORES"] {
        assert!(!env.contains_key(name), "{name} in the derivation: {:?}", env.get(name));
    }
}

fn assert_requires_arch(host: &Host, env: &BTreeMap<String, String>) {
    // nixpkgs' convention: gccarch-<gcc.arch>.
    let feature = format!("gccarch-{}", host.gcc_arch());
    let features = env.get("requiredSystemFeatures").map(String::as_str).unwrap_or("");
    assert!(
        words(features).contains(&feature.as_str()),
        "requiredSystemFeatures {features:?} lacks {feature}"
    );
}

/// The tier optimizeFor picks for a package with no rule: the one it records in passthru.
fn default_tier(sandbox: &NixSandbox, package: &str) -> String {
    let tier = eval(
        sandbox,
        &format!("(optimizeFor {{ }} pkgs.{package}).passthru.nixTier.tier"),
    );
    let tier = tier.as_str().expect("passthru.nixTier.tier is a string").to_string();
    assert!(["heavy", "medium", "light"].contains(&tier.as_str()), "tier {tier:?}");
    tier
}

// ---------------------------------------------------------------------------------------------
// The fixture alone (no plugin): it must behave like nixpkgs for the tests below to mean anything
// ---------------------------------------------------------------------------------------------

#[test]
fn fixture_builds_and_runs_without_the_plugin() {
    let sandbox = NixSandbox::with_conf("");
    let out = build(&sandbox, "pkgs.vecsum", &[]);
    let run = Command::new(out.join("bin/vecsum")).output().expect("run vecsum");
    assert!(run.status.success(), "vecsum failed: {}", stderr(&run));
    assert!(String::from_utf8_lossy(&run.stdout).starts_with("vecsum checksum "));
    // The cc-wrapper emulation: hardening before the command's arguments, hardening and the
    // package's NIX_CFLAGS_COMPILE after them.
    let commands = fs::read_to_string(out.join("nix-support/cc-commands")).unwrap();
    assert!(commands.starts_with("gcc -O2 -U_FORTIFY_SOURCE -o "), "{commands}");
    assert!(
        commands.trim_end().ends_with("vecsum.c -U_FORTIFY_SOURCE -D_FORTIFY_SOURCE=2 -O3 -DVECSUM_FIXTURE"),
        "{commands}"
    );

    for package in ["envflags", "structured", "rusty", "gopkg", "python-like", "bigpkg", "gsl", "hello", "fixpoint", "rustc"] {
        build(&sandbox, &format!("pkgs.{package}"), &[]);
    }
}

/// What the builder of the output at `out` saw (its `env` file: exported variables only).
fn seen_env(out: &Path) -> BTreeMap<String, String> {
    let text = fs::read_to_string(out.join("env")).unwrap_or_else(|e| panic!("{}/env: {e}", out.display()));
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn fixture_follows_the_nixpkgs_interface() {
    let sandbox = NixSandbox::with_conf("");
    let v = eval(
        &sandbox,
        r#"{
          name = pkgs.vecsum.name;
          switches = builtins.attrNames (lib.functionArgs pkgs.python-like.override);
          ltoByDefault = pkgs.python-like.configureFlags;
          cc = { inherit (pkgs.vecsum.stdenv.cc) isGNU isClang version; };
          noCC = pkgs.rustc.stdenv.cc == null && !pkgs.rustc.stdenv.hasCC;
          selfIsThePackage = (pkgs.python-like.withPackages (ps: [ ])).interpreter.drvPath == pkgs.python-like.drvPath;
          prevForm = (pkgs.vecsum.overrideAttrs (old: { NIX_CFLAGS_COMPILE = old.NIX_CFLAGS_COMPILE + " -X"; })).NIX_CFLAGS_COMPILE;
          finalPrevForm = (pkgs.vecsum.overrideAttrs (final: prev: { NIX_CFLAGS_COMPILE = prev.NIX_CFLAGS_COMPILE + " -Y"; })).NIX_CFLAGS_COMPILE;
          fixpoint = (pkgs.fixpoint.overrideAttrs { NIX_CFLAGS_COMPILE = "-O3"; }).buildPhase;
          keepsOverride = (pkgs.python-like.overrideAttrs (old: { })) ? override;
          passthru = (pkgs.vecsum.overrideAttrs (old: { passthru = (old.passthru or { }) // { t = 1; }; })).passthru.t;
          passthruNotInDrv = (pkgs.vecsum.overrideAttrs { passthru.t = 1; }).drvPath == pkgs.vecsum.drvPath;
          hardening = (pkgs.hello.overrideAttrs { hardeningDisable = [ "fortify" ]; }).NIX_HARDENING_ENABLE;
        }"#,
    );
    assert_eq!(v["name"], "vecsum-1.0");
    assert_eq!(v["switches"], serde_json::json!(["enableLTO", "enableOptimizations", "self", "stdenv"]));
    assert_eq!(v["ltoByDefault"], serde_json::json!(["--with-lto"]), "CPython's enableLTO is on for 64-bit Linux");
    assert_eq!(v["cc"], serde_json::json!({ "isGNU": true, "isClang": false, "version": host_gcc_version() }));
    assert_eq!(v["noCC"], true, "runCommand uses stdenvNoCC");
    assert_eq!(v["selfIsThePackage"], true);
    assert_eq!(v["prevForm"], "-O3 -DVECSUM_FIXTURE -X");
    assert_eq!(v["finalPrevForm"], "-O3 -DVECSUM_FIXTURE -Y");
    assert!(v["fixpoint"].as_str().unwrap().contains("final=-O3"), "{}", v["fixpoint"]);
    assert_eq!(v["keepsOverride"], true);
    assert_eq!(v["passthru"], 1);
    assert_eq!(v["passthruNotInDrv"], true);
    assert_eq!(v["hardening"], "", "disabling fortify disables fortify3 too");

    // As in nixpkgs, an attribute both in `env` and at the top level is an error, also with
    // structured attributes.
    for package in ["envflags", "structured"] {
        let err = eval_error(&sandbox, &format!(r#"(pkgs.{package}.overrideAttrs {{ NIX_CFLAGS_COMPILE = "-O2"; }}).drvPath"#));
        assert!(err.contains("overlapping") && err.contains("NIX_CFLAGS_COMPILE"), "{err}");
    }

    // With structured attributes only `env` reaches the builder: a top-level variable does not.
    let out = build(&sandbox, "pkgs.structured-toplevel", &[]);
    assert!(!seen_env(&out).contains_key("NIX_CFLAGS_COMPILE"), "{:?}", seen_env(&out));
    let out = build(&sandbox, "pkgs.structured", &[]);
    assert_eq!(seen_env(&out)["NIX_CFLAGS_COMPILE"], "-O3 -DVECSUM_FIXTURE");

    // The .drv helpers agree with nix-store.
    let drv = instantiate(&sandbox, "pkgs.vecsum");
    let env = drv_env(&drv);
    assert_eq!(binding(&env, "NIX_CFLAGS_COMPILE"), "-O3 -DVECSUM_FIXTURE");
    assert_eq!(query_binding(&sandbox, &drv, "NIX_CFLAGS_COMPILE").as_deref(), Some("-O3 -DVECSUM_FIXTURE"));
    assert_eq!(query_binding(&sandbox, &drv, "NO_SUCH_BINDING"), None);
    assert_eq!(query_binding(&sandbox, &drv, "buildPhase").as_deref(), Some(binding(&env, "buildPhase")));
}

// ---------------------------------------------------------------------------------------------
// What optimizeFor writes into the derivation, and what the builder sees, per language case
// ---------------------------------------------------------------------------------------------

#[test]
fn c_flags_go_before_the_command_and_the_level_after() {
    let sandbox = NixSandbox::with_plugin("");
    let host = Host::of(&sandbox);
    let drv = instantiate(&sandbox, "optimizeFor { optLevel = 3; } pkgs.vecsum");
    let env = drv_env(&drv);
    assert_cpu_flags(&host, &env, "-O3 -DVECSUM_FIXTURE", Some("3"));
    assert_requires_arch(&host, &env);
    assert_untiered(&env);

    // optLevel = null (the default) keeps the package's own level.
    let env = drv_env(&instantiate(&sandbox, "optimizeFor { } pkgs.vecsum"));
    assert_cpu_flags(&host, &env, "-O3 -DVECSUM_FIXTURE", None);

    // A package without flags of its own gets them too.
    let env = drv_env(&instantiate(&sandbox, "optimizeFor { } pkgs.hello"));
    assert_cpu_flags(&host, &env, "", None);
}

#[test]
fn the_builder_sees_the_flags_plain_env_and_structured() {
    let sandbox = NixSandbox::with_plugin("");
    let host = Host::of(&sandbox);
    let features = host.system_features();
    let conf = ["--option", "system-features", features.as_str()];
    let march = format!("-march={}", host.gcc_arch());
    for package in ["vecsum", "envflags", "structured"] {
        let out = build(&sandbox, &format!("optimizeFor {{ optLevel = 2; }} pkgs.{package}"), &conf);
        let seen = seen_env(&out);
        assert_cpu_flags(&host, &seen, "-O3 -DVECSUM_FIXTURE", Some("2"));
        // The command line: -march before the source file, the package's flags and -O after.
        let commands = fs::read_to_string(out.join("nix-support/cc-commands")).unwrap();
        let (head, tail) = commands.split_once("vecsum.c").unwrap_or_else(|| panic!("{commands}"));
        assert!(head.contains(&march), "{package}: {march} not before the source: {commands}");
        assert!(tail.trim_end().ends_with("-O3 -DVECSUM_FIXTURE -O2"), "{package}: {commands}");
        assert!(!tail.contains("-march"), "{package}: {commands}");
    }
}

#[test]
fn a_later_user_override_of_env_flags_does_not_overlap() {
    let sandbox = NixSandbox::with_plugin("");
    // optimizeFor put -O into env for a package without NIX_CFLAGS_COMPILE of its own: the
    // user's env.NIX_CFLAGS_COMPILE afterwards replaces it instead of clashing with it.
    let env = drv_env(&instantiate(
        &sandbox,
        r#"(optimizeFor { optLevel = 3; } pkgs.hello).overrideAttrs (old: { env = (old.env or { }) // { NIX_CFLAGS_COMPILE = "-DUSER"; }; })"#,
    ));
    assert_eq!(binding(&env, "NIX_CFLAGS_COMPILE"), "-DUSER");
    assert!(binding(&env, "NIX_CFLAGS_COMPILE_BEFORE").contains("-march="));
}

#[test]
fn a_variable_the_builder_never_sees_is_not_claimed() {
    let sandbox = NixSandbox::with_plugin("");
    let host = Host::of(&sandbox);
    let body = "optimizeFor { optLevel = 3; } pkgs.structured-toplevel";
    let n = eval(&sandbox, &format!("let n = ({body}).passthru.nixTier; in {{ inherit (n) applied skipped; }}"));
    assert!(n["skipped"]["-O3"].as_str().unwrap().contains("__structuredAttrs"), "{n}");
    assert!(!n["applied"].to_string().contains("-O3"), "{n}");
    let features = host.system_features();
    let out = build(&sandbox, body, &["--option", "system-features", &features]);
    let seen = seen_env(&out);
    assert!(seen["NIX_CFLAGS_COMPILE_BEFORE"].contains("-march="), "{seen:?}");
    assert!(!seen.contains_key("NIX_CFLAGS_COMPILE"), "{seen:?}");
}

#[test]
fn every_variable_of_a_plan_goes_where_the_package_keeps_it() {
    // A Rust package given -O, -march, target-cpu and the core count: four variables, more than
    // the plugin's code places before writing the changes (plugin/src/apply.rs), so the last is
    // placed inside them. What overrideAttrs passes on shows where each went.
    let sandbox = NixSandbox::with_plugin("");
    let host = Host::of(&sandbox);
    let placed = |own_cores: &str| {
        eval(
            &sandbox,
            &format!(
                r#"let
                     d = pkgs.rusty.overrideAttrs (old: {{ env.NIX_CFLAGS_COMPILE = "-DOWN"; {own_cores} }});
                     r = optimizeFor {{ optLevel = 3; tier = "medium"; pinCores = true; }} d;
                   in (r.overrideAttrs (old: {{
                     passthru.placed = {{
                       top = builtins.attrNames (builtins.intersectAttrs
                         {{ NIX_CFLAGS_COMPILE = 0; NIX_CFLAGS_COMPILE_BEFORE = 0; RUSTFLAGS = 0; NIX_BUILD_CORES = 0; }} old);
                       inherit (old) env RUSTFLAGS;
                       cores = old.NIX_BUILD_CORES or old.env.NIX_BUILD_CORES;
                     }};
                   }})).placed"#
            ),
        )
    };
    let cores = host.cores("medium");
    for (own_cores, top) in [("", vec!["RUSTFLAGS"]), (r#"NIX_BUILD_CORES = "9";"#, vec!["NIX_BUILD_CORES", "RUSTFLAGS"])] {
        let placed = placed(own_cores);
        assert_eq!(placed["top"], serde_json::json!(top), "{placed}");
        let env = &placed["env"];
        assert_eq!(env["NIX_CFLAGS_COMPILE"], "-DOWN -O3", "{placed}");
        assert!(env["NIX_CFLAGS_COMPILE_BEFORE"].as_str().unwrap().starts_with("-march="), "{placed}");
        assert!(placed["RUSTFLAGS"].as_str().unwrap().starts_with("-C debuginfo=0 -C target-cpu="), "{placed}");
        assert_eq!(env.get("NIX_BUILD_CORES").is_some(), own_cores.is_empty(), "{placed}");
        assert_eq!(placed["cores"].as_str(), Some(cores.as_str()), "{placed}");
    }
}

#[test]
fn final_attrs_see_the_level() {
    let sandbox = NixSandbox::with_plugin("");
    let env = drv_env(&instantiate(&sandbox, "optimizeFor { optLevel = 3; } pkgs.fixpoint"));
    assert_eq!(binding(&env, "NIX_CFLAGS_COMPILE"), "-O2 -O3");
    assert!(binding(&env, "buildPhase").contains("final=-O2 -O3"), "{}", binding(&env, "buildPhase"));
}

#[test]
fn a_file_with_its_own_march_keeps_it() {
    let sandbox = NixSandbox::with_plugin("");
    let host = Host::of(&sandbox);
    if !host.is_x86_64() {
        eprintln!("skipped: the fixture's dispatch package uses x86-64 intrinsics");
        return;
    }
    // The trap: a -march after the file's own (the old placement) breaks its intrinsics.
    let no_plugin = NixSandbox::with_conf("");
    let out = no_plugin
        .command("nix-build")
        .args(["--no-out-link", "--expr", &with_pkgs(r#"pkgs.dispatch.overrideAttrs { NIX_CFLAGS_COMPILE = "-march=x86-64-v3"; }"#)])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a later -march did not break the AVX-512 file");
    assert!(stderr(&out).contains("target specific option mismatch"), "{}", stderr(&out));

    let body = format!(
        "optimizeFor {{ target = \"x86_64_v3\"; {} }} pkgs.dispatch",
        for_another_machine_unless(&host, X86_64_V3_FEATURES)
    );
    let out = build(&sandbox, &body, &["--option", "system-features", "gccarch-x86-64-v3"]);
    let commands = fs::read_to_string(out.join("nix-support/cc-commands")).unwrap();
    let line = commands.lines().find(|l| l.contains("avx512.c")).unwrap_or_else(|| panic!("{commands}"));
    let (ours, own) = (line.find("-march=x86-64-v3"), line.find("-march=skylake-avx512"));
    assert!(ours.is_some() && ours < own, "the file's own -march must come last: {line}");
    assert!(run_program(&out.join("bin/dispatch")).starts_with("dispatch 45"));
}

#[test]
fn rust_keeps_the_crates_own_rustflags() {
    let sandbox = NixSandbox::with_plugin("");
    let host = Host::of(&sandbox);
    let target_cpu = host.profile["cpu"]["rustTargetCpu"].as_str().expect("cpu.rustTargetCpu");
    let env = drv_env(&instantiate(&sandbox, "optimizeFor { } pkgs.rustcrate"));
    assert_eq!(binding(&env, "NIX_RUSTFLAGS"), format!("-C target-cpu={target_cpu}"));
    assert!(!env.contains_key("RUSTFLAGS"), "RUSTFLAGS would hide the crate's config rustflags");

    // Real cargo and rustc: the crate's .cargo/config.toml rustflags still apply, and the
    // target CPU's features are on.
    let features = host.system_features();
    let conf = ["--option", "system-features", features.as_str()];
    let plain = run_program(&build(&sandbox, "pkgs.rustcrate", &conf).join("bin/rustcrate"));
    let out = build(&sandbox, "optimizeFor { } pkgs.rustcrate", &conf);
    let optimised = run_program(&out.join("bin/rustcrate"));
    assert!(plain.contains("crate_config=true") && optimised.contains("crate_config=true"), "{plain}\n{optimised}");
    assert!(plain.contains("avx2=false"), "{plain}");
    if host.has("avx2") {
        assert!(optimised.contains("avx2=true"), "{optimised}");
    }
    let commands = fs::read_to_string(out.join("nix-support/cc-commands")).unwrap();
    assert!(commands.contains(&format!("--cfg crate_config -C target-cpu={target_cpu}")), "{commands}");
    let applied = eval(&sandbox, "(optimizeFor { } pkgs.rustcrate).passthru.nixTier.applied");
    assert_mentions(&applied, &["rust-target-cpu"], "applied");
}

#[test]
fn rust_with_rustflags_of_its_own_gets_them_appended() {
    let sandbox = NixSandbox::with_plugin("");
    let host = Host::of(&sandbox);
    let target_cpu = host.profile["cpu"]["rustTargetCpu"].as_str().expect("cpu.rustTargetCpu");
    let features = host.system_features();
    let out = build(&sandbox, "optimizeFor { } pkgs.rusty", &["--option", "system-features", &features]);
    let seen = seen_env(&out);
    assert_eq!(seen["RUSTFLAGS"], format!("-C debuginfo=0 -C target-cpu={target_cpu}"));
    assert!(!seen.contains_key("NIX_RUSTFLAGS"), "{seen:?}");
}

#[test]
fn go_gets_goamd64_in_env() {
    let sandbox = NixSandbox::with_plugin("");
    let host = Host::of(&sandbox);
    let features = host.system_features();
    let out = build(&sandbox, "optimizeFor { } pkgs.gopkg", &["--option", "system-features", &features]);
    let seen = seen_env(&out);
    assert_eq!(seen["GOOS"], "linux", "{seen:?}");
    match host.profile["cpu"]["goamd64"].as_str() {
        Some(level) => {
            assert_eq!(seen["GOAMD64"], level, "{seen:?}");
            let applied = eval(&sandbox, "(optimizeFor { } pkgs.gopkg).passthru.nixTier.applied");
            assert_mentions(&applied, &["goamd64"], "applied");
        }
        None => assert!(!seen.contains_key("GOAMD64"), "GOAMD64 set off x86-64: {seen:?}"),
    }
    let env = drv_env(&instantiate(&sandbox, "optimizeFor { } pkgs.gopkg"));
    assert!(!env.contains_key("vendorHash"), "vendorHash = null stays out (__ignoreNulls)");
}

#[test]
fn a_derivation_without_a_compiler_is_left_alone_and_says_why() {
    let sandbox = NixSandbox::with_plugin("");
    let v = eval(
        &sandbox,
        "let r = optimizeFor { optLevel = 3; lto = true; } pkgs.rustc; n = r.passthru.nixTier; in {
           same = r.outPath == pkgs.rustc.outPath;
           inherit (n) applied skipped;
         }",
    );
    assert_eq!(v["same"], true, "nothing is compiled, so nothing may change: {v}");
    assert_eq!(v["applied"], serde_json::json!([]), "{v}");
    assert!(v["skipped"]["cpu-flags"].as_str().unwrap().contains("without a C compiler"), "{v}");
}

#[test]
fn cpython_switches_and_self() {
    let sandbox = NixSandbox::with_plugin("");
    let body = "optimizeFor { pgo = true; lto = true; } pkgs.python-like";
    let v = eval(
        &sandbox,
        &format!(
            "let r = {body}; n = r.passthru.nixTier; in {{
               inherit (r) configureFlags; inherit (n) applied alreadyOn skipped;
               override = r ? override;
               withPackages = (r.withPackages (ps: [ ])).interpreter.drvPath == r.drvPath;
               pkgs = r.pkgs.python.drvPath == r.drvPath;
             }}"
        ),
    );
    assert_eq!(v["configureFlags"], serde_json::json!(["--enable-optimizations", "--with-lto"]));
    assert_eq!(v["alreadyOn"], serde_json::json!(["lto (enableLTO is already true)"]), "{v}");
    assert_mentions(&v["applied"], &["pgo"], "applied");
    assert!(!v["applied"].to_string().contains("\"lto\""), "lto is not applied, it was on: {v}");
    assert_eq!(v["override"], true, "the result lost override");
    assert_eq!(v["withPackages"], true, "withPackages uses the original interpreter: {v}");
    assert_eq!(v["pkgs"], true, "pkgs uses the original interpreter: {v}");
    let seen = drv_env(&instantiate(&sandbox, body));
    assert_eq!(binding(&seen, "configureFlags"), "--enable-optimizations --with-lto");

    // Not asked: the switches stay as they were.
    let env = drv_env(&instantiate(&sandbox, "optimizeFor { } pkgs.python-like"));
    assert_eq!(binding(&env, "configureFlags"), "--with-lto");

    // A package without the switches: nothing to override, and the result says so.
    let skipped = eval(&sandbox, "(optimizeFor { pgo = true; lto = true; } pkgs.vecsum).passthru.nixTier.skipped");
    assert_mentions(&skipped, &["enableOptimizations"], "skipped");
    assert_mentions(&skipped, &["enableLTO"], "skipped");

    // gcc's enableLTO is a feature of the compiler it builds, not an optimisation of gcc.
    let v = eval(
        &sandbox,
        "let r = optimizeFor { lto = true; } (pkgs.gcc-like.override { enableLTO = false; }); in {
           inherit (r) configureFlags; inherit (r.passthru.nixTier) skipped;
         }",
    );
    assert_eq!(v["configureFlags"], serde_json::json!([]), "{v}");
    assert!(v["skipped"]["lto"].as_str().unwrap().contains("is a compiler"), "{v}");
}

#[test]
fn tier_and_cores_stay_out_of_the_derivation() {
    let sandbox = NixSandbox::with_plugin("");
    let host = Host::of(&sandbox);
    // big-parallel: the heavy tier (the default rules name no fixture package), as the hook will
    // decide it; the derivation does not carry it.
    let env = drv_env(&instantiate(&sandbox, "optimizeFor { } pkgs.bigpkg"));
    assert_untiered(&env);
    assert!(words(binding(&env, "requiredSystemFeatures")).contains(&"big-parallel"), "big-parallel dropped");
    assert_requires_arch(&host, &env);
    let n = eval(&sandbox, "let n = (optimizeFor { } pkgs.bigpkg).passthru.nixTier; in { inherit (n) tier cores; }");
    assert_eq!(n["tier"], "heavy");
    assert_eq!(n["cores"].to_string(), host.cores("heavy"));

    // Opting in: an explicit tier marks the derivation for the hook, pinCores writes the cores.
    let env = drv_env(&instantiate(&sandbox, r#"optimizeFor { tier = "medium"; } pkgs.vecsum"#));
    assert_eq!(binding(&env, "NIX_TIER"), "medium");
    assert!(!env.contains_key("NIX_BUILD_CORES"));
    let env = drv_env(&instantiate(&sandbox, r#"optimizeFor { tier = "medium"; pinCores = true; } pkgs.vecsum"#));
    assert_eq!(binding(&env, "NIX_BUILD_CORES"), host.cores("medium"));
}

#[test]
fn out_paths_do_not_depend_on_tiers_rules_or_threads() {
    let sandbox = NixSandbox::with_plugin("");
    let v = eval(
        &sandbox,
        r#"let
             at = p: map (d: (optimizeFor { profile = p; optLevel = 3; } d).outPath) [ pkgs.vecsum pkgs.bigpkg pkgs.python-like ];
             b = profile.build;
             other = profile // {
               cpu = profile.cpu // { threads = profile.cpu.threads * 4; physicalCores = profile.cpu.physicalCores * 4; };
               build = b // {
                 defaultTier = "medium";
                 rules = [ { match = "vecsum"; tier = "heavy"; } { match = "python3*"; tier = "light"; } ];
                 tiers = b.tiers // { heavy = b.tiers.heavy // { cores = 1; }; light = b.tiers.light // { cores = 1; }; };
               };
             };
           in {
             same = at profile == at other;
             tiers = map (d: (optimizeFor { profile = other; } d).passthru.nixTier.tier) [ pkgs.vecsum pkgs.python-like ];
           }"#,
    );
    assert_eq!(v["same"], true, "{v}");
    assert_eq!(v["tiers"], serde_json::json!(["heavy", "light"]), "the rules did apply: {v}");
}

#[test]
fn risky_levels_build_or_warn() {
    let sandbox = NixSandbox::with_plugin("");
    let host = Host::of(&sandbox);
    let features = host.system_features();
    let conf = ["--option", "system-features", features.as_str()];
    // -O0 after fortify hardening: glibc ignores _FORTIFY_SOURCE without optimisation (with a
    // #warning, fatal under -Werror, in the glibc versions that warn; Debian bookworm's 2.36
    // does not, so the failure itself cannot be shown here). optimizeFor disables fortify.
    let expr = with_pkgs("optimizeFor { optLevel = 0; } pkgs.strict");
    let out = sandbox.command("nix-build").args(["--no-out-link"]).args(conf).args(["--expr", &expr]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("optLevel = 0 disables the fortify hardening"), "{}", stderr(&out));
    let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let commands = fs::read_to_string(path.join("nix-support/cc-commands")).unwrap();
    assert!(!commands.contains("_FORTIFY_SOURCE") && commands.trim_end().ends_with("-O0"), "{commands}");

    let err = sandbox.eval_with(&with_pkgs(r#"(optimizeFor { optLevel = "fast"; } pkgs.vecsum).drvPath"#), &[]);
    assert!(err.status.success(), "{}", stderr(&err));
    assert!(stderr(&err).contains("IEEE"), "no warning for -Ofast: {}", stderr(&err));
}

#[test]
fn missing_system_features_are_named_once_with_the_line_to_add() {
    let sandbox = NixSandbox::with_plugin("");
    let host = Host::of(&sandbox);
    let expr = with_pkgs("[ (optimizeFor { } pkgs.vecsum).drvPath (optimizeFor { } pkgs.hello).drvPath ]");
    let out = sandbox.eval_with(&expr, &["--option", "system-features", "big-parallel"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let line = format!("extra-system-features = gccarch-{}", host.gcc_arch());
    assert_eq!(stderr(&out).matches(&line).count(), 1, "{}", stderr(&out));
    let features = host.system_features();
    let out = sandbox.eval_with(&expr, &["--option", "system-features", &features]);
    assert!(!stderr(&out).contains("extra-system-features"), "{}", stderr(&out));
}

#[test]
fn passthru_records_what_was_done() {
    let sandbox = NixSandbox::with_plugin("");
    let host = Host::of(&sandbox);
    let v = eval(
        &sandbox,
        "let r = optimizeFor { optLevel = 3; } pkgs.vecsum; n = r.passthru.nixTier; in {
           inherit (n) target tier cores applied skipped alreadyOn;
           original = n.original.drvPath == pkgs.vecsum.drvPath;
           keepsOwnPassthru = r.passthru ? nixTier && r ? overrideAttrs && r ? override;
         }",
    );
    assert_eq!(v["target"], host.microarchitecture());
    let tier = v["tier"].as_str().expect("tier");
    assert_eq!(tier, default_tier(&sandbox, "vecsum"));
    assert_eq!(v["cores"].to_string(), host.cores(tier));
    assert_mentions(&v["applied"], &["march"], "applied");
    assert!(v["skipped"].is_object(), "skipped is adaptation → reason: {}", v["skipped"]);
    assert_eq!(v["original"], true, "original is not the derivation before");
    assert_eq!(v["keepsOwnPassthru"], true);
}

#[test]
fn opted_out_packages_keep_their_flags() {
    let sandbox = NixSandbox::with_plugin("");
    let host = Host::of(&sandbox);
    let env = drv_env(&instantiate(&sandbox, "optimizeFor { optLevel = 3; } pkgs.gsl"));
    assert_eq!(binding(&env, "NIX_CFLAGS_COMPILE"), "-DGSL_FIXTURE", "gsl is on the default opt-out list");
    assert!(!env.contains_key("NIX_CFLAGS_COMPILE_BEFORE"));
    let n = eval(
        &sandbox,
        "let n = (optimizeFor { optLevel = 3; } pkgs.gsl).passthru.nixTier; in { inherit (n) applied skipped; }",
    );
    assert!(!n["applied"].to_string().contains("march"), "applied: {}", n["applied"]);
    assert_mentions(&n["skipped"], &["opted out"], "skipped");

    // Merged over the defaults: re-enabling gsl optimises it, and opting out another works.
    let env = drv_env(&instantiate(&sandbox, "optimizeFor { optLevel = 3; optOut = { gsl = false; }; } pkgs.gsl"));
    assert_cpu_flags(&host, &env, "-DGSL_FIXTURE", Some("3"));
    let env = drv_env(&instantiate(&sandbox, "optimizeFor { optOut = { vecsum = true; }; } pkgs.vecsum"));
    assert_eq!(binding(&env, "NIX_CFLAGS_COMPILE"), "-O3 -DVECSUM_FIXTURE");
    assert!(!env.contains_key("NIX_CFLAGS_COMPILE_BEFORE"));
}

#[test]
fn applying_twice_equals_applying_once_with_the_last_options() {
    let sandbox = NixSandbox::with_plugin("");
    let v = eval(
        &sandbox,
        r#"let o = { optLevel = 3; }; once = optimizeFor o pkgs.vecsum; in {
             same = (optimizeFor o once).drvPath == once.drvPath;
             last = (optimizeFor o (optimizeFor { optLevel = 2; tier = "light"; lto = true; } pkgs.vecsum)).drvPath == once.drvPath;
             lastPython = (optimizeFor { } (optimizeFor { pgo = true; } pkgs.python-like)).drvPath
               == (optimizeFor { } pkgs.python-like).drvPath;
             original = (optimizeFor o once).passthru.nixTier.original.drvPath == pkgs.vecsum.drvPath;
           }"#,
    );
    assert_eq!(
        v,
        serde_json::json!({ "same": true, "last": true, "lastPython": true, "original": true })
    );
}

#[test]
fn a_profile_is_accepted_as_the_options() {
    let sandbox = NixSandbox::with_plugin("");
    let v = eval(
        &sandbox,
        "let d = (optimizeFor { } pkgs.vecsum).drvPath; in {
           bare = (optimizeFor profile pkgs.vecsum).drvPath == d;
           wrapped = (optimizeFor { inherit profile; } pkgs.vecsum).drvPath == d;
         }",
    );
    assert_eq!(v, serde_json::json!({ "bare": true, "wrapped": true }));
}

#[test]
fn target_names_are_archspec_names_with_dashes_accepted() {
    let sandbox = NixSandbox::with_plugin("");
    let host = Host::of(&sandbox);
    if !host.is_x86_64() {
        eprintln!("skipped: x86-64 levels need an x86-64 host");
        return;
    }
    let v = eval(
        &sandbox,
        r#"let a = optimizeFor { target = "x86_64_v3"; forAnotherMachine = true; } pkgs.vecsum;
               b = optimizeFor { target = "x86-64-v3"; forAnotherMachine = true; } pkgs.vecsum; in {
             same = a.drvPath == b.drvPath;
             target = b.passthru.nixTier.target;
           }"#,
    );
    assert_eq!(v, serde_json::json!({ "same": true, "target": "x86_64_v3" }));
    let env = drv_env(&instantiate(
        &sandbox,
        r#"optimizeFor { target = "x86-64-v3"; forAnotherMachine = true; } pkgs.vecsum"#,
    ));
    let flags = binding(&env, "NIX_CFLAGS_COMPILE_BEFORE");
    // archspec spells it -march=x86-64-v3 for gcc >= 11.1, and with a -m list before.
    let major: u32 = host_gcc_version().split('.').next().unwrap().parse().unwrap();
    if major >= 12 {
        assert!(words(flags).contains(&"-march=x86-64-v3"), "{flags}");
    } else {
        assert!(flags.contains("-march=x86-64"), "{flags}");
    }
    let features = binding(&env, "requiredSystemFeatures");
    assert!(words(features).contains(&"gccarch-x86-64-v3"), "{features}");
}

// ---------------------------------------------------------------------------------------------
// End to end: the optimised program uses the wider vectors the host allows
// ---------------------------------------------------------------------------------------------

fn disassemble(binary: &Path) -> String {
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(binary)
        .output()
        .expect("run objdump");
    assert!(out.status.success(), "objdump failed: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_program(binary: &Path) -> String {
    let out = Command::new(binary)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
    assert!(out.status.success(), "{} failed: {}", binary.display(), stderr(&out));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn optimised_build_uses_the_host_vector_width() {
    let sandbox = NixSandbox::with_plugin("");
    let host = Host::of(&sandbox);
    let features = host.system_features();
    let conf = ["--option", "system-features", features.as_str()];

    let plain = build(&sandbox, "pkgs.vecsum", &conf);
    let optimised = build(&sandbox, "optimizeFor { optLevel = 3; } pkgs.vecsum", &conf);
    assert_ne!(plain, optimised);

    // The flags reached the compiler, before the command's own arguments.
    let commands = fs::read_to_string(optimised.join("nix-support/cc-commands")).unwrap();
    assert!(commands.contains(&format!("-U_FORTIFY_SOURCE -march={}", host.gcc_arch())), "{commands}");

    let plain_out = run_program(&plain.join("bin/vecsum"));
    let optimised_out = run_program(&optimised.join("bin/vecsum"));
    assert_eq!(
        plain_out, optimised_out,
        "the optimised program computes something else"
    );
    assert!(plain_out.starts_with("vecsum checksum "), "{plain_out}");

    if !host.is_x86_64() {
        eprintln!("skipped the machine-code check: it knows x86-64 vector registers only");
        return;
    }
    if !host.has("avx2") {
        eprintln!("skipped the machine-code check: this host has no avx2 (only SSE vectors), so both builds use xmm");
        return;
    }
    // The same program with structured attributes: the flags must reach its compiler too.
    let structured = build(&sandbox, "optimizeFor { optLevel = 3; } pkgs.structured", &conf);
    let plain_asm = disassemble(&plain.join("bin/vecsum"));
    let optimised_asm = disassemble(&optimised.join("bin/vecsum"));
    let structured_asm = disassemble(&structured.join("bin/structured"));
    assert!(plain_asm.contains("%xmm"), "the plain build did not vectorise at all");
    assert!(!uses_avx(&plain_asm), "the plain build already uses AVX instructions");
    assert!(uses_avx(&optimised_asm), "the optimised build uses no AVX instructions though the host has avx2");
    assert!(uses_avx(&structured_asm), "the structured-attrs build uses no AVX instructions");
    // 256-bit vectors only where gcc's tuning for this CPU picks them: for znver1 it prefers
    // 128-bit ones (AVX128_OPTIMAL), so the builds must do what gcc does with the same flags.
    let wide = gcc_widens_to_256_bits(&host);
    for (build, asm) in [("optimised", &optimised_asm), ("structured-attrs", &structured_asm)] {
        assert_eq!(
            asm.contains("%ymm"),
            wide,
            "the {build} build's use of 256-bit vectors differs from gcc -O3 -march={} here",
            host.gcc_arch()
        );
    }
}

/// Whether a disassembly has VEX-encoded (AVX) vector instructions: `v`-prefixed mnemonics on
/// xmm or ymm registers, which baseline x86-64 code never has.
fn uses_avx(asm: &str) -> bool {
    asm.lines().any(|line| {
        // objdump: "  addr:\tmnemonic operands"
        let instruction = line.split_once('\t').map_or("", |(_, rest)| rest);
        let (mnemonic, operands) = instruction.split_once(' ').unwrap_or((instruction, ""));
        mnemonic.starts_with('v') && (operands.contains("%xmm") || operands.contains("%ymm"))
    })
}

/// Whether the host's gcc, given the host's `-march`/`-mtune` at `-O3`, vectorises the vecsum
/// fixture with 256-bit registers.
fn gcc_widens_to_256_bits(host: &Host) -> bool {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/vecsum/vecsum.c");
    let mut gcc = Command::new("gcc");
    gcc.args(["-DVECSUM_FIXTURE", "-O3", "-S", "-o", "-"])
        .arg(format!("-march={}", host.gcc_arch()));
    if let Some(tune) = host.gcc_tune() {
        gcc.arg(format!("-mtune={tune}"));
    }
    let out = gcc.arg(&source).output().expect("run gcc");
    assert!(out.status.success(), "gcc -S {} failed: {}", source.display(), stderr(&out));
    String::from_utf8_lossy(&out.stdout).contains("%ymm")
}

#[test]
fn a_build_for_another_machine_is_refused_here() {
    let sandbox = NixSandbox::with_plugin("");
    let host = Host::of(&sandbox);
    let Some((target, _, march)) = unrunnable_target(&host) else {
        eprintln!("skipped: this host can run every candidate target");
        return;
    };
    let features = host.system_features();
    let expr = with_pkgs(&format!(
        "optimizeFor {{ target = \"{target}\"; forAnotherMachine = true; }} pkgs.vecsum"
    ));
    let out = sandbox
        .command("nix-build")
        .args([
            "--no-out-link",
            "--option",
            "system-features",
            &features,
            "--expr",
            &expr,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "built for {target} on a host that cannot run it");
    let feature = gccarch_feature(target, march);
    assert!(stderr(&out).contains(&feature), "{feature}: {}", stderr(&out));
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Nix 2.8 prints the position of an `--expr` call as `at «string»:LINE:COLUMN:`, the column
/// being where the application starts; `with_pkgs` puts the body at line 2, column 3, so this is
/// where an unparenthesised `optimizeFor …` body is.
const CALL_SITE: &str = "«string»:2:3";

#[test]
fn a_non_derivation_is_a_positioned_error() {
    let sandbox = NixSandbox::with_plugin("");
    let err = eval_error(&sandbox, "optimizeFor { } 42");
    assert!(err.contains("derivation"), "{err}");
    assert!(err.contains(CALL_SITE), "not positioned at the call: {err}");
    let err = eval_error(&sandbox, "optimizeFor { } { name = \"not-a-drv\"; }");
    assert!(err.contains("derivation"), "{err}");
}

#[test]
fn bad_options_are_named() {
    let sandbox = NixSandbox::with_plugin("");
    let err = eval_error(&sandbox, "optimizeFor { optlevel = 3; } pkgs.vecsum");
    assert!(err.contains("optlevel"), "unknown option not named: {err}");
    assert!(err.contains(CALL_SITE), "not positioned at the call: {err}");

    let err = eval_error(&sandbox, "(optimizeFor { lto = \"yes\"; } pkgs.vecsum).drvPath");
    assert!(
        err.contains("lto") && err.to_lowercase().contains("bool"),
        "wrong type not explained: {err}"
    );

    let err = eval_error(&sandbox, "(optimizeFor { optLevel = 4; } pkgs.vecsum).drvPath");
    assert!(err.contains("optLevel"), "{err}");

    let err = eval_error(&sandbox, "(optimizeFor { tier = \"huge\"; } pkgs.vecsum).drvPath");
    assert!(err.contains("huge") && err.contains("heavy"), "{err}");

    let err = eval_error(&sandbox, "(optimizeFor 42 pkgs.vecsum).drvPath");
    assert!(err.contains("attribute set") || err.contains("options"), "{err}");
}

#[test]
fn an_unknown_microarchitecture_is_named() {
    let sandbox = NixSandbox::with_plugin("");
    let err = eval_error(&sandbox, "optimizeFor { target = \"pentium9000\"; } pkgs.vecsum");
    assert!(err.contains("pentium9000"), "{err}");
    assert!(err.contains(CALL_SITE), "not positioned at the call: {err}");
}

/// The system feature a build for `target` requires: gccarch-<gcc -march name>.
fn gccarch_feature(target: &str, march: Option<&str>) -> String {
    format!("gccarch-{}", march.map_or(target, |m| m.trim_start_matches("-march=")))
}

/// Targets the host may lack, each with features it requires that tell it apart and the `-march`
/// archspec spells for gcc: the first whose features the host lacks, with the missing ones.
fn unrunnable_target(host: &Host) -> Option<(&'static str, Vec<&'static str>, Option<&'static str>)> {
    let candidates: &[(&str, &[&str], Option<&str>)] = if host.is_x86_64() {
        &[
            ("haswell", &["avx2", "fma", "bmi2"], Some("-march=haswell")),
            (
                "skylake_avx512",
                &["avx512f", "avx512bw", "avx512vl"],
                Some("-march=skylake-avx512"),
            ),
            (
                "sapphirerapids",
                &["amx_tile", "amx_bf16", "amx_int8", "waitpkg", "serialize"],
                Some("-march=sapphirerapids"),
            ),
            ("zen", &["sse4a", "clzero"], Some("-march=znver1")),
        ]
    } else {
        &[
            ("a64fx", &["sve"], None),
            ("neoverse_v2", &["sve2", "i8mm", "bf16"], None),
        ]
    };
    candidates.iter().find_map(|(target, features, march)| {
        let missing: Vec<_> = features.iter().copied().filter(|f| !host.has(f)).collect();
        (!missing.is_empty()).then_some((*target, missing, *march))
    })
}

#[test]
fn a_target_the_host_cannot_run_needs_for_another_machine() {
    let sandbox = NixSandbox::with_plugin("");
    let host = Host::of(&sandbox);
    let Some((target, missing, march)) = unrunnable_target(&host) else {
        eprintln!("skipped: this host can run every candidate target");
        return;
    };
    let err = eval_error(
        &sandbox,
        &format!("(optimizeFor {{ target = \"{target}\"; }} pkgs.vecsum).drvPath"),
    );
    assert!(err.contains(target), "target not named: {err}");
    for feature in &missing {
        assert!(err.contains(feature), "missing feature {feature} not named: {err}");
    }
    assert!(err.contains("forAnotherMachine"), "the way out is not named: {err}");

    let body = format!("optimizeFor {{ target = \"{target}\"; forAnotherMachine = true; }} pkgs.vecsum");
    let env = drv_env(&instantiate(&sandbox, &body));
    let flags = binding(&env, "NIX_CFLAGS_COMPILE_BEFORE");
    if let Some(march) = march {
        assert!(words(flags).contains(&march), "{march} not in {flags:?}");
    }
    let features = binding(&env, "requiredSystemFeatures");
    assert!(
        words(features).contains(&gccarch_feature(target, march).as_str()),
        "{features}"
    );
}

// ---------------------------------------------------------------------------------------------
// Flags spelled for the compiler version of the package's stdenv (archspec's per-compiler table)
// ---------------------------------------------------------------------------------------------

/// As `with_pkgs`, but with the fixture's `stdenv.cc.version` set to `gcc_version` instead of the
/// host gcc's: the .drv is only instantiated, never built, so the version need not exist here.
fn with_pkgs_gcc(gcc_version: &str, body: &str) -> String {
    let dir = fixture_dir();
    let dir = dir.to_str().expect("fixture path is UTF-8");
    assert!(
        !dir.contains(char::is_whitespace),
        "fixture path {dir:?} cannot be a Nix path literal"
    );
    format!(
        "let pkgs = import {dir} {{ gccVersion = \"{gcc_version}\"; rustToolchain = \"{rust}\"; }}; inherit (pkgs) lib; \
         profile = builtins.hardwareProfile; optimizeFor = builtins.optimizeFor; in\n  {body}",
        rust = rust_toolchain()
    )
}

/// As `instantiate`, with the fixture's gcc at `gcc_version`.
fn instantiate_gcc(sandbox: &NixSandbox, gcc_version: &str, body: &str) -> PathBuf {
    let expr = with_pkgs_gcc(gcc_version, body);
    let out = sandbox
        .command("nix-instantiate")
        .args(["--expr", &expr])
        .output()
        .expect("run nix-instantiate");
    assert!(
        out.status.success(),
        "instantiating {body} with gcc {gcc_version} failed:\n{}",
        stderr(&out)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let path = PathBuf::from(text.lines().last().expect("nix-instantiate printed a path").trim());
    assert!(path.is_file(), "{} is not a file", path.display());
    path
}

/// `forAnotherMachine = true;` when the host lacks one of `features` (as /proc/cpuinfo spells
/// them), else nothing: the option must not be needed for a target the host runs.
fn for_another_machine_unless(host: &Host, features: &[&str]) -> &'static str {
    if features.iter().all(|f| host.has(f)) {
        ""
    } else {
        "forAnotherMachine = true;"
    }
}

/// The features archspec's x86_64_v3 adds to v2 (cpuinfo spelling: `abm` is lzcnt, `bmi1` bmi).
const X86_64_V3_FEATURES: &[&str] = &[
    "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave", "sse4_2", "popcnt",
];

#[test]
fn x86_64_v3_is_spelled_per_gcc_version() {
    let sandbox = NixSandbox::with_plugin("");
    let host = Host::of(&sandbox);
    if !host.is_x86_64() {
        eprintln!("skipped: x86-64 levels need an x86-64 host");
        return;
    }
    let body = format!(
        "optimizeFor {{ target = \"x86_64_v3\"; {} }} pkgs.vecsum",
        for_another_machine_unless(&host, X86_64_V3_FEATURES)
    );

    // gcc 10 predates -march=x86-64-v3 (GCC 11.1): archspec spells the level as the baseline
    // -march=x86-64 plus one -m flag per feature, before the command's own arguments.
    let env = drv_env(&instantiate_gcc(&sandbox, "10.2.0", &body));
    assert_eq!(binding(&env, "NIX_CFLAGS_COMPILE"), "-O3 -DVECSUM_FIXTURE", "package flags untouched");
    let flags = binding(&env, "NIX_CFLAGS_COMPILE_BEFORE");
    let w = words(flags);
    assert!(w.contains(&"-march=x86-64"), "{flags}");
    for feature in ["-mavx", "-mavx2", "-mfma", "-mbmi", "-mbmi2", "-mf16c", "-mmovbe", "-msse4.2"] {
        assert!(w.contains(&feature), "{feature} missing for gcc 10: {flags}");
    }
    assert!(
        !w.iter().any(|f| f.starts_with("-march=x86-64-v")),
        "gcc 10 cannot take -march=x86-64-v3: {flags}"
    );
    // nixpkgs' feature name follows gcc.arch, whatever this compiler version spells.
    let features = binding(&env, "requiredSystemFeatures");
    assert!(words(features).contains(&"gccarch-x86-64-v3"), "{features}");

    // gcc 12 knows the level by name: no feature list.
    let env = drv_env(&instantiate_gcc(&sandbox, "12.2.0", &body));
    let flags = binding(&env, "NIX_CFLAGS_COMPILE_BEFORE");
    let w = words(flags);
    assert!(w.contains(&"-march=x86-64-v3"), "{flags}");
    assert!(!w.contains(&"-march=x86-64"), "{flags}");
    assert!(!w.contains(&"-mavx2"), "gcc 12 needs no feature list: {flags}");
    let features = binding(&env, "requiredSystemFeatures");
    assert!(words(features).contains(&"gccarch-x86-64-v3"), "{features}");
}

#[test]
fn a_compiler_too_old_for_the_target_gets_no_march() {
    let sandbox = NixSandbox::with_plugin("");
    let host = Host::of(&sandbox);
    if !host.is_x86_64() {
        eprintln!("skipped: skylake is an x86-64 target");
        return;
    }
    // archspec's skylake entries start at gcc 6.0.
    let skylake = ["avx2", "fma", "bmi2", "adx", "rdseed", "clflushopt", "xsavec"];
    let body = format!(
        "optimizeFor {{ target = \"skylake\"; {} }} pkgs.vecsum",
        for_another_machine_unless(&host, &skylake)
    );
    let env = drv_env(&instantiate_gcc(&sandbox, "4.1", &body));
    assert_eq!(
        binding(&env, "NIX_CFLAGS_COMPILE"),
        "-O3 -DVECSUM_FIXTURE",
        "no CPU flags for a gcc that cannot target skylake"
    );
    assert!(!env.contains_key("NIX_CFLAGS_COMPILE_BEFORE"));
    let features = env.get("requiredSystemFeatures").map(String::as_str).unwrap_or("");
    assert!(
        !words(features).iter().any(|f| f.starts_with("gccarch-")),
        "no gccarch- feature without -march: {features:?}"
    );
    assert_untiered(&env);

    let n = sandbox.eval_json(&with_pkgs_gcc(
        "4.1",
        &format!("let n = ({body}).passthru.nixTier; in {{ inherit (n) applied skipped; }}"),
    ));
    let reason = n["skipped"]["march"]
        .as_str()
        .unwrap_or_else(|| panic!("skipped.march missing: {}", n["skipped"]));
    for word in ["gcc", "4.1", "cannot", "skylake"] {
        assert!(reason.contains(word), "skipped.march does not say {word:?}: {reason}");
    }
    assert!(
        !n["applied"].to_string().contains("march"),
        "applied: {}",
        n["applied"]
    );
}

// ---------------------------------------------------------------------------------------------
// The home-manager module, plugin only (no hook): its nix.conf lets the optimised builds run
// ---------------------------------------------------------------------------------------------

fn repo_file(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative);
    fs::canonicalize(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).display().to_string()
}

#[test]
fn a_plugin_only_home_manager_configuration_builds_optimised_derivations() {
    let scratch = NixSandbox::with_conf("");
    // The module's nix.settings (stub module system and packages of nix/testing), rendered as
    // home-manager renders them; the stub plugin package is replaced by the real plugin.
    let expr = format!(
        r#"let
             lib = import {lib};
             pkgs = import {stub} {{ nixVersion = "2.8.0"; }};
             e = import {eval} {{
               module = {module}; inherit pkgs; fixtures = import {fixtures};
               definitions = [ {{ programs.nix-tier = {{ enable = true; profile = "{profile}"; }}; }} {{ nix.package = pkgs.nix; }} ];
             }};
           in lib.renderNixConf (e.config.nix.settings // {{ plugin-files = [ "{plugin}" ]; }})"#,
        lib = repo_file("nix/lib.nix"),
        stub = repo_file("nix/testing/stub-pkgs.nix"),
        eval = repo_file("nix/testing/eval-module.nix"),
        module = repo_file("nix/home-manager-module.nix"),
        fixtures = repo_file("nix/testing/home-manager.nix"),
        profile = repo_file("nix/examples/skylake.json"),
        plugin = nix_tier_tests::plugin_path().display(),
    );
    // The module copies the profile to the (scratch) store.
    let out = scratch.eval_with(&expr, &["--read-write-mode"]);
    assert!(out.status.success(), "evaluating the module's nix.conf failed:\n{}", stderr(&out));
    let conf: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let conf = conf.as_str().expect("nix.conf text").to_string();
    assert!(!conf.contains("build-hook"), "{conf}");
    assert!(conf.contains("extra-system-features = gccarch-skylake"), "{conf}");

    // The pinned profile is a skylake: optimizeFor builds for skylake and requires its feature.
    let sandbox = NixSandbox::with_conf(&conf);
    let out = build(&sandbox, "optimizeFor { } pkgs.vecsum", &[]);
    let commands = fs::read_to_string(out.join("nix-support/cc-commands")).unwrap();
    assert!(commands.contains("-march=skylake"), "{commands}");

    // Without the features line Nix refuses the build, and evaluation said which line to add.
    let without: String = conf.lines().filter(|l| !l.starts_with("extra-system-features")).map(|l| format!("{l}\n")).collect();
    let sandbox = NixSandbox::with_conf(&without);
    let expr = with_pkgs("optimizeFor { } pkgs.vecsum");
    let out = sandbox.command("nix-build").args(["--no-out-link", "--expr", &expr]).output().unwrap();
    assert!(!out.status.success(), "built without gccarch-skylake");
    let err = stderr(&out);
    assert!(err.contains("extra-system-features = gccarch-skylake") && err.contains("gccarch-skylake"), "{err}");
}
