//! The process tree as `/proc` shows it: enough to find a build's processes.

use std::fs;
use std::os::unix::fs::MetadataExt;

/// The direct children of `pid` (from every thread's `children` list).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| text.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

/// `pid` and all its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut found = vec![pid];
    let mut next = 0;
    while next < found.len() {
        let kids = children(found[next]);
        found.extend(kids);
        next += 1;
    }
    found
}

/// Whether `pid`'s environment holds the entry `entry` (e.g. `out=/nix/store/…`).
pub fn has_env_entry(pid: u32, entry: &str) -> bool {
    fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|environ| environ.split(|b| *b == 0).any(|e| e == entry.as_bytes()))
}

/// The owner of process `pid`.
pub fn uid(pid: u32) -> Option<u32> {
    fs::metadata(format!("/proc/{pid}")).ok().map(|m| m.uid())
}

/// The resident memory of process `pid`, bytes (`VmRSS`).
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Every process.
pub fn all_pids() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()).collect()
}

/// Every process owned by `uid`.
pub fn pids_of_user(uid: u32) -> Vec<u32> {
    all_pids().into_iter().filter(|pid| self::uid(*pid) == Some(uid)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_child_and_its_environment_are_found() {
        let mut child = Command::new("/bin/sh")
            .args(["-c", "sleep 2"])
            .env("out", "/tmp/procfs-test-output")
            .spawn()
            .unwrap();
        let me = std::process::id();
        // Until exec, the child's environment is a copy of this process's.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !has_env_entry(child.id(), "out=/tmp/procfs-test-output") {
            assert!(std::time::Instant::now() < deadline, "the child never exec'd");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(children(me).contains(&child.id()));
        assert!(tree(me).contains(&child.id()));
        assert!(has_env_entry(child.id(), "out=/tmp/procfs-test-output"));
        assert!(!has_env_entry(child.id(), "out=/tmp/other"));
        assert_eq!(uid(child.id()), uid(me));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
