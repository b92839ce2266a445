//! `nix-tier report`: a picture of a build run, recorded or predicted, as an SVG file.

use std::path::PathBuf;

use nix_tier_hook::history::History;
use nix_tier_hook::report::{self, duration, BuildRun};
use nix_tier_hook::state::StateDir;
use nix_tier_model::simulate;

use super::history::utc_minute;
use super::simulate::Scenario;
use crate::CommandResult;

/// Draw a build run as a picture: one row per build slot, a bar per build coloured by its tier,
/// the waits, and the memory in use against the budget.
///
/// Without a subcommand it draws the newest run in the build history
/// ($NIX_TIER_STATE_DIR/history.sqlite, else $NIX_STATE_DIR/nix-tier/history.sqlite): the
/// builds that chain back from the newest one, each starting within a minute of the end of an
/// earlier one. 'nix-tier report simulate …' draws the run 'nix-tier simulate' predicts
/// instead. The SVG is self-contained; hover over a bar for its build's figures.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    /// Where to write the SVG.
    #[arg(long, short, value_name = "FILE", required = true)]
    output: Option<PathBuf>,
    /// Draw every build started since then instead (milliseconds since the epoch).
    #[arg(long, value_name = "UNIX_MS")]
    since: Option<u64>,
    /// The hardware profile, for the memory budget and the tiers' limits (default: as the hook
    /// finds it).
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    /// What to draw instead of the history.
    #[command(subcommand)]
    source: Option<Source>,
}

/// What to draw instead of the history.
#[derive(clap::Subcommand)]
enum Source {
    /// Draw the run 'nix-tier simulate' predicts (takes its arguments).
    Simulate(Simulated),
}

/// `nix-tier report simulate`.
#[derive(clap::Args)]
struct Simulated {
    /// Where to write the SVG.
    #[arg(long, short, value_name = "FILE")]
    output: PathBuf,
    #[command(flatten)]
    scenario: Scenario,
}

/// Runs `nix-tier report`.
pub fn run(args: &Args) -> CommandResult {
    let (run, output) = match (&args.source, &args.output) {
        (Some(Source::Simulate(simulated)), _) => (predicted(&simulated.scenario)?, &simulated.output),
        (None, Some(output)) => (recorded(args)?, output),
        (None, None) => return Err("give --output FILE.svg".into()),
    };
    std::fs::write(output, report::svg(&run)).map_err(|e| format!("{}: {e}", output.display()))?;
    println!("wrote {}: {}", output.display(), run.subtitle);
    Ok(())
}

/// The newest recorded run, or every build since `--since`.
fn recorded(args: &Args) -> Result<BuildRun, Box<dyn std::error::Error>> {
    let state_dir = StateDir::from_env();
    let history = History::open_read_only(state_dir.path())?.ok_or_else(|| {
        format!(
            "no builds recorded yet in {}: build through nix-tier-hook first, or draw a prediction with 'nix-tier report simulate'",
            state_dir.path().display()
        )
    })?;
    let records = history.rows_since(args.since.unwrap_or(0))?;
    let records = match args.since {
        Some(_) => &records[..],
        None => report::newest_run(&records),
    };
    if records.is_empty() {
        let since = args.since.map_or_else(String::new, |s| format!(" since {} UTC", utc_minute(s)));
        return Err(format!("no builds recorded{since} in {}", history.path().display()).into());
    }
    let (profile, origin) = super::hook_profile(args.profile.as_deref())?;
    let (start_unix_ms, bars) = report::recorded_bars(records);
    let span = bars.iter().map(|b| b.end_ms).max().unwrap_or(0);
    Ok(BuildRun {
        title: format!("Build run of {} UTC", utc_minute(start_unix_ms)),
        subtitle: format!(
            "{} builds over {} from {}; the tiers and memory budget of {origin}",
            bars.len(),
            duration(span),
            history.path().display()
        ),
        bars,
        budget_mib: profile.build.memory_budget_mib,
        tiers: Some(profile.build.tiers),
    })
}

/// The run `nix-tier simulate` predicts.
fn predicted(scenario: &Scenario) -> Result<BuildRun, Box<dyn std::error::Error>> {
    let loaded = scenario.load()?;
    let prediction = simulate::simulate(&loaded.jobs, &loaded.setup)?;
    let bars = report::predicted_bars(&loaded.jobs, &prediction);
    let setup = &loaded.setup;
    let runtime = match &setup.hook {
        Some(_) => format!("nix-tier-hook with {}", loaded.profile_origin),
        None => "Nix alone".to_string(),
    };
    let not_built = loaded.jobs.len() - bars.len();
    let not_built = if not_built > 0 { format!(" ({not_built} not built: a dependency failed)") } else { String::new() };
    Ok(BuildRun {
        title: format!("Predicted build run of {}", loaded.source),
        subtitle: format!(
            "{} builds{not_built} in {}, max-jobs = {}, {runtime}",
            bars.len(),
            duration(prediction.makespan_ms),
            setup.nix.max_jobs
        ),
        bars,
        budget_mib: prediction.memory_budget_mib,
        tiers: setup.hook.is_some().then_some(loaded.profile.build.tiers),
    })
}
