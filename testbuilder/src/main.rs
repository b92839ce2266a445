//! `nix-tier-testbuilder`: the builder of nix-tier's test derivations.
//!
//! It stands in for a real build: it holds some memory for some time, records when it ran, and
//! writes its output. It is linked statically (pure Rust) so that it can run inside a chroot
//! store's build sandbox, where there is no `/bin/sh` and no dynamic loader.
//!
//! Everything comes from the environment (a derivation's attributes become its builder's
//! environment), so the derivation needs no `args`. With structured attributes
//! (`__structuredAttrs = true`) Nix puts them in `.attrs.json` instead, and the builder does
//! what nixpkgs' `pkgs/stdenv/generic/setup.sh` does with them: it exports the members of the
//! `env` attribute and each output's path under its name, and nothing else (its `name` is the
//! top-level attribute, a shell variable of stdenv's build script).
//!
//! | variable | meaning |
//! |---|---|
//! | `out` | output path (set by Nix); gets a file holding `<name>\n` and one line per dependency |
//! | `name` | the derivation's name (set by Nix) |
//! | `TB_SLEEP_MS` | how long to run, in milliseconds (default 0) |
//! | `TB_RAMP_MS` | how long to wait before allocating, in milliseconds, as a build that grows after it starts (default 0; not counted in `TB_SLEEP_MS`) |
//! | `TB_MEM_MIB` | memory to allocate and hold while running, in MiB; every page is written so it is resident (default 0) |
//! | `NIX_TIER` | the tier, only recorded (default `-`) |
//! | `TB_DEPS` | whitespace-separated paths that must exist (the outputs of dependencies); the build fails when one is missing |
//! | `RECORD_DIR` | optional directory outside the store where the run is recorded (see below) |
//! | `TB_FAIL` | when set to `1`, exit with status 1 after recording (for failure tests) |
//! | `TB_PLACEMENT_WAIT_MS` | with `RECORD_DIR`: wait up to this long, at start, to be placed in a `nix-tier` cgroup (default 0: do not wait) |
//! | `TB_CHILDREN` | with `RECORD_DIR`: at once, before anything else, start this many processes, each of which starts one of its own at once (as `make` starts compilers); see below (default 0) |
//! | `TB_WAIT_FOR` | a path: once its own memory is held, wait until it exists before its `TB_SLEEP_MS` (a test's go-ahead; the build fails after 60 s without it) |
//! | `TB_CHILD_RUNS` | once its own memory is held, run this many processes one after another, each holding `TB_CHILD_MEM_MIB` MiB for `TB_CHILD_MS` milliseconds (as `make` runs compilers), before its `TB_SLEEP_MS` (default 0) |
//!
//! With `RECORD_DIR` set, the builder
//! - creates `RECORD_DIR/started/<name>` at start, containing `<pid> <pgid> <start_unix_ms>\n`
//!   (tests watch it to know a build is running and whom to kill);
//! - at the end appends one line `<name> <start_unix_ms> <end_unix_ms> <tier> <memMiB>\n` to
//!   `RECORD_DIR/records`, with a single `write` on an `O_APPEND` descriptor, so concurrent
//!   builders never interleave lines;
//! - with `TB_PLACEMENT_WAIT_MS`, writes `RECORD_DIR/placed/<name>`: the microseconds from its
//!   start until `/proc/self/cgroup` first showed it in a `nix-tier` cgroup, or `never`;
//! - with `TB_CHILDREN`, each of the processes it started writes `RECORD_DIR/cgroups/<name>-<i>`
//!   (and its own child `<name>-<i>-1`) after `TB_SLEEP_MS / 2`: its `/proc/self/cgroup`. They
//!   last `TB_SLEEP_MS`, and the builder waits for them before it ends.
//!
//! Command-line arguments `--sleep-ms N` and `--mem-mib N` override the environment (handy by
//! hand); `--help` prints this summary.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PAGE: usize = 4096;

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

fn env_u64(name: &str) -> Result<u64, String> {
    match std::env::var(name) {
        Ok(v) if v.trim().is_empty() => Ok(0),
        Ok(v) => v.trim().parse().map_err(|_| format!("{name}={v:?} is not an unsigned integer")),
        Err(_) => Ok(0),
    }
}

/// The process group of this process, read from /proc (std has no getpgid).
fn pgid() -> String {
    fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // pid (comm) state ppid pgrp ...; comm may hold spaces, so split after the last ')'.
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().nth(2).map(str::to_string)
        })
        .unwrap_or_else(|| "?".to_string())
}

struct Config {
    name: String,
    sleep_ms: u64,
    ramp_ms: u64,
    mem_mib: u64,
    tier: String,
    deps: Vec<PathBuf>,
    record_dir: Option<PathBuf>,
    out: Option<PathBuf>,
    fail: bool,
    placement_wait_ms: u64,
    wait_for: Option<PathBuf>,
}

fn config() -> Result<Config, String> {
    let mut config = Config {
        name: std::env::var("name").unwrap_or_else(|_| "unnamed".to_string()),
        sleep_ms: env_u64("TB_SLEEP_MS")?,
        ramp_ms: env_u64("TB_RAMP_MS")?,
        mem_mib: env_u64("TB_MEM_MIB")?,
        tier: std::env::var("NIX_TIER").ok().filter(|t| !t.is_empty()).unwrap_or_else(|| "-".to_string()),
        deps: std::env::var("TB_DEPS")
            .unwrap_or_default()
            .split_whitespace()
            .map(PathBuf::from)
            .collect(),
        record_dir: std::env::var_os("RECORD_DIR").filter(|d| !d.is_empty()).map(PathBuf::from),
        out: std::env::var_os("out").map(PathBuf::from),
        fail: std::env::var("TB_FAIL").map(|v| v == "1").unwrap_or(false),
        placement_wait_ms: env_u64("TB_PLACEMENT_WAIT_MS")?,
        wait_for: std::env::var_os("TB_WAIT_FOR").filter(|p| !p.is_empty()).map(PathBuf::from),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |flag: &str| -> Result<u64, String> {
            let v = args.next().ok_or(format!("{flag} needs a value"))?;
            v.parse().map_err(|_| format!("{flag} {v:?}: not an unsigned integer"))
        };
        match arg.as_str() {
            "--sleep-ms" => config.sleep_ms = number("--sleep-ms")?,
            "--mem-mib" => config.mem_mib = number("--mem-mib")?,
            "--help" | "-h" => {
                println!("nix-tier-testbuilder: env out, name, TB_SLEEP_MS, TB_MEM_MIB, NIX_TIER, TB_DEPS, RECORD_DIR, TB_FAIL; args --sleep-ms N --mem-mib N");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(config)
}

fn append_line(path: &Path, line: &str) -> Result<(), String> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o666)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    // One write on an O_APPEND descriptor: atomic with respect to other appenders.
    let n = file.write(line.as_bytes()).map_err(|e| format!("write {}: {e}", path.display()))?;
    if n != line.len() {
        return Err(format!("short write to {}", path.display()));
    }
    Ok(())
}

/// How long after `started` this process was first seen in a `nix-tier` cgroup, polling
/// `/proc/self/cgroup` every 100 µs for up to `wait`; `None` if it never was.
fn placement_delay(started: Instant, wait: Duration) -> Option<Duration> {
    loop {
        let placed = fs::read_to_string("/proc/self/cgroup").is_ok_and(|text| text.contains("/nix-tier/"));
        if placed {
            return Some(started.elapsed());
        }
        if started.elapsed() > wait {
            return None;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Set in the processes a builder starts with `TB_CHILDREN`: their record's name.
const CHILD_LABEL: &str = "TB_CHILD_LABEL";
/// Set in the builder's grandchildren, which start no child.
const GRANDCHILD: &str = "TB_GRANDCHILD";
/// Set in the processes a builder runs one after another with `TB_CHILD_RUNS`.
const CHILD_RUN: &str = "TB_CHILD_RUN";

/// With structured attributes, exports what nixpkgs' stdenv exports of them: the members of
/// `env` and the outputs. The file is `NIX_ATTRS_JSON_FILE` where that exists (Nix 2.8 names
/// the build directory outside the sandbox), else `.attrs.json` in the build directory.
fn export_structured_attrs() -> Result<(), String> {
    let named = std::env::var_os("NIX_ATTRS_JSON_FILE").map(PathBuf::from).filter(|p| p.exists());
    let Some(file) = named.or_else(|| Some(PathBuf::from(".attrs.json")).filter(|p| p.exists())) else { return Ok(()) };
    let text = fs::read_to_string(&file).map_err(|e| format!("read {}: {e}", file.display()))?;
    let attrs: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let strings = |key: &str| attrs.get(key).and_then(|v| v.as_object()).into_iter().flatten().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())));
    for (name, value) in strings("env").chain(strings("outputs")) {
        std::env::set_var(name, value);
    }
    // A shell variable of stdenv's build script (which this builder stands for), not exported.
    if let Some(name) = attrs.get("name").and_then(|v| v.as_str()) {
        std::env::set_var("name", name);
    }
    Ok(())
}

/// Allocates `mib` MiB and writes every page, so that it is resident.
fn hold(mib: u64) -> Result<Vec<u8>, String> {
    let bytes = usize::try_from(mib).map_err(|_| "memory size too large")? * 1024 * 1024;
    let mut memory: Vec<u8> = Vec::new();
    memory.try_reserve_exact(bytes).map_err(|e| format!("allocating {mib} MiB: {e}"))?;
    memory.resize(bytes, 0);
    for i in (0..bytes).step_by(PAGE) {
        memory[i] = (i / PAGE) as u8 | 1;
    }
    Ok(std::hint::black_box(memory))
}

/// Starts a copy of this program as a child labelled `label`.
fn spawn_child(label: &str, grandchild: bool) -> Result<std::process::Child, String> {
    let mut command = std::process::Command::new("/proc/self/exe");
    command.env(CHILD_LABEL, label);
    if grandchild {
        command.env(GRANDCHILD, "1");
    }
    command.spawn().map_err(|e| format!("start child {label}: {e}"))
}

/// A process started with `TB_CHILDREN` (labelled `label`): starts its own child unless it is
/// a grandchild, records its cgroups after half the build's time, and lasts as long as the
/// build.
fn run_child(label: &str, config: &Config) -> Result<(), String> {
    let grandchild = if std::env::var_os(GRANDCHILD).is_none() { Some(spawn_child(&format!("{label}-1"), true)?) } else { None };
    let half = Duration::from_millis(config.sleep_ms / 2);
    std::thread::sleep(half);
    if let Some(dir) = &config.record_dir {
        let cgroups = dir.join("cgroups");
        fs::create_dir_all(&cgroups).map_err(|e| format!("create {}: {e}", cgroups.display()))?;
        let text = fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("read /proc/self/cgroup: {e}"))?;
        fs::write(cgroups.join(label), text).map_err(|e| format!("write {label}: {e}"))?;
    }
    std::thread::sleep(half);
    if let Some(mut child) = grandchild {
        child.wait().map_err(|e| format!("wait for {label}-1: {e}"))?;
    }
    Ok(())
}

fn run() -> Result<(), String> {
    let started = Instant::now();
    if std::env::var_os(CHILD_RUN).is_some() {
        let memory = hold(env_u64("TB_CHILD_MEM_MIB")?)?;
        std::thread::sleep(Duration::from_millis(env_u64("TB_CHILD_MS")?));
        drop(std::hint::black_box(memory));
        return Ok(());
    }
    export_structured_attrs()?;
    let config = config()?;
    if let Ok(label) = std::env::var(CHILD_LABEL) {
        return run_child(&label, &config);
    }
    let children = (0..env_u64("TB_CHILDREN")?).map(|i| spawn_child(&format!("{}-{i}", config.name), false)).collect::<Result<Vec<_>, _>>()?;
    let start = now_ms();

    if let Some(dir) = &config.record_dir {
        let started = dir.join("started");
        fs::create_dir_all(&started).map_err(|e| format!("create {}: {e}", started.display()))?;
        let marker = started.join(&config.name);
        fs::write(&marker, format!("{} {} {start}\n", std::process::id(), pgid()))
            .map_err(|e| format!("write {}: {e}", marker.display()))?;
    }

    if let (Some(dir), 1..) = (&config.record_dir, config.placement_wait_ms) {
        let placed = dir.join("placed");
        fs::create_dir_all(&placed).map_err(|e| format!("create {}: {e}", placed.display()))?;
        let delay = placement_delay(started, Duration::from_millis(config.placement_wait_ms));
        let text = delay.map_or_else(|| "never\n".to_string(), |d| format!("{}\n", d.as_micros()));
        fs::write(placed.join(&config.name), text).map_err(|e| format!("write placement: {e}"))?;
    }

    for dep in &config.deps {
        if !dep.exists() {
            return Err(format!("dependency {} does not exist", dep.display()));
        }
    }

    // A real build grows after it starts (a compiler reads its sources first).
    std::thread::sleep(Duration::from_millis(config.ramp_ms));

    // Hold the memory while sleeping.
    let memory = hold(config.mem_mib)?;
    let bytes = memory.len();

    for _ in 0..env_u64("TB_CHILD_RUNS")? {
        let status = std::process::Command::new("/proc/self/exe").env(CHILD_RUN, "1").status().map_err(|e| format!("run a child: {e}"))?;
        if !status.success() {
            return Err(format!("a child failed: {status}"));
        }
    }

    if let Some(go_ahead) = &config.wait_for {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !go_ahead.exists() {
            if Instant::now() > deadline {
                return Err(format!("TB_WAIT_FOR: {} did not appear within 60 s", go_ahead.display()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    std::thread::sleep(Duration::from_millis(config.sleep_ms));

    // Read the memory back so the allocation cannot be optimised away.
    let checksum = (0..bytes).step_by(PAGE).fold(0u8, |acc, i| acc ^ memory[i]);
    std::hint::black_box(checksum);
    drop(memory);

    for mut child in children {
        child.wait().map_err(|e| format!("wait for a child: {e}"))?;
    }

    if let Some(out) = &config.out {
        let mut text = format!("{}\n", config.name);
        for dep in &config.deps {
            text.push_str(&format!("{}\n", dep.display()));
        }
        fs::write(out, text).map_err(|e| format!("write {}: {e}", out.display()))?;
    }

    let end = now_ms();
    if let Some(dir) = &config.record_dir {
        append_line(
            &dir.join("records"),
            &format!("{} {start} {end} {} {}\n", config.name, config.tier, config.mem_mib),
        )?;
    }

    if config.fail {
        return Err("TB_FAIL=1: failing on purpose".to_string());
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nix-tier-testbuilder: {e}");
            ExitCode::FAILURE
        }
    }
}
