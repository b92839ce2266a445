//! Least privilege: the hook keeps only the Linux capabilities it needs.
//!
//! Under a multi-user `nix-daemon` the hook runs as root. Before it calls
//! [`keep_only_needed`] it does its one privileged step: it makes the parent of builds'
//! cgroups, which needs `CAP_DAC_OVERRIDE` where the cgroup root is mode 0555 (as it commonly
//! is). Afterwards it needs `CAP_SYS_PTRACE`, to read the environment of a builder running as a
//! build user (from its memory: its `/proc/<pid>/environ` is the build user's own file), to
//! take a copy of its log descriptor and to read the locks in the Nix worker's descriptor table
//! (the worker keeps capabilities the hook dropped), and `CAP_KILL`, to end what is left of an
//! abandoned build. Creating cgroups inside the parent it made, moving processes into them and
//! writing its own state need no capability. Everything else is dropped from the effective,
//! permitted, inheritable, ambient and bounding sets, so the watchers it starts cannot regain it
//! either.
//! The broker drops it once it has subscribed to the kernel's process events
//! ([`crate::proc_events`]), which older kernels allow only with `CAP_NET_ADMIN`.
//! Run as an ordinary user (single-user Nix) it has no capabilities and nothing changes.

use caps::{CapSet, Capability, CapsHashSet};

/// The capabilities the hook keeps.
pub const NEEDED: [Capability; 2] = [Capability::CAP_SYS_PTRACE, Capability::CAP_KILL];

/// Drops every capability but [`NEEDED`].
pub fn keep_only_needed() -> Result<(), caps::errors::CapsError> {
    let permitted = caps::read(None, CapSet::Permitted)?;
    if permitted.is_empty() {
        return Ok(());
    }
    let keep: CapsHashSet = NEEDED.into_iter().filter(|c| permitted.contains(c)).collect();
    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes last.
    for cap in caps::read(None, CapSet::Bounding)? {
        if !keep.contains(&cap) && cap != Capability::CAP_SETPCAP {
            caps::drop(None, CapSet::Bounding, cap)?;
        }
    }
    // Already gone when this process was started by one that dropped it (the broker).
    if !keep.contains(&Capability::CAP_SETPCAP) && caps::has_cap(None, CapSet::Bounding, Capability::CAP_SETPCAP)? {
        caps::drop(None, CapSet::Bounding, Capability::CAP_SETPCAP)?;
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    caps::set(None, CapSet::Effective, &keep)?;
    caps::set(None, CapSet::Permitted, &keep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// The capabilities of the calling thread alone (the kernel keeps them per thread), left
    /// with `keep`.
    fn thread_keeps_only(keep: &[Capability]) {
        let keep: CapsHashSet = keep.iter().copied().collect();
        caps::set(None, CapSet::Effective, &keep).unwrap();
        caps::set(None, CapSet::Permitted, &keep).unwrap();
    }

    #[test]
    fn what_is_kept_reads_the_locks_of_a_nix_worker_with_every_capability() {
        if !nix_tier_tests::requires(nix::unistd::geteuid().is_root(), "root (a broker's capabilities against a root Nix worker's)") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("out.lock");
        // A root process with every capability, holding a lock as Nix's worker does; it says so
        // once it holds it.
        let mut worker = std::process::Command::new("flock")
            .args([lock.as_os_str(), "sh".as_ref(), "-c".as_ref(), "echo locked; exec sleep 30".as_ref()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut said = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(worker.stdout.take().unwrap()), &mut said).unwrap();
        assert_eq!(said, "locked\n");
        let meta = std::fs::metadata(&lock).unwrap();
        let file = (meta.dev(), meta.ino());
        let pid = worker.id();
        let read_with = |keep: &'static [Capability]| {
            std::thread::spawn(move || {
                thread_keeps_only(keep);
                crate::output_locks::files_locked_by(pid)
            })
            .join()
            .unwrap()
        };
        let kept = read_with(&NEEDED);
        assert!(kept.as_ref().is_some_and(|locked| locked.contains(&file)), "{kept:?}");
        // Without CAP_SYS_PTRACE the table is not the broker's to read: the lock table is read.
        assert_eq!(read_with(&[Capability::CAP_KILL]), None);
        worker.kill().unwrap();
        worker.wait().unwrap();
    }
}
