//! The version of the Nix that runs the hook, for warnings about Nix bugs that hit the hook's
//! builds. Read from the store path of the parent process's executable (the Nix worker), so
//! nothing is started: `/nix/store/<hash>-nix-2.35.0/bin/nix` is Nix 2.35.0. Other layouts
//! (Debian's `/usr/bin/nix-daemon`, Lix, a wrapper) give no version and no warning.

use std::path::Path;

/// Nix's base-32 alphabet, in which store path hashes are written.
const STORE_HASH_CHARS: &str = "0123456789abcdfghijklmnpqrsvwxyz";
const STORE_HASH_LEN: usize = 32;

/// The Nix version of process `pid`, from the store path of its executable; `None` when it is
/// not a Nix in a store directory, or `/proc/<pid>/exe` cannot be read.
pub fn of_process(pid: u32) -> Option<String> {
    from_executable(&std::fs::read_link(format!("/proc/{pid}/exe")).ok()?)
}

/// The Nix version of this process's parent: the Nix worker that started the hook.
pub fn of_parent() -> Option<String> {
    of_process(std::os::unix::process::parent_id())
}

/// The version in the path of a Nix executable, `<store>/<hash>-nix-<version>[-<output>]/bin/<program>`.
/// The name splits as Nix's `parseDrvName` splits it (the package name ends at the first `-`
/// not followed by a letter), and an output's suffix (`-man`, `-dev`) is not part of the
/// version. Other packages (`nix-cli-…`, `lix-…`) and other layouts give `None`.
pub fn from_executable(path: &Path) -> Option<String> {
    let program_dir = path.parent()?;
    if program_dir.file_name()? != "bin" {
        return None;
    }
    let store_entry = program_dir.parent()?.file_name()?.to_str()?;
    let (hash, name) = store_entry.split_at_checked(STORE_HASH_LEN)?;
    if !hash.chars().all(|c| STORE_HASH_CHARS.contains(c)) {
        return None;
    }
    let name = name.strip_prefix('-')?;
    let split = name.char_indices().find(|&(i, c)| c == '-' && !name[i + 1..].starts_with(|c: char| c.is_ascii_alphabetic()))?.0;
    let (package, version) = (&name[..split], &name[split + 1..]);
    let version = version.split('-').next()?;
    (package == "nix" && version.starts_with(|c: char| c.is_ascii_digit())).then(|| version.to_string())
}

/// Whether Nix `version` is 2.35.0 or 2.35.1 (or a build of them with a suffix, such as
/// `2.35.1pre…`): they wake goals waiting for a `max-jobs` slot one per finished build and can
/// lose wake-ups, up to a crash (`Assertion '!awake.empty()' failed`, NixOS/nix#16005 and
/// #16321), fixed in 2.35.2. nix/lib.nix's `nixLosesSlotWakeups` says the same for the modules.
pub fn loses_slot_wakeups(version: &str) -> bool {
    ["2.35.0", "2.35.1"]
        .iter()
        .any(|bad| version.strip_prefix(bad).is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit())))
}

/// The note for the user when Nix `version` is one that loses wake-ups, else `None`.
pub fn warning(version: &str) -> Option<String> {
    loses_slot_wakeups(version).then(|| {
        format!(
            "Nix {version} can lose the wake-ups of builds waiting for a max-jobs slot and then stop \
             with \"Assertion '!awake.empty()' failed\" (NixOS/nix#16005); upgrade to Nix 2.35.2 or \
             later, or pin 2.34"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const HASH: &str = "0123456789abcdfghijklmnpqrsvwxyz";

    fn version_of(path: &str) -> Option<String> {
        from_executable(Path::new(path))
    }

    #[test]
    fn reads_the_version_from_nix_store_paths() {
        assert_eq!(version_of(&format!("/nix/store/{HASH}-nix-2.35.0/bin/nix")).as_deref(), Some("2.35.0"));
        assert_eq!(version_of(&format!("/nix/store/{HASH}-nix-2.35.1/bin/nix-daemon")).as_deref(), Some("2.35.1"));
        // An output's suffix is not part of the version; a pre-release's is.
        assert_eq!(version_of(&format!("/nix/store/{HASH}-nix-2.35.1-man/bin/nix")).as_deref(), Some("2.35.1"));
        assert_eq!(version_of(&format!("/nix/store/{HASH}-nix-2.36.0pre20260801_abcdef0/bin/nix")).as_deref(), Some("2.36.0pre20260801_abcdef0"));
        // Any store directory.
        assert_eq!(version_of(&format!("/home/me/store/{HASH}-nix-2.28.3/bin/nix")).as_deref(), Some("2.28.3"));
    }

    #[test]
    fn other_layouts_give_no_version() {
        for path in [
            "/usr/bin/nix-daemon".to_string(),
            "/usr/bin/nix".to_string(),
            "nix".to_string(),
            "/".to_string(),
            format!("/nix/store/{HASH}-nix-2.35.0/libexec/nix"),
            format!("/nix/store/{HASH}-nix-cli-2.35.0/bin/nix"),
            format!("/nix/store/{HASH}-nix-util-2.35.1/bin/nix"),
            format!("/nix/store/{HASH}-lix-2.93.3/bin/nix"),
            format!("/nix/store/{HASH}-nix/bin/nix"),
            format!("/nix/store/{HASH}nix-2.35.0/bin/nix"),
            "/nix/store/EEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEE-nix-2.35.0/bin/nix".to_string(),
            "/nix/store/short-nix-2.35.0/bin/nix".to_string(),
        ] {
            assert_eq!(version_of(&path), None, "{path}");
        }
    }

    #[test]
    fn only_2_35_0_and_2_35_1_lose_wake_ups() {
        for version in ["2.35.0", "2.35.1", "2.35.1pre20260701_0123abc"] {
            assert!(loses_slot_wakeups(version), "{version}");
            let note = warning(version).unwrap();
            assert!(note.contains(&format!("Nix {version} ")) && note.contains("nix#16005") && note.contains("2.35.2"), "{note}");
        }
        for version in ["2.8.0", "2.34.8", "2.35.2", "2.35.10", "2.35.11", "2.36.0", "2.3.50"] {
            assert!(!loses_slot_wakeups(version), "{version}");
            assert_eq!(warning(version), None, "{version}");
        }
    }

    #[test]
    fn reads_a_running_processs_executable() {
        // A process whose executable sits where Nix 2.35.0's would: /proc/<pid>/exe names it.
        let dir = tempfile::tempdir().unwrap();
        let bin: PathBuf = dir.path().join(format!("{HASH}-nix-2.35.0/bin"));
        std::fs::create_dir_all(&bin).unwrap();
        let program = bin.join("nix");
        std::fs::copy("/bin/sleep", &program).unwrap();
        // A process forked by another test while the copy was open for writing may still hold
        // it (until its exec): the kernel then refuses to run it for that moment.
        let mut child = loop {
            match std::process::Command::new(&program).arg("30").spawn() {
                Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) => std::thread::yield_now(),
                spawned => break spawned.unwrap(),
            }
        };
        let version = of_process(child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(version.as_deref(), Some("2.35.0"));
        // This test program is no Nix.
        assert_eq!(of_process(std::process::id()), None);
    }
}
