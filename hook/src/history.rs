//! The build history: one row per finished build, in `<state dir>/history.sqlite`.
//!
//! The build watcher records a [`BuildRecord`] when a build it watched ends; the broker reads the
//! whole history once when it starts ([`History::learned`]) and learns each package's
//! reservation from the memory peaks of its past builds (`nix_tier_model::learning`, rule in
//! docs/enforcement.md); `nix-tier explain` and `simulate` ask the same of the database
//! directly; `nix-tier history` shows the rows and a [`PackageSummary`] per package.
//!
//! Several processes use the database at once (one hook per Nix client, one watcher per build),
//! so it runs in SQLite's write-ahead-log mode, where readers never wait for the writer, with a
//! busy timeout for writers. Its schema version is SQLite's `user_version`; [`History::open`]
//! migrates older databases and refuses newer ones.
//!
//! The file is created mode 0600 in the private (0700) state directory; a symlink in place of the
//! directory or the file is refused, so another user cannot redirect the writes.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix_tier_model::build::package_name;
use nix_tier_model::learning::{self, Learned, MAX_SAMPLES};
pub use nix_tier_model::learning::Outcome;
use nix_tier_model::Tier;
use rusqlite::{params, Connection, OpenFlags, Row, Transaction, TransactionBehavior};
use serde::{Deserialize, Serialize};

use crate::state::open_state_dir;

/// The database's file name in the state directory.
pub const HISTORY_FILE: &str = "history.sqlite";

/// The schema this version writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 2;

/// How long a writer waits for another writer before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema version 1 (from an empty database, version 0).
const SCHEMA_V1: &str = "
CREATE TABLE builds (
    id              INTEGER PRIMARY KEY,
    drv             TEXT    NOT NULL,
    package         TEXT    NOT NULL,
    version         TEXT    NOT NULL,
    tier            TEXT    NOT NULL CHECK (tier IN ('heavy', 'medium', 'light')),
    started_unix_ms INTEGER NOT NULL,
    wall_ms         INTEGER NOT NULL,
    cpu_ms          INTEGER,
    peak_mib        INTEGER,
    limit_mib       INTEGER,
    outcome         TEXT    NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'oom-killed'))
);
-- The hook's one query per build: a package's recent peaks of one outcome.
CREATE INDEX builds_by_package_outcome ON builds (package, outcome, started_unix_ms);
-- nix-tier history, with and without --package.
CREATE INDEX builds_by_package ON builds (package, started_unix_ms);
CREATE INDEX builds_by_start ON builds (started_unix_ms);
";

/// Schema version 2: how long each build waited for admission and held its lease (NULL in rows
/// from version 1).
const SCHEMA_V2: &str = "
ALTER TABLE builds ADD COLUMN waited_ms INTEGER;
ALTER TABLE builds ADD COLUMN leased_ms INTEGER;
";

/// The columns a [`BuildRecord`] is read from, in [`RawRow::read`]'s order; `waited_ms` and
/// `leased_ms` are NULL in a database of schema version 1 opened read-only (not migrated).
fn record_columns(version_2: bool) -> &'static str {
    match version_2 {
        true => "drv, package, version, tier, started_unix_ms, wall_ms, cpu_ms, peak_mib, limit_mib, outcome, waited_ms, leased_ms",
        false => "drv, package, version, tier, started_unix_ms, wall_ms, cpu_ms, peak_mib, limit_mib, outcome, NULL, NULL",
    }
}

/// One finished build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildRecord {
    /// The .drv path.
    pub drv: String,
    /// The derivation name without its version ([`package_and_version`]).
    pub package: String,
    /// The rest of the derivation name (may be empty).
    pub version: String,
    /// The tier it ran in.
    pub tier: Tier,
    /// When it started, milliseconds since the epoch.
    pub started_unix_ms: u64,
    /// How long it ran, milliseconds: from its admission until Nix released its output locks.
    pub wall_ms: u64,
    /// How long it held its lease, milliseconds: from its admission until the watcher saw its
    /// processes gone (often before Nix, registering the outputs, released the locks); `None` in
    /// rows recorded before nix-tier recorded leases.
    pub leased_ms: Option<u64>,
    /// CPU time of all its processes (user + system), milliseconds, when measured.
    pub cpu_ms: Option<u64>,
    /// Its memory peak, MiB, when measured.
    #[serde(rename = "peakMiB")]
    pub peak_mib: Option<u64>,
    /// The memory limit it ran under, MiB, if any.
    #[serde(rename = "limitMiB")]
    pub limit_mib: Option<u64>,
    /// How it ended.
    pub outcome: Outcome,
    /// How long it waited for admission, milliseconds: from the hook's first question about it
    /// to its admission; `None` in rows recorded before nix-tier recorded waits.
    pub waited_ms: Option<u64>,
}

impl BuildRecord {
    /// Counts this build in `learned`, as [`History::learned`] counts the rows it reads.
    pub fn teach(&self, learned: &mut Learned) {
        learned.record(&self.package, self.started_unix_ms, self.outcome, self.wall_ms, self.peak_mib);
    }
}

/// A derivation name split into package and version: the package as
/// [`package_name`] (`builtins.parseDrvName`) finds it, the version everything after
/// `package-` (`nodejs-slim-22.11.0` → `nodejs-slim`, `22.11.0`; `hello` → `hello`, ``).
pub fn package_and_version(drv_name: &str) -> (String, String) {
    let package = package_name(drv_name);
    let version = drv_name[package.len()..].strip_prefix('-').unwrap_or_default();
    (package.to_string(), version.to_string())
}

/// What the history says about one package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PackageSummary {
    /// The package.
    pub package: String,
    /// Builds recorded.
    pub builds: u64,
    /// Of which failed (not OOM-killed).
    pub failures: u64,
    /// Of which the OOM killer ended.
    pub oom_kills: u64,
    /// Median wall time of its succeeded builds (the lower median), milliseconds.
    pub median_wall_ms: Option<u64>,
    /// Longest wall time of its succeeded builds, milliseconds.
    pub max_wall_ms: Option<u64>,
    /// Highest memory peak of any of its builds, MiB.
    #[serde(rename = "maxPeakMiB")]
    pub max_peak_mib: Option<u64>,
    /// 95th percentile (nearest rank) of the peaks of its succeeded builds, MiB.
    #[serde(rename = "p95PeakMiB")]
    pub p95_peak_mib: Option<u64>,
    /// The tier of its latest build.
    pub last_tier: Tier,
    /// When its latest build started, milliseconds since the epoch.
    pub last_started_unix_ms: u64,
}

/// Why the history could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The state directory could not be created or is unsafe.
    #[error("state directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// The database file could not be created or opened, or is unsafe.
    #[error("history database {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// SQLite failed.
    #[error("history database {path}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: rusqlite::Error,
    },
    /// The database was written by a newer nix-tier.
    #[error("history database {path} has schema version {found}; this nix-tier knows only up to {known} (upgrade nix-tier)")]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Its `user_version`.
        found: i64,
        /// [`SCHEMA_VERSION`].
        known: i64,
    },
    /// A value does not fit the database (numbers above `i64::MAX`) or a stored value is invalid.
    #[error("history database {path}: {what}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What.
        what: String,
    },
}

/// An open history database.
pub struct History {
    conn: Connection,
    path: PathBuf,
    /// Whether the schema has `waited_ms` and `leased_ms` (version 2 on; an older one is read
    /// without migrating).
    version_2: bool,
}

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("History").field("path", &self.path).finish_non_exhaustive()
    }
}

impl History {
    /// Opens `<state_dir>/history.sqlite` only to read it, creating and changing nothing (for
    /// `nix-tier status`, `explain` and `history`); `None` when no build was recorded yet.
    pub fn open_read_only(state_dir: &Path) -> Result<Option<History>, HistoryError> {
        let path = state_dir.join(HISTORY_FILE);
        match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Ok(meta) if meta.file_type().is_symlink() => {
                let source = io::Error::new(io::ErrorKind::PermissionDenied, "is a symlink; refusing to open it");
                return Err(HistoryError::File { path, source });
            }
            _ => {}
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let sqlite = |source| HistoryError::Sqlite { path: path.clone(), source };
        let conn = Connection::open_with_flags(&path, flags).map_err(sqlite)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite)?;
        let mut history = History { conn, path, version_2: false };
        history.version_2 = history.user_version()? >= 2;
        Ok(Some(history))
    }

    /// Opens (creating if needed) `<state_dir>/history.sqlite`, creating `state_dir` mode 0700
    /// if needed, and migrates its schema. Refuses a symlink in place of either.
    pub fn open(state_dir: &Path) -> Result<History, HistoryError> {
        open_state_dir(state_dir, true).map_err(|source| HistoryError::Dir { path: state_dir.to_path_buf(), source })?;
        let path = state_dir.join(HISTORY_FILE);
        create_private_file(&path).map_err(|source| HistoryError::File { path: path.clone(), source })?;
        // NOFOLLOW: SQLite refuses a symlink too, should one appear after the check above.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let sqlite = |source| HistoryError::Sqlite { path: path.clone(), source };
        let conn = Connection::open_with_flags(&path, flags).map_err(sqlite)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite)?;
        let history = History { conn, path, version_2: true };
        // Switching a fresh database to WAL and migrating it while other processes do the same
        // can fail with SQLITE_BUSY at once (SQLite skips the busy handler where waiting could
        // deadlock); both steps are idempotent, so try again.
        let deadline = Instant::now() + BUSY_TIMEOUT;
        loop {
            match history.prepare() {
                Err(HistoryError::Sqlite { source, .. })
                    if source.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                result => return result.map(|()| history),
            }
        }
    }

    /// Sets the connection up (WAL, synchronous) and migrates the schema.
    fn prepare(&self) -> Result<(), HistoryError> {
        let mode: String = self.conn.pragma_query_value(None, "journal_mode", |row| row.get(0)).map_err(|e| self.sqlite(e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            // Where WAL is impossible (no shared memory) SQLite keeps its rollback journal, which
            // is slower for concurrent readers but as correct.
            self.conn
                .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))
                .map_err(|e| self.sqlite(e))?;
        }
        // In WAL mode NORMAL is durable against crashes of the process; a power cut may lose the
        // newest rows, which is fine for statistics.
        self.conn.pragma_update(None, "synchronous", "NORMAL").map_err(|e| self.sqlite(e))?;
        self.migrate()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sqlite(&self, source: rusqlite::Error) -> HistoryError {
        HistoryError::Sqlite { path: self.path.clone(), source }
    }

    fn invalid(&self, what: String) -> HistoryError {
        HistoryError::Invalid { path: self.path.clone(), what }
    }

    fn user_version(&self) -> Result<i64, HistoryError> {
        self.conn.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(|e| self.sqlite(e))
    }

    /// Brings the schema to [`SCHEMA_VERSION`]; a plain read when it already is.
    fn migrate(&self) -> Result<(), HistoryError> {
        let check = |found: i64| match found {
            found if found > SCHEMA_VERSION => Err(HistoryError::TooNew { path: self.path.clone(), found, known: SCHEMA_VERSION }),
            found if found < 0 => Err(self.invalid(format!("negative schema version {found}"))),
            _ => Ok(found),
        };
        if check(self.user_version()?)? == SCHEMA_VERSION {
            return Ok(());
        }
        // IMMEDIATE: one process migrates, the others wait and then find it done.
        let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate).map_err(|e| self.sqlite(e))?;
        let found = check(self.user_version()?)?;
        if found < 1 {
            tx.execute_batch(SCHEMA_V1).map_err(|e| self.sqlite(e))?;
        }
        if found < 2 {
            tx.execute_batch(SCHEMA_V2).map_err(|e| self.sqlite(e))?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(|e| self.sqlite(e))?;
        tx.commit().map_err(|e| self.sqlite(e))
    }

    /// Records one finished build.
    pub fn record(&self, row: &BuildRecord) -> Result<(), HistoryError> {
        let int = |field: &str, value: u64| {
            i64::try_from(value).map_err(|_| self.invalid(format!("{field} {value} is too large to record")))
        };
        let opt = |field: &str, value: Option<u64>| value.map(|v| int(field, v)).transpose();
        let values = (
            int("startedUnixMs", row.started_unix_ms)?,
            int("wallMs", row.wall_ms)?,
            opt("cpuMs", row.cpu_ms)?,
            opt("peakMiB", row.peak_mib)?,
            opt("limitMiB", row.limit_mib)?,
            opt("waitedMs", row.waited_ms)?,
            opt("leasedMs", row.leased_ms)?,
        );
        let mut insert = self
            .conn
            .prepare_cached(
                "INSERT INTO builds (drv, package, version, tier, started_unix_ms, wall_ms, cpu_ms, peak_mib, limit_mib, outcome, waited_ms, leased_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )
            .map_err(|e| self.sqlite(e))?;
        insert
            .execute(params![
                row.drv,
                row.package,
                row.version,
                row.tier.as_str(),
                values.0,
                values.1,
                values.2,
                values.3,
                values.4,
                row.outcome.as_str(),
                values.5,
                values.6
            ])
            .map_err(|e| self.sqlite(e))?;
        Ok(())
    }

    /// What the history says of every package ([`Learned`]), read once so that decisions need
    /// not read the database: the broker's starting point. One pass over the table.
    pub fn learned(&self) -> Result<Learned, HistoryError> {
        let sql = "SELECT package, started_unix_ms, outcome, wall_ms, peak_mib FROM builds ORDER BY started_unix_ms, id";
        let mut query = self.conn.prepare(sql).map_err(|e| self.sqlite(e))?;
        let mut rows = query.query([]).map_err(|e| self.sqlite(e))?;
        let mut learned = Learned::default();
        while let Some(row) = rows.next().map_err(|e| self.sqlite(e))? {
            let read = || -> rusqlite::Result<(String, i64, String, i64, Option<i64>)> {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
            };
            let (package, started, outcome, wall, peak) = read().map_err(|e| self.sqlite(e))?;
            let outcome: Outcome = outcome.parse().map_err(|e| self.invalid(e))?;
            let peak = peak.map(|p| self.unsigned("peak_mib", p)).transpose()?;
            learned.record(&package, self.unsigned("started_unix_ms", started)?, outcome, self.unsigned("wall_ms", wall)?, peak);
        }
        Ok(learned)
    }

    /// The CPU time `package`'s builds use, milliseconds: the median over its newest succeeded
    /// builds whose CPU time was measured (at most [`MAX_SAMPLES`]). One indexed query.
    pub fn expected_cpu_ms(&self, package: &str) -> Result<Option<u64>, HistoryError> {
        self.recent_median(package, "cpu_ms")
    }

    /// The median of `column` over `package`'s newest succeeded builds that have it.
    fn recent_median(&self, package: &str, column: &'static str) -> Result<Option<u64>, HistoryError> {
        let sql = format!(
            "SELECT {column} FROM builds WHERE package = ?1 AND outcome = 'succeeded' AND {column} IS NOT NULL
             ORDER BY started_unix_ms DESC LIMIT ?2"
        );
        let limit = i64::try_from(MAX_SAMPLES).unwrap_or(i64::MAX);
        let mut query = self.conn.prepare_cached(&sql).map_err(|e| self.sqlite(e))?;
        let mut values = query
            .query_map(params![package, limit], |row| row.get::<_, i64>(0))
            .and_then(Iterator::collect::<Result<Vec<i64>, _>>)
            .map_err(|e| self.sqlite(e))?;
        values.sort_unstable();
        values.get(values.len() / 2).map(|v| self.unsigned(column, *v)).transpose()
    }

    fn unsigned(&self, column: &str, value: i64) -> Result<u64, HistoryError> {
        u64::try_from(value).map_err(|_| self.invalid(format!("negative {column} {value}")))
    }

    /// The `limit` newest builds, of `package` or of all packages, newest first.
    pub fn rows(&self, package: Option<&str>, limit: usize) -> Result<Vec<BuildRecord>, HistoryError> {
        let columns = record_columns(self.version_2);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let raw = match package {
            Some(package) => self.query_rows(
                &format!("SELECT {columns} FROM builds WHERE package = ?1 ORDER BY started_unix_ms DESC, id DESC LIMIT ?2"),
                params![package, limit],
            ),
            None => self.query_rows(
                &format!("SELECT {columns} FROM builds ORDER BY started_unix_ms DESC, id DESC LIMIT ?1"),
                params![limit],
            ),
        }?;
        raw.into_iter().map(|raw| self.decode(raw)).collect()
    }

    /// The builds that started at or after `since_unix_ms`, oldest first.
    pub fn rows_since(&self, since_unix_ms: u64) -> Result<Vec<BuildRecord>, HistoryError> {
        let since = i64::try_from(since_unix_ms).unwrap_or(i64::MAX);
        let sql = format!(
            "SELECT {} FROM builds WHERE started_unix_ms >= ?1 ORDER BY started_unix_ms, id",
            record_columns(self.version_2)
        );
        let raw = self.query_rows(&sql, params![since])?;
        raw.into_iter().map(|raw| self.decode(raw)).collect()
    }

    fn query_rows(&self, sql: &str, params: &[&dyn rusqlite::ToSql]) -> Result<Vec<RawRow>, HistoryError> {
        let mut query = self.conn.prepare_cached(sql).map_err(|e| self.sqlite(e))?;
        query
            .query_map(params, RawRow::read)
            .and_then(Iterator::collect::<Result<Vec<RawRow>, _>>)
            .map_err(|e| self.sqlite(e))
    }

    fn decode(&self, raw: RawRow) -> Result<BuildRecord, HistoryError> {
        let opt = |column: &str, value: Option<i64>| value.map(|v| self.unsigned(column, v)).transpose();
        Ok(BuildRecord {
            tier: raw.tier.parse().map_err(|e| self.invalid(e))?,
            outcome: raw.outcome.parse().map_err(|e| self.invalid(e))?,
            started_unix_ms: self.unsigned("started_unix_ms", raw.started_unix_ms)?,
            wall_ms: self.unsigned("wall_ms", raw.wall_ms)?,
            cpu_ms: opt("cpu_ms", raw.cpu_ms)?,
            peak_mib: opt("peak_mib", raw.peak_mib)?,
            limit_mib: opt("limit_mib", raw.limit_mib)?,
            waited_ms: opt("waited_ms", raw.waited_ms)?,
            leased_ms: opt("leased_ms", raw.leased_ms)?,
            drv: raw.drv,
            package: raw.package,
            version: raw.version,
        })
    }

    /// One summary per package, by package name.
    pub fn summary(&self) -> Result<Vec<PackageSummary>, HistoryError> {
        let sql = format!("SELECT {} FROM builds ORDER BY package, started_unix_ms, id", record_columns(self.version_2));
        let mut query = self.conn.prepare_cached(&sql).map_err(|e| self.sqlite(e))?;
        let mut rows = query.query([]).map_err(|e| self.sqlite(e))?;
        let mut summaries: Vec<PackageSummary> = Vec::new();
        let mut walls: Vec<u64> = Vec::new();
        let mut peaks: Vec<u64> = Vec::new();
        while let Some(row) = rows.next().map_err(|e| self.sqlite(e))? {
            let build = self.decode(RawRow::read(row).map_err(|e| self.sqlite(e))?)?;
            if summaries.last().is_none_or(|s| s.package != build.package) {
                if let Some(done) = summaries.last_mut() {
                    finish_summary(done, &mut walls, &mut peaks);
                }
                summaries.push(PackageSummary {
                    package: build.package.clone(),
                    builds: 0,
                    failures: 0,
                    oom_kills: 0,
                    median_wall_ms: None,
                    max_wall_ms: None,
                    max_peak_mib: None,
                    p95_peak_mib: None,
                    last_tier: build.tier,
                    last_started_unix_ms: build.started_unix_ms,
                });
            }
            let summary = summaries.last_mut().expect("pushed above");
            summary.builds += 1;
            summary.last_tier = build.tier;
            summary.last_started_unix_ms = build.started_unix_ms;
            summary.max_peak_mib = summary.max_peak_mib.max(build.peak_mib);
            match build.outcome {
                Outcome::Succeeded => {
                    walls.push(build.wall_ms);
                    peaks.extend(build.peak_mib);
                }
                Outcome::Failed => summary.failures += 1,
                Outcome::OomKilled => summary.oom_kills += 1,
            }
        }
        if let Some(done) = summaries.last_mut() {
            finish_summary(done, &mut walls, &mut peaks);
        }
        Ok(summaries)
    }

    /// How many builds are recorded.
    pub fn count(&self) -> Result<u64, HistoryError> {
        let n: i64 = self.conn.query_row("SELECT count(*) FROM builds", [], |row| row.get(0)).map_err(|e| self.sqlite(e))?;
        self.unsigned("count", n)
    }
}

fn finish_summary(summary: &mut PackageSummary, walls: &mut Vec<u64>, peaks: &mut Vec<u64>) {
    walls.sort_unstable();
    peaks.sort_unstable();
    summary.median_wall_ms = learning::nearest_rank(walls, 50);
    summary.max_wall_ms = walls.last().copied();
    summary.p95_peak_mib = learning::nearest_rank(peaks, learning::PERCENTILE);
    walls.clear();
    peaks.clear();
}

/// A row as stored, before validation.
struct RawRow {
    drv: String,
    package: String,
    version: String,
    tier: String,
    started_unix_ms: i64,
    wall_ms: i64,
    cpu_ms: Option<i64>,
    peak_mib: Option<i64>,
    limit_mib: Option<i64>,
    outcome: String,
    waited_ms: Option<i64>,
    leased_ms: Option<i64>,
}

impl RawRow {
    fn read(row: &Row<'_>) -> rusqlite::Result<RawRow> {
        Ok(RawRow {
            drv: row.get(0)?,
            package: row.get(1)?,
            version: row.get(2)?,
            tier: row.get(3)?,
            started_unix_ms: row.get(4)?,
            wall_ms: row.get(5)?,
            cpu_ms: row.get(6)?,
            peak_mib: row.get(7)?,
            limit_mib: row.get(8)?,
            outcome: row.get(9)?,
            waited_ms: row.get(10)?,
            leased_ms: row.get(11)?,
        })
    }
}

/// Creates `path` mode 0600 if missing (without following a symlink), and checks that it is a
/// regular file; one accessible to other users is made private (or refused when that fails).
fn create_private_file(path: &Path) -> io::Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).bits())
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(code) if code == nix::errno::Errno::ELOOP as i32 => {
                io::Error::new(io::ErrorKind::PermissionDenied, "is a symlink; refusing to open it")
            }
            _ => e,
        })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "is not a regular file"));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(|e| {
            io::Error::new(e.kind(), format!("is accessible to other users and cannot be made private ({e})"))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(package: &str, started: u64, peak: Option<u64>, outcome: Outcome) -> BuildRecord {
        BuildRecord {
            drv: format!("/nix/store/00000000000000000000000000000000-{package}-1.0.drv"),
            package: package.to_string(),
            version: "1.0".to_string(),
            tier: Tier::Medium,
            started_unix_ms: started,
            wall_ms: started % 1000 + 1000,
            leased_ms: Some(started % 1000 + 990),
            cpu_ms: Some(500),
            peak_mib: peak,
            limit_mib: Some(4096),
            outcome,
            waited_ms: Some(started % 7),
        }
    }

    #[test]
    fn package_and_version_split_like_parse_drv_name() {
        let split = |name| package_and_version(name);
        assert_eq!(split("nodejs-slim-22.11.0"), ("nodejs-slim".into(), "22.11.0".into()));
        assert_eq!(split("hello"), ("hello".into(), String::new()));
        assert_eq!(split("linux-6.6.1-modules"), ("linux".into(), "6.6.1-modules".into()));
        assert_eq!(split("foo-"), ("foo-".into(), String::new()));
    }

    #[test]
    fn records_read_back_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(&dir.path().join("state")).unwrap();
        assert!(history.rows(None, 10).unwrap().is_empty());
        let a = build("a", 1000, Some(100), Outcome::Succeeded);
        let b = BuildRecord {
            cpu_ms: None,
            peak_mib: None,
            limit_mib: None,
            waited_ms: None,
            leased_ms: None,
            tier: Tier::Heavy,
            ..build("b", 2000, None, Outcome::Failed)
        };
        let c = build("a", 3000, Some(300), Outcome::OomKilled);
        for row in [&a, &b, &c] {
            history.record(row).unwrap();
        }
        assert_eq!(history.rows(None, 10).unwrap(), vec![c.clone(), b.clone(), a.clone()]);
        assert_eq!(history.rows_since(2000).unwrap(), vec![b.clone(), c.clone()], "oldest first");
        assert_eq!(history.rows(None, 2).unwrap(), vec![c.clone(), b]);
        assert_eq!(history.rows(Some("a"), 10).unwrap(), vec![c, a]);
        assert_eq!(history.count().unwrap(), 3);
        // Survives reopening.
        drop(history);
        assert_eq!(History::open(&dir.path().join("state")).unwrap().count().unwrap(), 3);
    }

    #[test]
    fn the_learned_figures_read_back_as_they_were_taught() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path()).unwrap();
        let mut learned = Learned::default();
        // Builds of three packages with distinct starts, recorded in a scrambled order (they
        // end in another order than they start), taught as the broker is taught.
        let mut seed = 7u64;
        let mut next = |bound: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % bound
        };
        let starts: Vec<u64> = (0..300u64).map(|i| (i * 7919) % 300).collect();
        for started in starts {
            let package = ["a", "b", "c"][next(3) as usize];
            let outcome = [Outcome::Succeeded, Outcome::Succeeded, Outcome::Succeeded, Outcome::Failed, Outcome::OomKilled][next(5) as usize];
            let peak = (next(4) > 0).then(|| next(2000));
            let row = BuildRecord { wall_ms: next(100_000), ..build(package, started, peak, outcome) };
            history.record(&row).unwrap();
            row.teach(&mut learned);
        }
        let read = history.learned().unwrap();
        for package in ["a", "b", "c", "none"] {
            assert_eq!(read.peaks(package), learned.peaks(package));
            assert_eq!(read.expected_wall_ms(package), learned.expected_wall_ms(package));
        }
    }

    #[test]
    fn peaks_are_of_succeeded_builds_newest_first_and_an_oom_kill_resets_learning() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path()).unwrap();
        for (started, peak, outcome) in [
            (1, Some(100), Outcome::Succeeded),
            (2, Some(900), Outcome::OomKilled),
            (3, Some(300), Outcome::Succeeded),
            (4, Some(999), Outcome::Failed),
            (5, None, Outcome::Succeeded),
            (6, Some(200), Outcome::Succeeded),
        ] {
            history.record(&build("p", started, peak, outcome)).unwrap();
        }
        history.record(&build("other", 7, Some(5), Outcome::Succeeded)).unwrap();
        let learned = history.learned().unwrap();
        assert_eq!(learned.peaks("p"), vec![200, 300]);
        assert!(learned.peaks("nothing").is_empty());
    }

    #[test]
    fn learning_uses_at_most_twenty_peaks() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path()).unwrap();
        for i in 0..25 {
            history.record(&build("p", i, Some(i), Outcome::Succeeded)).unwrap();
        }
        let peaks = history.learned().unwrap().peaks("p");
        assert_eq!(peaks, (5..25).rev().collect::<Vec<u64>>());
    }

    #[test]
    fn summary_figures() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path()).unwrap();
        let mut rows = vec![
            BuildRecord { wall_ms: 10_000, ..build("zlib", 1, Some(50), Outcome::Succeeded) },
            BuildRecord { wall_ms: 30_000, ..build("zlib", 2, Some(70), Outcome::Succeeded) },
            BuildRecord { wall_ms: 20_000, ..build("zlib", 3, Some(60), Outcome::Succeeded) },
            BuildRecord { wall_ms: 99_000, ..build("zlib", 4, Some(512), Outcome::OomKilled) },
            BuildRecord { wall_ms: 1_000, tier: Tier::Light, ..build("zlib", 5, None, Outcome::Failed) },
            BuildRecord { wall_ms: 5_000, ..build("bash", 6, None, Outcome::Failed) },
        ];
        rows.reverse(); // insertion order must not matter
        for row in &rows {
            history.record(row).unwrap();
        }
        let summary = history.summary().unwrap();
        assert_eq!(
            summary,
            vec![
                PackageSummary {
                    package: "bash".into(),
                    builds: 1,
                    failures: 1,
                    oom_kills: 0,
                    median_wall_ms: None,
                    max_wall_ms: None,
                    max_peak_mib: None,
                    p95_peak_mib: None,
                    last_tier: Tier::Medium,
                    last_started_unix_ms: 6,
                },
                PackageSummary {
                    package: "zlib".into(),
                    builds: 5,
                    failures: 1,
                    oom_kills: 1,
                    median_wall_ms: Some(20_000),
                    max_wall_ms: Some(30_000),
                    max_peak_mib: Some(512),
                    p95_peak_mib: Some(70),
                    last_tier: Tier::Light,
                    last_started_unix_ms: 5,
                },
            ]
        );
        let json = serde_json::to_value(&summary[1]).unwrap();
        assert_eq!(json["p95PeakMiB"], 70);
        assert_eq!(json["lastTier"], "light");
        let json = serde_json::to_value(build("x", 1, Some(2), Outcome::OomKilled)).unwrap();
        assert_eq!(json["outcome"], "oom-killed");
        assert_eq!(json["peakMiB"], 2);
        assert_eq!(json["startedUnixMs"], 1);
    }

    #[test]
    fn concurrent_writers_from_fresh_do_not_fail() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let state = state.clone();
                std::thread::spawn(move || {
                    // Every thread opens (and may migrate) the fresh database at the same time.
                    let history = History::open(&state).unwrap();
                    for i in 0..50 {
                        history.record(&build(&format!("p{t}"), i, Some(i), Outcome::Succeeded)).unwrap();
                        history.learned().unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let history = History::open(&state).unwrap();
        assert_eq!(history.count().unwrap(), 200);
        assert_eq!(history.summary().unwrap().len(), 4);
    }

    #[test]
    fn files_are_private_and_symlinks_refused() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let history = History::open(&state).unwrap();
        history.record(&build("p", 1, Some(1), Outcome::Succeeded)).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(HISTORY_FILE)), 0o600);
        assert_eq!(mode(&state.join(format!("{HISTORY_FILE}-wal"))), 0o600);

        // The database file a symlink: refused, the target untouched.
        let other = dir.path().join("other");
        fs::create_dir(&other).unwrap();
        let target = dir.path().join("target.sqlite");
        fs::write(&target, "").unwrap();
        symlink(&target, other.join(HISTORY_FILE)).unwrap();
        let err = History::open(&other).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert_eq!(fs::read(&target).unwrap(), b"");
        // A dangling symlink is not followed to create its target either.
        let dangling = dir.path().join("dangling");
        fs::create_dir(&dangling).unwrap();
        symlink(dir.path().join("nowhere"), dangling.join(HISTORY_FILE)).unwrap();
        assert!(History::open(&dangling).is_err());
        assert!(!dir.path().join("nowhere").exists());
        // The state directory a symlink: refused.
        symlink(&state, dir.path().join("link")).unwrap();
        let err = History::open(&dir.path().join("link")).unwrap_err();
        assert!(matches!(err, HistoryError::Dir { .. }), "{err}");

        // An existing file readable by others is made private.
        let loose = dir.path().join("loose");
        fs::create_dir(&loose).unwrap();
        fs::write(loose.join(HISTORY_FILE), "").unwrap();
        fs::set_permissions(loose.join(HISTORY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        History::open(&loose).unwrap();
        assert_eq!(mode(&loose.join(HISTORY_FILE)), 0o600);
    }

    #[test]
    fn schema_is_versioned_and_newer_databases_refused() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path()).unwrap();
        assert_eq!(history.user_version().unwrap(), SCHEMA_VERSION);
        history.conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        drop(history);
        let err = History::open(dir.path()).unwrap_err();
        assert!(matches!(err, HistoryError::TooNew { found: 3, known: 2, .. }), "{err}");
    }

    #[test]
    fn a_version_1_database_is_read_as_it_is_and_migrated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(HISTORY_FILE)).unwrap();
        conn.execute_batch(SCHEMA_V1).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO builds (drv, package, version, tier, started_unix_ms, wall_ms, cpu_ms, peak_mib, limit_mib, outcome)
             VALUES ('/nix/store/x-old-1.0.drv', 'old', '1.0', 'light', 5, 10, NULL, 20, 30, 'succeeded')",
            [],
        )
        .unwrap();
        drop(conn);
        let old = BuildRecord {
            drv: "/nix/store/x-old-1.0.drv".into(),
            package: "old".into(),
            version: "1.0".into(),
            tier: Tier::Light,
            started_unix_ms: 5,
            wall_ms: 10,
            leased_ms: None,
            cpu_ms: None,
            peak_mib: Some(20),
            limit_mib: Some(30),
            outcome: Outcome::Succeeded,
            waited_ms: None,
        };
        // Read-only: nothing changes, the rows read without waits.
        let read_only = History::open_read_only(dir.path()).unwrap().unwrap();
        assert_eq!(read_only.rows(None, 10).unwrap(), vec![old.clone()]);
        assert_eq!(read_only.rows_since(0).unwrap(), vec![old.clone()]);
        assert_eq!(read_only.summary().unwrap().len(), 1);
        assert_eq!(read_only.user_version().unwrap(), 1);
        drop(read_only);
        // Opened to write: migrated, the old row kept, new rows with their waits.
        let history = History::open(dir.path()).unwrap();
        assert_eq!(history.user_version().unwrap(), SCHEMA_VERSION);
        let new = build("new", 7, Some(1), Outcome::Succeeded);
        history.record(&new).unwrap();
        assert_eq!(history.rows_since(0).unwrap(), vec![old, new]);
    }

    #[test]
    fn values_beyond_i64_are_refused_not_wrapped() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path()).unwrap();
        let err = history.record(&build("p", u64::MAX, None, Outcome::Succeeded)).unwrap_err();
        assert!(err.to_string().contains("startedUnixMs"), "{err}");
        assert_eq!(history.count().unwrap(), 0);
    }
}
