//! The `nix-tier-hook` build hook inside real Nix builds (the first Nix on `PATH`: 2.8, then 2.26
//! in `./scripts/test`'s second pass): tier limits and the memory budget
//! hold within one `nix-build`, across clients of one `nix-daemon`, and after a client is killed;
//! internal errors never stop builds; remote builders still work through the relayed
//! build-remote.
//!
//! Derivations come from `tests/fixtures/dag` and are built by `nix-tier-testbuilder`, which
//! records `<name> <start_ms> <end_ms> <tier> <memMiB>` per run; the peaks of those intervals are
//! what the assertions check. A builder runs strictly inside the hook's admission (admitted before
//! it starts, released after Nix drops the output lock), so recorded overlaps can never exceed
//! what the hook admitted.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix_tier_tests::hook_env::*;
use nix_tier_tests::NixSandbox;

const BUILD_TIMEOUT: Duration = Duration::from_secs(60);

/// heavy 1 job, medium 2, light 4; 600 + 2×300 + 4×100 = 1600 > budget 1000, so the budget binds.
fn binding_limits() -> Limits {
    Limits {
        budget_mib: 1000,
        heavy: TierLimits { max_jobs: 1, cores: 2, memory_mib: 600 },
        medium: TierLimits { max_jobs: 2, cores: 1, memory_mib: 300 },
        light: TierLimits { max_jobs: 4, cores: 1, memory_mib: 100 },
    }
}

/// Limits where only the heavy tier's single slot matters.
fn roomy_limits() -> Limits {
    Limits {
        budget_mib: 8000,
        heavy: TierLimits { max_jobs: 1, cores: 2, memory_mib: 2000 },
        medium: TierLimits { max_jobs: 2, cores: 1, memory_mib: 1000 },
        light: TierLimits { max_jobs: 4, cores: 1, memory_mib: 250 },
    }
}

/// 2 heavy, 3 medium, 8 light (half of them depending on a medium), plus the aggregator; each
/// a package of its own, so that every build reserves its tier's `memoryMiB` and is held to its
/// tier's `maxJobs`, the figures the assertions count. (A build of a package recorded earlier
/// in the session reserves what was learned instead, and in learned mode the budget alone
/// holds it.)
fn mixed_dag(record_dir: &Path) -> Dag {
    let mut dag = Dag::new(
        "dag",
        PerTier { heavy: 2, medium: 3, light: 8 },
        PerTier { heavy: 1000, medium: 600, light: 300 },
        record_dir,
    );
    dag.package_per_derivation = true;
    dag
}

/// Polls `nix-tier status --json` until `ready` holds of it (true) or `timeout` passes (false);
/// the last status read is kept in `last`.
fn wait_for_status(
    sandbox: &NixSandbox,
    timeout: Duration,
    last: &mut Option<serde_json::Value>,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Ok(status) = status_json(sandbox) {
            let done = ready(&status);
            *last = Some(status);
            if done {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Every derivation of `dag` ran exactly once.
fn assert_each_ran_once(records: &[Record], dag: &Dag) {
    let mut ran: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
    ran.sort();
    let mut expected = dag.names();
    expected.sort();
    assert_eq!(ran, expected, "builder runs vs the DAG's derivations; timeline:\n{}", timeline(records));
}

fn assert_within(limits: &Limits, records: &[Record]) {
    let peaks = peaks(records, |tier| limits.tier(tier).memory_mib);
    let table = timeline(records);
    eprintln!("peaks {peaks:?}; timeline (ms start end):\n{table}");
    for tier in ["heavy", "medium", "light"] {
        let max = limits.tier(tier).max_jobs as usize;
        assert!(
            peaks.tier(tier) <= max,
            "{} {tier} builds ran at once, maxJobs is {max}; peaks {peaks:?}; timeline (ms start end):\n{table}",
            peaks.tier(tier)
        );
    }
    assert!(
        peaks.reserved_mib <= limits.budget_mib,
        "builds reserving {} MiB ran at once ({:?}), budget {} MiB; timeline:\n{table}",
        peaks.reserved_mib,
        peaks.reserved_at_peak,
        limits.budget_mib
    );
}

fn hook_lines(stderr: &str) -> Vec<&str> {
    let lines: Vec<&str> = stderr.lines().filter(|l| l.trim_start().starts_with("nix-tier-hook:")).collect();
    for line in &lines {
        eprintln!("hook said: {line}");
    }
    lines
}

#[test]
fn without_the_hook_the_dag_exceeds_the_limits() {
    // Control: the same DAG and -j as below, with Nix's default hook; proves the DAG can fail.
    let _machine = shared_machine();
    let sandbox = NixSandbox::with_conf("build-poll-interval = 1");
    let records_dir = sandbox.path().join("records");
    let dag = mixed_dag(&records_dir);
    run_with_timeout(dag.build_command(sandbox.command("nix-build"), 8, None), sandbox.path(), "build", BUILD_TIMEOUT)
        .assert_success("nix-build of the DAG without the hook");

    let records = read_records(&records_dir);
    assert_each_ran_once(&records, &dag);
    let limits = binding_limits();
    let peaks = peaks(&records, |tier| limits.tier(tier).memory_mib);
    assert!(
        peaks.tier("heavy") > 1 && peaks.reserved_mib > limits.budget_mib,
        "without the hook -j 8 should run both heavy builds together and overrun the budget: {peaks:?}\n{}",
        timeline(&records)
    );
}

fn tier_limits_and_budget_hold_within_one_nix_build(sandboxed: bool) {
    let _machine = shared_machine();
    let limits = binding_limits();
    let (sandbox, records_dir) = hook_sandbox_recording(&limits, sandboxed, "");
    let dag = mixed_dag(&records_dir);
    let build =
        run_with_timeout(dag.build_command(sandbox.command("nix-build"), 8, None), sandbox.path(), "build", BUILD_TIMEOUT);
    build.assert_success("nix-build -j 8 of the DAG with the hook");
    assert!(build.stdout.trim().ends_with("-dag-all"), "nix-build printed {:?}", build.stdout);
    assert!(hook_lines(&build.stderr).is_empty(), "the hook reported errors:\n{}", build.stderr);

    let records = read_records(&records_dir);
    assert_each_ran_once(&records, &dag);
    assert_within(&limits, &records);
    // Admission limits, it does not serialise: four light builds (400 MiB) fit.
    let peaks = peaks(&records, |tier| limits.tier(tier).memory_mib);
    assert!(peaks.total >= 2, "the hook never let two builds run at once: {peaks:?}\n{}", timeline(&records));
}

#[test]
fn tier_limits_and_budget_hold_within_one_nix_build_unsandboxed() {
    tier_limits_and_budget_hold_within_one_nix_build(false);
}

#[test]
fn tier_limits_and_budget_hold_within_one_sandboxed_nix_build() {
    tier_limits_and_budget_hold_within_one_nix_build(true);
}

/// Two clients of one private nix-daemon, each `nix-build -j 8` of three heavy builds (each a
/// package of its own, as in [`mixed_dag`]); the records of both.
fn two_daemon_clients(sandbox: &NixSandbox) -> (Vec<Record>, Vec<Dag>) {
    let daemon = NixDaemon::start(sandbox);
    let records_dir = sandbox.path().join("records");
    let counts = PerTier { heavy: 3, medium: 0, light: 0 };
    let sleeps = PerTier { heavy: 500, medium: 300, light: 300 };
    let dags = ["a", "b"].map(|prefix| {
        let mut dag = Dag::new(prefix, counts, sleeps, &records_dir);
        dag.package_per_derivation = true;
        dag
    });

    let clients: Vec<Running> = dags
        .iter()
        .map(|dag| Running::spawn(dag.build_command(daemon.command("nix-build"), 8, None), sandbox.path(), &dag.prefix))
        .collect();
    for (client, dag) in clients.into_iter().zip(&dags) {
        let finished = client.wait(BUILD_TIMEOUT);
        assert!(
            finished.status.success(),
            "client {} failed ({}):\n{}\ndaemon log:\n{}",
            dag.prefix,
            finished.status,
            tail(&finished.stderr, 40),
            tail(&daemon.log(), 40)
        );
    }

    // Both clients went through the daemon, not straight to the store.
    let connections = daemon.log().matches("accepted connection").count();
    assert!(connections >= 2, "the daemon saw {connections} connections:\n{}", daemon.log());

    let records = read_records(&records_dir);
    let mut expected: Vec<String> = dags.iter().flat_map(Dag::names).collect();
    expected.sort();
    let mut ran: Vec<String> = records.iter().map(|r| r.name.clone()).collect();
    ran.sort();
    assert_eq!(ran, expected, "timeline:\n{}", timeline(&records));
    (records, dags.to_vec())
}

#[test]
fn without_the_hook_daemon_clients_run_heavy_builds_together() {
    // Control for the next test (and a check of the daemon harness).
    let _machine = shared_machine();
    let sandbox = NixSandbox::with_conf("build-poll-interval = 1");
    let (records, _) = two_daemon_clients(&sandbox);
    let peaks = peaks(&records, |_| 0);
    assert!(peaks.tier("heavy") > 1, "{peaks:?}\n{}", timeline(&records));
}

fn heavy_limit_holds_across_daemon_clients(sandboxed: bool) {
    let _machine = shared_machine();
    let limits = roomy_limits();
    let (sandbox, _) = hook_sandbox_recording(&limits, sandboxed, "");
    let (records, _) = two_daemon_clients(&sandbox);
    assert_within(&limits, &records);
    let peaks = peaks(&records, |tier| limits.tier(tier).memory_mib);
    assert_eq!(peaks.tier("heavy"), 1, "{peaks:?}\n{}", timeline(&records));
}

#[test]
fn heavy_limit_holds_across_daemon_clients_unsandboxed() {
    heavy_limit_holds_across_daemon_clients(false);
}

#[test]
fn heavy_limit_holds_across_sandboxed_daemon_clients() {
    heavy_limit_holds_across_daemon_clients(true);
}

#[test]
fn a_killed_client_frees_its_heavy_slot_within_a_poll_interval() {
    let _machine = exclusive_machine();
    let limits = roomy_limits();
    let (sandbox, _) = hook_sandbox(&limits, "");
    let records_dir = sandbox.path().join("records");
    let counts = PerTier { heavy: 1, medium: 0, light: 0 };
    let long = Dag::new("a", counts, PerTier { heavy: 120_000, medium: 0, light: 0 }, &records_dir);
    let short = Dag::new("b", counts, PerTier { heavy: 500, medium: 0, light: 0 }, &records_dir);

    // Client a holds the heavy slot with a long build.
    let client_a = Running::spawn(long.build_command(sandbox.command("nix-build"), 8, Some("heavy-0")), sandbox.path(), "a");
    let (builder_pid, builder_pgid, _) = wait_started(&records_dir, "a-heavy-0", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("a-heavy-0 never started:\n{}", client_a.stderr()));

    // Client b's heavy build waits for it: `nix-tier status --json` shows a running and b
    // waiting for two poll intervals (postponed and asking again, not lost).
    let client_b = Running::spawn(short.build_command(sandbox.command("nix-build"), 8, Some("heavy-0")), sandbox.path(), "b");
    let mut last_status = None;
    let waited = wait_for_status(&sandbox, Duration::from_secs(30), &mut last_status, |status| {
        let running = status["running"].as_array().cloned().unwrap_or_default();
        let a_running = running.iter().any(|r| r["name"] == "a-heavy-0" && r["tier"] == "heavy");
        let b_waiting = status["waiting"].as_array().is_some_and(|w| {
            w.iter().any(|w| w["name"] == "b-heavy-0" && w["waitingSeconds"].as_u64().is_some_and(|s| s >= 2))
        });
        a_running && status["tiers"]["heavy"]["running"].as_u64() == Some(1) && b_waiting
    });
    let status_problem = (!waited).then(|| {
        format!("status while a runs and b waits: expected a-heavy-0 running (heavy running 1) and b-heavy-0 waiting, got {last_status:#?}")
    });
    assert!(
        started(&records_dir, "b-heavy-0").is_none(),
        "b-heavy-0 started while a-heavy-0 held the only heavy slot; b's stderr:\n{}",
        client_b.stderr()
    );

    // kill -9 the client (its process group) and the builder's own process group (Nix puts the
    // builder in a session of its own).
    let killed_at = now_ms();
    client_a.kill9();
    kill_group(builder_pgid);
    assert!(wait_gone(&[builder_pid], Duration::from_secs(10)), "builder {builder_pid} survived kill -9");
    let gone_at = now_ms();

    let (_, _, b_start) = wait_started(&records_dir, "b-heavy-0", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("b-heavy-0 never started after a was killed; b's stderr:\n{}", client_b.stderr()));
    client_b.wait(BUILD_TIMEOUT).assert_success("client b after a was killed");
    let delay = b_start as i64 - gone_at as i64;
    eprintln!("a killed at {killed_at}, its processes gone at {gone_at}, b-heavy-0 started {delay} ms later");
    assert!(b_start >= killed_at, "b-heavy-0 started before a was killed");
    // One poll interval (1 s) plus 3 s of slack.
    assert!(delay <= 4000, "b-heavy-0 started {delay} ms after a's processes were gone (limit 4000 ms)");
    if let Some(problem) = status_problem {
        panic!("{problem}");
    }
}

/// The broker's state directory in a hook sandbox ($NIX_STATE_DIR/nix-tier).
/// A small DAG of every tier built by `nix-build`; asserts it succeeded and each ran once, and
/// returns what the hook said.
fn build_small_dag(sandbox: &NixSandbox, prefix: &str) -> String {
    let records_dir = sandbox.path().join("records");
    let dag = Dag::new(prefix, PerTier { heavy: 1, medium: 1, light: 2 }, PerTier { heavy: 300, medium: 300, light: 300 }, &records_dir);
    let build = run_with_timeout(dag.build_command(sandbox.command("nix-build"), 8, None), sandbox.path(), prefix, BUILD_TIMEOUT);
    build.assert_success(prefix);
    let ran: Vec<String> = read_records(&records_dir).into_iter().map(|r| r.name).collect();
    for name in dag.names() {
        assert_eq!(ran.iter().filter(|r| **r == name).count(), 1, "{name} ran once; runs: {ran:?}");
    }
    hook_lines(&build.stderr).join("\n")
}

/// Connects to `socket` and closes the connection, until its listener's queue is full.
fn fill_listen_queue(socket: &Path) {
    use nix::sys::socket::{connect, socket as new_socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let address = UnixAddr::new(socket).unwrap();
    for _ in 0..1_000_000 {
        let fd = new_socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK, None).unwrap();
        match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &address) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EAGAIN) => return,
            Err(e) => panic!("connecting to {}: {e}", socket.display()),
        }
    }
    panic!("{}'s queue never filled", socket.display());
}

#[test]
fn the_broker_is_started_on_demand_and_a_stopped_one_does_not_stop_builds() {
    let _machine = shared_machine();
    let (sandbox, _) = hook_sandbox(&roomy_limits(), "");
    // No broker runs: the first hook starts one, and the builds go through it.
    let said = build_small_dag(&sandbox, "first");
    assert!(!said.contains("fails open"), "the broker answered every build:\n{said}");
    let broker = nix::unistd::Pid::from_raw(broker_pid(&sandbox));

    // Stopped (SIGSTOP): each hook waits at most 40 ms for it, then declines; Nix builds.
    nix::sys::signal::kill(broker, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let started = std::time::Instant::now();
    let said = std::panic::catch_unwind(|| build_small_dag(&sandbox, "stopped"));
    let took = started.elapsed();
    // Stopped for long, it accepts no connection: hooks' connections, closed or not, queue until
    // its listener's queue is full, and a connect then would wait for good. Filled here.
    let queue_full = std::panic::catch_unwind(|| {
        fill_listen_queue(&state_dir(&sandbox).join("broker.sock"));
        build_small_dag(&sandbox, "queue-full")
    });
    nix::sys::signal::kill(broker, nix::sys::signal::Signal::SIGCONT).unwrap();
    let said = said.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    assert!(said.contains("the broker did not answer within 40ms (fails open)"), "the hook said why:\n{said}");
    eprintln!("4 builds with the broker stopped took {took:?}");
    let said = queue_full.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    assert!(said.contains("accepts no connections") && said.contains("fails open"), "the hook said why:\n{said}");
    // Resumed, it answers the requests the hooks gave up on: the leases it grants them end with
    // those builds (long done), or the broker would hold them, and never exit, for good. Its
    // own snapshot lists every lease (`nix-tier status` shows only those whose locks are held).
    let snapshot = state_dir(&sandbox).join("state.json");
    let mut last = String::new();
    let emptied = (0..200).any(|_| {
        last = fs::read_to_string(&snapshot).unwrap_or_default();
        let state: serde_json::Value = serde_json::from_str(&last).unwrap_or_default();
        let empty = state["running"].as_array().is_some_and(|running| running.is_empty());
        if !empty {
            std::thread::sleep(Duration::from_millis(50));
        }
        empty
    });
    assert!(emptied, "leases left 10 s after every build ended:\n{last}");
}

#[test]
fn a_broker_answering_garbage_does_not_stop_builds() {
    let _machine = shared_machine();
    let (sandbox, _) = hook_sandbox(&roomy_limits(), "");
    // This test is the broker: it holds the lock (so one started on demand exits at once) and
    // answers nonsense to every connection.
    let state = state_dir(&sandbox);
    fs::create_dir_all(&state).unwrap();
    let held = fs::File::create(state.join("broker.lock")).unwrap();
    held.lock().unwrap();
    let listener = std::os::unix::net::UnixListener::bind(state.join("broker.sock")).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            // Nonsense for every request line after the hello, on a connection kept open.
            std::thread::spawn(move || {
                let mut lines = std::io::BufRead::lines(std::io::BufReader::new(&stream)).skip(1);
                while lines.next().is_some() {
                    let _ = std::io::Write::write_all(&mut &stream, b"{\"no such answer\": 1}\n");
                }
            });
        }
    });
    let said = build_small_dag(&sandbox, "garbage");
    assert!(said.contains("unreadable") && said.contains("fails open"), "the hook said why:\n{said}");
}

#[test]
fn a_killed_broker_is_started_again_and_the_running_heavy_build_keeps_its_slot() {
    let _machine = exclusive_machine();
    let (sandbox, _) = hook_sandbox(&roomy_limits(), "");
    let records_dir = sandbox.path().join("records");
    let counts = PerTier { heavy: 1, medium: 0, light: 0 };
    let long = Dag::new("a", counts, PerTier { heavy: 120_000, medium: 0, light: 0 }, &records_dir);
    let short = Dag::new("b", counts, PerTier { heavy: 300, medium: 0, light: 0 }, &records_dir);

    let client_a = Running::spawn(long.build_command(sandbox.command("nix-build"), 8, Some("heavy-0")), sandbox.path(), "a");
    let (builder_pid, builder_pgid, _) = wait_started(&records_dir, "a-heavy-0", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("a-heavy-0 never started:\n{}", client_a.stderr()));
    // The broker placed it (its watcher lock holds the build's job), then is killed.
    wait_for_watcher_lock(&sandbox, "a-heavy-0");
    let first_broker = kill_broker(&sandbox);

    // Client b's hook starts a new broker, which finds a-heavy-0 still running: b waits.
    let client_b = Running::spawn(short.build_command(sandbox.command("nix-build"), 8, Some("heavy-0")), sandbox.path(), "b");
    let mut last_status = None;
    let waiting = wait_for_status(&sandbox, Duration::from_secs(30), &mut last_status, |status| {
        status["waiting"].as_array().is_some_and(|w| w.iter().any(|w| w["name"] == "b-heavy-0"))
            && status["running"].as_array().is_some_and(|r| r.iter().any(|r| r["name"] == "a-heavy-0"))
    });
    assert!(waiting, "b-heavy-0 should wait for a-heavy-0 under the new broker; status {last_status:#?}; b said:\n{}", client_b.stderr());
    assert_ne!(broker_pid(&sandbox), first_broker, "a new broker runs");
    assert!(started(&records_dir, "b-heavy-0").is_none(), "b-heavy-0 started beside a-heavy-0 under a one-job heavy tier");

    client_a.kill9();
    kill_group(builder_pgid);
    assert!(wait_gone(&[builder_pid], Duration::from_secs(10)), "builder {builder_pid} survived kill -9");
    client_b.wait(BUILD_TIMEOUT).assert_success("client b after a was killed");
}

#[test]
fn a_bad_profile_does_not_stop_builds() {
    let _machine = shared_machine();
    let (sandbox, profile) = hook_sandbox(&roomy_limits(), "");
    fs::write(&profile, "{ \"schemaVersion\": 1, this is not json").unwrap();
    let records_dir = sandbox.path().join("records");
    let dag = Dag::new(
        "bad",
        PerTier { heavy: 1, medium: 1, light: 2 },
        PerTier { heavy: 300, medium: 300, light: 300 },
        &records_dir,
    );
    let build =
        run_with_timeout(dag.build_command(sandbox.command("nix-build"), 8, None), sandbox.path(), "build", BUILD_TIMEOUT);
    build.assert_success("build with an invalid profile");
    assert_each_ran_once(&read_records(&records_dir), &dag);
    let lines = hook_lines(&build.stderr);
    assert!(
        lines.iter().any(|l| l.contains(&profile.display().to_string()) || l.to_lowercase().contains("profile")),
        "expected a nix-tier-hook: line naming the bad profile; stderr:\n{}",
        build.stderr
    );
}

/// A derivation that needs the `remote-only` feature, which only the `local?root=` machine has.
///
/// How Nix 2.8 builds on `local?root=DIR` (libstore/local-fs-store.hh, build-remote.cc,
/// build/local-derivation-goal.cc): the remote store's logical store directory is the client's
/// (`store=` param, default `$NIX_STORE_DIR`, which build-remote inherits), its files live under
/// `DIR/nix/store` and its database under `DIR/nix/var/nix`. Since the logical and real store
/// directories differ, every build there is a chroot build (forced, whatever `sandbox` says),
/// which sees only the input closure: hence the static builder, imported into the store by the
/// DAG, and no record directory. No path under /nix is touched.
fn remote_setup(with_hook: bool) -> (NixSandbox, Dag, std::path::PathBuf) {
    let remote_root = |sandbox: &NixSandbox| sandbox.path().join("remote");
    let builders = |sandbox: &NixSandbox| {
        format!(
            "builders = local?root={}&store={} x86_64-linux - 1 1 remote-only remote-only\n\
             system-features = big-parallel\nbuilders-use-substitutes = false\n",
            remote_root(sandbox).display(),
            sandbox.path().join("store").display()
        )
    };
    let sandbox = if with_hook {
        let (sandbox, _) = hook_sandbox(&roomy_limits(), "");
        let conf = format!("{}{}", base_conf(), builders(&sandbox));
        sandbox.write("conf/nix.conf", &conf);
        sandbox
    } else {
        let sandbox = NixSandbox::with_conf("build-poll-interval = 1");
        let conf = format!("{}build-poll-interval = 1\n{}", base_conf(), builders(&sandbox));
        sandbox.write("conf/nix.conf", &conf);
        sandbox
    };
    fs::create_dir_all(remote_root(&sandbox)).unwrap();
    let mut dag = Dag::new(
        "rem",
        PerTier { heavy: 1, medium: 0, light: 0 },
        PerTier { heavy: 300, medium: 0, light: 0 },
        Path::new(""),
    );
    dag.extra_attrs = "{ heavy = { requiredSystemFeatures = [ \"remote-only\" ]; }; }".to_string();
    let root = remote_root(&sandbox);
    (sandbox, dag, root)
}

fn check_remote_build(with_hook: bool) {
    let _machine = shared_machine();
    let (sandbox, dag, remote_root) = remote_setup(with_hook);
    let build =
        run_with_timeout(dag.build_command(sandbox.command("nix-build"), 8, None), sandbox.path(), "build", BUILD_TIMEOUT);
    build.assert_success("nix-build of a remote-only derivation");
    if with_hook {
        assert!(hook_lines(&build.stderr).is_empty(), "the hook reported errors:\n{}", build.stderr);
    }

    // Already built: this only prints the output path.
    let out = run_with_timeout(
        dag.build_command(sandbox.command("nix-build"), 1, Some("heavy-0")),
        sandbox.path(),
        "path",
        BUILD_TIMEOUT,
    );
    out.assert_success("nix-build -A heavy-0");
    let path = out.stdout.trim().to_string();
    assert!(path.ends_with("-rem-heavy-0"), "nix-build -A heavy-0 printed {path:?}");
    let base = Path::new(&path).file_name().unwrap();

    let remote_copy = remote_root.join("nix/store").join(base);
    assert_eq!(
        fs::read_to_string(&remote_copy).map_err(|e| format!("{}: {e}", remote_copy.display())),
        Ok("rem-heavy-0\n".to_string()),
        "the remote store holds the output it built"
    );
    assert_eq!(fs::read_to_string(&path).ok().as_deref(), Some("rem-heavy-0\n"), "local copy of {path}");
    assert!(is_valid(sandbox.command("nix-store"), &path), "{path} is not valid in the local store");
    // The aggregator has no special feature: built locally, never remotely.
    let all = build.stdout.trim();
    let all_base = Path::new(all).file_name().unwrap();
    assert!(Path::new(all).exists(), "{all} missing");
    assert!(!remote_root.join("nix/store").join(all_base).exists(), "the aggregator was built remotely");
}

#[test]
fn remote_builders_work_without_the_hook() {
    // Baseline: this machine can build on a local?root= store with Nix's own build-remote.
    check_remote_build(false);
}

#[test]
fn remote_builders_work_through_the_hook() {
    check_remote_build(true);
}

/// The parent of process `pid`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn a_killed_daemon_workers_leftover_children_keep_the_heavy_slot() {
    // kill -9 of a daemon worker mid-build: Nix's parent-death signal ends its builder (a shell)
    // and the kernel releases its output locks, but the shell's child (as make's cc would) runs
    // on. The heavy slot stays taken until it is gone; then the waiting heavy build starts.
    let _machine = exclusive_machine();
    let (sandbox, records_dir) = hook_sandbox_recording(&roomy_limits(), false, "");
    let daemon = NixDaemon::start(&sandbox);
    let pid_file = sandbox.path().join("child.pid");
    let expr = format!(
        r#"derivation {{ name = "worker-heavy-1.0"; system = builtins.currentSystem; builder = "/bin/sh";
             NIX_TIER = "heavy"; PATH = "/usr/bin:/bin";
             args = [ "-c" "sleep 60 & echo $! > {}; wait; echo > $out" ]; }}"#,
        pid_file.display()
    );
    let mut cmd = daemon.command("nix-build");
    cmd.args(["--no-out-link", "--expr", &expr]);
    let client_a = Running::spawn(cmd, sandbox.path(), "a");
    let child: u32 = wait_for("the first build's child", BUILD_TIMEOUT, || {
        fs::read_to_string(&pid_file).ok().and_then(|t| t.trim().parse().ok())
    });
    let worker = parent_of(child).and_then(parent_of).expect("the child's shell and its Nix worker");

    let waiting = Dag::new("b", PerTier { heavy: 1, medium: 0, light: 0 }, PerTier { heavy: 300, medium: 0, light: 0 }, &records_dir);
    let client_b = Running::spawn(waiting.build_command(daemon.command("nix-build"), 8, Some("heavy-0")), sandbox.path(), "b");
    let mut last_status = None;
    let b_waits = wait_for_status(&sandbox, BUILD_TIMEOUT, &mut last_status, |status| {
        status["waiting"].as_array().is_some_and(|w| w.iter().any(|w| w["name"] == "b-heavy-0"))
    });
    assert!(b_waits, "b-heavy-0 never waited for the heavy slot: {last_status:#?}");

    let _ = Command::new("kill").args(["-KILL", &worker.to_string()]).status();
    // While the child lives, b's heavy build must not start.
    while !process_gone(child) {
        assert!(
            started(&records_dir, "b-heavy-0").is_none(),
            "b-heavy-0 started while the killed worker's child {child} still ran"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let child_gone = now_ms();
    let (_, _, b_start) = wait_started(&records_dir, "b-heavy-0", BUILD_TIMEOUT)
        .unwrap_or_else(|| panic!("b-heavy-0 never started; b's stderr:\n{}", client_b.stderr()));
    eprintln!("the leftover child was gone at {child_gone}; b-heavy-0 started {} ms later", b_start as i64 - child_gone as i64);
    client_b.wait(BUILD_TIMEOUT).assert_success("client b");
    drop(client_a);
}

/// The pid of a hook (not a broker) run for `sandbox`: `nix-tier-hook` with the sandbox's
/// directories in its environment.
fn hook_of(sandbox: &NixSandbox) -> Option<u32> {
    let hook = fs::canonicalize(hook_binary()).unwrap();
    let marker = sandbox.path().display().to_string();
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let is_hook = fs::read_link(entry.path().join("exe")).is_ok_and(|exe| exe == hook);
        let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
        let environ = String::from_utf8_lossy(&fs::read(entry.path().join("environ")).ok()?).into_owned();
        let broker = cmdline.split(|b| *b == 0).any(|arg| arg == b"--broker");
        (is_hook && !broker && environ.contains(&marker)).then_some(pid)
    })
}

#[test]
fn a_hook_waits_for_the_broker_another_hook_is_starting() {
    // Two hooks that find no broker both start one; the second broker leaves at once, as the
    // first holds the lock, and the first may take a while to listen. Here the test holds the
    // lock, a broker starting for as long as it likes. The hook must postpone meanwhile, not
    // decline (Nix would build at once, uncounted): the light build waits for the lock.
    let _machine = exclusive_machine();
    let (sandbox, _) = hook_sandbox(&roomy_limits(), "");
    let records_dir = sandbox.path().join("records");
    fs::create_dir_all(state_dir(&sandbox)).unwrap();
    let lock = fs::File::create(state_dir(&sandbox).join("broker.lock")).unwrap();
    lock.lock().unwrap();

    let dag = Dag::new("starting", PerTier { heavy: 0, medium: 0, light: 1 }, PerTier { heavy: 0, medium: 0, light: 100 }, &records_dir);
    let build = Running::spawn(dag.build_command(sandbox.command("nix-build"), 8, Some("light-0")), sandbox.path(), "starting");
    // Nix asks its hook once the derivation's inputs are there; the hook then starts a broker,
    // which leaves at once.
    wait_for("the hook of nix-build", Duration::from_secs(30), || hook_of(&sandbox));
    // Held half a second more: a hook that declined after its 40 ms would have had the build
    // started by then.
    std::thread::sleep(Duration::from_millis(500));
    let released_at = now_ms();
    let early = started(&records_dir, "starting-light-0");
    drop(lock);

    build.wait(BUILD_TIMEOUT).assert_success("nix-build while another broker was starting");
    assert!(early.is_none(), "starting-light-0 started while the lock was held, before {released_at}: {early:?}");
    let (_, _, start_ms) = started(&records_dir, "starting-light-0").expect("starting-light-0 ran");
    assert!(start_ms >= released_at, "starting-light-0 started at {start_ms}, before the lock's release at {released_at}");
}
