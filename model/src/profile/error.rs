//! Why a hardware profile could not be produced.

use std::io;
use std::path::PathBuf;

use crate::detect::DetectError;

/// Why a hardware profile could not be loaded or detected.
///
/// Every message is complete for users: it names the file (the *origin* given to
/// [`Profile::from_json_str`](super::Profile::from_json_str)), the field, and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The pinned file does not exist.
    #[error(
        "hardware profile {} does not exist; run 'nix-tier profile > {}' to create one",
        path.display(),
        path.display()
    )]
    NotFound {
        /// The pinned file.
        path: PathBuf,
    },
    /// The pinned file exists but cannot be read.
    #[error("hardware profile {}: cannot read it: {source}", path.display())]
    Read {
        /// The pinned file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The text is not JSON.
    #[error(
        "hardware profile {origin}: invalid JSON at line {line} column {column}: {message}; \
         fix the syntax or regenerate the file with 'nix-tier profile'"
    )]
    Syntax {
        /// The file or other origin of the text.
        origin: String,
        /// Line of the error, from 1.
        line: usize,
        /// Column of the error, from 1.
        column: usize,
        /// What the JSON parser expected.
        message: String,
    },
    /// The profile has a schema version this crate does not read.
    #[error(
        "hardware profile {origin}: schemaVersion {found} is not supported; this nix-tier \
         reads schemaVersion {supported}; regenerate the file with 'nix-tier profile'",
        supported = super::SCHEMA_VERSION
    )]
    UnsupportedSchemaVersion {
        /// The file or other origin of the text.
        origin: String,
        /// The schema version as written.
        found: String,
    },
    /// A field is missing, unknown, of the wrong type or out of range.
    #[error("hardware profile {origin}: field {field}: {message}")]
    Field {
        /// The file or other origin of the text.
        origin: String,
        /// The field path, e.g. `cpu.threads` or `build.rules[0].match`.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The host could not be detected.
    #[error(transparent)]
    Detect(#[from] DetectError),
}
