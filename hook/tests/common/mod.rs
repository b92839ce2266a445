//! A real `nix-tier-hook` process driven through the build-hook protocol, as a Nix worker
//! would drive it: this test process plays the worker (the hook's parent, the holder of output
//! locks and the parent of builders). Each test binary uses a part of these helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use nix_tier_hook::protocol::{self, Settings, TryRequest};

/// How long any answer may take: far more than a decision needs, far less than a hang.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// A private directory with a profile (budget `budget`), a state directory and no usable cgroup
/// root (admission only, which these tests are about).
pub struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    pub fn new(budget: u64) -> Setup {
        let setup = Setup { dir: tempfile::tempdir().unwrap() };
        write_profile(&setup.profile(), build_section(budget));
        setup
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn profile(&self) -> PathBuf {
        self.path().join("hw.json")
    }

    pub fn state(&self) -> PathBuf {
        self.path().join("state")
    }

    pub fn env<'a>(&'a self, profile: &'a Path, state: &'a Path) -> [(&'static str, &'a Path); 3] {
        [
            ("NIX_TIER_PROFILE", profile),
            ("NIX_TIER_STATE_DIR", state),
            // Not a cgroup: the hook says so and admits without bounding.
            ("NIX_TIER_CGROUP_ROOT", self.path()),
        ]
    }

    /// A hook whose broker runs already (started once per state directory).
    pub fn hook_with_profile(&self, profile: &Path) -> Hook {
        self.hook_with(profile, &[])
    }

    /// A hook whose broker runs already, its worker's `settings` overridden.
    pub fn hook_with(&self, profile: &Path, settings: &[(&str, &str)]) -> Hook {
        let state = self.state();
        let env = self.env(profile, &state);
        if std::os::unix::net::UnixStream::connect(state.join("broker.sock")).is_err() {
            start_broker(&env);
        }
        Hook::start_with_settings(&env, settings)
    }

    pub fn hook(&self) -> Hook {
        self.hook_with_profile(&self.profile())
    }

    /// A hook that finds no broker running and starts one itself.
    /// The number of `try` requests (asked, or told as declined) of each build the broker
    /// counted, sorted.
    pub fn tries(&self) -> Vec<u64> {
        let mut socket = std::os::unix::net::UnixStream::connect(self.state().join("broker.sock")).unwrap();
        socket.write_all(b"\"tries\"\n").unwrap();
        let mut answer = String::new();
        BufReader::new(socket).read_line(&mut answer).unwrap();
        let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
        let mut tries: Vec<u64> = answer["tries"].as_array().expect("tries").iter().filter_map(|t| t.as_u64()).collect();
        tries.sort();
        tries
    }

    pub fn hook_starting_the_broker(&self) -> Hook {
        let (profile, state) = (self.profile(), self.state());
        Hook::start(&self.env(&profile, &state))
    }
}

/// One hook process.
pub struct Hook {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Hook {
    /// Starts the hook with `env` and sends the settings handshake.
    pub fn start(env: &[(&str, &Path)]) -> Hook {
        Hook::start_with_settings(env, &[])
    }

    /// Starts the hook with `env` and sends the settings handshake, `overrides` replacing
    /// settings (max-jobs 8, build-poll-interval 1, no builders).
    pub fn start_with_settings(env: &[(&str, &Path)], overrides: &[(&str, &str)]) -> Hook {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nix-tier-hook"));
        cmd.arg("3").stdin(Stdio::piped()).stderr(Stdio::piped()).env_remove("NIX_TIER_CGROUP_ROOT");
        for (name, value) in env {
            cmd.env(name, value);
        }
        let mut child = cmd.spawn().expect("start nix-tier-hook");
        let stderr = child.stderr.take().unwrap();
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        let mut stdin = child.stdin.take().unwrap();
        let settings: Settings = [("max-jobs", "8"), ("build-poll-interval", "1"), ("builders", "")]
            .iter()
            .chain(overrides)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        protocol::write_settings(&mut stdin, &settings).unwrap();
        stdin.flush().unwrap();
        Hook { child, stdin: Some(stdin), lines }
    }

    /// Starts the broker for `env`'s state directory first, as a service manager would, and
    /// waits until it accepts connections; then the hook, as [`Hook::start`]. Its first answers
    /// then come from a running broker, not from one the hook is still starting (which it
    /// postpones for).
    pub fn start_with_broker(env: &[(&str, &Path)]) -> Hook {
        start_broker(env);
        Hook::start(env)
    }

    /// Asks about `drv` (Nix has a free slot); the lines the hook printed up to and including
    /// its reply. Panics if no reply comes within [`ANSWER_TIMEOUT`].
    pub fn ask(&mut self, drv: &Path) -> Vec<String> {
        let request = TryRequest {
            am_willing: true,
            system: std::env::consts::ARCH.to_string() + "-linux",
            drv_path: drv.display().to_string(),
            required_features: vec![],
        };
        let stdin = self.stdin.as_mut().unwrap();
        protocol::write_request(stdin, &request).unwrap();
        stdin.flush().unwrap();
        self.reply(&format!("asking about {}", drv.display()))
    }

    /// Writes raw bytes to the hook's stdin.
    pub fn write_raw(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Closes the hook's stdin (Nix is done with it, or went away mid-request).
    pub fn close(&mut self) {
        self.stdin = None;
    }

    /// The lines up to and including the next reply line.
    pub fn reply(&mut self, what: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            match self.lines.recv_timeout(ANSWER_TIMEOUT) {
                Ok(line) => {
                    let done = protocol::Reply::parse(&line).is_some();
                    lines.push(line);
                    if done {
                        return lines;
                    }
                }
                Err(e) => panic!("{what}: no reply within {ANSWER_TIMEOUT:?} ({e}); lines so far: {lines:?}"),
            }
        }
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the broker for `env`'s state directory, as a service manager would, and waits until it
/// accepts connections.
pub fn start_broker(env: &[(&str, &Path)]) {
    let state = env.iter().find(|(name, _)| *name == "NIX_TIER_STATE_DIR").expect("a state directory").1;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nix-tier-hook"));
    cmd.arg("--broker").stdin(Stdio::null()).stdout(Stdio::null()).env_remove("NIX_TIER_CGROUP_ROOT");
    cmd.process_group(0);
    for (name, value) in env {
        cmd.env(name, value);
    }
    let mut broker = cmd.spawn().expect("start nix-tier-hook --broker");
    nix_tier_tests::hook_env::wait_for("the broker to accept connections", ANSWER_TIMEOUT, || {
        assert!(broker.try_wait().unwrap().is_none_or(|s| s.success()), "the broker failed to start");
        std::os::unix::net::UnixStream::connect(state.join("broker.sock")).ok()
    });
    // It runs on by itself (exiting when idle), as one started by a hook does.
    std::thread::spawn(move || broker.wait());
}

/// Writes a `.drv` (ATerm, as Nix writes them) for a derivation `name` with one output `out`
/// at `<dir>/<name>-out`; its path, and the output's.
pub fn write_drv(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let out = dir.join(format!("{name}-out"));
    let system = std::env::consts::ARCH.to_string() + "-linux";
    let text = format!(
        r#"Derive([("out","{out}","","")],[],[],"{system}","/bin/sh",[],[("builder","/bin/sh"),("name","{name}"),("out","{out}"),("system","{system}")])"#,
        out = out.display()
    );
    let drv = dir.join(format!("{name}.drv"));
    std::fs::write(&drv, text).unwrap();
    (drv, out)
}

/// Runs the real `nix-tier` with `args`, its state (and build history) in `state_dir`.
pub fn nix_tier(state_dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nix-tier")).args(args).env("NIX_TIER_STATE_DIR", state_dir).output().expect("nix-tier runs")
}

/// The JSON `output` printed; panics with its stderr when it failed.
pub fn json(output: &std::process::Output) -> serde_json::Value {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("JSON")
}

/// This machine's profile (`nix-tier profile`) with `build` replaced, written to `path`.
pub fn write_profile(path: &Path, build: serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_nix-tier")).arg("profile").output().unwrap();
    assert!(out.status.success(), "nix-tier profile: {}", String::from_utf8_lossy(&out.stderr));
    let mut profile: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    profile["source"] = "pinned".into();
    profile["build"] = build;
    std::fs::write(path, serde_json::to_string(&profile).unwrap()).unwrap();
}

/// A `build` section: heavy 1 job of 1000 MiB, medium 2 of 500, light 4 of 100, in `budget`.
pub fn build_section(budget: u64) -> serde_json::Value {
    let tier = |jobs: u64, mib: u64| serde_json::json!({ "maxJobs": jobs, "cores": 1, "memoryMiB": mib });
    serde_json::json!({
        "memoryBudgetMiB": budget,
        "defaultTier": "light",
        "rules": [],
        "tiers": { "heavy": tier(1, 1000), "medium": tier(2, 500), "light": tier(4, 100) },
    })
}

/// Makes a FIFO at `path`.
pub fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

/// A successful build of `name` (e.g. `big-1.0`) for a history fixture: light tier, no wait, no
/// limit, leased for its whole wall time.
pub fn succeeded_build(name: &str, started_unix_ms: u64, wall_ms: u64, cpu_ms: u64, peak_mib: u64) -> nix_tier_hook::history::BuildRecord {
    let (package, version) = nix_tier_hook::history::package_and_version(name);
    nix_tier_hook::history::BuildRecord {
        drv: format!("/nix/store/00000000000000000000000000000000-{name}.drv"),
        package,
        version,
        tier: nix_tier_model::Tier::Light,
        started_unix_ms,
        wall_ms,
        leased_ms: Some(wall_ms),
        cpu_ms: Some(cpu_ms),
        peak_mib: Some(peak_mib),
        limit_mib: None,
        outcome: nix_tier_hook::history::Outcome::Succeeded,
        waited_ms: Some(0),
    }
}
