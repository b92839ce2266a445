//! The state directory the broker and `nix-tier` share, and `state.json` in it: the snapshot of
//! the running builds (leases) and waiting builds that the broker writes (at most every 100 ms)
//! for `nix-tier status`, replaced atomically under an exclusive `flock` on `state.lock`.
//!
//! The directory is created mode 0700 and its files 0600. An existing directory must belong to
//! the hook's user and be writable by nobody else; it is never chmod-ed or taken over. Its files
//! are opened relative to it with `O_NOFOLLOW` and `O_NONBLOCK`, must be regular files, and are
//! read with a bound, so nothing put there can redirect, block or exhaust a reader. A file that
//! is not what it should be (a directory, a FIFO, a symlink) is set aside as
//! `<name>.broken-<ms>-<pid>-<n>` and made anew.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fstatat, mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};
use nix_tier_model::Tier;
use serde::{Deserialize, Serialize};


const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "state.lock";
/// The largest state file read: thousands of builds take a few hundred KiB.
const MAX_STATE_BYTES: u64 = 16 << 20;

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
    /// Memory reserved for it, MiB: what the budget counts (more than its reservation when it
    /// was seen using more).
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
        let dir = open_state_dir(&self.path, true)?;
        let deadline = Instant::now() + LOCK_TIMEOUT;
        loop {
            let (file, _) = open_regular_at(&dir, LOCK_FILE, true)?;
            match file.try_lock() {
                // The lock counts only on the file that is there now: another hook may have set
                // a broken one aside meanwhile.
                Ok(()) if same_file(&dir, LOCK_FILE, &file) => {
                    return Ok(LockedState { dir, _lock: file });
                }
                Ok(()) => {}
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

    /// Takes the exclusive lock on file `name` in the directory (creating both if needed) for as
    /// long as the file returned is open; `None` when another process holds it.
    pub fn exclusive(&self, name: &str) -> io::Result<Option<File>> {
        let dir = open_state_dir(&self.path, true)?;
        let (file, _) = open_regular_at(&dir, name, true)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// Opens (creating if needed) file `name` in the directory for appending, e.g. a log.
    pub fn append(&self, name: &str) -> io::Result<File> {
        let dir = open_state_dir(&self.path, true)?;
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_APPEND | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let fd = openat(Some(dir.as_raw_fd()), name, flags, Mode::from_bits_truncate(0o600)).map_err(not_followed)?;
        // SAFETY: openat returned a new descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Reads the state without the lock and without changing anything (for `nix-tier status`):
    /// a snapshot that may be a moment old. A missing directory or file is the empty state.
    pub fn peek(&self) -> io::Result<State> {
        let dir = match open_state_dir(&self.path, false) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(State::default()),
            dir => dir?,
        };
        match read_state(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", self.path.join(STATE_FILE).display()))),
            Ok(state) => Ok(state),
        }
    }
}

/// The state directory, locked; dropping it releases the lock.
pub struct LockedState {
    dir: OwnedFd,
    _lock: File,
}

impl LockedState {
    /// Replaces the state file atomically.
    pub fn save(&self, state: &State) -> io::Result<()> {
        let temp = format!("{STATE_FILE}.{}", std::process::id());
        let _ = unlinkat(Some(self.dir.as_raw_fd()), temp.as_str(), UnlinkatFlags::NoRemoveDir);
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(Some(self.dir.as_raw_fd()), temp.as_str(), flags, Mode::from_bits_truncate(0o600))?;
        // SAFETY: openat returned a new descriptor that nothing else owns.
        let mut file = unsafe { File::from_raw_fd(fd) };
        file.write_all(&serde_json::to_vec(state)?)?;
        if renameat(Some(self.dir.as_raw_fd()), temp.as_str(), Some(self.dir.as_raw_fd()), STATE_FILE).is_err() {
            // Something that cannot be replaced (a directory) is in the way.
            set_aside(&self.dir, STATE_FILE)?;
            renameat(Some(self.dir.as_raw_fd()), temp.as_str(), Some(self.dir.as_raw_fd()), STATE_FILE)?;
        }
        Ok(())
    }
}

fn read_state(dir: &OwnedFd) -> io::Result<State> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let fd = openat(Some(dir.as_raw_fd()), STATE_FILE, flags, Mode::empty()).map_err(not_followed)?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    let bytes = nix_tier_model::files::read_opened(unsafe { File::from_raw_fd(fd) }, MAX_STATE_BYTES)?;
    serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// `ELOOP` from `O_NOFOLLOW`, said plainly.
fn not_followed(errno: Errno) -> io::Error {
    match errno {
        Errno::ELOOP => io::Error::new(io::ErrorKind::InvalidInput, "is a symlink"),
        other => other.into(),
    }
}

/// Opens (creating, mode 0600, if asked) the regular file `name` in `dir`; anything else in its
/// place is set aside first, and the second value says so.
fn open_regular_at(dir: &OwnedFd, name: &str, create: bool) -> io::Result<(File, Option<String>)> {
    let mut note = None;
    loop {
        let flags = OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let flags = if create { flags | OFlag::O_CREAT } else { flags };
        let opened = openat(Some(dir.as_raw_fd()), name, flags, Mode::from_bits_truncate(0o600));
        let problem = match opened {
            // SAFETY: openat returned a new descriptor that nothing else owns.
            Ok(fd) => match unsafe { File::from_raw_fd(fd) } {
                file if file.metadata()?.is_file() => return Ok((file, note)),
                _ => "is not a regular file",
            },
            Err(Errno::ELOOP) => "is a symlink",
            Err(Errno::EISDIR) => "is a directory",
            Err(e) => return Err(e.into()),
        };
        if note.is_some() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name} {problem}, again after repair")));
        }
        let aside = set_aside(dir, name)?;
        note = Some(format!("{name} {problem}; set aside as {aside}"));
    }
}

/// Renames `name` in `dir` to `<name>.broken-<ms>`, keeping it for inspection; the new name.
fn set_aside(dir: &OwnedFd, name: &str) -> io::Result<String> {
    static SET_ASIDE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let serial = SET_ASIDE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let aside = format!("{name}.broken-{}-{}-{serial}", now_ms(), std::process::id());
    renameat(Some(dir.as_raw_fd()), name, Some(dir.as_raw_fd()), aside.as_str())?;
    Ok(aside)
}

/// Whether `name` in `dir` is the file `file` is open on.
fn same_file(dir: &OwnedFd, name: &str, file: &File) -> bool {
    let there = fstatat(Some(dir.as_raw_fd()), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW);
    match (there, file.metadata()) {
        (Ok(there), Ok(open)) => there.st_ino == open.ino() && there.st_dev == open.dev(),
        _ => false,
    }
}

/// Opens the state directory `path`; to write (`create`), creating it (mode 0700) and the
/// directories missing above it. Directories it creates or opens are never symlinks; one to
/// write in must belong to this user and be writable by nobody else (it is refused, not
/// changed). Readers (`nix-tier status`) only read, with bounds, so any owner will do.
pub(crate) fn open_state_dir(path: &Path, create: bool) -> io::Result<OwnedFd> {
    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let refuse = |why: String| io::Error::new(io::ErrorKind::PermissionDenied, format!("{}: {why}", path.display()));
    let fd = match openat(None, path, dir_flags, Mode::empty()) {
        // SAFETY: openat returned a new descriptor that nothing else owns.
        Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
        Err(Errno::ELOOP) => return Err(refuse("is a symlink; refusing to keep state there".into())),
        Err(Errno::ENOTDIR) => return Err(refuse("is not a directory".into())),
        Err(Errno::ENOENT) if create => create_dirs(path)?,
        Err(e) => return Err(io::Error::new(io::Error::from(e).kind(), format!("{}: {e}", path.display()))),
    };
    if !create {
        return Ok(fd);
    }
    let meta = nix::sys::stat::fstat(fd.as_raw_fd())?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.st_uid != me {
        return Err(refuse(format!(
            "belongs to uid {}, not to this user (uid {me}); refusing to keep state there: set NIX_TIER_STATE_DIR to a directory of your own",
            meta.st_uid
        )));
    }
    if meta.st_mode & 0o022 != 0 {
        return Err(refuse(format!(
            "is writable by other users (mode {:o}); refusing to keep state there: chmod go-w it, or set NIX_TIER_STATE_DIR",
            meta.st_mode & 0o7777
        )));
    }
    Ok(fd)
}

/// Creates `path` and the directories missing above it, mode 0700, each made with `mkdirat` and
/// opened with `O_NOFOLLOW` inside its parent, so no component can be swapped for a symlink.
fn create_dirs(path: &Path) -> io::Result<OwnedFd> {
    let existing = path.ancestors().skip(1).find(|a| a.as_os_str().is_empty() || a.is_dir()).unwrap_or(Path::new("/"));
    let start = if existing.as_os_str().is_empty() { Path::new(".") } else { existing };
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    let mut dir = unsafe { OwnedFd::from_raw_fd(openat(None, start, flags, Mode::empty())?) };
    let missing = path.strip_prefix(existing).unwrap_or(path);
    for component in missing.components() {
        let Component::Normal(name) = component else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a plain path", path.display())));
        };
        match mkdirat(Some(dir.as_raw_fd()), name, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(io::Error::new(io::Error::from(e).kind(), format!("creating {}: {e}", path.display()))),
        }
        let fd = openat(Some(dir.as_raw_fd()), name, flags | OFlag::O_NOFOLLOW, Mode::empty()).map_err(not_followed)?;
        // SAFETY: openat returned a new descriptor that nothing else owns.
        dir = unsafe { OwnedFd::from_raw_fd(fd) };
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn lease(drv: &str, lock: PathBuf) -> Lease {
        Lease {
            drv: drv.into(),
            name: drv.into(),
            tier: Tier::Light,
            memory_mib: 10,
            lock_files: vec![lock],
            started: 1,
            nix_pid: 1,
        }
    }

    fn waiter(drv: &str, seen: u64) -> Waiter {
        Waiter { drv: drv.into(), name: drv.into(), tier: Tier::Heavy, memory_mib: 10, since: seen, seen, reason: String::new() }
    }

    fn mkfifo(path: &Path) {
        nix::unistd::mkfifo(path, Mode::from_bits_truncate(0o600)).unwrap();
    }

    fn set_aside_count(dir: &Path, name: &str) -> usize {
        fs::read_dir(dir).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{name}.broken-"))).count()
    }

    #[test]
    fn the_snapshot_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = StateDir::at(dir.path().join("s"));
        assert_eq!(state_dir.peek().unwrap(), State::default(), "nothing written yet");
        let state = State { running: vec![lease("a", "/x".into())], waiting: vec![waiter("w", now())] };
        state_dir.lock().unwrap().save(&state).unwrap();
        assert_eq!(state_dir.peek().unwrap(), state);
    }

    #[test]
    fn a_fifo_or_directory_as_state_file_neither_blocks_nor_sticks() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = StateDir::at(dir.path().join("s"));
        drop(state_dir.lock().unwrap());
        let file = dir.path().join("s").join(STATE_FILE);
        for (what, make) in [("FIFO", mkfifo as fn(&Path)), ("directory", |p: &Path| fs::create_dir(p).unwrap())] {
            make(&file);
            // peek (nix-tier status) says so without blocking or changing anything.
            let err = state_dir.peek().unwrap_err().to_string();
            assert!(err.contains("not a regular file") || err.contains("a directory"), "{what}: {err}");
            state_dir.lock().unwrap().save(&State::default()).unwrap();
            assert!(fs::symlink_metadata(&file).unwrap().is_file(), "{what}: a regular state file again");
            fs::remove_file(&file).unwrap();
        }
        assert_eq!(set_aside_count(&dir.path().join("s"), STATE_FILE), 1, "the directory is kept for inspection");
    }

    #[test]
    fn a_lock_file_replaced_by_a_directory_fifo_or_symlink_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = StateDir::at(dir.path().join("s"));
        drop(state_dir.lock().unwrap());
        let lock = dir.path().join("s").join(LOCK_FILE);
        type Make = Box<dyn Fn(&Path)>;
        let makers: [(&str, Make); 3] = [
            ("directory", Box::new(|p: &Path| fs::create_dir(p).unwrap())),
            ("FIFO", Box::new(|p: &Path| mkfifo(p))),
            ("symlink", Box::new(|p: &Path| std::os::unix::fs::symlink("/etc/passwd", p).unwrap())),
        ];
        for (what, make) in makers {
            fs::remove_file(&lock).or_else(|_| fs::remove_dir(&lock)).ok();
            make(&lock);
            drop(state_dir.lock().unwrap_or_else(|e| panic!("{what} in place of the lock: {e}")));
            assert!(fs::symlink_metadata(&lock).unwrap().is_file(), "{what}");
        }
        assert_eq!(set_aside_count(&dir.path().join("s"), LOCK_FILE), 3);
        assert_eq!(fs::read_to_string("/etc/passwd").map(|t| t.is_empty()).ok(), Some(false), "the link's target is untouched");
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
        // A directory nix-tier did not make private is refused, not chmod-ed.
        let open = dir.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let err = StateDir::at(&open).lock().err().expect("a world-writable directory is refused").to_string();
        assert!(err.contains("writable by other users") && err.contains("NIX_TIER_STATE_DIR"), "{err}");
        assert_eq!(fs::metadata(&open).unwrap().permissions().mode() & 0o777, 0o777, "left as it was");
        // Missing parents are made too, each private.
        let deep = dir.path().join("a/b/c");
        drop(StateDir::at(&deep).lock().unwrap());
        assert_eq!(fs::metadata(dir.path().join("a")).unwrap().permissions().mode() & 0o777, 0o700);
    }
}
