//! The builds a simulation runs (`nix-tier simulate`, `tune`, `report`): read from a workload
//! file or from a derivation's closure, with what the build history knows of each package.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use nix_tier_model::build::package_name;
use nix_tier_model::learning::{self, Learned};
use nix_tier_model::simulate::{Job, Known};
use nix_tier_model::{Derivation, Profile, Tier};

use crate::dispatch::place;
use crate::history::History;

/// Why the builds could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The workload file could not be read or parsed.
    #[error("workload {path}: {message}")]
    Workload {
        /// The file.
        path: PathBuf,
        /// What is wrong, and how to fix it.
        message: String,
    },
    /// A derivation of the closure could not be read.
    #[error("{path}: {message}")]
    Derivation {
        /// The .drv file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The build history could not be read.
    #[error("build history: {0}")]
    History(#[from] crate::history::HistoryError),
}

/// The builds of a simulation and what profile rules can do with them.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The builds, each after its dependencies.
    pub jobs: Vec<Job>,
    /// For each job (same index), the package name profile rules match when a rule can decide
    /// its tier; `None` when a mark decides it (`NIX_TIER`, or the tier a workload file gives,
    /// which bench/lib/dag.nix sets as `NIX_TIER`).
    pub rule_packages: Vec<Option<String>>,
}

/// A workload file, as bench/lib/workload.py writes it: `{"builds": [{"name", "tier", "ms",
/// "mib", "deps"}]}`, each build optionally with its CPU time `cpuMs` (other fields are
/// ignored).
#[derive(Deserialize)]
struct Workload {
    builds: Vec<WorkloadBuild>,
}

#[derive(Deserialize)]
struct WorkloadBuild {
    name: String,
    tier: Tier,
    ms: u64,
    mib: u64,
    #[serde(default, rename = "cpuMs")]
    cpu_ms: Option<u64>,
    #[serde(default)]
    deps: Vec<String>,
}

/// The builds of the workload file at `path`, each known to the runtime as far as `history` has
/// its package (the derivation name without its version). Their tiers are marks: no rule moves
/// them.
pub fn from_workload(path: &Path, history: Option<&History>) -> Result<Plan, PlanError> {
    let error = |message: String| PlanError::Workload { path: path.to_path_buf(), message };
    let text = fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    let workload: Workload = serde_json::from_str(&text)
        .map_err(|e| error(format!("{e}; expected {{\"builds\": [{{\"name\", \"tier\", \"ms\", \"mib\", \"deps\"}}]}}")))?;
    let mut index = HashMap::new();
    for (i, build) in workload.builds.iter().enumerate() {
        if index.insert(build.name.as_str(), i).is_some() {
            return Err(error(format!("build \"{}\" is listed twice; give every build its own name", build.name)));
        }
    }
    let mut deps = Vec::with_capacity(workload.builds.len());
    for build in &workload.builds {
        let resolved = build.deps.iter().map(|d| {
            index.get(d.as_str()).copied().ok_or_else(|| error(format!("build \"{}\" needs \"{d}\", which is not listed", build.name)))
        });
        deps.push(resolved.collect::<Result<Vec<usize>, PlanError>>()?);
    }
    let order = dependencies_first(&deps).map_err(|i| error(format!("build \"{}\" depends on itself through its dependencies", workload.builds[i].name)))?;
    let learned = history.map(History::learned).transpose()?;
    let jobs = order.iter().map(|&i| {
        let build = &workload.builds[i];
        let known = known(learned.as_ref(), package_name(&build.name));
        Ok(Job { name: build.name.clone(), tier: build.tier, wall_ms: build.ms, peak_mib: build.mib, cpu_ms: build.cpu_ms, known, deps: deps[i].clone() })
    });
    let jobs = renumber(jobs.collect::<Result<Vec<Job>, PlanError>>()?, &order);
    Ok(Plan { rule_packages: vec![None; jobs.len()], jobs })
}

/// The builds `nix-store --realise drv` would run: the derivations of its closure whose outputs
/// are not all in the store, placed as the hook places them (tier, reservation). How long each
/// runs and what it peaks at come from `history` (the median wall time, the largest learning
/// peak); a package the history does not have runs its tier's guess
/// ([`learning::guessed_wall_ms`]) and uses its tier's `memoryMiB`.
pub fn from_derivation(drv: &Path, profile: &Profile, history: Option<&History>) -> Result<Plan, PlanError> {
    let mut found: BTreeMap<PathBuf, (Derivation, Vec<PathBuf>)> = BTreeMap::new();
    let mut queue = VecDeque::from([drv.to_path_buf()]);
    while let Some(path) = queue.pop_front() {
        if found.contains_key(&path) {
            continue;
        }
        let derivation = Derivation::read(&path).map_err(|e| PlanError::Derivation { path: path.clone(), message: e.to_string() })?;
        let inputs: Vec<PathBuf> = derivation.input_derivations.keys().map(PathBuf::from).collect();
        queue.extend(inputs.iter().cloned());
        found.insert(path, (derivation, inputs));
    }
    let built = |d: &Derivation| d.output_paths().all(|p| !p.is_empty() && Path::new(p).exists());
    let wanted: Vec<&PathBuf> = found.iter().filter(|(_, (d, _))| !built(d)).map(|(p, _)| p).collect();
    let index: HashMap<&PathBuf, usize> = wanted.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    let deps: Vec<Vec<usize>> = wanted.iter().map(|p| found[*p].1.iter().filter_map(|i| index.get(i).copied()).collect()).collect();
    let order = dependencies_first(&deps).map_err(|i| PlanError::Derivation { path: wanted[i].clone(), message: "depends on itself".into() })?;
    let learned = history.map(History::learned).transpose()?;
    let jobs = order.iter().map(|&i| {
        let derivation = &found[wanted[i]].0;
        // The tier only: what it reserves follows from `known`, as the hook would learn it.
        let placement = place(profile, derivation, None);
        let tier = placement.classification.tier;
        let package = package_name(&placement.name);
        let known = known(learned.as_ref(), package);
        let wall_ms = known.as_ref().map_or_else(|| learning::guessed_wall_ms(tier), |k| k.expected_ms);
        let peak_mib = known.as_ref().and_then(|k| k.peaks_mib.iter().max().copied()).unwrap_or(profile.build.tiers.get(tier).memory_mib);
        let cpu_ms = match history {
            Some(history) => history.expected_cpu_ms(package)?,
            None => None,
        };
        let job = Job { name: placement.name, tier, wall_ms, peak_mib, cpu_ms, known, deps: deps[i].clone() };
        Ok((job, placement.rule_package))
    });
    let (jobs, rule_packages) = jobs.collect::<Result<(Vec<Job>, Vec<Option<String>>), PlanError>>()?;
    Ok(Plan { jobs: renumber(jobs, &order), rule_packages })
}

/// Makes the runtime know every job as one recorded run of exactly these builds would have
/// taught it: its duration and its peak (a rebuild after a first one).
pub fn known_from_themselves(jobs: &mut [Job]) {
    for job in jobs {
        job.known = Some(Known { expected_ms: job.wall_ms, peaks_mib: vec![job.peak_mib] });
    }
}

/// What the runtime knows of `package`: what the broker learns from the history.
fn known(learned: Option<&Learned>, package: &str) -> Option<Known> {
    let learned = learned?;
    Some(Known { expected_ms: learned.expected_wall_ms(package)?, peaks_mib: learned.peaks(package) })
}

/// An order of the nodes in which each comes after its dependencies (`deps[i]`: the nodes `i`
/// needs); `Err(i)` when `i` is on a cycle.
fn dependencies_first(deps: &[Vec<usize>]) -> Result<Vec<usize>, usize> {
    let mut waiting_on: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut needed_by = vec![Vec::new(); deps.len()];
    for (node, needs) in deps.iter().enumerate() {
        for &dep in needs {
            needed_by[dep].push(node);
        }
    }
    let mut order: Vec<usize> = (0..deps.len()).filter(|&i| waiting_on[i] == 0).collect();
    let mut next = 0;
    while next < order.len() {
        for &dependent in &needed_by[order[next]] {
            waiting_on[dependent] -= 1;
            if waiting_on[dependent] == 0 {
                order.push(dependent);
            }
        }
        next += 1;
    }
    match waiting_on.iter().position(|&w| w > 0) {
        Some(on_cycle) => Err(on_cycle),
        None => Ok(order),
    }
}

/// `jobs` (in `order`, their dependencies still as original indices) with dependencies renumbered
/// to positions in `jobs`.
fn renumber(mut jobs: Vec<Job>, order: &[usize]) -> Vec<Job> {
    let mut position = vec![0; order.len()];
    for (at, &original) in order.iter().enumerate() {
        position[original] = at;
    }
    for job in &mut jobs {
        for dep in &mut job.deps {
            *dep = position[*dep];
        }
    }
    jobs
}
