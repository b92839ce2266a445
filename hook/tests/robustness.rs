//! Hostile or broken files and a broken protocol never hang, exhaust or silence the hook: it
//! answers every request in time, says why when it cannot enforce, and repairs what it can.

mod common;

use std::fs;
use std::path::Path;

use common::{build_section, mkfifo, write_drv, write_profile, Hook, Setup};

fn reply(lines: &[String]) -> &str {
    lines.last().map(String::as_str).unwrap_or("")
}

fn mentions(lines: &[String], words: &[&str]) -> bool {
    lines.iter().any(|l| l.starts_with("nix-tier-hook:") && words.iter().all(|w| l.contains(w)))
}

#[test]
fn without_cgroups_the_hook_says_so_once_and_admits() {
    let setup = Setup::new(8000);
    let mut hook = setup.hook();
    let (drv, _) = write_drv(setup.path(), "plain-1.0");
    let first = hook.ask(&drv);
    assert_eq!(reply(&first), "# decline", "{first:?}");
    assert!(mentions(&first, &["not on a cgroup file system", "admitted by tier but not bounded"]), "{first:?}");
    let (other, _) = write_drv(setup.path(), "other-1.0");
    let second = hook.ask(&other);
    assert_eq!(second, vec!["# decline".to_string()], "said once");
}

#[test]
fn a_fifo_or_a_device_as_derivation_is_declined_at_once() {
    let setup = Setup::new(8000);
    let mut hook = setup.hook();
    let fifo = setup.path().join("fifo.drv");
    mkfifo(&fifo);
    let lines = hook.ask(&fifo);
    assert_eq!(reply(&lines), "# decline", "{lines:?}");
    assert!(mentions(&lines, &["fifo.drv", "FIFO"]), "{lines:?}");
    let lines = hook.ask(Path::new("/dev/zero"));
    assert_eq!(reply(&lines), "# decline", "{lines:?}");
    assert!(mentions(&lines, &["/dev/zero", "device"]), "{lines:?}");
    // And the hook still works.
    let (drv, _) = write_drv(setup.path(), "fine-1.0");
    assert_eq!(reply(&hook.ask(&drv)), "# decline");
}

#[test]
fn a_fifo_or_a_device_as_profile_falls_back_to_the_host_defaults() {
    let setup = Setup::new(8000);
    let fifo = setup.path().join("profile.fifo");
    mkfifo(&fifo);
    for profile in [fifo.as_path(), Path::new("/dev/zero")] {
        let mut hook = setup.hook_with_profile(profile);
        let (drv, _) = write_drv(setup.path(), "p-1.0");
        let lines = hook.ask(&drv);
        assert_eq!(reply(&lines), "# decline", "{lines:?}");
        assert!(
            mentions(&lines, &[&profile.display().to_string(), "not a regular file", "derived from this machine"]),
            "{lines:?}"
        );
    }
}

/// A profile with one heavy slot that every build takes: the second build waits for the first
/// exactly when the broker counts the first.
fn one_heavy_slot(setup: &Setup) {
    let mut build = build_section(8000);
    build["defaultTier"] = "heavy".into();
    write_profile(&setup.profile(), build);
}

/// A new build `name`: its `.drv`, its output, and the output's lock (`<output>.lock`), held as
/// Nix holds it while it asks the hook.
fn locked_drv(setup: &Setup, name: &str) -> (std::path::PathBuf, std::path::PathBuf, fs::File) {
    let (drv, out) = write_drv(setup.path(), name);
    let lock = fs::File::create(format!("{}.lock", out.display())).unwrap();
    lock.lock().unwrap();
    (drv, out, lock)
}

/// Holds the broker's lock in `setup`'s state directory, as a broker does: a broker started on
/// demand exits at once.
fn hold_broker_lock(setup: &Setup) -> fs::File {
    fs::create_dir_all(setup.state()).unwrap();
    let held = fs::File::create(setup.state().join("broker.lock")).unwrap();
    held.lock().unwrap();
    held
}

/// Asks `hook` about a new build `name` while holding its output lock, as Nix does; asks again,
/// as Nix would, while the hook postpones for a broker it is starting (the broker's own
/// postpones of a new build say what it waits for); the lines of every ask.
fn ask_holding_lock(setup: &Setup, hook: &mut Hook, name: &str) -> (Vec<String>, fs::File) {
    let (drv, _, lock) = locked_drv(setup, name);
    let mut said = Vec::new();
    nix_tier_tests::hook_env::wait_for("an answer from the broker", common::ANSWER_TIMEOUT, || {
        let lines = hook.ask(&drv);
        let answered = reply(&lines) != "# postpone" || lines.iter().any(|l| l.contains("waiting: "));
        said.extend(lines);
        answered.then_some(())
    });
    (said, lock)
}

/// `nix-tier status --json` for `setup`'s state directory; `None` if it does not answer JSON.
fn status(setup: &Setup) -> Option<serde_json::Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nix-tier"))
        .args(["status", "--json"])
        .env("NIX_TIER_STATE_DIR", setup.state())
        .env("NIX_TIER_PROFILE", setup.profile())
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// The pid of the broker of `setup`, from its lock file.
fn broker_pid(setup: &Setup) -> i32 {
    let mut pid = 0;
    nix_tier_tests::hook_env::wait_for("the broker's pid in broker.lock", common::ANSWER_TIMEOUT, || {
        pid = fs::read_to_string(setup.state().join("broker.lock")).ok()?.trim().parse().ok()?;
        Some(())
    });
    pid
}

#[test]
fn broken_broker_files_are_set_aside_and_builds_counted() {
    let setup = Setup::new(8000);
    one_heavy_slot(&setup);
    fs::create_dir_all(setup.state().join("broker.lock")).unwrap();
    fs::create_dir_all(setup.state().join("state.json")).unwrap();
    mkfifo(&setup.state().join("broker.sock"));
    let (lines, _first) = ask_holding_lock(&setup, &mut setup.hook_starting_the_broker(), "first-1.0");
    assert_eq!(reply(&lines), "# decline", "{lines:?}");
    assert!(!mentions(&lines, &["fails open"]), "admitted by the broker: {lines:?}");
    // Another client's hook: the broker counts the first build.
    let (lines, _second) = ask_holding_lock(&setup, &mut setup.hook(), "second-1.0");
    assert_eq!(reply(&lines), "# postpone", "{lines:?}");
    nix_tier_tests::hook_env::wait_for("nix-tier status to show the running build", common::ANSWER_TIMEOUT, || {
        (status(&setup)?["running"].as_array().map(Vec::len) == Some(1)).then_some(())
    });
}

/// The scheduling policy (sched(7)) of each of `pid`'s threads, by the thread's name.
fn thread_policies(pid: i32) -> Vec<(String, u32)> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).expect("the broker's threads");
    tasks
        .flatten()
        .filter_map(|task| {
            let name = fs::read_to_string(task.path().join("comm")).ok()?.trim().to_string();
            let stat = fs::read_to_string(task.path().join("stat")).ok()?;
            // Field 41, counting from the pid; the name (field 2) may hold spaces.
            let policy = stat.rsplit_once(')')?.1.split_whitespace().nth(41 - 3)?.parse().ok()?;
            Some((name, policy))
        })
        .collect()
}

#[test]
fn the_brokers_threads_off_the_reply_path_give_way_to_nix() {
    let setup = Setup::new(8000);
    let mut hook = setup.hook();
    let (lines, _lock) = ask_holding_lock(&setup, &mut hook, "first-1.0");
    assert!(!mentions(&lines, &["fails open"]), "{lines:?}");
    let policies = thread_policies(broker_pid(&setup));
    let policy = |name: &str| policies.iter().find(|(n, _)| n == name).map(|(_, p)| *p);
    for background in ["watcher", "snapshot", "dependents"] {
        assert_eq!(policy(background), Some(nix::libc::SCHED_BATCH as u32), "{background}: {policies:?}");
    }
    // The hook's connection is answered by a thread Nix's questions wake at once.
    assert_eq!(policy("connection"), Some(nix::libc::SCHED_OTHER as u32), "{policies:?}");
}

#[test]
fn a_stopped_broker_costs_a_short_wait_then_declines() {
    let setup = Setup::new(8000);
    one_heavy_slot(&setup);
    let mut hook = setup.hook();
    let (lines, _first) = ask_holding_lock(&setup, &mut hook, "first-1.0");
    assert!(!mentions(&lines, &["fails open"]), "{lines:?}");
    let broker = nix::unistd::Pid::from_raw(broker_pid(&setup));
    nix::sys::signal::kill(broker, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let asked = std::time::Instant::now();
    let (lines, _second) = ask_holding_lock(&setup, &mut setup.hook(), "second-1.0");
    let waited = asked.elapsed();
    nix::sys::signal::kill(broker, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(reply(&lines), "# decline", "fails open: {lines:?}");
    assert!(mentions(&lines, &["did not answer", "fails open"]), "{lines:?}");
    // 40 ms of waiting for the broker, and starting a hook; far less than Nix's patience.
    assert!(waited < std::time::Duration::from_secs(1), "declined after {waited:?}");
}

#[test]
fn a_broker_late_with_an_answer_is_asked_again_once_it_has_answered() {
    let setup = Setup::new(8000);
    one_heavy_slot(&setup);
    let mut hook = setup.hook();
    let broker = nix::unistd::Pid::from_raw(broker_pid(&setup));
    // Stopped before the hook's first question: it connects, asks, and gives up after 40 ms.
    nix::sys::signal::kill(broker, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let (first, _, _first_lock) = locked_drv(&setup, "first-1.0");
    let lines = hook.ask(&first);
    nix::sys::signal::kill(broker, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(reply(&lines), "# decline", "fails open: {lines:?}");
    assert!(mentions(&lines, &["did not answer", "fails open"]), "{lines:?}");
    // Resumed, it answers the question the hook gave up on: the build Nix built meanwhile
    // holds the heavy slot.
    nix_tier_tests::hook_env::wait_for("nix-tier status to show first-1.0 running", common::ANSWER_TIMEOUT, || {
        (status(&setup)?["running"].as_array()?.len() == 1).then_some(())
    });
    // The same hook asks at once (not after a second of declining) and is told to wait.
    let (lines, _second) = ask_holding_lock(&setup, &mut hook, "second-1.0");
    assert!(!mentions(&lines, &["fails open"]), "{lines:?}");
    assert_eq!(reply(&lines), "# postpone", "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("waiting: ") && l.contains("first-1.0")), "{lines:?}");
}

#[test]
fn a_build_declined_for_a_late_answer_is_told_to_the_broker_without_another_question() {
    let setup = Setup::new(8000);
    one_heavy_slot(&setup);
    let mut hook = setup.hook();
    let (lines, _first) = ask_holding_lock(&setup, &mut hook, "first-1.0");
    assert!(!mentions(&lines, &["fails open"]), "{lines:?}");
    let broker = nix::unistd::Pid::from_raw(broker_pid(&setup));
    nix::sys::signal::kill(broker, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let (second, _, _second_lock) = locked_drv(&setup, "second-1.0");
    let lines = hook.ask(&second);
    nix::sys::signal::kill(broker, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(reply(&lines), "# decline", "fails open: {lines:?}");
    // Nix builds it, and may ask nothing more (its last build): the broker, resumed, tells it to
    // wait for the heavy slot, and is told that it was declined, so it counts it as it starts.
    nix_tier_tests::hook_env::wait_for("second-1.0 to be told as declined", common::ANSWER_TIMEOUT, || (setup.tries() == [1, 2]).then_some(()));
}

#[test]
fn a_question_given_up_on_while_the_broker_starts_is_withdrawn() {
    use std::io::BufRead;
    let setup = Setup::new(8000);
    // The broker the hook starts exits at once, as when another is starting: this test holds
    // the broker's lock. It listens in its place once the hook has started one (its log is made
    // first), and never answers.
    let _held = hold_broker_lock(&setup);
    let state = setup.state();
    let (said, heard) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let began = std::time::Instant::now();
        while !state.join("broker.log").exists() {
            assert!(began.elapsed() < common::ANSWER_TIMEOUT, "the hook started no broker");
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        let listener = std::os::unix::net::UnixListener::bind(state.join("broker.sock")).unwrap();
        let (stream, _) = listener.accept().unwrap();
        for line in std::io::BufReader::new(stream).lines() {
            let _ = said.send(line.unwrap_or_default());
        }
    });
    let (drv, _) = write_drv(setup.path(), "w-1.0");
    let lines = setup.hook_starting_the_broker().ask(&drv);
    assert_eq!(reply(&lines), "# postpone", "waits for a broker starting: {lines:?}");
    // The connection's lines, until the hook closed it: its hello, the question, and then, the
    // answer not having come, that the question is withdrawn (a broker still starting would
    // otherwise admit a build Nix has let go of).
    let heard: Vec<String> = heard.iter().collect();
    assert!(heard.get(1).is_some_and(|l| l.contains("\"try\"")), "{heard:?}");
    assert_eq!(heard.get(2), Some(&format!(r#"{{"withdrawn":"{}"}}"#, drv.display())), "{heard:?}");
}

#[test]
fn a_withdrawn_question_lets_go_of_its_lease() {
    use nix_tier_hook::broker::{FromBroker, Hello, ToBroker, Told, TryBuild};
    use std::io::{BufRead, Write};
    let setup = Setup::new(8000);
    let (profile, state) = (setup.profile(), setup.state());
    common::start_broker(&setup.env(&profile, &state));
    // As a hook asks, for this process as its Nix worker, holding the output's lock as Nix does
    // while it asks (the broker would take a build whose lock is free for let go).
    let (drv, out, _lock) = locked_drv(&setup, "w-1.0");
    let me = std::process::id();
    let job = nix_tier_hook::watch::WatchJob {
        drv: drv.display().to_string(),
        name: "w-1.0".into(),
        tier: nix_tier_model::Tier::Light,
        memory_limit_mib: 100,
        memory_reserved_mib: None,
        limit_learned: false,
        cores: 1,
        lock_files: vec![std::path::PathBuf::from(format!("{}.lock", out.display()))],
        output_env: vec![format!("out={}", out.display())],
        outputs: vec![out.display().to_string()],
        nix_pid: me,
        builder_uids: vec![nix::unistd::getuid().as_raw()],
        asked_unix_ms: None,
        started_unix_ms: 0,
        cgroups: None,
    };
    let hello = Hello { worker_pid: me, max_jobs: 4, build: serde_json::from_value(build_section(8000)).unwrap(), poll_interval_secs: 0, store_db: None };
    let socket = std::os::unix::net::UnixStream::connect(state.join("broker.sock")).unwrap();
    let send = |message: &ToBroker| {
        let mut line = serde_json::to_vec(message).unwrap();
        line.push(b'\n');
        (&socket).write_all(&line).unwrap();
    };
    send(&ToBroker::Hello(hello));
    send(&ToBroker::Try(Told::Whole(Box::new(TryBuild { job, expected_ms: 1000 }))));
    let mut answer = String::new();
    std::io::BufReader::new(&socket).read_line(&mut answer).unwrap();
    assert_eq!(serde_json::from_str::<FromBroker>(&answer).unwrap(), FromBroker::Admit, "{answer}");
    let running = || status(&setup).and_then(|s| Some(s["running"].as_array()?.len()));
    nix_tier_tests::hook_env::wait_for("w-1.0 to hold a lease", common::ANSWER_TIMEOUT, || (running() == Some(1)).then_some(()));
    // Its hook postponed it without waiting for the answer: no builder will come.
    send(&ToBroker::Withdrawn(drv.display().to_string()));
    nix_tier_tests::hook_env::wait_for("the lease of w-1.0 to end", common::ANSWER_TIMEOUT, || (running() == Some(0)).then_some(()));
}

/// Nix lets go of an admitted build (no slot after all, a failure before it starts) by closing
/// its lock files. The watcher reads Nix's locks once, 100 ms into the watch (a close before
/// the watch began has no event), and after that only when it sees a close: the lease must still
/// end at once when the lock is released later.
#[test]
fn a_build_let_go_after_its_locks_were_read_ends_its_lease() {
    let setup = Setup::new(8000);
    let mut build = build_section(8000);
    build["defaultTier"] = "heavy".into(); // one heavy job at a time
    let profile = setup.path().join("heavy.json");
    write_profile(&profile, build);
    let mut hook = setup.hook_with_profile(&profile);
    // This process is the hook's Nix worker, holding the outputs' locks while it asks.
    let (first, _, first_lock) = locked_drv(&setup, "first-1.0");
    let lines = hook.ask(&first);
    assert_eq!(reply(&lines), "# decline", "first admitted: {lines:?}");
    let (second, _, _second_lock) = locked_drv(&setup, "second-1.0");
    let lines = hook.ask(&second);
    assert_eq!(reply(&lines), "# postpone", "the first holds the heavy slot: {lines:?}");
    // Time, not an event, is the point here: past the watcher's one read, which finds the lock held.
    std::thread::sleep(std::time::Duration::from_millis(400));
    let lines = hook.ask(&second);
    assert_eq!(reply(&lines), "# postpone", "the first's lock is held, its lease too: {lines:?}");
    let released = std::time::Instant::now();
    drop(first_lock);
    nix_tier_tests::hook_env::wait_for("second-1.0 to be admitted once the first's lock is released", common::ANSWER_TIMEOUT, || {
        (reply(&hook.ask(&second)) == "# decline").then_some(())
    });
    // Seen from the close: a read of the locks every 100 ms took as long.
    assert!(released.elapsed() < std::time::Duration::from_millis(500), "the release was seen after {:?}", released.elapsed());
}

#[test]
fn a_broker_answering_garbage_is_declined() {
    let setup = Setup::new(8000);
    // This test is the broker: it holds the lock (a real one started on demand exits) and
    // answers nonsense.
    let _held = hold_broker_lock(&setup);
    let listener = std::os::unix::net::UnixListener::bind(setup.state().join("broker.sock")).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            // Nonsense for every request line after the hello, on a connection kept open.
            std::thread::spawn(move || {
                let mut lines = std::io::BufRead::split(std::io::BufReader::new(&stream), b'\n').skip(1);
                while lines.next().is_some() {
                    let _ = std::io::Write::write_all(&mut &stream, b"\x00garbage\n");
                }
            });
        }
    });
    let (drv, _) = write_drv(setup.path(), "g-1.0");
    let lines = setup.hook_starting_the_broker().ask(&drv);
    assert_eq!(reply(&lines), "# decline", "{lines:?}");
    assert!(mentions(&lines, &["unreadable", "fails open"]), "{lines:?}");
}

#[test]
fn a_killed_broker_is_started_again_and_counts_the_build_still_running() {
    let setup = Setup::new(8000);
    one_heavy_slot(&setup);
    let mut hook = setup.hook();
    let (lines, _first_lock) = ask_holding_lock(&setup, &mut hook, "first-1.0");
    assert!(!mentions(&lines, &["fails open"]), "{lines:?}");
    // Its watcher lock (which holds the build's job) is what the next broker finds it from.
    nix_tier_tests::hook_env::wait_for("the watcher lock of first-1.0", common::ANSWER_TIMEOUT, || {
        fs::read_dir(setup.state().join("leases"))
            .ok()?
            .flatten()
            .any(|e| fs::read_to_string(e.path()).is_ok_and(|t| t.contains("first-1.0")))
            .then_some(())
    });
    // A build waits, and `nix-tier status` says so while the broker runs, not after it is gone.
    let (lines, _waiting_lock) = ask_holding_lock(&setup, &mut hook, "waiting-1.0");
    assert_eq!(reply(&lines), "# postpone", "{lines:?}");
    let waiting = || {
        nix_tier_tests::hook_env::wait_for("nix-tier status", common::ANSWER_TIMEOUT, || Some(status(&setup)?["waiting"].as_array()?.len()))
    };
    nix_tier_tests::hook_env::wait_for("the waiting build in nix-tier status", common::ANSWER_TIMEOUT, || (waiting() == 1).then_some(()));
    let broker = broker_pid(&setup);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(broker), nix::sys::signal::Signal::SIGKILL).unwrap();
    // Gone once its socket refuses connections: a killed process's threads and descriptors go a
    // moment after its main thread is a zombie.
    nix_tier_tests::hook_env::wait_for("the killed broker's socket to close", common::ANSWER_TIMEOUT, || {
        std::os::unix::net::UnixStream::connect(setup.state().join("broker.sock")).is_err().then_some(())
    });
    assert_eq!(waiting(), 0, "no broker, nothing waits");
    // A new client: its hook starts a broker, which counts the first build before answering
    // (until it does, the hook postpones too).
    let mut second_hook = setup.hook_starting_the_broker();
    let (lines, _second_lock) = ask_holding_lock(&setup, &mut second_hook, "second-1.0");
    assert_eq!(reply(&lines), "# postpone", "the running build still holds the heavy slot: {lines:?}");
    assert!(lines.iter().any(|l| l.contains("heavy tier 1/1 busy (first-1.0")), "{lines:?}");
    assert_ne!(broker_pid(&setup), broker);
    // The recovered build ends (its worker lets go of its lock): the slot is free again.
    drop(_first_lock);
    let (second, _) = write_drv(setup.path(), "second-1.0");
    nix_tier_tests::hook_env::wait_for("the recovered build to end", common::ANSWER_TIMEOUT, || {
        (reply(&second_hook.ask(&second)) == "# decline").then_some(())
    });
}

#[test]
fn a_client_that_does_not_read_its_answers_is_dropped_and_others_are_answered() {
    use std::io::Write;
    let setup = Setup::new(8000);
    let (lines, _first) = ask_holding_lock(&setup, &mut setup.hook(), "first-1.0");
    assert!(!mentions(&lines, &["fails open"]), "{lines:?}");
    // A client of Nix's user that asks and never reads: once the socket's buffers are full, the
    // broker cannot write it an answer.
    let socket = setup.state().join("broker.sock");
    let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    stream.set_write_timeout(Some(std::time::Duration::from_millis(200))).unwrap();
    let mut request = serde_json::to_vec(&nix_tier_hook::broker::ToBroker::Tries).unwrap();
    request.push(b'\n');
    let mut sent = 0;
    while (&stream).write_all(&request).is_ok() {
        sent += 1;
        assert!(sent < 10_000_000, "the broker read every request and its answers all fit");
    }
    nix_tier_tests::hook_env::wait_for("the broker to drop the connection that does not read", common::ANSWER_TIMEOUT, || {
        // Hung up (POLLHUP, reported whatever is asked for) once the broker closed its end; the
        // answers it wrote are still unread.
        let mut fds = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(&stream), nix::poll::PollFlags::empty())];
        let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)).unwrap();
        (ready > 0).then_some(())
    });
    let (lines, _second) = ask_holding_lock(&setup, &mut setup.hook(), "second-1.0");
    assert!(!mentions(&lines, &["fails open"]), "the broker still answers: {lines:?}");
}

#[test]
fn a_request_cut_short_is_still_answered() {
    let setup = Setup::new(8000);
    let mut hook = setup.hook();
    // "try", then am-willing, and Nix goes away before the rest.
    let mut bytes = Vec::new();
    nix_tier_hook::wire::write_string(&mut bytes, "try").unwrap();
    nix_tier_hook::wire::write_u64(&mut bytes, 1).unwrap();
    hook.write_raw(&bytes);
    hook.close();
    let lines = hook.reply("a truncated request");
    assert_eq!(reply(&lines), "# decline", "{lines:?}");
    assert!(!hook.child.wait().unwrap().success());
}

#[test]
fn an_unusable_state_directory_declines_and_says_why() {
    let setup = Setup::new(8000);
    fs::write(setup.state(), "not a directory").unwrap();
    let mut hook = setup.hook_starting_the_broker();
    let (drv, _) = write_drv(setup.path(), "s-1.0");
    let lines = hook.ask(&drv);
    assert_eq!(reply(&lines), "# decline", "{lines:?}");
    assert!(mentions(&lines, &["state/broker.sock", "Not a directory", "fails open", "without tier limits"]), "{lines:?}");
}
