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
        // No substituters, no sandbox, builds as the calling user: what this machine can run.
        let base = "substituters =\nsandbox = false\nbuild-users-group =\n";
        sandbox.write("conf/nix.conf", &format!("{base}{extra_conf}\n"));
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
