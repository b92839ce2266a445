//! Predicting a build run: the runtime's own admission policy ([`LeaseTable`]) over a DAG of
//! builds in simulated time, on a described machine.
//!
//! # The model
//!
//! One Nix worker builds every job of a DAG (as `nix-store --realise --keep-going` does):
//!
//! * **Nix's side.** A job is *ready* once its dependencies are built. At each wake-up Nix goes
//!   through its ready goals in the order of their keys (Nix orders goals by derivation name),
//!   and stops at the first that finds its `max-jobs` slots all taken. Each goal asks the hook
//!   ([`Nix::try_ms`] each), and an admitted build starts after [`Nix::start_ms`] (forking the
//!   builder, setting up its sandbox; one after another within a wake-up). A build that ended
//!   frees its slot and makes its dependents ready [`Nix::finish_ms`] later (registering its
//!   outputs), and wakes Nix. A postponed goal asks again at every wake-up when
//!   `build-poll-interval` is 0, and at least once a second; otherwise only when the interval's
//!   timer fires.
//! * **The hook's side** is [`LeaseTable::decide`] with the profile's [`Build`] section,
//!   exactly as the broker calls it: the claim is the job's tier and its reservation
//!   ([`learning::reservation`] of the peaks its history has, else the tier's `memoryMiB`), the
//!   expected duration its history's (else [`learning::guessed_wall_ms`]). A build whose peak
//!   exceeds its reservation is counted at its peak (at most its limit) from its start, as the
//!   broker counts it once its watcher sees it using more ([`LeaseTable::in_use`]). A lease ends
//!   when its builder exits.
//! * **The machine.** A build with a known CPU time wants `cpu_ms / wall_ms` threads on average
//!   over its run (its parallelism). While the running builds together want more threads than
//!   the machine has, each progresses at `threads / wanted` of its speed (the kernel shares the
//!   CPU fairly); a build without a CPU time wants none. A running build holds its peak memory
//!   for its whole run. With the hook,
//!   a build whose peak exceeds its limit ([`learning::Reservation::limit_mib`]) is killed at it
//!   (counted at the end of its run: real builds reach their peaks late). When the builds together hold more
//!   than the machine's memory, everything stalls for [`Setup::oom_kill_ms`] while the kernel
//!   reclaims, then its OOM killer ends the largest; and again while they still hold too much.
//!   A failed build's dependents are never built.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt;

use serde::Serialize;

use crate::admission::{Claim, WaitReason};
use crate::leases::{Decision, LeaseId, LeaseTable, Rank, Request};
use crate::learning::{self, ReservationSource};
use crate::{Build, Tier};

/// One build of the DAG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Its derivation name (Nix orders its goals by it).
    pub name: String,
    /// Its tier.
    pub tier: Tier,
    /// How long it runs, milliseconds.
    pub wall_ms: u64,
    /// Its memory peak, MiB.
    pub peak_mib: u64,
    /// The CPU time it uses, milliseconds, when known.
    pub cpu_ms: Option<u64>,
    /// What the runtime knows of its package from the history, if anything.
    pub known: Option<Known>,
    /// The jobs it needs built first, as indices of earlier jobs.
    pub deps: Vec<usize>,
}

/// What the history says of a job's package, as the runtime reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// Its expected duration, milliseconds (`Learned::expected_wall_ms`).
    pub expected_ms: u64,
    /// The peaks its reservation is learned from, newest first (`Learned::peaks`).
    pub peaks_mib: Vec<u64>,
}

/// The machine and the Nix that builds on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    /// Hardware threads, for the CPU utilisation.
    pub threads: u32,
    /// Memory the builds may use before the kernel's OOM killer strikes, MiB.
    pub memory_mib: u64,
    /// How long the kernel takes to end a build once the builds hold more than `memory_mib`,
    /// milliseconds: it reclaims what it can first, and every build and Nix stall meanwhile.
    pub oom_kill_ms: u64,
    /// How Nix runs builds.
    pub nix: Nix,
    /// The profile's build section when nix-tier-hook admits the builds; `None` for Nix alone.
    pub hook: Option<Build>,
}

/// Nix's settings and its own costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nix {
    /// `max-jobs`.
    pub max_jobs: u32,
    /// `build-poll-interval`, seconds.
    pub poll_interval_secs: u64,
    /// Time one `try` of the hook takes, milliseconds.
    pub try_ms: u64,
    /// From the decision to start a build to its builder running, milliseconds.
    pub start_ms: u64,
    /// From a builder's exit to its slot being free and its dependents ready, milliseconds.
    pub finish_ms: u64,
}

impl Nix {
    /// Nix with `max_jobs` and `build-poll-interval = 0` (docs/hook.md), with the costs measured
    /// by bench/scheduling on a two-core machine.
    pub fn with_max_jobs(max_jobs: u32) -> Nix {
        Nix { max_jobs, poll_interval_secs: 0, try_ms: 0, start_ms: 5, finish_ms: 5 }
    }
}

/// How a job's build ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// It succeeded.
    Built,
    /// Its peak exceeded its reservation: the hook's cgroup limit killed it.
    OverLimit,
    /// The builds together exceeded the machine's memory and the kernel killed this one.
    OomKilled,
    /// A dependency failed: it never started.
    NotBuilt,
}

/// One job's run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    /// When its dependencies were all built, milliseconds.
    pub ready_ms: Option<u64>,
    /// When its builder started.
    pub start_ms: Option<u64>,
    /// When its builder ended.
    pub end_ms: Option<u64>,
    /// The memory the hook reserved for it, MiB (with the hook).
    #[serde(rename = "reservedMiB")]
    pub reserved_mib: Option<u64>,
    /// Its memory limit, MiB (with the hook): its reservation's, or more when learned.
    #[serde(rename = "limitMiB")]
    pub limit_mib: Option<u64>,
    /// Whether that reservation was learned.
    pub learned: bool,
    /// How it ended.
    pub outcome: Outcome,
}

impl Run {
    /// How long it was ready and not started, milliseconds.
    pub fn waited_ms(&self) -> Option<u64> {
        Some(self.start_ms?.saturating_sub(self.ready_ms?))
    }
}

/// The waits of one tier's builds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TierWaits {
    /// Builds of the tier that started.
    pub builds: u32,
    /// Of those, the ones that waited more than a second.
    pub waited: u32,
    /// Their waits together, milliseconds.
    pub total_ms: u64,
    /// The longest wait, milliseconds.
    pub longest_ms: u64,
}

/// The predicted run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Prediction {
    /// Each job's run, in the order of the jobs.
    pub runs: Vec<Run>,
    /// From the start until Nix is done, milliseconds.
    pub makespan_ms: u64,
    /// Most builds running at once.
    pub most_at_once: u32,
    /// The largest memory the builds held at once, MiB.
    #[serde(rename = "peakMemoryMiB")]
    pub peak_memory_mib: u64,
    /// The largest memory the hook reserved at once, MiB.
    #[serde(rename = "peakReservedMiB")]
    pub peak_reserved_mib: u64,
    /// The memory the builds may hold: the hook's budget, else the machine's memory, MiB.
    #[serde(rename = "memoryBudgetMiB")]
    pub memory_budget_mib: u64,
    /// The memory held on average over the makespan, as a fraction of the budget.
    pub memory_utilisation: f64,
    /// The CPU time used over the makespan, as a fraction of the threads, when every built
    /// job's CPU time is known.
    pub cpu_utilisation: Option<f64>,
    /// The waits per tier.
    pub waits: BTreeMap<Tier, TierWaits>,
}

impl Prediction {
    /// How many jobs ended with `outcome`.
    pub fn count(&self, outcome: Outcome) -> usize {
        self.runs.iter().filter(|r| r.outcome == outcome).count()
    }
}

/// A DAG the simulation cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimulateError {
    /// A dependency is not an earlier job.
    #[error("job {job} (\"{name}\") depends on job {dep}, which is not listed before it; list every build after its dependencies")]
    DependencyOrder {
        /// The job's index.
        job: usize,
        /// Its name.
        name: String,
        /// The dependency's index.
        dep: usize,
    },
    /// `max-jobs = 0`: Nix could build nothing locally.
    #[error("max-jobs is 0: Nix would build nothing locally; give at least 1")]
    NoJobs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// Nix runs its ready goals; `timer` when the poll timer fired.
    Wake { timer: bool },
    /// A builder starts.
    Start(usize),
    /// A builder would exit, if its run has not been re-timed since (its `timing`) and the OOM
    /// killer has not ended it first.
    Exit(usize, u64),
    /// Nix has seen a builder's exit: its slot is free, its dependents ready if it succeeded.
    Finish(usize),
    /// The OOM killer ends the largest build, after the stall.
    OomKill,
}

/// The one Nix worker the simulation builds with.
const WORKER: u32 = 1;

/// Runs `jobs` on `setup`; see the [module docs](self) for the model.
pub fn simulate(jobs: &[Job], setup: &Setup) -> Result<Prediction, SimulateError> {
    if setup.nix.max_jobs == 0 {
        return Err(SimulateError::NoJobs);
    }
    for (index, job) in jobs.iter().enumerate() {
        if let Some(&dep) = job.deps.iter().find(|&&d| d >= index) {
            return Err(SimulateError::DependencyOrder { job: index, name: job.name.clone(), dep });
        }
    }
    Ok(Simulation::new(jobs, setup).run())
}

struct Simulation<'a> {
    jobs: &'a [Job],
    setup: &'a Setup,
    runs: Vec<Run>,
    /// Keys of the jobs as the table knows them.
    keys: Vec<String>,
    /// What each job asks the hook for: its claim, and its rank once its dependents are counted
    /// (with the hook); and its memory limit.
    requests: Vec<(Claim, Rank, u64)>,
    dependents: Vec<Vec<usize>>,
    missing_deps: Vec<usize>,
    /// Each job's place in Nix's order of goals (by name), and the job at each place.
    rank: Vec<usize>,
    by_rank: Vec<usize>,
    /// Ready goals not started, by rank.
    ready: BTreeSet<usize>,
    /// Per job, whether it was asked about and told to wait.
    postponed: Vec<bool>,
    postponed_count: usize,
    leases: BTreeMap<usize, LeaseId>,
    /// Per tier and whether the reservation was learned: waits the table gave since the leases
    /// last changed, by which a postponed build's retry is answered without asking.
    known_waits: [[KnownWaits; 2]; 3],
    running: BTreeSet<usize>,
    /// Per job, the work left (milliseconds of its run at full speed) as of `progress_at`.
    work_left: Vec<f64>,
    /// Per job, how many times its exit was re-timed: earlier `Exit` events are stale.
    timing: Vec<u64>,
    /// The speed of the running builds that want CPU (1 unless it is oversubscribed), and
    /// since when.
    speed: f64,
    progress_at: u64,
    /// Builds Nix counts against `max-jobs`: started or starting, not yet finished.
    local_builds: u32,
    table: LeaseTable,
    events: BinaryHeap<Reverse<(u64, u64, Event)>>,
    sequence: u64,
    /// The memory held and reserved now, and when it last changed, for the averages.
    held_mib: u64,
    held_area: u128,
    held_since: u64,
    peak_held: u64,
    peak_reserved: u64,
    most_at_once: u32,
    timer_pending: bool,
    /// Whether the leases changed since the postponed builds were last all asked again (and none
    /// admitted): until they do, asking again gets the same answers, and Nix's timer changes
    /// nothing.
    retry_due: bool,
    /// Whether the builds hold more memory than the machine has and everything stalls until the
    /// OOM killer strikes.
    stalled: bool,
    /// Until when Nix's worker (one thread) is busy starting and finishing builds.
    worker_busy_until: u64,
    now: u64,
}

impl<'a> Simulation<'a> {
    fn new(jobs: &'a [Job], setup: &'a Setup) -> Simulation<'a> {
        let mut dependents = vec![Vec::new(); jobs.len()];
        for (index, job) in jobs.iter().enumerate() {
            for &dep in &job.deps {
                dependents[dep].push(index);
            }
        }
        let mut by_rank: Vec<usize> = (0..jobs.len()).collect();
        by_rank.sort_by(|&a, &b| jobs[a].name.cmp(&jobs[b].name).then(a.cmp(&b)));
        let mut rank = vec![0; jobs.len()];
        for (at, &index) in by_rank.iter().enumerate() {
            rank[index] = at;
        }
        let runs = jobs
            .iter()
            .map(|_| Run { ready_ms: None, start_ms: None, end_ms: None, reserved_mib: None, limit_mib: None, learned: false, outcome: Outcome::NotBuilt })
            .collect();
        Simulation {
            jobs,
            setup,
            runs,
            keys: (0..jobs.len()).map(|i| i.to_string()).collect(),
            requests: jobs.iter().zip(&dependents).map(|(job, needing)| request(setup.hook.as_ref(), job, needing.len())).collect(),
            rank,
            by_rank,
            dependents,
            missing_deps: jobs.iter().map(|j| j.deps.iter().collect::<BTreeSet<_>>().len()).collect(),
            ready: BTreeSet::new(),
            postponed: vec![false; jobs.len()],
            postponed_count: 0,
            leases: BTreeMap::new(),
            known_waits: Default::default(),
            running: BTreeSet::new(),
            work_left: jobs.iter().map(|j| j.wall_ms as f64).collect(),
            timing: vec![0; jobs.len()],
            speed: 1.0,
            progress_at: 0,
            local_builds: 0,
            table: LeaseTable::new(),
            events: BinaryHeap::new(),
            sequence: 0,
            held_mib: 0,
            held_area: 0,
            held_since: 0,
            peak_held: 0,
            peak_reserved: 0,
            most_at_once: 0,
            timer_pending: false,
            retry_due: false,
            stalled: false,
            worker_busy_until: 0,
            now: 0,
        }
    }

    fn at(&mut self, time: u64, event: Event) {
        self.sequence += 1;
        self.events.push(Reverse((time, self.sequence, event)));
    }

    fn run(mut self) -> Prediction {
        for index in 0..self.jobs.len() {
            if self.missing_deps[index] == 0 {
                self.make_ready(index);
            }
        }
        self.at(0, Event::Wake { timer: false });
        let mut done = 0;
        while let Some(Reverse((time, _, event))) = self.events.pop() {
            self.now = time;
            match event {
                Event::Wake { timer } => self.wake(timer),
                Event::Start(job) => self.start(job),
                Event::Exit(job, timing) if timing == self.timing[job] => self.exit(job),
                Event::Exit(..) => {}
                Event::Finish(job) => {
                    done = time;
                    self.finish(job);
                }
                Event::OomKill => self.oom_kill(),
            }
        }
        self.prediction(done)
    }

    fn make_ready(&mut self, index: usize) {
        self.runs[index].ready_ms = Some(self.now);
        self.ready.insert(self.rank[index]);
    }

    /// Nix's worker loop over its ready goals.
    fn wake(&mut self, timer: bool) {
        if timer {
            self.timer_pending = false;
        }
        let setup: &'a Setup = self.setup;
        let nix = &setup.nix;
        let retry_postponed = timer || nix.poll_interval_secs == 0;
        self.known_waits = Default::default();
        let mut cursor = self.now.max(self.worker_busy_until);
        let (mut all_asked, mut admitted) = (true, false);
        let goals: Vec<usize> = self.ready.iter().copied().collect();
        for at in goals {
            let index = self.by_rank[at];
            if self.local_builds >= nix.max_jobs {
                all_asked = false;
                break;
            }
            let postponed = self.postponed[index];
            if postponed && !retry_postponed {
                continue;
            }
            if let Some(build) = &setup.hook {
                cursor += nix.try_ms;
                let (claim, rank, limit_mib) = self.requests[index];
                if postponed && self.known_waits[claim.tier.index()][usize::from(claim.learned)].cover(claim, rank) {
                    continue;
                }
                let request = Request {
                    worker: WORKER,
                    worker_max_jobs: nix.max_jobs,
                    drv: self.keys[index].clone(),
                    name: String::new(),
                    claim,
                    expected_ms: rank.expected_ms,
                    slots_freed: Vec::new(),
                };
                // Nix asks about every postponed build at least once a second, so the table forgets
                // none of them; answering retries without asking must not make it either.
                match self.table.decide(build, &request, cursor, u64::MAX) {
                    Decision::Admit(lease) => {
                        self.known_waits = Default::default();
                        admitted = true;
                        self.leases.insert(index, lease);
                        self.runs[index].reserved_mib = Some(claim.memory_mib);
                        self.runs[index].limit_mib = Some(limit_mib);
                        self.runs[index].learned = claim.learned;
                        let reserved = self.table.leases().iter().map(|l| l.claim.memory_mib).sum();
                        self.peak_reserved = self.peak_reserved.max(reserved);
                    }
                    Decision::Wait(reason) => {
                        // Counted once it waits, as the broker counts it.
                        if self.table.uncounted(&request.drv) {
                            self.table.dependents_counted(&request.drv, rank.dependents);
                        }
                        if !postponed {
                            // It waits from now on: builds held back for a longer one that it
                            // outlasts are asked again (backfilling protects the longest).
                            for kind in self.known_waits.iter_mut().flatten() {
                                kind.longer_first.retain(|&(_, _, longer)| longer >= rank);
                            }
                        }
                        self.known_waits[claim.tier.index()][usize::from(claim.learned)].add(&reason, claim, rank);
                        if !postponed {
                            self.postponed[index] = true;
                            self.postponed_count += 1;
                        }
                        continue;
                    }
                    Decision::WorkerFull => break,
                }
            }
            self.ready.remove(&at);
            if postponed {
                self.postponed[index] = false;
                self.postponed_count -= 1;
            }
            self.local_builds += 1;
            cursor += nix.start_ms;
            self.at(cursor, Event::Start(index));
        }
        self.worker_busy_until = cursor;
        if admitted {
            self.retry_due = true;
        } else if retry_postponed && all_asked {
            self.retry_due = false;
        }
        if self.postponed_count > 0 && self.retry_due && !self.timer_pending {
            // Nix's timer: the poll interval, or its idle wake-up every second at interval 0.
            let period = nix.poll_interval_secs.max(1) * 1000;
            self.timer_pending = true;
            self.at((self.now / period + 1) * period, Event::Wake { timer: true });
        }
    }

    fn account_memory(&mut self) {
        self.held_area += u128::from(self.held_mib) * u128::from(self.now - self.held_since);
        self.held_since = self.now;
    }

    fn start(&mut self, index: usize) {
        let job = &self.jobs[index];
        self.account_memory();
        self.runs[index].start_ms = Some(self.now);
        self.advance_work();
        self.running.insert(index);
        self.held_mib += job.peak_mib;
        if let (Some(&lease), Some(reserved), Some(limit)) = (self.leases.get(&index), self.runs[index].reserved_mib, self.runs[index].limit_mib) {
            if job.peak_mib > reserved {
                self.table.in_use(lease, job.peak_mib.min(limit));
            }
        }
        self.most_at_once = self.most_at_once.max(self.running.len() as u32);
        self.retime(Some(index));
        self.peak_held = self.peak_held.max(self.held_mib);
        if self.held_mib > self.setup.memory_mib && !self.stalled {
            self.stall();
        }
    }

    /// Memory has run out: no build progresses, and Nix's worker waits, until the OOM killer
    /// strikes.
    fn stall(&mut self) {
        self.advance_work();
        self.stalled = true;
        for &i in &self.running {
            self.timing[i] += 1;
        }
        self.worker_busy_until = self.worker_busy_until.max(self.now + self.setup.oom_kill_ms);
        self.at(self.now + self.setup.oom_kill_ms, Event::OomKill);
    }

    /// The OOM killer ends the largest build (the newest of equals); the rest run on if they
    /// fit, else the next stall begins.
    fn oom_kill(&mut self) {
        self.progress_at = self.now;
        self.stalled = false;
        if let Some(&largest) = self.running.iter().max_by_key(|&&i| (self.jobs[i].peak_mib, self.runs[i].start_ms, i)) {
            self.end_run(largest, Outcome::OomKilled);
        }
        if self.held_mib > self.setup.memory_mib {
            self.stall();
        } else {
            let running: Vec<usize> = self.running.iter().copied().collect();
            for index in running {
                self.schedule_exit(index);
            }
        }
    }

    fn exit(&mut self, index: usize) {
        let job = &self.jobs[index];
        let over_limit = self.runs[index].limit_mib.is_some_and(|limit| job.peak_mib > limit);
        self.end_run(index, if over_limit { Outcome::OverLimit } else { Outcome::Built });
    }

    /// A builder is gone: its memory and its lease end now; Nix sees it `finish_ms` later.
    fn end_run(&mut self, index: usize, outcome: Outcome) {
        self.account_memory();
        self.advance_work();
        self.running.remove(&index);
        self.timing[index] += 1;
        self.retime(None);
        self.held_mib -= self.jobs[index].peak_mib;
        self.runs[index].end_ms = Some(self.now);
        self.runs[index].outcome = outcome;
        if let Some(lease) = self.leases.remove(&index) {
            self.table.end(lease);
            self.known_waits = Default::default();
            self.retry_due = true;
        }
        // Nix's worker notices the exit and registers the outputs, one build after another.
        self.worker_busy_until = self.now.max(self.worker_busy_until) + self.setup.nix.finish_ms;
        self.at(self.worker_busy_until, Event::Finish(index));
    }

    /// Brings the running builds' work left up to now, at the speed they ran.
    fn advance_work(&mut self) {
        if self.stalled {
            self.progress_at = self.now;
            return;
        }
        let elapsed = (self.now - self.progress_at) as f64;
        for &i in &self.running {
            self.work_left[i] = (self.work_left[i] - elapsed * self.speed_of(i)).max(0.0);
        }
        self.progress_at = self.now;
    }

    /// How fast build `index` progresses: builds that want CPU share it, others do not wait.
    fn speed_of(&self, index: usize) -> f64 {
        match parallelism(&self.jobs[index], f64::from(self.setup.threads.max(1))) > 0.0 {
            true => self.speed,
            false => 1.0,
        }
    }

    /// Sets the speed of the builds that want CPU and times exits: every such build's when the
    /// speed changed, and the `started` one's.
    fn retime(&mut self, started: Option<usize>) {
        let threads = f64::from(self.setup.threads.max(1));
        let wanted: f64 = self.running.iter().map(|&i| parallelism(&self.jobs[i], threads)).sum();
        let speed = if wanted > threads { threads / wanted } else { 1.0 };
        let changed = (speed - self.speed).abs() > f64::EPSILON;
        self.speed = speed;
        if self.stalled {
            return; // timed when the stall ends
        }
        let retimed: Vec<usize> = self
            .running
            .iter()
            .copied()
            .filter(|&i| Some(i) == started || (changed && parallelism(&self.jobs[i], threads) > 0.0))
            .collect();
        for index in retimed {
            self.schedule_exit(index);
        }
    }

    /// Times build `index`'s exit from its work left at its speed; earlier timings go stale.
    fn schedule_exit(&mut self, index: usize) {
        self.timing[index] += 1;
        let exit = self.now + (self.work_left[index] / self.speed_of(index)).ceil() as u64;
        self.at(exit, Event::Exit(index, self.timing[index]));
    }

    fn finish(&mut self, index: usize) {
        self.local_builds -= 1;
        if self.runs[index].outcome == Outcome::Built {
            for d in 0..self.dependents[index].len() {
                let dependent = self.dependents[index][d];
                self.missing_deps[dependent] -= 1;
                if self.missing_deps[dependent] == 0 {
                    self.make_ready(dependent);
                }
            }
        }
        self.at(self.now, Event::Wake { timer: false });
    }

    fn prediction(mut self, makespan_ms: u64) -> Prediction {
        self.now = makespan_ms.max(self.held_since);
        self.account_memory();
        let budget = self.setup.hook.as_ref().map_or(self.setup.memory_mib, |b| b.memory_budget_mib);
        let span = makespan_ms.max(1);
        let memory_utilisation = self.held_area as f64 / (span as f64 * budget.max(1) as f64);
        let built = || self.jobs.iter().zip(&self.runs).filter(|(_, r)| r.start_ms.is_some());
        let cpu_utilisation = built().map(|(j, _)| j.cpu_ms).sum::<Option<u64>>().map(|cpu| {
            cpu as f64 / (span as f64 * f64::from(self.setup.threads.max(1)))
        });
        let mut waits: BTreeMap<Tier, TierWaits> = BTreeMap::new();
        for (job, run) in built() {
            let entry = waits.entry(job.tier).or_default();
            let waited = run.waited_ms().unwrap_or(0);
            entry.builds += 1;
            entry.waited += u32::from(waited > 1000);
            entry.total_ms += waited;
            entry.longest_ms = entry.longest_ms.max(waited);
        }
        Prediction {
            makespan_ms,
            most_at_once: self.most_at_once,
            peak_memory_mib: self.peak_held,
            peak_reserved_mib: self.peak_reserved,
            memory_budget_mib: budget,
            memory_utilisation,
            cpu_utilisation,
            waits,
            runs: self.runs,
        }
    }
}

/// Waits the table gave builds of one kind (tier, learned or not) in one wake-up of Nix's worker
/// (the same time) while the leases stayed the same; the answers are monotone, so they answer
/// other builds of the kind.
#[derive(Debug, Clone, Default)]
struct KnownWaits {
    /// The smallest reservation the limits (tier slots, budget, a waiting heavy build) held back:
    /// the tier is as full and the budget as short for any reservation as large.
    limits_mib: Option<u64>,
    /// Builds held back for a waiting build of a higher rank: (reservation, rank, that build's
    /// rank). That build still could not start (now, or when it is due) beside a reservation of
    /// the tier as large of a build that ranks at least as high, and still ranks higher than a
    /// build of a rank below its own.
    longer_first: Vec<(u64, Rank, Rank)>,
}

impl KnownWaits {
    fn add(&mut self, reason: &WaitReason, claim: Claim, rank: Rank) {
        match *reason {
            WaitReason::LongerFirst { expected_ms, dependents } => {
                self.longer_first.push((claim.memory_mib, rank, Rank { expected_ms, dependents }))
            }
            _ => self.limits_mib = Some(self.limits_mib.map_or(claim.memory_mib, |m| m.min(claim.memory_mib))),
        }
    }

    fn cover(&self, claim: Claim, rank: Rank) -> bool {
        self.limits_mib.is_some_and(|m| claim.memory_mib >= m)
            || self.longer_first.iter().any(|&(m, lo, higher)| claim.memory_mib >= m && lo <= rank && rank < higher)
    }
}

/// What `job`, which `dependents` jobs need, asks `hook` for: its claim (tier, and the
/// reservation learned from its known peaks or its tier's `memoryMiB`) and its rank (the
/// expected duration known, else its tier's guess; as Nix's store database says, every job
/// that needs it is unbuilt while it waits); and its memory limit.
fn request(hook: Option<&Build>, job: &Job, dependents: usize) -> (Claim, Rank, u64) {
    let tier_mib = hook.map_or(0, |build| build.tiers.get(job.tier).memory_mib);
    let peaks = job.known.as_ref().map_or(&[][..], |k| &k.peaks_mib[..]);
    let reservation = learning::reservation(peaks, tier_mib);
    let learned = matches!(reservation.source, ReservationSource::Learned { .. });
    let expected_ms = job.known.as_ref().map_or_else(|| learning::guessed_wall_ms(job.tier), |k| k.expected_ms);
    let rank = Rank::new(expected_ms, u32::try_from(dependents).unwrap_or(u32::MAX));
    (Claim { tier: job.tier, memory_mib: reservation.memory_mib, learned }, rank, reservation.limit_mib)
}


/// The threads `job` wants on average while it runs: its CPU time over its wall time, at most
/// the machine's `threads`; none without a CPU time.
fn parallelism(job: &Job, threads: f64) -> f64 {
    match job.cpu_ms {
        Some(cpu) if job.wall_ms > 0 => (cpu as f64 / job.wall_ms as f64).min(threads),
        _ => 0.0,
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Built => "built",
            Outcome::OverLimit => "killed at its memory limit",
            Outcome::OomKilled => "killed by the OOM killer",
            Outcome::NotBuilt => "not built",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::Mode;
    use crate::test_fixtures::build;

    fn job(name: &str, tier: Tier, secs: u64, peak_mib: u64, deps: &[usize]) -> Job {
        Job { name: name.into(), tier, wall_ms: secs * 1000, peak_mib, cpu_ms: None, known: None, deps: deps.to_vec() }
    }

    fn known(mut job: Job) -> Job {
        job.known = Some(Known { expected_ms: job.wall_ms, peaks_mib: vec![job.peak_mib] });
        job
    }

    /// Nix without costs of its own, so that makespans can be worked out by hand.
    fn setup(max_jobs: u32, poll_interval_secs: u64, hook: Option<Build>) -> Setup {
        let nix = Nix { max_jobs, poll_interval_secs, try_ms: 0, start_ms: 0, finish_ms: 0 };
        Setup { threads: 2, memory_mib: 4000, oom_kill_ms: 0, nix, hook }
    }

    fn starts(prediction: &Prediction) -> Vec<u64> {
        prediction.runs.iter().map(|r| r.start_ms.unwrap_or(u64::MAX) / 1000).collect()
    }

    #[test]
    fn nix_alone_meets_the_critical_path() {
        // a (4 s) and b (2 s) before c (3 s); d (5 s) on its own; two slots. b ends at 2 and d
        // takes its slot; c starts when a ends at 4: 7 s, the chain a → c.
        let jobs = [
            job("a", Tier::Light, 4, 10, &[]),
            job("b", Tier::Light, 2, 10, &[]),
            job("c", Tier::Light, 3, 10, &[0, 1]),
            job("d", Tier::Light, 5, 10, &[]),
        ];
        let p = simulate(&jobs, &setup(2, 0, None)).unwrap();
        assert_eq!(p.makespan_ms, 7000);
        assert_eq!(starts(&p), [0, 0, 4, 2]);
        assert_eq!(p.most_at_once, 2);
        assert_eq!(p.waits[&Tier::Light].total_ms, 2000, "d waited for b's slot");
    }

    #[test]
    fn the_budget_serialises_what_the_oom_killer_would_end() {
        // Two 600 MiB builds of 10 s and a dependent of the second, on 1000 MiB.
        let jobs = [job("x", Tier::Medium, 10, 600, &[]), job("y", Tier::Medium, 10, 600, &[]), job("z", Tier::Light, 1, 10, &[1])];
        let mut alone = setup(2, 0, None);
        alone.memory_mib = 1000;
        let p = simulate(&jobs, &alone).unwrap();
        assert_eq!(p.count(Outcome::OomKilled), 1);
        assert_eq!(p.runs[1].outcome, Outcome::OomKilled, "the largest, newest on a tie, is killed");
        assert_eq!(p.runs[2].outcome, Outcome::NotBuilt);
        // While the kernel reclaims before it kills, x makes no progress either.
        alone.oom_kill_ms = 500;
        let p = simulate(&jobs, &alone).unwrap();
        assert_eq!((p.runs[1].end_ms, p.runs[0].end_ms), (Some(500), Some(10_500)));

        let mut hook = build();
        hook.tiers.medium.memory_mib = 600;
        let p = simulate(&jobs, &Setup { memory_mib: 1000, ..setup(2, 0, Some(hook)) }).unwrap();
        assert_eq!(p.count(Outcome::Built), 3);
        assert_eq!(p.makespan_ms, 21_000);
        assert_eq!(p.peak_reserved_mib, 600);
    }

    #[test]
    fn a_postponed_build_waits_for_the_poll_timer_unless_the_interval_is_0() {
        // Two heavy builds of 1 s, one heavy job slot.
        let jobs = [job("h1", Tier::Heavy, 1, 10, &[]), job("h2", Tier::Heavy, 1, 10, &[])];
        let at_5 = simulate(&jobs, &setup(4, 5, Some(build()))).unwrap();
        assert_eq!(starts(&at_5), [0, 5]);
        assert_eq!(at_5.makespan_ms, 6000);
        let at_0 = simulate(&jobs, &setup(4, 0, Some(build()))).unwrap();
        assert_eq!(at_0.makespan_ms, 2000);
    }

    #[test]
    fn a_longer_waiting_build_goes_first() {
        // One build at a time (each reserves 600 of 1000 MiB). While "0-first" runs, "a-short"
        // and "b-long" both ask and wait; when it ends, "a-short" asks first in Nix's order but
        // "b-long" is expected to take longer and starts first.
        let jobs = [
            known(job("0-first", Tier::Medium, 2, 100, &[])),
            known(job("a-short", Tier::Medium, 1, 100, &[])),
            known(job("b-long", Tier::Medium, 10, 100, &[])),
        ];
        let mut hook = build();
        hook.tiers.medium = crate::TierLimits { max_jobs: 1, cores: 1, memory_mib: 600 };
        let p = simulate(&jobs, &setup(4, 0, Some(hook))).unwrap();
        assert_eq!(starts(&p), [0, 12, 2]);
        assert_eq!(p.makespan_ms, 13_000);
    }

    #[test]
    fn learned_reservations_pack_what_tier_limits_keep_apart() {
        let jobs = [known(job("h1", Tier::Heavy, 10, 100, &[])), known(job("h2", Tier::Heavy, 10, 100, &[]))];
        let mut learned = build();
        learned.mode = Mode::Learned;
        let p = simulate(&jobs, &setup(4, 0, Some(learned.clone()))).unwrap();
        assert_eq!(p.makespan_ms, 10_000);
        assert_eq!((p.runs[0].reserved_mib, p.runs[0].limit_mib), (Some(100), Some(125)), "p95, and × 1.25");
        learned.caps = vec![Tier::Heavy];
        assert_eq!(simulate(&jobs, &setup(4, 0, Some(learned))).unwrap().makespan_ms, 20_000);
    }

    #[test]
    fn a_build_using_more_than_it_reserved_is_counted_at_what_it_uses() {
        // Four builds of 200 MiB run; "e" is ready after 1 s, and a fifth 200 MiB fits the budget.
        let mut jobs: Vec<Job> = vec![known(job("0-first", Tier::Heavy, 1, 64, &[]))];
        jobs.extend(["a", "b", "c", "d"].into_iter().map(|n| known(job(n, Tier::Heavy, 10, 200, &[]))));
        jobs.push(known(job("e", Tier::Heavy, 10, 200, &[0])));
        let mut learned = build();
        learned.mode = Mode::Learned;
        assert_eq!(starts(&simulate(&jobs, &setup(5, 0, Some(learned.clone()))).unwrap()), [0, 0, 0, 0, 0, 1]);
        jobs[1].peak_mib = 240; // more than last time, within its limit of 250
        let p = simulate(&jobs, &setup(5, 0, Some(learned))).unwrap();
        assert_eq!(p.runs[1].outcome, Outcome::Built);
        assert_eq!(starts(&p), [0, 0, 0, 0, 0, 10], "e waits for the 40 MiB a took beyond its reservation");
    }

    #[test]
    fn a_build_over_its_learned_limit_is_killed_at_it() {
        let mut grown = known(job("grows", Tier::Light, 1, 80, &[]));
        grown.peak_mib = 200;
        let p = simulate(&[grown], &setup(1, 0, Some(build()))).unwrap();
        assert_eq!(p.runs[0].outcome, Outcome::OverLimit);
    }

    #[test]
    fn builds_share_the_cpu_when_they_want_more_threads_than_the_machine_has() {
        // Two builds of 10 s wanting 2 threads each on 2 threads run at half speed and end at
        // 20 s; a build without a CPU time beside them is not slowed.
        let mut jobs = [job("a", Tier::Light, 10, 1, &[]), job("b", Tier::Light, 10, 1, &[]), job("c", Tier::Light, 10, 1, &[])];
        jobs[0].cpu_ms = Some(20_000);
        jobs[1].cpu_ms = Some(20_000);
        let p = simulate(&jobs, &setup(3, 0, None)).unwrap();
        let ends: Vec<u64> = p.runs.iter().map(|r| r.end_ms.unwrap()).collect();
        assert_eq!(ends, [20_000, 20_000, 10_000]);
        assert_eq!(p.cpu_utilisation, None, "c's CPU time is unknown");
        // One wanting 2 threads for 10 s, one wanting 2 threads for 4 s: half speed while both
        // run (8 s, 4 s of work each), then full speed: 8 + 6 = 14 s.
        jobs[1].wall_ms = 4000;
        jobs[1].cpu_ms = Some(8000);
        let p = simulate(&jobs[..2], &setup(2, 0, None)).unwrap();
        assert_eq!(p.makespan_ms, 14_000);
        assert_eq!(p.runs[1].end_ms, Some(8000));
        assert_eq!(p.cpu_utilisation, Some(28_000.0 / (14_000.0 * 2.0)));
    }

    #[test]
    fn dependencies_must_come_first() {
        let jobs = [job("a", Tier::Light, 1, 1, &[1]), job("b", Tier::Light, 1, 1, &[])];
        let error = simulate(&jobs, &setup(1, 0, None)).unwrap_err();
        assert!(error.to_string().contains("\"a\") depends on job 1"), "{error}");
    }
}
