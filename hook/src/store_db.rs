//! What Nix's store database says of a waiting build: how many derivations not built yet need
//! it ([`nix_tier_model::leases::Rank`]). Nix asks only about ready builds, so what waits on a
//! build is known only from the store: a `.drv` file refers to the `.drv` files of its inputs,
//! and Nix's database keeps those references (`Refs`) and each derivation's outputs
//! (`DerivationOutputs`). A derivation none of whose outputs is valid is not built yet.
//!
//! The hook names the database of its Nix's store ([`database_path`], in its hello); the broker
//! counts each build that waits and runs long enough to be ordered by the count
//! ([`nix_tier_model::leases::RANKED_BY_DEPENDENTS_FROM_MS`]), in a thread of its own (a query
//! took some 20 µs, too long for a decision's path); a build admitted at once is never counted. The count includes
//! derivations instantiated earlier and never built (another evaluation), so it only orders
//! builds expected to run as long. The database is read, never written, and any failure counts
//! nothing: the order is then Nix's.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use crate::protocol::Settings;

/// The most dependents counted: a derivation that thousands of others need (a compiler, the
/// standard environment) ranks above most builds anyway, and the count stays a few thousand
/// index lookups at most.
const COUNTED_AT_MOST: u32 = 10_000;

/// Nix's store database, open read-only.
pub struct StoreDb {
    connection: Connection,
}

impl StoreDb {
    /// Opens the database at `path` read-only; `None` when it cannot be read (then nothing is
    /// counted).
    pub fn open(path: &Path) -> Option<StoreDb> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let connection = Connection::open_with_flags(path, flags).ok()?;
        Some(StoreDb { connection })
    }

    /// How many derivations not built yet refer to `drv` (an input of theirs), up to
    /// [`COUNTED_AT_MOST`]; 0 when the database cannot say.
    pub fn dependents(&self, drv: &str) -> u32 {
        let query = "SELECT count(*) FROM (
               SELECT 1 FROM Refs r JOIN ValidPaths d ON d.id = r.referrer
               WHERE r.reference = (SELECT id FROM ValidPaths WHERE path = ?1)
                 AND d.path LIKE '%.drv'
                 AND NOT EXISTS (SELECT 1 FROM DerivationOutputs o JOIN ValidPaths v ON v.path = o.path WHERE o.drv = d.id)
               LIMIT ?2)";
        let counted = self.connection.prepare_cached(query).and_then(|mut statement| statement.query_row((drv, COUNTED_AT_MOST), |row| row.get(0)));
        counted.unwrap_or(0)
    }
}

/// The database of the store a Nix worker with `settings` builds in (this process's
/// `NIX_STATE_DIR` is the worker's); `None` for a store that is not local.
pub fn database_path(settings: &Settings) -> Option<PathBuf> {
    database_path_of(settings.get("store").map_or("auto", String::as_str), std::env::var_os("NIX_STATE_DIR").map(PathBuf::from))
}

/// The database of the store named by Nix's `store` setting: a local store's `state`, or its
/// `root`'s state directory (a chroot store, also given as a bare path); for `auto` or `local`,
/// `state_dir` (`NIX_STATE_DIR`), else Nix's default. `None` for other stores (a daemon, a remote
/// store): this worker does not build in them.
fn database_path_of(store: &str, state_dir: Option<PathBuf>) -> Option<PathBuf> {
    let (scheme, params) = store.split_once('?').unwrap_or((store, ""));
    let param = |name: &str| params.split('&').find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='));
    let root = param("root").or(scheme.starts_with('/').then_some(scheme));
    let state = match (param("state"), root) {
        (Some(state), _) => PathBuf::from(state),
        (None, Some(root)) => Path::new(root).join("nix/var/nix"),
        (None, None) if matches!(scheme, "auto" | "local" | "") => state_dir.unwrap_or_else(|| PathBuf::from("/nix/var/nix")),
        (None, None) => return None,
    };
    Some(state.join("db/db.sqlite"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_is_found_where_nix_keeps_it_for_each_kind_of_store() {
        let db = |store: &str, state_dir: Option<&str>| database_path_of(store, state_dir.map(PathBuf::from));
        let at = |path: &str| Some(PathBuf::from(path));
        assert_eq!(db("auto", None), at("/nix/var/nix/db/db.sqlite"));
        assert_eq!(db("local", Some("/tmp/s")), at("/tmp/s/db/db.sqlite"));
        assert_eq!(db("local?root=/tmp/r", Some("/tmp/s")), at("/tmp/r/nix/var/nix/db/db.sqlite"));
        assert_eq!(db("/tmp/r", None), at("/tmp/r/nix/var/nix/db/db.sqlite"));
        assert_eq!(db("local?root=/tmp/r&state=/tmp/st", None), at("/tmp/st/db/db.sqlite"));
        assert_eq!(db("daemon", None), None);
        assert_eq!(db("ssh-ng://builder", None), None);
    }
}
