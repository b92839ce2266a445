//! The machine-wide state every hook process shares: running builds (leases) and waiting
//! builds, in one JSON file under the state directory, read and written under an exclusive
//! `flock` on a separate lock file (as Nix's build-remote guards `current-load`).
//!
//! A lease ends when Nix no longer holds its output locks ([`HeldLocks`]): on success, failure,
//! a killed client, or Nix waiting for a local slot after all. So a dead client leaks a slot
//! only until the next decision, at most one `build-poll-interval` away.
//!
//! The directory is created mode 0700 and files 0600; symlinks are refused, so another user
//! cannot redirect the hook's writes.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::OFlag;
use nix_tier_model::admission::Claim;
use nix_tier_model::Tier;
use serde::{Deserialize, Serialize};

use crate::output_locks::HeldLocks;

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "state.lock";

/// A build the hook admitted and Nix is running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// The .drv path.
    pub drv: String,
    /// The derivation's name.
    pub name: String,
    /// Its tier.
    pub tier: Tier,
    /// Memory reserved for it, MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// Nix's output locks for it; the lease lives while one is held.
    pub lock_files: Vec<PathBuf>,
    /// When it was admitted, seconds since the epoch.
    pub started: u64,
    /// The Nix process that asked.
    pub nix_pid: u32,
}

/// A build the hook postponed, still asking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Waiter {
    /// The .drv path.
    pub drv: String,
    /// The derivation's name.
    pub name: String,
    /// Its tier.
    pub tier: Tier,
    /// Memory it will reserve, MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// When it first waited, seconds since the epoch.
    pub since: u64,
    /// When it last asked; a waiter that stops asking (its client died) expires.
    pub seen: u64,
    /// Why it waits.
    pub reason: String,
}

/// Everything shared between hook processes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Running builds.
    pub running: Vec<Lease>,
    /// Waiting builds, oldest first.
    pub waiting: Vec<Waiter>,
}

impl State {
    /// Drops leases whose output locks nobody holds and waiters unseen for `waiter_ttl` seconds;
    /// returns the ended leases.
    pub fn prune(&mut self, held: &HeldLocks, now: u64, waiter_ttl: u64) -> Vec<Lease> {
        let (alive, ended): (Vec<Lease>, Vec<Lease>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|lease| lease.lock_files.iter().any(|f| held.holds(f, lease.nix_pid)));
        self.running = alive;
        self.waiting.retain(|w| now.saturating_sub(w.seen) <= waiter_ttl);
        ended
    }

    /// The claims of the running builds.
    pub fn claims(&self) -> Vec<Claim> {
        self.running.iter().map(|l| Claim { tier: l.tier, memory_mib: l.memory_mib }).collect()
    }

    /// The oldest heavy build waiting, other than `drv`.
    pub fn oldest_waiting_heavy(&self, drv: &str) -> Option<&Waiter> {
        self.waiting.iter().filter(|w| w.tier == Tier::Heavy && w.drv != drv).min_by_key(|w| w.since)
    }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Where the shared state lives.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

/// How long a hook waits for another hook's lock before giving up (and declining).
const LOCK_TIMEOUT: Duration = Duration::from_secs(2);

impl StateDir {
    /// The state directory: `$NIX_TIER_STATE_DIR`, else `$NIX_STATE_DIR/nix-tier`, else
    /// `/nix/var/nix/nix-tier` (beside Nix's own state, as build-remote keeps `current-load`).
    pub fn from_env() -> StateDir {
        let path = std::env::var_os("NIX_TIER_STATE_DIR").map(PathBuf::from).unwrap_or_else(|| {
            let nix_state = std::env::var_os("NIX_STATE_DIR").map_or_else(|| PathBuf::from("/nix/var/nix"), PathBuf::from);
            nix_state.join("nix-tier")
        });
        StateDir { path }
    }

    /// A state directory at `path`.
    pub fn at(path: impl Into<PathBuf>) -> StateDir {
        StateDir { path: path.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the exclusive lock, creating the directory if needed.
    pub fn lock(&self) -> io::Result<LockedState> {
        ensure_private_dir(&self.path)?;
        let file = open_private(&self.path.join(LOCK_FILE), false)?;
        let deadline = Instant::now() + LOCK_TIMEOUT;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(LockedState { dir: self.path.clone(), _lock: file }),
                Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{} stayed locked for {LOCK_TIMEOUT:?}", self.path.join(LOCK_FILE).display()),
                    ))
                }
                Err(fs::TryLockError::Error(e)) => return Err(e),
            }
        }
    }

    /// Reads the state without the lock (for `nix-tier status`): a snapshot that may be a
    /// moment old. A missing file is the empty state.
    pub fn peek(&self) -> io::Result<State> {
        match read_state(&self.path.join(STATE_FILE)) {
            Ok(state) => Ok(state),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e),
        }
    }
}

/// The state directory, locked; dropping it releases the lock.
pub struct LockedState {
    dir: PathBuf,
    _lock: File,
}

impl LockedState {
    /// The shared state. A corrupt file is replaced by the empty state (leases are rebuilt as
    /// builds are admitted again); the second value then says what was wrong.
    pub fn load(&self) -> (State, Option<String>) {
        let path = self.dir.join(STATE_FILE);
        match read_state(&path) {
            Ok(state) => (state, None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (State::default(), None),
            Err(e) => (State::default(), Some(format!("state file {} was unreadable ({e}); starting afresh", path.display()))),
        }
    }

    /// Replaces the state file atomically.
    pub fn save(&self, state: &State) -> io::Result<()> {
        let path = self.dir.join(STATE_FILE);
        let temp = self.dir.join(format!("{STATE_FILE}.{}", std::process::id()));
        let _ = fs::remove_file(&temp);
        let mut file = open_private(&temp, true)?;
        file.write_all(&serde_json::to_vec(state)?)?;
        fs::rename(&temp, &path)
    }
}

fn read_state(path: &Path) -> io::Result<State> {
    let mut text = String::new();
    File::options()
        .read(true)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(path)?
        .read_to_string(&mut text)?;
    serde_json::from_str(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Creates `path` mode 0700 if missing; an existing one must be a directory, not a symlink, and
/// is made private (mode 0700) if it is not.
pub(crate) fn ensure_private_dir(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is a symlink; refusing to keep state there", path.display()),
        )),
        Ok(meta) if !meta.is_dir() => {
            Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a directory", path.display())))
        }
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => fs::set_permissions(path, fs::Permissions::from_mode(0o700)),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => DirBuilder::new().recursive(true).mode(0o700).create(path),
        Err(e) => Err(e),
    }
}

/// Opens (creating, mode 0600) a file that must not be a symlink.
fn open_private(path: &Path, truncate: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .mode(0o600)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(drv: &str, lock: PathBuf) -> Lease {
        Lease { drv: drv.into(), name: drv.into(), tier: Tier::Light, memory_mib: 10, lock_files: vec![lock], started: 1, nix_pid: 1 }
    }

    #[test]
    fn state_round_trips_and_corruption_repairs_itself() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = StateDir::at(dir.path().join("s"));
        let locked = state_dir.lock().unwrap();
        assert_eq!(locked.load(), (State::default(), None));
        let state = State { running: vec![lease("a", "/x".into())], waiting: vec![] };
        locked.save(&state).unwrap();
        assert_eq!(locked.load().0, state);
        fs::write(dir.path().join("s").join(STATE_FILE), "{ not json").unwrap();
        let (repaired, note) = locked.load();
        assert_eq!(repaired, State::default());
        assert!(note.unwrap().contains("state.json"));
    }

    #[test]
    fn leases_end_when_their_locks_are_released() {
        let dir = tempfile::tempdir().unwrap();
        let held_path = dir.path().join("held.lock");
        let held_file = File::create(&held_path).unwrap();
        held_file.lock().unwrap();
        let mut state = State {
            running: vec![lease("held", held_path), lease("gone", dir.path().join("gone.lock"))],
            waiting: vec![],
        };
        let ended = state.prune(&HeldLocks::read().unwrap(), now(), 10);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].drv, "gone");
        assert_eq!(state.running[0].drv, "held");
    }

    #[test]
    fn the_lock_excludes_a_second_holder_and_symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = StateDir::at(dir.path().join("s"));
        let first = state_dir.lock().unwrap();
        let err = state_dir.lock().err().expect("second lock must time out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(first);
        assert!(state_dir.lock().is_ok());

        std::os::unix::fs::symlink(dir.path(), dir.path().join("link")).unwrap();
        assert!(StateDir::at(dir.path().join("link")).lock().is_err());
    }
}
