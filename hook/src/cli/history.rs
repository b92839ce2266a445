//! `nix-tier history`: recent builds and a summary per package, from the build history.

use nix_tier_hook::history::{BuildRecord, History, PackageSummary};
use nix_tier_hook::state::StateDir;

use crate::CommandResult;

/// Show recent builds (time, package, version, tier, wall and CPU time, memory peak and limit,
/// outcome) and a summary per package.
///
/// Reads the build history the hook learns reservations from ($NIX_TIER_STATE_DIR/history.sqlite,
/// else $NIX_STATE_DIR/nix-tier/history.sqlite).
#[derive(clap::Args)]
pub struct Args {
    /// Print JSON: {"builds": [...], "summary": [...]}.
    #[arg(long)]
    json: bool,
    /// Only builds of this package (the derivation name without its version).
    #[arg(long, value_name = "NAME")]
    package: Option<String>,
    /// How many recent builds to show.
    #[arg(long, value_name = "N", default_value_t = 20)]
    limit: usize,
}

/// Runs `nix-tier history`.
pub fn run(args: &Args) -> CommandResult {
    let state_dir = StateDir::from_env();
    let Some(history) = History::open_read_only(state_dir.path())? else {
        match args.json {
            true => println!("{}", serde_json::json!({ "builds": [], "summary": [] })),
            false => println!("no builds recorded yet in {}", state_dir.path().display()),
        }
        return Ok(());
    };
    let builds = history.rows(args.package.as_deref(), args.limit)?;
    let mut summary = history.summary()?;
    if let Some(package) = &args.package {
        summary.retain(|s| &s.package == package);
    }
    if args.json {
        let json = serde_json::json!({ "builds": builds, "summary": summary });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{}", human(&history, &builds, &summary));
    }
    Ok(())
}

fn human(history: &History, builds: &[BuildRecord], summary: &[PackageSummary]) -> String {
    if summary.is_empty() {
        return format!("no builds recorded in {}\n", history.path().display());
    }
    let mut out = format!("recent builds ({}):\n", builds.len());
    out += &format!(
        "  {:<16} {:<28} {:<12} {:<6} {:>9} {:>9} {:>15}  {}\n",
        "time (UTC)", "package", "version", "tier", "wall", "cpu", "peak/limit MiB", "outcome"
    );
    for b in builds {
        out += &format!(
            "  {:<16} {:<28} {:<12} {:<6} {:>9} {:>9} {:>15}  {}\n",
            utc_minute(b.started_unix_ms),
            b.package,
            if b.version.is_empty() { "-" } else { &b.version },
            b.tier.as_str(),
            duration(b.wall_ms),
            b.cpu_ms.map_or_else(|| "-".to_string(), duration),
            format!("{}/{}", mib(b.peak_mib), mib(b.limit_mib)),
            b.outcome
        );
    }
    out += &format!("\npackages ({}):\n", summary.len());
    out += &format!(
        "  {:<28} {:>6} {:>6} {:>4} {:>11} {:>9} {:>8} {:>8}  {}\n",
        "package", "builds", "failed", "oom", "median wall", "max wall", "p95 MiB", "max MiB", "last tier"
    );
    for s in summary {
        out += &format!(
            "  {:<28} {:>6} {:>6} {:>4} {:>11} {:>9} {:>8} {:>8}  {}\n",
            s.package,
            s.builds,
            s.failures,
            s.oom_kills,
            s.median_wall_ms.map_or_else(|| "-".to_string(), duration),
            s.max_wall_ms.map_or_else(|| "-".to_string(), duration),
            mib(s.p95_peak_mib),
            mib(s.max_peak_mib),
            s.last_tier
        );
    }
    out
}

fn mib(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// A duration in milliseconds for people: `850 ms`, `42.1 s`, `12m05s`, `3h07m`.
fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        ms if ms < 1000 => format!("{ms} ms"),
        ms if ms < 60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        _ if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// `YYYY-MM-DD HH:MM` (UTC) of a time in milliseconds since the epoch.
pub fn utc_minute(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}", secs % 86_400 / 3600, secs % 3600 / 60)
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_durations() {
        assert_eq!(utc_minute(0), "1970-01-01 00:00");
        assert_eq!(utc_minute(951_782_400_000), "2000-02-29 00:00");
        assert_eq!(utc_minute(1_767_225_599_000), "2025-12-31 23:59");
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(42_149), "42.1 s");
        assert_eq!(duration(725_000), "12m05s");
        assert_eq!(duration(11_220_000), "3h07m");
    }
}
