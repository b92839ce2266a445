//! Whether Nix is still building a derivation, read from its output locks without touching them.
//!
//! Before asking the hook, Nix `flock`s `<output path>.lock` for every output
//! (`<drv path>.<output>.lock` for floating content-addressed outputs) and keeps the lock through
//! a local build; it releases it when the build ends, fails, or waits for a slot, and deletes the
//! file on success (derivation-goal.cc `tryToBuild`, pathlocks.cc). Opening or locking the file
//! to probe it would make Nix's own non-blocking attempt fail, so the locks are read from the Nix
//! process's own descriptor table (`/proc/<pid>/fd` and the `lock:` lines of `fdinfo`,
//! [`files_locked_by`]). Where that table is not ours to read, the kernel's table of held locks
//! (`/proc/locks`) is: every lock of the machine, and reading it takes, for writing, the semaphore
//! every file lock operation on the machine takes, which waits for an RCU grace period (about
//! 10 ms on a 2-core virtual machine). There a lock is matched by device and inode, or by inode
//! and the Nix process holding it: on btrfs, `stat` reports a subvolume's own device number while
//! the lock table shows the file system's. The kernel writes that table a page at a time, so a
//! read racing with other locks coming and going can miss an entry: a lock not seen there is
//! looked up in the holder's descriptor table before a build is taken for ended.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::sys::stat::{major, minor, Mode};
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

/// The locks held: by (major, minor, inode) and by (holder pid, inode).
#[derive(Debug, Default)]
pub struct HeldLocks {
    by_device: HashSet<(u64, u64, u64)>,
    by_holder: HashSet<(u32, u64)>,
}

impl HeldLocks {
    /// Reads the kernel's lock table.
    pub fn read() -> io::Result<HeldLocks> {
        Ok(HeldLocks::parse(&nix_tier_cgroups::read_kernel_text("/proc/locks")?))
    }

    /// Parses `/proc/locks` text. Lines of waiters (`->`) are skipped: they hold nothing.
    pub fn parse(text: &str) -> HeldLocks {
        let mut held = HeldLocks::default();
        for line in text.lines().filter(|line| !line.contains("->")) {
            // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF": device numbers in hex.
            let mut fields = line.split_whitespace().skip(4);
            let (Some(pid), Some(id)) = (fields.next().and_then(|p| p.parse().ok()), fields.next()) else {
                continue;
            };
            let mut parts = id.split(':');
            let (Some(maj), Some(min), Some(ino), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            let (Ok(maj), Ok(min), Ok(ino)) = (u64::from_str_radix(maj, 16), u64::from_str_radix(min, 16), ino.parse()) else {
                continue;
            };
            held.by_device.insert((maj, min, ino));
            held.by_holder.insert((pid, ino));
        }
        held
    }

    /// Whether the file at `path` exists and is locked by `holder`, the Nix process expected to
    /// hold it: seen in the lock table by its device and inode, or by its inode and holder, or
    /// else in the holder's descriptor table.
    pub fn holds(&self, path: &Path, holder: u32) -> bool {
        fs::metadata(path).is_ok_and(|meta| self.holds_file((meta.dev(), meta.ino()), path, holder))
    }

    /// [`HeldLocks::holds`] for the file at `path` whose device and inode are `file`.
    fn holds_file(&self, (dev, ino): (u64, u64), path: &Path, holder: u32) -> bool {
        self.by_device.contains(&(major(dev), minor(dev), ino)) || self.by_holder.contains(&(holder, ino)) || locked_by(holder, path)
    }
}

/// One of a build's output lock files, held open for `fstat` alone (`O_PATH`: no access to its
/// contents, no effect on its locks), so that a look at it needs no lookup of its path. Nix
/// deletes it when the build succeeded: it then has no links left.
pub struct OutputLock {
    path: PathBuf,
    /// Open, or why not: `ENOENT` when it was gone already; any other error (no descriptor left)
    /// leaves its path to be looked up at each look.
    fd: Result<OwnedFd, Errno>,
    /// Its closes, watched where [`LockCloses`] could be set up.
    watch: Option<LockWatch>,
}

impl OutputLock {
    /// The lock file at `path`, its closes watched through `closes`.
    pub fn open(path: &Path, closes: Option<&LockCloses>) -> OutputLock {
        let fd = nix::fcntl::open(path, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
            // SAFETY: `open` returned a new descriptor, owned only here.
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
        let watch = closes.zip(fd.as_ref().ok()).and_then(|(closes, _)| closes.watch(path));
        OutputLock { path: path.to_path_buf(), fd, watch }
    }

    /// Whether its closes are watched: until one is seen, Nix still holds it.
    pub fn close_watched(&self) -> bool {
        self.watch.is_some()
    }

    /// Whether one of `closed` is a close of it.
    pub fn closed_in(&self, closed: &HashSet<WatchDescriptor>) -> bool {
        self.watch.as_ref().is_some_and(|w| closed.contains(&w.wd))
    }

    /// Its device and inode while it exists.
    fn identity(&self) -> Option<(u64, u64)> {
        match &self.fd {
            Ok(fd) => {
                let st = nix::sys::stat::fstat(fd.as_raw_fd()).ok()?;
                (st.st_nlink > 0).then_some((st.st_dev, st.st_ino))
            }
            Err(Errno::ENOENT) => None,
            Err(_) => fs::symlink_metadata(&self.path).ok().map(|meta| (meta.dev(), meta.ino())),
        }
    }

    /// Whether Nix deleted it.
    pub fn deleted(&self) -> bool {
        self.identity().is_none()
    }

    /// Whether Nix process `holder` holds it, by the lock table `held` ([`HeldLocks::holds`]).
    pub fn held_by(&self, held: &HeldLocks, holder: u32) -> bool {
        self.identity().is_some_and(|file| held.holds_file(file, &self.path, holder))
    }

    /// Whether it is one of the files `locked` ([`files_locked_by`] its holder).
    pub fn locked_in(&self, locked: &HashSet<(u64, u64)>) -> bool {
        self.identity().is_some_and(|file| locked.contains(&file))
    }
}

impl HeldLocks {
    /// Whether the watcher lock at `path` is held: by its device and inode, or by its inode
    /// and the pid its holder wrote into it (see [`HeldLocks::holds`] for why both).
    pub fn holds_watcher_lock(&self, path: &Path) -> bool {
        let Ok(meta) = fs::metadata(path) else { return false };
        let dev = meta.dev();
        if self.by_device.contains(&(major(dev), minor(dev), meta.ino())) {
            return true;
        }
        let holder = nix_tier_model::files::read_regular(path, 32)
            .ok()
            .and_then(|text| String::from_utf8(text).ok()?.trim().parse::<u32>().ok());
        holder.is_some_and(|pid| self.by_holder.contains(&(pid, meta.ino())) || locked_by(pid, path))
    }
}

/// Nix's closes of the output lock files watched (inotify). Nix holds a build's lock file open
/// from before it asks the hook until it lets the build go, or the build ends (a successful
/// one's file is deleted first): only after a close is the lock table, a read of every lock on
/// the machine, worth reading for that build. One per watcher thread.
#[derive(Clone)]
pub struct LockCloses(Rc<LockClosesInner>);

struct LockClosesInner {
    inotify: Inotify,
    /// How many [`LockWatch`]es share each watch (the kernel gives one file one watch).
    watches: RefCell<HashMap<WatchDescriptor, usize>>,
}

/// The watch of one lock file's closes, removed when the last of its holders goes.
struct LockWatch {
    wd: WatchDescriptor,
    closes: LockCloses,
}

impl LockCloses {
    /// A new inotify instance; `None` where the kernel refuses one (the lock table is then read
    /// as often as without it).
    pub fn new() -> Option<LockCloses> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
        Some(LockCloses(Rc::new(LockClosesInner { inotify, watches: RefCell::default() })))
    }

    fn watch(&self, path: &Path) -> Option<LockWatch> {
        let wd = self.0.inotify.add_watch(path, AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_CLOSE_NOWRITE).ok()?;
        *self.0.watches.borrow_mut().entry(wd).or_default() += 1;
        Some(LockWatch { wd, closes: self.clone() })
    }

    /// The descriptor that becomes readable when a watched file is closed.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.inotify.as_fd()
    }

    /// The watches of the files closed since the last call; `None` when the kernel dropped
    /// events (any file may have been closed).
    pub fn closed(&self) -> Option<HashSet<WatchDescriptor>> {
        let mut closed = HashSet::new();
        while let Ok(events) = self.0.inotify.read_events() {
            for event in events {
                if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    return None;
                }
                if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                    // The watch is gone: removed, or its file deleted (after its last close).
                    self.0.watches.borrow_mut().remove(&event.wd);
                } else {
                    closed.insert(event.wd);
                }
            }
        }
        Some(closed)
    }
}

impl Drop for LockWatch {
    fn drop(&mut self) {
        let mut watches = self.closes.0.watches.borrow_mut();
        let Some(holders) = watches.get_mut(&self.wd) else { return };
        *holders -= 1;
        if *holders == 0 {
            watches.remove(&self.wd);
            let _ = self.closes.0.inotify.rm_watch(self.wd);
        }
    }
}

/// Whether process `pid` has `path` open with a lock on it ([`files_locked_by`]).
pub fn locked_by(pid: u32, path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| files_locked_by(pid).is_some_and(|locked| locked.contains(&(meta.dev(), meta.ino()))))
}

/// The lock files (`*.lock`, as Nix's and nix-tier's all are) process `pid` has open with a lock
/// on them, by device and inode, from its own descriptor table: exact, and it takes no lock of
/// the kernel's (see the module's documentation). Empty when the process is gone; `None` when
/// its table is not ours to read.
pub fn files_locked_by(pid: u32) -> Option<HashSet<(u64, u64)>> {
    let fds = match fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(fds) => fds,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Some(HashSet::new()),
        Err(_) => return None,
    };
    // A descriptor closed meanwhile is skipped; any other failure means the table is not ours
    // to read (Linux may list the descriptors and hide where they lead): nothing is known then.
    let closed_meanwhile = |error: io::Error| (error.kind() == io::ErrorKind::NotFound).then_some(());
    let mut locked = HashSet::new();
    for fd in fds.flatten() {
        // The name alone first: a Nix process has many more descriptors than lock files.
        let target = match fs::read_link(fd.path()) {
            Ok(target) => target,
            Err(error) => {
                closed_meanwhile(error)?;
                continue;
            }
        };
        if !target.as_os_str().as_bytes().ends_with(b".lock") {
            continue;
        }
        // `stat` through the descriptor's link: the file itself, wherever its path leads now.
        let info = fs::metadata(fd.path()).and_then(|meta| {
            let info = nix_tier_cgroups::read_kernel_text(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy()))?;
            Ok((meta, info))
        });
        match info {
            Ok((meta, info)) if meta.is_file() && info.lines().any(|line| line.starts_with("lock:")) => {
                locked.insert((meta.dev(), meta.ino()));
            }
            Ok(_) => {}
            Err(error) => closed_meanwhile(error)?,
        }
    }
    Some(locked)
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
        let me = std::process::id();
        assert!(!HeldLocks::read().unwrap().holds(&path, me));
        file.lock().unwrap();
        assert!(HeldLocks::read().unwrap().holds(&path, me));
        file.unlock().unwrap();
        assert!(!HeldLocks::read().unwrap().holds(&path, me));
        assert!(!HeldLocks::read().unwrap().holds(&dir.path().join("missing.lock"), me));
    }

    #[test]
    fn an_output_lock_held_open_sees_its_lock_and_its_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.lock");
        let file = File::create(&path).unwrap();
        let me = std::process::id();
        let lock = OutputLock::open(&path, None);
        assert!(!lock.deleted() && !lock.held_by(&HeldLocks::read().unwrap(), me));
        file.lock().unwrap();
        assert!(lock.held_by(&HeldLocks::read().unwrap(), me));
        // As Nix ends a build that succeeded: the file is deleted while still locked.
        fs::remove_file(&path).unwrap();
        assert!(lock.deleted() && !lock.held_by(&HeldLocks::read().unwrap(), me));
        // A file of the same name made again is another file.
        File::create(&path).unwrap();
        assert!(lock.deleted());
        assert!(OutputLock::open(&dir.path().join("missing.lock"), None).deleted());
    }

    /// The watches of the files closed, once the kernel has told of a close (within 10 s). A
    /// close is told when the file's last descriptor goes: a process another test forks at
    /// that moment holds a copy until it executes its program.
    fn closed_soon(closes: &LockCloses) -> HashSet<WatchDescriptor> {
        let mut fds = [nix::poll::PollFd::new(closes.as_fd(), nix::poll::PollFlags::POLLIN)];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16)).unwrap();
        closes.closed().unwrap()
    }

    #[test]
    fn closes_of_a_watched_lock_file_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.lock");
        let closes = LockCloses::new().unwrap();
        let nix = fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).unwrap();
        nix.lock().unwrap();
        let lock = OutputLock::open(&path, Some(&closes));
        let other = OutputLock::open(&dir.path().join("missing.lock"), Some(&closes));
        assert!(lock.close_watched() && !other.close_watched());
        assert_eq!(closes.closed(), Some(HashSet::new()), "nothing closed yet");
        // Nix lets the build go: it closes its descriptor.
        drop(nix);
        let closed = closed_soon(&closes);
        assert!(lock.closed_in(&closed), "{closed:?}");
        // A second holder of the same file shares the watch; it goes with the last.
        let again = OutputLock::open(&path, Some(&closes));
        drop(lock);
        fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert!(again.closed_in(&closed_soon(&closes)));
        drop(again);
        assert!(closes.0.watches.borrow().is_empty());
        fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert_eq!(closes.closed(), Some(HashSet::new()), "no watch left");
    }

    #[test]
    fn a_lock_missing_from_the_table_is_found_in_the_holders_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.lock");
        let file = File::create(&path).unwrap();
        let me = std::process::id();
        assert!(!locked_by(me, &path));
        file.lock().unwrap();
        assert!(locked_by(me, &path));
        let lock = OutputLock::open(&path, None);
        assert!(lock.locked_in(&files_locked_by(me).unwrap()));
        // An empty table, as a torn read of /proc/locks could give.
        assert!(HeldLocks::default().holds(&path, me));
        file.unlock().unwrap();
        assert!(!HeldLocks::default().holds(&path, me));
        assert!(!lock.locked_in(&files_locked_by(me).unwrap()), "open, but no longer locked");
        // A process gone holds nothing; one not ours to read is unknown.
        assert_eq!(files_locked_by(u32::MAX), Some(HashSet::new()));
        if nix::unistd::geteuid().is_root() {
            // As nobody, on a thread of its own (the raw call changes that thread's ids alone),
            // init's descriptors.
            let unreadable = std::thread::spawn(|| {
                // SAFETY: a plain system call on this thread's credentials.
                assert_eq!(unsafe { nix::libc::syscall(nix::libc::SYS_setresuid, 65534, 65534, 65534) }, 0);
                files_locked_by(1)
            });
            assert_eq!(unreadable.join().unwrap(), None);
        }
    }

    #[test]
    fn a_lock_on_another_device_number_is_matched_by_its_holder() {
        // btrfs: the lock table shows 00:27 where stat() of the same file says 0:28.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.lock");
        File::create(&path).unwrap();
        let ino = fs::metadata(&path).unwrap().ino();
        let held = HeldLocks::parse(&format!("1: FLOCK  ADVISORY  WRITE 4242 ff:ff:{ino} 0 EOF\n"));
        assert!(held.holds(&path, 4242));
        assert!(!held.holds(&path, 4243), "another process's lock on an equal inode elsewhere");
        assert!(!held.holds(&dir.path().join("missing.lock"), 4242));
    }

    #[test]
    fn waiters_and_garbage_are_ignored() {
        let text = "1: FLOCK  ADVISORY  WRITE 10 fd:01:42 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 11 fd:01:43 0 EOF\n\
                    garbage\n";
        let held = HeldLocks::parse(text);
        assert!(held.by_device.contains(&(0xfd, 1, 42)));
        assert!(held.by_holder.contains(&(10, 42)));
        assert!(!held.by_device.contains(&(0xfd, 1, 43)));
        assert_eq!((held.by_device.len(), held.by_holder.len()), (1, 1));
    }
}
