//! The hook's decision for each derivation Nix is about to build.

use std::collections::HashMap;
use std::path::Path;

use nix_tier_model::admission::{self, Admission, Claim};
use nix_tier_model::build::{package_name, Classification};
use nix_tier_model::derivation::Derivation;
use nix_tier_model::learning::{self, ReservationSource};
use nix_tier_model::optimize::TIER_ATTRIBUTE;
use nix_tier_cgroups::Hierarchy;
use nix_tier_model::{Profile, Tier};

use crate::history::History;
use crate::output_locks::{self, HeldLocks};
use crate::protocol::{self, Reply, Settings, TryRequest};
use crate::relay::Relay;
use crate::state::{self, Lease, StateDir, Waiter};
use crate::watch::{self, WatchJob, Watcher};

/// A derivation's tier, the rule that decided it, and the memory it reserves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The derivation's name.
    pub name: String,
    /// Tier and reason.
    pub classification: Classification,
    /// Memory to reserve, MiB.
    pub memory_mib: u64,
    /// Where `memory_mib` comes from: the tier's `memoryMiB`, or learned from the package's
    /// past builds.
    pub memory_source: ReservationSource,
    /// Why the build history could not be read, when it could not (the tier's figure is used).
    pub history_error: Option<String>,
}

/// Classifies `drv` under `profile` and sizes its reservation: learned from its package's past
/// builds in `history` when there are enough (`nix_tier_model::learning`), else its tier's
/// `memoryMiB`. One indexed query.
pub fn place(profile: &Profile, drv: &Derivation, history: Option<&History>) -> Placement {
    let name = drv.name().unwrap_or_else(|| "unnamed".to_string());
    let marked = drv.string_attribute(TIER_ATTRIBUTE).and_then(|t| t.parse::<Tier>().ok());
    // The pname when the derivation has one, as optimizeFor classifies (its passthru.nixTier
    // then says what the hook decides); the name without its version otherwise.
    let pname = drv.string_attribute("pname");
    let package = pname.as_deref().unwrap_or_else(|| package_name(&name));
    let classification = profile.build.classify(package, &drv.required_system_features(), marked);
    let tier_mib = profile.build.tiers.get(classification.tier).memory_mib;
    let (peaks, history_error) = match history.map(|h| h.learning_peaks(nix_tier_model::build::package_name(&name))) {
        Some(Ok(peaks)) => (peaks, None),
        Some(Err(error)) => (Vec::new(), Some(error.to_string())),
        None => (Vec::new(), None),
    };
    let reservation = learning::reservation(&peaks, tier_mib);
    Placement { name, classification, memory_mib: reservation.memory_mib, memory_source: reservation.source, history_error }
}

/// What to tell Nix about one request.
pub enum Answer {
    /// Print `lines` (messages for the user), then the reply.
    Reply { lines: Vec<String>, reply: Reply },
    /// build-remote accepted: print `lines`, then hand the session over to it.
    HandOver { lines: Vec<String>, relay: Relay },
}

/// One hook process: the settings of its Nix worker, the profile, the shared state.
pub struct Dispatcher {
    profile: Profile,
    state_dir: StateDir,
    waiter_ttl: u64,
    relay: Option<Relay>,
    /// What each waiting derivation was last announced as waiting for, so it is not announced
    /// anew at every poll.
    announced: HashMap<String, String>,
    /// The build history, to learn reservations from; `None` when it cannot be opened.
    history: Option<History>,
    /// Said once per hook process: why the history cannot be used.
    history_note: Option<String>,
    /// Where admitted builds get their cgroups; `None` where no hierarchy is usable.
    cgroups: Option<Hierarchy>,
    /// Said once per hook process when builds cannot be bounded.
    enforcement_note: Option<String>,
    /// This hook's watcher, started with its first admission.
    watcher: Option<Watcher>,
    /// The watcher of the build just admitted, started once Nix has its answer.
    pending_watch: Option<WatchJob>,
    /// The uids Nix's builders run as: this process's and the `build-users-group` members'.
    builder_uids: Vec<u32>,
    /// Builds this hook postponed: their derivation and placement, until they are admitted.
    postponed: HashMap<String, (Derivation, Placement)>,
}

impl Dispatcher {
    /// A dispatcher for a worker with `settings`. `relay` is Nix's build-remote when builders
    /// are configured; `cgroups` the prepared parent for builds' cgroups, or why there is none.
    pub fn new(
        profile: Profile,
        settings: &Settings,
        state_dir: StateDir,
        relay: Option<Relay>,
        cgroups: Result<Hierarchy, nix_tier_cgroups::Unavailable>,
    ) -> Dispatcher {
        // A postponed build asks again every poll interval; three missed polls mean it is gone.
        let waiter_ttl = 3 * protocol::poll_interval_secs(settings).max(1) + 2;
        let (history, history_note) = match History::open(state_dir.path()) {
            Ok(history) => (Some(history), None),
            Err(error) => (None, Some(format!("nix-tier-hook: {error}; builds reserve their tiers' memoryMiB"))),
        };
        let (cgroups, enforcement_note) = match cgroups {
            Ok(hierarchy) => (Some(hierarchy), None),
            Err(e) => (None, Some(format!("nix-tier-hook: {e}; builds are admitted by tier but not bounded"))),
        };
        Dispatcher {
            profile,
            state_dir,
            waiter_ttl,
            relay,
            announced: HashMap::new(),
            history,
            history_note,
            cgroups,
            enforcement_note,
            watcher: None,
            pending_watch: None,
            builder_uids: builder_uids(settings),
            postponed: HashMap::new(),
        }
    }

    /// Hands the build just admitted to the watcher (starting it with the first admission, or
    /// again if it is gone). Called after the reply is written, so none of it is part of Nix's
    /// wait; a failure comes back as a line to show.
    pub fn after_reply(&mut self) -> Option<String> {
        let job = self.pending_watch.take()?;
        let sent = self.watcher.as_mut().map(|w| w.send(&job));
        if !matches!(sent, Some(Ok(()))) {
            let started = Watcher::spawn().and_then(|mut watcher| watcher.send(&job).map(|()| watcher));
            match started {
                Ok(watcher) => self.watcher = Some(watcher),
                Err(e) => return Some(format!("nix-tier-hook: cannot watch {} ({e}); it runs unbounded", job.name)),
            }
        }
        None
    }

    /// Answers one `try`. Errors are internal: the caller declines and reports them.
    pub fn answer(&mut self, request: &TryRequest) -> Result<Answer, String> {
        // A watcher is started only for an admission that was saved and answered.
        self.pending_watch = None;
        let mut lines: Vec<String> = self.enforcement_note.take().into_iter().collect();
        lines.extend(self.history_note.take());
        if let Some(relay) = self.relay.as_mut() {
            match relay.ask(request) {
                Ok(answer) => {
                    lines.extend(answer.lines);
                    match answer.reply {
                        Reply::Accept => {
                            let relay = self.relay.take().expect("relay present");
                            return Ok(Answer::HandOver { lines, relay });
                        }
                        Reply::Postpone => return Ok(Answer::Reply { lines, reply: Reply::Postpone }),
                        Reply::DeclinePermanently => self.relay.take().into_iter().for_each(Relay::stop),
                        Reply::Decline => {}
                    }
                }
                Err(error) => {
                    lines.push(format!("nix-tier-hook: Nix's build-remote failed ({error}); building locally from now on"));
                    self.relay.take().into_iter().for_each(Relay::stop);
                }
            }
        }
        let reply = self.admit_locally(request, &mut lines)?;
        Ok(Answer::Reply { lines, reply })
    }

    fn admit_locally(&mut self, request: &TryRequest, lines: &mut Vec<String>) -> Result<Reply, String> {
        // No free local slot: Nix waits for one and asks again; reserve nothing meanwhile.
        if !request.am_willing {
            return Ok(Reply::Decline);
        }
        // A postponed build asks again every poll interval: what its .drv says (immutable) and
        // what it reserves are kept until it is admitted.
        let (drv, placement) = match self.postponed.remove(&request.drv_path) {
            Some(known) => known,
            None => {
                let drv = Derivation::read(Path::new(&request.drv_path)).map_err(|e| e.to_string())?;
                let placement = place(&self.profile, &drv, self.history.as_ref());
                if let Some(error) = &placement.history_error {
                    // Said once; later tries quietly use the tier figures.
                    lines.push(format!("nix-tier-hook: {error}; builds reserve their tiers' memoryMiB"));
                    self.history = None;
                }
                (drv, placement)
            }
        };
        let tier = placement.classification.tier;

        let locked = self.state_dir.lock().map_err(|e| format!("state directory {}: {e}", self.state_dir.path().display()))?;
        let (mut state, repaired) = locked.load(|| watch::running_leases(self.state_dir.path()));
        if let Some(note) = repaired {
            lines.push(format!("nix-tier-hook: {note}"));
        }
        let held = HeldLocks::read().map_err(|e| format!("reading /proc/locks: {e}"))?;
        let now = state::now();
        state.prune(&held, now, self.waiter_ttl);
        // Asked again for a build it admitted (Nix found no slot after all): start over.
        state.running.retain(|lease| lease.drv != request.drv_path);
        let candidate = Claim { tier, memory_mib: placement.memory_mib };
        let waiting_heavy = state.oldest_waiting_heavy(&request.drv_path).map(|w| w.memory_mib);
        let reply = match admission::decide(&self.profile.build, &state.claims(), waiting_heavy, candidate) {
            Admission::Admit => {
                state.waiting.retain(|w| w.drv != request.drv_path);
                let admitted_ms = state::now_ms();
                let lease = Lease {
                    drv: request.drv_path.clone(),
                    name: placement.name,
                    tier,
                    memory_mib: placement.memory_mib,
                    lock_files: output_locks::lock_files(&drv, &request.drv_path),
                    started: now,
                    nix_pid: std::os::unix::process::parent_id(),
                    watcher_lock: Some(watch::watcher_lock_path(self.state_dir.path(), &request.drv_path, admitted_ms)),
                };
                let learned = matches!(placement.memory_source, ReservationSource::Learned { .. });
                self.pending_watch = Some(self.watch_job(&lease, &drv, learned, admitted_ms));
                state.running.push(lease);
                self.announced.remove(&request.drv_path);
                Reply::Decline
            }
            Admission::Wait(reason) => {
                let holders: Vec<&Lease> = state
                    .running
                    .iter()
                    .filter(|l| matches!(reason, admission::WaitReason::TierFull { .. }) == (l.tier == tier))
                    .collect();
                let shown: Vec<String> =
                    holders.iter().map(|l| format!("{}, {}", l.name, age(now.saturating_sub(l.started)))).collect();
                // Announce again only when the reason or the builds it waits on change, not as they age.
                let key = format!("{reason} {:?}", holders.iter().map(|l| &l.drv).collect::<Vec<_>>());
                let reason = format!("{reason} ({})", shown.join("; "));
                match state.waiting.iter_mut().find(|w| w.drv == request.drv_path) {
                    Some(waiter) => {
                        waiter.seen = now;
                        waiter.reason = reason.clone();
                    }
                    None => state.waiting.push(Waiter {
                        drv: request.drv_path.clone(),
                        name: placement.name.clone(),
                        tier,
                        memory_mib: placement.memory_mib,
                        since: now,
                        seen: now,
                        reason: reason.clone(),
                    }),
                }
                if self.announced.get(&request.drv_path) != Some(&key) {
                    lines.push(protocol::log_message(&format!("waiting: {reason} — {} ({tier})", placement.name)));
                    self.announced.insert(request.drv_path.clone(), key);
                }
                self.postponed.insert(request.drv_path.clone(), (drv, placement));
                Reply::Postpone
            }
        };
        locked.save(&state).map_err(|e| format!("writing state in {}: {e}", self.state_dir.path().display()))?;
        Ok(reply)
    }
}

impl Dispatcher {
    fn watch_job(&self, lease: &Lease, drv: &Derivation, learned: bool, admitted_ms: u64) -> WatchJob {
        let outputs: Vec<(&String, &str)> =
            drv.outputs.iter().map(|(name, o)| (name, o.path.as_str())).filter(|(_, p)| !p.is_empty()).collect();
        WatchJob {
            drv: lease.drv.clone(),
            name: lease.name.clone(),
            tier: lease.tier,
            memory_limit_mib: lease.memory_mib,
            limit_learned: learned,
            cores: self.profile.build.tiers.get(lease.tier).cores,
            lock_files: lease.lock_files.clone(),
            output_env: outputs.iter().map(|(name, path)| format!("{name}={path}")).collect(),
            outputs: outputs.iter().map(|(_, path)| path.to_string()).collect(),
            nix_pid: lease.nix_pid,
            builder_uids: self.builder_uids.clone(),
            started_unix_ms: admitted_ms,
            watcher_lock: lease.watcher_lock.clone().unwrap_or_default(),
            state_dir: self.state_dir.path().to_path_buf(),
            cgroups: self.cgroups.clone(),
        }
    }
}

/// The uids builders of this Nix run as: the hook's own (Nix runs the hook as itself) and, with
/// `build-users-group` set, every member of that group.
fn builder_uids(settings: &Settings) -> Vec<u32> {
    let mut uids = vec![nix::unistd::getuid().as_raw()];
    let group = settings.get("build-users-group").filter(|g| !g.is_empty());
    if let Some(Ok(Some(group))) = group.map(|g| nix::unistd::Group::from_name(g)) {
        uids.extend(
            group
                .mem
                .iter()
                .filter_map(|member| nix::unistd::User::from_name(member).ok().flatten())
                .map(|user| user.uid.as_raw()),
        );
    }
    uids
}

/// A duration for people: `42 s`, `12 min`, `3 h`.
pub fn age(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s => format!("{} h", s / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn place_classifies_by_pname_as_optimize_for_does() {
        let mut profile = Profile::detect().unwrap();
        profile.build.rules = vec![nix_tier_model::Rule { pattern: nix_tier_model::Pattern::new("numpy").unwrap(), tier: Tier::Heavy }];
        let drv = |env: &str| {
            Derivation::parse(&format!(r#"Derive([("out","/nix/store/x-o","","")],[],[],"x86_64-linux","/bin/sh",[],[{env}])"#)).unwrap()
        };
        let with_pname = drv(r#"("name","python3.13-numpy-2.0"),("pname","numpy")"#);
        assert_eq!(place(&profile, &with_pname, None).classification.tier, Tier::Heavy);
        let without = drv(r#"("name","python3.13-numpy-2.0")"#);
        assert_eq!(place(&profile, &without, None).classification.tier, profile.build.default_tier);
    }
}
