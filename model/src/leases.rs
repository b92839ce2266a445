//! The machine's lease table: which builds hold a slot and memory now, which wait, and for which
//! Nix worker. Pure and in memory; the broker (`nix-tier-hook --broker`) owns the one instance of
//! a machine and feeds it every `try` of every Nix worker.
//!
//! A decision ([`LeaseTable::decide`]) is, in this order:
//!
//! 1. **Asked again** by the worker whose build holds a lease: Nix let go of it (no slot after
//!    all), so the old lease ends and the build is decided anew. Another worker's lease of the same
//!    `.drv` stays: Nix releases a build's output locks, and another worker may then ask about it,
//!    when the worker that built it was killed, and what that build left running still runs
//!    (the lease ends when its processes are gone).
//! 2. **The tier policy** (`crate::admission`): job slots, memory budget, no starvation of a
//!    waiting heavy build. A build it holds back waits (Nix asks again). A running build counts
//!    its reservation, or what it was last seen using when that is more ([`LeaseTable::in_use`]):
//!    a build that outgrew its learned reservation keeps others out of the memory it took.
//!    **Room for a heavy build in a worker's first pass**: Nix asks about its ready builds in the
//!    order of their names, so a heavy build may be asked about only after lighter builds have
//!    taken the memory it needs. Until a worker asks about one of its builds a second time (its
//!    first pass over what is ready is over: everything ready has been asked about) and while no
//!    heavy build runs, the policy counts one heavy build of the tier's reservation as waiting,
//!    unless nothing runs at all. A build held back for it is asked about again at Nix's next
//!    wake-up, when the room is no longer kept.
//! 3. **Longest first**: a waiting build that is expected to run longer, could start now and would
//!    no longer fit once the candidate is admitted keeps its place: the candidate waits. So does
//!    the longest waiting build that cannot start yet (backfilling): going by the running builds'
//!    expected ends, a shorter candidate goes ahead of it only if it ends before that build could
//!    start, or fits beside it then. A build that cannot delay a longer one is never held back.
//!    Waiting builds that have not asked within the waiting time-to-live are forgotten (their Nix
//!    is gone or busy elsewhere).
//! 4. **The worker is full**: a build the policy would admit, but whose worker already holds as
//!    many leases as its own `max-jobs`. Nix parks it for one of its own slots whatever the
//!    answer, so nothing is reserved for it ([`Decision::WorkerFull`]). This keeps a woken herd of
//!    goals from each taking a lease that all but one then leave unused. Nix does not always
//!    start the goal that got the lease, though: should it start this one instead, the caller
//!    counts it as it starts ([`LeaseTable::adopt`]); it fitted beside every lease when asked,
//!    and the lease Nix left unused ends when the caller sees that goal let go.
//!    A build the policy holds back is answered the same way when every lease of its full worker
//!    is of its tier and reserves at least its memory: Nix starts it only in place of one of
//!    those (at most `max-jobs` of the worker's builds run), so the limits hold whichever it
//!    starts, and it keeps its place among the waiting builds. Told to wait instead, it would
//!    ask again at every wake-up of Nix's worker rather than when a slot frees: Nix asks about
//!    every goal woken for a slot before any of them starts, all with a free slot, and
//!    `max-jobs` already holds all but one of them back.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::admission::{self, Admission, Claim, Running, WaitReason};
use crate::{Build, Tier};

/// One `try` as the table sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The Nix worker asking (its pid).
    pub worker: u32,
    /// That worker's own `max-jobs` (from its settings handshake).
    pub worker_max_jobs: u32,
    /// The .drv path.
    pub drv: String,
    /// The derivation's name, for `nix-tier status` (may be empty).
    pub name: String,
    /// What the build would reserve.
    pub claim: Claim,
    /// How long it is expected to run, milliseconds (from history, else its tier's guess).
    pub expected_ms: u64,
    /// Leases of this worker whose builder has exited: Nix has their slots back (it asks with a
    /// free slot as soon as a builder is gone), though their leases last until every process of
    /// the build is gone.
    pub slots_freed: Vec<LeaseId>,
}

/// The order in which waiting builds get their turn ([`WaitReason::LongerFirst`]): the longest
/// expected first (it keeps the machine busy longest) and, of builds expected to run as long,
/// the one more unbuilt derivations need (what it makes ready keeps the machine busy after it).
/// With one slot for a tier's builds, the last of them delays everything that needs it. Only
/// builds expected to run at least [`RANKED_BY_DEPENDENTS_FROM_MS`] are ordered by their
/// dependents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Rank {
    /// How long it is expected to run, milliseconds.
    pub expected_ms: u64,
    /// How many derivations not built yet need it (0 for a shorter build).
    pub dependents: u32,
}

/// How long a build must be expected to run for its dependents to order it, milliseconds.
/// Holding a build back for one that ranks higher costs it up to one of Nix's wake-ups, and
/// Nix a round of requests: that pays for builds that run minutes, not for short ones
/// (bench/dispatch's tier12, 1,000 short light builds: postponed 1,790 times instead of 315,
/// and four requests per build instead of two, when they were ordered so).
pub const RANKED_BY_DEPENDENTS_FROM_MS: u64 = 60_000;

impl Rank {
    /// The rank of a build expected to run `expected_ms` that `dependents` unbuilt derivations
    /// need.
    pub fn new(expected_ms: u64, dependents: u32) -> Rank {
        let dependents = if expected_ms >= RANKED_BY_DEPENDENTS_FROM_MS { dependents } else { 0 };
        Rank { expected_ms, dependents }
    }
}

/// What every lease of a worker reserves at least, when they are all of one tier: whichever of
/// them Nix let go of (or saw end), a build of that tier asking for no more memory fits in its
/// place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlikeLeases {
    /// Their tier.
    pub tier: Tier,
    /// The least memory one of them reserves, MiB.
    pub memory_mib: u64,
}

impl AlikeLeases {
    /// Whether a build claiming `claim` fits in the place of any one of them.
    pub fn make_room_for(&self, claim: &Claim) -> bool {
        claim.tier == self.tier && claim.memory_mib <= self.memory_mib
    }
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start it now: lease `LeaseId` is held for it.
    Admit(LeaseId),
    /// Not now; it was recorded as waiting.
    Wait(WaitReason),
    /// Its worker already holds `max-jobs` leases: Nix parks it itself; nothing was reserved.
    WorkerFull,
}

/// Names one lease for as long as the table lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub u64);

/// A build holding a slot and its memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Its name.
    pub id: LeaseId,
    /// The Nix worker building it.
    pub worker: u32,
    /// The .drv path.
    pub drv: String,
    /// What it reserves.
    pub claim: Claim,
    /// How long it is expected to run, milliseconds.
    pub expected_ms: u64,
    /// When it was admitted (or adopted), milliseconds on the caller's clock.
    pub since_ms: u64,
    /// What its build was last seen using, MiB ([`LeaseTable::in_use`]); 0 until seen.
    pub in_use_mib: u64,
}

impl Lease {
    /// What it claims as the budget counts it: its reservation, or what it uses when that is
    /// more.
    pub fn counted(&self) -> Claim {
        Claim { memory_mib: self.claim.memory_mib.max(self.in_use_mib), ..self.claim }
    }
}

/// A build that was told to wait and is expected to ask again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiter {
    /// The Nix worker asking for it.
    pub worker: u32,
    /// The .drv path.
    pub drv: String,
    /// The derivation's name.
    pub name: String,
    /// What it would reserve.
    pub claim: Claim,
    /// How long it is expected to run, milliseconds.
    pub expected_ms: u64,
    /// How many derivations not built yet need it, once counted ([`LeaseTable::dependents_counted`]).
    pub dependents: Option<u32>,
    /// When it first waited, milliseconds.
    pub since_ms: u64,
    /// When it last asked, milliseconds.
    pub seen_ms: u64,
    /// How long it is remembered without asking again, milliseconds: its worker's
    /// [`waiter_ttl_ms`].
    pub ttl_ms: u64,
    /// What it waits for.
    pub reason: WaitReason,
}

impl Waiter {
    /// Its place in the order of waiting builds.
    pub fn rank(&self) -> Rank {
        Rank::new(self.expected_ms, self.dependents.unwrap_or(0))
    }

    /// When it is forgotten unless it asks again, milliseconds.
    fn due_ms(&self) -> u64 {
        self.seen_ms.saturating_add(self.ttl_ms)
    }
}

/// How long a waiting build is remembered without asking again, milliseconds, for a Nix
/// worker whose `build-poll-interval` is `poll_interval_secs`: three of its retries (at least a
/// second apart, as Nix retries at least every second) and two seconds of slack.
pub fn waiter_ttl_ms(poll_interval_secs: u64) -> u64 {
    (3 * poll_interval_secs.max(1) + 2) * 1000
}

/// How long a Nix worker that holds no lease may not ask before the table forgets it,
/// milliseconds: long enough that a worker whose builds all ran for a while, and ended, is
/// still past its first pass when it asks about what they made ready; short enough that the
/// pids of a daemon's many short-lived workers do not pile up.
const WORKER_FORGOTTEN_MS: u64 = 3_600_000;

/// How often the table looks for workers to forget, milliseconds: not at every decision, which
/// must not go through a daemon's hour of workers.
const WORKERS_SWEPT_EVERY_MS: u64 = 60_000;

/// The leases and waiting builds of one machine.
#[derive(Debug, Clone, Default)]
pub struct LeaseTable {
    leases: Vec<Lease>,
    waiting: Waiting,
    workers: HashMap<u32, Worker>,
    /// When the table last looked for workers to forget, milliseconds.
    workers_swept_ms: u64,
    next_id: u64,
}

/// What the table knows of one Nix worker's asking.
#[derive(Debug, Clone)]
struct Worker {
    /// When it last asked, milliseconds.
    seen_ms: u64,
    /// The builds it has asked about, while it has asked about none twice (its first pass).
    first_pass: Option<HashSet<String>>,
}

impl LeaseTable {
    /// An empty table.
    pub fn new() -> LeaseTable {
        LeaseTable::default()
    }

    /// The builds holding leases, oldest first.
    pub fn leases(&self) -> &[Lease] {
        &self.leases
    }

    /// The builds waiting, first to wait first.
    pub fn waiting(&self) -> impl ExactSizeIterator<Item = &Waiter> {
        self.waiting.by_arrival.values()
    }

    /// The lease `id`, while it lasts.
    pub fn lease(&self, id: LeaseId) -> Option<&Lease> {
        self.leases.iter().find(|l| l.id == id)
    }

    /// Decides `request` at `now_ms` under `build`'s limits, for a worker whose waiting builds
    /// are forgotten unless they ask again within `waiter_ttl_ms` ([`waiter_ttl_ms`]); waiting
    /// builds not seen within their own time-to-live are forgotten first.
    pub fn decide(&mut self, build: &Build, request: &Request, now_ms: u64, waiter_ttl_ms: u64) -> Decision {
        self.waiting.forget_unseen(now_ms);
        let first_pass = self.asked(request, now_ms);
        self.let_go(request.worker, &request.drv);
        let claims: Vec<Claim> = self.leases.iter().map(Lease::counted).collect();
        let waiting_heavy = self.waiting.oldest_heavy_other_than(&request.drv).map(|w| w.claim.memory_mib);
        let room_for_heavy = (first_pass && waiting_heavy.is_none() && !claims.is_empty() && claims.iter().all(|c| c.tier != Tier::Heavy))
            .then_some(build.tiers.heavy.memory_mib);
        let mut verdict = admission::decide(build, &claims, waiting_heavy.or(room_for_heavy), request.claim);
        if let (Some(heavy_mib), Admission::Wait(WaitReason::HeavyWaiting { .. })) = (room_for_heavy, &verdict) {
            verdict = Admission::Wait(WaitReason::HeavyExpected { heavy_mib });
        }
        if verdict == Admission::Admit {
            // A build waiting for its count ranks as needed by none.
            let rank = Rank::new(request.expected_ms, self.waiting.dependents_of(&request.drv).unwrap_or(0));
            let delayed =
                self.delayed_longer_build(build, request, rank, &claims).or_else(|| self.delayed_reservation(build, request, rank, now_ms));
            if let Some(Rank { expected_ms, dependents }) = delayed {
                verdict = Admission::Wait(WaitReason::LongerFirst { expected_ms, dependents });
            }
        }
        let held_by_worker = self.held_by(request.worker, &request.slots_freed).count();
        let worker_full = held_by_worker >= request.worker_max_jobs.max(1) as usize;
        match verdict {
            Admission::Admit if worker_full => {
                self.waiting.remove(&request.drv);
                Decision::WorkerFull
            }
            Admission::Wait(reason)
                if worker_full
                    && self.alike_held(request.worker, &request.slots_freed).is_some_and(|a| a.make_room_for(&request.claim)) =>
            {
                self.waiting.record(request, now_ms, waiter_ttl_ms, reason);
                Decision::WorkerFull
            }
            Admission::Admit => {
                self.waiting.remove(&request.drv);
                let id = LeaseId(self.next_id);
                self.next_id += 1;
                self.leases.push(Lease {
                    id,
                    worker: request.worker,
                    drv: request.drv.clone(),
                    claim: request.claim,
                    expected_ms: request.expected_ms,
                    since_ms: now_ms,
                    in_use_mib: 0,
                });
                Decision::Admit(id)
            }
            Admission::Wait(reason) => {
                self.waiting.record(request, now_ms, waiter_ttl_ms, reason.clone());
                Decision::Wait(reason)
            }
        }
    }

    /// Records that `request`'s worker asked about it at `now_ms`, forgetting first (at most
    /// every [`WORKERS_SWEPT_EVERY_MS`]) the workers that hold no lease and have not asked for
    /// [`WORKER_FORGOTTEN_MS`] either way of `now_ms` (gone; a worker that asks again after that
    /// is in a first pass again); whether that worker is still in its first pass.
    fn asked(&mut self, request: &Request, now_ms: u64) -> bool {
        if now_ms.abs_diff(self.workers_swept_ms) >= WORKERS_SWEPT_EVERY_MS {
            self.workers_swept_ms = now_ms;
            let leases = &self.leases;
            self.workers.retain(|pid, w| now_ms.abs_diff(w.seen_ms) <= WORKER_FORGOTTEN_MS || leases.iter().any(|l| l.worker == *pid));
        }
        let worker = self.workers.entry(request.worker).or_insert_with(|| Worker { seen_ms: now_ms, first_pass: Some(HashSet::new()) });
        worker.seen_ms = now_ms;
        if worker.first_pass.as_mut().is_some_and(|asked| !asked.insert(request.drv.clone())) {
            worker.first_pass = None;
        }
        worker.first_pass.is_some()
    }

    /// The rank of a waiting build that ranks above `request` (of `rank`), could start now, and
    /// could not once `request` is admitted; the highest such.
    fn delayed_longer_build(&self, build: &Build, request: &Request, rank: Rank, claims: &[Claim]) -> Option<Rank> {
        let now = Running::of(claims);
        let with_candidate = now.with(request.claim);
        self.waiting
            .highest_first()
            .take_while(|w| w.rank() > rank)
            .find(|w| {
                admission::decide_among(build, &now, None, w.claim) == Admission::Admit
                    && admission::decide_among(build, &with_candidate, None, w.claim) != Admission::Admit
                    && w.drv != request.drv
            })
            .map(Waiter::rank)
    }

    /// The rank of the highest waiting build that ranks above `request` (of `rank`) and cannot
    /// start now,
    /// if admitting `request` would delay it (backfilling): going by the running builds'
    /// expected ends, `request` would still run when that build could first start, and take
    /// what it needs then. A shorter build that ends first, or fits beside it, goes ahead.
    fn delayed_reservation(&self, build: &Build, request: &Request, rank: Rank, now_ms: u64) -> Option<Rank> {
        let longest = self.waiting.highest_first().take_while(|w| w.rank() > rank).find(|w| w.drv != request.drv)?;
        let mut by_end: Vec<(u64, Claim)> =
            self.leases.iter().map(|l| (l.since_ms.saturating_add(l.expected_ms).max(now_ms), l.counted())).collect();
        by_end.sort_by_key(|(end, _)| *end);
        let claims: Vec<Claim> = by_end.iter().map(|(_, claim)| *claim).collect();
        // The first moment it could start: once the builds expected to end first have ended.
        let ended = (0..=claims.len()).find(|&k| admission::decide(build, &claims[k..], None, longest.claim) == Admission::Admit)?;
        if ended == 0 {
            return None; // it could start now: `delayed_longer_build` decides
        }
        let starts_at = by_end[ended - 1].0;
        if now_ms.saturating_add(request.expected_ms) <= starts_at {
            return None;
        }
        let mut beside = claims[ended..].to_vec();
        beside.push(request.claim);
        (admission::decide(build, &beside, None, longest.claim) != Admission::Admit).then_some(longest.rank())
    }

    /// Counts a build that runs without having been admitted (it started although its worker was
    /// full, or it was found running after a restart), whatever the limits say: it runs. A lease
    /// its worker held for it ends (another worker's stays, as in [`LeaseTable::decide`]).
    pub fn adopt(&mut self, worker: u32, drv: &str, claim: Claim, expected_ms: u64, now_ms: u64) -> LeaseId {
        self.let_go(worker, drv);
        self.waiting.remove(drv);
        let id = LeaseId(self.next_id);
        self.next_id += 1;
        self.leases.push(Lease { id, worker, drv: drv.to_string(), claim, expected_ms, since_ms: now_ms, in_use_mib: 0 });
        id
    }

    /// Lease `id`'s build was seen using `mib` MiB: until it is seen using another figure, the
    /// budget counts that much for it wherever it is more than its reservation.
    pub fn in_use(&mut self, id: LeaseId, mib: u64) {
        if let Some(lease) = self.leases.iter_mut().find(|l| l.id == id) {
            lease.in_use_mib = mib;
        }
    }

    /// Ends the lease `worker` holds for `drv`, if any: that worker has let go of the build, or
    /// started it anew. Another worker's lease of it stays (see the [module docs](self), 1).
    fn let_go(&mut self, worker: u32, drv: &str) {
        self.leases.retain(|l| l.drv != drv || l.worker != worker);
    }

    /// The leases `worker` holds whose builders still run (not in `slots_freed`).
    fn held_by<'a>(&'a self, worker: u32, slots_freed: &'a [LeaseId]) -> impl Iterator<Item = &'a Lease> {
        self.leases.iter().filter(move |l| l.worker == worker && !slots_freed.contains(&l.id))
    }

    /// What the leases `worker` holds (those whose builders still run) reserve at least, when
    /// they are all of one tier.
    pub fn alike_held(&self, worker: u32, slots_freed: &[LeaseId]) -> Option<AlikeLeases> {
        let mut held = self.held_by(worker, slots_freed);
        let first = held.next()?;
        held.try_fold(AlikeLeases { tier: first.claim.tier, memory_mib: first.claim.memory_mib }, |alike, l| {
            (l.claim.tier == alike.tier).then(|| AlikeLeases { memory_mib: alike.memory_mib.min(l.claim.memory_mib), ..alike })
        })
    }

    /// A waiting build was asked about at `now_ms` and answered without the table (its Nix
    /// worker was full): it still waits, and is not forgotten as unseen.
    pub fn still_waiting(&mut self, drv: &str, now_ms: u64) {
        self.waiting.seen(drv, now_ms);
    }

    /// Whether `drv` waits and its dependents are not counted yet: the caller counts them, off
    /// the decisions' path, and tells [`LeaseTable::dependents_counted`].
    pub fn uncounted(&self, drv: &str) -> bool {
        self.waiting.get(drv).is_some_and(|w| w.dependents.is_none())
    }

    /// `drv`, if it waits, is needed by `dependents` derivations not built yet: it takes its
    /// place in the order of waiting builds at once, and keeps the count while it waits.
    pub fn dependents_counted(&mut self, drv: &str, dependents: u32) {
        self.waiting.set_dependents(drv, dependents);
    }

    /// Ends lease `id` (its build's processes are gone); the lease, if it was still held.
    pub fn end(&mut self, id: LeaseId) -> Option<Lease> {
        let at = self.leases.iter().position(|l| l.id == id)?;
        Some(self.leases.remove(at))
    }
}

/// The waiting builds, indexed for what a decision asks of them: thousands may wait while a
/// large closure builds, and a decision must not go through each.
#[derive(Debug, Clone, Default)]
struct Waiting {
    /// Each waiting build under its arrival number (first to wait first).
    by_arrival: BTreeMap<u64, Waiter>,
    /// The arrival number of each waiting .drv.
    by_drv: HashMap<String, u64>,
    /// Heavy waiting builds by (first wait, arrival): the oldest first.
    heavy: BTreeSet<(u64, u64)>,
    /// Waiting builds by rank, and of equal ones the first to arrive last (so that going
    /// backwards meets it first).
    by_rank: BTreeSet<(Rank, Reverse<u64>)>,
    next_arrival: u64,
    /// No waiting build is due to be forgotten before this (its last look plus its
    /// time-to-live), nor was any last seen after `seen_until_ms`: forgetting the unseen goes
    /// through them only when one may be due.
    due_from_ms: u64,
    seen_until_ms: u64,
}

impl Waiting {
    /// Forgets the builds not seen within their time-to-live of `now_ms`, either way (a clock
    /// that steps back leaves stamps in the future).
    fn forget_unseen(&mut self, now_ms: u64) {
        let live = |w: &Waiter| now_ms.saturating_sub(w.seen_ms) <= w.ttl_ms && w.seen_ms <= now_ms.saturating_add(w.ttl_ms);
        // No time-to-live is shorter than a worker's that retries every second.
        let shortest_ttl_ms = waiter_ttl_ms(0);
        if self.by_arrival.is_empty() || (now_ms <= self.due_from_ms && self.seen_until_ms <= now_ms.saturating_add(shortest_ttl_ms)) {
            return;
        }
        let gone: Vec<String> = self.by_arrival.values().filter(|w| !live(w)).map(|w| w.drv.clone()).collect();
        for drv in gone {
            self.remove(&drv);
        }
        self.due_from_ms = self.by_arrival.values().map(Waiter::due_ms).min().unwrap_or(0);
        self.seen_until_ms = self.by_arrival.values().map(|w| w.seen_ms).max().unwrap_or(0);
    }

    /// Records that the waiting build `drv` asked again at `now_ms`, if it waits.
    fn seen(&mut self, drv: &str, now_ms: u64) {
        let Some(waiter) = self.by_drv.get(drv).and_then(|arrival| self.by_arrival.get_mut(arrival)) else { return };
        waiter.seen_ms = now_ms;
        self.seen_until_ms = self.seen_until_ms.max(now_ms);
    }

    /// Records that `request` was told to wait for `reason` at `now_ms`, to be forgotten unless
    /// seen again within `ttl_ms`.
    fn record(&mut self, request: &Request, now_ms: u64, ttl_ms: u64, reason: WaitReason) {
        let (arrival, since_ms, dependents) = match self.remove(&request.drv) {
            Some((arrival, waiter)) => (arrival, waiter.since_ms, waiter.dependents),
            None => {
                self.next_arrival += 1;
                (self.next_arrival, now_ms, None)
            }
        };
        let due_ms = now_ms.saturating_add(ttl_ms);
        if self.by_arrival.is_empty() {
            (self.due_from_ms, self.seen_until_ms) = (due_ms, now_ms);
        }
        self.due_from_ms = self.due_from_ms.min(due_ms);
        self.seen_until_ms = self.seen_until_ms.max(now_ms);
        if request.claim.tier == Tier::Heavy {
            self.heavy.insert((since_ms, arrival));
        }
        self.by_drv.insert(request.drv.clone(), arrival);
        let waiter = Waiter {
            worker: request.worker,
            drv: request.drv.clone(),
            name: request.name.clone(),
            claim: request.claim,
            expected_ms: request.expected_ms,
            dependents,
            since_ms,
            seen_ms: now_ms,
            ttl_ms,
            reason,
        };
        self.by_rank.insert((waiter.rank(), Reverse(arrival)));
        self.by_arrival.insert(arrival, waiter);
    }

    /// Forgets `drv`; its arrival number and what was known of it, if it waited.
    fn remove(&mut self, drv: &str) -> Option<(u64, Waiter)> {
        let arrival = self.by_drv.remove(drv)?;
        let waiter = self.by_arrival.remove(&arrival)?;
        self.heavy.remove(&(waiter.since_ms, arrival));
        self.by_rank.remove(&(waiter.rank(), Reverse(arrival)));
        Some((arrival, waiter))
    }

    /// The waiting build `drv`.
    fn get(&self, drv: &str) -> Option<&Waiter> {
        self.by_arrival.get(self.by_drv.get(drv)?)
    }

    /// How many builds need the waiting build `drv`, if it waits and they were counted.
    fn dependents_of(&self, drv: &str) -> Option<u32> {
        self.get(drv)?.dependents
    }

    /// Sets how many builds need the waiting build `drv`, if it waits.
    fn set_dependents(&mut self, drv: &str, dependents: u32) {
        let Some(&arrival) = self.by_drv.get(drv) else { return };
        let Some(waiter) = self.by_arrival.get_mut(&arrival) else { return };
        self.by_rank.remove(&(waiter.rank(), Reverse(arrival)));
        waiter.dependents = Some(dependents);
        self.by_rank.insert((waiter.rank(), Reverse(arrival)));
    }

    /// The heavy build that has waited longest, other than `drv`.
    fn oldest_heavy_other_than(&self, drv: &str) -> Option<&Waiter> {
        self.heavy.iter().map(|(_, arrival)| &self.by_arrival[arrival]).find(|w| w.drv != drv)
    }

    /// The waiting builds, the highest rank first; of equal ones, the first to wait.
    fn highest_first(&self) -> impl Iterator<Item = &Waiter> {
        self.by_rank.iter().rev().map(|(_, Reverse(arrival))| &self.by_arrival[arrival])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::build;
    use proptest::prelude::*;

    fn request(worker: u32, max_jobs: u32, drv: &str, tier: Tier, expected_ms: u64) -> Request {
        let memory_mib = build().tiers.get(tier).memory_mib;
        Request { worker, worker_max_jobs: max_jobs, drv: drv.into(), name: String::new(), claim: Claim { tier, memory_mib, learned: false }, expected_ms, slots_freed: vec![] }
    }

    /// An empty table whose `workers` have each asked about some build twice, the last time at
    /// `now_ms`: their first pass is over, and no room is kept for a heavy build.
    fn past_first_pass(workers: &[u32], now_ms: u64) -> LeaseTable {
        let mut table = LeaseTable::new();
        for pid in workers {
            table.workers.insert(*pid, Worker { seen_ms: now_ms, first_pass: None });
        }
        table
    }

    #[test]
    fn a_worker_in_its_first_pass_keeps_room_for_a_heavy_build() {
        // Budget 1000 MiB, heavy 600: beside one medium build (300), a second (300) would leave
        // too little for a heavy build the worker may ask about next; a light one (100) does not.
        let b = build();
        let mut table = LeaseTable::new();
        assert!(matches!(table.decide(&b, &request(1, 9, "m1", Tier::Medium, 10), 0, 1000), Decision::Admit(_)));
        assert_eq!(table.decide(&b, &request(1, 9, "m2", Tier::Medium, 10), 1, 1000), Decision::Wait(WaitReason::HeavyExpected { heavy_mib: 600 }));
        assert!(matches!(table.decide(&b, &request(1, 9, "l", Tier::Light, 10), 2, 1000), Decision::Admit(_)));
        // The heavy build comes, and starts at once.
        assert!(matches!(table.decide(&b, &request(1, 9, "h", Tier::Heavy, 10), 3, 1000), Decision::Admit(_)));
        // No heavy build comes: asked again, m2 ends the first pass and starts.
        let mut table = LeaseTable::new();
        table.decide(&b, &request(1, 9, "m1", Tier::Medium, 10), 0, 1000);
        table.decide(&b, &request(1, 9, "m2", Tier::Medium, 10), 1, 1000);
        assert!(matches!(table.decide(&b, &request(1, 9, "m2", Tier::Medium, 10), 2, 1000), Decision::Admit(_)));
        // Another worker's first pass is its own.
        assert_eq!(table.decide(&b, &request(2, 9, "l", Tier::Light, 10), 3, 1000), Decision::Wait(WaitReason::HeavyExpected { heavy_mib: 600 }));
    }

    #[test]
    fn no_room_is_kept_on_an_idle_machine_or_beside_a_heavy_build() {
        let b = build();
        // The first build starts whatever it needs: the machine is never left idle for it.
        let large = Request { claim: Claim { tier: Tier::Medium, memory_mib: 900, learned: false }, ..request(1, 9, "large", Tier::Medium, 10) };
        assert!(matches!(LeaseTable::new().decide(&b, &large, 0, 1000), Decision::Admit(_)));
        // Beside a running heavy build, lighter builds take what is left.
        let mut table = LeaseTable::new();
        table.decide(&b, &request(1, 9, "h", Tier::Heavy, 10), 0, 1000);
        assert!(matches!(table.decide(&b, &request(1, 9, "m", Tier::Medium, 10), 1, 1000), Decision::Admit(_)));
        assert!(matches!(table.decide(&b, &request(1, 9, "l", Tier::Light, 10), 2, 1000), Decision::Admit(_)));
    }

    #[test]
    fn a_worker_is_forgotten_only_long_after_its_last_lease() {
        let b = build();
        let hour = WORKER_FORGOTTEN_MS;
        let mut table = past_first_pass(&[1], 0);
        let Decision::Admit(m1) = table.decide(&b, &request(1, 9, "m1", Tier::Medium, 10), 0, 1000) else { panic!() };
        // Quiet for longer than that, but holding a lease: still past its first pass.
        assert!(matches!(table.decide(&b, &request(1, 9, "m2", Tier::Medium, 10), hour + 1, 1000), Decision::Admit(_)));
        let m2 = table.leases()[1].id;
        table.end(m1);
        table.end(m2);
        // Its builds ended a moment ago: what they made ready is not its first pass.
        table.decide(&b, &request(1, 9, "m3", Tier::Medium, 10), hour + 2, 1000);
        assert!(matches!(table.decide(&b, &request(1, 9, "m4", Tier::Medium, 10), hour + 3, 1000), Decision::Admit(_)));
        let ids: Vec<LeaseId> = table.leases().iter().map(|l| l.id).collect();
        ids.into_iter().for_each(|id| _ = table.end(id));
        // Gone for that long without a lease: a worker with its pid starts a first pass.
        table.decide(&b, &request(1, 9, "m5", Tier::Medium, 10), 2 * hour + 4, 1000);
        assert_eq!(table.decide(&b, &request(1, 9, "m6", Tier::Medium, 10), 2 * hour + 5, 1000), Decision::Wait(WaitReason::HeavyExpected { heavy_mib: 600 }));
    }

    #[test]
    fn a_shorter_build_goes_ahead_of_a_longer_waiting_one_only_if_it_does_not_delay_it() {
        // Budget 1000 MiB. Running: a (300 MiB, ends at 10 s) and b (300 MiB, ends at 100 s).
        // Waiting: long (600 MiB, 1000 s), which can start once a has ended, at 10 s.
        let claim = |memory_mib| Claim { tier: Tier::Light, memory_mib, learned: false };
        let ask = |table: &mut LeaseTable, drv: &str, memory_mib, expected_ms, now| {
            let request = Request { worker: 1, worker_max_jobs: 12, drv: drv.into(), name: String::new(), claim: claim(memory_mib), expected_ms, slots_freed: vec![] };
            table.decide(&build(), &request, now, 60_000)
        };
        let setup = || {
            let mut table = past_first_pass(&[1, 2], 0);
            assert!(matches!(ask(&mut table, "a", 300, 10_000, 0), Decision::Admit(_)));
            assert!(matches!(ask(&mut table, "b", 300, 100_000, 0), Decision::Admit(_)));
            assert!(matches!(ask(&mut table, "long", 600, 1_000_000, 1000), Decision::Wait(WaitReason::Memory { .. })));
            table
        };
        // Ends before 10 s: goes ahead.
        assert!(matches!(ask(&mut setup(), "quick", 100, 5000, 2000), Decision::Admit(_)));
        // Runs past 10 s but fits beside b and long then: goes ahead.
        assert!(matches!(ask(&mut setup(), "small", 100, 60_000, 2000), Decision::Admit(_)));
        // Runs past 10 s and would leave long without room: waits for it.
        assert_eq!(ask(&mut setup(), "large", 200, 60_000, 2000), Decision::Wait(WaitReason::LongerFirst { expected_ms: 1_000_000, dependents: 0 }));
    }

    #[test]
    fn a_full_worker_reserves_nothing() {
        let mut table = LeaseTable::new();
        let b = build();
        assert!(matches!(table.decide(&b, &request(1, 1, "a", Tier::Light, 10), 0, 1000), Decision::Admit(_)));
        assert_eq!(table.decide(&b, &request(1, 1, "b", Tier::Light, 10), 0, 1000), Decision::WorkerFull);
        assert_eq!(table.leases().len(), 1);
        assert_eq!(table.waiting().len(), 0);
        // Another worker is not full.
        assert!(matches!(table.decide(&b, &request(2, 1, "b", Tier::Light, 10), 0, 1000), Decision::Admit(_)));
    }

    #[test]
    fn a_waiting_build_answered_without_the_table_is_not_forgotten() {
        let mut table = LeaseTable::new();
        let b = build();
        assert!(matches!(table.decide(&b, &request(1, 4, "h1", Tier::Heavy, 10), 0, 1000), Decision::Admit(_)));
        assert!(matches!(table.decide(&b, &request(1, 4, "h2", Tier::Heavy, 10), 0, 1000), Decision::Wait(_)));
        table.still_waiting("h2", 900);
        table.still_waiting("unknown", 900);
        // 1,500 ms after it was told to wait, 600 ms after it was last asked about: still waiting.
        assert!(matches!(table.decide(&b, &request(2, 4, "l", Tier::Light, 10), 1500, 1000), Decision::Admit(_)));
        assert_eq!(table.waiting().map(|w| w.drv.as_str()).collect::<Vec<_>>(), ["h2"]);
        // Unseen for longer than the time-to-live: forgotten.
        assert!(matches!(table.decide(&b, &request(2, 4, "l2", Tier::Light, 10), 2000, 1000), Decision::Admit(_)));
        assert_eq!(table.waiting().len(), 0);
    }

    #[test]
    fn a_full_worker_whose_leases_could_each_make_room_declines_a_held_back_build() {
        // The light tier allows 4; worker 1 (max-jobs 4) holds all four.
        let mut table = LeaseTable::new();
        let b = build();
        for drv in ["a", "b", "c", "d"] {
            assert!(matches!(table.decide(&b, &request(1, 4, drv, Tier::Light, 10), 0, 1000), Decision::Admit(_)));
        }
        // A fifth light build of the same worker: Nix starts it only instead of one of the four.
        assert_eq!(table.decide(&b, &request(1, 4, "e", Tier::Light, 10), 1, 1000), Decision::WorkerFull);
        assert_eq!(table.waiting().len(), 1, "it keeps its place among the waiting");
        // Asking for more memory than they hold, it could outgrow the budget: it waits.
        let mut larger = request(1, 4, "f", Tier::Light, 10);
        larger.claim.memory_mib += 1;
        assert!(matches!(table.decide(&b, &larger, 1, 1000), Decision::Wait(_)));
        // Another worker's build waits for the tier.
        assert!(matches!(table.decide(&b, &request(2, 4, "g", Tier::Light, 10), 1, 1000), Decision::Wait(WaitReason::TierFull { .. })));
    }

    #[test]
    fn a_slot_freed_by_an_exited_builder_is_the_workers_again() {
        let mut table = LeaseTable::new();
        let b = build();
        let Decision::Admit(first) = table.decide(&b, &request(1, 1, "a", Tier::Light, 10), 0, 1000) else { panic!() };
        let mut next = request(1, 1, "b", Tier::Light, 10);
        next.slots_freed = vec![first];
        assert!(matches!(table.decide(&b, &next, 1, 1000), Decision::Admit(_)));
        // The first lease still counts against the tier and the budget until it ends.
        assert_eq!(table.leases().len(), 2);
    }

    #[test]
    fn a_waiting_build_is_forgotten_by_its_own_workers_time_to_live() {
        let mut table = past_first_pass(&[1, 2], 0);
        let b = build();
        assert!(matches!(table.decide(&b, &request(1, 4, "h1", Tier::Heavy, 10), 0, 1000), Decision::Admit(_)));
        // Worker 1 retries every 5 s; worker 2 every second.
        assert!(matches!(table.decide(&b, &request(1, 4, "h2", Tier::Heavy, 10), 0, waiter_ttl_ms(5)), Decision::Wait(_)));
        assert!(matches!(table.decide(&b, &request(2, 4, "h3", Tier::Heavy, 10), 0, waiter_ttl_ms(0)), Decision::Wait(_)));
        // 6 s on, worker 2 asks about another build: its own waiting build is forgotten, worker 1's
        // is not (it has not missed a retry of its own).
        assert!(matches!(table.decide(&b, &request(2, 4, "l", Tier::Light, 10), 6000, waiter_ttl_ms(0)), Decision::Admit(_)));
        assert_eq!(table.waiting().map(|w| w.drv.as_str()).collect::<Vec<_>>(), ["h2"]);
        assert!(matches!(table.decide(&b, &request(2, 4, "l2", Tier::Light, 10), waiter_ttl_ms(5) + 1, waiter_ttl_ms(0)), Decision::Admit(_)));
        assert_eq!(table.waiting().len(), 0);
    }

    #[test]
    fn another_workers_lease_of_the_same_build_stays() {
        // Worker 1 was killed while its heavy build's children still run; worker 2, waiting on the
        // same build's output locks, asks about it.
        let mut table = LeaseTable::new();
        let b = build();
        let Decision::Admit(first) = table.decide(&b, &request(1, 4, "h", Tier::Heavy, 10), 0, 1000) else { panic!() };
        assert!(matches!(table.decide(&b, &request(2, 4, "h", Tier::Heavy, 10), 5, 1000), Decision::Wait(WaitReason::TierFull { .. })));
        assert!(table.lease(first).is_some());
        // Once the leftovers are gone, it starts.
        table.end(first);
        assert!(matches!(table.decide(&b, &request(2, 4, "h", Tier::Heavy, 10), 10, 1000), Decision::Admit(_)));
        // Found running without a lease by worker 3, it is counted beside worker 2's.
        table.adopt(3, "h", request(3, 4, "h", Tier::Heavy, 10).claim, 10, 20);
        assert_eq!(table.leases().len(), 2);
    }

    #[test]
    fn asked_again_the_old_lease_ends() {
        let mut table = LeaseTable::new();
        let b = build();
        let Decision::Admit(first) = table.decide(&b, &request(1, 4, "h", Tier::Heavy, 10), 0, 1000) else { panic!() };
        let Decision::Admit(second) = table.decide(&b, &request(1, 4, "h", Tier::Heavy, 10), 5, 1000) else { panic!() };
        assert_ne!(first, second);
        assert_eq!(table.leases().len(), 1);
        assert_eq!(table.end(first), None);
        assert!(table.end(second).is_some());
    }

    #[test]
    fn of_builds_expected_to_run_as_long_the_one_more_builds_need_starts_first() {
        let b = build();
        let mut table = past_first_pass(&[1], 0);
        let heavy = |drv: &str| request(1, 9, drv, Tier::Heavy, 60_000);
        // The one heavy slot is held; two heavy builds wait, the first to ask needed by fewer
        // (not yet counted when they first ask).
        let Decision::Admit(running) = table.decide(&b, &heavy("running"), 0, 10_000) else { panic!() };
        assert!(matches!(table.decide(&b, &heavy("few"), 1, 10_000), Decision::Wait(WaitReason::TierFull { .. })));
        assert!(matches!(table.decide(&b, &heavy("many"), 2, 10_000), Decision::Wait(WaitReason::TierFull { .. })));
        table.end(running);
        // Counted while they wait: "many" takes its place at once.
        table.dependents_counted("many", 10);
        table.dependents_counted("few", 2);
        table.dependents_counted("unknown", 99);
        // The slot is free; "few", asked first (Nix asks in the order of names), waits.
        let Decision::Wait(reason) = table.decide(&b, &heavy("few"), 3, 10_000) else { panic!() };
        assert_eq!(reason, WaitReason::LongerFirst { expected_ms: 60_000, dependents: 10 });
        assert_eq!(reason.to_string(), "a waiting build expected to take 60 s and needed by 10 unbuilt derivations starts first");
        assert!(matches!(table.decide(&b, &heavy("many"), 4, 10_000), Decision::Admit(_)));
    }

    #[test]
    fn short_builds_are_not_ordered_by_their_dependents() {
        let b = build();
        let mut table = past_first_pass(&[1], 0);
        let short = |drv: &str| request(1, 9, drv, Tier::Medium, RANKED_BY_DEPENDENTS_FROM_MS - 1);
        // Both medium slots held; one build that ten others need waits.
        let Decision::Admit(running) = table.decide(&b, &short("m1"), 0, 10_000) else { panic!() };
        table.decide(&b, &short("m2"), 0, 10_000);
        assert!(matches!(table.decide(&b, &short("many"), 1, 10_000), Decision::Wait(WaitReason::TierFull { .. })));
        table.dependents_counted("many", 10);
        table.end(running);
        // A slot is free: the first to ask takes it.
        assert!(matches!(table.decide(&b, &short("few"), 2, 10_000), Decision::Admit(_)));
    }

    #[test]
    fn a_longer_waiting_build_keeps_its_place() {
        let b = build();
        let mut table = past_first_pass(&[1, 2], 0);
        // Two medium builds hold the medium slots; a long medium build waits.
        table.decide(&b, &request(1, 9, "m1", Tier::Medium, 1000), 0, 10_000);
        table.decide(&b, &request(1, 9, "m2", Tier::Medium, 1000), 0, 10_000);
        assert!(matches!(table.decide(&b, &request(1, 9, "long", Tier::Medium, 60_000), 1, 10_000), Decision::Wait(_)));
        let m1 = table.leases()[0].id;
        table.end(m1);
        // Now "long" could start; a shorter medium build that would take its slot waits ...
        assert!(matches!(
            table.decide(&b, &request(2, 9, "short", Tier::Medium, 500), 2, 10_000),
            Decision::Wait(WaitReason::LongerFirst { expected_ms: 60_000, dependents: 0 })
        ));
        // ... a light build that leaves room for it does not ...
        assert!(matches!(table.decide(&b, &request(2, 9, "light", Tier::Light, 500), 3, 10_000), Decision::Admit(_)));
        // ... and "long" starts when it asks.
        assert!(matches!(table.decide(&b, &request(1, 9, "long", Tier::Medium, 60_000), 4, 10_000), Decision::Admit(_)));
    }

    #[test]
    fn a_waiter_that_stops_asking_is_forgotten() {
        let b = build();
        let mut table = LeaseTable::new();
        table.decide(&b, &request(1, 9, "m1", Tier::Medium, 1000), 0, 1000);
        table.decide(&b, &request(1, 9, "m2", Tier::Medium, 1000), 0, 1000);
        table.decide(&b, &request(1, 9, "long", Tier::Medium, 60_000), 0, 1000);
        let m1 = table.leases()[0].id;
        table.end(m1);
        assert!(matches!(table.decide(&b, &request(2, 9, "short", Tier::Medium, 500), 5000, 1000), Decision::Admit(_)));
    }

    #[test]
    fn a_waiter_stamped_in_the_future_is_forgotten() {
        let b = build();
        let mut table = past_first_pass(&[1], 100_000_000);
        // Heavy waits for memory held by two medium builds; it would hold a light build back.
        table.decide(&b, &request(1, 9, "m1", Tier::Medium, 1), 100_000_000, 1000);
        table.decide(&b, &request(1, 9, "m2", Tier::Medium, 1), 100_000_000, 1000);
        table.decide(&b, &request(1, 9, "heavy", Tier::Heavy, 1), 100_000_000, 1000);
        assert!(matches!(table.decide(&b, &request(1, 9, "l", Tier::Light, 1), 100_000_000, 1000), Decision::Wait(_)));
        // The clock steps back a day: the waiter's stamp is far in the future, and it goes.
        assert!(matches!(table.decide(&b, &request(1, 9, "l", Tier::Light, 1), 100_000_000 - 86_400_000, 1000), Decision::Admit(_)));
    }

    /// One step of a random run: a `try` or the end of a lease.
    #[derive(Debug, Clone)]
    enum Step {
        Try { worker: u32, max_jobs: u32, drv: u8, tier: Tier, memory_mib: u64, expected_ms: u64 },
        End(usize),
        Adopt { worker: u32, drv: u8 },
        /// The build of the lease at this index is seen using this much.
        InUse(usize, u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        let tier = prop_oneof![Just(Tier::Heavy), Just(Tier::Medium), Just(Tier::Light)];
        prop_oneof![
            4 => (1u32..4, 1u32..5, 0u8..30, tier, 1u64..1500, 1u64..100_000).prop_map(
                |(worker, max_jobs, drv, tier, memory_mib, expected_ms)| Step::Try { worker, max_jobs, drv, tier, memory_mib, expected_ms }
            ),
            2 => (0usize..8).prop_map(Step::End),
            1 => (1u32..4, 100u8..110).prop_map(|(worker, drv)| Step::Adopt { worker, drv }),
            1 => (0usize..8, 0u64..2000).prop_map(|(i, mib)| Step::InUse(i, mib)),
        ]
    }

    proptest! {
        /// Whatever the order of requests, ends and builds outgrowing their reservations:
        /// admitted builds keep every tier within its maxJobs, a build is admitted only if the
        /// running builds (each at its reservation or what it uses, if more) and it fit in the
        /// budget (or it runs alone), no worker holds more admitted leases than its max-jobs,
        /// and a drv holds at most one lease per worker.
        #[test]
        fn limits_are_never_exceeded(steps in proptest::collection::vec(step(), 1..200)) {
            let b = build();
            let mut table = LeaseTable::new();
            let mut max_jobs = std::collections::HashMap::new();
            let mut adopted = std::collections::HashSet::new();
            for (now, s) in steps.into_iter().enumerate() {
                let now = now as u64 * 10;
                match s {
                    Step::Try { worker, max_jobs: m, drv, tier, memory_mib, expected_ms } => {
                        let m = *max_jobs.entry(worker).or_insert(m);
                        let r = Request { worker, worker_max_jobs: m, drv: format!("d{drv}"), name: String::new(), claim: Claim { tier, memory_mib, learned: false }, expected_ms, slots_freed: vec![] };
                        let before = table.leases().len();
                        let decision = table.decide(&b, &r, now, 50);
                        if let Decision::Admit(id) = decision {
                            prop_assert!(table.lease(id).is_some());
                            let counted: u64 = table.leases().iter().map(|l| l.counted().memory_mib).sum();
                            let adopted_mib: u64 =
                                table.leases().iter().filter(|l| adopted.contains(&l.id)).map(|l| l.counted().memory_mib).sum();
                            prop_assert!(counted <= b.memory_budget_mib + adopted_mib || table.leases().len() == 1, "{counted} MiB counted");
                        } else {
                            prop_assert!(table.leases().len() <= before);
                        }
                    }
                    Step::End(i) => {
                        if let Some(id) = table.leases().get(i).map(|l| l.id) {
                            adopted.remove(&id);
                            prop_assert!(table.end(id).is_some());
                        }
                    }
                    Step::Adopt { worker, drv } => {
                        max_jobs.entry(worker).or_insert(4);
                        let id = table.adopt(worker, &format!("a{drv}"), Claim { tier: Tier::Light, memory_mib: 1, learned: false }, 1, now);
                        adopted.insert(id);
                    }
                    Step::InUse(i, mib) => {
                        if let Some(id) = table.leases().get(i).map(|l| l.id) {
                            table.in_use(id, mib);
                        }
                    }
                }
                // Adopted builds run whatever the limits; the rest is checked without them,
                // since admission counted them like any other.
                let admitted: Vec<&Lease> = table.leases().iter().filter(|l| !adopted.contains(&l.id)).collect();
                let all = table.leases();
                for tier in Tier::ALL {
                    let n = all.iter().filter(|l| l.claim.tier == tier).count() as u32;
                    let adopted_n = all.iter().filter(|l| l.claim.tier == tier && adopted.contains(&l.id)).count() as u32;
                    prop_assert!(n <= b.tiers.get(tier).max_jobs + adopted_n, "{tier}: {n} running");
                }
                let reserved: u64 = all.iter().map(|l| l.claim.memory_mib).sum();
                let adopted_mib: u64 = all.iter().filter(|l| adopted.contains(&l.id)).map(|l| l.claim.memory_mib).sum();
                prop_assert!(reserved <= b.memory_budget_mib + adopted_mib || admitted.len() == 1, "{reserved} MiB reserved");
                for (worker, m) in &max_jobs {
                    let held = admitted.iter().filter(|l| l.worker == *worker).count() as u32;
                    prop_assert!(held <= *m, "worker {worker} holds {held} of {m}");
                }
                let mut drvs: Vec<(u32, &str)> = all.iter().map(|l| (l.worker, l.drv.as_str())).collect();
                drvs.sort();
                let n = drvs.len();
                drvs.dedup();
                prop_assert_eq!(drvs.len(), n);
            }
        }
    }
}
