//! Harness for end-to-end tests: every test gets its own Nix store, state, log and configuration
//! directories (NIX_STORE_DIR, NIX_STATE_DIR, NIX_LOG_DIR, NIX_CONF_DIR), so tests never touch
//! /nix, never see the user's configuration, and can run in parallel.
//!
//! The binaries under test are the release builds made by `./scripts/test` (or `cargo build
//! --release`); `NIX_TIER_TARGET_DIR` points elsewhere when needed. The Nix under test is the
//! first `nix-instantiate` on `PATH`: `./scripts/test` runs the plugin's suites once with this
//! machine's Nix and once with the newer Nix `scripts/check-newer-nix` builds.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

pub mod guest;
pub mod hook_env;

/// Directory holding the release build of the workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("NIX_TIER_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release"))
}

/// The plugin as installed by `scripts/setup` and `scripts/check-newer-nix`: the loader and, in
/// `nix-tier-plugin/<Nix version>/`, the plugin build for each Nix they built it against.
pub fn plugin_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/plugin")
}

/// What `plugin-files` names: the loader, which loads the build for the running Nix.
pub fn plugin_path() -> PathBuf {
    let path = plugin_dir().join("libnix_tier_loader.so");
    assert!(path.is_file(), "{} missing: run ./scripts/setup", path.display());
    path
}

/// The plugin build the loader picks for the Nix under test.
pub fn plugin_build() -> PathBuf {
    let path = plugin_dir().join("nix-tier-plugin").join(nix_version()).join("libnix_tier_plugin.so");
    assert!(path.is_file(), "{} missing: run ./scripts/setup (and scripts/check-newer-nix for the newer Nix)", path.display());
    path
}

/// The version of the Nix under test, as Nix itself prints it (`nix::nixVersion`).
pub fn nix_version() -> String {
    let out = Command::new("nix-instantiate").arg("--version").output().expect("run nix-instantiate --version");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().last().expect("nix-instantiate --version printed a version").to_string()
}

/// A release binary of the workspace (`nix-tier`, `nix-tier-hook`, ...).
pub fn binary(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(path.is_file(), "{} missing: run ./scripts/test or cargo build --release", path.display());
    path
}

/// One isolated Nix installation: store, state, logs, configuration and a scratch directory.
pub struct NixSandbox {
    root: TempDir,
}

impl NixSandbox {
    /// A sandbox whose nix.conf loads the plugin, plus `extra_conf` lines.
    pub fn with_plugin(extra_conf: &str) -> Self {
        Self::with_conf(&format!("plugin-files = {}\n{extra_conf}", plugin_path().display()))
    }

    /// A sandbox with exactly the base settings plus `extra_conf` lines in its nix.conf.
    pub fn with_conf(extra_conf: &str) -> Self {
        let root = tempfile::Builder::new().prefix("nix-tier-test-").tempdir().expect("tempdir");
        for dir in ["store", "state", "log", "conf", "home", "work"] {
            fs::create_dir_all(root.path().join(dir)).expect("create sandbox dir");
        }
        let sandbox = NixSandbox { root };
        sandbox.write("conf/nix.conf", &format!("{}{extra_conf}\n", hook_env::base_conf()));
        sandbox
    }

    /// The sandbox's root directory.
    pub fn path(&self) -> &Path {
        self.root.path()
    }

    /// Writes `contents` to `relative` under the sandbox root and returns its absolute path.
    pub fn write(&self, relative: &str, contents: &str) -> PathBuf {
        let path = self.path().join(relative);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("create parent dir");
        }
        fs::write(&path, contents).expect("write sandbox file");
        path
    }

    /// A command for `program` with the sandbox's Nix environment.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let p = self.path();
        let mut cmd = Command::new(program);
        cmd.current_dir(p.join("work"))
            .env("NIX_STORE_DIR", p.join("store"))
            .env("NIX_STATE_DIR", p.join("state"))
            .env("NIX_LOG_DIR", p.join("log"))
            .env("NIX_CONF_DIR", p.join("conf"))
            .env("NIX_USER_CONF_FILES", p.join("conf/user.conf"))
            .env("HOME", p.join("home"))
            .env("XDG_CONFIG_HOME", p.join("home/.config"))
            .env("XDG_CACHE_HOME", p.join("home/.cache"))
            .env_remove("NIX_REMOTE")
            .env_remove("NIX_PATH");
        cmd
    }

    /// Runs `nix-instantiate --eval --strict --json` on `expr` with extra arguments.
    pub fn eval_with(&self, expr: &str, args: &[&str]) -> Output {
        self.command("nix-instantiate")
            .args(["--eval", "--strict", "--json"])
            .args(args)
            .args(["--expr", expr])
            .output()
            .expect("run nix-instantiate")
    }

    /// Evaluates `expr` and parses the JSON result; panics with Nix's stderr on failure.
    pub fn eval_json(&self, expr: &str) -> serde_json::Value {
        let out = self.eval_with(expr, &[]);
        assert!(out.status.success(), "evaluating {expr} failed:\n{}", stderr(&out));
        serde_json::from_slice(&out.stdout).expect("nix-instantiate printed JSON")
    }

    /// Evaluates `expr`, expecting failure; returns Nix's stderr.
    pub fn eval_error(&self, expr: &str, args: &[&str]) -> String {
        let out = self.eval_with(expr, args);
        assert!(!out.status.success(), "evaluating {expr} unexpectedly succeeded: {}", String::from_utf8_lossy(&out.stdout));
        stderr(&out)
    }
}

/// A process's standard error as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Whether the real subject of a test is here. When it is not, the test fails under `CI=true`
/// (CI must test it) with `what` saying what is missing; run by hand it is skipped, saying so.
/// Use as `if !requires(cond, "…") { return; }`.
pub fn requires(present: bool, what: &str) -> bool {
    if !present {
        assert!(std::env::var("CI").map_or(true, |ci| ci != "true"), "CI=true and this test's subject is missing: {what}");
        eprintln!("SKIPPED (not under CI=true): {what}");
    }
    present
}

/// The cgroup interface a machine bounds builds with, found as the hook finds it: cgroup v2 at
/// `/sys/fs/cgroup` when it offers the memory and cpu controllers, else their v1 mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cgroups {
    /// Separate memory, cpu and cpuacct mounts under `/sys/fs/cgroup` (this project's machines).
    V1,
    /// One cgroup2 tree at `/sys/fs/cgroup` (NixOS; the guest kernel of [`guest`]).
    V2,
}

impl Cgroups {
    /// The parent of the builds' cgroups when `NIX_TIER_CGROUP_ROOT` names none (the memory
    /// controller's, on v1).
    pub fn default_parent(self) -> PathBuf {
        match self {
            Cgroups::V1 => PathBuf::from("/sys/fs/cgroup/memory/nix-tier"),
            Cgroups::V2 => PathBuf::from("/sys/fs/cgroup/nix-tier"),
        }
    }

    /// The memory controller's cgroup in the text of a `/proc/<pid>/cgroup`.
    pub fn memory_cgroup(self, proc_cgroup: &str) -> Option<&str> {
        proc_cgroup.lines().find_map(|line| {
            let (_, rest) = line.split_once(':')?;
            let (controllers, path) = rest.split_once(':')?;
            let wanted = match self {
                Cgroups::V1 => controllers.split(',').any(|c| c == "memory"),
                Cgroups::V2 => controllers.is_empty(),
            };
            wanted.then_some(path)
        })
    }
}

/// What this machine bounds builds with: root and the memory and cpu controllers, on cgroup v2
/// or v1 (a fresh machine of this project's kind has v1; CI fails without either).
pub fn cgroups_present() -> Option<Cgroups> {
    if !requires(is_root(), "root (cgroups)") {
        return None;
    }
    let v2 = fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .is_ok_and(|offered| ["memory", "cpu"].iter().all(|c| offered.split_whitespace().any(|o| o == *c)));
    if v2 {
        return Some(Cgroups::V2);
    }
    let v1 = Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() && Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists();
    requires(v1, "the memory and cpu controllers (cgroup v1 mounts, or cgroup v2 at /sys/fs/cgroup)").then_some(Cgroups::V1)
}

/// The names of the cgroups directly inside `dir` (none when it does not exist).
pub fn child_cgroups(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|d| d.flatten().filter(|e| e.path().is_dir()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Whether this process runs as root (uid 0).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")).map(|u| u.split_whitespace().next() == Some("0")))
        .unwrap_or(false)
}

/// A cgroup made mode 0555 like a cgroup root (root-owned, not writable without
/// `CAP_DAC_OVERRIDE`), for `NIX_TIER_CGROUP_ROOT`; removed with every cgroup made inside it when
/// dropped (rmdir only: they are cgroups). On v1 it is one directory under each of the memory,
/// cpu and cpuacct mounts; on v2 one directory of the tree, with the memory and cpu controllers
/// enabled for it as systemd enables them for a delegated unit (nix-daemon.service on NixOS).
pub struct ReadOnlyCgroupRoot(pub Vec<PathBuf>);

impl ReadOnlyCgroupRoot {
    /// Makes `<name>-<pid>` under the memory, cpu and cpuacct mounts (v1) or at the top of the
    /// tree (v2).
    pub fn new(name: &str, cgroups: Cgroups) -> ReadOnlyCgroupRoot {
        use std::os::unix::fs::PermissionsExt;
        let name = format!("{name}-{}", std::process::id());
        let top = Path::new("/sys/fs/cgroup");
        let dirs: Vec<PathBuf> = match cgroups {
            Cgroups::V1 => ["memory", "cpu", "cpuacct"].iter().map(|c| top.join(c).join(&name)).collect(),
            Cgroups::V2 => {
                fs::write(top.join("cgroup.subtree_control"), "+memory +cpu").expect("enabling memory and cpu at the top of the cgroup2 tree");
                vec![top.join(&name)]
            }
        };
        for dir in &dirs {
            fs::create_dir(dir).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
            fs::set_permissions(dir, fs::Permissions::from_mode(0o555)).unwrap();
        }
        ReadOnlyCgroupRoot(dirs)
    }

    /// The memory controller's directory, the tree's on v2 (what `NIX_TIER_CGROUP_ROOT` names).
    pub fn memory(&self) -> &Path {
        &self.0[0]
    }

    /// Makes the child cgroup `name` (under every controller's directory, on v1); the
    /// `cgroup.procs` files that move a process into it.
    pub fn child(&self, name: &str) -> Vec<PathBuf> {
        self.0
            .iter()
            .map(|dir| {
                let child = dir.join(name);
                fs::create_dir(&child).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", child.display()));
                child.join("cgroup.procs")
            })
            .collect()
    }

    /// The build cgroups under its `nix-tier` parent (memory controller).
    pub fn builds(&self) -> Vec<String> {
        child_cgroups(&self.memory().join("nix-tier"))
    }
}

impl Drop for ReadOnlyCgroupRoot {
    fn drop(&mut self) {
        for dir in &self.0 {
            let mut all: Vec<PathBuf> = Vec::new();
            let mut stack = vec![dir.clone()];
            while let Some(d) = stack.pop() {
                stack.extend(fs::read_dir(&d).into_iter().flatten().flatten().filter(|e| e.path().is_dir()).map(|e| e.path()));
                all.push(d);
            }
            for d in all.iter().rev() {
                // A process killed just before may take a moment to leave its cgroup.
                for _ in 0..100 {
                    if fs::remove_dir(d).is_ok() || !d.exists() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
    }
}
