//! Running builds bounded by cgroups, recorded in the history database, and reservations
//! learned from it: real Nix through the hook (2.8, then 2.26 in `./scripts/test`'s second pass),
//! real cgroups (v1 on this machine), with Nix's
//! sandbox (`sandbox = true`, the Linux default) and without, under the machine's cgroup roots
//! and under a read-only (0555) root named by `NIX_TIER_CGROUP_ROOT`; and the order in which
//! waiting builds start. The cgroup tests run again
//! on cgroup v2, as NixOS has it, in a guest kernel ([`the_cgroup_tests_hold_on_cgroup_v2`]).

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix_tier_tests::hook_env::{
    broker_log, broker_pid, hook_sandbox, hook_sandbox_recording, kill_broker, peaks, process_gone, read_records, status_json, testbuilder,
    timeline, wait_for, wait_for_watcher_lock, Limits, NixDaemon, Running, TierLimits,
};
use nix_tier_tests::guest::Guest;
use nix_tier_tests::{binary, cgroups_present, child_cgroups, requires, stderr, Cgroups, NixSandbox, ReadOnlyCgroupRoot};
use serde_json::Value;

/// These tests measure memory and CPU: one at a time.
static MACHINE: Mutex<()> = Mutex::new(());

fn limits(medium: TierLimits) -> Limits {
    Limits {
        budget_mib: 2000,
        heavy: TierLimits { max_jobs: 1, cores: 2, memory_mib: 600 },
        medium,
        light: TierLimits { max_jobs: 4, cores: 1, memory_mib: 100 },
    }
}

/// A Nix expression of test-builder derivations: `builds` is a list of attribute sets with
/// `name`, `tier`, `mem` (MiB), `sleep` (ms), and optionally `ramp` (ms before allocating,
/// default 300), `salt` (to vary the .drv), `deps` (derivations built first) and `waitFor` (a
/// path whose existence lets it go on).
fn builds_expr(record_dir: &Path, builds: &str) -> String {
    format!(
        r#"map (b: derivation {{
             inherit (b) name; system = builtins.currentSystem; builder = "{}";
             NIX_TIER = b.tier; TB_MEM_MIB = toString b.mem; TB_SLEEP_MS = toString b.sleep;
             TB_RAMP_MS = toString (b.ramp or 300); RECORD_DIR = "{}"; SALT = b.salt or "";
             TB_DEPS = toString (b.deps or [ ]); TB_WAIT_FOR = b.waitFor or "";
           }}) [ {builds} ]"#,
        testbuilder().display(),
        record_dir.display()
    )
}

fn nix_build(sandbox: &NixSandbox, expr: &str) -> std::process::Output {
    nix_build_with(sandbox, expr, &[])
}

/// `nix-build` with extra environment for Nix and the hook (e.g. `NIX_TIER_CGROUP_ROOT`).
fn nix_build_with(sandbox: &NixSandbox, expr: &str, env: &[(&str, &Path)]) -> std::process::Output {
    let mut cmd = sandbox.command("nix-build");
    cmd.args(["--no-out-link", "--keep-going", "-j", "8", "--expr", expr]);
    for (name, value) in env {
        cmd.env(name, value);
    }
    cmd.output().expect("run nix-build")
}

/// `nix-build` of `expr` in the background, its output kept under `logs/<what>`.
fn spawn_nix_build(sandbox: &NixSandbox, expr: &str, what: &str) -> Running {
    let mut cmd = sandbox.command("nix-build");
    cmd.args(["--no-out-link", "--expr", expr]);
    Running::spawn(cmd, &sandbox.path().join("logs"), what)
}

/// A hook sandbox with `limits(medium)`, its builds in Nix's sandbox when `sandboxed`; and its
/// record directory.
fn enforcement_sandbox(medium: TierLimits, sandboxed: bool) -> (NixSandbox, std::path::PathBuf) {
    hook_sandbox_recording(&limits(medium), sandboxed, "")
}

/// `nix-tier <args>` with the sandbox's state directory, parsed as JSON.
fn nix_tier_json(sandbox: &NixSandbox, args: &[&str]) -> Value {
    let out = sandbox.command(binary("nix-tier")).args(args).arg("--json").output().unwrap();
    assert!(out.status.success(), "nix-tier {args:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The history rows, once `count` builds are recorded (watchers record as builds end).
fn history_rows(sandbox: &NixSandbox, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let rows = nix_tier_json(sandbox, &["history", "--limit", "1000"])["builds"].as_array().cloned().unwrap_or_default();
        if rows.len() >= count || Instant::now() > deadline {
            return rows;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn row<'a>(rows: &'a [Value], package: &str) -> &'a Value {
    rows.iter().find(|r| r["package"] == package).unwrap_or_else(|| panic!("no history row for {package}: {rows:?}"))
}

/// A light build over its 100 MiB limit beside a heavy one within its own, recording into
/// `records` ([`assert_hog_killed_beside_neighbour`]).
fn hog_and_neighbour(records: &Path) -> String {
    builds_expr(
        records,
        r#"{ name = "hog-1.0"; tier = "light"; mem = 250; sleep = 500; }
           { name = "neighbour-1.0"; tier = "heavy"; mem = 200; sleep = 1500; ramp = 0; }"#,
    )
}

/// That the build of [`hog_and_neighbour`] which ended with `out` killed the light one in its own
/// cgroup, said so in its log, and recorded both; that the hook said nothing in `hook_log` (the
/// client's standard error, or its daemon's); and that every build's cgroup is gone from
/// `parent`.
fn assert_hog_killed_beside_neighbour(sandbox: &NixSandbox, records: &Path, out: &std::process::Output, hook_log: &str, parent: &Path) {
    let err = stderr(out);
    assert!(!out.status.success(), "the hog must fail:\n{err}");
    assert!(!hook_log.contains("nix-tier-hook:"), "the hook complained:\n{hook_log}");
    assert!(
        err.contains("nix-tier: hog-1.0 exceeded its memory limit of 100 MiB (light tier) and was killed by the kernel"),
        "the build log names the build and the limit:\n{err}"
    );
    // The neighbour ran at the same time, in its own cgroup, untouched.
    let done = read_records(records);
    assert!(done.iter().any(|r| r.name == "neighbour-1.0"), "neighbour did not finish: {err}");
    assert!(!done.iter().any(|r| r.name == "hog-1.0"), "the hog finished despite its limit");

    let rows = history_rows(sandbox, 2);
    let hog = row(&rows, "hog");
    assert_eq!(hog["outcome"], "oom-killed", "{hog}");
    assert_eq!(hog["limitMiB"], 100);
    let neighbour = row(&rows, "neighbour");
    assert_eq!(neighbour["outcome"], "succeeded", "{neighbour}");
    // Its recorded peak is within 5% below and 10% above what its builder held, though it
    // allocated at once (before the watcher could move it): what it held outside is estimated
    // from its anonymous memory less its cgroup's use, which also counts file pages.
    let peak = neighbour["peakMiB"].as_u64().unwrap();
    assert!((190..=220).contains(&peak), "peak {peak} MiB for 200 MiB held: {neighbour}\nbroker.log:\n{}", broker_log(sandbox));

    let status = nix_tier_json(sandbox, &["status"]);
    let kills = status["recentKills"].as_array().unwrap();
    assert!(kills.iter().any(|k| k["name"] == "hog-1.0" && k["limitMiB"] == 100), "{status}");
    // Every build's cgroup is gone.
    let leftovers = child_cgroups(parent);
    let ours: Vec<_> = leftovers.iter().filter(|n| n.contains("hog-1.0") || n.contains("neighbour-1.0")).collect();
    assert!(ours.is_empty(), "cgroups left behind: {ours:?}");
}

/// [`hog_and_neighbour`] built by `nix-build` (single-user); with `root`, builds go under that
/// cgroup (`NIX_TIER_CGROUP_ROOT`).
fn over_its_limit(cgroups: Cgroups, sandboxed: bool, root: Option<&ReadOnlyCgroupRoot>) {
    let (sandbox, records) = enforcement_sandbox(TierLimits { max_jobs: 2, cores: 1, memory_mib: 300 }, sandboxed);
    let env: Vec<(&str, &Path)> = root.iter().map(|r| ("NIX_TIER_CGROUP_ROOT", r.memory())).collect();
    let out = nix_build_with(&sandbox, &hog_and_neighbour(&records), &env);
    let parent = root.map_or_else(|| cgroups.default_parent(), |r| r.memory().join("nix-tier"));
    assert_hog_killed_beside_neighbour(&sandbox, &records, &out, &stderr(&out), &parent);
}

#[test]
fn a_build_over_its_limit_is_killed_in_its_own_cgroup_and_recorded() {
    let Some(cgroups) = cgroups_present() else { return };
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    over_its_limit(cgroups, false, None);
}

#[test]
fn a_sandboxed_build_over_its_limit_is_killed_in_its_own_cgroup_and_recorded() {
    let Some(cgroups) = cgroups_present() else { return };
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    over_its_limit(cgroups, true, None);
}

#[test]
fn builds_are_bounded_under_a_read_only_cgroup_root() {
    // The hook drops CAP_DAC_OVERRIDE: only a parent made before that can hold builds' cgroups
    // under a root-owned 0555 directory, as cgroup roots commonly are.
    let Some(cgroups) = cgroups_present() else { return };
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let root = ReadOnlyCgroupRoot::new("nix-tier-test-ro", cgroups);
    over_its_limit(cgroups, true, Some(&root));
    for dir in &root.0 {
        assert!(dir.join("nix-tier").is_dir(), "the hook's parent was made under {}", dir.display());
    }
}

/// Builds each report how long after its start it was first in its cgroup: 24 of them
/// through 3 of Nix's slots, so that most start as another ends (when Nix asks every waiting
/// goal at once, and a build declined without a lease while Nix had a slot would run unwatched).
/// Builds 24 builders that each wait up to a second to find themselves in a nix-tier cgroup,
/// and asserts they all did and were recorded. A second is less than the watcher's first look
/// through every process (at 2 s): each must be found as its worker's child, by the process
/// events (`proc_events`) or by reading `/proc` (`NIX_TIER_PROC_EVENTS=off`).
fn placed_early(sandboxed: bool, proc_events: bool) {
    const BUILDS: usize = 24;
    let (sandbox, records) = enforcement_sandbox(TierLimits { max_jobs: 4, cores: 1, memory_mib: 300 }, sandboxed);
    let builds: String = (0..BUILDS)
        .map(|i| format!(r#"{{ name = "placed{i}-1.0"; tier = "{}"; mem = 10; sleep = 100; ramp = 0; }}"#, ["light", "medium"][i % 2]))
        .collect();
    let expr = builds_expr(&records, &builds).replace("TB_RAMP_MS =", "TB_PLACEMENT_WAIT_MS = \"1000\"; TB_RAMP_MS =");
    let mut build = sandbox.command("nix-build");
    if !proc_events {
        build.env("NIX_TIER_PROC_EVENTS", "off");
    }
    let out = build.args(["--no-out-link", "-j", "3", "--expr", &expr]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let delays: Vec<(String, String)> = (0..BUILDS)
        .map(|i| {
            let name = format!("placed{i}-1.0");
            let text = std::fs::read_to_string(records.join("placed").join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, text.trim().to_string())
        })
        .collect();
    eprintln!("placement delays (µs after the builder's start), sandboxed {sandboxed}, process events {proc_events}: {delays:?}");
    let err = stderr(&out);
    let hook_lines: Vec<&str> = err.lines().filter(|l| l.contains("nix-tier-hook")).map(|l| &l[..l.len().min(300)]).collect();
    for (name, delay) in &delays {
        assert!(delay.parse::<u64>().is_ok(), "{name} was never placed in a nix-tier cgroup ({delay}); all: {delays:?}; the hook said {hook_lines:?}");
    }
    // Every one of them is recorded with what its cgroup measured.
    let rows = history_rows(&sandbox, BUILDS);
    for (name, _) in &delays {
        let row = row(&rows, name.trim_end_matches("-1.0"));
        assert!(row["peakMiB"].is_u64() && row["cpuMs"].is_u64() && row["limitMiB"].is_u64(), "{row}");
    }
}

#[test]
fn every_build_is_placed_in_its_cgroup_as_it_starts() {
    if cgroups_present().is_none() {
        return;
    }
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    placed_early(false, true);
    placed_early(false, false);
}

#[test]
fn every_sandboxed_build_is_placed_in_its_cgroup_as_it_starts() {
    if cgroups_present().is_none() {
        return;
    }
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    placed_early(true, true);
    placed_early(true, false);
}

/// Builds with structured attributes beside plain ones, each running compilers one after
/// another as a configure script or `make` does (200 short processes in turn, each writing
/// 2 MiB, forked inside the build's cgroup: a new one every few milliseconds, so that the
/// watcher keeps reading the builder's tree). With structured attributes Nix passes the outputs in `.attrs.json`, not the
/// builder's environment; the fixture mirrors nixpkgs' `pkgs/stdenv/generic/make-derivation.nix`
/// (with `__structuredAttrs`, what the builder's processes see goes in `env`) and the test
/// builder does what `pkgs/stdenv/generic/setup.sh` does with it (exports `env` and the outputs).
/// Every builder is placed in its cgroup as it starts, and its recorded peak is what its cgroup
/// held: the processes forked inside are not counted again as if moved in.
fn structured_and_plain_placed(sandboxed: bool) {
    const CHILD_MIB: u64 = 2;
    let (sandbox, records) = enforcement_sandbox(TierLimits { max_jobs: 4, cores: 1, memory_mib: 300 }, sandboxed);
    let expr = format!(
        r#"map ({{ name, structured }}: let
             env = {{
               NIX_TIER = "medium"; TB_MEM_MIB = "0"; TB_SLEEP_MS = "100"; RECORD_DIR = "{records}";
               TB_PLACEMENT_WAIT_MS = "1000"; TB_CHILD_RUNS = "200"; TB_CHILD_MEM_MIB = "{CHILD_MIB}"; TB_CHILD_MS = "0";
             }};
           in derivation ({{ inherit name; system = builtins.currentSystem; builder = "{builder}"; }}
             // (if structured then {{ __structuredAttrs = true; inherit env; }} else env)))
           [ {{ name = "attrs1-1.0"; structured = true; }} {{ name = "attrs2-1.0"; structured = true; }}
             {{ name = "plain1-1.0"; structured = false; }} ]"#,
        records = records.display(),
        builder = testbuilder().display(),
    );
    let out = sandbox.command("nix-build").args(["--no-out-link", "-j", "3", "--expr", &expr]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = history_rows(&sandbox, 3);
    for name in ["attrs1-1.0", "attrs2-1.0", "plain1-1.0"] {
        let placed = std::fs::read_to_string(records.join("placed").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(placed.trim().parse::<u64>().is_ok(), "{name} (sandboxed {sandboxed}) was never placed in its cgroup: {placed}");
        let row = row(&rows, name.trim_end_matches("-1.0"));
        let peak = row["peakMiB"].as_u64().unwrap_or_else(|| panic!("{name}: no peak: {row}"));
        eprintln!("{name} sandboxed {sandboxed}: peak {peak} MiB");
        // One process at a time: its 2 MiB and a few MiB of programs.
        assert!((CHILD_MIB..CHILD_MIB + 16).contains(&peak), "{name} (sandboxed {sandboxed}) peaked at {peak} MiB: {row}");
    }
}

#[test]
fn builds_with_structured_attributes_are_placed_and_peaks_count_each_process_once() {
    if cgroups_present().is_none() {
        return;
    }
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    structured_and_plain_placed(false);
    structured_and_plain_placed(true);
}

/// Builders that start processes at once, each starting one of its own (as `make` starts
/// compilers), before the watcher can have moved the builder: every one of them ends up in the
/// build's cgroup. The watcher reads the builder's tree only until it finds nothing of the build
/// left outside, so this also checks that it stops no earlier.
fn descendants_placed(cgroups: Cgroups, sandboxed: bool) {
    const BUILDS: usize = 4;
    const CHILDREN: usize = 3;
    let (sandbox, records) = enforcement_sandbox(TierLimits { max_jobs: 4, cores: 1, memory_mib: 300 }, sandboxed);
    let builds: String = (0..BUILDS)
        .map(|i| format!(r#"{{ name = "tree{i}-1.0"; tier = "{}"; mem = 10; sleep = 1200; ramp = 0; }}"#, ["light", "medium"][i % 2]))
        .collect();
    let expr = builds_expr(&records, &builds).replace("TB_RAMP_MS =", &format!("TB_CHILDREN = \"{CHILDREN}\"; TB_RAMP_MS ="));
    let out = nix_build(&sandbox, &expr);
    assert!(out.status.success(), "{}", stderr(&out));
    for build in 0..BUILDS {
        let name = format!("tree{build}-1.0");
        for child in 0..CHILDREN {
            for label in [format!("{name}-{child}"), format!("{name}-{child}-1")] {
                let text = std::fs::read_to_string(records.join("cgroups").join(&label)).unwrap_or_else(|e| panic!("{label}: {e}"));
                let memory = cgroups.memory_cgroup(&text).unwrap_or_else(|| panic!("{label}: {text}"));
                assert!(
                    memory.contains("/nix-tier/") && memory.contains(&name),
                    "{label} (sandboxed {sandboxed}) is not in its build's cgroup: {memory}"
                );
            }
        }
    }
}

#[test]
fn processes_a_builder_starts_at_once_are_placed_in_its_cgroup() {
    let Some(cgroups) = cgroups_present() else { return };
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    descendants_placed(cgroups, false);
    descendants_placed(cgroups, true);
}

/// The members of group `nixbld` (Nix's build users), from /etc/group.
fn build_users() -> Vec<String> {
    std::fs::read_to_string("/etc/group")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("nixbld:").map(|rest| rest.rsplit(':').next().unwrap_or("").to_string()))
        .map(|members| members.split(',').filter(|m| !m.is_empty()).map(str::to_string).collect())
        .unwrap_or_default()
}

/// A uid's name, from /etc/passwd.
fn user_name(uid: u32) -> Option<String> {
    std::fs::read_to_string("/etc/passwd")
        .ok()?
        .lines()
        .find(|l| l.split(':').nth(2) == Some(&uid.to_string()))
        .map(|l| l.split(':').next().unwrap_or("").to_string())
}

/// What Nix's build users need to find missing from this machine.
const BUILD_USERS: &str = "Nix's build users (group nixbld with members: scripts/setup makes them)";

/// A hook sandbox with `limits(medium)` for a daemon that builds as Nix's build users, who can
/// reach its store and write their records; and its record directory.
fn build_users_sandbox(medium: TierLimits, sandboxed: bool) -> (NixSandbox, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let (sandbox, records) = hook_sandbox_recording(&limits(medium), sandboxed, "build-users-group = nixbld");
    std::fs::set_permissions(sandbox.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for dir in [records.clone(), records.join("started"), records.join("placed")] {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    std::fs::write(records.join("records"), "").unwrap();
    std::fs::set_permissions(records.join("records"), std::fs::Permissions::from_mode(0o666)).unwrap();
    (sandbox, records)
}

#[test]
fn builds_of_build_users_through_a_daemon_are_placed_sandboxed_or_not() {
    // Multi-user Nix: a daemon running builders as nixbld<N>, which the hook, with only
    // CAP_SYS_PTRACE and CAP_KILL left, must still find and place.
    if cgroups_present().is_none() || !requires(!build_users().is_empty(), BUILD_USERS) {
        return;
    }
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    for sandboxed in [false, true] {
        let (sandbox, records) = build_users_sandbox(TierLimits { max_jobs: 2, cores: 1, memory_mib: 300 }, sandboxed);
        let daemon = NixDaemon::start(&sandbox);
        let builds: String = (0..3)
            .map(|i| format!(r#"{{ name = "user{i}-1.0"; tier = "light"; mem = 10; sleep = 300; ramp = 0; salt = "{sandboxed}"; }}"#))
            .collect();
        let expr = builds_expr(&records, &builds).replace("TB_RAMP_MS =", "TB_PLACEMENT_WAIT_MS = \"3000\"; TB_RAMP_MS =");
        let out = daemon.command("nix-build").args(["--no-out-link", "-j", "8", "--expr", &expr]).output().unwrap();
        assert!(out.status.success(), "sandboxed {sandboxed}: {}\ndaemon:\n{}", stderr(&out), daemon.log());
        for i in 0..3 {
            let name = format!("user{i}-1.0");
            let started = records.join("started").join(&name);
            let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&started).unwrap());
            let user = user_name(uid).unwrap_or_default();
            assert!(build_users().contains(&user), "sandboxed {sandboxed}: {name} ran as uid {uid} ({user}), not a build user");
            let placed = std::fs::read_to_string(records.join("placed").join(&name)).unwrap();
            assert!(placed.trim().parse::<u64>().is_ok(), "sandboxed {sandboxed}: {name} was never placed ({placed}); daemon:\n{}", daemon.log());
        }
        let rows = history_rows(&sandbox, 3);
        assert!(rows.iter().all(|r| r["peakMiB"].is_u64() && r["cpuMs"].is_u64()), "sandboxed {sandboxed}: {rows:#?}");
    }
}

/// NixOS's layout (nix/nixos-module.nix): the daemon's cgroup is delegated, the daemon runs in
/// its `supervisor` child, and `NIX_TIER_CGROUP_ROOT` in the daemon's environment, which its
/// hooks inherit, names the delegated cgroup; sandboxed builds run as build users. The builds
/// are bounded in `<root>/nix-tier/<build>`, beside the daemon's cgroup, and the hog is killed
/// in its own.
#[test]
fn builds_of_a_daemon_in_a_delegated_cgroup_are_bounded_beside_it() {
    let Some(cgroups) = cgroups_present() else { return };
    if !requires(!build_users().is_empty(), BUILD_USERS) {
        return;
    }
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let root = ReadOnlyCgroupRoot::new("nix-tier-test-delegated", cgroups);
    let supervisor = root.child("supervisor");
    let (sandbox, records) = build_users_sandbox(TierLimits { max_jobs: 2, cores: 1, memory_mib: 300 }, true);
    let daemon = NixDaemon::start_in(&sandbox, &supervisor, &[("NIX_TIER_CGROUP_ROOT", root.memory())]);
    let out = daemon.command("nix-build").args(["--no-out-link", "--keep-going", "-j", "8", "--expr", &hog_and_neighbour(&records)]).output().unwrap();
    assert_hog_killed_beside_neighbour(&sandbox, &records, &out, &daemon.log(), &root.memory().join("nix-tier"));
    for dir in &root.0 {
        assert!(dir.join("nix-tier").is_dir(), "the hook's parent was made beside the daemon's cgroup under {}", dir.display());
    }
    for procs in &supervisor {
        let daemons = std::fs::read_to_string(procs).unwrap();
        assert!(!daemons.trim().is_empty(), "the daemon left its cgroup {}", procs.display());
    }
    // As stopping the unit would: what is left in the daemon's cgroup (the broker its hooks
    // started) ends too, so that the cgroups can go.
    drop(daemon);
    for procs in &supervisor {
        for pid in std::fs::read_to_string(procs).unwrap_or_default().lines().filter_map(|l| l.parse().ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[test]
fn every_admitted_build_gets_one_history_row() {
    // Short builds included: most end before anything could watch them.
    if cgroups_present().is_none() {
        return;
    }
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let (sandbox, records) = enforcement_sandbox(TierLimits { max_jobs: 4, cores: 1, memory_mib: 300 }, true);
    let mut builds: String =
        (0..40).map(|i| format!(r#"{{ name = "short-{i}-1.0"; tier = "light"; mem = 0; sleep = 0; ramp = 0; }}"#)).collect();
    builds.push_str(r#"{ name = "long-1.0"; tier = "medium"; mem = 30; sleep = 600; ramp = 0; }"#);
    let began = Instant::now();
    let out = nix_build(&sandbox, &builds_expr(&records, &builds));
    let took_ms = began.elapsed().as_millis() as u64;
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = history_rows(&sandbox, 41);
    let mut drvs: Vec<&str> = rows.iter().map(|r| r["drv"].as_str().unwrap()).collect();
    drvs.sort();
    drvs.dedup();
    assert_eq!((rows.len(), drvs.len()), (41, 41), "one row per build: {rows:#?}");
    assert!(rows.iter().all(|r| r["wallMs"].is_u64() && r["outcome"] == "succeeded"), "{rows:#?}");
    // Four light builds at a time: most of the 40 waited for admission, none longer than the run.
    let waits: Vec<u64> = rows.iter().map(|r| r["waitedMs"].as_u64().unwrap_or_else(|| panic!("no wait recorded: {r}"))).collect();
    assert!(waits.iter().filter(|w| **w > 0).count() >= 20, "waits {waits:?}");
    assert!(waits.iter().all(|w| *w <= took_ms), "waits {waits:?} in a run of {took_ms} ms");
    assert!(rows.iter().all(|r| r["leasedMs"].as_u64().is_some_and(|leased| leased <= took_ms)), "{rows:#?}");
    let long = row(&rows, "long");
    assert!(long["peakMiB"].as_u64().is_some_and(|p| p >= 30) && long["cpuMs"].is_u64(), "{long}");
    assert!(long["leasedMs"].as_u64().is_some_and(|leased| leased >= 600), "its lease covers its 600 ms: {long}");
}

/// A hook sandbox whose medium builds reserve 400 MiB each in a 1000 MiB budget, so that only
/// two run at once on the tier's figure (four, maxJobs, on a learned one); its profile and its
/// record directory.
fn two_medium_at_once() -> (NixSandbox, std::path::PathBuf, std::path::PathBuf) {
    let mut tight = limits(TierLimits { max_jobs: 4, cores: 1, memory_mib: 400 });
    tight.budget_mib = 1000;
    let (sandbox, profile) = hook_sandbox(&tight, "");
    let records = sandbox.path().join("records");
    (sandbox, profile, records)
}

/// A medium build for [`builds_expr`] that holds 40 MiB for `sleep` ms.
fn medium(name: &str, salt: &str, sleep: u32) -> String {
    format!(r#"{{ name = "{name}"; tier = "medium"; mem = 40; sleep = {sleep}; salt = "{salt}"; }}"#)
}

#[test]
fn learned_reservations_let_more_builds_run_at_once() {
    if cgroups_present().is_none() {
        return;
    }
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let (sandbox, profile, records) = two_medium_at_once();

    // Three builds of pkg teach the hook its real use.
    let learning: String = (1..=3).map(|i| medium("pkg-1.0", &format!("learn{i}"), 100)).collect();
    let out = nix_build(&sandbox, &builds_expr(&records, &learning));
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = history_rows(&sandbox, 3);
    assert_eq!(rows.len(), 3, "{rows:?}\nnix-build:\n{}\nbroker.log:\n{}", stderr(&out), broker_log(&sandbox));

    let drv_out = sandbox
        .command("nix-instantiate")
        .args(["--expr", &format!("builtins.head ({})", builds_expr(&records, &medium("pkg-1.0", "new", 100)))])
        .output()
        .unwrap();
    let drv = String::from_utf8(drv_out.stdout).unwrap().trim().to_string();
    let explained = nix_tier_json(&sandbox, &["explain", &drv, "--profile", profile.to_str().unwrap()]);
    assert_eq!(explained["memorySource"], "learned", "{explained}");
    let learned = explained["memoryMiB"].as_u64().unwrap();
    assert!(learned < 250, "learned {learned} MiB for 40 MiB builds: {explained}");

    // Four builds of a package without history, then four of pkg.
    let run_batch = |package: &str| {
        let batch: String = (1..=4).map(|i| medium(package, &format!("batch{i}"), 1500)).collect();
        let out = nix_build(&sandbox, &builds_expr(&records, &batch));
        assert!(out.status.success(), "{}", stderr(&out));
        stderr(&out)
    };
    let said = [run_batch("other-1.0"), run_batch("pkg-1.0")].join("\n");
    let all = read_records(&records);
    let concurrency = |name: &str| {
        let batch: Vec<_> = all.iter().filter(|r| r.name == name).cloned().collect();
        peaks(&batch, |_| 0).total
    };
    let log = || format!("nix-build:\n{said}\nbroker.log:\n{}", broker_log(&sandbox));
    assert_eq!(concurrency("other-1.0"), 2, "flat 400 MiB figures fit 2 in 1000 MiB\n{}", log());
    assert_eq!(concurrency("pkg-1.0"), 4, "learned {learned} MiB figures fit all 4 (maxJobs 4)\n{}", log());
}

#[test]
fn a_build_learns_from_one_recorded_earlier_in_the_same_nix_build() {
    if cgroups_present().is_none() {
        return;
    }
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let (sandbox, _, records) = two_medium_at_once();
    // One nix-build, one hook per Nix worker, an empty history at its start: pkg's first
    // build, a light build after it (so that the first is recorded before the rest are asked
    // about), then four builds of pkg.
    let first = medium("pkg-1.0", "first", 100);
    let spacer = format!(
        r#"{{ name = "spacer"; tier = "light"; mem = 1; sleep = 1000; deps = [ (builtins.head ({})) ]; }}"#,
        builds_expr(&records, &first)
    );
    let batch: String = (1..=4)
        .map(|i| {
            format!(
                r#"{{ name = "pkg-1.0"; tier = "medium"; mem = 40; sleep = 1500; salt = "batch{i}"; deps = [ (builtins.head ({})) ]; }}"#,
                builds_expr(&records, &spacer)
            )
        })
        .collect();
    let out = nix_build(&sandbox, &builds_expr(&records, &batch));
    assert!(out.status.success(), "{}", stderr(&out));

    let all = read_records(&records);
    let spacer_end = all.iter().find(|r| r.name == "spacer").map(|r| r.end_ms).expect("the spacer ran");
    let batch: Vec<_> = all.iter().filter(|r| r.name == "pkg-1.0" && r.start_ms >= spacer_end).cloned().collect();
    assert_eq!(batch.len(), 4, "{}", timeline(&all));
    assert_eq!(
        peaks(&batch, |_| 0).total,
        4,
        "the four later builds of pkg reserve what its first build taught and fit the budget together: {}",
        timeline(&all)
    );
}

#[test]
fn a_build_that_outgrows_its_learned_reservation_runs_on_and_counts_what_it_uses() {
    if cgroups_present().is_none() {
        return;
    }
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let (sandbox, _, records) = two_medium_at_once();
    let heavy = |name: &str, mem: u32, sleep: u32, extra: &str| {
        format!(r#"{{ name = "{name}"; tier = "heavy"; mem = {mem}; sleep = {sleep}; {extra} }}"#)
    };
    // One build each teaches the hook: "grows" reserves its peak P of about 400 MiB, limited to
    // P × 1.25; "filler" reserves about 555 MiB. Together they fit the 1000 MiB budget.
    let learning = [heavy("grows-1.0", 400, 100, ""), heavy("filler-1.0", 555, 100, "")].concat();
    let out = nix_build(&sandbox, &builds_expr(&records, &learning));
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = history_rows(&sandbox, 2);
    let learned_peak = row(&rows, "grows")["peakMiB"].as_u64().expect("grows' peak");
    let limit = (learned_peak * 5).div_ceil(4);
    assert!(learned_peak + row(&rows, "filler")["peakMiB"].as_u64().unwrap() <= 1000, "{rows:?}");

    // Now "grows" holds 480 MiB, over its reservation and within its limit, until the test lets
    // it end. "filler" becomes ready once the broker counts what "grows" uses (its watcher looks
    // every second): beside the reservation it would fit, beside the use it does not.
    let go_ahead = [sandbox.path().join("grows-may-end"), sandbox.path().join("spacer-may-end")];
    let grown = heavy("grows-1.0", 480, 0, &format!(r#"salt = "grown"; waitFor = "{}";"#, go_ahead[0].display()));
    let spacer = format!(r#"{{ name = "spacer"; tier = "light"; mem = 1; sleep = 0; ramp = 0; waitFor = "{}"; }}"#, go_ahead[1].display());
    let filler =
        heavy("filler-1.0", 555, 100, &format!(r#"salt = "after"; deps = [ (builtins.head ({})) ];"#, builds_expr(&records, &spacer)));
    let mut nix_build = sandbox.command("nix-build");
    nix_build.args(["--no-out-link", "-j", "8", "--expr", &builds_expr(&records, &[grown, filler].concat())]);
    let running = Running::spawn(nix_build, &sandbox.path().join("logs"), "grows");
    let running_build = |name: &str| {
        let status = nix_tier_json(&sandbox, &["status"]);
        status["running"].as_array().and_then(|r| r.iter().find(|l| l["name"] == name).cloned())
    };
    let counted = wait_for("grows counted at what it uses", Duration::from_secs(60), || {
        running_build("grows-1.0").and_then(|g| g["memoryMiB"].as_u64()).filter(|mib| *mib >= 480)
    });
    std::fs::write(&go_ahead[1], "").unwrap();
    // The filler has asked, and waits: the broker says so.
    wait_for(&format!("filler waiting beside grows (counted at {counted} MiB)"), Duration::from_secs(60), || {
        let status = nix_tier_json(&sandbox, &["status"]);
        status["waiting"].as_array().is_some_and(|w| w.iter().any(|b| b["name"] == "filler-1.0")).then_some(())
    });
    assert!(running_build("filler-1.0").is_none(), "filler runs beside grows");
    std::fs::write(&go_ahead[0], "").unwrap();
    let out = running.wait(Duration::from_secs(60));
    let all = read_records(&records);
    let said = || format!("{}\nnix-build:\n{}\nbroker.log:\n{}", timeline(&all), out.stderr, broker_log(&sandbox));
    assert!(out.status.success(), "{}", said());
    let rows = history_rows(&sandbox, 5);
    let grown_row = rows.iter().find(|r| r["package"] == "grows" && r["peakMiB"].as_u64() > Some(learned_peak)).unwrap_or_else(|| panic!("{rows:?}"));
    assert_eq!(grown_row["outcome"], "succeeded", "not killed within its limit: {grown_row}");
    assert_eq!(grown_row["limitMiB"], limit, "{grown_row}");
    let grown_end = all.iter().filter(|r| r.name == "grows-1.0").map(|r| r.end_ms).max().expect("grows ran");
    let filler_start = all.iter().filter(|r| r.name == "filler-1.0").map(|r| r.start_ms).max().expect("filler ran");
    assert!(filler_start >= grown_end, "filler started beside the memory grows took beyond its reservation: {}", said());
}

#[test]
fn of_heavy_builds_expected_to_run_as_long_the_one_more_builds_need_starts_first() {
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let (sandbox, _) = hook_sandbox(&limits(TierLimits { max_jobs: 2, cores: 1, memory_mib: 300 }), "");
    let records = sandbox.path().join("records");
    // A broker started by the build's first question answers the questions of its first
    // moments in whatever order its connections are served: started first, it has the heavy
    // builds asked in order.
    let warm_up = nix_build(&sandbox, &builds_expr(&records, r#"{ name = "warm-up"; tier = "light"; mem = 1; sleep = 10; }"#));
    assert!(warm_up.status.success(), "{}", stderr(&warm_up));
    // One heavy slot, three heavy builds without history (expected to run as long). Nix asks in
    // the order of names: "a0-first" starts, "a1-few" and "b-many" wait. Three builds need
    // "b-many", none the other two; Nix's store database says so once they are instantiated.
    let heavy = |name: &str| format!(r#"{{ name = "{name}"; tier = "heavy"; mem = 1; sleep = 1000; ramp = 0; }}"#);
    let heavies = builds_expr(&records, &[heavy("a0-first"), heavy("a1-few"), heavy("b-many")].concat());
    let needing: String = (1..=3)
        .map(|i| format!(r#"{{ name = "needs-many"; tier = "light"; mem = 1; sleep = 10; salt = "{i}"; deps = [ (builtins.elemAt ({heavies}) 2) ]; }}"#))
        .collect();
    let out = nix_build(&sandbox, &format!("({heavies}) ++ ({})", builds_expr(&records, &needing)));
    assert!(out.status.success(), "{}", stderr(&out));
    let all = read_records(&records);
    let start = |name: &str| all.iter().find(|r| r.name == name).map(|r| r.start_ms).unwrap_or_else(|| panic!("{name} ran: {}", timeline(&all)));
    let said = || format!("{}\nnix-build:\n{}", timeline(&all), stderr(&out));
    assert!(start("a0-first") < start("b-many"), "{}", said());
    assert!(start("b-many") < start("a1-few"), "{}", said());
}

#[test]
fn a_cpu_quota_holds_a_build_to_its_tier_cores() {
    let Some(cgroups) = cgroups_present() else { return };
    if !requires(std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2, "2 CPUs") {
        return;
    }
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let (sandbox, _) = hook_sandbox(&limits(TierLimits { max_jobs: 2, cores: 1, memory_mib: 300 }), "");
    // Two busy threads for 3 s: light allows 1 core, heavy 2. The builder writes the quota of
    // the cgroup it finds itself in as its output (µs per 100 ms period on both versions).
    let quota = match cgroups {
        Cgroups::V1 => r"cat /sys/fs/cgroup/cpu$(sed -n 's/^[0-9]*:cpu:\\(.*\\)/\\1/p' /proc/self/cgroup)/cpu.cfs_quota_us",
        Cgroups::V2 => r"cut -d ' ' -f 1 /sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)/cpu.max",
    };
    let spin = |name: &str, tier: &str| {
        format!(
            r#"derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh";
                 NIX_TIER = "{tier}"; PATH = "/usr/bin:/bin";
                 args = [ "-c" "sleep 0.3; spin() {{ while :; do :; done; }}; spin & a=$!; spin & b=$!; sleep 3; kill $a $b;
                   {quota} > $out" ]; }}"#
        )
    };
    let mut used = Vec::new();
    for (name, tier, quota) in [("spin-light-1.0", "light", "100000"), ("spin-heavy-1.0", "heavy", "200000")] {
        let out = nix_build(&sandbox, &spin(name, tier));
        assert!(out.status.success(), "{}", stderr(&out));
        let seen = std::fs::read_to_string(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
        assert_eq!(seen.trim(), quota, "{name}: the quota (µs per 100 ms) of the cgroup its builder runs in");
        let rows = history_rows(&sandbox, used.len() + 1);
        let row = row(&rows, name.trim_end_matches("-1.0"));
        used.push(row["cpuMs"].as_f64().unwrap() / row["wallMs"].as_f64().unwrap());
    }
    // The quota holds (a busy machine can only lower these figures).
    let light = used[0];
    assert!(light <= 1.15, "a 1-core build used {light:.2} cores");
    assert!(light >= 0.3, "a 1-core build used only {light:.2} cores: its spinners were not in its cgroup");
}

#[test]
fn an_abandoned_build_is_ended_and_its_cgroup_removed() {
    let Some(cgroups) = cgroups_present() else { return };
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let (sandbox, _) = hook_sandbox(&limits(TierLimits { max_jobs: 2, cores: 1, memory_mib: 300 }), "");
    // Nix kills its builder when the client dies (PR_SET_PDEATHSIG), but not the builder's own
    // children, as a compiler started by make would be: this one records its pid and runs on.
    let pid_file = sandbox.path().join("grandchild.pid");
    let expr = format!(
        r#"derivation {{ name = "abandoned-1.0"; system = builtins.currentSystem; builder = "/bin/sh";
             NIX_TIER = "light"; PATH = "/usr/bin:/bin";
             args = [ "-c" "sleep 0.3; sleep 60 & echo $! > {}; wait; echo > $out" ]; }}"#,
        pid_file.display()
    );
    let client = spawn_nix_build(&sandbox, &expr, "client");
    let deadline = Instant::now() + Duration::from_secs(20);
    let grandchild: u32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|t| t.trim().parse().ok()) {
            break pid;
        }
        assert!(Instant::now() < deadline, "the build never started its child");
        std::thread::sleep(Duration::from_millis(50));
    };

    let cgroup_of = |pid: u32| {
        std::fs::read_dir(cgroups.default_parent()).ok()?.flatten().map(|e| e.path()).find(|dir| {
            std::fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|procs| procs.lines().any(|l| l == pid.to_string()))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let placed = loop {
        if let Some(dir) = cgroup_of(grandchild) {
            break dir;
        }
        assert!(Instant::now() < deadline, "the build's child was never placed in its cgroup");
        std::thread::sleep(Duration::from_millis(50));
    };

    client.kill9();
    let killed = Instant::now();
    assert!(!process_gone(grandchild) || placed.exists(), "precondition: the child outlives its client for a moment");
    let deadline = killed + Duration::from_secs(5);
    while !process_gone(grandchild) || placed.exists() {
        assert!(
            Instant::now() < deadline,
            "5 s after the client was killed: child gone {}, cgroup {} still there {}",
            process_gone(grandchild),
            placed.display(),
            placed.exists()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("the abandoned build's child ended and its cgroup was removed {:?} after the client was killed", killed.elapsed());
    let rows = history_rows(&sandbox, 1);
    assert_eq!(row(&rows, "abandoned")["outcome"], "failed");
}

/// A broker killed while a build runs: the next one, started by another client's hook, adopts
/// the build with its cgroup (found by name under the parent, on v1 or v2), so an OOM kill
/// there is still told in the build's log and recorded, and the cgroup is removed at the end.
#[test]
fn a_build_stays_bounded_across_a_broker_restart() {
    let Some(cgroups) = cgroups_present() else { return };
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let (sandbox, _) = hook_sandbox(&limits(TierLimits { max_jobs: 2, cores: 1, memory_mib: 300 }), "");
    // It grows past its tier's 100 MiB only once the test lets it, after the restart.
    let go = sandbox.path().join("go");
    let held = format!(
        r#"derivation {{ name = "held-1.0"; system = builtins.currentSystem; builder = "/bin/sh"; NIX_TIER = "light";
             PATH = "/usr/bin:/bin"; TB_MEM_MIB = "250"; TB_SLEEP_MS = "500";
             args = [ "-c" "while [ ! -e {} ]; do sleep 0.05; done; exec {}" ]; }}"#,
        go.display(),
        testbuilder().display()
    );
    // The parent is the machine's: cgroups of this name left by an earlier run are not this one.
    let parent = cgroups.default_parent();
    let earlier = child_cgroups(&parent);
    let client = spawn_nix_build(&sandbox, &held, "held");
    let cgroup = wait_for("held-1.0's cgroup", Duration::from_secs(30), || {
        child_cgroups(&parent).into_iter().find(|name| name.contains("held-1.0") && !earlier.contains(name))
    });
    let in_cgroup = || child_cgroups(&parent).contains(&cgroup);
    wait_for_watcher_lock(&sandbox, "held-1.0");
    let first_broker = kill_broker(&sandbox);

    // Another client's hook starts a broker, which finds held-1.0 running and adopts it.
    let trigger = r#"derivation { name = "trigger-1.0"; system = builtins.currentSystem; builder = "/bin/sh";
                      NIX_TIER = "light"; args = [ "-c" "echo > $out" ]; }"#;
    let out = spawn_nix_build(&sandbox, trigger, "trigger").wait(Duration::from_secs(60));
    assert!(out.status.success(), "the second client's build: {}", out.stderr);
    assert_ne!(broker_pid(&sandbox), first_broker, "a new broker runs");
    wait_for("held-1.0 running under the new broker", Duration::from_secs(30), || {
        let status = status_json(&sandbox).ok()?;
        status["running"].as_array()?.iter().any(|r| r["name"] == "held-1.0").then_some(())
    });
    assert!(in_cgroup(), "held-1.0 keeps its cgroup {cgroup}");

    // Its processes, for the message should it not be killed.
    let procs = std::fs::read_to_string(parent.join(&cgroup).join("cgroup.procs")).unwrap_or_default();
    std::fs::write(&go, "").unwrap();
    let out = client.wait(Duration::from_secs(60));
    assert!(
        !out.status.success(),
        "held-1.0 grew past its limit and must fail:\n{}\ncgroup.procs: {procs}\nbroker.log:\n{}",
        out.stderr,
        broker_log(&sandbox)
    );
    assert!(
        out.stderr.contains("nix-tier: held-1.0 exceeded its memory limit of 100 MiB (light tier) and was killed by the kernel"),
        "the new broker tells the kill in the build's log:\n{}",
        out.stderr
    );
    let rows = history_rows(&sandbox, 2);
    let row = row(&rows, "held");
    assert_eq!(row["outcome"], "oom-killed", "{row}");
    assert_eq!(row["limitMiB"], 100, "{row}");
    wait_for("held-1.0's cgroup to be removed", Duration::from_secs(10), || (!in_cgroup()).then_some(()));
}

/// The tests above that bound builds with cgroups, again under cgroup v2 alone, as NixOS has
/// it: this machine binds the memory and cpu controllers to cgroup v1, so they run in a guest
/// kernel (`nix_tier_tests::guest`), this test binary with the Nix first on `PATH` and this
/// machine's binaries.
#[test]
fn the_cgroup_tests_hold_on_cgroup_v2() {
    // Each of the cgroup interfaces once, sandboxed and not: limits, OOM kills and peaks; a
    // 0555 root; NixOS's delegated daemon cgroup; moves of builders and their trees; build
    // users; the CPU quota and its accounting; leftovers killed and cgroups removed;
    // reservations learned from the peaks; a build's cgroup found again by a restarted
    // broker; builders with structured attributes, and peaks of builds that keep starting
    // processes. (The rest of the suite decides nothing differently
    // on v2, and software emulation is slow.)
    const TESTS: &[&str] = &[
        "a_build_over_its_limit_is_killed_in_its_own_cgroup_and_recorded",
        "builds_are_bounded_under_a_read_only_cgroup_root",
        "processes_a_builder_starts_at_once_are_placed_in_its_cgroup",
        "builds_of_build_users_through_a_daemon_are_placed_sandboxed_or_not",
        "builds_of_a_daemon_in_a_delegated_cgroup_are_bounded_beside_it",
        "a_cpu_quota_holds_a_build_to_its_tier_cores",
        "an_abandoned_build_is_ended_and_its_cgroup_removed",
        "learned_reservations_let_more_builds_run_at_once",
        "a_build_that_outgrows_its_learned_reservation_runs_on_and_counts_what_it_uses",
        "a_build_stays_bounded_across_a_broker_restart",
        "builds_with_structured_attributes_are_placed_and_peaks_count_each_process_once",
    ];
    let Some(guest) = Guest::find() else { return };
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let me = std::env::current_exe().unwrap();
    // The guest's cgroups first, in the output: one line, the unified tree's; then its Nix.
    let mut args = vec!["-c", r#"echo "cgroups: $(tr '\n' ' ' </proc/self/cgroup)"; nix-build --version; exec "$0" "$@""#];
    let me = me.to_string_lossy();
    args.extend([me.as_ref(), "--exact", "--test-threads", "1"]);
    args.extend(TESTS);
    let began = Instant::now();
    // The same PATH: the same Nix (./scripts/test runs this under Nix 2.8, then 2.26).
    let path = std::env::var("PATH").unwrap_or_default();
    let env = [("CI", "true"), ("PATH", path.as_str())];
    let run = guest.run(Path::new(env!("CARGO_MANIFEST_DIR")), Path::new("/bin/sh"), &args, &env, Duration::from_secs(1200));
    eprintln!("the guest ran {} tests in {:?}", TESTS.len(), began.elapsed());
    let said = || format!("{}\nguest console:\n{}", run.output, run.console);
    assert!(run.output.starts_with("cgroups: 0::/ \n"), "not cgroup v2 alone in the guest:\n{}", said());
    let nix = std::process::Command::new("nix-build").arg("--version").output().expect("nix-build --version");
    let nix = String::from_utf8_lossy(&nix.stdout);
    assert!(run.output.lines().nth(1) == nix.lines().next(), "the guest's Nix is not this one ({}):\n{}", nix.trim(), said());
    assert_eq!(run.status, Some(0), "the cgroup tests on cgroup v2:\n{}", said());
    assert!(run.output.contains(&format!("test result: ok. {} passed", TESTS.len())), "{}", said());
}
