//! The process tree as `/proc` shows it: enough to find a build's processes.

use std::fs;
use std::os::unix::fs::MetadataExt;

use nix_tier_cgroups::{read_kernel_file, read_kernel_text};

/// The direct children of `pid` (from every thread's `children` list).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| read_kernel_text(task.path().join("children")).ok())
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

/// The largest environment read (Linux caps one exec's arguments and environment at 2 MiB).
const MAX_ENVIRON_BYTES: usize = 2 << 20;

/// The environment block of `pid`. `/proc/<pid>/environ` belongs to the process's user (mode
/// 0400), so a build user's cannot be opened without `CAP_DAC_READ_SEARCH`; the block is then
/// read from the process's memory, between `env_start` and `env_end` of its `stat`, with
/// `process_vm_readv`, which `CAP_SYS_PTRACE` allows.
pub fn environ(pid: u32) -> Option<Vec<u8>> {
    match read_kernel_file(format!("/proc/{pid}/environ")) {
        Ok(environ) => return Some(environ),
        // Gone, or exited (a zombie has no memory left to read).
        Err(e) if e.kind() != std::io::ErrorKind::PermissionDenied => return None,
        Err(_) => {}
    }
    let stat = read_kernel_text(format!("/proc/{pid}/stat")).ok()?;
    // env_start and env_end are fields 50 and 51.
    let start: usize = stat_field(&stat, 50)?.parse().ok()?;
    let end: usize = stat_field(&stat, 51)?.parse().ok()?;
    let len = end.checked_sub(start).filter(|len| (1..=MAX_ENVIRON_BYTES).contains(len))?;
    let mut buffer = vec![0u8; len];
    let read = nix::sys::uio::process_vm_readv(
        nix::unistd::Pid::from_raw(pid as i32),
        &mut [std::io::IoSliceMut::new(&mut buffer)],
        &[nix::sys::uio::RemoteIoVec { base: start, len }],
    )
    .ok()?;
    buffer.truncate(read);
    Some(buffer)
}

/// The parent of process `pid` (field 4 of its `stat`).
pub fn parent(pid: u32) -> Option<u32> {
    stat_field(&read_kernel_text(format!("/proc/{pid}/stat")).ok()?, 4)?.parse().ok()
}

/// Whether process `pid` descends from process `ancestor` (a process tree is not deeper than a
/// few hundred levels in practice; the walk stops there).
pub fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut at = pid;
    for _ in 0..1024 {
        match parent(at) {
            Some(p) if p == ancestor => return true,
            Some(p) if p > 1 => at = p,
            _ => return false,
        }
    }
    false
}

/// Field `n` (from 1, as proc(5) counts) of a process's `stat`. The command, field 2, may hold
/// spaces and parentheses: fields are counted from its last closing parenthesis, field 3 first.
fn stat_field(stat: &str, n: usize) -> Option<&str> {
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(n.checked_sub(3)?)
}

/// The owner of process `pid`.
pub fn uid(pid: u32) -> Option<u32> {
    fs::metadata(format!("/proc/{pid}")).ok().map(|m| m.uid())
}

/// The memory process `pid` charged to its cgroup by touching it, bytes: its resident anonymous
/// and shared memory (`RssAnon`, `RssShmem`). Its resident file pages are not counted: they are
/// charged to whichever cgroup read them first, usually not its own (its program's, its
/// libraries').
pub fn charged_bytes(pid: u32) -> Option<u64> {
    let status = read_kernel_text(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> Option<u64> { status.lines().find_map(|l| l.strip_prefix(key))?.trim().trim_end_matches("kB").trim().parse().ok() };
    Some((kib("RssAnon:")? + kib("RssShmem:").unwrap_or(0)) * 1024)
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

    fn has_env_entry(pid: u32, entry: &str) -> bool {
        environ(pid).is_some_and(|environ| environ.split(|b| *b == 0).any(|e| e == entry.as_bytes()))
    }

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
        assert!(descends_from(child.id(), me));
        assert!(!descends_from(me, child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn what_a_process_touched_is_charged_and_its_program_is_not() {
        let before = charged_bytes(std::process::id()).unwrap();
        let held = std::hint::black_box(vec![1u8; 64 << 20]);
        let after = charged_bytes(std::process::id()).unwrap();
        assert!(after >= before + (60 << 20), "{before} then {after} with 64 MiB touched");
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let resident_kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap();
        assert!(after < resident_kib * 1024, "the program's own pages are resident, not charged: {after} of {resident_kib} KiB");
        drop(held);
        assert_eq!(charged_bytes(u32::MAX), None);
    }
}
