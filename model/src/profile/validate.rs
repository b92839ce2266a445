//! Checks serde cannot express: counts of at least 1 and tier memory within the budget.

use super::Profile;

/// A field whose value is not allowed.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Violation {
    /// The field path, e.g. `build.tiers.heavy.cores`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Checks the limits of `profile`, reporting the first violation.
pub(super) fn check(profile: &Profile) -> Result<(), Violation> {
    at_least_one("cpu.threads", profile.cpu.threads.into())?;
    at_least_one("cpu.physicalCores", profile.cpu.physical_cores.into())?;
    if let Some(level) = &profile.cpu.goamd64 {
        if !["v1", "v2", "v3", "v4"].contains(&level.as_str()) {
            return Err(Violation {
                field: "cpu.goamd64".to_string(),
                message: format!(
                    "\"{level}\" is not allowed; use \"v1\", \"v2\", \"v3\", \"v4\" or null"
                ),
            });
        }
    }
    at_least_one("memory.totalMiB", profile.memory.total_mib)?;

    let build = &profile.build;
    let budget = build.memory_budget_mib;
    at_least_one("build.memoryBudgetMiB", budget)?;
    for (tier, limits) in build.tiers.iter() {
        let field = |name: &str| format!("build.tiers.{tier}.{name}");
        at_least_one(&field("maxJobs"), limits.max_jobs.into())?;
        at_least_one(&field("cores"), limits.cores.into())?;
        at_least_one(&field("memoryMiB"), limits.memory_mib)?;
        if limits.memory_mib > budget {
            return Err(Violation {
                field: field("memoryMiB"),
                message: format!(
                    "{} exceeds build.memoryBudgetMiB ({budget}); lower it or raise the budget",
                    limits.memory_mib
                ),
            });
        }
    }
    Ok(())
}

/// Requires `value >= 1` of `field`.
fn at_least_one(field: &str, value: u64) -> Result<(), Violation> {
    if value == 0 {
        return Err(Violation {
            field: field.to_string(),
            message: "must be at least 1, found 0".to_string(),
        });
    }
    Ok(())
}
