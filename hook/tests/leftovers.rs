//! A lease ends when the build's processes are gone, not when Nix's output locks are released:
//! a killed Nix worker releases the locks and its builder dies (parent-death signal), but the
//! builder's own children (a shell's make, a make's cc) run on. Until they are gone (the watcher
//! ends them after a grace period), their slot stays taken. This test process plays the worker.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{build_section, write_drv, write_profile, Hook};
use nix_tier_tests::hook_env::{process_gone, wait_for};
use nix_tier_tests::{cgroups_present, ReadOnlyCgroupRoot};

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    wait_for(what, Duration::from_secs(10), || done().then_some(()));
}

/// Whether the broker (its watcher) holds a pidfd for `pid` (it follows the build's processes).
fn broker_follows(pid: u32) -> bool {
    let watchers = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| fs::read(e.path().join("cmdline")).is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == b"--broker")));
    watchers.into_iter().any(|w| {
        fs::read_dir(w.path().join("fdinfo")).into_iter().flatten().flatten().any(|fd| {
            fs::read_to_string(fd.path()).is_ok_and(|info| info.lines().any(|l| l.split_whitespace().eq(["Pid:", &pid.to_string()])))
        })
    })
}

/// Admits a heavy build, runs its builder as a shell with a child, "kills the worker" (the
/// shell dies, the output lock is released) and checks the next heavy build waits for the child.
fn the_slot_is_held_until_the_children_are_gone(cgroup_root: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("hw.json");
    let mut build = build_section(8000);
    build["defaultTier"] = "heavy".into(); // one heavy job at a time
    write_profile(&profile, build);
    let mut hook = Hook::start_with_broker(&[
        ("NIX_TIER_PROFILE", &profile),
        ("NIX_TIER_STATE_DIR", &dir.path().join("state")),
        ("NIX_TIER_CGROUP_ROOT", cgroup_root),
    ]);

    let (first, out) = write_drv(dir.path(), "first-1.0");
    let lock = fs::File::create(format!("{}.lock", out.display())).unwrap();
    lock.lock().unwrap();
    assert_eq!(hook.ask(&first).last().map(String::as_str), Some("# decline"), "first admitted");
    let pid_file = dir.path().join("child.pid");
    let mut shell = Command::new("/bin/sh")
        .args(["-c", &format!("sleep 60 & echo $! > {}; wait", pid_file.display())])
        .env("out", &out)
        .spawn()
        .unwrap();
    let mut child = 0;
    wait_until("the builder's child", || {
        child = fs::read_to_string(&pid_file).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0);
        child != 0
    });
    wait_until("the watcher to follow the child", || {
        broker_follows(child)
            || fs::read_to_string(format!("/proc/{child}/cgroup")).is_ok_and(|c| c.contains("/nix-tier/first-1.0-"))
    });

    // The worker is killed: its builder dies, the kernel releases its output lock.
    shell.kill().unwrap();
    shell.wait().unwrap();
    drop(lock);
    assert!(!process_gone(child), "precondition: the child outlives the builder");

    let (second, second_out) = write_drv(dir.path(), "second-1.0");
    let second_lock = fs::File::create(format!("{}.lock", second_out.display())).unwrap();
    second_lock.lock().unwrap();
    let lines = hook.ask(&second);
    assert_eq!(lines.last().map(String::as_str), Some("# postpone"), "the child still holds the heavy slot: {lines:?}");

    wait_until("the watcher to end the leftover child", || process_gone(child));
    let ended = Instant::now();
    let mut reply = String::new();
    wait_until("the second build to be admitted", || {
        reply = hook.ask(&second).last().cloned().unwrap_or_default();
        reply == "# decline"
    });
    eprintln!("admitted {:?} after the leftover child was gone", ended.elapsed());
}

#[test]
fn a_builds_children_hold_its_slot_until_gone_without_cgroups() {
    // Single-user Nix, no cgroups: the watcher follows the builder's descendants itself.
    let not_a_cgroup = tempfile::tempdir().unwrap();
    the_slot_is_held_until_the_children_are_gone(not_a_cgroup.path());
}

#[test]
fn a_builds_children_hold_its_slot_until_gone_in_its_cgroup() {
    let Some(cgroups) = cgroups_present() else { return };
    let root = ReadOnlyCgroupRoot::new("nix-tier-test-leftovers", cgroups);
    the_slot_is_held_until_the_children_are_gone(root.memory());
    wait_until("the build's cgroup to be removed", || root.builds().is_empty());
}
