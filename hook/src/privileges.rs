//! Least privilege: the hook keeps only the Linux capabilities it needs.
//!
//! Under a multi-user `nix-daemon` the hook runs as root. Before it calls
//! [`keep_only_needed`] it does its one privileged step: it makes the parent of builds'
//! cgroups, which needs `CAP_DAC_OVERRIDE` where the cgroup root is mode 0555 (as it commonly
//! is). Afterwards it needs `CAP_SYS_PTRACE`, to read the environment of a builder running as a
//! build user (from its memory: its `/proc/<pid>/environ` is the build user's own file) and to
//! take a copy of its log descriptor, and `CAP_KILL`, to end what is left of an abandoned build.
//! Creating cgroups inside the parent it made, moving processes into them and writing its own
//! state need no capability. Everything else is dropped from the effective, permitted,
//! inheritable, ambient and bounding sets, so the watchers it starts cannot regain it either.
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
