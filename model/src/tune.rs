//! Proposing a build section for a machine and a build: the search behind `nix-tier tune`.
//!
//! # The search
//!
//! [`tune`] predicts the build with the current build section ([`simulate`]), then improves the
//! section by steepest descent: each round simulates every neighbour of the best section so far
//! and keeps the best one, as long as one is strictly better. *Better* compares, in this order,
//! how many builds fail (over their memory limit, killed by the OOM killer, or not built because
//! a dependency failed), the predicted makespan, the builds' waits together and the most memory
//! reserved at once: a failing build is fixed first, and the last two let the search cross
//! plateaus where one change alone does not shorten the makespan (more job slots that only pay
//! off once the tier's figure is lower). Then each change is undone in turn where that costs no
//! failure and less than 1 % of the makespan found, so the proposal changes only what pays off.
//! The neighbours of a section are:
//!
//! * **a tier's `maxJobs`**: one more or one less, doubled or halved, or `max-jobs`, within
//!   `1..=max-jobs` (only for a tier whose `maxJobs` holds some build of the DAG: in tier mode,
//!   capped, or one without a learned reservation). When Nix's `max-jobs` is the largest tier
//!   `maxJobs` (as `lib.nixConf` sets it), that largest figure stays, so Nix's `max-jobs` does
//!   not change;
//! * **a tier's `memoryMiB`**: raised to what its builds need when one peaks above it, or lowered
//!   to what they need when it is larger. What a build needs is its peak, or its learned limit
//!   when that is larger: the tier's figure caps learned limits, and a figure below them would
//!   take away the limit's margin ([`learning`]). A figure between the largest
//!   peak and the largest need is left as it is;
//! * **`caps`**: a tier capped or not (in learned mode); **`mode`**: learned or tiers;
//! * **the budget**: raised to the most the machine allows ([`Problem::budget_ceiling_mib`]), and
//!   as far as a raised tier figure needs; never lowered;
//! * **rules**: the packages whose peak is over their tier's figure, moved together by exact-name
//!   rules to the lightest heavier tier whose figure holds each; and the package that needs the
//!   most of its tier, moved likewise with its old tier's figure lowered to what the rest need.
//!   Only packages with a history move (their duration and peak do not depend on their tier), and
//!   only those a rule can place (not marked with a tier).
//!
//! Every neighbour keeps each tier's figure within the budget, and, when the current section has
//! heavier tiers holding at least as much memory per build as lighter ones (as the default
//! formula does), keeps that order too: a package that needs more than its tier can hold in that
//! order moves to a heavier tier instead. Cores, the default tier and the existing rules stay
//! (a new exact rule goes first, replacing an exact rule for the same package).
//!
//! The search is deterministic: the neighbours of a round are simulated in parallel, but the
//! first best one in a fixed order wins.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::thread;

use crate::build::{Mode, Pattern, Rule};
use crate::learning;
use crate::simulate::{self, Job, Outcome, Prediction, Setup, SimulateError};
use crate::{Build, Tier};

/// What to tune for.
#[derive(Debug, Clone)]
pub struct Problem<'a> {
    /// The builds, as [`simulate`] takes them, placed with the current build section.
    pub jobs: &'a [Job],
    /// For each job (same index), the package name profile rules match when a rule can decide
    /// its tier; `None` when a mark decides it (`NIX_TIER`, or a workload file's tier). A job
    /// without an entry is not moved either.
    pub rule_packages: &'a [Option<String>],
    /// The machine and Nix; its `hook` is the current build section.
    pub setup: &'a Setup,
    /// The largest memory budget to propose, MiB (the current budget is kept when it is larger).
    pub budget_ceiling_mib: u64,
    /// Whether Nix's `max-jobs` is the largest tier `maxJobs` (as `lib.nixConf` sets it), so
    /// that the proposal must keep that figure for Nix to keep its `max-jobs`.
    pub max_jobs_follow_tiers: bool,
}

/// The proposal and the predictions it was chosen by.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// The current build section's prediction.
    pub current: Prediction,
    /// The proposed build section.
    pub build: Build,
    /// The jobs' tiers under the proposal (its rules can move jobs), in the order of the jobs.
    pub tiers: Vec<Tier>,
    /// The proposal's prediction.
    pub proposed: Prediction,
    /// How many simulations the search ran.
    pub simulations: usize,
}

/// Why nothing could be tuned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TuneError {
    /// The setup has no build section: Nix alone has nothing to tune.
    #[error("tuning proposes nix-tier-hook's build section, and the setup has none (Nix alone); drop --no-hook")]
    NoHook,
    /// The DAG cannot be simulated.
    #[error(transparent)]
    Simulate(#[from] SimulateError),
}

/// Proposes the build section for `problem`; see the [module docs](self) for the search.
pub fn tune(problem: &Problem) -> Result<Tuning, TuneError> {
    let Some(current) = problem.setup.hook.clone() else { return Err(TuneError::NoHook) };
    let search = Search::new(problem, &current);
    let start = State { build: current, jobs: Arc::new(problem.jobs.to_vec()) };
    let first = search.evaluate(vec![start.clone()])?.pop().expect("one state evaluated");
    let current = first.prediction.clone();
    let mut best = first;
    let mut simulations = 1;
    loop {
        let neighbours = search.neighbours(&best.state);
        simulations += neighbours.len();
        let better = search.evaluate(neighbours)?.into_iter().filter(|n| n.score < best.score).min_by_key(|n| n.score);
        match better {
            Some(next) => best = next,
            None => break,
        }
    }
    let found = best.score;
    let worth = found.makespan_ms / 100 * PAYOFF_PERCENT;
    for undo in Change::ALL {
        let Some(undone) = undo.revert(&best.state, &start).filter(|s| search.valid(&s.build)) else { continue };
        simulations += 1;
        let undone = search.evaluate(vec![undone])?.pop().expect("one state evaluated");
        if undone.score.failed <= found.failed && undone.score.makespan_ms <= found.makespan_ms + worth {
            best = undone;
        }
    }
    Ok(Tuning {
        current,
        tiers: best.state.jobs.iter().map(|j| j.tier).collect(),
        build: best.state.build,
        proposed: best.prediction,
        simulations,
    })
}

/// How much of the makespan a change must save to stay, percent: less is within what the model's
/// estimates of Nix's own costs decide.
const PAYOFF_PERCENT: u64 = 1;

/// One part of a build section the search may change, to be undone where it does not pay off.
#[derive(Debug, Clone, Copy)]
enum Change {
    Budget,
    MaxJobs(Tier),
    Memory(Tier),
    Caps,
    Mode,
    Rules,
}

impl Change {
    const ALL: [Change; 10] = [
        Change::Rules,
        Change::Budget,
        Change::MaxJobs(Tier::Heavy),
        Change::MaxJobs(Tier::Medium),
        Change::MaxJobs(Tier::Light),
        Change::Memory(Tier::Heavy),
        Change::Memory(Tier::Medium),
        Change::Memory(Tier::Light),
        Change::Caps,
        Change::Mode,
    ];

    /// `state` with this part as in `original`; `None` when it is the same already.
    fn revert(self, state: &State, original: &State) -> Option<State> {
        let (mut build, from) = (state.build.clone(), &original.build);
        let mut jobs = state.jobs.clone();
        match self {
            Change::Budget => build.memory_budget_mib = from.memory_budget_mib,
            Change::MaxJobs(tier) => build.tiers.get_mut(tier).max_jobs = from.tiers.get(tier).max_jobs,
            Change::Memory(tier) => build.tiers.get_mut(tier).memory_mib = from.tiers.get(tier).memory_mib,
            Change::Caps => build.caps.clone_from(&from.caps),
            Change::Mode => build.mode = from.mode,
            Change::Rules => {
                build.rules.clone_from(&from.rules);
                jobs = original.jobs.clone();
            }
        }
        (build != state.build).then_some(State { build, jobs })
    }
}

/// A candidate: a build section and the jobs placed by it.
#[derive(Debug, Clone)]
struct State {
    build: Build,
    jobs: Arc<Vec<Job>>,
}

/// What a candidate is judged by, best first: fewer failed builds, a shorter makespan, shorter
/// waits, less memory reserved at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Score {
    failed: usize,
    makespan_ms: u64,
    waited_ms: u64,
    reserved_mib: u64,
}

impl Score {
    fn of(prediction: &Prediction) -> Score {
        Score {
            failed: prediction.runs.len() - prediction.count(Outcome::Built),
            makespan_ms: prediction.makespan_ms,
            waited_ms: prediction.waits.values().map(|w| w.total_ms).sum(),
            reserved_mib: prediction.peak_reserved_mib,
        }
    }
}

struct Evaluated {
    state: State,
    prediction: Prediction,
    score: Score,
}

struct Search<'a> {
    problem: &'a Problem<'a>,
    /// What each job needs of its tier's `memoryMiB`: its peak, or its learned limit when that
    /// is larger.
    needs: Vec<u64>,
    /// The largest budget a neighbour may have.
    budget_ceiling_mib: u64,
    /// Whether neighbours keep heavier tiers at least as large per build as lighter ones.
    keep_order: bool,
}

impl<'a> Search<'a> {
    fn new(problem: &'a Problem<'a>, current: &Build) -> Search<'a> {
        let needs = problem
            .jobs
            .iter()
            .map(|job| {
                let learned = job.known.as_ref().filter(|k| !k.peaks_mib.is_empty()).map(|k| learning::reservation(&k.peaks_mib, u64::MAX).limit_mib);
                job.peak_mib.max(learned.unwrap_or(0))
            })
            .collect();
        Search {
            problem,
            needs,
            budget_ceiling_mib: problem.budget_ceiling_mib.max(current.memory_budget_mib),
            keep_order: ordered(current),
        }
    }

    /// Simulates `states`, spread over the machine's threads; results in the order of `states`.
    fn evaluate(&self, states: Vec<State>) -> Result<Vec<Evaluated>, SimulateError> {
        let workers = thread::available_parallelism().map_or(1, |n| n.get()).min(states.len()).max(1);
        let predictions: Vec<Result<Prediction, SimulateError>> = thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|worker| {
                    let states = &states;
                    scope.spawn(move || states.iter().skip(worker).step_by(workers).map(|s| self.simulate(s)).collect::<Vec<_>>())
                })
                .collect();
            let mut parts: Vec<_> = handles.into_iter().map(|h| h.join().expect("a simulation does not panic").into_iter()).collect();
            (0..states.len()).map(|i| parts[i % workers].next().expect("one prediction per state")).collect()
        });
        states
            .into_iter()
            .zip(predictions)
            .map(|(state, prediction)| {
                let prediction = prediction?;
                Ok(Evaluated { score: Score::of(&prediction), state, prediction })
            })
            .collect()
    }

    fn simulate(&self, state: &State) -> Result<Prediction, SimulateError> {
        let setup = Setup { hook: Some(state.build.clone()), ..self.problem.setup.clone() };
        simulate::simulate(&state.jobs, &setup)
    }

    /// The valid neighbours of `state`, in the order ties are broken in.
    fn neighbours(&self, state: &State) -> Vec<State> {
        let build = &state.build;
        let used: BTreeSet<Tier> = state.jobs.iter().map(|j| j.tier).collect();
        let mut builds = Vec::new();
        for &tier in Tier::ALL.iter().filter(|t| used.contains(t)) {
            let figure = build.tiers.get(tier).memory_mib;
            let (required, comfortable) = self.memory_needed(&state.jobs, tier);
            let mut figures = Vec::new();
            if figure < required {
                figures.push(comfortable);
                figures.push(self.heavier_figure(build, tier).map_or(comfortable, |h| comfortable.min(h)).max(required));
            } else if figure > comfortable {
                figures.push(comfortable);
                figures.push(self.lighter_figure(build, tier).map_or(comfortable, |l| comfortable.max(l)));
            }
            builds.extend(figures.into_iter().filter_map(|mib| self.with_memory(build.clone(), tier, mib)));
        }
        for &tier in Tier::ALL.iter().filter(|&&t| self.job_slots_bind(state, t)) {
            let now = build.tiers.get(tier).max_jobs;
            let most = self.problem.setup.nix.max_jobs;
            let mut tried = vec![now];
            for max_jobs in [now.saturating_sub(1), now + 1, now / 2, (now * 2).min(most), most] {
                if (1..=most).contains(&max_jobs) && !tried.contains(&max_jobs) {
                    tried.push(max_jobs);
                    let mut next = build.clone();
                    next.tiers.get_mut(tier).max_jobs = max_jobs;
                    builds.push(next);
                }
            }
        }
        if build.mode == Mode::Learned {
            for &tier in Tier::ALL.iter().filter(|t| used.contains(t)) {
                let mut next = build.clone();
                match next.caps.iter().position(|&c| c == tier) {
                    Some(at) => drop(next.caps.remove(at)),
                    None => next.caps.push(tier),
                }
                builds.push(next);
            }
        }
        let mut other_mode = build.clone();
        other_mode.mode = match build.mode {
            Mode::Learned => Mode::Tiers,
            Mode::Tiers => Mode::Learned,
        };
        builds.push(other_mode);
        if self.budget_ceiling_mib > build.memory_budget_mib {
            builds.push(Build { memory_budget_mib: self.budget_ceiling_mib, ..build.clone() });
        }
        let mut states: Vec<State> = builds.into_iter().filter(|b| self.valid(b)).map(|build| State { build, jobs: state.jobs.clone() }).collect();
        states.extend(self.moves(state).into_iter().filter(|s| self.valid(&s.build)));
        states
    }

    /// The neighbours that move packages to heavier tiers by exact-name rules.
    fn moves(&self, state: &State) -> Vec<State> {
        let mut out = Vec::new();
        for tier in [Tier::Medium, Tier::Light] {
            let figure = state.build.tiers.get(tier).memory_mib;
            // Each movable package of the tier with its largest peak and need.
            let mut packages: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
            for (index, job) in state.jobs.iter().enumerate().filter(|(_, j)| j.tier == tier && j.known.is_some()) {
                if let Some(package) = self.rule_package(index) {
                    let entry = packages.entry(package).or_default();
                    *entry = (entry.0.max(job.peak_mib), entry.1.max(self.needs[index]));
                }
            }
            let over: Vec<&str> = packages.iter().filter(|(_, (peak, _))| *peak > figure).map(|(p, _)| *p).collect();
            if !over.is_empty() {
                out.extend(self.move_packages(state, tier, &over, false));
            }
            let largest = packages.iter().max_by_key(|(p, (_, need))| (*need, std::cmp::Reverse(**p)));
            if let Some((&package, _)) = largest.filter(|(p, _)| !over.contains(p)) {
                out.extend(self.move_packages(state, tier, &[package], true));
            }
        }
        out
    }

    /// `state` with `packages` (of `tier`) moved by exact rules each to the lightest heavier tier
    /// whose figure holds what it needs (else heavy, raised to it); with `shrink`, `tier`'s figure
    /// is lowered to what its remaining builds need.
    fn move_packages(&self, state: &State, tier: Tier, packages: &[&str], shrink: bool) -> Option<State> {
        let mut build = state.build.clone();
        let mut jobs: Vec<Job> = state.jobs.as_ref().clone();
        let heavier: Vec<Tier> = Tier::ALL.into_iter().filter(|&t| t < tier).rev().collect();
        let mut rules = Vec::new();
        for &package in packages {
            let moving: Vec<usize> = (0..jobs.len()).filter(|&i| jobs[i].tier == tier && self.rule_package(i) == Some(package)).collect();
            let need = moving.iter().map(|&i| self.needs[i]).max().unwrap_or(0);
            let to = heavier.iter().copied().find(|&t| build.tiers.get(t).memory_mib >= need).unwrap_or(Tier::Heavy);
            if build.tiers.get(to).memory_mib < need {
                build = self.with_memory(build, to, need)?;
            }
            for i in moving {
                jobs[i].tier = to;
            }
            rules.push(Rule { pattern: exact_pattern(package)?, tier: to });
        }
        build.rules.retain(|rule| !rules.iter().any(|r| r.pattern == rule.pattern));
        build.rules.splice(0..0, rules);
        if shrink {
            let (_, comfortable) = self.memory_needed(&jobs, tier);
            let floor = self.lighter_figure(&build, tier).unwrap_or(1);
            if comfortable.max(floor) >= build.tiers.get(tier).memory_mib {
                return None;
            }
            build.tiers.get_mut(tier).memory_mib = comfortable.max(floor);
        }
        Some(State { build, jobs: Arc::new(jobs) })
    }

    /// The largest peak and the largest need of `tier`'s builds in `jobs` (0 without any).
    fn memory_needed(&self, jobs: &[Job], tier: Tier) -> (u64, u64) {
        jobs.iter()
            .zip(&self.needs)
            .filter(|(j, _)| j.tier == tier)
            .fold((0, 0), |(peak, need), (j, n)| (peak.max(j.peak_mib), need.max(*n)))
    }

    /// `build` with `tier`'s figure at `mib`, the budget raised to hold it; `None` when the
    /// budget may not grow that far.
    fn with_memory(&self, mut build: Build, tier: Tier, mib: u64) -> Option<Build> {
        if mib > self.budget_ceiling_mib {
            return None;
        }
        build.memory_budget_mib = build.memory_budget_mib.max(mib);
        build.tiers.get_mut(tier).memory_mib = mib.max(1);
        Some(build)
    }

    /// The figure of the next heavier tier, when the order of figures is kept.
    fn heavier_figure(&self, build: &Build, tier: Tier) -> Option<u64> {
        let heavier = Tier::ALL.into_iter().rfind(|&t| t < tier)?;
        self.keep_order.then(|| build.tiers.get(heavier).memory_mib)
    }

    /// The figure of the next lighter tier, when the order of figures is kept.
    fn lighter_figure(&self, build: &Build, tier: Tier) -> Option<u64> {
        let lighter = Tier::ALL.into_iter().find(|&t| t > tier)?;
        self.keep_order.then(|| build.tiers.get(lighter).memory_mib)
    }

    /// Whether `tier`'s `maxJobs` holds some build of `state`.
    fn job_slots_bind(&self, state: &State, tier: Tier) -> bool {
        state.jobs.iter().any(|j| {
            let learned = j.known.as_ref().is_some_and(|k| !k.peaks_mib.is_empty());
            j.tier == tier && state.build.job_slots_bind(tier, learned)
        })
    }

    fn rule_package(&self, index: usize) -> Option<&str> {
        self.problem.rule_packages.get(index).and_then(Option::as_deref)
    }

    /// Whether `build` may be proposed: figures within the budget and the budget's ceiling, the
    /// order of figures kept, and Nix's `max-jobs` kept when it follows the tiers.
    fn valid(&self, build: &Build) -> bool {
        let within = build.memory_budget_mib <= self.budget_ceiling_mib && build.tiers.iter().all(|(_, l)| l.memory_mib <= build.memory_budget_mib);
        let largest = build.tiers.iter().map(|(_, l)| l.max_jobs).max().unwrap_or(1);
        let max_jobs_kept = !self.problem.max_jobs_follow_tiers || largest == self.problem.setup.nix.max_jobs;
        within && max_jobs_kept && (!self.keep_order || ordered(build))
    }
}

/// Whether heavier tiers hold at least as much memory per build as lighter ones.
fn ordered(build: &Build) -> bool {
    let t = &build.tiers;
    t.heavy.memory_mib >= t.medium.memory_mib && t.medium.memory_mib >= t.light.memory_mib
}

/// A pattern matching exactly `package`; `None` for a name a pattern cannot match exactly (one
/// starting or ending with `*`, or empty).
fn exact_pattern(package: &str) -> Option<Pattern> {
    if package.starts_with('*') || package.ends_with('*') {
        return None;
    }
    Pattern::new(package).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::{Known, Nix};
    use crate::test_fixtures::build;

    fn job(name: &str, tier: Tier, secs: u64, peak_mib: u64) -> Job {
        Job { name: name.into(), tier, wall_ms: secs * 1000, peak_mib, cpu_ms: None, known: None, deps: Vec::new() }
    }

    fn known(mut job: Job) -> Job {
        job.known = Some(Known { expected_ms: job.wall_ms, peaks_mib: vec![job.peak_mib] });
        job
    }

    /// Nix without costs of its own (makespans by hand) and `max_jobs` slots, on 4000 MiB.
    fn setup(max_jobs: u32, hook: Build) -> Setup {
        let nix = Nix { max_jobs, poll_interval_secs: 0, try_ms: 0, start_ms: 0, finish_ms: 0 };
        Setup { threads: 4, memory_mib: 4000, oom_kill_ms: 0, nix, hook: Some(hook) }
    }

    fn tuned(jobs: &[Job], rule_packages: &[Option<String>], setup: &Setup) -> Tuning {
        let problem = Problem { jobs, rule_packages, setup, budget_ceiling_mib: 1000, max_jobs_follow_tiers: false };
        tune(&problem).expect("tunes")
    }

    #[test]
    fn the_job_slots_that_build_fastest_are_found_and_nothing_else_changes() {
        // Six light builds of 10 s without history, each reserving the light figure (100 MiB of
        // 1000): light 4 jobs at once build in 20 s, 6 (max-jobs) in 10 s once light's figure is
        // their peak (50): then all six fit beside the room kept for a heavy build (600) while
        // Nix first asks about them, rather than the last two waiting for its next wake-up.
        let jobs: Vec<Job> = (0..6).map(|i| job(&format!("l{i}"), Tier::Light, 10, 50)).collect();
        let t = tuned(&jobs, &[], &setup(6, build()));
        assert_eq!(t.current.makespan_ms, 20_000);
        assert_eq!(t.proposed.makespan_ms, 10_000);
        assert_eq!(t.build.tiers.light.max_jobs, 6);
        assert_eq!(Build { tiers: build().tiers, ..t.build.clone() }, build(), "only the tiers change");
        assert_eq!(t.build.tiers.light.memory_mib, 50);
        assert_eq!((t.build.tiers.heavy, t.build.tiers.medium), (build().tiers.heavy, build().tiers.medium));
    }

    #[test]
    fn slots_and_a_lower_figure_that_only_pay_off_together_are_found() {
        // Four medium builds of 10 s peaking at 120 MiB, without history: at medium's 300 MiB
        // three fit the 1000 MiB budget, so neither 4 jobs nor 120 MiB alone beats 21 s (the
        // second waits for Nix's next wake-up, 1 s later: room is kept for a heavy build while
        // Nix first asks); both together build in 11 s (the fourth waits for that wake-up).
        let jobs: Vec<Job> = (0..4).map(|i| job(&format!("m{i}"), Tier::Medium, 10, 120)).collect();
        let t = tuned(&jobs, &[], &setup(4, build()));
        assert_eq!(t.current.makespan_ms, 21_000);
        assert_eq!(t.proposed.makespan_ms, 11_000);
        assert_eq!((t.build.tiers.medium.max_jobs, t.build.tiers.medium.memory_mib), (4, 120));
    }

    #[test]
    fn a_package_over_its_tiers_figure_moves_to_a_tier_that_holds_it() {
        // "big" peaked at 250 MiB, over light's 100: killed at its limit, and "after" needs it.
        // Raising light to 300 (medium's figure: lighter tiers stay at most as large) would make
        // the four small light builds reserve 300 each; a rule moves "big" to heavy (its learned
        // 313 MiB is over medium's 300) and everything runs at once.
        let mut jobs = vec![known(job("big-1.0", Tier::Light, 10, 250))];
        jobs.extend((0..4).map(|i| job(&format!("small{i}"), Tier::Light, 10, 50)));
        let mut after = job("after", Tier::Light, 1, 10);
        after.deps = vec![0];
        jobs.push(after);
        let packages: Vec<Option<String>> = jobs.iter().map(|j| Some(crate::build::package_name(&j.name).to_string())).collect();
        let t = tuned(&jobs, &packages, &setup(8, build()));
        assert_eq!(t.current.runs[0].outcome, Outcome::OverLimit);
        assert_eq!(t.current.runs[5].outcome, Outcome::NotBuilt);
        assert_eq!(t.proposed.count(Outcome::Built), jobs.len());
        assert_eq!(t.build.rules, [Rule { pattern: Pattern::new("big").unwrap(), tier: Tier::Heavy }]);
        assert_eq!(t.tiers[0], Tier::Heavy);
        assert_eq!(t.build.tiers.light.memory_mib, 100);
        assert_eq!(t.proposed.makespan_ms, 11_000);
    }

    #[test]
    fn a_marked_build_over_its_tiers_figure_gets_a_figure_that_holds_it() {
        // The same build marked light (no rule can move it): light's figure rises to what it
        // peaked at, within medium's 300.
        let jobs = [known(job("big-1.0", Tier::Light, 10, 250)), job("small", Tier::Light, 10, 50)];
        let t = tuned(&jobs, &[None, None], &setup(8, build()));
        assert_eq!(t.current.count(Outcome::OverLimit), 1);
        assert_eq!(t.proposed.count(Outcome::Built), 2);
        assert!(t.build.rules.is_empty());
        assert!((250..=300).contains(&t.build.tiers.light.memory_mib), "{:?}", t.build.tiers.light);
    }

    #[test]
    fn a_build_larger_than_every_tier_raises_heavy_and_the_budget_within_the_ceiling() {
        // 900 MiB over heavy's 600: heavy and the budget rise (the ceiling is 1200 here).
        let jobs = [known(job("huge-1.0", Tier::Heavy, 10, 900))];
        let problem = Problem { jobs: &jobs, rule_packages: &[], setup: &setup(4, build()), budget_ceiling_mib: 1200, max_jobs_follow_tiers: false };
        let t = tune(&problem).unwrap();
        assert_eq!(t.proposed.count(Outcome::Built), 1);
        assert!(t.build.tiers.heavy.memory_mib >= 900 && t.build.memory_budget_mib <= 1200, "{:?}", t.build);
        // With no room for it, the failure stays and nothing pointless changes.
        let problem = Problem { budget_ceiling_mib: 800, ..problem };
        let t = tune(&problem).unwrap();
        assert_eq!(t.proposed.count(Outcome::OverLimit), 1);
        assert_eq!(t.build, build());
    }

    #[test]
    fn nix_keeps_its_max_jobs_when_it_follows_the_tiers() {
        // max-jobs 4 is light's maxJobs: medium may rise to 4, light may not fall below it.
        let jobs: Vec<Job> = (0..4).map(|i| job(&format!("m{i}"), Tier::Medium, 10, 120)).collect();
        let problem = Problem { jobs: &jobs, rule_packages: &[], setup: &setup(4, build()), budget_ceiling_mib: 1000, max_jobs_follow_tiers: true };
        let t = tune(&problem).unwrap();
        assert_eq!(t.build.tiers.light.max_jobs, 4);
        assert_eq!(t.proposed.makespan_ms, 11_000);
    }

    #[test]
    fn the_search_is_deterministic_and_needs_the_hook() {
        let jobs: Vec<Job> = (0..12).map(|i| job(&format!("j{i}"), Tier::ALL[i % 3], 5 + i as u64, 40 + 30 * i as u64)).collect();
        let first = tuned(&jobs, &[], &setup(6, build()));
        let again = tuned(&jobs, &[], &setup(6, build()));
        assert_eq!((first.build, first.proposed), (again.build, again.proposed));
        let mut alone = setup(6, build());
        alone.hook = None;
        let problem = Problem { jobs: &jobs, rule_packages: &[], setup: &alone, budget_ceiling_mib: 1000, max_jobs_follow_tiers: false };
        assert_eq!(tune(&problem).unwrap_err(), TuneError::NoHook);
    }
}
