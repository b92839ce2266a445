//! The watcher of one admitted build: bounds it with a cgroup and records how it went.
//!
//! Nix forks the builder only after the hook has answered, so the hook starts a watcher per
//! admitted build: `nix-tier-hook --watch-build <job>`, in its own process group so it outlives
//! the hook (Nix kills the hook's group when its worker ends). The watcher
//!
//! 1. creates the build's cgroup (memory limit = the build's reservation, CPU quota = its tier's
//!    cores) under the `nix-tier` parent;
//! 2. finds the builder: the child of the Nix worker whose environment holds the build's
//!    `<output>=<path>` entries (any process, for sandboxed builders that are reparented), and
//!    moves it and its descendants in, rescanning until nothing new appears; with build users,
//!    every process of the builder's uid belongs to the build and is moved too. Processes forked
//!    after the move are born inside;
//! 3. watches the output locks: the build ends when Nix releases them; an OOM kill inside the
//!    cgroup is reported in the build's own log at once;
//! 4. records the build (wall and CPU time, peak memory, outcome) in the history database and
//!    removes the cgroup.

use std::collections::HashSet;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix_tier_cgroups::{BuildCgroup, Hierarchy, Limits};
use nix_tier_model::Tier;
use serde::{Deserialize, Serialize};

use crate::history::{package_and_version, BuildRecord, Outcome};
use crate::output_locks::HeldLocks;
use crate::procfs;

/// The argument that turns `nix-tier-hook` into a watcher.
pub const WATCH_ARG: &str = "--watch-build";

/// The parent cgroup of all tier builds.
pub const CGROUP_PARENT: &str = "nix-tier";

const MIB: u64 = 1024 * 1024;

/// Everything a watcher needs to know about its build.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchJob {
    /// The .drv path.
    pub drv: String,
    /// The derivation's name.
    pub name: String,
    /// Its tier.
    pub tier: Tier,
    /// Its memory limit, MiB (the reservation).
    #[serde(rename = "memoryLimitMiB")]
    pub memory_limit_mib: u64,
    /// Whether the limit was learned from the package's history (else it is the tier's).
    pub limit_learned: bool,
    /// Its CPU quota, cores.
    pub cores: u32,
    /// Nix's output locks: the build runs while one is held.
    pub lock_files: Vec<PathBuf>,
    /// `<output name>=<path>` entries of the builder's environment.
    pub output_env: Vec<String>,
    /// The output paths.
    pub outputs: Vec<String>,
    /// The Nix worker that will fork the builder.
    pub nix_pid: u32,
    /// The uids a builder of this Nix may run as: the worker's own and the build users'.
    pub builder_uids: Vec<u32>,
    /// When it was admitted, milliseconds since the epoch.
    pub started_unix_ms: u64,
    /// The lease's watcher lock, held while the build has processes (`Lease::watcher_lock`).
    pub watcher_lock: PathBuf,
    /// The state directory (history database).
    pub state_dir: PathBuf,
    /// The prepared parent of builds' cgroups; `None` where none is usable (the build is
    /// watched and recorded, not bounded).
    pub cgroups: Option<Hierarchy>,
}

/// How a watched build ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// Whether the builder was ever found (if not, Nix did not start it after all).
    pub started: bool,
    /// Wall time from admission to the release of the locks.
    pub wall: Duration,
    /// CPU time inside the cgroup.
    pub cpu: Option<Duration>,
    /// Peak memory: the cgroup's, plus what its processes held when they were moved in.
    pub peak_bytes: Option<u64>,
    /// OOM kills inside the cgroup.
    pub oom_kills: u64,
    /// Whether the build ran in a cgroup with the limit.
    pub bounded: bool,
    /// Whether the outputs are valid (the locks were deleted and the paths exist).
    pub succeeded: bool,
}

/// Starts a watcher for `job` as a detached child of this process.
pub fn spawn(job: &WatchJob) -> io::Result<Child> {
    // /proc/self/exe still works after the binary was upgraded in place (current_exe() would
    // name a deleted file).
    Command::new("/proc/self/exe")
        .arg(WATCH_ARG)
        .arg(serde_json::to_string(job)?)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
}

/// How often the watcher looks for the builder: every millisecond at first, so that it is
/// placed before it grows (Nix starts it within milliseconds of the answer), less often when
/// Nix is slow to start it (a busy worker, a large sandbox to set up).
fn search_pause(since_admission: Duration) -> Duration {
    match since_admission.as_millis() {
        0..2000 => Duration::from_millis(1),
        2000..10_000 => Duration::from_millis(10),
        _ => Duration::from_millis(100),
    }
}

/// Watches the build to its end.
pub fn watch(job: &WatchJob) -> Finished {
    // The lease lasts while this is held: until every process of the build is gone.
    let _watcher_lock = WatcherLock::hold(&job.watcher_lock);
    // Created once the builder is found: Nix may find no free slot after all, and let go.
    let mut cgroup: Option<BuildCgroup> = None;
    let mut descendants = Descendants::default();
    let admitted = Instant::now();
    let my_uid = procfs::uid(std::process::id());
    let mut builder: Option<Builder> = None;
    let mut build_user: Option<u32> = None;
    let mut moved: HashSet<u32> = HashSet::new();
    let mut reported_kills = 0;
    let mut charged_outside: u64 = 0;
    let mut polls: u64 = 0;
    let mut full_scans: u64 = 0;
    let mut locks_checked: Option<Instant> = None;
    // Nothing is moved once Nix has released the locks: Nix frees the build user only after
    // that, and the next build may get the same uid within one poll.
    // A live builder means a running build, whatever one read of the lock table says. While
    // the builder is searched for, the lock table (costlier) is read every 20 ms.
    let locks_held = || HeldLocks::read().is_ok_and(|held| job.lock_files.iter().any(|f| held.holds(f, job.nix_pid)));
    loop {
        let running = match builder.as_ref() {
            Some(b) => !b.wait_exit(Duration::ZERO) || locks_held(),
            None if locks_checked.is_some_and(|at| at.elapsed() < Duration::from_millis(20)) => true,
            None => {
                locks_checked = Some(Instant::now());
                locks_held()
            }
        };
        if !running {
            break;
        }
        if builder.is_none() {
            builder = find_builder(job, admitted.elapsed(), &mut full_scans).and_then(Builder::open);
            build_user = builder.as_ref().and_then(|b| procfs::uid(b.pid)).filter(|uid| *uid != 0 && Some(*uid) != my_uid);
            if builder.is_some() {
                cgroup = create_cgroup(job);
            }
        }
        if let (Some(b), Some(cgroup)) = (builder.as_mut(), cgroup.as_ref()) {
            let mut pids = procfs::tree(b.pid);
            // With build users, every process of the uid is the build's: also those that left
            // the builder's tree (double forks). A scan of all of /proc, so not at every poll.
            if let (Some(uid), 0) = (build_user, polls % 10) {
                pids.extend(procfs::pids_of_user(uid));
            }
            for pid in pids {
                // What a process already held stays charged where it was (the kernel no longer
                // moves charges): its size just after the move is added to the peak, which then
                // errs high, the safe side for learned reservations.
                if !moved.contains(&pid) && cgroup.add(pid).is_ok() {
                    moved.insert(pid);
                    charged_outside += procfs::resident_bytes(pid).unwrap_or(0);
                }
            }
            let stats = cgroup.stats();
            if stats.oom_kills > reported_kills {
                reported_kills = stats.oom_kills;
                b.tell_log(&oom_message(job, stats.peak_memory_bytes));
            }
        } else if let Some(b) = builder.as_ref() {
            // No cgroup: the build's processes are the builder's descendants, followed while it
            // runs (they are reparented away once it is gone).
            descendants.track(procfs::tree(b.pid));
        }
        polls += 1;
        // Fast while the builder is starting (so it is moved before it grows), slow after.
        let pause = match builder.as_ref() {
            None => search_pause(admitted.elapsed()),
            // Ended: Nix releases the locks within moments, and the lease with them.
            Some(b) if b.log.is_none() => Duration::from_millis(5),
            Some(_) if admitted.elapsed() < Duration::from_secs(1) => Duration::from_millis(5),
            Some(_) => Duration::from_millis(100),
        };
        match builder.as_mut() {
            Some(b) if b.log.is_some() => {
                if b.wait_exit(pause) {
                    // Killed builders are reported before their log closes, and the watcher's
                    // copy of the log goes at once, so Nix sees its end without waiting for us.
                    if let Some(cgroup) = cgroup.as_ref() {
                        let stats = cgroup.stats();
                        if stats.oom_kills > reported_kills {
                            reported_kills = stats.oom_kills;
                            b.tell_log(&oom_message(job, stats.peak_memory_bytes));
                        }
                    }
                    b.log = None;
                }
            }
            _ => std::thread::sleep(pause),
        }
    }
    let wall = admitted.elapsed();
    let stats = cgroup.as_ref().map(|c| {
        end_leftovers(c);
        c.stats()
    });
    descendants.end();
    if let Some(cgroup) = &cgroup {
        let _ = cgroup.remove();
    }
    // Nix deletes the lock files only after registering the outputs of a build it ran.
    let succeeded = job.lock_files.iter().all(|f| !f.exists()) && job.outputs.iter().all(|o| Path::new(o).exists());
    Finished {
        // A build too short to be seen still ran when its outputs are there; one whose builder
        // was never seen and that left no outputs was let go by Nix (no slot after all): it is
        // asked for again, and that admission records it.
        started: builder.is_some() || succeeded,
        wall,
        cpu: stats.and_then(|s| s.cpu_time),
        peak_bytes: stats.and_then(|s| s.peak_memory_bytes).map(|peak| peak + charged_outside),
        oom_kills: stats.map_or(0, |s| s.oom_kills),
        bounded: cgroup.is_some(),
        succeeded,
    }
}

/// The name of one admission of `drv` at `admitted_ms`: of its cgroup and its watcher lock.
/// Unique per admission: Nix may ask again for a build it then had no slot for.
pub fn admission_name(drv: &str, admitted_ms: u64) -> String {
    let stem = Path::new(drv).file_stem().map_or_else(|| "build".into(), |s| s.to_string_lossy());
    format!("{stem}-{admitted_ms}")
}

/// Where the watcher lock of an admission lives: `<state dir>/leases/<admission>.lock`.
pub fn watcher_lock_path(state_dir: &Path, drv: &str, admitted_ms: u64) -> PathBuf {
    state_dir.join("leases").join(format!("{}.lock", admission_name(drv, admitted_ms)))
}

fn create_cgroup(job: &WatchJob) -> Option<BuildCgroup> {
    let limits = Limits { memory_bytes: Some(job.memory_limit_mib * MIB), cpu_cores: Some(job.cores) };
    job.cgroups.as_ref()?.create(&admission_name(&job.drv, job.started_unix_ms), &limits).ok()
}

/// The watcher lock, held (flock) until dropped; the file goes first, then the lock.
struct WatcherLock {
    path: PathBuf,
    _file: std::fs::File,
}

impl WatcherLock {
    /// Creates and locks `path` (in the private state directory's `leases`), writing this
    /// process's pid into it for [`HeldLocks::holds_watcher_lock`].
    fn hold(path: &Path) -> Option<WatcherLock> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let dir = path.parent()?;
        if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(dir) {
            (e.kind() == io::ErrorKind::AlreadyExists).then_some(())?;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(path)
            .ok()?;
        file.try_lock().ok()?;
        file.write_all(std::process::id().to_string().as_bytes()).ok()?;
        Some(WatcherLock { path: path.to_path_buf(), _file: file })
    }
}

impl Drop for WatcherLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Processes of a build without a cgroup, each held through a pidfd (so a reused pid is never
/// signalled): the builder's descendants as seen while it ran.
#[derive(Default)]
struct Descendants(Vec<(u32, OwnedFd)>);

impl Descendants {
    /// Adds the processes of `pids` not yet held.
    fn track(&mut self, pids: impl IntoIterator<Item = u32>) {
        for pid in pids {
            if !self.0.iter().any(|(p, _)| *p == pid) {
                if let Some(fd) = pidfd_open(pid) {
                    self.0.push((pid, fd));
                }
            }
        }
    }

    /// Waits for them to end; after a grace period kills what is left. At most 5 s.
    fn end(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let grace = Instant::now() + Duration::from_millis(500);
        loop {
            self.0.retain(|(_, fd)| !exited(fd, Duration::ZERO));
            if self.0.is_empty() || Instant::now() > deadline {
                return;
            }
            if Instant::now() > grace {
                for (_, fd) in &self.0 {
                    // SAFETY: a plain system call on a descriptor this struct owns.
                    unsafe {
                        nix::libc::syscall(nix::libc::SYS_pidfd_send_signal, fd.as_raw_fd(), nix::libc::SIGKILL, 0, 0)
                    };
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A pidfd for `pid`.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: a plain system call; the returned descriptor is owned exactly once.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid as nix::libc::pid_t, 0) };
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits up to `timeout` for the process of `pidfd` to exit; whether it has.
fn exited(pidfd: &OwnedFd, timeout: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    poll(&mut fds, timeout).is_ok_and(|ready| ready > 0)
}

/// The builder: the child of the Nix worker whose environment holds the build's output
/// entries. Sandboxed builders are children of the worker too (Nix's sandbox helper clones them
/// with `CLONE_PARENT`, from 2.8 to today). Should one not be found there for a second, every
/// process of a uid Nix builds as is searched, once a second. Output paths are public, so a
/// process of another user claiming them is never taken for the builder.
fn find_builder(job: &WatchJob, since_admission: Duration, full_scans: &mut u64) -> Option<u32> {
    let is_builder = |pid: &u32| job.output_env.iter().any(|entry| procfs::has_env_entry(*pid, entry));
    procfs::children(job.nix_pid).into_iter().find(is_builder).or_else(|| {
        if since_admission.as_secs() <= *full_scans {
            return None;
        }
        *full_scans = since_admission.as_secs();
        procfs::all_pids()
            .into_iter()
            .filter(|pid| procfs::uid(*pid).is_some_and(|uid| job.builder_uids.contains(&uid)))
            .find(is_builder)
    })
}

/// Nix ends a build's processes itself; what remains after it released the locks belongs to an
/// abandoned build (its client was killed) and is killed, so the cgroup can go.
fn end_leftovers(cgroup: &BuildCgroup) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let grace = Instant::now() + Duration::from_millis(500);
    while let Ok(pids) = cgroup.pids() {
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        if Instant::now() > grace {
            for pid in pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The leases of the builds whose watchers (processes of this user) keep `state_dir`: each
/// carries its build's job in its command line. What rebuilds a lost state file; the caller
/// then drops those whose output locks are no longer held.
pub fn running_leases(state_dir: &Path) -> Vec<crate::state::Lease> {
    let me = procfs::uid(std::process::id());
    procfs::all_pids()
        .into_iter()
        .filter(|pid| procfs::uid(*pid) == me)
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            (args.get(1) == Some(&WATCH_ARG.as_bytes())).then_some(())?;
            serde_json::from_slice::<WatchJob>(args.get(2)?).ok()
        })
        .filter(|job| job.state_dir == state_dir)
        .map(|job| crate::state::Lease {
            drv: job.drv,
            name: job.name,
            tier: job.tier,
            memory_mib: job.memory_limit_mib,
            lock_files: job.lock_files,
            started: job.started_unix_ms / 1000,
            nix_pid: job.nix_pid,
            watcher_lock: Some(job.watcher_lock),
        })
        .collect()
}

/// The line a user sees in the build log when the kernel kills inside the build's cgroup.
pub fn oom_message(job: &WatchJob, peak_bytes: Option<u64>) -> String {
    let peak = peak_bytes.map_or_else(|| "unknown".to_string(), |b| format!("{} MiB", b / MIB));
    let advice = match job.limit_learned {
        true => "The limit was learned from its past builds; its next build gets the tier's figure again".to_string(),
        false => format!("Raise build.tiers.{}.memoryMiB in the hardware profile", job.tier),
    };
    format!(
        "nix-tier: {} exceeded its memory limit of {} MiB ({} tier) and was killed by the kernel; \
         peak {peak}. {advice}, or see 'nix-tier history'.",
        job.name, job.memory_limit_mib, job.tier
    )
}

/// The builder process, held through a pidfd (its exit is seen at once, and its pid cannot be
/// reused meanwhile), and its log: a copy of its standard error.
struct Builder {
    pid: u32,
    pidfd: OwnedFd,
    /// The descriptor is borrowed from the builder (`pidfd_getfd`), never reopened by path with
    /// the watcher's credentials, and kept only if it is a pipe or a terminal, as Nix gives
    /// builders: a builder cannot point it at a file. Held only while the builder lives.
    log: Option<std::fs::File>,
}

impl Builder {
    /// Takes hold of process `pid` (needs CAP_SYS_PTRACE or the same uid for its log).
    fn open(pid: u32) -> Option<Builder> {
        use nix::libc::{syscall, SYS_pidfd_getfd};
        let pidfd = pidfd_open(pid)?;
        // SAFETY: a plain system call; the returned descriptor is owned exactly once.
        let fd = unsafe { syscall(SYS_pidfd_getfd, pidfd.as_raw_fd(), 2, 0) };
        let fd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) });
        let log = fd
            .filter(|fd| {
                nix::sys::stat::fstat(fd.as_raw_fd()).is_ok_and(|st| {
                    let kind = st.st_mode & nix::libc::S_IFMT;
                    kind == nix::libc::S_IFIFO || kind == nix::libc::S_IFCHR
                })
            })
            .map(std::fs::File::from);
        Some(Builder { pid, pidfd, log })
    }

    /// Waits up to `timeout` for the builder to exit; whether it has.
    fn wait_exit(&self, timeout: Duration) -> bool {
        exited(&self.pidfd, timeout)
    }

    /// Writes `line` into the build's log, which Nix shows as the build's output.
    fn tell_log(&mut self, line: &str) {
        if let Some(log) = self.log.as_mut() {
            let _ = log.write_all(format!("{line}\n").as_bytes());
        }
    }
}

/// The history row of a finished build.
pub fn record(job: &WatchJob, finished: &Finished) -> BuildRecord {
    let (package, version) = package_and_version(&job.name);
    BuildRecord {
        drv: job.drv.clone(),
        package,
        version,
        tier: job.tier,
        started_unix_ms: job.started_unix_ms,
        wall_ms: finished.wall.as_millis() as u64,
        cpu_ms: finished.cpu.map(|d| d.as_millis() as u64),
        peak_mib: finished.peak_bytes.map(|b| b.div_ceil(MIB)),
        limit_mib: finished.bounded.then_some(job.memory_limit_mib),
        outcome: match (finished.oom_kills > 0, finished.succeeded) {
            (true, _) => Outcome::OomKilled,
            (false, true) => Outcome::Succeeded,
            (false, false) => Outcome::Failed,
        },
    }
}
