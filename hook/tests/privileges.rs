//! The hook, run as root, keeps only CAP_SYS_PTRACE and CAP_KILL.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix_tier_hook::protocol::{self, Settings};

fn status_field(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let value = status.lines().find_map(|l| l.strip_prefix(&format!("{field}:"))).unwrap();
    u64::from_str_radix(value.trim(), 16).unwrap()
}

#[test]
fn the_hook_drops_all_but_the_capabilities_it_needs() {
    if status_field(std::process::id(), "CapEff") == 0 {
        eprintln!("skipped: not running with capabilities (not root)");
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let mut hook = Command::new(env!("CARGO_BIN_EXE_nix-tier-hook"))
        .arg("3")
        .env("NIX_TIER_STATE_DIR", state.path())
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = hook.stdin.take().unwrap();
    protocol::write_settings(&mut stdin, &Settings::new()).unwrap();
    stdin.flush().unwrap();
    // It drops them right after the handshake, before the first request.
    std::thread::sleep(Duration::from_millis(500));
    let expected = (1u64 << 19) | (1u64 << 5); // CAP_SYS_PTRACE, CAP_KILL
    let pid = hook.id();
    let sets: Vec<(&str, u64)> = ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"]
        .into_iter()
        .map(|f| (f, status_field(pid, f)))
        .collect();
    drop(stdin);
    assert!(hook.wait().unwrap().success());
    assert_eq!(sets[0], ("CapEff", expected), "{sets:x?}");
    assert_eq!(sets[1], ("CapPrm", expected), "{sets:x?}");
    assert_eq!(sets[2], ("CapBnd", expected), "{sets:x?}");
    assert_eq!(sets[3], ("CapInh", 0), "{sets:x?}");
    assert_eq!(sets[4], ("CapAmb", 0), "{sets:x?}");
}
