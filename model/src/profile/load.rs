//! Parsing and validating profile JSON, and loading pinned files.

use std::io;
use std::path::Path;

use serde::Deserialize;
use serde_json::error::Category;

use super::{validate, Cpu, Gpu, Memory, Profile, ProfileError, Source, Swap, SCHEMA_VERSION};
use crate::build::Build;

/// A profile as written: `source`, `swap`, `gpus` and `build` may be omitted.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawProfile {
    schema_version: u32,
    #[serde(default = "pinned")]
    source: Source,
    system: String,
    cpu: Cpu,
    memory: Memory,
    #[serde(default)]
    swap: Swap,
    #[serde(default)]
    gpus: Vec<Gpu>,
    #[serde(default)]
    build: Option<Build>,
}

/// The default of an omitted `source`.
fn pinned() -> Source {
    Source::Pinned
}

impl From<RawProfile> for Profile {
    /// Fills the defaults of omitted parts; a missing `build` is derived from the profile's
    /// own `cpu.threads` and `memory.totalMiB` by the default formula.
    fn from(raw: RawProfile) -> Profile {
        let build = raw
            .build
            .unwrap_or_else(|| Build::default_for(raw.cpu.threads, raw.memory.total_mib));
        Profile {
            schema_version: raw.schema_version,
            source: raw.source,
            system: raw.system,
            cpu: raw.cpu,
            memory: raw.memory,
            swap: raw.swap,
            gpus: raw.gpus,
            build,
        }
    }
}

impl Profile {
    /// Reads, parses and validates the pinned profile at `path`; its `source` becomes
    /// [`Source::Pinned`].
    pub fn load_pinned(path: &Path) -> Result<Profile, ProfileError> {
        // A profile is a few KiB; 1 MiB bounds what a FIFO or device in its place could cost.
        let bytes = crate::files::read_regular(path, 1 << 20).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ProfileError::NotFound {
                path: path.to_path_buf(),
            },
            _ => ProfileError::Read {
                path: path.to_path_buf(),
                source,
            },
        })?;
        let text = String::from_utf8(bytes).map_err(|e| ProfileError::Read {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidData, format!("is not UTF-8 ({e})")),
        })?;
        let mut profile = Profile::from_json_str(&text, &path.display().to_string())?;
        profile.source = Source::Pinned;
        Ok(profile)
    }

    /// Parses and validates profile JSON; `origin` (a file name) is named in errors.
    ///
    /// The parts a hand-written profile may omit are filled in: `source` becomes `pinned`,
    /// `swap` none, `gpus` none, `build.rules` none, `cpu.modelName` and `cpu.goamd64` null,
    /// and a missing `build` is derived from `cpu.threads` and `memory.totalMiB` by the
    /// [default formula](crate::tiers). Validation then checks the limits (see
    /// `docs/profile.md`).
    pub fn from_json_str(text: &str, origin: &str) -> Result<Profile, ProfileError> {
        // The first pass also rejects bad syntax and trailing characters.
        check_schema_version(text, origin)?;
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let profile: Profile =
            serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
                let field = error.path().to_string();
                from_serde(error.into_inner(), &field, origin, true)
            })?;
        validate::check(&profile).map_err(|violation| ProfileError::Field {
            origin: origin.to_string(),
            field: violation.field,
            message: violation.message,
        })?;
        Ok(profile)
    }
}

/// Refuses any `schemaVersion` other than [`SCHEMA_VERSION`] before the fields are read.
fn check_schema_version(text: &str, origin: &str) -> Result<(), ProfileError> {
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|error| match error.classify() {
            Category::Data => ProfileError::Field {
                origin: origin.to_string(),
                field: "(top level)".to_string(),
                message: "the profile must be a JSON object; regenerate it with 'nix-tier profile'"
                    .to_string(),
            },
            _ => from_serde(error, ".", origin, false),
        })?;
    match object.get("schemaVersion") {
        None => Err(ProfileError::Field {
            origin: origin.to_string(),
            field: "schemaVersion".to_string(),
            message: format!("missing; add \"schemaVersion\": {SCHEMA_VERSION}"),
        }),
        Some(serde_json::Value::Number(n)) if n.as_u64() != Some(u64::from(SCHEMA_VERSION)) => {
            Err(ProfileError::UnsupportedSchemaVersion {
                origin: origin.to_string(),
                found: n.to_string(),
            })
        }
        // Version 1, or not a number: the typed parse reports the latter with its position.
        Some(_) => Ok(()),
    }
}

/// Turns a serde_json error at `field` into a [`ProfileError`]. Once the text is known to
/// be syntactically valid JSON (`syntax_checked`), every error is about a field's value.
fn from_serde(
    error: serde_json::Error,
    field: &str,
    origin: &str,
    syntax_checked: bool,
) -> ProfileError {
    let (line, column) = (error.line(), error.column());
    let message = error.to_string();
    let message = message
        .strip_suffix(&format!(" at line {line} column {column}"))
        .unwrap_or(&message);
    if !syntax_checked && error.classify() != Category::Data {
        return ProfileError::Syntax {
            origin: origin.to_string(),
            line,
            column,
            message: message.to_string(),
        };
    }
    let (field, message) = explain(field, message);
    let position = if line > 0 {
        format!(" (line {line}, column {column})")
    } else {
        String::new()
    };
    ProfileError::Field {
        origin: origin.to_string(),
        field,
        message: format!("{message}{position}"),
    }
}

/// Rewrites serde's data error message at `field` as a field path and a message with a fix.
fn explain(field: &str, message: &str) -> (String, String) {
    if let Some(name) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        let path = if field == "." {
            name.to_string()
        } else {
            format!("{field}.{name}")
        };
        return (path, "missing; add it (see docs/profile.md)".to_string());
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        // serde_path_to_error's path already ends with the unknown name.
        let expected = rest.split_once('`').map_or("", |(_, expected)| expected);
        let expected = expected.trim_start_matches(", ").replace('`', "");
        return (
            field.to_string(),
            format!("unknown field; remove it or fix its spelling ({expected})"),
        );
    }
    if message == "expected value" {
        // serde_json's complaint about a non-string where a name (tier, source) belongs.
        return (field.to_string(), "expected a string".to_string());
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        let (value, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let expected = expected.trim_start_matches(", ").replace('`', "");
        return (
            field.to_string(),
            format!("\"{value}\" is not allowed; {expected}"),
        );
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some((found, expected)) = message
            .strip_prefix(prefix)
            .and_then(|rest| rest.rsplit_once(", expected "))
        {
            return (
                field.to_string(),
                format!(
                    "expected {}, found {}",
                    plain_type(expected),
                    plain_found(found)
                ),
            );
        }
    }
    (field.to_string(), message.to_string())
}

/// serde's name of an expected type in JSON words.
fn plain_type(expected: &str) -> &str {
    match expected {
        "u32" => "an unsigned integer (at most 4294967295)",
        "u64" => "an unsigned integer",
        "a sequence" => "an array",
        "a map" => "an object",
        other if other.starts_with("struct ") => "an object",
        other if other.starts_with("enum ") => "a string",
        other => other,
    }
}

/// serde's description of an unexpected value in JSON words.
fn plain_found(found: &str) -> String {
    match found {
        "sequence" => "an array".to_string(),
        "map" => "an object".to_string(),
        "unit value" => "null".to_string(),
        other => other.replace('`', ""),
    }
}
