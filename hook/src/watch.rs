//! The broker's watcher: bounds each admitted build with a cgroup, ends its lease and records
//! how it went.
//!
//! Nix forks the builder only after the hook has answered, so the broker hands each admitted
//! build to this thread ([`run`]) after replying: handing over a build costs a message, not a
//! process. It watches every build in one loop, waking for the nearest due build, a builder's
//! exit (its pidfd) or a new order, and for each build
//!
//! 1. holds a watcher lock for the build (a file of `<state dir>/leases`, with the job in it)
//!    for as long as the build is watched, so that a broker started after this one is killed
//!    finds the build again ([`running_builds`]); the files are reused from build to build
//!    ([`LockFiles`]);
//! 2. finds the builder: the child of the Nix worker whose environment holds the build's
//!    `<output>=<path>` entries (sandboxed builders are children of the worker too), as it
//!    executes (the kernel's process events, `Births`), or by reading the worker's children
//!    every millisecond at first where there are no events; creates the build's cgroup (memory limit = the build's reservation,
//!    CPU quota = its tier's cores) under the `nix-tier` parent and moves the builder and its
//!    descendants in (with build users, every process of the builder's uid); processes forked
//!    after the move are born inside. Without a cgroup it follows the builder's descendants;
//! 3. ends the lease as soon as the build's processes are gone, and the watch when Nix has also
//!    released the output locks; an OOM kill inside the cgroup is reported in the build's own log
//!    (within a second, and before the log closes);
//! 4. ends what the build left running (after a grace period), removes the cgroup, records the
//!    build (its wait for admission, wall and CPU time, peak memory, outcome) in the history
//!    database and releases the watcher lock.
//!
//! Builds declined without a lease ([`Order::Candidate`]) are looked for among their worker's
//! new children and, should one start, adopted into the table and watched like the rest.

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix_tier_cgroups::{BuildCgroup, Hierarchy, Limits};
use nix_tier_model::admission::Claim;
use nix_tier_model::leases::LeaseId;
use nix_tier_model::Tier;
use serde::{Deserialize, Serialize};

use crate::history::{package_and_version, BuildRecord, History, Outcome};
use crate::output_locks::{self, HeldLocks, LockCloses, OutputLock};
use crate::proc_events::{ProcEvent, ProcEvents};
use crate::procfs;

/// The parent cgroup of all tier builds.
pub const CGROUP_PARENT: &str = "nix-tier";

const MIB: u64 = 1024 * 1024;

/// How long what a build leaves running may take to end by itself before it is killed.
const LEFTOVER_GRACE: Duration = Duration::from_millis(500);
/// How long the watcher waits for leftovers to die at all.
const LEFTOVER_GIVE_UP: Duration = Duration::from_secs(5);
/// How often, at most, a running build's cgroup is read for OOM kills to report in its log (and
/// once more when its builder exits, before the log closes), and for the memory it uses.
const KILLS_EVERY: Duration = Duration::from_secs(1);
/// Reads in a row of a builder's tree that find nothing of the build outside its cgroup, after
/// which none can be left there ([`Watched::move_into_cgroup`]).
const SETTLED_READS: u8 = 2;

/// Everything a watcher needs to know about its build.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchJob {
    /// The .drv path.
    pub drv: String,
    /// The derivation's name.
    pub name: String,
    /// Its tier.
    pub tier: Tier,
    /// Its memory limit, MiB: its cgroup's.
    #[serde(rename = "memoryLimitMiB")]
    pub memory_limit_mib: u64,
    /// The memory it reserves, MiB; `None` (a job written by an older hook) reserves the limit.
    #[serde(default, rename = "memoryReservedMiB")]
    pub memory_reserved_mib: Option<u64>,
    /// Whether the reservation and limit were learned from the package's history (else they are
    /// the tier's).
    pub limit_learned: bool,
    /// Its CPU quota, cores.
    pub cores: u32,
    /// Nix's output locks: the build runs while one is held.
    pub lock_files: Vec<PathBuf>,
    /// `<output name>=<path>` entries of the builder's environment.
    pub output_env: Vec<String>,
    /// The output paths.
    pub outputs: Vec<String>,
    /// The Nix worker that will fork the builder.
    pub nix_pid: u32,
    /// The uids a builder of this Nix may run as: the worker's own and the build users'.
    pub builder_uids: Vec<u32>,
    /// When the hook was first asked about it, milliseconds since the epoch: it waited from then
    /// until admitted. `None` in the job of a build admitted by an older hook (a watcher lock
    /// taken over across an upgrade).
    #[serde(default)]
    pub asked_unix_ms: Option<u64>,
    /// When it was admitted, milliseconds since the epoch.
    pub started_unix_ms: u64,
    /// The prepared parent of builds' cgroups; `None` where none is usable (the build is
    /// watched and recorded, not bounded).
    pub cgroups: Option<Hierarchy>,
}

impl WatchJob {
    /// What the build claims of the machine, as the lease table counts it.
    pub fn claim(&self) -> Claim {
        Claim { tier: self.tier, memory_mib: self.memory_reserved_mib.unwrap_or(self.memory_limit_mib), learned: self.limit_learned }
    }
}

/// How a watched build ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// Whether the builder was ever found (if not, Nix did not start it after all).
    pub started: bool,
    /// Wall time from admission to the release of the locks.
    pub wall: Duration,
    /// How long it held its lease: from admission until its processes were gone, or until now
    /// when the lease ends with the watch.
    pub leased: Duration,
    /// CPU time inside the cgroup.
    pub cpu: Option<Duration>,
    /// Peak memory: the cgroup's, plus what its processes held when they were moved in.
    pub peak_bytes: Option<u64>,
    /// OOM kills inside the cgroup.
    pub oom_kills: u64,
    /// Whether the build ran in a cgroup with the limit.
    pub bounded: bool,
    /// Whether the outputs are valid (the locks were deleted and the paths exist).
    pub succeeded: bool,
}

/// How often the watcher steps a build whose builder it has not found. Where it reads `/proc`
/// for the builder (no process events, or events lost): every millisecond at first, so that
/// it is placed before it grows (Nix starts it within milliseconds of the answer), less often
/// when Nix is slow to start it (a busy worker, a large sandbox to set up). Where the builder's
/// exec is an event that wakes the watcher, a step only looks whether Nix let the build go or
/// finished it unseen, which the closes of its lock files also tell: every
/// [`SEARCH_BY_EVENTS_EVERY`] (a millisecond's steps cost a third of the broker's CPU in a burst
/// of short builds).
fn search_pause(since_admission: Duration, by_events: bool) -> Duration {
    let pause = match since_admission.as_millis() {
        0..500 => Duration::from_millis(1),
        500..2000 => Duration::from_millis(5),
        2000..10_000 => Duration::from_millis(20),
        _ => Duration::from_millis(100),
    };
    if by_events {
        pause.max(SEARCH_BY_EVENTS_EVERY)
    } else {
        pause
    }
}

/// How often a build whose builder is found by process events is stepped until it is found.
const SEARCH_BY_EVENTS_EVERY: Duration = Duration::from_millis(20);

/// When the watcher looks for the builder among all processes, should it not be a child of the
/// worker (it always is, in every Nix from 2.8 on): at 2 s, then every 10 s.
fn full_scan_due(since_admission: Duration, last: &mut Option<Duration>) -> bool {
    let due = match *last {
        None => since_admission >= Duration::from_secs(2),
        Some(at) => since_admission >= at + Duration::from_secs(10),
    };
    if due {
        *last = Some(since_admission);
    }
    due
}

/// What one pass of the watcher's loop reads of `/proc`, shared by the builds it steps and the
/// candidates it looks for: Nix's locks, and the Nix workers' children, with the
/// environments of those not yet known to be a builder. Read anew at each pass: a child just
/// forked still has its worker's environment.
struct Scan {
    /// Processes that are no build's new builder ([`no_new_builders`]).
    known: HashSet<u32>,
    children: HashMap<u32, Vec<u32>>,
    environs: HashMap<u32, Option<Vec<u8>>>,
    structured_outputs: HashMap<u32, Vec<String>>,
    /// The files each Nix process holds locked ([`output_locks::files_locked_by`]).
    locked: HashMap<u32, Option<HashSet<(u64, u64)>>>,
    /// The kernel's lock table, read where a Nix process's descriptors cannot be.
    held: Option<Option<HeldLocks>>,
}

impl Scan {
    fn new(known: HashSet<u32>) -> Scan {
        Scan { known, children: Default::default(), environs: Default::default(), structured_outputs: Default::default(), locked: Default::default(), held: None }
    }

    /// Whether Nix process `holder` holds one of `locks`, by its descriptor table, else by the
    /// kernel's lock table (see [`crate::output_locks`] for why in that order); taken to, when
    /// neither can be read (out of descriptors, say): a build is not ended on a failed read.
    fn holds(&mut self, locks: &[OutputLock], holder: u32) -> bool {
        if let Some(locked) = self.locked.entry(holder).or_insert_with(|| output_locks::files_locked_by(holder)) {
            return locks.iter().any(|lock| lock.locked_in(locked));
        }
        let held = self.held.get_or_insert_with(|| HeldLocks::read().ok());
        held.as_ref().is_none_or(|held| locks.iter().any(|lock| lock.held_by(held, holder)))
    }

    /// The children of Nix worker `worker` that may be a new builder.
    fn new_children(&mut self, worker: u32) -> Vec<u32> {
        let children = self.children.entry(worker).or_insert_with(|| procfs::children(worker));
        children.iter().copied().filter(|pid| !self.known.contains(pid)).collect()
    }

    /// The environment of process `pid`.
    fn environ(&mut self, pid: u32) -> Option<&[u8]> {
        self.environs.entry(pid).or_insert_with(|| procfs::environ(pid)).as_deref()
    }

    /// The output paths process `pid` builds, by the structured attributes file its environment
    /// names (`NIX_ATTRS_JSON_FILE`): with structured attributes Nix passes a derivation's
    /// attributes, its outputs among them, in that file and not in the environment. It is read
    /// through the process's root (a sandbox's `/build`), else as named (Nix 2.8 names the build
    /// directory outside the sandbox). None for any other process.
    fn structured_outputs(&mut self, pid: u32) -> &[String] {
        if !self.structured_outputs.contains_key(&pid) {
            let named = self.environ(pid).and_then(|environ| {
                environ.split(|b| *b == 0).find_map(|entry| entry.strip_prefix(b"NIX_ATTRS_JSON_FILE=")).map(|p| PathBuf::from(std::ffi::OsStr::from_bytes(p)))
            });
            let outputs = named.map(|file| structured_attrs_outputs(pid, &file)).unwrap_or_default();
            self.structured_outputs.insert(pid, outputs);
        }
        &self.structured_outputs[&pid]
    }

    /// Whether process `pid` is the builder of `job`: its environment holds one of the build's
    /// `<output>=<path>` entries, or its structured attributes name one of its outputs.
    fn builds(&mut self, pid: u32, job: &WatchJob) -> bool {
        self.environ(pid).is_some_and(|environ| holds_entry(environ, &job.output_env))
            || self.structured_outputs(pid).iter().any(|path| job.outputs.contains(path))
    }

    /// The child of `job`'s worker that is its builder.
    fn builder_among_children(&mut self, job: &WatchJob) -> Option<u32> {
        self.new_children(job.nix_pid).into_iter().find(|pid| self.builds(*pid, job))
    }
}

/// The output paths in the structured attributes file `file` of process `pid` (see
/// [`Scan::structured_outputs`]); none when it cannot be read.
fn structured_attrs_outputs(pid: u32, file: &Path) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Attrs {
        outputs: HashMap<String, String>,
    }
    let in_root = Path::new(&format!("/proc/{pid}/root")).join(file.strip_prefix("/").unwrap_or(file));
    let attrs = [in_root.as_path(), file].into_iter().find_map(|path| serde_json::from_slice::<Attrs>(&std::fs::read(path).ok()?).ok());
    attrs.map(|attrs| attrs.outputs.into_values().collect()).unwrap_or_default()
}

/// Whether an environment block holds one of `entries`.
fn holds_entry(environ: &[u8], entries: &[String]) -> bool {
    environ.split(|b| *b == 0).any(|e| entries.iter().any(|entry| e == entry.as_bytes()))
}

/// One watched build.
struct Watched {
    job: WatchJob,
    /// The build's output lock files (`job.lock_files`), held open.
    output_locks: Vec<OutputLock>,
    lease: LeaseId,
    admitted: Instant,
    /// Held while the build is watched; released (dropped) once it is recorded.
    _lock: Option<WatcherLock>,
    builder: Option<Builder>,
    build_user: Option<u32>,
    cgroup: Option<BuildCgroup>,
    /// Processes of the build known to be in the cgroup: moved in, or found there (forked
    /// inside, or placed by a broker that is gone).
    placed: HashSet<u32>,
    /// The highest memory use of the cgroup sampled so far, where the kernel keeps no peak
    /// (cgroup v2 before Linux 5.19).
    sampled_peak: Option<u64>,
    /// What the moved processes held before the move (charged outside the cgroup), but the
    /// builder's when it was the first in ([`Watched::builder_outside`]).
    charged_outside: u64,
    /// What the builder, when moved in first, holds charged outside: the highest of the
    /// estimates ([`charged_outside_at_most`]) made at its move and at each later look while it
    /// runs.
    builder_outside: Option<u64>,
    reported_kills: u64,
    /// What the build was last told to use, MiB ([`Leases::in_use`]): 0 while it used no more
    /// than it reserves.
    told_in_use_mib: u64,
    /// When the cgroup was last read for OOM kills, from the builder's start on (nothing of the
    /// build can have been killed inside before).
    kills_read: Option<Instant>,
    /// Reads in a row of the builder's tree that found no process of it outside its cgroup
    /// (from [`SETTLED_READS`] on, none can be left: see [`Watched::move_into_cgroup`]).
    clean_tree_reads: u8,
    /// Without a cgroup: the builder's descendants seen while it ran.
    descendants: Descendants,
    polls: u64,
    /// When the last search of every process was, after admission.
    full_scan: Option<Duration>,
    /// When Nix's output locks were last known held: looked up, the builder
    /// found, or the watch begun (Nix asks the hook with the locks held).
    locks_checked: Instant,
    /// Whether Nix closed one of the lock files since its locks were last read for it.
    lock_closed: bool,
    /// Whether the locks were read since the watch began: where the closes are watched, every
    /// release after that read is a close seen, so no other read is due until one is.
    locks_read: bool,
    /// When it was found ended (locks released, builder gone); leftovers are ended from then.
    ended: Option<Instant>,
    /// When its lease was ended (its processes were gone), perhaps before Nix released the
    /// output locks.
    lease_ended: Option<Instant>,
    /// Whether the lease table was told that its builder exited.
    exit_told: bool,
    /// Taken over from a broker that is gone: its builder may have started before this
    /// broker listened to the process events.
    recovered: bool,
    due: Instant,
}

impl Watched {
    /// Watches `job` under `lease`, with its watcher `lock` when it is taken over (else one is
    /// made).
    fn new(job: WatchJob, lease: LeaseId, lock: Option<WatcherLock>, lock_files: &LockFiles, closes: Option<&LockCloses>) -> Watched {
        let recovered = lock.is_some();
        let lock = lock.or_else(|| lock_files.hold(&job));
        let now = Instant::now();
        Watched {
            output_locks: job.lock_files.iter().map(|f| OutputLock::open(f, closes)).collect(),
            lock_closed: false,
            locks_read: false,
            job,
            lease,
            admitted: now,
            _lock: lock,
            builder: None,
            build_user: None,
            cgroup: None,
            placed: HashSet::new(),
            sampled_peak: None,
            charged_outside: 0,
            builder_outside: None,
            reported_kills: 0,
            told_in_use_mib: 0,
            kills_read: None,
            clean_tree_reads: 0,
            descendants: Descendants::default(),
            polls: 0,
            full_scan: None,
            locks_checked: now,
            ended: None,
            lease_ended: None,
            exit_told: false,
            recovered,
            // Nix forks the builder only after the answer, and holds the locks until the build
            // ends: a first look at once would find nothing (one taken over may run already).
            due: if recovered { now } else { now + search_pause(Duration::ZERO, false) },
        }
    }

    /// Does what is due; the build's outcome once it has ended and its processes are gone.
    fn step(&mut self, my_uid: Option<u32>, scan: &mut Scan, look_among_children: bool, leases: &dyn Leases) -> Option<Finished> {
        let now = Instant::now();
        if let Some(ended) = self.ended {
            return self.end_leftovers(now.duration_since(ended));
        }
        // A live builder means a running build, whatever one read of the locks says. Nix
        // deletes the lock files of a build that succeeded before it lets go of them, so a
        // deleted one (an fstat) ends the build without reading the locks (costly: every descriptor
        // of the Nix process). They are read for a build that failed or that Nix let go without
        // starting: after Nix closed one of its lock files (their closes are watched; and once,
        // 100 ms into the watch, for a close before it), else every 100 ms (where closes cannot
        // be watched: every 20 ms while the builder is searched for); its lease does not wait
        // on this, and a build that succeeds costs no read. While the watcher holds a copy of the
        // build's log, Nix has not seen the build end: it still holds the locks.
        let running = match self.builder.as_ref() {
            Some(b) if !b.exited() || b.holds_log() => true,
            _ if self.output_locks.iter().any(OutputLock::deleted) => false,
            Some(_) => self.locks_held(scan, Duration::from_millis(100)),
            None => self.locks_held(scan, Duration::from_millis(20)),
        };
        if !running {
            self.ended = Some(now);
            return self.end_leftovers(Duration::ZERO);
        }
        if self.builder.is_none() {
            // A build recovered from a broker that is gone is looked for once among the worker's
            // children whatever the events say: its builder started before this one listened.
            // Nix forks the builder of any other after the answer, and its exec is an event.
            let look_among_children = look_among_children || (self.recovered && self.polls == 0);
            let found = find_builder(&self.job, self.admitted.elapsed(), &mut self.full_scan, scan, look_among_children);
            if let Some(builder) = found.and_then(Builder::open) {
                self.take_builder(builder, my_uid, scan, leases);
            }
        }
        if let Some(cgroup) = self.cgroup.as_ref() {
            if let Some(peak) = self.sampled_peak.as_mut() {
                *peak = cgroup.memory_now().map_or(*peak, |now| now.max(*peak));
            }
            self.move_into_cgroup();
        } else if let Some(b) = self.builder.as_ref().filter(|b| !b.exited()) {
            // No cgroup: the build's processes are the builder's descendants, followed while it
            // runs (they are reparented away once it is gone, and its pid may be reused).
            self.descendants.track(procfs::tree(b.pid));
        }
        if self.kills_read.is_some_and(|at| at.elapsed() >= KILLS_EVERY) {
            self.report_kills();
            self.tell_use(leases);
        }
        self.polls += 1;
        self.due = now
            + match self.builder.as_ref() {
                None => search_pause(self.admitted.elapsed(), !look_among_children),
                // Ended (or its end cannot be waited for): Nix releases the locks within
                // moments, and the lease with them.
                Some(b) if !b.holds_log() || b.exited() => Duration::from_millis(5),
                Some(_) if self.admitted.elapsed() < Duration::from_secs(1) => Duration::from_millis(5),
                Some(_) => Duration::from_millis(100),
            };
        None
    }

    /// Moves the builder and the processes of the build still outside into its cgroup. A
    /// process forked inside stays inside, so only those forked before their parent's move
    /// are left outside, and each of them was forked by another outside: once the builder's
    /// tree has been read [`SETTLED_READS`] times in a row with none of them outside, it is no
    /// longer read (two, as a read of `/proc`'s children lists may miss a child forked during
    /// it). With build users, every process of the uid is the build's, also those that left
    /// the builder's tree (double forks), except Nix's own ([`nix_helper`]): a scan of all of
    /// `/proc`, so every tenth step only.
    fn move_into_cgroup(&mut self) {
        let (Some(b), Some(cgroup)) = (self.builder.as_ref(), self.cgroup.as_ref()) else { return };
        let read_tree = self.clean_tree_reads < SETTLED_READS;
        let mut pids = if read_tree { procfs::tree(b.pid) } else { Vec::new() };
        if let (Some(uid), 0) = (self.build_user, self.polls % 10) {
            pids.extend(procfs::pids_of_user(uid).into_iter().filter(|pid| !nix_helper(*pid, b.pid, self.job.nix_pid)));
        }
        let pids = unplaced(pids, &self.placed);
        // Those forked inside are neither moved nor counted: what they hold is charged inside.
        let in_cgroup: HashSet<u32> = match pids.is_empty() {
            true => HashSet::new(),
            false => cgroup.pids().map(HashSet::from_iter).unwrap_or_default(),
        };
        let (inside, outside): (Vec<u32>, Vec<u32>) = pids.into_iter().partition(|pid| in_cgroup.contains(pid));
        let outside_any = !outside.is_empty();
        self.placed.extend(inside);
        for pid in outside {
            // What a process already held stays charged where it was (the kernel no longer
            // moves charges): what it has charged, just after the move, is added to the peak;
            // for the builder moved in first, what it holds outside ([`Watched::builder_outside`]).
            if cgroup.add(pid).is_ok() {
                match self.placed.is_empty() && pid == b.pid {
                    true => self.builder_outside = Some(charged_outside_at_most(cgroup, pid)),
                    false => self.charged_outside += procfs::charged_bytes(pid).unwrap_or(0),
                }
                self.placed.insert(pid);
            }
        }
        if read_tree {
            // A process that could not be moved is tried again at the next read.
            self.clean_tree_reads = if outside_any { 0 } else { self.clean_tree_reads + 1 };
        }
    }

    /// Holds `builder` as the build's builder, found now, and tells `leases` (its pidfd).
    fn take_builder(&mut self, builder: Builder, my_uid: Option<u32>, scan: &mut Scan, leases: &dyn Leases) {
        if let Ok(pidfd) = builder.pidfd.try_clone() {
            leases.builder_started(self.lease, pidfd);
        }
        scan.known.insert(builder.pid);
        self.locks_checked = Instant::now();
        // Made once the builder is found, not at admission: a build too short to be found, or
        // one Nix lets go, costs no cgroup, and admissions in a burst (Nix asks about every
        // ready build at once) do not compete with making them. A build taken over from a
        // broker that is gone has its cgroup already.
        if self.cgroup.is_none() {
            self.cgroup = create_cgroup(&self.job);
        }
        // Sampled at each of the watcher's looks (every 5 ms at first, then every 100 ms): a
        // shorter spike is missed.
        self.sampled_peak = self.cgroup.as_ref().filter(|c| !c.keeps_peak()).map(|_| 0);
        self.build_user = procfs::uid(builder.pid).filter(|uid| *uid != 0 && Some(*uid) != my_uid);
        self.builder = Some(builder);
        self.kills_read = Some(Instant::now());
    }

    /// Once the builder has exited, while the watcher still holds a copy of its log: reports an
    /// OOM kill in the log, ends the lease if nothing of the build is left (else tells the table
    /// that the builder exited), and closes the copy. Nix sees the build's end once every copy
    /// of its log is closed, and at once asks about the builds waiting for its slot: this copy
    /// goes only after the lease has ended, so that they find the slot free.
    fn after_builder_exit(&mut self, leases: &dyn Leases) {
        if !self.builder.as_ref().is_some_and(|b| b.holds_log() && b.exited()) {
            return;
        }
        self.report_kills();
        self.end_lease_if_gone(leases);
        if self.lease_ended.is_none() && !self.exit_told {
            leases.builder_exited(self.lease);
            self.exit_told = true;
        }
        if let Some(builder) = self.builder.as_mut() {
            builder.log = None;
        }
    }

    /// Ends the lease as soon as the build's processes are gone; the watch goes on until Nix has
    /// released the locks, for the build's outcome.
    fn end_lease_if_gone(&mut self, leases: &dyn Leases) {
        if self.lease_ended.is_none() && self.processes_gone() {
            leases.end(self.lease);
            self.lease_ended = Some(Instant::now());
        }
    }

    /// Whether Nix still holds the build's output locks, read at most `every` (taken to hold
    /// them in between). Where Nix's closes of the files are watched, they are read after a
    /// close, and otherwise once, [`WATCHED_LOCKS_READ_AFTER`] after the watch began: that covers a
    /// close before it. Nix releases a lock only by closing its file, so no later read is due.
    fn locks_held(&mut self, scan: &mut Scan, every: Duration) -> bool {
        let read_due = match self.output_locks.iter().all(OutputLock::close_watched) {
            true => !self.locks_read && self.locks_checked.elapsed() >= every.max(WATCHED_LOCKS_READ_AFTER),
            false => self.locks_checked.elapsed() >= every,
        };
        if !self.lock_closed && !read_due {
            return true;
        }
        self.lock_closed = false;
        self.locks_read = true;
        self.locks_checked = Instant::now();
        scan.holds(&self.output_locks, self.job.nix_pid)
    }

    /// Whether the build's processes are gone: its builder has exited and nothing of it is left
    /// (in its cgroup, or among the descendants followed). Nix may still hold the output locks
    /// while it registers the outputs, but no process of the build runs then.
    fn processes_gone(&mut self) -> bool {
        if !self.builder.as_ref().is_some_and(Builder::exited) {
            return false;
        }
        match self.cgroup.as_ref() {
            Some(cgroup) => cgroup.pids().is_ok_and(|pids| pids.is_empty()),
            None => !self.descendants.remaining(false),
        }
    }

    /// Reports new OOM kills in the cgroup in the build's log (before the log closes).
    fn report_kills(&mut self) {
        let (Some(cgroup), Some(b)) = (self.cgroup.as_ref(), self.builder.as_mut()) else { return };
        self.kills_read = Some(Instant::now());
        let stats = cgroup.stats();
        if stats.oom_kills > self.reported_kills {
            self.reported_kills = stats.oom_kills;
            b.tell_log(&oom_message(&self.job, stats.peak_memory_bytes));
        }
    }

    /// Tells the lease table what the build uses while that is more than it reserves (a build
    /// that outgrew its learned reservation), and once when it no longer is: the budget counts
    /// the larger of the two.
    fn tell_use(&mut self, leases: &dyn Leases) {
        let Some(cgroup) = self.cgroup.as_ref() else { return };
        // A builder that allocated at once may still have been allocating at its move.
        if let (Some(outside), Some(b)) = (self.builder_outside.as_mut(), self.builder.as_ref().filter(|b| !b.exited())) {
            *outside = (*outside).max(charged_outside_at_most(cgroup, b.pid));
        }
        let used_mib = cgroup.memory_now().map_or(0, |bytes| bytes.div_ceil(MIB));
        let over_mib = if used_mib > self.job.claim().memory_mib { used_mib } else { 0 };
        if over_mib != self.told_in_use_mib {
            leases.in_use(self.lease, over_mib);
            self.told_in_use_mib = over_mib;
        }
    }

    /// Nix ends a build's processes itself; what remains `since` its end belongs to an abandoned
    /// build (its client was killed) and is killed after a grace period, so the cgroup can go
    /// and the lease end. The outcome once nothing is left.
    fn end_leftovers(&mut self, since: Duration) -> Option<Finished> {
        let kill = since >= LEFTOVER_GRACE;
        let left = match self.cgroup.as_ref() {
            Some(cgroup) => {
                let pids = cgroup.pids().unwrap_or_default();
                if kill {
                    for pid in &pids {
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), nix::sys::signal::Signal::SIGKILL);
                    }
                }
                !pids.is_empty()
            }
            None => self.descendants.remaining(kill),
        };
        if left && since < LEFTOVER_GIVE_UP {
            self.due = Instant::now() + Duration::from_millis(20);
            return None;
        }
        let wall = self.ended.map_or_else(|| self.admitted.elapsed(), |ended| ended.duration_since(self.admitted));
        // A cgroup nothing of the build was placed in measured nothing of it.
        let stats = self.cgroup.as_ref().filter(|_| !self.placed.is_empty()).map(BuildCgroup::stats);
        // Removed once: a cgroup left (the kernel refused) is tried again when the watch goes.
        if self.cgroup.as_ref().is_some_and(|cgroup| cgroup.remove().is_ok()) {
            self.cgroup = None;
        }
        // Nix deletes the lock files only after registering the outputs of a build it ran.
        let succeeded = self.output_locks.iter().all(OutputLock::deleted) && outputs_exist(&self.job);
        Some(Finished {
            // A build too short to be seen still ran when its outputs are there; one whose
            // builder was never seen and that left no outputs was let go by Nix (no slot after
            // all): it is asked for again, and that admission records it.
            started: self.builder.is_some() || succeeded,
            wall,
            leased: self.lease_ended.unwrap_or_else(Instant::now).duration_since(self.admitted),
            cpu: stats.and_then(|s| s.cpu_time),
            peak_bytes: stats
                .and_then(|s| s.peak_memory_bytes.or(self.sampled_peak.filter(|peak| *peak > 0)))
                .map(|peak| peak + self.charged_outside + self.builder_outside.unwrap_or(0)),
            oom_kills: stats.map_or(0, |s| s.oom_kills),
            bounded: stats.is_some(),
            succeeded,
        })
    }
}

/// The processes of `pids` not in `placed`, each once and in their order (the builder first):
/// the builder's tree and its uid's processes overlap, and a process moved twice would have what
/// it held outside counted twice in the build's peak (CI runs under emulation recorded 226-258
/// MiB for 200 MiB held).
fn unplaced(mut pids: Vec<u32>, placed: &HashSet<u32>) -> Vec<u32> {
    let mut listed = HashSet::new();
    pids.retain(|pid| !placed.contains(pid) && listed.insert(*pid));
    pids
}

/// Whether `pid`, a process of a build's build user, is Nix's own rather than the build's: a
/// child of its worker `nix_pid` other than the `builder`. As a build ends, Nix forks such a
/// child that takes the build user's uid to kill what the build left (`kill(-1)`); it holds a
/// copy of the worker's memory, tens of MiB that a move would count in the build's peak, and it
/// is Nix's to wait for.
fn nix_helper(pid: u32, builder: u32, nix_pid: u32) -> bool {
    pid != builder && procfs::parent(pid) == Some(nix_pid)
}

/// At most what process `pid`, the only one moved into `cgroup` from outside, holds charged
/// outside: what it holds less the cgroup's use (a kernel that moves charges leaves nothing
/// outside), read in that order. A page it touches between the two reads counts in the use
/// alone, so the estimate errs low, by megabytes for a builder allocating as it was moved (the
/// watcher preempted between the reads); read the other way round it erred as high (a CI run
/// under emulation recorded 223 MiB for 200 MiB held). Exact once the process stops allocating,
/// hence the highest estimate is kept.
fn charged_outside_at_most(cgroup: &BuildCgroup, pid: u32) -> u64 {
    let charged = procfs::charged_bytes(pid).unwrap_or(0);
    charged.saturating_sub(cgroup.memory_now().unwrap_or(0))
}

/// What the broker hands the watcher.
pub enum Order {
    /// Watch an admitted build holding `lease`.
    Watch {
        /// The build.
        job: WatchJob,
        /// Its lease in the table.
        lease: LeaseId,
    },
    /// A build whose worker was full: nothing was reserved, but should it start anyway it is
    /// adopted into the table and watched like any other.
    Candidate(WatchJob),
    /// A build found running when the broker started, adopted with `lease`; `lock` is its
    /// watcher lock, taken over.
    Recovered {
        /// The build.
        job: WatchJob,
        /// Its lease in the table.
        lease: LeaseId,
        /// Its watcher lock.
        lock: WatcherLock,
    },
}

/// How the watcher tells the lease table what it saw.
pub trait Leases {
    /// Counts `job`, found running without a lease; its lease.
    fn adopt(&self, job: &WatchJob) -> LeaseId;
    /// Lease `lease`'s builder was found: `pidfd` becomes readable when it exits.
    fn builder_started(&self, lease: LeaseId, pidfd: OwnedFd);
    /// Lease `lease`'s builder has exited: Nix has its slot back, though the lease lasts until
    /// every process of the build is gone.
    fn builder_exited(&self, lease: LeaseId);
    /// Ends `lease`: its build's processes are gone.
    fn end(&self, lease: LeaseId);
    /// Lease `lease`'s build uses `mib` MiB, more than it reserves (0: no longer more).
    fn in_use(&self, lease: LeaseId, mib: u64);
    /// The hooks asking now: children of Nix workers that are no builder.
    fn hooks(&self) -> Vec<u32>;
    /// `row` was recorded in the history: later reservations and expected durations learn from
    /// it.
    fn recorded(&self, row: &BuildRecord);
}

/// When, after the watch began (or the builder was found), Nix's locks are read for a build
/// whose lock files' closes are watched and none was seen: once.
const WATCHED_LOCKS_READ_AFTER: Duration = Duration::from_millis(100);

/// How long a candidate is looked for among its worker's new children.
pub const CANDIDATE_TTL: Duration = Duration::from_secs(10);

/// Builds declined without a lease because their worker was full, until they are seen starting
/// or forgotten.
#[derive(Default)]
struct Candidates {
    by_drv: HashMap<String, Candidate>,
    /// Each candidate's `.drv` by its output paths (what a builder's environment names).
    by_output: HashMap<String, String>,
    looked: Option<Instant>,
    swept: Option<Instant>,
}

/// How often, at most, the candidates are swept ([`Candidates::sweep`]).
const SWEEP_EVERY: Duration = Duration::from_millis(500);

struct Candidate {
    job: WatchJob,
    /// When the broker last told it: it tells a candidate again while Nix keeps asking.
    told: Instant,
}

impl Candidates {
    fn add(&mut self, job: WatchJob) {
        for output in &job.outputs {
            self.by_output.insert(output.clone(), job.drv.clone());
        }
        let candidate = Candidate { job, told: Instant::now() };
        self.by_drv.insert(candidate.job.drv.clone(), candidate);
    }

    /// Stops looking for `drv` (admitted, or found); what it was, if it was a candidate.
    fn forget(&mut self, drv: &str) -> Option<Candidate> {
        let candidate = self.by_drv.remove(drv)?;
        for output in &candidate.job.outputs {
            if self.by_output.get(output).is_some_and(|d| d == drv) {
                self.by_output.remove(output);
            }
        }
        Some(candidate)
    }

    fn is_empty(&self) -> bool {
        self.by_drv.is_empty()
    }

    /// The candidates built unseen, with their records, and forgotten; also forgotten, those
    /// not told for [`CANDIDATE_TTL`]. Nix asks about a build again at every slot that frees
    /// until it starts; its builder is found as it executes, but one that lived only
    /// milliseconds may be gone before. Nix then deletes the output locks once it registered
    /// the outputs (while its worker holds them, no other worker builds it). Every
    /// [`SWEEP_EVERY`] at most, among those not told since: a path lookup each.
    fn sweep(&mut self) -> Vec<(WatchJob, Finished)> {
        if self.by_drv.is_empty() || self.swept.is_some_and(|at| at.elapsed() < SWEEP_EVERY) {
            return Vec::new();
        }
        self.swept = Some(Instant::now());
        let mut built = Vec::new();
        let mut expired = Vec::new();
        for (drv, candidate) in &self.by_drv {
            let quiet = candidate.told.elapsed();
            if quiet < SWEEP_EVERY {
                continue;
            }
            match candidate.built_unseen() {
                Some(record) => built.push(record),
                None if quiet >= CANDIDATE_TTL => expired.push(drv.clone()),
                None => {}
            }
        }
        for drv in built.iter().map(|(job, _)| &job.drv).chain(&expired) {
            self.forget(drv);
        }
        built
    }

    /// The candidates whose builder is among their workers' children now (every 5 ms at most),
    /// read into `scan`: the builds' search in the same pass reads them no more.
    fn started(&mut self, scan: &mut Scan) -> Vec<(WatchJob, u32)> {
        if self.by_drv.is_empty() {
            return Vec::new();
        }
        if self.looked.is_some_and(|at| at.elapsed() < Duration::from_millis(5)) {
            return Vec::new();
        }
        self.looked = Some(Instant::now());
        let workers: HashSet<u32> = self.by_drv.values().map(|c| c.job.nix_pid).collect();
        let mut found = Vec::new();
        for worker in workers {
            for child in scan.new_children(worker) {
                found.extend(self.claim(worker, child, scan).map(|job| (job, child)));
            }
        }
        found
    }

    /// Whether a candidate of `worker` waits for a builder.
    fn waits_on(&self, worker: u32) -> bool {
        self.by_drv.values().any(|c| c.job.nix_pid == worker)
    }

    /// The candidate whose builder `child` of `worker` is, by its environment; no longer
    /// looked for.
    fn claim(&mut self, worker: u32, child: u32, scan: &mut Scan) -> Option<WatchJob> {
        let in_environ = scan.environ(child).and_then(|environ| {
            environ.split(|b| *b == 0).find_map(|entry| {
                let path = std::str::from_utf8(entry).ok()?.split_once('=')?.1;
                self.by_output.get(path).cloned()
            })
        });
        let drv = in_environ.or_else(|| scan.structured_outputs(child).iter().find_map(|path| self.by_output.get(path).cloned()))?;
        if self.by_drv.get(&drv)?.job.nix_pid != worker {
            return None;
        }
        let job = self.forget(&drv)?.job;
        scan.known.insert(child);
        Some(job)
    }
}

impl Candidate {
    /// Its record if it was built unseen: its output locks deleted and its outputs there.
    fn built_unseen(&self) -> Option<(WatchJob, Finished)> {
        use std::os::unix::fs::MetadataExt;
        let gone = |f: &PathBuf| f.symlink_metadata().is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound);
        if self.job.lock_files.is_empty() || !self.job.lock_files.iter().all(gone) {
            return None;
        }
        if !outputs_exist(&self.job) {
            return None;
        }
        let output = std::fs::symlink_metadata(self.job.outputs.first()?).ok()?;
        let unix_ms = |time: std::time::SystemTime| time.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_millis() as u64);
        let told_unix_ms = crate::state::now_ms().saturating_sub(self.told.elapsed().as_millis() as u64);
        // Nix sets the outputs' metadata as it registers them: their change time is the end.
        let registered_ms = (output.ctime() as u64) * 1000 + (output.ctime_nsec() as u64) / 1_000_000;
        let created_ms = output.created().ok().and_then(unix_ms).filter(|ms| *ms >= told_unix_ms);
        let mut job = self.job.clone();
        job.started_unix_ms = created_ms.unwrap_or(told_unix_ms);
        let wall = Duration::from_millis(registered_ms.saturating_sub(job.started_unix_ms));
        let done = Finished { started: true, wall, leased: Duration::ZERO, cpu: None, peak_bytes: None, oom_kills: 0, bounded: false, succeeded: true };
        Some((job, done))
    }
}

/// How long a program's execution is remembered for builds ordered after it: Nix forks the
/// builder of an admitted build only after the hook's answer, but the watcher may read the
/// event before the order; a build the hook declined by itself, which Nix may start anyway, is
/// told the broker up to [`crate::broker::client::UNSENT_WITHIN`] later.
pub const EXEC_MEMORY: Duration = Duration::from_millis(100);

/// What the process events tell of the Nix workers' children: each process's parent (from its
/// fork) and the programs executed lately. A builder is found the moment it executes, with one
/// read of its environment, instead of by reading the workers' children every millisecond.
struct Births {
    events: ProcEvents,
    parents: HashMap<u32, u32>,
    /// When each process executed lately, with its parent.
    execs: std::collections::VecDeque<(Instant, u32, u32)>,
    /// Whether events were lost since the last pass: the pass then reads `/proc`.
    lost: bool,
}

impl Births {
    fn new(events: ProcEvents) -> Births {
        Births { events, parents: Default::default(), execs: Default::default(), lost: false }
    }

    /// Reads the events received; the processes that executed a program meanwhile, with their
    /// parents. While builders are `searching` for, the parent of one whose fork was not seen
    /// (forked before this watcher listened, or lost) is read from `/proc`.
    fn read(&mut self, searching: bool) -> Vec<(u32, u32)> {
        let now = Instant::now();
        while self.execs.front().is_some_and(|(at, _, _)| now.duration_since(*at) > EXEC_MEMORY) {
            self.execs.pop_front();
        }
        let mut fresh = Vec::new();
        self.lost = false;
        self.events.drain(|event| match event {
            ProcEvent::Fork { parent, child } => {
                self.parents.insert(child, parent);
            }
            ProcEvent::Exec { pid } => {
                let parent = self.parents.get(&pid).copied().or_else(|| searching.then(|| procfs::parent(pid)).flatten());
                if let Some(parent) = parent {
                    fresh.push((pid, parent));
                    self.execs.push_back((now, pid, parent));
                }
            }
            ProcEvent::Exit { pid } => {
                self.parents.remove(&pid);
                // Nothing that has exited can be a builder still to be found.
                self.execs.retain(|(_, executed, _)| *executed != pid);
            }
            ProcEvent::Lost => {
                // Exits may have been lost with the rest: the parents known are stale.
                self.parents.clear();
                self.lost = true;
            }
        });
        fresh
    }

    /// What [`Births::read`] gives, and the children of the workers in `ordered_for` that
    /// executed a program lately (before their builds' orders came), each once.
    fn read_with(&mut self, ordered_for: &[u32], searching: bool) -> Vec<(u32, u32)> {
        let mut execs = self.read(searching);
        for (_, pid, parent) in &self.execs {
            if ordered_for.contains(parent) && !execs.contains(&(*pid, *parent)) {
                execs.push((*pid, *parent));
            }
        }
        execs
    }
}

/// The broker's watcher thread: watches every leased build until it ends, picks up candidates
/// that start, and tells `leases`; runs until `orders` is closed and no build is left. `wake`
/// becomes readable when an order was sent. Builders are found from the process `events` where
/// the broker could subscribe to them, else by reading `/proc`.
pub fn run(
    orders: std::sync::mpsc::Receiver<Order>,
    wake: OwnedFd,
    events: Option<ProcEvents>,
    leases: &dyn Leases,
    state_dir: &Path,
    lock_files: &LockFiles,
) {
    let mut open = true;
    let mut builds: Vec<Watched> = Vec::new();
    let mut candidates = Candidates::default();
    let mut history: Option<History> = None;
    let my_uid = procfs::uid(std::process::id());
    let mut births = events.map(Births::new);
    let closes = LockCloses::new();
    while open || !builds.is_empty() {
        let now = Instant::now();
        let mut wait = builds.iter().map(|b| b.due.saturating_duration_since(now)).min();
        if !candidates.is_empty() && births.is_none() {
            wait = Some(wait.map_or(Duration::from_millis(5), |w| w.min(Duration::from_millis(5))));
        }
        {
            let mut fds: Vec<PollFd> = vec![PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
            fds.extend(closes.as_ref().map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)));
            // Woken by the machine's process events only while a builder is searched for; they
            // wait in the socket meanwhile (read at the next pass, or lost once it is full).
            fds.extend(births.as_ref().filter(|_| searching(&builds, &candidates)).map(|b| PollFd::new(b.events.as_fd(), PollFlags::POLLIN)));
            fds.extend(exit_fds(&builds).map(|(_, fd)| fd));
            // poll(2) counts whole milliseconds: round up, or a wait under one would spin.
            let timeout = wait.map_or(PollTimeout::NONE, |w| {
                PollTimeout::try_from(w.as_micros().div_ceil(1000).max(1) as i32).unwrap_or(PollTimeout::MAX)
            });
            let _ = poll(&mut fds, timeout);
        }
        drain(&wake);
        if let Some(closes) = &closes {
            let closed = closes.closed();
            // Most passes see no close (`None`: events were lost, any file may have been closed).
            if closed.as_ref().is_none_or(|closed| !closed.is_empty()) {
                for b in &mut builds {
                    if closed.as_ref().is_none_or(|closed| b.output_locks.iter().any(|lock| lock.closed_in(closed))) {
                        b.lock_closed = true;
                        b.due = Instant::now();
                    }
                }
            }
        }
        // The workers of the builds ordered in this pass: their children that executed lately
        // are matched against them.
        let mut ordered_for = Vec::new();
        loop {
            match orders.try_recv() {
                Ok(Order::Watch { job, lease }) => {
                    ordered_for.push(job.nix_pid);
                    // Already found starting as a candidate (declined while its worker was full)
                    // before this admission's order came: it is watched and counted under the
                    // lease it was adopted with, and a second watch would never see its builder.
                    if builds.iter().any(|b| b.job.drv == job.drv && b.builder.as_ref().is_some_and(|builder| !builder.exited())) {
                        leases.end(lease);
                        continue;
                    }
                    // Admitted again: Nix had no slot for the earlier admission and let go of it,
                    // so that watch, which found no builder, ends without a record.
                    builds.retain(|b| b.job.drv != job.drv || b.builder.is_some());
                    candidates.forget(&job.drv);
                    builds.push(Watched::new(job, lease, None, lock_files, closes.as_ref()));
                }
                Ok(Order::Candidate(job)) => {
                    ordered_for.push(job.nix_pid);
                    candidates.add(job);
                }
                Ok(Order::Recovered { job, lease, lock }) => {
                    // Its cgroup holds what still runs of it, found or not.
                    let cgroup = existing_cgroup(&job);
                    let mut watched = Watched::new(job, lease, Some(lock), lock_files, closes.as_ref());
                    watched.cgroup = cgroup;
                    builds.push(watched);
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        see_exits(&mut builds, leases);
        let now = Instant::now();
        let mut finished = Vec::new();
        let hooks = leases.hooks();
        let mut scan = Scan::new(no_new_builders(&builds, &hooks));
        let searching = searching(&builds, &candidates);
        let execs = births.as_mut().map(|births| births.read_with(&ordered_for, searching)).unwrap_or_default();
        let events_lost = births.as_ref().is_some_and(|births| births.lost);
        let look_among_children = births.is_none() || events_lost;
        if events_lost {
            // A builder whose exec was lost is looked for among its worker's children at once.
            builds.iter_mut().filter(|b| b.builder.is_none()).for_each(|b| b.due = b.due.min(now));
        }
        let mut started = if look_among_children { candidates.started(&mut scan) } else { Vec::new() };
        started.extend(match_execs(&execs, &mut builds, &mut candidates, &mut scan, leases, my_uid, now));
        for (mut job, builder) in started {
            // Started without a lease after all: counted from now, watched like the rest (an
            // admission of it that found no builder is over).
            builds.retain(|b| b.job.drv != job.drv || b.builder.is_some());
            job.started_unix_ms = crate::state::now_ms();
            let lease = leases.adopt(&job);
            let mut watched = Watched::new(job, lease, None, lock_files, closes.as_ref());
            if let Some(builder) = Builder::open(builder) {
                watched.take_builder(builder, my_uid, &mut scan, leases);
            }
            builds.push(watched);
        }
        // A build also watched under a lease (admitted earlier, let go, declined since) is
        // recorded by its watch.
        let mut unseen = candidates.sweep();
        unseen.retain(|(job, _)| !builds.iter().any(|b| b.job.drv == job.drv));
        let mut exits_seen = Instant::now();
        let mut i = 0;
        while i < builds.len() {
            // A step may take milliseconds (a cgroup made, a builder looked for): builders that
            // exited meanwhile go first, Nix waiting on their logs to end.
            if exits_seen.elapsed() >= EXITS_EVERY {
                see_exits(&mut builds, leases);
                exits_seen = Instant::now();
            }
            let b = &mut builds[i];
            let builder_ended = b.builder.as_ref().is_some_and(|builder| builder.holds_log() && builder.exited());
            if b.due > now && !builder_ended {
                i += 1;
                continue;
            }
            let outcome = b.step(my_uid, &mut scan, look_among_children, leases);
            if outcome.is_none() {
                b.end_lease_if_gone(leases);
            }
            b.after_builder_exit(leases);
            match outcome {
                Some(done) => {
                    if b.lease_ended.is_none() {
                        leases.end(b.lease);
                    }
                    // A build it records is no candidate any more; one Nix let go may be.
                    if done.started {
                        candidates.forget(&b.job.drv);
                    }
                    // Its watcher lock goes once it is recorded: a broker that finds the lock
                    // free finds the build in the history.
                    finished.push((builds.remove(i), done));
                }
                None => i += 1,
            }
        }
        see_exits(&mut builds, leases);
        let watched = finished.iter().filter(|(_, done)| done.started).map(|(watched, done)| (&watched.job, done));
        for (job, done) in watched.chain(unseen.iter().map(|(job, done)| (job, done))) {
            if history.is_none() {
                history = History::open(state_dir).ok();
            }
            if let Some(history) = &history {
                let row = record(job, done);
                if history.record(&row).is_ok() {
                    leases.recorded(&row);
                }
            }
        }
    }
}

/// Takes the processes that executed a program (`execs`, with their parents) for the builders
/// of the builds searched for, which step in the pass begun at `now`; the candidates that
/// started, with their builders.
fn match_execs(
    execs: &[(u32, u32)],
    builds: &mut [Watched],
    candidates: &mut Candidates,
    scan: &mut Scan,
    leases: &dyn Leases,
    my_uid: Option<u32>,
    now: Instant,
) -> Vec<(WatchJob, u32)> {
    let mut started = Vec::new();
    for &(pid, parent) in execs {
        if scan.known.contains(&pid) {
            continue;
        }
        let build = builds.iter_mut().find(|b| b.builder.is_none() && b.job.nix_pid == parent && scan.builds(pid, &b.job));
        if let Some(b) = build {
            if let Some(builder) = Builder::open(pid) {
                b.take_builder(builder, my_uid, scan, leases);
                b.due = now;
            }
        } else if candidates.waits_on(parent) {
            started.extend(candidates.claim(parent, pid, scan).map(|job| (job, pid)));
        }
    }
    started
}

/// Whether a builder is searched for: a build's, or a candidate's.
fn searching(builds: &[Watched], candidates: &Candidates) -> bool {
    builds.iter().any(|b| b.builder.is_none()) || !candidates.is_empty()
}

/// How often, at most, the watcher looks for exited builders between two steps.
const EXITS_EVERY: Duration = Duration::from_micros(200);

/// Sees to the builds whose builder exited while the watcher holds a copy of its log
/// ([`Watched::after_builder_exit`]): one look at their pidfds, without waiting.
fn see_exits(builds: &mut [Watched], leases: &dyn Leases) {
    let (held, mut fds): (Vec<usize>, Vec<PollFd>) = exit_fds(builds).unzip();
    if fds.is_empty() || !poll(&mut fds, PollTimeout::ZERO).is_ok_and(|ready| ready > 0) {
        return;
    }
    let exited: Vec<usize> = held.into_iter().zip(&fds).filter(|(_, fd)| fd.any().unwrap_or(true)).map(|(i, _)| i).collect();
    drop(fds);
    for i in exited {
        builds[i].after_builder_exit(leases);
    }
}

/// The pidfds of the builders whose log the watcher holds (readable once they exit), with the
/// builds' places in `builds`.
fn exit_fds(builds: &[Watched]) -> impl Iterator<Item = (usize, PollFd<'_>)> {
    builds
        .iter()
        .enumerate()
        .filter_map(|(i, b)| b.builder.as_ref().filter(|b| b.holds_log()).map(|b| (i, PollFd::new(b.pidfd.as_fd(), PollFlags::POLLIN))))
}

/// The processes that are no build's new builder, whose environments are not read: the builders
/// already found, the `hooks` (a worker's other children) and this process.
fn no_new_builders(builds: &[Watched], hooks: &[u32]) -> HashSet<u32> {
    let builders = builds.iter().filter_map(|b| b.builder.as_ref().map(|b| b.pid));
    builders.chain(hooks.iter().copied()).chain([*MY_PID]).collect()
}

/// Empties the wake-up pipe: a read of a pipe returns all it holds up to the buffer's size, so
/// a short one left it empty (one system call per pass, not two).
fn drain(wake: &OwnedFd) {
    let mut buf = [0u8; 512];
    while matches!(nix::unistd::read(wake.as_raw_fd(), &mut buf), Ok(n) if n == buf.len()) {}
}

/// The name of one admission of `drv` at `admitted_ms`: of its cgroup. Unique per admission:
/// Nix may ask again for a build it then had no slot for.
pub fn admission_name(drv: &str, admitted_ms: u64) -> String {
    let stem = Path::new(drv).file_stem().map_or_else(|| "build".into(), |s| s.to_string_lossy());
    format!("{stem}-{admitted_ms}")
}


fn create_cgroup(job: &WatchJob) -> Option<BuildCgroup> {
    job.cgroups.as_ref()?.create(&admission_name(&job.drv, job.started_unix_ms), &cgroup_limits(job)).ok()
}

/// The limits of `job`'s cgroup.
fn cgroup_limits(job: &WatchJob) -> Limits {
    Limits { memory_bytes: Some(job.memory_limit_mib * MIB), cpu_cores: Some(job.cores) }
}

/// Whether every output of `job` is in the store.
fn outputs_exist(job: &WatchJob) -> bool {
    job.outputs.iter().all(|o| Path::new(o).exists())
}

/// The cgroup a broker that is gone made for `job`, if it is there, with its limits (that
/// broker may have been killed between making it and limiting it).
fn existing_cgroup(job: &WatchJob) -> Option<BuildCgroup> {
    job.cgroups.as_ref()?.existing(&admission_name(&job.drv, job.started_unix_ms), &cgroup_limits(job))
}

impl Drop for Watched {
    fn drop(&mut self) {
        // A watch dropped before its build ended (admitted again, or found starting under
        // another admission) leaves no cgroup behind; removing an emptied one again is harmless.
        if let Some(cgroup) = &self.cgroup {
            let _ = cgroup.remove();
        }
    }
}

/// This process's pid, written into every watcher lock (one system call less per build).
static MY_PID: std::sync::LazyLock<u32> = std::sync::LazyLock::new(std::process::id);

/// The watcher lock files of `<state dir>/leases`, reused from build to build. A file created
/// and deleted per build cost the broker a fifth of its time in the file system's inode
/// allocator (bench/dispatch under `perf`). A file is free when it is empty and unlocked.
#[derive(Debug, Clone)]
pub struct LockFiles(Arc<Mutex<LockPool>>);

#[derive(Debug)]
struct LockPool {
    dir: PathBuf,
    /// Free files, kept open (unlocked) for the next build.
    free: Vec<(PathBuf, std::fs::File)>,
    /// Files made by this process, for the names of new ones.
    made: u64,
}

impl LockFiles {
    /// The lock files of `state_dir`, none free yet.
    pub fn new(state_dir: &Path) -> LockFiles {
        LockFiles(Arc::new(Mutex::new(LockPool { dir: state_dir.join("leases"), free: Vec::new(), made: 0 })))
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, LockPool> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Locks a free file (or a new one, `<pid>-<n>.lock`) and writes this process's pid and
    /// `job` into it; `None` when the state directory cannot hold it.
    fn hold(&self, job: &WatchJob) -> Option<WatcherLock> {
        use std::os::unix::fs::FileExt;
        let free = self.pool().free.pop();
        let (path, file) = match free {
            // Emptied when it was let go.
            Some(free) => {
                free.1.try_lock().ok()?;
                free
            }
            None => {
                let (path, file) = self.new_file()?;
                file.try_lock().ok()?;
                file.set_len(0).ok()?;
                (path, file)
            }
        };
        let contents = format!("{}\n{}\n", *MY_PID, serde_json::to_string(job).ok()?);
        // At offset 0 whatever the file's offset: a reused file was written before.
        file.write_all_at(contents.as_bytes(), 0).ok()?;
        Some(WatcherLock { path, file: Some(file), pool: self.clone() })
    }

    /// A new file, `<pid>-<n>.lock`, opened; `None` when the state directory cannot hold it.
    fn new_file(&self) -> Option<(PathBuf, std::fs::File)> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let path = {
            let mut pool = self.pool();
            if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(&pool.dir) {
                (e.kind() == io::ErrorKind::AlreadyExists).then_some(())?;
            }
            pool.made += 1;
            pool.dir.join(format!("{}-{}.lock", std::process::id(), pool.made))
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC | nix::libc::O_NONBLOCK)
            .open(&path)
            .ok()?;
        Some((path, file))
    }
}

/// The watcher lock of one build, held (flock) until dropped; it is emptied, then unlocked,
/// then free for another build, still open. It holds this process's pid and the build's job (for
/// [`running_builds`]).
pub struct WatcherLock {
    path: PathBuf,
    file: Option<std::fs::File>,
    pool: LockFiles,
}

impl Drop for WatcherLock {
    fn drop(&mut self) {
        let Some(file) = self.file.take() else { return };
        // Kept open for the next build: one open and close less per build.
        if file.set_len(0).is_ok() && file.unlock().is_ok() {
            self.pool.pool().free.push((std::mem::take(&mut self.path), file));
        } else {
            drop(file);
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl WatcherLock {
    /// Takes over the watcher lock at `path`, left by a broker that is gone, with its job; or,
    /// when it is free (empty), lends it to `pool`. `None` when another process holds it or it
    /// holds no build.
    fn take_over(path: &Path, pool: &LockFiles) -> Option<(WatcherLock, WatchJob)> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC | nix::libc::O_NONBLOCK)
            .open(path)
            .ok()?;
        file.try_lock().ok()?;
        let bytes = nix_tier_model::files::read_opened(file.try_clone().ok()?, 1 << 20).ok()?;
        let lock = WatcherLock { path: path.to_path_buf(), file: Some(file), pool: pool.clone() };
        let job_line = bytes.split(|b| *b == b'\n').nth(1)?;
        let job = serde_json::from_slice::<WatchJob>(job_line).ok()?;
        Some((lock, job))
    }
}

/// The builds a broker that is gone was watching and that still run, from the watcher locks in
/// `<state_dir>/leases`: a build runs while its Nix worker holds one of its output locks or its
/// cgroup has processes. Each comes with its watcher lock, taken over; the files of builds that
/// ended meanwhile, and the free ones, go to `pool` (and the cgroups of those builds are removed).
pub fn running_builds(state_dir: &Path, pool: &LockFiles) -> Vec<(WatchJob, WatcherLock)> {
    let Ok(entries) = std::fs::read_dir(state_dir.join("leases")) else { return Vec::new() };
    let held = HeldLocks::read().ok();
    entries
        .flatten()
        .filter_map(|e| WatcherLock::take_over(&e.path(), pool))
        .filter(|(_, job)| {
            let locked = held.as_ref().is_some_and(|held| job.lock_files.iter().any(|f| held.holds(f, job.nix_pid)));
            let cgroup = existing_cgroup(job);
            let populated = cgroup.as_ref().and_then(|c| c.pids().ok()).is_some_and(|p| !p.is_empty());
            if !locked && !populated {
                // Ended while no broker watched it: its empty cgroup goes too.
                let _ = cgroup.map(|c| c.remove());
            }
            locked || populated
        })
        .map(|(lock, job)| (job, lock))
        .collect()
}

/// Processes of a build without a cgroup, each held through a pidfd (so a reused pid is never
/// signalled): the builder's descendants as seen while it ran.
#[derive(Default)]
struct Descendants(Vec<(u32, OwnedFd)>);

impl Descendants {
    /// Adds the processes of `pids` not yet held.
    fn track(&mut self, pids: impl IntoIterator<Item = u32>) {
        for pid in pids {
            if !self.0.iter().any(|(p, _)| *p == pid) {
                if let Some(fd) = pidfd_open(pid) {
                    self.0.push((pid, fd));
                }
            }
        }
    }

    /// Whether any is still running; with `kill`, kills those that are.
    fn remaining(&mut self, kill: bool) -> bool {
        self.0.retain(|(_, fd)| !exited(fd));
        if kill {
            for (_, fd) in &self.0 {
                // SAFETY: a plain system call on a descriptor this struct owns.
                unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_send_signal, fd.as_raw_fd(), nix::libc::SIGKILL, 0, 0) };
            }
        }
        !self.0.is_empty()
    }
}

/// A pidfd for `pid`.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: a plain system call; the returned descriptor is owned exactly once.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid as nix::libc::pid_t, 0) };
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether the process of `pidfd` has exited.
pub fn exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|ready| ready > 0)
}

/// The builder: the child of the Nix worker whose environment holds the build's output
/// entries. Sandboxed builders are children of the worker too (Nix's sandbox helper clones them
/// with `CLONE_PARENT`, from 2.8 to today). The worker's children are read here only with
/// `look_among_children`: where process events come, its executing children are matched as
/// they execute ([`Births`]). Should one not be found there, every process of a
/// uid Nix builds as is searched now and then ([`full_scan_due`]), among the worker's
/// descendants, and the topmost process claiming the build is taken (the builder's own children
/// inherit its environment). Output paths are public, so a process of another user claiming them
/// (a `nix-shell` of the same package, say) is never taken for the builder.
fn find_builder(
    job: &WatchJob,
    since_admission: Duration,
    full_scan: &mut Option<Duration>,
    scan: &mut Scan,
    look_among_children: bool,
) -> Option<u32> {
    let among_children = if look_among_children { scan.builder_among_children(job) } else { None };
    among_children.or_else(|| {
        if !full_scan_due(since_admission, full_scan) {
            return None;
        }
        let mut found = procfs::all_pids()
            .into_iter()
            .filter(|pid| procfs::uid(*pid).is_some_and(|uid| job.builder_uids.contains(&uid)))
            .find(|pid| scan.builds(*pid, job) && procfs::descends_from(*pid, job.nix_pid))?;
        while let Some(parent) = procfs::parent(found).filter(|parent| *parent != job.nix_pid && scan.builds(*parent, job)) {
            found = parent;
        }
        Some(found)
    })
}

/// The line a user sees in the build log when the kernel kills inside the build's cgroup.
pub fn oom_message(job: &WatchJob, peak_bytes: Option<u64>) -> String {
    let peak = peak_bytes.map_or_else(|| "unknown".to_string(), |b| format!("{} MiB", b / MIB));
    let advice = match job.limit_learned {
        true => "The limit was learned from its past builds; its next build gets the tier's figure again".to_string(),
        false => format!("Raise build.tiers.{}.memoryMiB in the hardware profile", job.tier),
    };
    format!(
        "nix-tier: {} exceeded its memory limit of {} MiB ({} tier) and was killed by the kernel; \
         peak {peak}. {advice}, or see 'nix-tier history'.",
        job.name, job.memory_limit_mib, job.tier
    )
}

/// The builder process, held through a pidfd (its exit is seen at once, and its pid cannot be
/// reused meanwhile), and its log: a copy of its standard error.
struct Builder {
    pid: u32,
    pidfd: OwnedFd,
    /// The descriptor is borrowed from the builder (`pidfd_getfd`), never reopened by path with
    /// the watcher's credentials, and kept only if it is a pipe or a terminal, as Nix gives
    /// builders: a builder cannot point it at a file. Held only while the builder lives.
    log: Option<std::fs::File>,
}

impl Builder {
    /// Takes hold of process `pid` (needs CAP_SYS_PTRACE or the same uid for its log).
    fn open(pid: u32) -> Option<Builder> {
        use nix::libc::{syscall, SYS_pidfd_getfd};
        let pidfd = pidfd_open(pid)?;
        // SAFETY: a plain system call; the returned descriptor is owned exactly once.
        let fd = unsafe { syscall(SYS_pidfd_getfd, pidfd.as_raw_fd(), 2, 0) };
        let fd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) });
        let log = fd
            .filter(|fd| {
                nix::sys::stat::fstat(fd.as_raw_fd()).is_ok_and(|st| {
                    let kind = st.st_mode & nix::libc::S_IFMT;
                    kind == nix::libc::S_IFIFO || kind == nix::libc::S_IFCHR
                })
            })
            .map(std::fs::File::from);
        Some(Builder { pid, pidfd, log })
    }

    /// Whether the watcher holds a copy of its log (Nix sees the build end once it is closed).
    fn holds_log(&self) -> bool {
        self.log.is_some()
    }

    /// Whether the builder has exited.
    fn exited(&self) -> bool {
        exited(&self.pidfd)
    }

    /// Writes `line` into the build's log, which Nix shows as the build's output.
    fn tell_log(&mut self, line: &str) {
        if let Some(log) = self.log.as_mut() {
            let _ = log.write_all(format!("{line}\n").as_bytes());
        }
    }
}

/// The history row of a finished build.
pub fn record(job: &WatchJob, finished: &Finished) -> BuildRecord {
    let (package, version) = package_and_version(&job.name);
    BuildRecord {
        drv: job.drv.clone(),
        package,
        version,
        tier: job.tier,
        started_unix_ms: job.started_unix_ms,
        wall_ms: finished.wall.as_millis() as u64,
        leased_ms: Some(finished.leased.as_millis() as u64),
        cpu_ms: finished.cpu.map(|d| d.as_millis() as u64),
        peak_mib: finished.peak_bytes.map(|b| b.div_ceil(MIB)),
        limit_mib: finished.bounded.then_some(job.memory_limit_mib),
        outcome: match (finished.oom_kills > 0, finished.succeeded) {
            (true, _) => Outcome::OomKilled,
            (false, true) => Outcome::Succeeded,
            (false, false) => Outcome::Failed,
        },
        waited_ms: job.asked_unix_ms.map(|asked| job.started_unix_ms.saturating_sub(asked)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_of_the_worker_other_than_the_builder_are_nix_helpers() {
        // This test process stands for Nix's worker, its child for one of its processes.
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let (pid, worker) = (child.id(), std::process::id());
        let verdicts = (nix_helper(pid, 1, worker), nix_helper(pid, pid, worker), nix_helper(pid, 1, worker + 1));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(verdicts, (true, false, false), "(Nix's, the builder, another worker's)");
    }

    #[test]
    fn a_process_listed_twice_is_placed_once() {
        // The builder (5) in its tree and among its uid's processes; 9 already placed.
        assert_eq!(unplaced(vec![5, 7, 5, 9, 7], &HashSet::from([9])), vec![5, 7]);
    }

    fn job(asked_unix_ms: Option<u64>) -> WatchJob {
        WatchJob {
            drv: "/nix/store/00000000000000000000000000000000-pkg-1.0.drv".into(),
            name: "pkg-1.0".into(),
            tier: Tier::Heavy,
            memory_limit_mib: 400,
            memory_reserved_mib: None,
            limit_learned: false,
            cores: 2,
            lock_files: Vec::new(),
            output_env: Vec::new(),
            outputs: Vec::new(),
            nix_pid: 1,
            builder_uids: Vec::new(),
            asked_unix_ms,
            started_unix_ms: 10_000,
            cgroups: None,
        }
    }

    #[test]
    fn a_build_records_its_wait_and_its_lease() {
        let finished = Finished {
            started: true,
            wall: Duration::from_millis(1500),
            leased: Duration::from_millis(1400),
            cpu: None,
            peak_bytes: Some(3 * MIB + 1),
            oom_kills: 0,
            bounded: true,
            succeeded: true,
        };
        let row = record(&job(Some(7_500)), &finished);
        assert_eq!(row.waited_ms, Some(2_500), "asked at 7.5 s, admitted at 10 s");
        assert_eq!((row.package.as_str(), row.version.as_str(), row.peak_mib, row.limit_mib), ("pkg", "1.0", Some(4), Some(400)));
        assert_eq!((row.wall_ms, row.leased_ms), (1500, Some(1400)));
        assert_eq!(record(&job(Some(10_000)), &finished).waited_ms, Some(0));
        // The job of an older hook, taken over from its watcher lock: no wait known.
        let mut json = serde_json::to_value(job(Some(1))).unwrap();
        json.as_object_mut().unwrap().remove("askedUnixMs");
        let old: WatchJob = serde_json::from_value(json).unwrap();
        assert_eq!(record(&old, &finished).waited_ms, None);
    }

    #[test]
    fn watcher_lock_files_are_emptied_and_reused() {
        let state = tempfile::tempdir().unwrap();
        let files = LockFiles::new(state.path());
        let first = files.hold(&job(None)).unwrap();
        let path = first.path.clone();
        assert!(std::fs::read_to_string(&path).unwrap().contains("pkg-1.0.drv"));
        drop(first);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "", "emptied when the build ends");
        let second = files.hold(&job(None)).unwrap();
        assert_eq!(second.path, path);
        let reused = std::fs::read_to_string(&path).unwrap();
        assert!(reused.starts_with(&format!("{}\n{{", std::process::id())), "written from its start: {reused:?}");
        // Held: a broker started meanwhile can neither take it over nor lend it out.
        let meanwhile = LockFiles::new(state.path());
        assert!(running_builds(state.path(), &meanwhile).is_empty());
        assert!(meanwhile.pool().free.is_empty());
        drop(second);
        // A broker started later lends the free file to its own builds instead of making one.
        let later = LockFiles::new(state.path());
        assert!(running_builds(state.path(), &later).is_empty());
        assert_eq!(later.hold(&job(None)).unwrap().path, path);
        assert_eq!(std::fs::read_dir(state.path().join("leases")).unwrap().count(), 1);
    }

    #[test]
    fn a_candidate_built_unseen_is_recorded_and_one_no_longer_told_forgotten() {
        let store = tempfile::tempdir().unwrap();
        let candidate = |name: &str| {
            let out = store.path().join(name);
            WatchJob {
                drv: format!("{}.drv", out.display()),
                lock_files: vec![store.path().join(format!("{name}.lock"))],
                outputs: vec![out.to_string_lossy().into_owned()],
                ..job(None)
            }
        };
        let (built, failed, let_go, waiting) = (candidate("built"), candidate("failed"), candidate("let-go"), candidate("waiting"));
        let mut candidates = Candidates::default();
        for job in [&built, &failed, &let_go, &waiting] {
            std::fs::write(&job.lock_files[0], "").unwrap();
            candidates.add(job.clone());
        }
        // Nix registered built's output, then deleted its lock; failed's lock is gone without
        // an output; let-go's lock is still there (Nix let go of it without building it).
        std::fs::write(&built.outputs[0], "").unwrap();
        std::fs::remove_file(&built.lock_files[0]).unwrap();
        std::fs::remove_file(&failed.lock_files[0]).unwrap();
        assert!(candidates.sweep().is_empty(), "all told just now");
        // Built is found once it has not been told for a sweep's interval; the others are
        // forgotten once not told for the TTL.
        candidates.by_drv.get_mut(&built.drv).unwrap().told -= SWEEP_EVERY;
        for drv in [&failed.drv, &let_go.drv] {
            candidates.by_drv.get_mut(drv).unwrap().told -= CANDIDATE_TTL;
        }
        candidates.swept = None;
        let recorded = candidates.sweep();
        assert_eq!(recorded.iter().map(|(job, _)| job.drv.as_str()).collect::<Vec<_>>(), [built.drv.as_str()]);
        let (job, done) = &recorded[0];
        assert_eq!(record(job, done).outcome, Outcome::Succeeded);
        assert!(done.wall < Duration::from_secs(5), "from the output's creation to its registration: {:?}", done.wall);
        assert_eq!(candidates.by_drv.keys().collect::<Vec<_>>(), [&waiting.drv], "the expired ones are forgotten");
        assert_eq!(candidates.by_output.values().collect::<Vec<_>>(), [&waiting.drv]);
    }
}
