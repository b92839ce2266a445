//! The broker: the one process per machine (per state directory) that holds the lease table and
//! watches every admitted build. `nix-tier-hook --broker`.
//!
//! Hooks are thin clients ([`client`]): each Nix worker's hook connects to
//! `<state dir>/broker.sock`, says who it is ([`Hello`]: its worker, that worker's `max-jobs`,
//! the profile's build section), and sends every `try` it does not answer by itself. The broker
//! decides in memory ([`nix_tier_model::leases::LeaseTable`]) and answers at once; only then does
//! it hand the build to its watcher thread ([`crate::watch::run`]), which finds the builder,
//! bounds it with a cgroup, ends the lease once the build's processes are gone and records the
//! build in the history, the one writer of it. One thread per connection reads requests; the
//! table is shared under a mutex held for the microseconds of a decision. A build's learned
//! reservation and expected duration come from the history as read at the start and taught by
//! every build recorded since ([`nix_tier_model::learning::Learned`]): no decision reads the
//! database. The threads off the reply path give way to Nix's worker when they wake
//! ([`in_background`]).
//!
//! It is started on demand by the first hook that finds no broker (or by a service manager,
//! `--stay`), and only one runs per state directory: it holds `<state dir>/broker.lock` for its
//! lifetime, so a second one exits at once. Without `--stay` it exits after [`IDLE_EXIT`] with no
//! client and no build. Started again after it was killed, it finds the builds that still run
//! from the watcher locks they left in `<state dir>/leases` ([`crate::watch::running_builds`]):
//! their leases are counted again before the first request is answered.
//!
//! Only Nix's side may take leases: a connection is accepted only from the broker's own user or
//! root (peer credentials). The state directory is the broker's user's and writable by nobody
//! else ([`crate::state`]). For `nix-tier status`, the broker keeps `state.json` up to date
//! (at most every 100 ms, never on a request's path).

pub mod client;
mod stream;

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, TryLockError};
use std::time::{Duration, Instant};

use nix_tier_model::admission::WaitReason;
use nix_tier_model::build::package_name;
use nix_tier_model::learning::{self, Learned, ReservationSource};
use nix_tier_model::leases::{self, AlikeLeases, Decision, LeaseId, LeaseTable, Request};
use nix_tier_model::Build;
use serde::{Deserialize, Serialize};

use crate::history::BuildRecord;
use crate::proc_events::ProcEvents;
use crate::state::{self, StateDir};
use crate::store_db::StoreDb;
use crate::watch::{self, Order, WatchJob};
use stream::ReadWhenReady;

/// The argument that turns `nix-tier-hook` into the broker.
pub const BROKER_ARG: &str = "--broker";
/// With [`BROKER_ARG`]: never exit for being idle (under a service manager).
pub const STAY_ARG: &str = "--stay";
/// The broker's socket in the state directory.
pub const SOCKET: &str = "broker.sock";
/// Held by the running broker.
pub const LOCK: &str = "broker.lock";
/// How many builds' numbers of `try` requests the broker keeps before it starts again.
const TRIES_KEPT: usize = 100_000;
/// How long a store database that could not be opened is left before it is tried again.
const STORE_DB_RETRY: Duration = Duration::from_secs(10);
/// How long a broker started on demand lives on without clients or builds.
pub const IDLE_EXIT: Duration = Duration::from_secs(60);
/// The longest line either side reads (a build's job is a few KiB): a peer that sends more
/// without a newline is cut off, not buffered without end.
pub const MAX_LINE: u64 = 16 << 20;
/// How long writing an answer to a hook may take before its connection is dropped: a hook
/// reads each answer at once, and an answer fits in the socket's buffer many times over.
const REPLY_WITHIN: Duration = Duration::from_secs(1);

/// A hook's first message: who asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    /// The Nix worker the hook serves.
    pub worker_pid: u32,
    /// That worker's `max-jobs`.
    pub max_jobs: u32,
    /// The profile's build section the hook works with.
    pub build: Build,
    /// The worker's `build-poll-interval`, seconds: how often a postponed build asks again.
    pub poll_interval_secs: u64,
    /// Its store's database, where the broker counts what needs a waiting build
    /// ([`crate::store_db`]); `None` for a store that is not local.
    #[serde(default)]
    pub store_db: Option<PathBuf>,
}

/// A `try` the hook passes on: the build as the watcher needs it, and its expected duration.
/// The hook sends its tier's figures; the broker puts in what the history taught it
/// ([`Board::learn`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TryBuild {
    /// The build (`started_unix_ms` and `watcher_lock` are set by the broker).
    pub job: WatchJob,
    /// How long it is expected to run, milliseconds.
    pub expected_ms: u64,
}

/// A build in a hook's message: whole the first time on a connection, then by its `.drv` until
/// it is admitted (the connection's broker keeps it meanwhile).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Told {
    /// Not yet sent on this connection (or admitted since). Boxed: a `.drv` path is all the
    /// other variant holds.
    Whole(Box<TryBuild>),
    /// Sent whole before: its `.drv`.
    Known(String),
}

/// A build the hook declined by itself, Nix having no free slot or its worker being full: Nix
/// may still start it, should a slot free before it asks again.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Declined {
    /// The build.
    pub build: Told,
    /// How many requests about it the hook declined since its last message.
    pub times: u32,
}

/// What a hook sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ToBroker {
    /// First, once.
    Hello(Hello),
    /// A build Nix is about to start.
    Try(Told),
    /// The builds the hook declined by itself since its last message. Not answered.
    Declined(Vec<Declined>),
    /// How many `try` requests each build took so far (for bench/dispatch).
    Tries,
    /// A build whose answer this hook did not wait for, its broker still starting: it answered
    /// `postpone`, so a lease the build got is let go (Nix asks about it again). Not answered.
    Withdrawn(String),
}

/// The broker's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FromBroker {
    /// Start it: a lease is held.
    Admit,
    /// Not now.
    Wait {
        /// Why, with the builds it waits on, for the user.
        reason: String,
        /// Changes only when the reason or those builds change (not as they age).
        key: String,
    },
    /// The worker is full: Nix parks the build itself (or starts it in the place of a build it
    /// let go of); nothing was reserved.
    WorkerFull {
        /// When the worker's leases are all alike: until the broker says that one of them ended
        /// or that a builder of the worker exited ([`FromBroker::SlotFreed`]), every build they
        /// make room for gets this answer, and the hook gives it without asking (telling the
        /// broker, as [`ToBroker::Declined`]). Nix asks about every goal woken for a slot, and
        /// all but one of them get this answer.
        alike: Option<AlikeLeases>,
        /// The memory this build reserves, MiB, as the broker learned it: what the hook
        /// compares with `alike` when Nix asks about it again.
        reserved_mib: u64,
    },
    /// Unasked, after a [`FromBroker::WorkerFull`] with `alike`: a slot of the worker may be
    /// free, so the next build is to be asked about again.
    SlotFreed,
    /// The request was refused; why.
    Refused(String),
    /// The number of `try` requests of every build asked about since the broker started (or
    /// since it last emptied its count, at [`TRIES_KEPT`] builds).
    Tries(Vec<u32>),
}

/// What the broker shares between its threads.
struct Shared {
    table: LeaseTable,
    /// The jobs of the leases, for `state.json`.
    jobs: HashMap<LeaseId, WatchJob>,
    /// The builders of the leases, as found by the watcher: Nix's slot is free once one exits.
    builders: HashMap<LeaseId, OwnedFd>,
    /// The number of `try` requests of each build asked about, for bench/dispatch
    /// ([`ToBroker::Tries`]); emptied when it holds [`TRIES_KEPT`] builds (a broker under a
    /// service manager runs for months).
    tries: HashMap<String, u32>,
    /// The connections told that their worker is full with alike leases (by connection, with
    /// the worker), to be told when a slot of it may be free.
    told_full: HashMap<u64, (u32, Arc<Outbox>)>,
    /// The hooks connected, by connection: processes of Nix's side that are no builder.
    hooks: HashMap<u64, u32>,
    /// When each build last became a candidate of the watcher (declined, its worker full),
    /// until it is admitted.
    candidates: HashMap<String, Instant>,
    /// Whether `state.json` is behind.
    changed: bool,
    clients: usize,
    /// When the last client left or the last build ended.
    idle_since: Instant,
}

/// The broker's lease table, as the watcher thread sees it.
struct Board {
    shared: Mutex<Shared>,
    /// What the history says of each package: read at the start, taught by the watcher as it
    /// records builds.
    learned: Mutex<Learned>,
    /// The builds to count the dependents of, with their store's database
    /// ([`count_dependents`]).
    to_count: Sender<(PathBuf, String)>,
}

/// One hook's connection, as decisions need it.
struct Connection {
    id: u64,
    /// Replies, and unasked [`FromBroker::SlotFreed`] from other threads.
    writer: Arc<Outbox>,
}

/// What a connection writes: its thread's replies, and the [`FromBroker::SlotFreed`] lines
/// other threads tell it while they hold the lease table, which must never wait for a hook.
struct Outbox {
    stream: Mutex<UnixStream>,
    /// A `SlotFreed` line could not be written while a reply was: the replying thread sends it.
    slot_freed_owed: AtomicBool,
}

static SLOT_FREED_LINE: LazyLock<String> =
    LazyLock::new(|| format!("{}\n", serde_json::to_string(&FromBroker::SlotFreed).expect("serializable")));

impl Outbox {
    fn new(stream: UnixStream) -> Outbox {
        Outbox { stream: Mutex::new(stream), slot_freed_owed: AtomicBool::new(false) }
    }

    fn stream(&self) -> std::sync::MutexGuard<'_, UnixStream> {
        self.stream.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes `answer` (within the stream's write timeout), then a `SlotFreed` line owed
    /// meanwhile: one told while the stream was held is seen here, once it is let go.
    fn reply(&self, answer: &FromBroker) -> io::Result<()> {
        let mut line = serde_json::to_vec(answer)?;
        line.push(b'\n');
        self.stream().write_all(&line)?;
        if self.slot_freed_owed.load(Ordering::SeqCst) {
            let mut stream = self.stream();
            if self.slot_freed_owed.swap(false, Ordering::SeqCst) {
                stream.write_all(SLOT_FREED_LINE.as_bytes())?;
            }
        }
        Ok(())
    }

    /// Tells the hook that a slot may be free, without waiting: while a reply is being written
    /// the line is owed, and [`Outbox::reply`] sends it after; a connection that cannot take it
    /// at once is shut down, and its hook asks anew on a new one.
    fn slot_freed(&self) {
        self.slot_freed_owed.store(true, Ordering::SeqCst);
        let stream = match self.stream.try_lock() {
            Ok(stream) => stream,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        if self.slot_freed_owed.swap(false, Ordering::SeqCst) {
            let line = SLOT_FREED_LINE.as_bytes();
            let sent = nix::sys::socket::send(stream.as_raw_fd(), line, nix::sys::socket::MsgFlags::MSG_DONTWAIT);
            if sent.ok() != Some(line.len()) {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

impl Shared {
    /// Counts `times` more `try` requests of `drv`.
    fn count_tries(&mut self, drv: &str, times: u32) {
        if self.tries.len() >= TRIES_KEPT && !self.tries.contains_key(drv) {
            self.tries.clear();
        }
        let tries = self.tries.entry(drv.to_string()).or_default();
        *tries = tries.saturating_add(times);
    }

    /// Whether the watcher still looks for `drv` as a candidate; if not, it is to be told
    /// ([`Order::Candidate`]), and from now on it does. Nix asks about a build its worker has
    /// no slot for again at every slot that frees.
    fn candidate_watched(&mut self, drv: &str) -> bool {
        let now = Instant::now();
        // Told again before the watcher forgets it.
        let fresh = watch::CANDIDATE_TTL / 2;
        if self.candidates.get(drv).is_some_and(|at| now.duration_since(*at) < fresh) {
            return true;
        }
        if self.candidates.len() > 10_000 {
            self.candidates.retain(|_, at| now.duration_since(*at) < fresh);
        }
        self.candidates.insert(drv.to_string(), now);
        false
    }

    /// Tells the connections that `worker` is full that a slot of it may be free, without
    /// waiting for any of them (the lease table is locked): [`Outbox::slot_freed`].
    fn slot_freed(&mut self, worker: u32) {
        self.told_full.retain(|_, (told, writer)| {
            if *told == worker {
                writer.slot_freed();
            }
            *told != worker
        });
    }
}

impl Board {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // A panicked thread leaves the table as consistent as any decision does.
        self.shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Puts what the history taught into a build the hook sent with its tier's figures: its
    /// reservation and limit learned within the tier's `memoryMiB` (in `build`, the profile's
    /// build section), its expected duration.
    fn learn(&self, build: &Build, request: &mut TryBuild) {
        let job = &mut request.job;
        let tier_mib = build.tiers.get(job.tier).memory_mib;
        let package = package_name(&job.name);
        let learned = self.learned.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let reservation = learning::reservation(&learned.peaks(package), tier_mib);
        job.memory_limit_mib = reservation.limit_mib;
        job.memory_reserved_mib = Some(reservation.memory_mib);
        job.limit_learned = matches!(reservation.source, ReservationSource::Learned { .. });
        if let Some(expected_ms) = learned.expected_wall_ms(package) {
            request.expected_ms = expected_ms;
        }
    }

    /// Lets go of the lease `worker` holds for `drv` while its builder has not started: its
    /// hook answered `postpone` without waiting for the answer ([`ToBroker::Withdrawn`]).
    fn withdrawn(&self, worker: u32, drv: &str) {
        let lease = {
            let shared = self.lock();
            let unstarted = shared.table.leases().iter().find(|l| l.worker == worker && l.drv == drv && !shared.builders.contains_key(&l.id));
            unstarted.map(|l| l.id)
        };
        if let Some(lease) = lease {
            watch::Leases::end(self, lease);
        }
    }

    /// Forgets connection `id`, whose hook is gone.
    fn disconnected(&self, id: u64) {
        let mut shared = self.lock();
        shared.clients -= 1;
        shared.told_full.remove(&id);
        shared.hooks.remove(&id);
        shared.idle_since = Instant::now();
    }

    /// Decides one `try` of the hook that said `hello`; the reply, and the order for the
    /// watcher.
    fn decide(&self, hello: &Hello, connection: &Connection, mut request: TryBuild) -> (FromBroker, Option<Order>) {
        let now = state::now_ms();
        let ttl_ms = leases::waiter_ttl_ms(hello.poll_interval_secs);
        let job = &request.job;
        let mut table_request = Request {
            worker: hello.worker_pid,
            worker_max_jobs: hello.max_jobs,
            drv: job.drv.clone(),
            name: job.name.clone(),
            claim: job.claim(),
            expected_ms: request.expected_ms,
            slots_freed: Vec::new(),
        };
        let mut shared = self.lock();
        table_request.slots_freed = shared
            .builders
            .iter()
            .filter(|(id, _)| shared.table.lease(**id).is_some_and(|l| l.worker == hello.worker_pid))
            .filter(|(_, pidfd)| watch::exited(pidfd))
            .map(|(id, _)| *id)
            .collect();
        shared.count_tries(&job.drv, 1);
        let decision = shared.table.decide(&hello.build, &table_request, now, ttl_ms);
        // Counted off the decisions' path, once it waits, if the count can order it.
        let ranked = request.expected_ms >= leases::RANKED_BY_DEPENDENTS_FROM_MS;
        if let (true, Some(db)) = (ranked && shared.table.uncounted(&job.drv), &hello.store_db) {
            let _ = self.to_count.send((db.clone(), job.drv.clone()));
        }
        let shared = &mut *shared;
        shared.told_full.remove(&connection.id);
        let table = &shared.table;
        shared.jobs.retain(|id, _| table.lease(*id).is_some());
        shared.builders.retain(|id, _| table.lease(*id).is_some());
        match decision {
            Decision::Admit(lease) => {
                shared.candidates.remove(&request.job.drv);
                request.job.started_unix_ms = now;
                shared.jobs.insert(lease, request.job.clone());
                shared.changed = true;
                (FromBroker::Admit, Some(Order::Watch { job: request.job, lease }))
            }
            Decision::Wait(reason) => {
                let holders: Vec<&WatchJob> = shared
                    .table
                    .leases()
                    .iter()
                    .filter(|l| matches!(reason, WaitReason::TierFull { .. }) == (l.claim.tier == job.tier))
                    .filter_map(|l| shared.jobs.get(&l.id))
                    .collect();
                let key = format!("{reason} {:?}", holders.iter().map(|j| &j.drv).collect::<Vec<_>>());
                let shown: Vec<String> = holders
                    .iter()
                    .map(|j| format!("{}, {}", j.name, crate::dispatch::age(now.saturating_sub(j.started_unix_ms) / 1000)))
                    .collect();
                shared.changed = true;
                (FromBroker::Wait { reason: format!("{reason} ({})", shown.join("; ")), key }, None)
            }
            Decision::WorkerFull => {
                let alike = shared.table.alike_held(hello.worker_pid, &table_request.slots_freed);
                if alike.is_some() {
                    shared.told_full.insert(connection.id, (hello.worker_pid, Arc::clone(&connection.writer)));
                }
                let watched = shared.candidate_watched(&request.job.drv);
                let reserved_mib = request.job.claim().memory_mib;
                (FromBroker::WorkerFull { alike, reserved_mib }, (!watched).then_some(Order::Candidate(request.job)))
            }
        }
    }

    /// The snapshot `nix-tier status` reads.
    fn snapshot(&self) -> state::State {
        let shared = self.lock();
        let running = shared
            .table
            .leases()
            .iter()
            .filter_map(|l| {
                let job = shared.jobs.get(&l.id)?;
                Some(state::Lease {
                    drv: job.drv.clone(),
                    name: job.name.clone(),
                    tier: job.tier,
                    memory_mib: l.counted().memory_mib,
                    lock_files: job.lock_files.clone(),
                    started: job.started_unix_ms / 1000,
                    nix_pid: job.nix_pid,
                })
            })
            .collect();
        let waiting = shared
            .table
            .waiting()
            .map(|w| state::Waiter {
                drv: w.drv.clone(),
                name: w.name.clone(),
                tier: w.claim.tier,
                memory_mib: w.claim.memory_mib,
                since: w.since_ms / 1000,
                seen: w.seen_ms / 1000,
                reason: w.reason.to_string(),
            })
            .collect();
        state::State { running, waiting }
    }
}

impl watch::Leases for Board {
    fn adopt(&self, job: &WatchJob) -> LeaseId {
        // How long it runs still orders the waiting builds (longest first, backfilling).
        let learned = self.learned.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).expected_wall_ms(package_name(&job.name));
        let expected_ms = learned.unwrap_or_else(|| learning::guessed_wall_ms(job.tier));
        let mut shared = self.lock();
        let lease = shared.table.adopt(job.nix_pid, &job.drv, job.claim(), expected_ms, state::now_ms());
        let shared = &mut *shared;
        let table = &shared.table;
        shared.jobs.retain(|id, _| table.lease(*id).is_some());
        shared.jobs.insert(lease, job.clone());
        shared.changed = true;
        lease
    }

    fn builder_started(&self, lease: LeaseId, pidfd: OwnedFd) {
        let mut shared = self.lock();
        if shared.table.lease(lease).is_some() {
            shared.builders.insert(lease, pidfd);
        }
    }

    fn builder_exited(&self, lease: LeaseId) {
        let mut shared = self.lock();
        if let Some(worker) = shared.table.lease(lease).map(|l| l.worker) {
            shared.slot_freed(worker);
        }
    }

    fn hooks(&self) -> Vec<u32> {
        self.lock().hooks.values().copied().collect()
    }

    fn in_use(&self, lease: LeaseId, mib: u64) {
        let mut shared = self.lock();
        shared.table.in_use(lease, mib);
        shared.changed = true;
    }

    fn recorded(&self, row: &BuildRecord) {
        row.teach(&mut self.learned.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    }

    fn end(&self, lease: LeaseId) {
        let mut shared = self.lock();
        if let Some(ended) = shared.table.end(lease) {
            shared.slot_freed(ended.worker);
        }
        shared.jobs.remove(&lease);
        shared.builders.remove(&lease);
        shared.changed = true;
        if shared.table.leases().is_empty() {
            shared.idle_since = Instant::now();
        }
    }
}

/// Runs the broker for the state directory of the environment; `stay` keeps it running when
/// idle. Exits at once, successfully, when another broker runs. It keeps only the capabilities
/// it needs ([`crate::privileges`]), once it has subscribed to the kernel's process events: a
/// broker started as root (the NixOS service) may still use `CAP_NET_ADMIN` then, which older
/// kernels want of a listener.
pub fn serve(stay: bool) -> ExitCode {
    close_inherited_descriptors();
    let events = crate::config::proc_events().then(ProcEvents::open).and_then(Result::ok);
    if let Err(error) = crate::privileges::keep_only_needed() {
        eprintln!("nix-tier-hook --broker: cannot drop capabilities ({error}); running with those it was given");
    }
    let state_dir = StateDir::from_env();
    match serve_in(&state_dir, stay, events) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nix-tier-hook --broker: {}: {error}", state_dir.path().display());
            ExitCode::FAILURE
        }
    }
}

/// Closes what the process that started the broker left open beyond stdin, stdout and stderr
/// (a hook's pipes, a test harness's files): the broker outlives them all.
fn close_inherited_descriptors() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return };
    let fds: Vec<i32> = entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).filter(|fd| *fd > 2).collect();
    for fd in fds {
        // The directory's own descriptor is among them and already closed by then: EBADF.
        let _ = nix::unistd::close(fd);
    }
}

fn serve_in(state_dir: &StateDir, stay: bool, events: Option<ProcEvents>) -> io::Result<()> {
    let Some(mut running) = state_dir.exclusive(LOCK)? else { return Ok(()) };
    // Who holds it, for people and tests.
    running.set_len(0)?;
    writeln!(running, "{}", std::process::id())?;
    // The history's schema exists before any client can read it; what it says is read once.
    let learned = match crate::history::History::open(state_dir.path()) {
        Ok(history) => history.learned().unwrap_or_else(|error| {
            eprintln!("nix-tier-hook --broker: {error}; builds reserve their tiers' memoryMiB until they are recorded anew");
            Learned::default()
        }),
        Err(error) => {
            eprintln!("nix-tier-hook --broker: {error}; builds are not recorded and reserve their tiers' memoryMiB");
            Learned::default()
        }
    };
    let socket = state_dir.path().join(SOCKET);
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    let (to_count, counting) = mpsc::channel();
    let board = Arc::new(Board {
        shared: Mutex::new(Shared {
            table: LeaseTable::new(),
            jobs: HashMap::new(),
            builders: HashMap::new(),
            tries: HashMap::new(),
            told_full: HashMap::new(),
            hooks: HashMap::new(),
            candidates: HashMap::new(),
            changed: true,
            clients: 0,
            idle_since: Instant::now(),
        }),
        learned: Mutex::new(learned),
        to_count,
    });
    let (orders, inbox) = mpsc::channel();
    {
        let board = Arc::clone(&board);
        in_background("dependents", move || count_dependents(&board, counting))?;
    }
    let (wake_read, wake_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)?;
    let wake_write = Arc::new(wake_write);
    // What a broker that is gone left running is counted before anything is admitted.
    let lock_files = watch::LockFiles::new(state_dir.path());
    for (job, lock) in watch::running_builds(state_dir.path(), &lock_files) {
        let lease = watch::Leases::adopt(&*board, &job);
        let _ = orders.send(Order::Recovered { job, lease, lock });
        let _ = nix::unistd::write(&*wake_write, &[1]);
    }
    {
        let board = Arc::clone(&board);
        let state_dir = state_dir.path().to_path_buf();
        in_background("watcher", move || watch::run(inbox, wake_read, events, &*board, &state_dir, &lock_files))?;
    }
    {
        let board = Arc::clone(&board);
        let state_dir = state_dir.clone();
        in_background("snapshot", move || keep_snapshot(&board, &state_dir, stay))?;
    }
    let me = nix::unistd::geteuid().as_raw();
    let mut connections = 0u64;
    for stream in listener.incoming() {
        let Ok(stream) = stream else {
            // Out of descriptors, say: the connection stays queued, so do not spin on it.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        // A hook reads every answer at once; one that does not must not hold its connection's
        // thread for good.
        let _ = stream.set_write_timeout(Some(REPLY_WITHIN));
        let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials).ok();
        let allowed = peer.is_some_and(|cred| cred.uid() == me || cred.uid() == 0);
        if !allowed {
            let _ = Outbox::new(stream).reply(&FromBroker::Refused("only Nix's own user may take leases".to_string()));
            continue;
        }
        let board = Arc::clone(&board);
        let orders = orders.clone();
        let wake = Arc::clone(&wake_write);
        connections += 1;
        let id = connections;
        {
            let mut shared = board.lock();
            shared.clients += 1;
            shared.hooks.extend(peer.map(|cred| (id, cred.pid() as u32)));
        }
        let served = Arc::clone(&board);
        let spawned = std::thread::Builder::new().name("connection".to_string()).spawn(move || {
            // Forgotten however the thread ends, so that an idle broker still exits.
            let _connected = Connected(&served, id);
            let _ = serve_client(stream, id, &served, &orders, &wake);
        });
        if spawned.is_err() {
            // No thread for it: the connection closes, and its hook fails open.
            board.disconnected(id);
        }
    }
    Ok(())
}

/// Runs `work` in a thread named `name` that gives way to Nix: under `SCHED_BATCH` (sched(7))
/// it keeps its fair share of the CPU, but does not preempt a running thread when it wakes.
/// The broker's threads off the reply path (the watcher, the snapshot, the count of
/// dependents) wake at every process event and every build's end; where Nix's worker is busy,
/// each such wake-up took the worker's CPU from it (docs/benchmarks.md, "Night, 2026-12-04").
/// The connection threads, which Nix waits for, keep the default policy. Processes started
/// from such a thread get the default policy back.
fn in_background(name: &str, work: impl FnOnce() + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new().name(name.to_string()).spawn(move || {
        let param = nix::libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler(2) only reads `param`; pid 0 is the calling thread. Should
        // it fail, the thread runs as before.
        let _ = unsafe { nix::libc::sched_setscheduler(0, nix::libc::SCHED_BATCH | nix::libc::SCHED_RESET_ON_FORK, &param) };
        work()
    })?;
    Ok(())
}

/// A connection of the board, forgotten when dropped.
struct Connected<'a>(&'a Board, u64);

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.disconnected(self.1);
    }
}

/// Answers one hook's requests until it is gone.
fn serve_client(stream: UnixStream, id: u64, board: &Board, orders: &Sender<Order>, wake: &OwnedFd) -> io::Result<()> {
    let connection = Connection { id, writer: Arc::new(Outbox::new(stream.try_clone()?)) };
    let writer = &*connection.writer;
    let mut reader = BufReader::new(ReadWhenReady::new(stream));
    let mut hello: Option<Hello> = None;
    // The builds this hook sent whole and that were not admitted since.
    let mut known: HashMap<String, TryBuild> = HashMap::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let message = match serde_json::from_slice::<ToBroker>(&line) {
            Ok(message) => message,
            Err(e) => return writer.reply(&FromBroker::Refused(format!("unreadable request: {e}"))),
        };
        match (message, hello.as_ref()) {
            (ToBroker::Hello(said), _) => hello = Some(said),
            (ToBroker::Try(told), Some(hello)) => {
                let Some(request) = recall(&mut known, told, board, hello) else {
                    return writer.reply(&FromBroker::Refused("a build named but never sent whole".to_string()));
                };
                let drv = request.job.drv.clone();
                let (answer, order) = board.decide(hello, &connection, request);
                let replied = writer.reply(&answer);
                if answer == FromBroker::Admit {
                    known.remove(&drv);
                }
                // Sent even when the hook is gone: it gave up waiting (a stopped broker) and
                // declined, so Nix builds anyway. The watcher ends the lease with the build;
                // unwatched, it would be held for good.
                if let Some(order) = order {
                    if orders.send(order).is_ok() {
                        let _ = nix::unistd::write(wake, &[1]);
                    }
                }
                replied?;
            }
            (ToBroker::Try(_), None) => writer.reply(&FromBroker::Refused("no hello first".to_string()))?,
            // Not answered; a hook says hello first.
            (ToBroker::Declined(_), None) => {}
            (ToBroker::Declined(builds), Some(hello)) => {
                let mut unwatched = Vec::new();
                let builds: Vec<(TryBuild, u32)> =
                    builds.into_iter().filter_map(|Declined { build, times }| Some((recall(&mut known, build, board, hello)?, times))).collect();
                {
                    let mut shared = board.lock();
                    let now = state::now_ms();
                    for (request, times) in builds {
                        shared.count_tries(&request.job.drv, times);
                        shared.table.still_waiting(&request.job.drv, now);
                        if !shared.candidate_watched(&request.job.drv) {
                            unwatched.push(request.job);
                        }
                    }
                }
                let ordered = unwatched.into_iter().filter_map(|job| orders.send(Order::Candidate(job)).ok()).count();
                if ordered > 0 {
                    let _ = nix::unistd::write(wake, &[1]);
                }
            }
            (ToBroker::Withdrawn(drv), Some(hello)) => board.withdrawn(hello.worker_pid, &drv),
            (ToBroker::Withdrawn(_), None) => {}
            (ToBroker::Tries, _) => {
                let tries = board.lock().tries.values().copied().collect();
                writer.reply(&FromBroker::Tries(tries))?;
            }
        }
    }
}

/// The build `told` names: sent whole (kept in `known` from now on, with what the history
/// taught of it), or sent whole before.
fn recall(known: &mut HashMap<String, TryBuild>, told: Told, board: &Board, hello: &Hello) -> Option<TryBuild> {
    match told {
        Told::Whole(mut build) => {
            board.learn(&hello.build, &mut build);
            known.insert(build.job.drv.clone(), (*build).clone());
            Some(*build)
        }
        Told::Known(drv) => known.get(&drv).cloned(),
    }
}

/// Counts, for each build sent, the derivations not built yet that need it, in the store
/// database sent with it (each opened once, read-only; one that could not be opened is tried
/// again after [`STORE_DB_RETRY`]), and puts the count in the table.
fn count_dependents(board: &Board, builds: Receiver<(PathBuf, String)>) {
    let mut databases: HashMap<PathBuf, Result<StoreDb, Instant>> = HashMap::new();
    for (path, drv) in builds {
        let db = databases.entry(path.clone()).or_insert_with(|| StoreDb::open(&path).ok_or_else(Instant::now));
        if matches!(db, Err(failed) if failed.elapsed() >= STORE_DB_RETRY) {
            *db = StoreDb::open(&path).ok_or_else(Instant::now);
        }
        let counted = db.as_ref().map_or(0, |db| db.dependents(&drv));
        board.lock().table.dependents_counted(&drv, counted);
    }
}

/// Writes `state.json` when the table changed, at most every 100 ms; ends the process once it
/// has been idle for [`IDLE_EXIT`] (unless `stay`).
fn keep_snapshot(board: &Board, state_dir: &StateDir, stay: bool) {
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if std::mem::take(&mut board.lock().changed) {
            let snapshot = board.snapshot();
            if let Ok(locked) = state_dir.lock() {
                let _ = locked.save(&snapshot);
            }
        }
        let shared = board.lock();
        if !stay && shared.clients == 0 && shared.table.leases().is_empty() && shared.idle_since.elapsed() >= IDLE_EXIT {
            // The socket goes first: a hook that finds none starts a new broker. Under the
            // table's lock, so that nothing is decided between the look and the exit: a hook
            // that connected meanwhile finds its connection closed, and connects anew.
            let _ = std::fs::remove_file(state_dir.path().join(SOCKET));
            std::process::exit(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_answer(lines: &mut impl Iterator<Item = io::Result<String>>) -> FromBroker {
        serde_json::from_str(&lines.next().expect("a line").expect("readable")).expect("an answer")
    }

    #[test]
    fn a_slot_freed_while_a_reply_is_written_waits_for_nothing_and_follows_the_reply() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let outbox = Arc::new(Outbox::new(ours));
        let mut lines = BufReader::new(theirs).lines();
        // Nothing being written: the line goes at once.
        outbox.slot_freed();
        assert_eq!(read_answer(&mut lines), FromBroker::SlotFreed);
        // A reply being written (to a hook that may not read it): told from another thread,
        // holding the lease table, the line is owed, not waited for.
        let replying = outbox.stream();
        let (told, done) = mpsc::channel();
        let teller = Arc::clone(&outbox);
        std::thread::spawn(move || {
            teller.slot_freed();
            let _ = told.send(());
        });
        done.recv_timeout(Duration::from_secs(10)).expect("slot_freed waited for a reply being written");
        drop(replying);
        outbox.reply(&FromBroker::Admit).unwrap();
        assert_eq!(read_answer(&mut lines), FromBroker::Admit);
        assert_eq!(read_answer(&mut lines), FromBroker::SlotFreed, "the owed line follows the reply");
        outbox.reply(&FromBroker::Admit).unwrap();
        assert_eq!(read_answer(&mut lines), FromBroker::Admit, "and is sent once");
    }
}
