//! The hook's decision for each derivation Nix is about to build.

use std::collections::HashMap;
use std::path::Path;

use nix_tier_model::build::{package_name, Classification};
use nix_tier_model::derivation::Derivation;
use nix_tier_model::leases::AlikeLeases;
use nix_tier_model::learning::{self, Learned, ReservationSource};
use nix_tier_model::optimize::TIER_ATTRIBUTE;
use nix_tier_cgroups::Hierarchy;
use nix_tier_model::{Profile, Tier};

use crate::broker::client::{Client, Failure};
use crate::broker::{FromBroker, Hello, TryBuild};
use crate::output_locks;
use crate::protocol::{self, Reply, Settings, TryRequest};
use crate::relay::Relay;
use crate::state::StateDir;
use crate::watch::WatchJob;

/// A derivation's tier, the rule that decided it, and the memory it reserves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The derivation's name.
    pub name: String,
    /// Tier and reason.
    pub classification: Classification,
    /// The package name profile rules match (its `pname`, else its name without the version),
    /// when a rule can decide its tier; `None` when its `NIX_TIER` mark decides it.
    pub rule_package: Option<String>,
    /// Memory to reserve, MiB.
    pub memory_mib: u64,
    /// Its memory limit, MiB.
    pub limit_mib: u64,
    /// Where `memory_mib` and `limit_mib` come from: the tier's `memoryMiB`, or learned from the package's
    /// past builds.
    pub memory_source: ReservationSource,
}

/// Classifies `drv` under `profile` and sizes its reservation and limit: learned from its
/// package's past builds in `learned` when there are enough (`nix_tier_model::learning`), else
/// its tier's `memoryMiB`.
pub fn place(profile: &Profile, drv: &Derivation, learned: Option<&Learned>) -> Placement {
    let name = drv.name().unwrap_or_else(|| "unnamed".to_string());
    let marked = drv.string_attribute(TIER_ATTRIBUTE).and_then(|t| t.parse::<Tier>().ok());
    // The pname when the derivation has one, as optimizeFor classifies (its passthru.nixTier
    // then says what the hook decides); the name without its version otherwise.
    let pname = drv.string_attribute("pname");
    let package = pname.as_deref().unwrap_or_else(|| package_name(&name));
    let classification = profile.build.classify(package, &drv.required_system_features(), marked);
    let rule_package = marked.is_none().then(|| package.to_string());
    let tier_mib = profile.build.tiers.get(classification.tier).memory_mib;
    let peaks = learned.map(|learned| learned.peaks(package_name(&name))).unwrap_or_default();
    let reservation = learning::reservation(&peaks, tier_mib);
    Placement {
        name,
        classification,
        rule_package,
        memory_mib: reservation.memory_mib,
        limit_mib: reservation.limit_mib,
        memory_source: reservation.source,
    }
}

/// What to tell Nix about one request.
pub enum Answer {
    /// Print `lines` (messages for the user), then the reply.
    Reply { lines: Vec<String>, reply: Reply },
    /// build-remote accepted: print `lines`, then hand the session over to it.
    HandOver { lines: Vec<String>, relay: Relay },
}

/// One hook process: the settings of its Nix worker, the profile, its client of the broker.
pub struct Dispatcher {
    profile: Profile,
    broker: Client,
    relay: Option<Relay>,
    /// What each waiting derivation was last announced as waiting for, so it is not announced
    /// anew at every poll.
    announced: HashMap<String, String>,
    /// Where admitted builds get their cgroups; `None` where no hierarchy is usable.
    cgroups: Option<Hierarchy>,
    /// Said once per hook process when builds cannot be bounded.
    enforcement_note: Option<String>,
    /// The uids Nix's builders run as: this process's and the `build-users-group` members'.
    builder_uids: Vec<u32>,
    /// Builds asked about and not yet admitted, as the broker is told about them: Nix asks
    /// again about a waiting build, and its .drv (immutable) is read once.
    asked: HashMap<String, TryBuild>,
    /// What the broker last said of this worker when it found it full (its leases alike), until
    /// it says a slot may be free.
    worker_full: Option<AlikeLeases>,
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
        let (cgroups, enforcement_note) = match cgroups {
            Ok(hierarchy) => (Some(hierarchy), None),
            Err(e) => (None, Some(format!("nix-tier-hook: {e}; builds are admitted by tier but not bounded"))),
        };
        let hello = Hello {
            worker_pid: std::os::unix::process::parent_id(),
            max_jobs: protocol::max_jobs(settings),
            build: profile.build.clone(),
            poll_interval_secs: protocol::poll_interval_secs(settings),
            store_db: crate::store_db::database_path(settings),
        };
        Dispatcher {
            broker: Client::new(state_dir, hello),
            profile,
            relay,
            announced: HashMap::new(),
            cgroups,
            enforcement_note,
            builder_uids: builder_uids(settings),
            asked: HashMap::new(),
            worker_full: None,
        }
    }

    /// Answers one `try`. Errors are internal: the caller declines and reports them.
    pub fn answer(&mut self, request: &TryRequest) -> Result<Answer, String> {
        let mut lines: Vec<String> = self.enforcement_note.take().into_iter().collect();
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

    /// How long until the broker is to be told of the builds declined without asking it, should
    /// Nix ask nothing meanwhile (the caller then tells it, [`Dispatcher::send_unsent`]); `None`
    /// when there are none.
    pub fn unsent_due_in(&self) -> Option<std::time::Duration> {
        self.broker.unsent_due_in()
    }

    /// Tells the broker of the builds declined without asking it.
    pub fn send_unsent(&mut self) {
        self.broker.send_unsent();
    }

    fn admit_locally(&mut self, request: &TryRequest, lines: &mut Vec<String>) -> Result<Reply, String> {
        let build = match self.asked.remove(&request.drv_path) {
            Some(known) => known,
            None => self.try_build(request)?,
        };
        // No free local slot: Nix waits for one and asks again; nothing is reserved meanwhile.
        // Should a slot free before Nix looks again, it starts the build without asking: the
        // broker then counts it as it starts.
        if !request.am_willing {
            return Ok(self.declined_alone(build));
        }
        // Nix asks about every goal woken for a slot, each with a free slot, before any starts:
        // while the worker is full of leases this build could only take the place of, the
        // broker's answer stays the same, and is given without asking it.
        if self.worker_full.is_some_and(|alike| alike.make_room_for(&build.job.claim())) && !self.broker.slot_may_be_free() {
            return Ok(self.declined_alone(build));
        }
        self.worker_full = None;
        let answer = match self.broker.ask(&build) {
            Ok(answer) => answer,
            Err(Failure::Starting) => {
                // Asked again at Nix's next wake-up, by when the broker is up.
                self.asked.insert(request.drv_path.clone(), build);
                return Ok(Reply::Postpone);
            }
            Err(Failure::Failed(error)) => return Err(format!("{error} (fails open)")),
        };
        match answer {
            FromBroker::Admit => {
                self.announced.remove(&request.drv_path);
                Ok(Reply::Decline)
            }
            FromBroker::Wait { reason, key } => {
                if self.announced.get(&request.drv_path) != Some(&key) {
                    lines.push(protocol::log_message(&format!("waiting: {reason} — {} ({})", build.job.name, build.job.tier)));
                    self.announced.insert(request.drv_path.clone(), key);
                }
                self.asked.insert(request.drv_path.clone(), build);
                Ok(Reply::Postpone)
            }
            // Nix parks it for one of its own slots and asks again; the broker picks it up
            // should it start anyway. Its reservation as the broker learned it is what is
            // compared with the worker's leases until then.
            FromBroker::WorkerFull { alike, reserved_mib } => {
                self.worker_full = alike;
                let mut build = build;
                build.job.memory_reserved_mib = Some(reserved_mib);
                self.asked.insert(request.drv_path.clone(), build);
                Ok(Reply::Decline)
            }
            // The client takes no other answer.
            FromBroker::Refused(_) | FromBroker::Tries(_) | FromBroker::SlotFreed => Err("the broker answered another question".to_string()),
        }
    }

    /// Declines `build` without asking the broker, which is told later (Nix may still start it),
    /// and keeps it for Nix's next question.
    fn declined_alone(&mut self, build: TryBuild) -> Reply {
        self.broker.tell_declined(&build);
        self.asked.insert(build.job.drv.clone(), build);
        Reply::Decline
    }

    /// Reads and places the derivation of `request` with its tier's figures: the broker's view
    /// of it, once the broker has put in what the history taught it.
    fn try_build(&mut self, request: &TryRequest) -> Result<TryBuild, String> {
        let drv = Derivation::read(Path::new(&request.drv_path)).map_err(|e| e.to_string())?;
        let placement = place(&self.profile, &drv, None);
        let tier = placement.classification.tier;
        let expected_ms = learning::guessed_wall_ms(tier);
        let outputs: Vec<(&String, &str)> =
            drv.outputs.iter().map(|(name, o)| (name, o.path.as_str())).filter(|(_, p)| !p.is_empty()).collect();
        let job = WatchJob {
            drv: request.drv_path.clone(),
            name: placement.name,
            tier,
            memory_limit_mib: placement.limit_mib,
            memory_reserved_mib: Some(placement.memory_mib),
            // Learned by the broker, which holds the history's figures.
            limit_learned: false,
            cores: self.profile.build.tiers.get(tier).cores,
            lock_files: output_locks::lock_files(&drv, &request.drv_path),
            output_env: outputs.iter().map(|(name, path)| format!("{name}={path}")).collect(),
            outputs: outputs.iter().map(|(_, path)| path.to_string()).collect(),
            nix_pid: self.broker.worker_pid(),
            builder_uids: self.builder_uids.clone(),
            // Kept while Nix asks again about a waiting build (`asked`).
            asked_unix_ms: Some(crate::state::now_ms()),
            // Set by the broker when it admits the build.
            started_unix_ms: 0,
            cgroups: self.cgroups.clone(),
        };
        Ok(TryBuild { job, expected_ms })
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
