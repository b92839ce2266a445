//! `nix-tier simulate`: the predicted run of a build, under the runtime's own admission policy.

use std::path::PathBuf;

use nix_tier_hook::history::History;
use nix_tier_hook::plan;
use nix_tier_hook::report::duration;
use nix_tier_hook::state::StateDir;
use nix_tier_model::simulate::{self, Job, Nix, Outcome, Prediction, Setup};
use nix_tier_model::{tiers, Profile};

use crate::CommandResult;

/// Predict how long a build takes under a profile, and how it uses the machine.
///
/// Runs the hook's own admission policy over the build's DAG in simulated time: one Nix process
/// with `max-jobs` slots, its `build-poll-interval`, and the hook's tiers, memory budget and
/// learned reservations. Durations and memory peaks come from the build history
/// ($NIX_TIER_STATE_DIR/history.sqlite, else $NIX_STATE_DIR/nix-tier/history.sqlite); a package
/// without history runs its tier's guess (heavy 30 min, medium 5 min, light 30 s) and uses its
/// tier's memoryMiB. docs/simulate.md describes the model.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub scenario: Scenario,
    /// Print JSON: the machine, Nix's settings and the prediction, with every build's run.
    #[arg(long)]
    pub json: bool,
}

/// What to simulate and on what machine; shared by `simulate`, `tune` and `report`.
#[derive(clap::Args)]
pub struct Scenario {
    /// The .drv file to build (e.g. from 'nix-instantiate'): the derivations of its closure
    /// whose outputs are missing.
    #[arg(value_name = "DRV", required_unless_present = "workload", conflicts_with = "workload")]
    pub drv: Option<PathBuf>,
    /// A workload file instead of a derivation: {"builds": [{"name", "tier", "ms", "mib",
    /// "deps": [names]}]} (optionally "cpuMs" per build), as bench/lib/workload.py writes it.
    #[arg(long, value_name = "FILE")]
    pub workload: Option<PathBuf>,
    /// The hardware profile (default: as the hook finds it).
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// Simulate Nix alone, without nix-tier-hook.
    #[arg(long)]
    pub no_hook: bool,
    /// Ignore the build history: nothing learned, durations and peaks from the tiers.
    #[arg(long)]
    pub no_history: bool,
    /// With --workload: the history knows every build as the workload describes it (a rebuild
    /// after one recorded run: learned reservations, known durations), instead of reading it.
    #[arg(long, requires = "workload", conflicts_with = "no_history")]
    pub learned: bool,
    /// Nix's max-jobs (default: the largest maxJobs of the profile's tiers, as lib.nixConf sets it).
    #[arg(long, value_name = "N")]
    pub max_jobs: Option<u32>,
    /// Nix's build-poll-interval, seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub poll_interval: u64,
    /// Hardware threads (default: the profile's).
    #[arg(long, value_name = "N")]
    pub threads: Option<u32>,
    /// Memory the builds can use before the kernel's OOM killer ends one, MiB (default: the
    /// profile's RAM and swap, less the system reserve).
    #[arg(long, value_name = "MIB")]
    pub memory_mib: Option<u64>,
    /// How long the kernel takes to end a build once the builds hold more than --memory-mib,
    /// milliseconds: it reclaims first, and everything stalls meanwhile (default: as measured by
    /// bench/scheduling's max-jobs = 12 without the hook: ten OOM kills in 1.8 s).
    #[arg(long, value_name = "MS", default_value_t = 200)]
    pub oom_kill_ms: u64,
    /// Nix's own time per build: a hook `try`, starting a builder, and noticing its end
    /// (milliseconds; default: as measured by bench/scheduling on two cores).
    #[arg(long, value_name = "TRY:START:FINISH")]
    pub nix_costs: Option<String>,
}

/// A scenario read: its builds, the profile, and the setup to run them on.
pub struct Loaded {
    /// The builds.
    pub jobs: Vec<Job>,
    /// For each build, the package name profile rules match, when a rule can decide its tier.
    pub rule_packages: Vec<Option<String>>,
    /// The profile (its build section is the hook's, unless `--no-hook`).
    pub profile: Profile,
    /// Where the profile came from.
    pub profile_origin: String,
    /// The machine and Nix.
    pub setup: Setup,
    /// What was read: the .drv or the workload file.
    pub source: String,
}

impl Scenario {
    /// Reads the profile, the builds and the history, and sets up the machine.
    pub fn load(&self) -> Result<Loaded, Box<dyn std::error::Error>> {
        let (profile, profile_origin) = super::hook_profile(self.profile.as_deref())?;
        let history = match self.no_history || self.learned {
            true => None,
            false => History::open_read_only(StateDir::from_env().path())?,
        };
        let (mut plan, source) = match (&self.workload, &self.drv) {
            (Some(file), _) => (plan::from_workload(file, history.as_ref())?, file.display().to_string()),
            (None, Some(drv)) => (plan::from_derivation(drv, &profile, history.as_ref())?, drv.display().to_string()),
            (None, None) => return Err("give a .drv file or --workload FILE".into()),
        };
        if self.learned {
            plan::known_from_themselves(&mut plan.jobs);
        }
        let setup = self.setup(&profile)?;
        Ok(Loaded { jobs: plan.jobs, rule_packages: plan.rule_packages, profile, profile_origin, setup, source })
    }

    fn setup(&self, profile: &Profile) -> Result<Setup, String> {
        let mut nix = Nix::with_max_jobs(self.max_jobs.unwrap_or_else(|| largest_max_jobs(profile)));
        nix.poll_interval_secs = self.poll_interval;
        if let Some(costs) = &self.nix_costs {
            let parsed: Vec<u64> = costs.split(':').filter_map(|c| c.parse().ok()).collect();
            let [try_ms, start_ms, finish_ms] = parsed[..] else {
                return Err(format!("--nix-costs {costs}: give three whole milliseconds as TRY:START:FINISH, e.g. 1:20:20"));
            };
            (nix.try_ms, nix.start_ms, nix.finish_ms) = (try_ms, start_ms, finish_ms);
        }
        let ram = profile.memory.total_mib;
        Ok(Setup {
            threads: self.threads.unwrap_or(profile.cpu.threads),
            memory_mib: self.memory_mib.unwrap_or(ram + profile.swap.total_mib - tiers::system_reserve_mib(ram)),
            oom_kill_ms: self.oom_kill_ms,
            nix,
            hook: (!self.no_hook).then(|| profile.build.clone()),
        })
    }
}

/// Nix's `max-jobs` for the hook: the largest `maxJobs` of the tiers (as `lib.nixConf` sets it).
pub fn largest_max_jobs(profile: &Profile) -> u32 {
    profile.build.tiers.iter().map(|(_, limits)| limits.max_jobs).max().unwrap_or(1).max(1)
}

/// Runs `nix-tier simulate`.
pub fn run(args: &Args) -> CommandResult {
    let loaded = args.scenario.load()?;
    let prediction = simulate::simulate(&loaded.jobs, &loaded.setup)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&loaded, &prediction))?);
    } else {
        print!("{}", describe(&loaded, &prediction));
    }
    Ok(())
}

/// The scenario and its prediction as JSON; `runs` carry each build's name and tier.
pub fn to_json(loaded: &Loaded, prediction: &Prediction) -> serde_json::Value {
    let setup = &loaded.setup;
    let runs: Vec<serde_json::Value> = loaded
        .jobs
        .iter()
        .zip(&prediction.runs)
        .map(|(job, run)| {
            let mut value = serde_json::to_value(run).unwrap_or_default();
            value["name"] = job.name.clone().into();
            value["tier"] = job.tier.as_str().into();
            value["peakMiB"] = job.peak_mib.into();
            value
        })
        .collect();
    let mut value = serde_json::to_value(prediction).unwrap_or_default();
    value["runs"] = runs.into();
    serde_json::json!({
        "source": loaded.source,
        "profile": loaded.profile_origin,
        "hook": setup.hook.is_some(),
        "threads": setup.threads,
        "memoryMiB": setup.memory_mib,
        "maxJobs": setup.nix.max_jobs,
        "pollIntervalSecs": setup.nix.poll_interval_secs,
        "builds": loaded.jobs.len(),
        "prediction": value,
    })
}

/// The prediction for people.
pub fn describe(loaded: &Loaded, prediction: &Prediction) -> String {
    let setup = &loaded.setup;
    let mut out = String::new();
    let runtime = match &setup.hook {
        Some(_) => format!("nix-tier-hook with {}", loaded.profile_origin),
        None => "Nix alone".to_string(),
    };
    out += &format!(
        "{} builds of {} on {} threads and {} MiB, max-jobs = {}, build-poll-interval = {}, {runtime}:\n",
        loaded.jobs.len(),
        loaded.source,
        setup.threads,
        setup.memory_mib,
        setup.nix.max_jobs,
        setup.nix.poll_interval_secs
    );
    out += &format!("  makespan      {}\n", duration(prediction.makespan_ms));
    out += &format!(
        "  memory        peak {} MiB held, {} MiB reserved, of a {} MiB budget; {:.0} % held on average\n",
        prediction.peak_memory_mib,
        prediction.peak_reserved_mib,
        prediction.memory_budget_mib,
        100.0 * prediction.memory_utilisation
    );
    out += &match prediction.cpu_utilisation {
        Some(cpu) => format!("  CPU           {:.0} % of {} threads; {} builds at once at most\n", 100.0 * cpu, setup.threads, prediction.most_at_once),
        None => format!("  CPU           unknown (not every build's CPU time is in the history); {} builds at once at most\n", prediction.most_at_once),
    };
    for (tier, waits) in &prediction.waits {
        out += &format!(
            "  {:<13} {} builds; {} waited over a second, {} in all, the longest {}\n",
            format!("{tier}:"),
            waits.builds,
            waits.waited,
            duration(waits.total_ms),
            duration(waits.longest_ms)
        );
    }
    let failed: Vec<String> = [Outcome::OverLimit, Outcome::OomKilled, Outcome::NotBuilt]
        .into_iter()
        .filter(|o| prediction.count(*o) > 0)
        .map(|o| format!("{} {o}", prediction.count(o)))
        .collect();
    out += &match failed.is_empty() {
        true => "  outcome       every build succeeds\n".to_string(),
        false => format!("  outcome       {} built; {}\n", prediction.count(Outcome::Built), failed.join(", ")),
    };
    for (job, run) in loaded.jobs.iter().zip(&prediction.runs).filter(|(_, r)| matches!(r.outcome, Outcome::OverLimit | Outcome::OomKilled)).take(5) {
        let reserved = run.reserved_mib.map_or_else(String::new, |r| format!(", {r} MiB reserved"));
        out += &format!("    {} ({}, peak {} MiB{reserved}): {}\n", job.name, job.tier, job.peak_mib, run.outcome);
    }
    out
}
