//! Helpers for the build hook's end-to-end tests (`tests/tests/hook.rs`): the test builder, the
//! DAG fixture, profiles with chosen tier limits, a private `nix-daemon`, commands with a time
//! limit, and the analysis of the intervals the builders recorded.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::{binary, plugin_path, stderr, target_dir, NixSandbox};

/// The statically linked `nix-tier-testbuilder` (it also runs inside a chroot store, which has
/// no dynamic loader). `NIX_TIER_TESTBUILDER` points elsewhere when needed.
pub fn testbuilder() -> PathBuf {
    let path = std::env::var_os("NIX_TIER_TESTBUILDER").map(PathBuf::from).unwrap_or_else(|| {
        let host = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
        target_dir().join("../static").join(host).join("release/nix-tier-testbuilder")
    });
    assert!(
        path.is_file(),
        "{} missing: run ./scripts/test, or RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release \
         -p nix-tier-testbuilder --target <host triple> --target-dir target/static",
        path.display()
    );
    path.canonicalize().expect("canonical testbuilder path")
}

/// The build hook under test.
pub fn hook_binary() -> PathBuf {
    binary("nix-tier-hook")
}

/// `tests/fixtures/dag/default.nix`'s directory.
pub fn dag_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/dag")
}

/// Milliseconds since the Unix epoch (the unit of the builders' records).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

// ---------------------------------------------------------------------------------------------
// Serialising timing-sensitive tests

static TIMING: RwLock<()> = RwLock::new(());

/// Held by tests that only count concurrency: they may run beside each other.
pub fn shared_machine() -> RwLockReadGuard<'static, ()> {
    TIMING.read().unwrap_or_else(|e| e.into_inner())
}

/// Held by tests that measure delays: no other hook test of this binary runs meanwhile.
pub fn exclusive_machine() -> RwLockWriteGuard<'static, ()> {
    TIMING.write().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Profiles

/// Limits of one tier.
#[derive(Debug, Clone, Copy)]
pub struct TierLimits {
    pub max_jobs: u64,
    pub cores: u64,
    pub memory_mib: u64,
}

/// The `build` section of a profile.
#[derive(Debug, Clone)]
pub struct Limits {
    pub budget_mib: u64,
    pub heavy: TierLimits,
    pub medium: TierLimits,
    pub light: TierLimits,
}

impl Limits {
    /// The limits of `tier` ("heavy", "medium", "light").
    pub fn tier(&self, tier: &str) -> TierLimits {
        match tier {
            "heavy" => self.heavy,
            "medium" => self.medium,
            "light" => self.light,
            other => panic!("unknown tier {other:?}"),
        }
    }

    /// `build` as the profile schema spells it (docs/profile.md).
    pub fn build_json(&self) -> Value {
        let tier = |t: TierLimits| json!({ "maxJobs": t.max_jobs, "cores": t.cores, "memoryMiB": t.memory_mib });
        json!({
            "memoryBudgetMiB": self.budget_mib,
            "defaultTier": "light",
            "rules": [],
            "tiers": { "heavy": tier(self.heavy), "medium": tier(self.medium), "light": tier(self.light) },
        })
    }
}

/// This machine's profile (`nix-tier profile`) with its `build` section replaced by `limits`.
pub fn profile_json(limits: &Limits) -> Value {
    let out = Command::new(binary("nix-tier")).arg("profile").output().expect("run nix-tier profile");
    assert!(out.status.success(), "nix-tier profile failed: {}", stderr(&out));
    let mut profile: Value = serde_json::from_slice(&out.stdout).expect("nix-tier profile prints JSON");
    profile["source"] = json!("pinned");
    profile["build"] = limits.build_json();
    profile
}

/// Writes `profile` to `relative` in the sandbox and returns its absolute path.
pub fn write_profile_json(sandbox: &NixSandbox, relative: &str, profile: &Value) -> PathBuf {
    sandbox.write(relative, &serde_json::to_string_pretty(profile).unwrap())
}

/// Writes this machine's profile with `limits` to `relative` in the sandbox.
pub fn write_profile(sandbox: &NixSandbox, relative: &str, limits: &Limits) -> PathBuf {
    write_profile_json(sandbox, relative, &profile_json(limits))
}

/// Configuration lines that install the hook: the plugin (so that Nix forwards
/// `hardware-profile` to the hook), the profile, and a one-second poll interval. They go in the
/// sandbox's user configuration file (`NIX_USER_CONF_FILES`), which every Nix honours: Nix 2.25
/// to 2.33 drop `build-hook` from the configuration directory's nix.conf.
pub fn hook_conf(profile: &Path) -> String {
    format!(
        "build-hook = {}\nplugin-files = {}\nhardware-profile = {}\nbuild-poll-interval = 1\n",
        hook_binary().display(),
        plugin_path().display(),
        profile.display()
    )
}

/// A sandbox using the hook with a profile of `limits` (written to `hw.json`), plus `extra_conf`.
pub fn hook_sandbox(limits: &Limits, extra_conf: &str) -> (NixSandbox, PathBuf) {
    // The profile is written after the sandbox exists, so the conf names its future path.
    let sandbox = NixSandbox::with_conf("");
    let profile = write_profile(&sandbox, "hw.json", limits);
    sandbox.write("conf/user.conf", &format!("{}{extra_conf}\n", hook_conf(&profile)));
    (sandbox, profile)
}

/// A sandbox using the hook with a profile of `limits`, plus `extra_conf`, and its `records`
/// directory (created). With `sandboxed`, builds run in Nix's build sandbox (`sandbox = true`,
/// the Linux default), with the test builder and the record directory bind-mounted in.
pub fn hook_sandbox_recording(limits: &Limits, sandboxed: bool, extra_conf: &str) -> (NixSandbox, PathBuf) {
    let (sandbox, _) = hook_sandbox(limits, extra_conf);
    let records = sandbox.path().join("records");
    fs::create_dir_all(&records).unwrap();
    if sandboxed {
        let conf = format!("{}{}", base_conf(), sandboxing(&[&testbuilder(), &records]));
        sandbox.write("conf/nix.conf", &conf);
    }
    (sandbox, records)
}

/// nix.conf lines that build in Nix's sandbox with `paths` bind-mounted in (later lines of
/// nix.conf override the base `sandbox = false`).
pub fn sandboxing(paths: &[&Path]) -> String {
    let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    format!("sandbox = true\nsandbox-paths = {}\n", paths.join(" "))
}

/// Waits up to `timeout` for `event` to return `Some`, polling every 10 ms; panics with
/// `what` when it never does.
pub fn wait_for<T>(what: &str, timeout: Duration, mut event: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = event() {
            return value;
        }
        assert!(Instant::now() < deadline, "waited {timeout:?} for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The base settings `NixSandbox::with_conf` writes: no substituters, no sandbox, builds as the
/// calling user (what this machine can run).
pub fn base_conf() -> &'static str {
    "substituters =\nsandbox = false\nbuild-users-group =\n"
}

// ---------------------------------------------------------------------------------------------
// The DAG fixture

/// Per-tier numbers.
#[derive(Debug, Clone, Copy)]
pub struct PerTier {
    pub heavy: u64,
    pub medium: u64,
    pub light: u64,
}

impl PerTier {
    fn nix(&self) -> String {
        format!("{{ heavy = {}; medium = {}; light = {}; }}", self.heavy, self.medium, self.light)
    }
}

/// Arguments of `tests/fixtures/dag/default.nix`.
#[derive(Debug, Clone)]
pub struct Dag {
    pub prefix: String,
    pub counts: PerTier,
    pub sleep_ms: PerTier,
    /// Memory each builder really allocates (the hook reserves the profile's amount instead).
    pub mem_mib: PerTier,
    /// `""`: record nothing.
    pub record_dir: PathBuf,
    /// A Nix expression for `extraAttrs`.
    pub extra_attrs: String,
    /// Every derivation a package of its own (the fixture's `packagePerDerivation`), so that
    /// none reserves what an earlier build of the session taught.
    pub package_per_derivation: bool,
}

impl Dag {
    /// A DAG named `prefix` recording into `record_dir`, with small allocations.
    pub fn new(prefix: &str, counts: PerTier, sleep_ms: PerTier, record_dir: &Path) -> Dag {
        Dag {
            prefix: prefix.to_string(),
            counts,
            sleep_ms,
            mem_mib: PerTier { heavy: 48, medium: 24, light: 8 },
            record_dir: record_dir.to_path_buf(),
            extra_attrs: "{ }".to_string(),
            package_per_derivation: false,
        }
    }

    /// Names of every derivation, aggregator included.
    pub fn names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for (tier, n) in [("heavy", self.counts.heavy), ("medium", self.counts.medium), ("light", self.counts.light)] {
            let dash = if self.package_per_derivation { "" } else { "-" };
            names.extend((0..n).map(|i| format!("{}-{tier}{dash}{i}", self.prefix)));
        }
        names.push(format!("{}-all", self.prefix));
        names
    }

    /// `nix-build` arguments: the fixture and its `--arg`s.
    pub fn args(&self) -> Vec<String> {
        vec![
            dag_fixture().display().to_string(),
            "--argstr".into(),
            "builder".into(),
            testbuilder().display().to_string(),
            "--argstr".into(),
            "recordDir".into(),
            self.record_dir.display().to_string(),
            "--argstr".into(),
            "prefix".into(),
            self.prefix.clone(),
            "--arg".into(),
            "counts".into(),
            self.counts.nix(),
            "--arg".into(),
            "sleepMs".into(),
            self.sleep_ms.nix(),
            "--arg".into(),
            "memMiB".into(),
            self.mem_mib.nix(),
            "--arg".into(),
            "extraAttrs".into(),
            self.extra_attrs.clone(),
            "--arg".into(),
            "packagePerDerivation".into(),
            self.package_per_derivation.to_string(),
        ]
    }

    /// A `nix-build -j <jobs> --no-out-link` of the DAG (all of it, or `-A attr`) on `cmd`,
    /// which carries the sandbox's environment (see [`NixSandbox::command`], [`NixDaemon::command`]).
    pub fn build_command(&self, mut cmd: Command, jobs: u32, attr: Option<&str>) -> Command {
        cmd.args(self.args())
            .args(["-j", &jobs.to_string(), "--no-out-link", "--option", "build-poll-interval", "1"]);
        if let Some(attr) = attr {
            cmd.args(["-A", attr]);
        }
        cmd
    }
}

// ---------------------------------------------------------------------------------------------
// Records and their analysis

/// One builder run, as the test builder recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub start_ms: u64,
    pub end_ms: u64,
    pub tier: String,
    pub mem_mib: u64,
}

/// The records in `record_dir/records` (none when the file is missing).
pub fn read_records(record_dir: &Path) -> Vec<Record> {
    let text = match fs::read_to_string(record_dir.join("records")) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("reading records in {}: {e}", record_dir.display()),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.len(), 5, "malformed record line {line:?}");
            Record {
                name: f[0].to_string(),
                start_ms: f[1].parse().expect("start"),
                end_ms: f[2].parse().expect("end"),
                tier: f[3].to_string(),
                mem_mib: f[4].parse().expect("mem"),
            }
        })
        .collect()
}

/// When a builder started, from `record_dir/started/<name>`: `(pid, pgid, start_ms)`.
pub fn started(record_dir: &Path, name: &str) -> Option<(u32, u32, u64)> {
    let text = fs::read_to_string(record_dir.join("started").join(name)).ok()?;
    let f: Vec<&str> = text.split_whitespace().collect();
    if f.len() != 3 {
        return None; // being written
    }
    Some((f[0].parse().ok()?, f[1].parse().ok()?, f[2].parse().ok()?))
}

/// Waits up to `timeout` for the builder `name` to start; its `(pid, pgid, start_ms)`.
pub fn wait_started(record_dir: &Path, name: &str, timeout: Duration) -> Option<(u32, u32, u64)> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = started(record_dir, name) {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The peaks of a set of runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peaks {
    /// Most builds of each tier running at once.
    pub per_tier: BTreeMap<String, usize>,
    /// Most builds running at once.
    pub total: usize,
    /// Largest sum of the builders' own `memMiB` at once.
    pub mem_mib: u64,
    /// Largest sum of the reservations (`reservation(tier)`) at once.
    pub reserved_mib: u64,
    /// The runs making up the largest reservation, for messages.
    pub reserved_at_peak: Vec<String>,
}

impl Peaks {
    /// Peak concurrency of `tier` (0 when it never ran).
    pub fn tier(&self, tier: &str) -> usize {
        self.per_tier.get(tier).copied().unwrap_or(0)
    }
}

/// Sweeps the start and end events of `records`. Intervals are half-open: a build ending at the
/// millisecond another starts does not overlap it.
pub fn peaks(records: &[Record], reservation: impl Fn(&str) -> u64) -> Peaks {
    // (time, kind, index): kind 0 = end, 1 = start, so ends sort first at equal times.
    let mut events: Vec<(u64, u8, usize)> = Vec::new();
    for (i, r) in records.iter().enumerate() {
        events.push((r.start_ms, 1, i));
        events.push((r.end_ms, 0, i));
    }
    events.sort();
    let mut running: Vec<usize> = Vec::new();
    let mut peaks = Peaks::default();
    for (_, kind, i) in events {
        if kind == 0 {
            running.retain(|&j| j != i);
            continue;
        }
        running.push(i);
        let mut per_tier: BTreeMap<&str, usize> = BTreeMap::new();
        for &j in &running {
            *per_tier.entry(records[j].tier.as_str()).or_default() += 1;
        }
        for (tier, n) in per_tier {
            let peak = peaks.per_tier.entry(tier.to_string()).or_default();
            *peak = (*peak).max(n);
        }
        peaks.total = peaks.total.max(running.len());
        peaks.mem_mib = peaks.mem_mib.max(running.iter().map(|&j| records[j].mem_mib).sum());
        let reserved: u64 = running.iter().map(|&j| reservation(&records[j].tier)).sum();
        if reserved > peaks.reserved_mib {
            peaks.reserved_mib = reserved;
            peaks.reserved_at_peak = running.iter().map(|&j| records[j].name.clone()).collect();
        }
    }
    peaks
}

/// The records as a table sorted by start, relative to the first start, for failure messages.
pub fn timeline(records: &[Record]) -> String {
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.start_ms, r.end_ms));
    let t0 = sorted.first().map_or(0, |r| r.start_ms);
    sorted
        .iter()
        .map(|r| format!("  {:>6} {:>6}  {:<7} {}\n", r.start_ms - t0, r.end_ms - t0, r.tier, r.name))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Processes

/// What a finished command left.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Panics with the command's stderr unless it succeeded.
    pub fn assert_success(&self, what: &str) -> &Self {
        assert!(self.status.success(), "{what} failed ({}):\n{}", self.status, tail(&self.stderr, 60));
        self
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A child process in its own process group whose output goes to files in `dir`; killed with its
/// group when dropped unfinished.
pub struct Running {
    child: Option<Child>,
    pub pid: u32,
    out: PathBuf,
    err: PathBuf,
    what: String,
}

impl Running {
    /// Spawns `cmd` in a new process group; stdout and stderr go to `dir/<what>.out|err`.
    pub fn spawn(mut cmd: Command, dir: &Path, what: &str) -> Running {
        fs::create_dir_all(dir).unwrap();
        let out = dir.join(format!("{what}.out"));
        let err = dir.join(format!("{what}.err"));
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap())
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        Running { pid: child.id(), child: Some(child), out, err, what: what.to_string() }
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits at most `timeout`; on timeout kills the process group and panics with its stderr.
    pub fn wait(mut self, timeout: Duration) -> Finished {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                kill_group(self.pid);
                let _ = child.wait();
                panic!("{} ran longer than {timeout:?}; stderr:\n{}", self.what, tail(&self.stderr(), 60));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Finished {
            status,
            stdout: fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: fs::read_to_string(&self.err).unwrap_or_default(),
        }
    }

    /// `kill -9` of its whole process group, then reaps it.
    pub fn kill9(mut self) -> ExitStatus {
        kill_group(self.pid);
        self.child.take().unwrap().wait().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                kill_group(self.pid);
                let _ = child.wait();
            }
        }
    }
}

/// Runs `cmd` (own process group, output in `dir/<what>.*`) for at most `timeout`.
pub fn run_with_timeout(cmd: Command, dir: &Path, what: &str, timeout: Duration) -> Finished {
    Running::spawn(cmd, dir, what).wait(timeout)
}

/// `kill -9 -- -pgid`.
pub fn kill_group(pgid: u32) {
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).stderr(Stdio::null()).status();
}

/// Whether `pid` no longer runs (absent, or a zombie nobody reaped: PID 1 of a container may
/// not reap orphans).
pub fn process_gone(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// Waits up to `timeout` until every pid in `pids` is gone.
pub fn wait_gone(pids: &[u32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if pids.iter().all(|&p| process_gone(p)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    pids.iter().all(|&p| process_gone(p))
}

// ---------------------------------------------------------------------------------------------
// A private nix-daemon

/// A real `nix-daemon` serving a sandbox's store on `$NIX_STATE_DIR/daemon-socket/socket`
/// (Nix 2.8's location, under the sandbox's own state directory). Killed, with its connection
/// workers, when dropped.
pub struct NixDaemon<'a> {
    sandbox: &'a NixSandbox,
    process: Option<Running>,
}

impl<'a> NixDaemon<'a> {
    /// Starts the daemon (its own process group; log in `daemon.err` of the sandbox root) on an
    /// initialised store and waits until its socket accepts connections.
    pub fn start(sandbox: &'a NixSandbox) -> NixDaemon<'a> {
        NixDaemon::start_in(sandbox, &[], &[])
    }

    /// As [`NixDaemon::start`], with `env` added to the daemon's environment (its hooks inherit
    /// it) and the daemon first moved into the cgroups whose `cgroup.procs` files `cgroups`
    /// names, as a service manager starts it in its unit's cgroup.
    pub fn start_in(sandbox: &'a NixSandbox, cgroups: &[PathBuf], env: &[(&str, &Path)]) -> NixDaemon<'a> {
        // A new store is created by whichever connection worker opens it first, and Nix writes
        // its schema file in place: a second worker reading it meanwhile finds it "corrupt".
        // Real daemons serve a store that exists; so do these.
        let init = sandbox.command("nix-store").arg("--init").output().unwrap();
        assert!(init.status.success(), "nix-store --init failed: {}", stderr(&init));
        let socket = sandbox.path().join("state/daemon-socket/socket");
        let mut command = sandbox.command("/bin/sh");
        command.args(["-c", r#"for procs; do echo $$ >"$procs" || exit 1; done; exec nix-daemon"#, "sh"]).args(cgroups);
        command.envs(env.iter().copied());
        let process = Running::spawn(command, sandbox.path(), "daemon");
        let mut daemon = NixDaemon { sandbox, process: Some(process) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                return daemon;
            }
            let proc = daemon.process.as_mut().unwrap();
            assert!(proc.is_running(), "nix-daemon exited:\n{}", proc.stderr());
            assert!(Instant::now() < deadline, "nix-daemon socket {} never appeared:\n{}", socket.display(), proc.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A client command: the sandbox's environment with `NIX_REMOTE=daemon`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = self.sandbox.command(program);
        cmd.env("NIX_REMOTE", "daemon");
        cmd
    }

    /// The daemon's stderr so far (the hook's messages go there, not to clients).
    pub fn log(&self) -> String {
        self.process.as_ref().map(Running::stderr).unwrap_or_default()
    }
}

impl Drop for NixDaemon<'_> {
    fn drop(&mut self) {
        if let Some(process) = self.process.take() {
            // Connection workers are forked children in the daemon's process group.
            process.kill9();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Store queries

/// Whether `path` is a valid path of the sandbox's store.
pub fn is_valid(cmd: Command, path: &str) -> bool {
    let mut cmd = cmd;
    cmd.args(["--check-validity", path]).stdout(Stdio::null()).stderr(Stdio::null());
    cmd.status().map(|s| s.success()).unwrap_or(false)
}

/// The hook's state directory in `sandbox`.
pub fn state_dir(sandbox: &NixSandbox) -> PathBuf {
    sandbox.path().join("state/nix-tier")
}

/// The pid of the broker of `sandbox`, from its lock file, once one runs.
pub fn broker_pid(sandbox: &NixSandbox) -> i32 {
    wait_for("a broker's pid in broker.lock", Duration::from_secs(10), || {
        let pid: i32 = fs::read_to_string(state_dir(sandbox).join("broker.lock")).ok()?.trim().parse().ok()?;
        (!process_gone(pid as u32)).then_some(pid)
    })
}

/// What the brokers of `sandbox` wrote to `broker.log`, for a failing test's message.
pub fn broker_log(sandbox: &NixSandbox) -> String {
    fs::read_to_string(state_dir(sandbox).join("broker.log")).unwrap_or_else(|e| format!("(no broker.log: {e})"))
}

/// Kills the broker of `sandbox` (SIGKILL) and waits until it is gone; its pid.
pub fn kill_broker(sandbox: &NixSandbox) -> i32 {
    let broker = broker_pid(sandbox);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(broker), nix::sys::signal::Signal::SIGKILL).unwrap();
    // Gone once its socket refuses connections: a killed process's threads and descriptors go a
    // moment after its main thread is a zombie.
    wait_for("the killed broker's socket to close", Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(state_dir(sandbox).join("broker.sock")).is_err().then_some(())
    });
    broker
}

/// Waits until the hook's watcher lock of build `name` holds its job: what a broker started
/// after the one watching it finds it from.
pub fn wait_for_watcher_lock(sandbox: &NixSandbox, name: &str) {
    wait_for(&format!("the watcher lock of {name}"), Duration::from_secs(10), || {
        fs::read_dir(state_dir(sandbox).join("leases"))
            .ok()?
            .flatten()
            .any(|e| fs::read_to_string(e.path()).is_ok_and(|t| t.contains(name)))
            .then_some(())
    });
}

/// `nix-tier status --json` with `cmd`'s environment (a [`NixSandbox::command`] of the binary).
pub fn status_json(sandbox: &NixSandbox) -> Result<Value, String> {
    let out = sandbox.command(binary("nix-tier")).args(["status", "--json"]).output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("nix-tier status --json failed ({}): {}", out.status, stderr(&out)));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("nix-tier status --json printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}
