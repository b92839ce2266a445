//! The build-hook protocol, as Nix 2.8 speaks it (libstore/build/hook-instance.cc and
//! derivation-goal.cc `tryBuildHook`); every version-dependent detail of it lives here.
//!
//! Nix starts the hook with argv `[name, verbosity]` and writes on its stdin: the settings
//! handshake (`{1, name, value}`… `0`), then one request per derivation (`"try"`, am-willing,
//! system, drv path, required features). The hook answers each with one line on stderr
//! (`# decline`, `# decline-permanently`, `# postpone` or `# accept`); other lines on stderr are
//! shown to the user, or parsed as structured log messages when they start with `@nix `.
//! After `# accept`, the hook also prints the machine's name and receives the input paths and
//! wanted outputs. Later versions differ (2.17 takes `build-hook` as a list, Lix 2.94 replaced
//! the protocol); those differences belong in this module.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use crate::wire;

/// Nix's settings as sent in the handshake: name → value, as `nix show-config` prints them.
pub type Settings = BTreeMap<String, String>;

/// Reads the settings handshake.
pub fn read_settings(input: &mut impl Read) -> io::Result<Settings> {
    let mut settings = Settings::new();
    while wire::read_u64(input)? != 0 {
        let name = wire::read_string(input)?;
        let value = wire::read_string(input)?;
        settings.insert(name, value);
    }
    Ok(settings)
}

/// Writes the settings handshake (to a hook of our own, such as Nix's build-remote).
pub fn write_settings(output: &mut impl Write, settings: &Settings) -> io::Result<()> {
    for (name, value) in settings {
        wire::write_u64(output, 1)?;
        wire::write_string(output, name)?;
        wire::write_string(output, value)?;
    }
    wire::write_u64(output, 0)
}

/// One `try` request: may the hook take this derivation?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TryRequest {
    /// Whether Nix has a free local build slot (`max-jobs` not reached in this worker).
    pub am_willing: bool,
    /// The derivation's platform, e.g. `x86_64-linux`.
    pub system: String,
    /// The .drv's store path.
    pub drv_path: String,
    /// Its `requiredSystemFeatures`.
    pub required_features: Vec<String>,
}

/// Reads the next request; `None` when Nix is done with this hook (end of input or any other
/// command).
pub fn read_request(input: &mut impl Read) -> io::Result<Option<TryRequest>> {
    match wire::read_string(input) {
        Ok(command) if command == "try" => {}
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    Ok(Some(TryRequest {
        am_willing: wire::read_u64(input)? != 0,
        system: wire::read_string(input)?,
        drv_path: wire::read_string(input)?,
        required_features: wire::read_strings(input)?,
    }))
}

/// Writes a request (to a hook of our own).
pub fn write_request(output: &mut impl Write, request: &TryRequest) -> io::Result<()> {
    wire::write_string(output, "try")?;
    wire::write_u64(output, request.am_willing as u64)?;
    wire::write_string(output, &request.system)?;
    wire::write_string(output, &request.drv_path)?;
    wire::write_strings(output, request.required_features.iter().map(String::as_str))
}

/// The hook's answer to a `try`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Nix builds it locally.
    Decline,
    /// Nix builds it locally and never asks this worker's hook again.
    DeclinePermanently,
    /// Nix asks again after `build-poll-interval` seconds (in Nix 2.8 only that timer wakes a
    /// postponed build; a finished build wakes only those waiting for a `max-jobs` slot).
    Postpone,
    /// The hook builds it (on a remote machine).
    Accept,
}

impl Reply {
    /// The line that carries this reply.
    pub fn line(self) -> &'static str {
        match self {
            Reply::Decline => "# decline",
            Reply::DeclinePermanently => "# decline-permanently",
            Reply::Postpone => "# postpone",
            Reply::Accept => "# accept",
        }
    }

    /// The reply a line carries, if it is one.
    pub fn parse(line: &str) -> Option<Reply> {
        [Reply::Decline, Reply::DeclinePermanently, Reply::Postpone, Reply::Accept]
            .into_iter()
            .find(|reply| reply.line() == line)
    }
}

/// A structured log line Nix shows the user at notice level (`@nix {"action":"msg",…}`).
pub fn log_message(text: &str) -> String {
    let json = serde_json::json!({ "action": "msg", "level": 2, "msg": text });
    format!("@nix {json}")
}

/// The `build-poll-interval` setting, in seconds (Nix's default 5 when absent or unreadable).
pub fn poll_interval_secs(settings: &Settings) -> u64 {
    settings.get("build-poll-interval").and_then(|v| v.parse().ok()).unwrap_or(5)
}

/// The worker's `max-jobs`: how many builds it runs at once (`auto`: one per CPU; Nix's
/// default 1 when absent or unreadable).
pub fn max_jobs(settings: &Settings) -> u32 {
    match settings.get("max-jobs").map(String::as_str) {
        Some("auto") => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        Some(value) => value.parse().unwrap_or(1),
        None => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_and_requests_round_trip() {
        let settings: Settings = [("builders", ""), ("max-jobs", "8")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let request = TryRequest {
            am_willing: true,
            system: "x86_64-linux".into(),
            drv_path: "/nix/store/aaaa-hello.drv".into(),
            required_features: vec!["big-parallel".into()],
        };
        let mut buf = Vec::new();
        write_settings(&mut buf, &settings).unwrap();
        write_request(&mut buf, &request).unwrap();
        let mut input = buf.as_slice();
        assert_eq!(read_settings(&mut input).unwrap(), settings);
        assert_eq!(read_request(&mut input).unwrap(), Some(request));
        assert_eq!(read_request(&mut input).unwrap(), None, "end of input ends the session");
    }

    #[test]
    fn replies_parse_only_exact_lines() {
        assert_eq!(Reply::parse("# postpone"), Some(Reply::Postpone));
        assert_eq!(Reply::parse("# decline-permanently"), Some(Reply::DeclinePermanently));
        assert_eq!(Reply::parse("# declined"), None);
        assert!(log_message("waiting \"x\"").starts_with("@nix {\"action\":\"msg\""));
    }
}
