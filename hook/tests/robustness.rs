//! Hostile or broken files and a broken protocol never hang, exhaust or silence the hook: it
//! answers every request in time, says why when it cannot enforce, and repairs what it can.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{build_section, mkfifo, write_drv, write_profile, Hook};

/// A private directory with a profile (budget `budget`), a state directory and no usable cgroup
/// root (admission only, which these tests are about).
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(budget: u64) -> Setup {
        let setup = Setup { dir: tempfile::tempdir().unwrap() };
        write_profile(&setup.profile(), build_section(budget));
        setup
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn profile(&self) -> PathBuf {
        self.path().join("hw.json")
    }

    fn state(&self) -> PathBuf {
        self.path().join("state")
    }

    fn hook_with_profile(&self, profile: &Path) -> Hook {
        Hook::start(&[
            ("NIX_TIER_PROFILE", profile),
            ("NIX_TIER_STATE_DIR", &self.state()),
            // Not a cgroup: the hook says so and admits without bounding.
            ("NIX_TIER_CGROUP_ROOT", self.path()),
        ])
    }

    fn hook(&self) -> Hook {
        self.hook_with_profile(&self.profile())
    }
}

fn reply(lines: &[String]) -> &str {
    lines.last().map(String::as_str).unwrap_or("")
}

fn mentions(lines: &[String], words: &[&str]) -> bool {
    lines.iter().any(|l| l.starts_with("nix-tier-hook:") && words.iter().all(|w| l.contains(w)))
}

#[test]
fn without_cgroups_the_hook_says_so_once_and_admits() {
    let setup = Setup::new(8000);
    let mut hook = setup.hook();
    let (drv, _) = write_drv(setup.path(), "plain-1.0");
    let first = hook.ask(&drv);
    assert_eq!(reply(&first), "# decline", "{first:?}");
    assert!(mentions(&first, &["not on a cgroup file system", "admitted by tier but not bounded"]), "{first:?}");
    let (other, _) = write_drv(setup.path(), "other-1.0");
    let second = hook.ask(&other);
    assert_eq!(second, vec!["# decline".to_string()], "said once");
}

#[test]
fn a_fifo_or_a_device_as_derivation_is_declined_at_once() {
    let setup = Setup::new(8000);
    let mut hook = setup.hook();
    let fifo = setup.path().join("fifo.drv");
    mkfifo(&fifo);
    let lines = hook.ask(&fifo);
    assert_eq!(reply(&lines), "# decline", "{lines:?}");
    assert!(mentions(&lines, &["fifo.drv", "FIFO"]), "{lines:?}");
    let lines = hook.ask(Path::new("/dev/zero"));
    assert_eq!(reply(&lines), "# decline", "{lines:?}");
    assert!(mentions(&lines, &["/dev/zero", "device"]), "{lines:?}");
    // And the hook still works.
    let (drv, _) = write_drv(setup.path(), "fine-1.0");
    assert_eq!(reply(&hook.ask(&drv)), "# decline");
}

#[test]
fn a_fifo_or_a_device_as_profile_falls_back_to_the_host_defaults() {
    let setup = Setup::new(8000);
    let fifo = setup.path().join("profile.fifo");
    mkfifo(&fifo);
    for profile in [fifo.as_path(), Path::new("/dev/zero")] {
        let mut hook = setup.hook_with_profile(profile);
        let (drv, _) = write_drv(setup.path(), "p-1.0");
        let lines = hook.ask(&drv);
        assert_eq!(reply(&lines), "# decline", "{lines:?}");
        assert!(
            mentions(&lines, &[&profile.display().to_string(), "not a regular file", "derived from this machine"]),
            "{lines:?}"
        );
    }
}

#[test]
fn a_fifo_as_state_file_blocks_no_hook_and_is_repaired() {
    let setup = Setup::new(8000);
    fs::create_dir(setup.state()).unwrap();
    mkfifo(&setup.state().join("state.json"));
    // Two clients' hooks at once: neither blocks the other through the state lock.
    let mut first = setup.hook();
    let mut second = setup.hook();
    let (a, _) = write_drv(setup.path(), "a-1.0");
    let (b, _) = write_drv(setup.path(), "b-1.0");
    let lines = first.ask(&a);
    assert_eq!(reply(&lines), "# decline", "{lines:?}");
    assert!(mentions(&lines, &["state.json", "set aside"]), "{lines:?}");
    assert_eq!(reply(&second.ask(&b)), "# decline");
    assert!(fs::symlink_metadata(setup.state().join("state.json")).unwrap().is_file());
}

#[test]
fn a_state_file_or_lock_replaced_by_a_directory_is_repaired() {
    let setup = Setup::new(8000);
    fs::create_dir_all(setup.state().join("state.json")).unwrap();
    fs::create_dir_all(setup.state().join("state.lock")).unwrap();
    let mut hook = setup.hook();
    let (drv, out) = write_drv(setup.path(), "d-1.0");
    // As Nix does before it asks: the output lock, held while the build runs.
    let lock = fs::File::create(format!("{}.lock", out.display())).unwrap();
    lock.lock().unwrap();
    let lines = hook.ask(&drv);
    assert_eq!(reply(&lines), "# decline", "{lines:?}");
    assert!(mentions(&lines, &["state.lock", "set aside"]) && mentions(&lines, &["state.json", "set aside"]), "{lines:?}");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_nix-tier"))
        .args(["status", "--json"])
        .env("NIX_TIER_STATE_DIR", setup.state())
        .env("NIX_TIER_PROFILE", setup.profile())
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["running"].as_array().map(Vec::len), Some(1), "the admitted build is counted: {status}");
}

/// A state file with one waiting heavy build that needs the whole budget, last seen at `seen`.
fn state_with_waiting_heavy(setup: &Setup, seen: u64) {
    let state = serde_json::json!({
        "running": [],
        "waiting": [{ "drv": "/x/heavy.drv", "name": "heavy-1.0", "tier": "heavy", "memoryMiB": 1000,
                      "since": 0, "seen": seen, "reason": "" }],
    });
    fs::create_dir_all(setup.state()).unwrap();
    fs::write(setup.state().join("state.json"), state.to_string()).unwrap();
}

#[test]
fn a_waiting_entry_from_the_future_does_not_hold_builds_back() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let setup = Setup::new(1000);
    let (drv, _) = write_drv(setup.path(), "light-1.0");
    // Control: a heavy build that waits now holds a light one back (it needs the whole budget).
    state_with_waiting_heavy(&setup, now);
    assert_eq!(reply(&setup.hook().ask(&drv)), "# postpone");
    // Stamped a day ahead (a clock stepped back, or a forged entry): it is gone.
    state_with_waiting_heavy(&setup, now + 86_400);
    assert_eq!(reply(&setup.hook().ask(&drv)), "# decline");
}

#[test]
fn a_request_cut_short_is_still_answered() {
    let setup = Setup::new(8000);
    let mut hook = setup.hook();
    // "try", then am-willing, and Nix goes away before the rest.
    let mut bytes = Vec::new();
    nix_tier_hook::wire::write_string(&mut bytes, "try").unwrap();
    nix_tier_hook::wire::write_u64(&mut bytes, 1).unwrap();
    hook.write_raw(&bytes);
    hook.close();
    let lines = hook.reply("a truncated request");
    assert_eq!(reply(&lines), "# decline", "{lines:?}");
    assert!(!hook.child.wait().unwrap().success());
}

#[test]
fn an_unusable_state_directory_declines_and_says_why() {
    let setup = Setup::new(8000);
    fs::write(setup.state(), "not a directory").unwrap();
    let mut hook = setup.hook();
    let (drv, _) = write_drv(setup.path(), "s-1.0");
    let lines = hook.ask(&drv);
    assert_eq!(reply(&lines), "# decline", "{lines:?}");
    assert!(mentions(&lines, &["state directory", "not a directory", "without tier limits"]), "{lines:?}");
}

#[test]
fn a_running_build_stays_counted_when_the_state_file_is_lost() {
    // One heavy slot: the build running when the state file is destroyed still holds it.
    let setup = Setup::new(8000);
    let mut build = build_section(8000);
    build["defaultTier"] = "heavy".into();
    write_profile(&setup.profile(), build);
    let mut hook = setup.hook();
    let (first, out) = write_drv(setup.path(), "first-1.0");
    let lock = fs::File::create(format!("{}.lock", out.display())).unwrap();
    lock.lock().unwrap();
    assert_eq!(reply(&hook.ask(&first)), "# decline", "admitted");
    // Its watcher's lock (which holds the build's job) is what the rebuilt state is found from.
    let deadline = std::time::Instant::now() + common::ANSWER_TIMEOUT;
    while !fs::read_dir(setup.state().join("leases"))
        .is_ok_and(|d| d.flatten().any(|e| fs::read_to_string(e.path()).is_ok_and(|t| t.contains("first-1.0"))))
    {
        assert!(std::time::Instant::now() < deadline, "no watcher lock for first-1.0");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    fs::write(setup.state().join("state.json"), "\u{0}garbage").unwrap();
    let (second, _) = write_drv(setup.path(), "second-1.0");
    let lines = setup.hook().ask(&second);
    assert_eq!(reply(&lines), "# postpone", "the lost state was rebuilt with the running build: {lines:?}");
    assert!(mentions(&lines, &["rebuilt from the 1 running build(s) found"]), "{lines:?}");
}
