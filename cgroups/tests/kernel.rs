//! The cgroup interface against the real kernel: v1 as mounted on this machine, v2 on a
//! cgroup2 file system mounted for the test, and v2 limit files on a directory laid out like
//! one (where this kernel binds memory and cpu to v1, a fresh cgroup2 mount offers neither).

use std::fs;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nix_tier_cgroups::{Hierarchy, Limits, Version};

const MIB: u64 = 1024 * 1024;

fn is_root() -> bool {
    nix_is_root()
}

fn nix_is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .is_some_and(|uids| uids.split_whitespace().next() == Some("0"))
}

/// A shell that waits, then runs `command`: it is moved into the cgroup before the command.
fn delayed(command: &str) -> Child {
    Command::new("/bin/sh").args(["-c", &format!("sleep 0.3; exec {command}")]).spawn().unwrap()
}

fn wait_for_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "child did not exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn v1_memory_limit_kills_inside_the_cgroup_and_peak_is_measured() {
    if !is_root() || !Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
        eprintln!("skipped: needs root and cgroup v1 memory");
        return;
    }
    let parent = format!("nix-tier-test-{}", std::process::id());
    let hierarchy = Hierarchy::detect(Path::new("/sys/fs/cgroup"), &parent).unwrap();
    assert_eq!(hierarchy.version(), Version::V1);

    // Over the limit: dd's 200 MiB buffer in a 64 MiB cgroup is OOM-killed there.
    let hog = hierarchy.create("hog", &Limits { memory_bytes: Some(64 * MIB), cpu_cores: Some(1) }).unwrap();
    let mut over = delayed("dd if=/dev/zero of=/dev/null bs=200M count=1 status=none");
    hog.add(over.id()).unwrap();
    assert_eq!(hog.pids().unwrap(), vec![over.id()]);
    // Beside it, within its own limit: untouched.
    let fine = hierarchy.create("fine", &Limits { memory_bytes: Some(256 * MIB), cpu_cores: Some(1) }).unwrap();
    let mut within = delayed("dd if=/dev/zero of=/dev/null bs=100M count=1 status=none");
    fine.add(within.id()).unwrap();

    let killed = wait_for_exit(&mut over, Duration::from_secs(10));
    assert!(!killed.success(), "dd over its limit should have been killed");
    assert!(hog.stats().oom_kills >= 1, "{:?}", hog.stats());
    assert!(wait_for_exit(&mut within, Duration::from_secs(10)).success());
    let stats = fine.stats();
    assert_eq!(stats.oom_kills, 0);
    let peak = stats.peak_memory_bytes.unwrap();
    assert!((100 * MIB..=110 * MIB).contains(&peak), "peak {} MiB for a 100 MiB buffer", peak / MIB);
    assert!(stats.cpu_time.is_some(), "cpuacct time");

    hog.remove().unwrap();
    fine.remove().unwrap();
    assert!(!hog.path().exists());
    for controller in ["memory", "cpu", "cpuacct"] {
        let _ = fs::remove_dir(Path::new("/sys/fs/cgroup").join(controller).join(&parent));
    }
}

#[test]
fn v1_cpu_quota_holds_a_spinner_to_one_core() {
    if !is_root() || !Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists() || num_cpus() < 2 {
        eprintln!("skipped: needs root, cgroup v1 cpu and 2 CPUs");
        return;
    }
    let parent = format!("nix-tier-test-cpu-{}", std::process::id());
    let hierarchy = Hierarchy::detect(Path::new("/sys/fs/cgroup"), &parent).unwrap();
    let cgroup = hierarchy.create("spin", &Limits { memory_bytes: None, cpu_cores: Some(1) }).unwrap();
    // Two busy loops: unbounded they would use two cores.
    let mut spinner = Command::new("/bin/sh")
        .args(["-c", "sleep 0.2; (while :; do :; done) & a=$!; (while :; do :; done) & b=$!; sleep 2; kill $a $b"])
        .spawn()
        .unwrap();
    cgroup.add(spinner.id()).unwrap();
    let start = Instant::now();
    let _ = wait_for_exit(&mut spinner, Duration::from_secs(10));
    let wall = start.elapsed().as_secs_f64();
    let cpu = cgroup.stats().cpu_time.unwrap().as_secs_f64();
    assert!(cpu / wall < 1.2, "{cpu:.2} s CPU in {wall:.2} s wall under a 1-core quota");
    assert!(cpu / wall > 0.6, "{cpu:.2} s CPU in {wall:.2} s wall: the spinners barely ran");
    std::thread::sleep(Duration::from_millis(100));
    cgroup.remove().unwrap();
    for controller in ["memory", "cpu", "cpuacct"] {
        let _ = fs::remove_dir(Path::new("/sys/fs/cgroup").join(controller).join(&parent));
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Unmounts the test's cgroup2 mount when dropped.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn v2_without_memory_and_cpu_controllers_is_refused_on_a_real_cgroup2_mount() {
    // This kernel binds memory and cpu to v1, so a fresh cgroup2 mount cannot offer them: a
    // hierarchy there would bound nothing, and must say so rather than pretend.
    let dir = tempfile::tempdir().unwrap();
    let mounted = is_root()
        && Command::new("mount").args(["-t", "cgroup2", "none"]).arg(dir.path()).status().is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount cgroup2 here");
        return;
    }
    let _mount = Mount(dir.path().to_path_buf());
    let offered = fs::read_to_string(dir.path().join("cgroup.controllers")).unwrap();
    if offered.split_whitespace().any(|c| c == "memory") {
        eprintln!("skipped: this kernel's cgroup2 offers memory; the laid-out test covers limits");
        return;
    }
    let err = Hierarchy::v2(dir.path(), "nix-tier").unwrap_err().to_string();
    assert!(err.contains("memory") && err.contains("NIX_TIER_CGROUP_ROOT"), "{err}");
    fs::remove_dir(dir.path().join("nix-tier")).unwrap();
}

#[test]
fn v2_limits_and_stats_use_the_v2_files() {
    // A directory laid out like a delegated cgroup2 subtree.
    let root = tempfile::tempdir().unwrap();
    fs::write(root.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
    fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
    let hierarchy = Hierarchy::v2(root.path(), "nix-tier").unwrap();
    let cgroup = hierarchy.create("b1", &Limits { memory_bytes: Some(512 * MIB), cpu_cores: Some(3) }).unwrap();
    let read = |file: &str| fs::read_to_string(cgroup.path().join(file)).unwrap();
    assert_eq!(read("memory.max"), (512 * MIB).to_string());
    assert_eq!(read("cpu.max"), "300000 100000");
    assert_eq!(read("memory.swap.max"), "0");
    assert_eq!(fs::read_to_string(root.path().join("nix-tier/cgroup.subtree_control")).unwrap(), "+memory +cpu");

    fs::write(cgroup.path().join("memory.peak"), "123456789\n").unwrap();
    fs::write(cgroup.path().join("memory.events"), "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n").unwrap();
    fs::write(cgroup.path().join("cpu.stat"), "usage_usec 2500000\nuser_usec 2000000\n").unwrap();
    let stats = cgroup.stats();
    assert_eq!(stats.peak_memory_bytes, Some(123456789));
    assert_eq!(stats.oom_kills, 1);
    assert_eq!(stats.cpu_time, Some(Duration::from_millis(2500)));
    cgroup.add(4242).unwrap();
    assert_eq!(cgroup.pids().unwrap(), vec![4242]);
    cgroup.remove().unwrap();
    assert!(!cgroup.path().exists());
}
