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
//!
//! Which interface serves which controller is read from the mount table
//! (`/proc/self/mountinfo`, [`Mounts`]), and every directory is checked to be on a cgroup file
//! system (by its `statfs` magic) before anything is written there or removed from it.
//!
//! Creating the parent is the privileged step: cgroup roots are commonly mode 0555, owned by
//! root, so it needs `CAP_DAC_OVERRIDE` there. [`Hierarchy::prepare`] does it once, with the
//! privileges the caller starts with; per-build cgroups are then made inside the parent, which
//! belongs to the caller, without any capability.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC};
use serde::{Deserialize, Serialize};

/// The scheduler period for CPU quotas (100 ms, the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// Which kernel interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Version {
    /// cgroup v1: one hierarchy per controller.
    V1,
    /// cgroup v2: the unified hierarchy.
    V2,
}

/// Why no cgroup can be used; the text says what was found and what to change.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(String);

impl From<String> for Unavailable {
    fn from(reason: String) -> Unavailable {
        Unavailable(reason)
    }
}

/// A controller's share of the work (one directory each on v1, all in one directory on v2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Controller {
    Memory,
    Cpu,
    CpuAcct,
}

/// The cgroup file systems mounted here, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mounts {
    /// Mount points of cgroup2 file systems.
    v2: Vec<PathBuf>,
    /// Mount points of cgroup v1 hierarchies with the controllers each carries.
    v1: Vec<(PathBuf, Vec<String>)>,
}

impl Mounts {
    /// Reads this process's mount table.
    pub fn read() -> io::Result<Mounts> {
        Ok(Mounts::parse(&fs::read_to_string("/proc/self/mountinfo")?))
    }

    /// Parses mountinfo text (proc(5)): `id parent dev root mountpoint options [optional…] -
    /// fstype source superoptions`.
    pub fn parse(text: &str) -> Mounts {
        let mut mounts = Mounts::default();
        for line in text.lines() {
            let Some((left, right)) = line.split_once(" - ") else { continue };
            let Some(point) = left.split_whitespace().nth(4) else { continue };
            let mut right = right.split_whitespace();
            let (Some(fstype), Some(options)) = (right.next(), right.nth(1)) else { continue };
            let point = PathBuf::from(unescape(point));
            match fstype {
                "cgroup2" => mounts.v2.push(point),
                "cgroup" => mounts.v1.push((point, options.split(',').map(str::to_string).collect())),
                _ => {}
            }
        }
        mounts
    }

    /// The v1 mount carrying `controller`.
    fn v1_mount(&self, controller: &str) -> Option<&Path> {
        self.v1.iter().find(|(_, options)| options.iter().any(|o| o == controller)).map(|(p, _)| p.as_path())
    }

    /// The v1 mount that holds `dir` (the longest mount point above it).
    fn v1_mount_of(&self, dir: &Path) -> Option<&Path> {
        self.v1.iter().map(|(p, _)| p.as_path()).filter(|p| dir.starts_with(p)).max_by_key(|p| p.as_os_str().len())
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where per-build cgroups are created: the parent cgroup(s) for all tier builds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "HierarchyFields")]
pub struct Hierarchy {
    version: Version,
    /// The parent's directories, each with the controllers it serves (one on v2; memory, cpu
    /// and, when mounted apart from cpu, cpuacct on v1). Never empty.
    parents: Vec<(Vec<Controller>, PathBuf)>,
}

/// A [`Hierarchy`] as read (a build's job, from a hook or a watcher's lock file), before it is
/// checked to name a parent.
#[derive(Deserialize)]
struct HierarchyFields {
    version: Version,
    parents: Vec<(Vec<Controller>, PathBuf)>,
}

impl TryFrom<HierarchyFields> for Hierarchy {
    type Error = &'static str;

    fn try_from(fields: HierarchyFields) -> Result<Hierarchy, Self::Error> {
        match fields.parents.is_empty() {
            true => Err("a cgroup hierarchy without a parent directory"),
            false => Ok(Hierarchy { version: fields.version, parents: fields.parents }),
        }
    }
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
    /// Creates (or validates) the parent `<root>/<parent>` for builds and returns the
    /// hierarchy; the privileged step, done once before dropping privileges.
    ///
    /// `root` is a directory on a cgroup file system (`$NIX_TIER_CGROUP_ROOT`): on v2 a
    /// subtree delegated to Nix; on v1 a directory of any controller's hierarchy, whose
    /// relative path is used under the memory, cpu and cpuacct mounts alike. Without one, the
    /// root of the cgroup2 mount when it offers the memory and cpu controllers, else the roots of
    /// the v1 memory and cpu mounts.
    pub fn prepare(mounts: &Mounts, root: Option<&Path>, parent: &str) -> Result<Hierarchy, Unavailable> {
        match root {
            Some(root) => match fs_magic(root) {
                Some(magic) if magic == CGROUP2_SUPER_MAGIC => Hierarchy::v2(root, parent),
                Some(magic) if magic == CGROUP_SUPER_MAGIC => {
                    let mount = mounts.v1_mount_of(root).ok_or_else(|| {
                        Unavailable(format!("{}: no cgroup v1 mount holds it in /proc/self/mountinfo", root.display()))
                    })?;
                    let relative = root.strip_prefix(mount).expect("the mount is a prefix of root");
                    Hierarchy::v1(mounts, relative, parent)
                }
                Some(_) => Err(Unavailable(format!(
                    "NIX_TIER_CGROUP_ROOT={} is not on a cgroup file system; name a cgroup directory \
                     (v2: a subtree delegated to the Nix daemon; v1: a directory under the memory mount)",
                    root.display()
                ))),
                None => Err(Unavailable(format!(
                    "NIX_TIER_CGROUP_ROOT={} does not exist; create that cgroup or unset the variable",
                    root.display()
                ))),
            },
            None => {
                let usable_v2 = mounts.v2.iter().find(|m| {
                    let offered = fs::read_to_string(m.join("cgroup.controllers")).unwrap_or_default();
                    ["memory", "cpu"].iter().all(|c| offered.split_whitespace().any(|o| o == *c))
                });
                match usable_v2 {
                    Some(mount) => Hierarchy::v2(mount, parent),
                    None => Hierarchy::v1(mounts, Path::new(""), parent),
                }
            }
        }
    }

    /// A v2 parent under `root`: enables the memory and cpu controllers for the children of
    /// `root` and of `<root>/<parent>`, which it creates. Refused unless both controllers end up
    /// enabled: a cgroup without them would bound nothing. (cgroup v2 enables them only in a
    /// cgroup without processes of its own, so `root` must be a delegated subtree the daemon
    /// does not run in itself, e.g. systemd's `DelegateSubgroup=`.)
    fn v2(root: &Path, parent: &str) -> Result<Hierarchy, Unavailable> {
        if fs_magic(root) != Some(CGROUP2_SUPER_MAGIC) {
            return Err(Unavailable(format!("{} is not a cgroup2 file system", root.display())));
        }
        let dir = root.join(parent);
        mkdir(&dir).map_err(|e| Unavailable(format!("cannot create {}: {e}", dir.display())))?;
        for dir in [root, dir.as_path()] {
            let _ = fs::write(dir.join("cgroup.subtree_control"), "+memory +cpu");
        }
        let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
        let missing: Vec<&str> =
            ["memory", "cpu"].into_iter().filter(|c| !enabled.split_whitespace().any(|e| e == *c)).collect();
        if !missing.is_empty() {
            let _ = fs::remove_dir(&dir);
            return Err(Unavailable(format!(
                "cgroup v2 at {}: the {} controller(s) cannot be enabled for builds there; point \
                 NIX_TIER_CGROUP_ROOT at a subtree delegated to the Nix daemon",
                root.display(),
                missing.join(" and ")
            )));
        }
        Ok(Hierarchy { version: Version::V2, parents: vec![(vec![Controller::Memory, Controller::Cpu, Controller::CpuAcct], dir)] })
    }

    /// A v1 parent `<mount>/<relative>/<parent>` under the memory and cpu mounts (and cpuacct's
    /// for CPU time, unless it shares the cpu mount).
    fn v1(mounts: &Mounts, relative: &Path, parent: &str) -> Result<Hierarchy, Unavailable> {
        let mut parents: Vec<(Vec<Controller>, PathBuf)> = Vec::new();
        for (controller, name, probe) in [
            (Controller::Memory, "memory", "memory.limit_in_bytes"),
            (Controller::Cpu, "cpu", "cpu.cfs_quota_us"),
            (Controller::CpuAcct, "cpuacct", "cpuacct.usage"),
        ] {
            let Some(mount) = mounts.v1_mount(name) else {
                if controller == Controller::CpuAcct {
                    continue;
                }
                return Err(Unavailable(format!(
                    "no cgroup hierarchy offers the {name} controller (no cgroup2 mount with memory and cpu, \
                     no cgroup v1 {name} mount in /proc/self/mountinfo)"
                )));
            };
            let root = mount.join(relative);
            if let Some((served, _)) = parents.iter_mut().find(|(_, dir)| dir.starts_with(&root)) {
                served.push(controller); // co-mounted, e.g. cpu,cpuacct
                continue;
            }
            if fs_magic(&root) != Some(CGROUP_SUPER_MAGIC) || !root.join(probe).is_file() {
                return Err(Unavailable(format!("{} is not a cgroup v1 {name} directory (no {probe})", root.display())));
            }
            let dir = root.join(parent);
            mkdir(&dir).map_err(|e| Unavailable(format!("cannot create {}: {e}", dir.display())))?;
            parents.push((vec![controller], dir));
        }
        Ok(Hierarchy { version: Version::V1, parents })
    }

    /// Which interface this is.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The parent's directory (the memory controller's on v1).
    pub fn path(&self) -> &Path {
        &self.parents[0].1
    }

    /// Creates the cgroup `name` with `limits`. A CPU quota the kernel refuses (above a quota
    /// of an enclosing cgroup, which then bounds the build) leaves the memory limit alone; a
    /// cgroup whose memory limit is refused is removed again.
    pub fn create(&self, name: &str, limits: &Limits) -> io::Result<BuildCgroup> {
        let cgroup = self.child(name);
        let made = cgroup.dirs.iter().try_for_each(|(_, dir)| mkdir(dir));
        let limited = made.and_then(|()| cgroup.apply(limits).or_else(|_| cgroup.apply(&Limits { cpu_cores: None, ..*limits })));
        if let Err(e) = limited {
            let _ = cgroup.remove();
            return Err(e);
        }
        Ok(cgroup)
    }

    /// The child cgroup `name` if it exists (made earlier, e.g. by a process that is gone),
    /// with `limits` applied again: its maker may have gone between making it and applying
    /// them. Best effort: a limit the kernel refuses now leaves the one there.
    pub fn existing(&self, name: &str, limits: &Limits) -> Option<BuildCgroup> {
        let cgroup = self.child(name);
        let exists = cgroup.dirs.iter().all(|(_, dir)| dir.is_dir());
        exists.then(|| {
            let _ = cgroup.apply(limits);
            cgroup
        })
    }

    /// The child cgroup `name`, whether or not it exists.
    fn child(&self, name: &str) -> BuildCgroup {
        BuildCgroup { version: self.version, dirs: self.parents.iter().map(|(c, p)| (c.clone(), p.join(name))).collect() }
    }
}

/// One build's cgroup.
#[derive(Debug, Clone)]
pub struct BuildCgroup {
    version: Version,
    dirs: Vec<(Vec<Controller>, PathBuf)>,
}

impl BuildCgroup {
    /// The cgroup's directory (the memory one on v1).
    pub fn path(&self) -> &Path {
        &self.dirs[0].1
    }

    fn dir(&self, wanted: Controller) -> Option<&Path> {
        self.dirs.iter().find(|(served, _)| served.contains(&wanted)).map(|(_, d)| d.as_path())
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
        let text = read_kernel_text(self.path().join("cgroup.procs"))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Peak memory, OOM kills and CPU time so far.
    pub fn stats(&self) -> Stats {
        let memory = self.dir(Controller::Memory);
        let read = |dir: Option<&Path>, file: &str| dir.and_then(|d| read_kernel_text(d.join(file)).ok());
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

    /// Whether the kernel keeps the cgroup's peak memory: on cgroup v2 only from Linux 5.19
    /// (`memory.peak`). Where it does not, the caller samples [`BuildCgroup::memory_now`].
    pub fn keeps_peak(&self) -> bool {
        match self.version {
            Version::V1 => true,
            Version::V2 => self.dir(Controller::Memory).is_some_and(|dir| dir.join("memory.peak").exists()),
        }
    }

    /// The memory the cgroup's processes use now, bytes.
    pub fn memory_now(&self) -> Option<u64> {
        let file = match self.version {
            Version::V1 => "memory.usage_in_bytes",
            Version::V2 => "memory.current",
        };
        read_kernel_text(self.dir(Controller::Memory)?.join(file)).ok()?.trim().parse().ok()
    }

    /// Removes the cgroup once its processes are gone (the kernel refuses while any remain).
    /// Only `rmdir`: a cgroup directory holds no files of its own, and nothing that is not
    /// a cgroup is ever removed.
    pub fn remove(&self) -> io::Result<()> {
        for (_, dir) in &self.dirs {
            match fs::remove_dir(dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

/// Reads a file the kernel writes as it is read (`/proc`, cgroupfs). Their sizes say nothing
/// (0 or 4096), so none is asked for first: `fs::read` would add a `statx` and an `lseek` to each
/// read, and the broker reads such files for every build.
pub fn read_kernel_file(path: impl AsRef<Path>) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::with_capacity(1024);
    // `Take`'s read_to_end is the generic one, without `File`'s size hint.
    fs::File::open(path)?.take(u64::MAX).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// [`read_kernel_file`] as text.
pub fn read_kernel_text(path: impl AsRef<Path>) -> io::Result<String> {
    String::from_utf8(read_kernel_file(path)?).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn mkdir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// The file system type of `dir`, `None` when it cannot be read.
fn fs_magic(dir: &Path) -> Option<nix::sys::statfs::FsType> {
    statfs(dir).ok().map(|fs| fs.filesystem_type())
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

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn a_hierarchy_read_names_a_parent() {
        let read = |text: &str| serde_json::from_str::<Hierarchy>(text);
        assert!(read(r#"{"version":"V2","parents":[]}"#).is_err());
        let hierarchy = read(r#"{"version":"V2","parents":[[["Memory","Cpu"],"/sys/fs/cgroup/nix-tier"]]}"#).unwrap();
        assert_eq!(hierarchy.path(), Path::new("/sys/fs/cgroup/nix-tier"));
    }

    #[test]
    fn without_memory_peak_the_memory_now_is_read_for_sampling() {
        let dir = tempfile::tempdir().unwrap();
        let cgroup = BuildCgroup { version: Version::V2, dirs: vec![(vec![Controller::Memory, Controller::Cpu], dir.path().to_path_buf())] };
        std::fs::write(dir.path().join("memory.current"), "12345\n").unwrap();
        assert!(!cgroup.keeps_peak(), "a kernel before 5.19 has no memory.peak");
        assert_eq!(cgroup.memory_now(), Some(12345));
        assert_eq!(cgroup.stats().peak_memory_bytes, None);
        std::fs::write(dir.path().join("memory.peak"), "23456\n").unwrap();
        assert!(cgroup.keeps_peak());
        assert_eq!(cgroup.stats().peak_memory_bytes, Some(23456));
    }

    #[test]
    fn keyed_values_are_read() {
        let events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\n";
        assert_eq!(keyed(events, "oom_kill"), Some(2));
        assert_eq!(keyed(events, "oom"), Some(3));
        assert_eq!(keyed("usage_usec 1500\nuser_usec 1000\n", "usage_usec"), Some(1500));
        assert_eq!(keyed(events, "missing"), None);
    }

    #[test]
    fn mounts_are_read_from_mountinfo() {
        // A systemd host in hybrid mode (cpu and cpuacct co-mounted), with an escaped space.
        let text = "\
31 23 0:28 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
32 31 0:29 / /sys/fs/cgroup/unified rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:11 - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/memory rw,nosuid shared:12 - cgroup cgroup rw,memory
35 31 0:32 / /sys/fs/cgroup/name\\040space rw - cgroup cgroup rw,name=systemd
36 23 0:33 / /proc rw - proc proc rw
";
        let mounts = Mounts::parse(text);
        assert_eq!(mounts.v2, vec![PathBuf::from("/sys/fs/cgroup/unified")]);
        assert_eq!(mounts.v1_mount("cpuacct"), Some(Path::new("/sys/fs/cgroup/cpu,cpuacct")));
        assert_eq!(mounts.v1_mount("memory"), Some(Path::new("/sys/fs/cgroup/memory")));
        assert_eq!(mounts.v1_mount("blkio"), None);
        assert_eq!(mounts.v1_mount_of(Path::new("/sys/fs/cgroup/memory/ci/x")), Some(Path::new("/sys/fs/cgroup/memory")));
        assert_eq!(mounts.v1_mount_of(Path::new("/sys/fs/cgroup/name space")), Some(Path::new("/sys/fs/cgroup/name space")));
        assert_eq!(mounts.v1_mount_of(Path::new("/tmp")), None);
    }

    #[test]
    fn v2_limits_and_stats_use_the_v2_files() {
        // This kernel binds memory and cpu to v1, so no real cgroup2 tree here can offer them:
        // the v2 file names are checked on a directory laid out like one.
        let root = tempfile::tempdir().unwrap();
        let hierarchy = Hierarchy {
            version: Version::V2,
            parents: vec![(vec![Controller::Memory, Controller::Cpu, Controller::CpuAcct], root.path().to_path_buf())],
        };
        let cgroup = hierarchy.create("b1", &Limits { memory_bytes: Some(512 * MIB), cpu_cores: Some(3) }).unwrap();
        let read = |file: &str| fs::read_to_string(cgroup.path().join(file)).unwrap();
        assert_eq!(read("memory.max"), (512 * MIB).to_string());
        assert_eq!(read("cpu.max"), "300000 100000");
        assert_eq!(read("memory.swap.max"), "0");

        fs::write(cgroup.path().join("memory.peak"), "123456789\n").unwrap();
        fs::write(cgroup.path().join("memory.events"), "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n").unwrap();
        fs::write(cgroup.path().join("cpu.stat"), "usage_usec 2500000\nuser_usec 2000000\n").unwrap();
        let stats = cgroup.stats();
        assert_eq!(stats.peak_memory_bytes, Some(123456789));
        assert_eq!(stats.oom_kills, 1);
        assert_eq!(stats.cpu_time, Some(Duration::from_millis(2500)));
        cgroup.add(4242).unwrap();
        assert_eq!(cgroup.pids().unwrap(), vec![4242]);
        // Not a cgroup: its files stay, and so does the directory.
        assert!(cgroup.remove().is_err());
        assert!(cgroup.path().join("memory.max").exists());
    }

    #[test]
    fn a_root_that_is_not_a_cgroup_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Hierarchy::prepare(&Mounts::default(), Some(dir.path()), "nix-tier").unwrap_err().to_string();
        assert!(err.contains("not on a cgroup file system") && err.contains("NIX_TIER_CGROUP_ROOT"), "{err}");
        assert!(!dir.path().join("nix-tier").exists(), "nothing is created outside cgroups");
        let err = Hierarchy::prepare(&Mounts::default(), Some(&dir.path().join("missing")), "nix-tier").unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
