//! Where the hook and `nix-tier` find the hardware profile and Nix's build-remote.

use std::path::{Path, PathBuf};

use nix_tier_model::Profile;

use crate::protocol::Settings;

/// Finds the profile: the `hardware-profile` setting (Nix forwards it when the nix-tier plugin
/// is loaded), else `$NIX_TIER_PROFILE`, else `$NIX_CONF_DIR/hardware-profile.json` (default
/// `/etc/nix/hardware-profile.json`) when it exists; `None` means "detect the host".
pub fn profile_path(settings: &Settings) -> Option<PathBuf> {
    if let Some(path) = settings.get("hardware-profile").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    if let Some(path) = std::env::var_os("NIX_TIER_PROFILE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let conf_dir = std::env::var_os("NIX_CONF_DIR").map_or_else(|| PathBuf::from("/etc/nix"), PathBuf::from);
    Some(conf_dir.join("hardware-profile.json")).filter(|p| p.is_file())
}

/// Whether the broker's watcher may learn of builders from the kernel's process events:
/// `NIX_TIER_PROC_EVENTS=off` has it read `/proc` instead, as it does where the kernel refuses
/// it the events.
pub fn proc_events() -> bool {
    std::env::var("NIX_TIER_PROC_EVENTS").map_or(true, |v| v != "off")
}

/// The cgroup under which builds' cgroups go (in its `nix-tier` child): `$NIX_TIER_CGROUP_ROOT`,
/// a directory on a cgroup v2 or v1 file system; `None` for the default (the cgroup2 mount when
/// it offers memory and cpu, else the v1 memory and cpu mounts' roots).
pub fn cgroup_root() -> Option<PathBuf> {
    std::env::var_os("NIX_TIER_CGROUP_ROOT").filter(|p| !p.is_empty()).map(PathBuf::from)
}

/// Loads the profile at `path` (or detects the host). A bad profile never stops builds: the
/// host's defaults are used instead and the second value says what was wrong. `Err` only when
/// the host cannot be detected either.
pub fn load_profile(path: Option<&Path>) -> Result<(Profile, Option<String>), String> {
    let Some(path) = path else {
        return Profile::detect().map(|p| (p, None)).map_err(|e| e.to_string());
    };
    match Profile::load_pinned(path) {
        Ok(profile) => Ok((profile, None)),
        Err(error) => {
            let note = format!("{error}; using tier limits derived from this machine instead");
            Profile::detect().map(|p| (p, Some(note))).map_err(|e| format!("{error}; and {e}"))
        }
    }
}

/// Nix's own build hook, which handles `builders`: `$NIX_TIER_BUILD_REMOTE`, else
/// `libexec/nix/build-remote` beside the `nix` on `PATH` (Debian: /usr/libexec/nix/build-remote),
/// else that `nix` itself: build-remote is a symlink to it, and `nix` started with argv[0]
/// `build-remote` (as the relay starts it) runs build-remote, in every Nix since 2.4.
pub fn build_remote_program() -> PathBuf {
    build_remote_from(std::env::var_os("NIX_TIER_BUILD_REMOTE"), std::env::var_os("PATH"))
}

fn build_remote_from(explicit: Option<std::ffi::OsString>, path: Option<std::ffi::OsString>) -> PathBuf {
    if let Some(program) = explicit {
        return PathBuf::from(program);
    }
    let nix = path.and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nix"))
            .find(|nix| nix.is_file())
            .and_then(|nix| nix.canonicalize().ok())
    });
    let beside_nix = nix
        .as_ref()
        .and_then(|nix| Some(nix.parent()?.parent()?.join("libexec/nix/build-remote")))
        .filter(|p| p.exists());
    beside_nix.or(nix).unwrap_or_else(|| PathBuf::from("/usr/libexec/nix/build-remote"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn build_remote_is_found_beside_nix_or_is_nix_itself() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir_all(&bin).unwrap();
        fs::write(bin.join("nix"), "").unwrap();
        let path = Some(std::env::join_paths([Path::new("/nonexistent"), bin.as_path()]).unwrap());
        let nix = bin.join("nix").canonicalize().unwrap();

        // A Nix built without the libexec symlink (a build tree): nix itself, started as build-remote.
        assert_eq!(build_remote_from(None, path.clone()), nix);

        // An installed Nix: libexec/nix/build-remote beside bin/nix.
        let libexec = dir.path().join("libexec/nix");
        fs::create_dir_all(&libexec).unwrap();
        fs::write(libexec.join("build-remote"), "").unwrap();
        assert_eq!(build_remote_from(None, path.clone()), dir.path().canonicalize().unwrap().join("libexec/nix/build-remote"));

        // $NIX_TIER_BUILD_REMOTE wins; without any nix on PATH, Debian's path.
        assert_eq!(build_remote_from(Some("/x/build-remote".into()), path), PathBuf::from("/x/build-remote"));
        assert_eq!(build_remote_from(None, Some("/nonexistent".into())), PathBuf::from("/usr/libexec/nix/build-remote"));
    }
}
