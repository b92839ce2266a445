//! One interface over cgroup v1 and v2 for nix-tier's per-build cgroups.
//!
//! Every build the hook admits gets its own cgroup under one parent (`nix-tier`), with a memory
//! limit and a CPU quota. The two kernel interfaces differ only in where files live and what
//! they are called; [`Hierarchy`] hides that:
//!
//! | | v1 (separate `memory`, `cpu`, `cpuacct` mounts) | v2 (one unified tree) |
//! | --- | --- | --- |
//! | memory limit | `memory.limit_in_bytes` | `memory.max` |
//! | peak memory | `memory.max_usage_in_bytes` | `memory.peak` |
//! | OOM kills | `oom_kill` in `memory.oom_control` | `oom_kill` in `memory.events` |
//! | CPU quota | `cpu.cfs_quota_us` / `cpu.cfs_period_us` | `cpu.max` |
//! | CPU time | `cpuacct.usage` (ns) | `usage_usec` in `cpu.stat` |

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The scheduler period for CPU quotas (100 ms, the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// Which kernel interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// cgroup v1: one hierarchy per controller.
    V1,
    /// cgroup v2: the unified hierarchy.
    V2,
}

/// Why no cgroup can be used.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// Neither a writable v2 tree nor writable v1 memory and cpu controllers were found.
    #[error("no writable cgroup hierarchy: {0}")]
    NotFound(String),
}

/// Where per-build cgroups are created: the parent cgroup(s) for all tier builds.
#[derive(Debug, Clone)]
pub struct Hierarchy {
    version: Version,
    /// v2: the one parent directory; v1: the memory, cpu and (optional) cpuacct parents.
    parents: Vec<(Controller, PathBuf)>,
}

/// A controller's share of the work (one directory each on v1, all in one directory on v2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Controller {
    Memory,
    Cpu,
    CpuAcct,
    Unified,
}

/// Limits of one build.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Memory limit in bytes; the kernel OOM-kills inside the cgroup beyond it.
    pub memory_bytes: Option<u64>,
    /// CPU quota in cores (time per scheduler period).
    pub cpu_cores: Option<u32>,
}

/// What a build's cgroup measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Highest memory use, bytes (when the kernel reports it).
    pub peak_memory_bytes: Option<u64>,
    /// Processes the kernel OOM-killed inside the cgroup.
    pub oom_kills: u64,
    /// CPU time used by the cgroup's processes.
    pub cpu_time: Option<Duration>,
}

impl Hierarchy {
    /// Finds a writable hierarchy: `$NIX_TIER_CGROUP_ROOT` (a v2 directory delegated to Nix,
    /// as NixOS gives nix-daemon), else `mount_root` (normally `/sys/fs/cgroup`) as v2 when it is
    /// the unified tree, else its `memory`, `cpu` and `cpuacct` v1 mounts. Builds go under
    /// `<root>/<parent>`.
    pub fn detect(mount_root: &Path, parent: &str) -> Result<Hierarchy, Unavailable> {
        if let Some(root) = std::env::var_os("NIX_TIER_CGROUP_ROOT") {
            return Hierarchy::v2(Path::new(&root), parent);
        }
        if mount_root.join("cgroup.controllers").is_file() {
            return Hierarchy::v2(mount_root, parent);
        }
        Hierarchy::v1(&mount_root.join("memory"), &mount_root.join("cpu"), Some(&mount_root.join("cpuacct")), parent)
    }

    /// A v2 hierarchy rooted at `root`: enables the memory and cpu controllers for the children
    /// of `root` and of `<root>/<parent>`, which it creates. Refused unless both controllers end
    /// up enabled: a cgroup without them would bound nothing. (cgroup v2 allows enabling them
    /// only in a cgroup without processes of its own, so `root` must be a delegated subtree the
    /// daemon does not run in itself, e.g. systemd's `DelegateSubgroup=`.)
    pub fn v2(root: &Path, parent: &str) -> Result<Hierarchy, Unavailable> {
        let dir = root.join(parent);
        mkdir(&dir).map_err(|e| Unavailable::NotFound(format!("{}: {e}", dir.display())))?;
        for dir in [root, dir.as_path()] {
            let _ = fs::write(dir.join("cgroup.subtree_control"), "+memory +cpu");
        }
        let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
        let missing: Vec<&str> = ["memory", "cpu"]
            .into_iter()
            .filter(|c| !enabled.split_whitespace().any(|e| e.trim_start_matches('+') == *c))
            .collect();
        if !missing.is_empty() {
            return Err(Unavailable::NotFound(format!(
                "cgroup v2 at {}: the {} controller(s) cannot be enabled for builds there; point \
                 NIX_TIER_CGROUP_ROOT at a subtree delegated to the Nix daemon",
                root.display(),
                missing.join(" and ")
            )));
        }
        Ok(Hierarchy { version: Version::V2, parents: vec![(Controller::Unified, dir)] })
    }

    /// A v1 hierarchy from the memory and cpu controller mounts (and cpuacct for CPU time,
    /// unless it shares the cpu mount), each with a `<parent>` child.
    pub fn v1(memory: &Path, cpu: &Path, cpuacct: Option<&Path>, parent: &str) -> Result<Hierarchy, Unavailable> {
        let mut parents = Vec::new();
        for (controller, mount, probe) in [
            (Controller::Memory, Some(memory), "memory.limit_in_bytes"),
            (Controller::Cpu, Some(cpu), "cpu.cfs_quota_us"),
            (Controller::CpuAcct, cpuacct, "cpuacct.usage"),
        ] {
            let Some(mount) = mount else { continue };
            if !mount.join(probe).is_file() {
                if controller == Controller::CpuAcct {
                    continue;
                }
                return Err(Unavailable::NotFound(format!("{} has no {probe}", mount.display())));
            }
            let dir = mount.join(parent);
            mkdir(&dir).map_err(|e| Unavailable::NotFound(format!("{}: {e}", dir.display())))?;
            parents.push((controller, dir));
        }
        Ok(Hierarchy { version: Version::V1, parents })
    }

    /// Which interface this is.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Creates the cgroup `name` with `limits`.
    pub fn create(&self, name: &str, limits: &Limits) -> io::Result<BuildCgroup> {
        let dirs: Vec<(Controller, PathBuf)> = self.parents.iter().map(|(c, p)| (*c, p.join(name))).collect();
        for (_, dir) in &dirs {
            mkdir(dir)?;
        }
        let cgroup = BuildCgroup { version: self.version, dirs };
        cgroup.apply(limits)?;
        Ok(cgroup)
    }
}

/// One build's cgroup.
#[derive(Debug, Clone)]
pub struct BuildCgroup {
    version: Version,
    dirs: Vec<(Controller, PathBuf)>,
}

impl BuildCgroup {
    /// The cgroup's directory (the memory one on v1).
    pub fn path(&self) -> &Path {
        &self.dirs[0].1
    }

    fn dir(&self, wanted: Controller) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(c, _)| *c == wanted || *c == Controller::Unified)
            .map(|(_, d)| d.as_path())
    }

    fn apply(&self, limits: &Limits) -> io::Result<()> {
        if let (Some(bytes), Some(dir)) = (limits.memory_bytes, self.dir(Controller::Memory)) {
            match self.version {
                Version::V1 => {
                    // Charges made before the move follow the process (v1 only; best effort,
                    // newer kernels deprecate it).
                    let _ = fs::write(dir.join("memory.move_charge_at_immigrate"), "3");
                    fs::write(dir.join("memory.limit_in_bytes"), bytes.to_string())?;
                }
                Version::V2 => {
                    fs::write(dir.join("memory.max"), bytes.to_string())?;
                    // Swapping past the limit would only hide the overrun.
                    let _ = fs::write(dir.join("memory.swap.max"), "0");
                }
            }
        }
        if let (Some(cores), Some(dir)) = (limits.cpu_cores, self.dir(Controller::Cpu)) {
            let quota = u64::from(cores.max(1)) * CPU_PERIOD_US;
            match self.version {
                Version::V1 => {
                    fs::write(dir.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                    fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())?;
                }
                Version::V2 => fs::write(dir.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))?,
            }
        }
        Ok(())
    }

    /// Moves process `pid` (not its existing children) into the cgroup; processes it forks
    /// later are born inside.
    pub fn add(&self, pid: u32) -> io::Result<()> {
        for (_, dir) in &self.dirs {
            fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// The processes in the cgroup.
    pub fn pids(&self) -> io::Result<Vec<u32>> {
        let text = fs::read_to_string(self.path().join("cgroup.procs"))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Peak memory, OOM kills and CPU time so far.
    pub fn stats(&self) -> Stats {
        let memory = self.dir(Controller::Memory);
        let read = |dir: Option<&Path>, file: &str| dir.and_then(|d| fs::read_to_string(d.join(file)).ok());
        match self.version {
            Version::V1 => Stats {
                peak_memory_bytes: read(memory, "memory.max_usage_in_bytes").and_then(|t| t.trim().parse().ok()),
                oom_kills: read(memory, "memory.oom_control").and_then(|t| keyed(&t, "oom_kill")).unwrap_or(0),
                cpu_time: read(self.dir(Controller::CpuAcct), "cpuacct.usage")
                    .and_then(|t| t.trim().parse().ok())
                    .map(Duration::from_nanos),
            },
            Version::V2 => Stats {
                peak_memory_bytes: read(memory, "memory.peak").and_then(|t| t.trim().parse().ok()),
                oom_kills: read(memory, "memory.events").and_then(|t| keyed(&t, "oom_kill")).unwrap_or(0),
                cpu_time: read(memory, "cpu.stat").and_then(|t| keyed(&t, "usage_usec")).map(Duration::from_micros),
            },
        }
    }

    /// Removes the cgroup once its processes are gone (the kernel refuses while any remain).
    pub fn remove(&self) -> io::Result<()> {
        for (_, dir) in &self.dirs {
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // A laid-out test tree holds regular files the kernel would not have.
                Err(_) if !is_cgroupfs(dir) => fs::remove_dir_all(dir)?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn mkdir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// Whether `dir` is on a cgroup (v1 or v2) file system.
fn is_cgroupfs(dir: &Path) -> bool {
    use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC};
    statfs(dir).is_ok_and(|fs| [CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC].contains(&fs.filesystem_type()))
}

/// The value of `key` in "key value" lines (memory.events, memory.oom_control, cpu.stat).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_values_are_read() {
        let events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\n";
        assert_eq!(keyed(events, "oom_kill"), Some(2));
        assert_eq!(keyed(events, "oom"), Some(3));
        assert_eq!(keyed("usage_usec 1500\nuser_usec 1000\n", "usage_usec"), Some(1500));
        assert_eq!(keyed(events, "missing"), None);
    }
}
