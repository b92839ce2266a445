//! Whether Nix is still building a derivation, read from its output locks without touching them.
//!
//! Before asking the hook, Nix `flock`s `<output path>.lock` for every output
//! (`<drv path>.<output>.lock` for floating content-addressed outputs) and keeps the lock through
//! a local build; it releases it when the build ends, fails, or waits for a slot, and deletes the
//! file on success (derivation-goal.cc `tryToBuild`, pathlocks.cc). Opening or locking the file
//! to probe it would make Nix's own non-blocking attempt fail, so the kernel's table of held locks
//! (`/proc/locks`) is read instead and matched by device and inode.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sys::stat::{major, minor};
use nix_tier_model::derivation::Derivation;

/// The lock files Nix holds while it builds `drv` (whose store path is `drv_path`).
pub fn lock_files(drv: &Derivation, drv_path: &str) -> Vec<PathBuf> {
    drv.outputs
        .iter()
        .map(|(name, output)| match output.path.is_empty() {
            false => PathBuf::from(format!("{}.lock", output.path)),
            true => PathBuf::from(format!("{drv_path}.{name}.lock")),
        })
        .collect()
}

/// The set of files some process holds a lock on, by (major, minor, inode).
#[derive(Debug, Default)]
pub struct HeldLocks(HashSet<(u64, u64, u64)>);

impl HeldLocks {
    /// Reads the kernel's lock table.
    pub fn read() -> io::Result<HeldLocks> {
        Ok(HeldLocks::parse(&fs::read_to_string("/proc/locks")?))
    }

    /// Parses `/proc/locks` text. Lines of waiters (`->`) are skipped: they hold nothing.
    pub fn parse(text: &str) -> HeldLocks {
        let held = text
            .lines()
            .filter(|line| !line.contains("->"))
            .filter_map(|line| {
                // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF": device numbers in hex.
                let id = line.split_whitespace().nth(5)?;
                let mut parts = id.split(':');
                let maj = u64::from_str_radix(parts.next()?, 16).ok()?;
                let min = u64::from_str_radix(parts.next()?, 16).ok()?;
                let ino = parts.next()?.parse().ok()?;
                Some((maj, min, ino))
            })
            .collect();
        HeldLocks(held)
    }

    /// Whether the file at `path` exists and some process holds a lock on it.
    pub fn holds(&self, path: &Path) -> bool {
        match fs::metadata(path) {
            Ok(meta) => {
                let dev = meta.dev();
                self.0.contains(&(major(dev), minor(dev), meta.ino()))
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    #[test]
    fn a_held_flock_is_seen_and_a_released_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.lock");
        let file = File::create(&path).unwrap();
        assert!(!HeldLocks::read().unwrap().holds(&path));
        file.lock().unwrap();
        assert!(HeldLocks::read().unwrap().holds(&path));
        file.unlock().unwrap();
        assert!(!HeldLocks::read().unwrap().holds(&path));
        assert!(!HeldLocks::read().unwrap().holds(&dir.path().join("missing.lock")));
    }

    #[test]
    fn waiters_and_garbage_are_ignored() {
        let text = "1: FLOCK  ADVISORY  WRITE 10 fd:01:42 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 11 fd:01:43 0 EOF\n\
                    garbage\n";
        let held = HeldLocks::parse(text);
        assert!(held.0.contains(&(0xfd, 1, 42)));
        assert!(!held.0.contains(&(0xfd, 1, 43)));
        assert_eq!(held.0.len(), 1);
    }
}
