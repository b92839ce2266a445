//! `nix-tier-hook`: the program `build-hook` names in nix.conf.
//!
//! It must never wedge or crash Nix: every internal error (unreadable .drv, corrupt state, a
//! panic) becomes `# decline`, so Nix builds the derivation as it would without the hook, plus
//! one line on stderr saying why; when the hook cannot start at all (no profile, a panic while
//! starting) it answers `# decline-permanently`, and Nix stops asking it.

use std::io::{self, Write};
use std::panic::{self, AssertUnwindSafe};
use std::process::ExitCode;

use nix_tier_hook::{broker, config, nix_version, privileges};
use nix_tier_hook::dispatch::{Answer, Dispatcher};
use nix_tier_hook::protocol::{self, Reply};
use nix_tier_hook::relay::Relay;
use nix_tier_hook::state::StateDir;
use nix_tier_hook::watch;

/// With glibc's malloc, the broker's connection thread and its watcher thread took turns on
/// one arena's lock (the watcher frees every admitted build's job the connection allocated):
/// thousands of futex waits a second in bench/dispatch's admit case, each a context switch on
/// the reply path. mimalloc gives each thread its own heap and frees across threads without a
/// lock.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let verbosity = std::env::args().nth(1).unwrap_or_else(|| "3".to_string());
    if verbosity == broker::BROKER_ARG {
        return broker::serve(std::env::args().any(|a| a == broker::STAY_ARG));
    }
    let mut input = io::stdin().lock();
    let settings = match protocol::read_settings(&mut input) {
        Ok(settings) => settings,
        Err(error) => {
            say(&[format!("nix-tier-hook: cannot read Nix's settings ({error}); exiting, Nix builds without tier limits")]);
            return ExitCode::FAILURE;
        }
    };

    // Nix writes its first request right after the settings, so whatever goes wrong from here
    // on must still be answered: a panic in the set-up declines permanently, and any way out
    // of the loop below (a read error, a panic) first answers the request in hand.
    let started = panic::catch_unwind(AssertUnwindSafe(|| start(&settings, &verbosity)))
        .unwrap_or_else(|panic| (None, vec![format!("nix-tier-hook: internal error while starting: {}", panic_message(&*panic))]));
    let (mut dispatcher, mut notes) = started;
    let mut unanswered = false;
    let served = panic::catch_unwind(AssertUnwindSafe(|| loop {
        // Builds declined without the broker are told it with the next question, or when they
        // are due if Nix asks nothing by then: not between the requests of a burst, while Nix
        // waits for each answer.
        if let Some(dispatcher) = dispatcher.as_mut() {
            if dispatcher.unsent_due_in().is_some_and(|due_in| !readable_within(&input, due_in)) {
                dispatcher.send_unsent();
            }
        }
        let request = match protocol::read_request(&mut input) {
            Ok(Some(request)) => request,
            Ok(None) => {
                dispatcher.as_mut().into_iter().for_each(Dispatcher::send_unsent);
                return ExitCode::SUCCESS;
            }
            Err(error) => {
                say(&[
                    format!("nix-tier-hook: reading Nix's request failed ({error}); declining and exiting"),
                    Reply::Decline.line().to_string(),
                ]);
                dispatcher.as_mut().into_iter().for_each(Dispatcher::send_unsent);
                return ExitCode::FAILURE;
            }
        };
        unanswered = true;
        let mut lines = std::mem::take(&mut notes);
        let Some(dispatcher) = dispatcher.as_mut() else {
            // Nothing to enforce with: Nix stops asking this hook and builds as without it.
            lines.push(Reply::DeclinePermanently.line().to_string());
            say(&lines);
            return ExitCode::SUCCESS;
        };
        let answer = panic::catch_unwind(AssertUnwindSafe(|| dispatcher.answer(&request)))
            .unwrap_or_else(|panic| Err(format!("internal error: {}", panic_message(&*panic))));
        match answer {
            Ok(Answer::Reply { lines: said, reply }) => {
                lines.extend(said);
                lines.push(reply.line().to_string());
                say(&lines);
                unanswered = false;
            }
            Ok(Answer::HandOver { lines: said, relay }) => {
                lines.extend(said);
                lines.push(Reply::Accept.line().to_string());
                say(&lines);
                unanswered = false;
                // Nix may still start a build declined earlier: the broker is to look out for it.
                dispatcher.send_unsent();
                // The relay reads stdin from another thread: this thread's lock must go first.
                drop(input);
                return match relay.hand_over() {
                    Ok(0) => ExitCode::SUCCESS,
                    Ok(code) => ExitCode::from(code.clamp(1, 255) as u8),
                    Err(error) => {
                        say(&[format!("nix-tier-hook: relaying to build-remote failed: {error}")]);
                        ExitCode::FAILURE
                    }
                };
            }
            Err(error) => {
                lines.push(format!(
                    "nix-tier-hook: {error}; declining, so Nix builds {} without tier limits",
                    request.drv_path
                ));
                lines.push(Reply::Decline.line().to_string());
                say(&lines);
                unanswered = false;
            }
        }
    }));
    served.unwrap_or_else(|panic| {
        let mut lines = vec![format!("nix-tier-hook: internal error: {}; exiting", panic_message(&*panic))];
        if unanswered {
            lines.push(Reply::Decline.line().to_string());
        }
        say(&lines);
        ExitCode::FAILURE
    })
}

/// Sets the hook up for a Nix worker with `settings`: a warning when that Nix has a known bug
/// in waking waiting builds, the profile, Nix's build-remote when builders are configured, and
/// least privilege. `None` when there is nothing to enforce with;
/// the notes are lines for the user.
fn start(settings: &protocol::Settings, verbosity: &str) -> (Option<Dispatcher>, Vec<String>) {
    let mut notes = Vec::new();
    notes.extend(nix_version::of_parent().and_then(|v| nix_version::warning(&v)).map(|w| format!("nix-tier-hook: {w}")));
    let profile = match config::load_profile(config::profile_path(settings).as_deref()) {
        Ok((profile, note)) => {
            notes.extend(note.map(|n| format!("nix-tier-hook: {n}")));
            Some(profile)
        }
        Err(error) => {
            notes.push(format!("nix-tier-hook: no usable hardware profile ({error}); builds run without tier limits"));
            None
        }
    };
    let relay = match (settings.get("builders").map(String::as_str), &profile) {
        (None | Some(""), _) | (_, None) => None,
        (Some(_), Some(_)) => match Relay::start(&config::build_remote_program(), verbosity, settings) {
            Ok(relay) => Some(relay),
            Err(error) => {
                notes.push(format!("nix-tier-hook: cannot start Nix's build-remote ({error}); remote builders are not used"));
                None
            }
        },
    };
    // Only build-remote needs the builder-log descriptors Nix gave the hook; watchers must not
    // hold them open after the hook is gone.
    for fd in [4, 5] {
        let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    }
    // The privileged step first: the parent of builds' cgroups may have to be made in a
    // root-owned 0555 directory (CAP_DAC_OVERRIDE). Then build-remote (started above, if at
    // all) keeps what it needs for SSH; the hook and a broker it starts keep only what they need.
    let cgroups = profile.as_ref().map(|_| {
        let mounts = nix_tier_cgroups::Mounts::read()
            .map_err(|e| nix_tier_cgroups::Unavailable::from(format!("cannot read /proc/self/mountinfo: {e}")))?;
        nix_tier_cgroups::Hierarchy::prepare(&mounts, config::cgroup_root().as_deref(), watch::CGROUP_PARENT)
    });
    if let Err(error) = privileges::keep_only_needed() {
        notes.push(format!("nix-tier-hook: cannot drop capabilities ({error}); running with those it was given"));
    }
    let dispatcher = profile.zip(cgroups).map(|(p, cgroups)| Dispatcher::new(p, settings, StateDir::from_env(), relay, cgroups));
    (dispatcher, notes)
}

/// Whether Nix writes to the hook's stdin within `timeout` (a request comes in one write: none is
/// left in the lock's buffer between requests).
fn readable_within(input: &io::StdinLock, timeout: std::time::Duration) -> bool {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(input.as_fd(), nix::poll::PollFlags::POLLIN)];
    let timeout = nix::poll::PollTimeout::try_from(timeout.as_millis() as i32).unwrap_or(nix::poll::PollTimeout::MAX);
    nix::poll::poll(&mut fds, timeout).map_or(true, |ready| ready > 0)
}

/// Writes whole lines to stderr, where Nix reads the hook's replies, in one write: Nix reads a
/// reply a byte at a time and would wake once more for a line's end written apart. A message is
/// kept on one line, so that nothing in it (a derivation name, an error) can read as a reply.
fn say(lines: &[String]) {
    let mut text = String::new();
    for line in lines {
        text.push_str(&line.replace(['\n', '\r'], " "));
        text.push('\n');
    }
    let _ = io::stderr().lock().write_all(text.as_bytes());
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}
