//! `nix-tier tune`: a build section for this machine and this build, chosen by simulation.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use nix_tier_model::build::Mode;
use nix_tier_model::simulate::{Outcome, Prediction};
use nix_tier_model::tune::{self, Problem, Tuning};
use nix_tier_hook::report::duration;
use nix_tier_model::{tiers, Build, Profile, Source, Tier};

use super::simulate::{Loaded, Scenario};
use crate::CommandResult;

/// Propose the build section that predicts the fastest build, with no build over its memory.
///
/// Simulates the build as 'nix-tier simulate' does, then searches the budget, the tiers' maxJobs
/// and memoryMiB, caps, mode and exact-name rules for the shortest predicted makespan with no
/// build killed at its memory limit or by the OOM killer; cores, the default tier and existing
/// rules stay, and Nix's max-jobs too. Prints the current and the proposed predictions side by
/// side. Writes nothing unless asked: --write FILE writes the whole profile with the proposed
/// build section, ready to pin. docs/profile.md, "Tuning", describes the search.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    scenario: Scenario,
    /// Write the profile with the proposed build section to FILE (a pinned profile, as
    /// 'nix-tier profile --check FILE' accepts).
    #[arg(long, value_name = "FILE")]
    write: Option<PathBuf>,
    /// Print JSON: the machine, both build sections and both predictions (without each build's run).
    #[arg(long)]
    json: bool,
}

/// Runs `nix-tier tune`.
pub fn run(args: &Args) -> CommandResult {
    if args.scenario.no_hook {
        return Err("nix-tier tune proposes nix-tier-hook's build section; drop --no-hook".into());
    }
    let loaded = args.scenario.load()?;
    let ram = loaded.profile.memory.total_mib;
    let problem = Problem {
        jobs: &loaded.jobs,
        rule_packages: &loaded.rule_packages,
        setup: &loaded.setup,
        budget_ceiling_mib: loaded.setup.memory_mib.min(tiers::memory_budget_mib(ram)),
        max_jobs_follow_tiers: args.scenario.max_jobs.is_none(),
    };
    let tuning = tune::tune(&problem)?;
    let written = match &args.write {
        Some(file) => Some(write(file, &loaded.profile, &tuning.build)?),
        None => None,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&loaded, &tuning, written.as_deref()))?);
    } else {
        print!("{}", describe(&loaded, &tuning, written.as_deref()));
    }
    Ok(())
}

/// Writes `profile` with `build` to `file` as a pinned profile, and reads it back as the hook
/// would; the file written.
fn write(file: &Path, profile: &Profile, build: &Build) -> Result<PathBuf, String> {
    let proposed = Profile { source: Source::Pinned, build: build.clone(), ..profile.clone() };
    fs::write(file, proposed.to_json_pretty() + "\n").map_err(|e| format!("--write {}: {e}", file.display()))?;
    Profile::load_pinned(file).map_err(|e| format!("the profile written to {} does not load: {e}", file.display()))?;
    Ok(file.to_path_buf())
}

/// A package the proposal's rules move: its tiers and its largest peak.
struct Moved {
    package: String,
    from: Tier,
    to: Tier,
    peak_mib: u64,
}

fn moved(loaded: &Loaded, tuning: &Tuning) -> Vec<Moved> {
    let mut by_package: BTreeMap<&str, Moved> = BTreeMap::new();
    for ((job, to), package) in loaded.jobs.iter().zip(&tuning.tiers).zip(&loaded.rule_packages) {
        if let (Some(package), true) = (package, job.tier != *to) {
            let entry = by_package.entry(package).or_insert(Moved { package: package.clone(), from: job.tier, to: *to, peak_mib: 0 });
            entry.peak_mib = entry.peak_mib.max(job.peak_mib);
        }
    }
    by_package.into_values().collect()
}

/// The tuning as JSON.
fn to_json(loaded: &Loaded, tuning: &Tuning, written: Option<&Path>) -> serde_json::Value {
    let setup = &loaded.setup;
    let current = setup.hook.as_ref();
    let moved: Vec<serde_json::Value> = moved(loaded, tuning)
        .into_iter()
        .map(|m| serde_json::json!({ "package": m.package, "from": m.from, "to": m.to, "peakMiB": m.peak_mib }))
        .collect();
    serde_json::json!({
        "source": loaded.source,
        "profile": loaded.profile_origin,
        "threads": setup.threads,
        "memoryMiB": setup.memory_mib,
        "maxJobs": setup.nix.max_jobs,
        "pollIntervalSecs": setup.nix.poll_interval_secs,
        "builds": loaded.jobs.len(),
        "simulations": tuning.simulations,
        "current": { "build": current, "prediction": summary(&tuning.current) },
        "proposed": { "build": tuning.build, "prediction": summary(&tuning.proposed) },
        "moved": moved,
        "written": written,
    })
}

/// A prediction without each build's run, with how many builds ended each way.
fn summary(prediction: &Prediction) -> serde_json::Value {
    let mut value = serde_json::to_value(prediction).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.remove("runs");
    }
    // Keyed as each run's "outcome" is spelled: "built", "over-limit", "oom-killed", "not-built".
    let outcomes: serde_json::Map<String, serde_json::Value> = OUTCOMES
        .iter()
        .filter_map(|&o| Some((serde_json::to_value(o).ok()?.as_str()?.to_string(), prediction.count(o).into())))
        .collect();
    value["outcomes"] = outcomes.into();
    value
}

const OUTCOMES: [Outcome; 4] = [Outcome::Built, Outcome::OverLimit, Outcome::OomKilled, Outcome::NotBuilt];

/// The tuning for people: both predictions side by side, then the proposed build section.
fn describe(loaded: &Loaded, tuning: &Tuning, written: Option<&Path>) -> String {
    let setup = &loaded.setup;
    let current = setup.hook.as_ref().expect("tune runs with the hook");
    let proposed = &tuning.build;
    let mut out = format!(
        "{} builds of {} on {} threads and {} MiB, max-jobs = {}, build-poll-interval = {}; {} simulations:\n\n",
        loaded.jobs.len(),
        loaded.source,
        setup.threads,
        setup.memory_mib,
        setup.nix.max_jobs,
        setup.nix.poll_interval_secs,
        tuning.simulations
    );
    let mut rows: Vec<(String, String, String)> = vec![("".into(), format!("current ({})", loaded.profile_origin), "proposed".into())];
    let mut row = |label: &str, f: &dyn Fn(&Prediction, &Build) -> String| {
        rows.push((label.to_string(), f(&tuning.current, current), f(&tuning.proposed, proposed)));
    };
    row("makespan", &|p, _| duration(p.makespan_ms));
    row("budget", &|_, b| format!("{} MiB", b.memory_budget_mib));
    row("memory held", &|p, _| format!("peak {} MiB, {:.0} % on average", p.peak_memory_mib, 100.0 * p.memory_utilisation));
    row("reserved", &|p, _| format!("peak {} MiB", p.peak_reserved_mib));
    row("CPU", &|p, _| p.cpu_utilisation.map_or_else(|| "unknown".to_string(), |cpu| format!("{:.0} % of {} threads", 100.0 * cpu, setup.threads)));
    row("at once", &|p, _| format!("{} builds at most", p.most_at_once));
    for tier in Tier::ALL {
        if tuning.current.waits.contains_key(&tier) || tuning.proposed.waits.contains_key(&tier) {
            row(&format!("{tier} waits"), &|p, _| match p.waits.get(&tier) {
                Some(w) => format!("{} of {} over 1 s, {} in all", w.waited, w.builds, duration(w.total_ms)),
                None => "no builds".to_string(),
            });
        }
    }
    row("outcome", &|p, _| outcome(p));
    let width = |pick: fn(&(String, String, String)) -> &String| rows.iter().map(|r| pick(r).chars().count()).max().unwrap_or(0);
    let (w0, w1) = (width(|r| &r.0), width(|r| &r.1));
    for (label, left, right) in &rows {
        out += format!("  {label:<w0$}  {left:<w1$}  {right}").trim_end();
        out += "\n";
    }
    out += "\n";
    out += &section(current, proposed, &moved(loaded, tuning));
    out += "\n";
    out += &match written {
        Some(file) => format!("Wrote {}: the profile with the proposed build section; 'nix-tier profile --check' accepts it.\n", file.display()),
        None if current == proposed => "Nothing to change: no neighbour of the current build section predicts better.\n".to_string(),
        None => "Nothing written; --write FILE writes the profile with the proposed build section.\n".to_string(),
    };
    out
}

/// How the builds ended: `all 234 built`, or `230 built; 2 killed at its memory limit, …`.
fn outcome(prediction: &Prediction) -> String {
    let built = prediction.count(Outcome::Built);
    if built == prediction.runs.len() {
        return format!("all {built} built");
    }
    let failed: Vec<String> = OUTCOMES[1..].iter().filter(|&&o| prediction.count(o) > 0).map(|&o| format!("{} {o}", prediction.count(o))).collect();
    format!("{built} built; {}", failed.join(", "))
}

/// The proposed build section, each changed figure as `old → new`.
fn section(current: &Build, proposed: &Build, moved: &[Moved]) -> String {
    let change = |old: String, new: String| if old == new { new } else { format!("{old} → {new}") };
    let mut out = String::from("Proposed build section:\n");
    out += &format!("  memoryBudgetMiB  {}\n", change(current.memory_budget_mib.to_string(), proposed.memory_budget_mib.to_string()));
    out += &format!("  {:<8} {:<10} {:<6} memoryMiB\n", "tier", "maxJobs", "cores");
    for (tier, new) in proposed.tiers.iter() {
        let old = current.tiers.get(tier);
        let max_jobs = change(old.max_jobs.to_string(), new.max_jobs.to_string());
        out += &format!("  {:<8} {max_jobs:<10} {:<6} {}\n", tier.as_str(), new.cores, change(old.memory_mib.to_string(), new.memory_mib.to_string()));
    }
    let mode = |m: Mode| match m {
        Mode::Learned => "learned".to_string(),
        Mode::Tiers => "tiers".to_string(),
    };
    out += &format!("  mode             {}\n", change(mode(current.mode), mode(proposed.mode)));
    let caps = |caps: &[Tier]| match caps.is_empty() {
        true => "none".to_string(),
        false => caps.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", "),
    };
    out += &format!("  caps             {}\n", change(caps(&current.caps), caps(&proposed.caps)));
    let kept = current.rules.iter().filter(|r| proposed.rules.contains(r)).count();
    if moved.is_empty() {
        out += &format!("  rules            {}\n", if kept == 0 { "none".to_string() } else { format!("{kept}, unchanged") });
    }
    for m in moved {
        out += &format!("  new rule         \"{}\" → {} (was {}; peaks at {} MiB)\n", m.package, m.to, m.from, m.peak_mib);
    }
    if !moved.is_empty() && kept > 0 {
        out += &format!("  then the current profile's {kept} rules\n");
    }
    out
}
