//! The hook, run as root, keeps only CAP_SYS_PTRACE and CAP_KILL, and still bounds builds
//! under a read-only (0555, root-owned) cgroup root: it makes its parent there first.

mod common;

use std::fs;
use std::process::Command;
use std::time::Duration;

use common::{build_section, write_drv, write_profile, Hook};
use nix_tier_tests::hook_env::wait_for;
use nix_tier_tests::{cgroups_present, requires, ReadOnlyCgroupRoot};

fn status_field(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let value = status.lines().find_map(|l| l.strip_prefix(&format!("{field}:"))).unwrap();
    u64::from_str_radix(value.trim(), 16).unwrap()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    wait_for(what, Duration::from_secs(10), || done().then_some(()));
}

#[test]
fn the_hook_keeps_only_what_it_needs_and_bounds_builds_under_a_read_only_root() {
    let Some(cgroups) = cgroups_present() else { return };
    if !requires(status_field(std::process::id(), "CapEff") != 0, "root with capabilities") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("hw.json");
    write_profile(&profile, build_section(8000));
    let root = ReadOnlyCgroupRoot::new("nix-tier-test-priv", cgroups);
    let mut hook = Hook::start_with_broker(&[
        ("NIX_TIER_PROFILE", &profile),
        ("NIX_TIER_STATE_DIR", &dir.path().join("state")),
        ("NIX_TIER_CGROUP_ROOT", root.memory()),
    ]);

    // This process plays the Nix worker: it holds the output lock and forks the builder.
    let (drv, out) = write_drv(dir.path(), "bounded-1.0");
    let lock = fs::File::create(format!("{}.lock", out.display())).unwrap();
    lock.lock().unwrap();
    let lines = hook.ask(&drv);
    assert_eq!(lines, vec!["# decline".to_string()], "admitted, with nothing to complain about");
    assert!(root.memory().join("nix-tier").is_dir(), "the parent was made under the 0555 root");

    let expected = (1u64 << 19) | (1u64 << 5); // CAP_SYS_PTRACE, CAP_KILL
    let pid = hook.child.id();
    let sets: Vec<(&str, u64)> =
        ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"].into_iter().map(|f| (f, status_field(pid, f))).collect();
    assert_eq!(sets, [("CapEff", expected), ("CapPrm", expected), ("CapBnd", expected), ("CapInh", 0), ("CapAmb", 0)], "{sets:x?}");

    // The builder: placed by the hook's watcher, which has no CAP_DAC_OVERRIDE either.
    let mut builder = Command::new("sleep").arg("30").env("out", &out).spawn().unwrap();
    let cgroup_of = |pid: u32| fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let parent = format!("{}/nix-tier/", root.memory().file_name().unwrap().to_string_lossy());
    wait_until("the builder to be placed under the read-only root", || cgroup_of(builder.id()).contains(&parent));
    let watcher = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|p| fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.windows(8).any(|w| w == b"--broker")))
        .expect("a broker runs");
    assert_eq!(status_field(watcher, "CapEff"), expected, "the broker runs with the hook's capabilities");

    builder.kill().unwrap();
    builder.wait().unwrap();
    drop(lock);
    wait_until("the build's cgroup to be removed", || root.builds().is_empty());
}
