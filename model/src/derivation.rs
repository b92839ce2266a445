//! Nix derivation files (`.drv`): reading them, and writing them back byte for byte.
//!
//! The build hook reads the `.drv` that Nix is about to build to classify the build. This
//! module reads the ATerm text that Nix 2.8 writes (`Derivation::unparse` in
//! `src/libstore/derivations.cc`):
//!
//! ```text
//! Derive([outputs],[input derivations],[input sources],platform,builder,[args],[env])
//! ```
//!
//! * an output is `("name","/nix/store/…-name","hashAlgo","hash")`; see [`OutputKind`] for
//!   what the empty and non-empty combinations mean;
//! * an input derivation is `("/nix/store/….drv",["out","dev"])`;
//! * an input source is a store path `"/nix/store/…"`;
//! * an environment variable is `("NAME","value")`;
//! * there is no whitespace anywhere and no newline at the end of the file.
//!
//! Nix writes every map and set sorted by byte order, like [`BTreeMap`] and [`BTreeSet`].
//!
//! # Strings
//!
//! Nix escapes `"`, `\`, newline, carriage return and tab (as `\"`, `\\`, `\n`, `\r`,
//! `\t`) only in the builder, the arguments and the environment (names and values). Output
//! names, output paths, hash algorithms, hashes, input paths, the output names of input
//! derivations and the platform are written verbatim between quotes. Reading, Nix turns
//! `\n`, `\r`, `\t` into their control characters and any other escaped character into
//! itself; this reader does the same, everywhere. [`Derivation::to_aterm`] mirrors Nix's
//! writer exactly, verbatim fields included, so it reproduces a file Nix wrote byte for
//! byte. A `"` or `\` in a verbatim field therefore writes text that does not read back
//! (Nix 2.8 has the same defect: `system = "a\"b"` makes a `.drv` Nix cannot read); the
//! fields Nix validates (store paths, output names, hashes) never contain them.
//!
//! # Strictness
//!
//! Everything Nix 2.8 writes reads back, but this reader is stricter than Nix's own, which
//! accepts some text Nix never writes: it requires commas between list items (Nix's list
//! reader does not), no text after the closing `)` (Nix ignores it), no duplicate output
//! names, input derivations, input sources, input outputs or environment names (Nix keeps
//! one of them), and it reports a string or file cut short as an error (Nix can loop on
//! it). Like Nix it requires input derivation and input source paths to be absolute, and
//! so every non-empty output path. It does not check that paths lie in a store or that
//! hash algorithms and hashes are valid. `DrvWithVersion(…)` is a later format that Nix 2.8
//! does not read; neither does this reader.
//!
//! The reader makes one pass over the text without backtracking, so it takes time linear
//! in the size of the file.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A derivation as Nix 2.8 stores it in a `.drv` file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Derivation {
    /// The outputs, by output name (`out`, `dev`, …).
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// The derivations this one needs built first: `.drv` path to the names of the outputs
    /// it uses.
    pub input_derivations: BTreeMap<String, BTreeSet<String>>,
    /// The store paths (sources) this one needs that no derivation builds.
    pub input_sources: BTreeSet<String>,
    /// The system type the build runs on, e.g. `x86_64-linux` (or `builtin`).
    pub platform: String,
    /// The program that builds, e.g. `/nix/store/…-bash/bin/bash` or `builtin:fetchurl`.
    pub builder: String,
    /// The arguments of the builder.
    pub args: Vec<String>,
    /// The environment of the builder.
    pub env: BTreeMap<String, String>,
}

/// One output of a [`Derivation`], as its three strings are written in the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DerivationOutput {
    /// The store path of the output; empty where Nix does not know it before building
    /// (see [`OutputKind`]).
    pub path: String,
    /// The hash algorithm of a content-addressed output, prefixed with `r:` where the hash
    /// is of the NAR serialisation (recursive) rather than of a flat file, e.g. `sha256` or
    /// `r:sha256`; empty for an input-addressed output.
    pub hash_algo: String,
    /// The expected hash (base 16) of a fixed output, `impure` for an impure output, else
    /// empty.
    pub hash: String,
}

/// What kind of output a [`DerivationOutput`] is, decided the way Nix 2.8 decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputKind {
    /// Input-addressed (the usual kind): a path, no hash algorithm. Nix ignores a hash
    /// written without an algorithm.
    InputAddressed,
    /// Input-addressed, but its path is only known once the content-addressed derivations
    /// it depends on are built: no path, no hash algorithm.
    Deferred,
    /// Fixed-output (a fetch): a path, a hash algorithm and a hash.
    Fixed,
    /// Floating content-addressed (`__contentAddressed = true`): a hash algorithm only.
    Floating,
    /// Impure (`__impure = true`): a hash algorithm and the hash `impure`.
    Impure,
}

impl DerivationOutput {
    /// The kind of this output.
    pub fn kind(&self) -> OutputKind {
        if self.hash_algo.is_empty() {
            if self.path.is_empty() {
                OutputKind::Deferred
            } else {
                OutputKind::InputAddressed
            }
        } else if self.hash == "impure" {
            OutputKind::Impure
        } else if self.hash.is_empty() {
            OutputKind::Floating
        } else {
            OutputKind::Fixed
        }
    }
}

/// Why a derivation could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DerivationError {
    /// The text is not a derivation as Nix 2.8 writes it.
    #[error("{}at byte {offset}: expected {expected}, found {found}", origin(file))]
    Syntax {
        /// The file the text came from, when read with [`Derivation::read`].
        file: Option<PathBuf>,
        /// Byte offset in the text where the error is.
        offset: usize,
        /// What the reader expected there.
        expected: String,
        /// What is there: a short quote of the text, or `end of input`.
        found: String,
    },
    /// The file cannot be read.
    #[error("derivation {}: cannot read it: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file is not UTF-8 (Nix strings are bytes; this crate reads text).
    #[error("derivation {}: not UTF-8 at byte {offset}", path.display())]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Byte offset of the first byte that is not UTF-8.
        offset: usize,
    },
    /// The `__json` environment variable of a derivation with structured attributes is
    /// not what Nix accepts.
    #[error("derivation with structured attributes: {message}")]
    StructuredAttrs {
        /// What is wrong.
        message: String,
    },
}

impl DerivationError {
    /// The byte offset of a syntax error or of non-UTF-8 content, if the error has one.
    pub fn offset(&self) -> Option<usize> {
        match self {
            DerivationError::Syntax { offset, .. } | DerivationError::NotUtf8 { offset, .. } => {
                Some(*offset)
            }
            _ => None,
        }
    }
}

fn origin(file: &Option<PathBuf>) -> String {
    match file {
        Some(path) => format!("derivation {}: malformed ", path.display()),
        None => "malformed derivation ".to_owned(),
    }
}

/// The largest `.drv` file read: far above any real one (nixpkgs' largest are a few MiB).
pub const MAX_DRV_BYTES: u64 = 64 << 20;

impl Derivation {
    /// Reads a derivation from the text of a `.drv` file.
    ///
    /// Errors give the byte offset and what was expected there; no input makes this panic.
    pub fn parse(text: &str) -> Result<Derivation, DerivationError> {
        Parser {
            text,
            bytes: text.as_bytes(),
            pos: 0,
        }
        .derivation()
    }

    /// Reads the `.drv` file at `path` (a regular file of at most [`MAX_DRV_BYTES`]); errors
    /// name the file.
    pub fn read(path: &Path) -> Result<Derivation, DerivationError> {
        let bytes = crate::files::read_regular(path, MAX_DRV_BYTES).map_err(|source| DerivationError::Read {
            path: path.to_owned(),
            source,
        })?;
        let text = std::str::from_utf8(&bytes).map_err(|error| DerivationError::NotUtf8 {
            path: path.to_owned(),
            offset: error.valid_up_to(),
        })?;
        Derivation::parse(text).map_err(|error| match error {
            DerivationError::Syntax {
                offset,
                expected,
                found,
                ..
            } => DerivationError::Syntax {
                file: Some(path.to_owned()),
                offset,
                expected,
                found,
            },
            other => other,
        })
    }

    /// Writes the derivation as Nix 2.8 writes it, so that for a file Nix wrote,
    /// `Derivation::parse(text)?.to_aterm() == text`.
    ///
    /// Like Nix, this writes output names, output paths and hashes, input paths, input
    /// output names and the platform verbatim: a `"` or `\` in them gives text that does
    /// not read back (see the [module documentation](self)).
    pub fn to_aterm(&self) -> String {
        let mut out = String::with_capacity(self.estimated_len());
        out.push_str("Derive([");
        for (i, (name, output)) in self.outputs.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('(');
            verbatim(&mut out, name);
            out.push(',');
            verbatim(&mut out, &output.path);
            out.push(',');
            verbatim(&mut out, &output.hash_algo);
            out.push(',');
            verbatim(&mut out, &output.hash);
            out.push(')');
        }
        out.push_str("],[");
        for (i, (path, outputs)) in self.input_derivations.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('(');
            verbatim(&mut out, path);
            out.push(',');
            verbatim_list(&mut out, outputs);
            out.push(')');
        }
        out.push_str("],");
        verbatim_list(&mut out, &self.input_sources);
        out.push(',');
        verbatim(&mut out, &self.platform);
        out.push(',');
        escaped(&mut out, &self.builder);
        out.push_str(",[");
        for (i, arg) in self.args.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            escaped(&mut out, arg);
        }
        out.push_str("],[");
        for (i, (name, value)) in self.env.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('(');
            escaped(&mut out, name);
            out.push(',');
            escaped(&mut out, value);
            out.push(')');
        }
        out.push_str("])");
        out
    }

    /// The derivation's name: the environment variable `name`, or with structured
    /// attributes the `name` attribute of `__json`.
    ///
    /// `None` if there is none.
    pub fn name(&self) -> Option<String> {
        self.string_attribute("name")
    }

    /// A string attribute of the derivation: its environment variable, or with structured
    /// attributes the attribute of that name in `__json`.
    pub fn string_attribute(&self, name: &str) -> Option<String> {
        if let Some(value) = self.env.get(name) {
            return Some(value.clone());
        }
        let json: serde_json::Value = serde_json::from_str(self.env.get("__json")?).ok()?;
        json.get(name)?.as_str().map(str::to_string)
    }

    /// The system features a machine needs to build this derivation, as Nix 2.8 computes
    /// them: sorted and without duplicates; empty if
    /// [`try_required_system_features`](Self::try_required_system_features) fails.
    pub fn required_system_features(&self) -> Vec<String> {
        self.try_required_system_features().unwrap_or_default()
    }

    /// The system features a machine needs to build this derivation, as Nix 2.8 computes
    /// them (`ParsedDerivation::getRequiredSystemFeatures`), sorted and without
    /// duplicates:
    ///
    /// * without structured attributes, the environment variable `requiredSystemFeatures`
    ///   split at spaces, tabs, newlines and carriage returns;
    /// * with structured attributes (an environment variable `__json`, which then replaces
    ///   the environment), the `requiredSystemFeatures` list of strings in that JSON;
    /// * plus `ca-derivations` if some output path is only known after building (a
    ///   [`Floating`](OutputKind::Floating), [`Deferred`](OutputKind::Deferred) or
    ///   [`Impure`](OutputKind::Impure) output).
    ///
    /// Fails, as Nix does, where `__json` is not a JSON object or its
    /// `requiredSystemFeatures` is not a list of strings.
    pub fn try_required_system_features(&self) -> Result<Vec<String>, DerivationError> {
        let mut features = BTreeSet::new();
        if let Some(json) = self.env.get("__json") {
            #[derive(Deserialize)]
            struct Attrs {
                #[serde(rename = "requiredSystemFeatures", default)]
                features: Option<serde_json::Value>,
            }
            let attrs: Attrs =
                serde_json::from_str(json).map_err(|error| DerivationError::StructuredAttrs {
                    message: format!("__json: {error}"),
                })?;
            match attrs.features {
                None => {}
                Some(serde_json::Value::Array(items)) => {
                    for item in items {
                        match item {
                            serde_json::Value::String(feature) => {
                                features.insert(feature);
                            }
                            _ => return Err(not_a_string_list()),
                        }
                    }
                }
                Some(_) => return Err(not_a_string_list()),
            }
        } else if let Some(value) = self.env.get("requiredSystemFeatures") {
            features.extend(
                value
                    .split([' ', '\t', '\n', '\r'])
                    .filter(|feature| !feature.is_empty())
                    .map(str::to_owned),
            );
        }
        let known_paths = self.outputs.values().all(|output| {
            matches!(
                output.kind(),
                OutputKind::InputAddressed | OutputKind::Fixed
            )
        });
        if !known_paths {
            features.insert("ca-derivations".to_owned());
        }
        Ok(features.into_iter().collect())
    }

    /// The output paths known before building (the non-empty ones), in output name order.
    pub fn output_paths(&self) -> impl Iterator<Item = &str> {
        self.outputs
            .values()
            .map(|output| output.path.as_str())
            .filter(|path| !path.is_empty())
    }

    /// Whether this is a fixed-output derivation (a fetch): it has outputs and all are
    /// [`Fixed`](OutputKind::Fixed).
    pub fn is_fixed_output(&self) -> bool {
        !self.outputs.is_empty()
            && self
                .outputs
                .values()
                .all(|output| output.kind() == OutputKind::Fixed)
    }

    /// A capacity for [`to_aterm`](Self::to_aterm): the text with nothing escaped.
    fn estimated_len(&self) -> usize {
        let strings = self
            .outputs
            .iter()
            .map(|(name, o)| name.len() + o.path.len() + o.hash_algo.len() + o.hash.len() + 12)
            .chain(self.input_derivations.iter().map(|(path, outputs)| {
                path.len() + 8 + outputs.iter().map(|o| o.len() + 3).sum::<usize>()
            }))
            .chain(self.input_sources.iter().map(|s| s.len() + 3))
            .chain(self.args.iter().map(|s| s.len() + 3))
            .chain(self.env.iter().map(|(k, v)| k.len() + v.len() + 8))
            .sum::<usize>();
        strings + self.platform.len() + self.builder.len() + 32
    }
}

fn not_a_string_list() -> DerivationError {
    DerivationError::StructuredAttrs {
        message: "attribute 'requiredSystemFeatures' must be a list of strings".to_owned(),
    }
}

/// Writes `s` between quotes as is (Nix's `printUnquotedString`).
fn verbatim(out: &mut String, s: &str) {
    out.push('"');
    out.push_str(s);
    out.push('"');
}

/// Writes a list of verbatim strings.
fn verbatim_list(out: &mut String, items: &BTreeSet<String>) {
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        verbatim(out, item);
    }
    out.push(']');
}

/// Writes `s` between quotes with `"`, `\`, newline, CR and tab escaped (Nix's
/// `printString`).
fn escaped(out: &mut String, s: &str) {
    out.push('"');
    let mut copied = 0;
    for (i, byte) in s.bytes().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            _ => continue,
        };
        out.push_str(&s[copied..i]);
        out.push_str(escape);
        copied = i + 1;
    }
    out.push_str(&s[copied..]);
    out.push('"');
}

/// A one-pass reader over the text. `pos` is always on a character boundary: it only
/// stops before or after ASCII bytes, or after whole characters.
struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

/// How much of the text an error quotes, in characters.
const QUOTE_CHARS: usize = 24;

impl Parser<'_> {
    fn derivation(mut self) -> Result<Derivation, DerivationError> {
        if self.text.starts_with("DrvWithVersion(") {
            return Err(self.error(
                0,
                "`Derive(` (`DrvWithVersion(` is a later derivation format, which Nix 2.8 \
                 does not read)",
            ));
        }
        let mut drv = Derivation::default();
        self.expect("Derive(")?;

        self.list(|p| {
            p.expect("(")?;
            let name_at = p.pos;
            let name = p.string()?;
            p.expect(",")?;
            let path_at = p.pos;
            let path = p.string()?;
            if !path.is_empty() && !path.starts_with('/') {
                return Err(p.error(path_at, "an empty or absolute output path"));
            }
            p.expect(",")?;
            let hash_algo = p.string()?;
            p.expect(",")?;
            let hash = p.string()?;
            p.expect(")")?;
            if drv
                .outputs
                .insert(
                    name,
                    DerivationOutput {
                        path,
                        hash_algo,
                        hash,
                    },
                )
                .is_some()
            {
                return Err(p.error(name_at, "an output name not listed before"));
            }
            Ok(())
        })?;

        self.expect(",")?;
        self.list(|p| {
            p.expect("(")?;
            let path_at = p.pos;
            let path = p.path()?;
            p.expect(",")?;
            let mut outputs = BTreeSet::new();
            p.list(|p| {
                let output_at = p.pos;
                if !outputs.insert(p.string()?) {
                    return Err(p.error(output_at, "an output name not listed before"));
                }
                Ok(())
            })?;
            p.expect(")")?;
            if drv.input_derivations.insert(path, outputs).is_some() {
                return Err(p.error(path_at, "an input derivation not listed before"));
            }
            Ok(())
        })?;

        self.expect(",")?;
        self.list(|p| {
            let path_at = p.pos;
            if !drv.input_sources.insert(p.path()?) {
                return Err(p.error(path_at, "an input source not listed before"));
            }
            Ok(())
        })?;

        self.expect(",")?;
        drv.platform = self.string()?;
        self.expect(",")?;
        drv.builder = self.string()?;

        self.expect(",")?;
        self.list(|p| {
            drv.args.push(p.string()?);
            Ok(())
        })?;

        self.expect(",")?;
        self.list(|p| {
            p.expect("(")?;
            let name_at = p.pos;
            let name = p.string()?;
            p.expect(",")?;
            let value = p.string()?;
            p.expect(")")?;
            if drv.env.insert(name, value).is_some() {
                return Err(p.error(name_at, "an environment variable not listed before"));
            }
            Ok(())
        })?;

        self.expect(")")?;
        if self.pos != self.bytes.len() {
            return Err(self.error(self.pos, "end of input after the closing `)`"));
        }
        Ok(drv)
    }

    /// An error at `offset`, quoting the text there.
    fn error(&self, offset: usize, expected: impl Into<String>) -> DerivationError {
        let found = match self.text.get(offset..) {
            None | Some("") => "end of input".to_owned(),
            Some(rest) => {
                let mut found = String::from("`");
                let mut chars = rest.chars();
                for c in chars.by_ref().take(QUOTE_CHARS) {
                    let _ = write!(found, "{}", c.escape_debug());
                }
                found.push('`');
                if chars.next().is_some() {
                    found.push('…');
                }
                found
            }
        };
        DerivationError::Syntax {
            file: None,
            offset,
            expected: expected.into(),
            found,
        }
    }

    /// Consumes `token` or fails at the current position.
    fn expect(&mut self, token: &'static str) -> Result<(), DerivationError> {
        if self.bytes[self.pos..].starts_with(token.as_bytes()) {
            self.pos += token.len();
            Ok(())
        } else {
            Err(self.error(self.pos, format!("`{token}`")))
        }
    }

    /// Reads `[item,item,…]`, calling `item` for each.
    fn list(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<(), DerivationError>,
    ) -> Result<(), DerivationError> {
        self.expect("[")?;
        if self.bytes.get(self.pos) == Some(&b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            item(self)?;
            match self.bytes.get(self.pos) {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(self.error(self.pos, "`,` or `]`")),
            }
        }
    }

    /// Reads a string that must be an absolute path.
    fn path(&mut self) -> Result<String, DerivationError> {
        let at = self.pos;
        let path = self.string()?;
        if !path.starts_with('/') {
            return Err(self.error(at, "an absolute path (a string starting with `/`)"));
        }
        Ok(path)
    }

    /// Reads a quoted string, undoing escapes.
    fn string(&mut self) -> Result<String, DerivationError> {
        let start = self.pos;
        if self.bytes.get(start) != Some(&b'"') {
            return Err(self.error(start, "`\"` starting a string"));
        }
        self.pos += 1;
        let mut value = String::new();
        loop {
            let rest = &self.bytes[self.pos..];
            let Some(special) = rest.iter().position(|&b| b == b'"' || b == b'\\') else {
                return Err(self.error(
                    self.bytes.len(),
                    format!("`\"` ending the string that starts at byte {start}"),
                ));
            };
            value.push_str(&self.text[self.pos..self.pos + special]);
            self.pos += special;
            if self.bytes[self.pos] == b'"' {
                self.pos += 1;
                return Ok(value);
            }
            let backslash = self.pos;
            self.pos += 1;
            let Some(escaped) = self.text[self.pos..].chars().next() else {
                return Err(self.error(backslash, "a character after the escaping `\\`"));
            };
            value.push(match escaped {
                'n' => '\n',
                'r' => '\r',
                't' => '\t',
                other => other,
            });
            self.pos += escaped.len_utf8();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A derivation of about `env_vars` × 100 bytes, every string full of escapes.
    fn big(env_vars: usize) -> Derivation {
        let mut drv = Derivation {
            platform: "x86_64-linux".into(),
            builder: "/bin/sh".into(),
            ..Derivation::default()
        };
        drv.outputs.insert(
            "out".into(),
            DerivationOutput {
                path: "/nix/store/x-out".into(),
                ..Default::default()
            },
        );
        for i in 0..env_vars {
            drv.env.insert(
                format!("VAR_{i}"),
                format!("line \"{i}\"\n\ttab\\ {}", "x".repeat(64)),
            );
        }
        drv
    }

    /// The reader is one pass: a 100 KB text and 4 MB texts read back (a reader quadratic
    /// in the size of the text or of one string would not finish them in test time). Not a
    /// timing assertion.
    #[test]
    fn reads_large_derivations_in_one_pass() {
        for vars in [1_000, 40_000] {
            let drv = big(vars);
            let text = drv.to_aterm();
            assert!(text.len() >= vars * 90, "{} bytes", text.len());
            assert_eq!(Derivation::parse(&text).unwrap(), drv);
        }
        // One huge string with escapes all through it.
        let mut drv = big(1);
        drv.env.insert("BIG".into(), "a\\\"\n".repeat(1 << 20));
        let text = drv.to_aterm();
        assert_eq!(Derivation::parse(&text).unwrap(), drv);
    }

    #[test]
    fn escapes_only_where_nix_does() {
        let mut out = String::new();
        escaped(&mut out, "a\"b\\c\nd\re\tf✓");
        assert_eq!(out, r#""a\"b\\c\nd\re\tf✓""#);
        let mut out = String::new();
        verbatim(&mut out, "a\tb");
        assert_eq!(out, "\"a\tb\"");
    }
}
