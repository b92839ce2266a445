//! `nix-tier-bench`: the harness of `bench/dispatch` (docs/benchmarks.md).
//!
//! `nix-tier-bench latency [options]` starts a build hook the way Nix 2.8 does (argv `[argv0,
//! verbosity]`, the settings handshake on stdin; libstore/build/hook-instance.cc), then sends it
//! `try` requests for real `.drv` files and times each answer: from writing the request to reading
//! the `# …` reply line on the hook's stderr, which is how long Nix's worker waits for it
//! (derivation-goal.cc `tryBuildHook` reads the reply synchronously). Other stderr lines (messages
//! for the user) are skipped, as Nix shows them and reads on.
//!
//! Output locks are handled as Nix handles them: before each request the harness `flock`s the
//! derivation's `<output>.lock` files (Nix locks the outputs before asking the hook); after a
//! `postpone` it releases them; after a `decline` the build "runs": its locks stay held for the
//! next `--hold-admitted K` admissions, then the files are deleted and unlocked (a successful
//! build), so the hook sees about K running builds.
//!
//! Options:
//!   --program PATH        the hook
//!   --argv0 NAME          its argv[0] (default: the file name)
//!   --verbosity N         argv[1] (default 3, Nix's default verbosity)
//!   --settings FILE       `name = value` lines (as `nix show-config` prints them) for the handshake
//!   --set NAME=VALUE      one more setting, or an override (repeatable)
//!   --drvs FILE           .drv paths, one per line, asked about in turn
//!   --system S            the platform sent (default x86_64-linux)
//!   --willing 0|1         am-willing, whether Nix has a free local slot (default 1)
//!   --hold-admitted K     admitted builds keep their locks for K more admissions (default 0)
//!   --pin-first           the first .drv is asked about once and, admitted, keeps its locks to the
//!                         end (its tier stays busy); the others are asked about in turn
//!   --hold-lock PATH      flock PATH for the whole run (e.g. a build-remote slot; repeatable)
//!   --requests N          timed requests (default 2000), after --warmup W untimed ones (default 20)
//!   --pause-ms MS         pause between requests (default 2)
//!   --label TEXT          copied to the output
//!
//! Prints one JSON object: label, requests, replies by kind, other stderr lines, and the latency
//! percentiles (nearest rank) in microseconds.
//!
//! `nix-tier-bench decline LOG` is a build hook that does nothing: it reads the settings handshake,
//! answers `# decline` to every `try` at once and appends the asked `.drv` to LOG, one line per
//! request. Run by `build-hook` (through a script: Nix passes only its verbosity), it measures what Nix itself spends on asking a hook (the pipe
//! round trip per request, and how many requests per build Nix sends), whatever the hook decides.
//!
//! `nix-tier-bench decline LOG --relay` does the same, but passes each request's `.drv` to a
//! second process first (`nix-tier-bench echo`, over a Unix socket, as the hook asks its broker)
//! and waits for it back: what the two process hops of an admission cost on this machine, with
//! nothing decided on either side.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use nix_tier_hook::output_locks;
use nix_tier_hook::protocol::{self, Settings, TryRequest};
use nix_tier_model::derivation::Derivation;

struct Options {
    program: PathBuf,
    argv0: Option<String>,
    verbosity: String,
    settings: Settings,
    drvs: Vec<String>,
    system: String,
    willing: bool,
    hold_admitted: usize,
    pin_first: bool,
    hold_locks: Vec<PathBuf>,
    requests: usize,
    warmup: usize,
    pause: Duration,
    label: String,
}

fn parse_settings(text: &str) -> Settings {
    text.lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(" =")?;
            Some((name.trim().to_string(), value.strip_prefix(' ').unwrap_or(value).to_string()))
        })
        .collect()
}

fn options(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut o = Options {
        program: PathBuf::new(),
        argv0: None,
        verbosity: "3".into(),
        settings: Settings::new(),
        drvs: Vec::new(),
        system: "x86_64-linux".into(),
        willing: true,
        hold_admitted: 0,
        pin_first: false,
        hold_locks: Vec::new(),
        requests: 2000,
        warmup: 20,
        pause: Duration::from_millis(2),
        label: String::new(),
    };
    let mut overrides = Vec::new();
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        let number = |v: String| v.parse::<usize>().map_err(|_| format!("{v:?}: not a number"));
        match arg.as_str() {
            "--program" => o.program = value()?.into(),
            "--argv0" => o.argv0 = Some(value()?),
            "--verbosity" => o.verbosity = value()?,
            "--settings" => {
                let file = value()?;
                let text = fs::read_to_string(&file).map_err(|e| format!("{file}: {e}"))?;
                o.settings.extend(parse_settings(&text));
            }
            "--set" => {
                let v = value()?;
                let (name, value) = v.split_once('=').ok_or(format!("--set {v:?}: expected NAME=VALUE"))?;
                overrides.push((name.to_string(), value.to_string()));
            }
            "--drvs" => {
                let file = value()?;
                let text = fs::read_to_string(&file).map_err(|e| format!("{file}: {e}"))?;
                o.drvs = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
            }
            "--system" => o.system = value()?,
            "--willing" => o.willing = value()? != "0",
            "--hold-admitted" => o.hold_admitted = number(value()?)?,
            "--pin-first" => o.pin_first = true,
            "--hold-lock" => o.hold_locks.push(value()?.into()),
            "--requests" => o.requests = number(value()?)?,
            "--warmup" => o.warmup = number(value()?)?,
            "--pause-ms" => o.pause = Duration::from_millis(number(value()?)? as u64),
            "--label" => o.label = value()?,
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    o.settings.extend(overrides);
    if o.program.as_os_str().is_empty() || o.drvs.is_empty() {
        return Err("--program and --drvs are required".into());
    }
    Ok(o)
}

/// The output locks of one build, held.
struct Held {
    files: Vec<(PathBuf, File)>,
}

impl Held {
    /// Locks `drv`'s output lock files as Nix does before asking the hook (creating them).
    fn lock(drv_path: &str, cache: &mut BTreeMap<String, Vec<PathBuf>>) -> Result<Held, String> {
        let paths = match cache.get(drv_path) {
            Some(paths) => paths.clone(),
            None => {
                let drv = Derivation::read(Path::new(drv_path)).map_err(|e| e.to_string())?;
                let paths = output_locks::lock_files(&drv, drv_path);
                cache.insert(drv_path.to_string(), paths.clone());
                paths
            }
        };
        let mut files = Vec::new();
        for path in paths {
            let file = lock_file(&path)?;
            files.push((path, file));
        }
        Ok(Held { files })
    }

    /// Nix after a successful build: deletes the lock files, then unlocks.
    fn finish(self) {
        for (path, file) in self.files {
            let _ = fs::remove_file(&path);
            drop(file);
        }
    }
}

fn lock_file(path: &Path) -> Result<File, String> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.lock().map_err(|e| format!("locking {}: {e}", path.display()))?;
    Ok(file)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1].as_secs_f64() * 1e6
}

fn latency(o: Options) -> Result<serde_json::Value, String> {
    let _slot_locks: Vec<File> = o.hold_locks.iter().map(|p| lock_file(p)).collect::<Result<_, _>>()?;
    let argv0 = o.argv0.clone().unwrap_or_else(|| {
        o.program.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    });
    let mut child = Command::new(&o.program)
        .arg0(&argv0)
        .arg(&o.verbosity)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", o.program.display()))?;
    let mut to_hook = BufWriter::new(child.stdin.take().expect("stdin"));
    let mut from_hook = BufReader::new(child.stderr.take().expect("stderr"));
    protocol::write_settings(&mut to_hook, &o.settings).map_err(|e| format!("handshake: {e}"))?;
    to_hook.flush().map_err(|e| format!("handshake: {e}"))?;

    let mut cache = BTreeMap::new();
    let mut running: VecDeque<Held> = VecDeque::new();
    let mut pinned: Option<Held> = None;
    let mut samples = Vec::with_capacity(o.requests);
    let mut replies: BTreeMap<String, usize> = BTreeMap::new();
    let mut other_lines = 0usize;
    let mut examples: Vec<String> = Vec::new();
    let mut line = String::new();
    for i in 0..o.warmup + o.requests {
        // With --pin-first, the first .drv is asked about once (it stays admitted), then the rest in turn.
        let drv_path = match (o.pin_first, o.drvs.len()) {
            (true, n) if n > 1 && i > 0 => &o.drvs[1 + (i - 1) % (n - 1)],
            (_, n) => &o.drvs[i % n],
        };
        let request = TryRequest {
            am_willing: o.willing,
            system: o.system.clone(),
            drv_path: drv_path.clone(),
            required_features: Vec::new(),
        };
        let mut bytes = Vec::new();
        protocol::write_request(&mut bytes, &request).map_err(|e| e.to_string())?;
        let held = Held::lock(drv_path, &mut cache)?;

        let start = Instant::now();
        to_hook.write_all(&bytes).and_then(|()| to_hook.flush()).map_err(|e| format!("request {i}: {e}"))?;
        let reply = loop {
            line.clear();
            let n = from_hook.read_line(&mut line).map_err(|e| format!("reading reply {i}: {e}"))?;
            if n == 0 {
                let status = child.wait().map_err(|e| e.to_string())?;
                return Err(format!("{} exited ({status}) before answering request {i}", o.program.display()));
            }
            match line.trim_end().strip_prefix("# ") {
                Some(reply) => break reply.to_string(),
                None => {
                    other_lines += 1;
                    if examples.len() < 3 {
                        examples.push(line.trim_end().to_string());
                    }
                }
            }
        };
        let elapsed = start.elapsed();

        if i >= o.warmup {
            samples.push(elapsed);
            *replies.entry(reply.clone()).or_default() += 1;
        }
        if reply == "decline" && o.willing {
            // The build runs: its locks stay held for a while, then it succeeds.
            if o.pin_first && pinned.is_none() {
                pinned = Some(held);
            } else if o.hold_admitted == 0 {
                held.finish();
            } else {
                running.push_back(held);
                while running.len() > o.hold_admitted {
                    running.pop_front().expect("non-empty").finish();
                }
            }
        } else {
            // Postponed, or no local slot: Nix unlocks without deleting.
            drop(held);
        }
        if !o.pause.is_zero() {
            std::thread::sleep(o.pause);
        }
    }
    drop(to_hook);
    running.into_iter().chain(pinned).for_each(Held::finish);
    let deadline = Instant::now() + Duration::from_secs(5);
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    samples.sort();
    let mean = samples.iter().map(Duration::as_secs_f64).sum::<f64>() / samples.len().max(1) as f64 * 1e6;
    Ok(serde_json::json!({
        "label": o.label,
        "requests": samples.len(),
        "replies": replies,
        "otherLines": other_lines,
        "otherLineExamples": examples,
        "p50Us": percentile(&samples, 50.0),
        "p90Us": percentile(&samples, 90.0),
        "p99Us": percentile(&samples, 99.0),
        "maxUs": percentile(&samples, 100.0),
        "meanUs": mean,
    }))
}

/// `locks-probe [SECONDS] [THREADS]`: holds a `flock` on one file while THREADS threads take and
/// release flocks on files of their own, and reads `/proc/locks` over and over: how often the held
/// lock is absent from the table as `fs::read_to_string` returns it (`absentFromTable`: the kernel
/// writes the table a page at a time, so a read racing with other locks is not one snapshot), and
/// how often the hook's `HeldLocks::holds` says the file is not locked (`holdsSaidNo`).
fn locks_probe(mut args: impl Iterator<Item = String>) -> Result<serde_json::Value, String> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let seconds: u64 = args.next().map_or(Ok(5), |s| s.parse()).map_err(|_| "SECONDS: not a number")?;
    let threads: usize = args.next().map_or(Ok(4), |s| s.parse()).map_err(|_| "THREADS: not a number")?;
    let dir = std::env::temp_dir().join(format!("nix-tier-locks-probe-{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let target = dir.join("held.lock");
    let _held = lock_file(&target)?;
    let stop = Arc::new(AtomicBool::new(false));
    let churners: Vec<_> = (0..threads)
        .map(|t| {
            let (stop, path) = (stop.clone(), dir.join(format!("churn-{t}.lock")));
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(file) = lock_file(&path) {
                        drop(file);
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    // The held file as /proc/locks names it: "<major>:<minor>:<inode>" (hex device numbers).
    let meta = fs::metadata(&target).map_err(|e| e.to_string())?;
    let dev = std::os::unix::fs::MetadataExt::dev(&meta);
    let ino = std::os::unix::fs::MetadataExt::ino(&meta);
    let id = format!(" {:02x}:{:02x}:{ino} ", ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff), (dev & 0xff) | ((dev >> 12) & !0xff));
    let me = std::process::id();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut reads, mut missed, mut torn) = (0u64, 0u64, 0u64);
    while Instant::now() < deadline {
        // The raw table, read as the hook reads it (fs::read_to_string): is the held lock there?
        let table = fs::read_to_string("/proc/locks").map_err(|e| e.to_string())?;
        if !table.lines().any(|l| !l.contains("->") && l.contains(&id)) {
            torn += 1;
        }
        // The hook's own answer.
        let held = output_locks::HeldLocks::read().map_err(|e| e.to_string())?;
        reads += 1;
        if !held.holds(&target, me) {
            missed += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let churned: u64 = churners.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    let _ = fs::remove_dir_all(&dir);
    Ok(serde_json::json!({
        "reads": reads,
        "absentFromTable": torn,
        "holdsSaidNo": missed,
        "churnedLocks": churned,
        "threads": threads,
    }))
}

/// `decline LOG [--relay]`: the do-nothing hook (see the module's doc comment). Nix starts a hook
/// with argv `[name, verbosity]`, so `build-hook` names a script that runs `nix-tier-bench
/// decline LOG`.
fn decline(log: Option<String>, relay: bool) -> Result<(), String> {
    let log = log.ok_or("decline: LOG missing")?;
    let mut log = BufWriter::new(
        OpenOptions::new().create(true).append(true).open(&log).map_err(|e| format!("{log}: {e}"))?,
    );
    let mut echo = relay.then(start_echo).transpose()?;
    // One write, as nix-tier-hook answers.
    let decline = format!("{}\n", protocol::Reply::Decline.line());
    let mut input = std::io::stdin().lock();
    let mut answers = std::io::stderr().lock();
    protocol::read_settings(&mut input).map_err(|e| format!("handshake: {e}"))?;
    let mut echoed = String::new();
    while let Some(request) = protocol::read_request(&mut input).map_err(|e| format!("request: {e}"))? {
        if let Some(socket) = echo.as_mut() {
            writeln!(socket.get_mut(), "{}", request.drv_path).map_err(|e| format!("to echo: {e}"))?;
            echoed.clear();
            socket.read_line(&mut echoed).map_err(|e| format!("from echo: {e}"))?;
        }
        answers.write_all(decline.as_bytes()).map_err(|e| e.to_string())?;
        writeln!(log, "{}", request.drv_path).map_err(|e| e.to_string())?;
    }
    log.flush().map_err(|e| e.to_string())
}

/// Starts `nix-tier-bench echo` on one end of a Unix socket pair (it exits when the other end
/// closes); the other end.
fn start_echo() -> Result<BufReader<UnixStream>, String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socket pair: {e}"))?;
    let theirs = std::os::fd::OwnedFd::from(theirs);
    let copy = theirs.try_clone().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    Command::new(exe)
        .arg("echo")
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::from(copy))
        .spawn()
        .map_err(|e| format!("starting echo: {e}"))?;
    Ok(BufReader::new(ours))
}

/// `echo`: writes back every line read on stdin, each at once.
fn echo() -> Result<(), String> {
    let mut input = std::io::stdin().lock();
    let mut output = std::io::stdout().lock();
    let mut line = Vec::new();
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line).map_err(|e| e.to_string())? == 0 {
            return Ok(());
        }
        output.write_all(&line).and_then(|()| output.flush()).map_err(|e| e.to_string())?;
    }
}

/// The exit status of a subcommand that prints no JSON, its error said on stderr.
fn exit_status(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nix-tier-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let result = match args.next().as_deref() {
        Some("latency") => options(args).and_then(latency),
        Some("locks-probe") => locks_probe(args),
        // No JSON from these two: echo's stdout is its answer, decline's stderr goes to Nix.
        Some("echo") => return exit_status(echo()),
        Some("decline") => return exit_status(decline(args.next(), args.next().as_deref() == Some("--relay"))),
        _ => Err("usage: nix-tier-bench latency --program PATH --drvs FILE [options] (see the source's doc comment)".into()),
    };
    match result {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nix-tier-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
