//! The hook's side of the broker: one connection per hook, a request and its answer per `try`,
//! and failing open.
//!
//! Every question gets an answer within [`ANSWER_WITHIN`] (give or take a millisecond, see
//! `keep_timeout`) or an error, and the hook then declines (Nix builds as without nix-tier): a
//! broker that is missing and cannot be started, hung (stopped), killed, or answering garbage
//! never holds a build back for longer. After a failure the broker is not asked again for
//! [`RETRY_AFTER`], so a hung broker costs one wait, not one per build; the next question
//! connects anew, starting a broker when none runs.
//!
//! A broker late with one answer is not taken for gone: the hook declines that build (Nix builds
//! it) but keeps the connection, and asks again as soon as the late answer has come, or after
//! [`RETRY_AFTER`]. Then the broker is told of the builds declined meanwhile, that build
//! among them unless it was admitted: it counts them as they start. A broker late again with
//! that answer is dropped. A broker has been seen late with a first answer on a loaded machine
//! (software emulation, where an answer took 5-20 ms).
//!
//! Builds the hook declines by itself (Nix has no slot, or its worker is full) are told to the
//! broker with the next question, or in one message of their own [`UNSENT_WITHIN`] after the
//! first of them was declined when no question came by then (and before the hook hands its
//! session to build-remote or exits): Nix asks about a dozen builds in a burst whenever one
//! ends, and a message for each would wake the broker a dozen times while Nix waits on this
//! hook; where builds end every few milliseconds, a message of their own after each burst cost
//! 0.04-0.05 of bench/dispatch (i)'s wall ratio. A build is sent whole once per connection; after
//! that it is named by its `.drv` until it is admitted.
//!
//! One exception: a broker this hook has just started (less than [`STARTING`] ago, and it runs
//! or it left at once for another one starting) is [`Failure::Starting`], not failed, and the
//! hook postpones instead of declining: Nix asks again at once, and the builds of a session's
//! first moments are counted like the rest.

use std::collections::{HashMap, HashSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::stream::ReadWhenReady;
use super::{Declined, FromBroker, Hello, Told, ToBroker, TryBuild, BROKER_ARG, MAX_LINE, SOCKET};
use crate::state::StateDir;

/// The longest a hook waits for the broker (connecting, starting it, the answer).
pub const ANSWER_WITHIN: Duration = Duration::from_millis(40);
/// How long the broker is left alone after it failed to answer.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long a broker this hook started may take to answer before it counts as failed.
pub const STARTING: Duration = Duration::from_secs(2);
/// How long after the first of them builds declined without asking the broker are told it, at
/// the latest. Nix may start such a build after all: the watcher matches its builder with it
/// when told within [`crate::watch::EXEC_MEMORY`] of the builder's exec.
pub const UNSENT_WITHIN: Duration = Duration::from_millis(20);
/// How many builds a connection may name before it is opened anew (both sides forget them).
const MAX_TOLD: usize = 4096;

/// Why the broker gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The broker this hook started is not answering yet: ask again soon.
    Starting,
    /// It failed (said for the user): decline.
    Failed(String),
}

/// A hook's connection to the broker.
pub struct Client {
    state_dir: StateDir,
    hello: Hello,
    connection: Option<BufReader<ReadWhenReady>>,
    /// Whether this connection's broker has been sent the hook's hello.
    said_hello: bool,
    /// Whether the broker answered a question on this connection (a new connection's broker
    /// knows nothing of the answers given on the last).
    answered: bool,
    /// When the broker may be asked again after a failure.
    resting_until: Option<Instant>,
    /// The build whose answer did not come in time on this connection (the hook declined it):
    /// a broker slow rather than gone answers it before anything else.
    late: Option<TryBuild>,
    /// The broker this hook started, reaped once it exits, and when.
    started: Option<(Child, Instant)>,
    /// The builds declined without asking the broker and not yet told it, each with the number
    /// of times.
    unsent: HashMap<String, (TryBuild, u32)>,
    /// When the first of `unsent` was declined (meaningless while there is none).
    unsent_since: Instant,
    /// The builds the broker has been sent whole on this connection and not admitted since.
    told: HashSet<String>,
    /// The write timeout set on this connection ([`keep_timeout`]).
    write_timeout: Option<Duration>,
}

impl Client {
    /// A client for the broker of `state_dir`, introducing itself with `hello`. Connects at the
    /// first question.
    pub fn new(state_dir: StateDir, hello: Hello) -> Client {
        Client {
            state_dir,
            hello,
            connection: None,
            said_hello: false,
            answered: false,
            resting_until: None,
            late: None,
            started: None,
            unsent: HashMap::new(),
            unsent_since: Instant::now(),
            told: HashSet::new(),
            write_timeout: None,
        }
    }

    /// The Nix worker this hook serves, as its hello says.
    pub fn worker_pid(&self) -> u32 {
        self.hello.worker_pid
    }

    /// Asks about one build, telling the broker first of the builds declined since the last
    /// message.
    pub fn ask(&mut self, request: &TryBuild) -> Result<FromBroker, Failure> {
        if self.resting_until.is_some_and(|until| Instant::now() < until) && !self.caught_up() {
            if self.late.is_some() {
                // Nix builds it: told to the broker, should it turn out slow rather than gone.
                self.tell_declined(request);
            } else {
                self.unsent.clear();
            }
            return Err(Failure::Failed("the broker failed to answer a moment ago".to_string()));
        }
        self.resting_until = None;
        let deadline = Instant::now() + ANSWER_WITHIN;
        let answer = match self.exchange(request, deadline) {
            Ok(Some(answer)) => answer,
            Err(_) | Ok(None) if self.starting() => {
                self.withdraw(request);
                self.disconnect();
                return Err(Failure::Starting);
            }
            Ok(None) => {
                // Nix builds it: the broker is told so with the next message, Nix quiet or not,
                // unless its late answer admits it first.
                self.late = Some(request.clone());
                self.tell_declined(request);
                self.resting_until = Some(Instant::now() + RETRY_AFTER);
                return Err(Failure::Failed(late()));
            }
            Err(error) => return Err(self.failed(error)),
        };
        self.answer_about(request, answer).map_err(|error| self.failed(error))
    }

    /// Tells the broker, without waiting, that the hook answered `postpone` for `build` by itself:
    /// a broker still starting may yet admit it, and its lease would hold a slot for a build
    /// Nix let go of, until Nix asks again.
    fn withdraw(&mut self, build: &TryBuild) {
        let Some(connection) = self.connection.as_ref() else { return };
        let Ok(mut line) = serde_json::to_vec(&ToBroker::Withdrawn(build.job.drv.clone())) else { return };
        line.push(b'\n');
        let _ = nix::sys::socket::send(connection.get_ref().get_ref().as_raw_fd(), &line, nix::sys::socket::MsgFlags::MSG_DONTWAIT);
    }

    /// `answer`, about `build`, as the hook takes it: the broker forgets a build it admits (it
    /// is sent whole the next time); a refusal, or an answer to another question, is an error.
    fn answer_about(&mut self, build: &TryBuild, answer: FromBroker) -> Result<FromBroker, String> {
        match answer {
            FromBroker::Admit => {
                self.told.remove(&build.job.drv);
                Ok(answer)
            }
            FromBroker::Wait { .. } | FromBroker::WorkerFull { .. } => Ok(answer),
            FromBroker::Refused(why) => Err(format!("the broker refused the request: {why}")),
            FromBroker::Tries(_) | FromBroker::SlotFreed => Err("the broker answered another question".to_string()),
        }
    }

    /// Notes a build declined without asking the broker, to be told with the next message
    /// ([`Client::send_unsent`]).
    pub fn tell_declined(&mut self, request: &TryBuild) {
        if self.unsent.is_empty() {
            self.unsent_since = Instant::now();
        }
        self.unsent.entry(request.job.drv.clone()).or_insert_with(|| (request.clone(), 0)).1 += 1;
    }

    /// How long until the builds declined without asking the broker are to be told it, unless
    /// a question takes them first ([`UNSENT_WITHIN`]); `None` when there are none.
    pub fn unsent_due_in(&self) -> Option<Duration> {
        (!self.unsent.is_empty()).then(|| UNSENT_WITHIN.saturating_sub(self.unsent_since.elapsed()))
    }

    /// Tells the broker of the builds declined without asking it (no answer is awaited, so a
    /// broker late with an answer is told all the same); nothing is said when it cannot be told.
    /// Nix may ask meanwhile: a broker that does not listen now is neither started nor waited
    /// for, and they are told with the next question.
    pub fn send_unsent(&mut self) {
        if self.late.is_none() && self.resting_until.is_some_and(|until| Instant::now() < until) {
            self.unsent.clear();
            return;
        }
        let deadline = Instant::now() + ANSWER_WITHIN;
        if self.connection.is_none() {
            match connect_at_once(&self.state_dir.path().join(SOCKET)) {
                Ok(stream) => self.connected(stream),
                Err(_) => return,
            }
        }
        if let Err(error) = self.send(None, deadline) {
            if !self.starting() {
                self.failed(error);
            }
            self.disconnect();
        }
    }

    /// Whether a broker may be still starting: this hook started one lately, and it runs, or it
    /// exited at once because another one holds the broker's lock (started by another hook at
    /// the same moment, and starting too). A hook that took the second for a failure would
    /// decline, and Nix build, everything its worker asks about for a second.
    fn starting(&mut self) -> bool {
        self.started.as_mut().is_some_and(|(child, at)| {
            at.elapsed() < STARTING && child.try_wait().is_ok_and(|status| status.is_none_or(|s| s.success()))
        })
    }

    fn failed(&mut self, error: String) -> Failure {
        self.disconnect();
        self.unsent.clear();
        self.resting_until = Some(Instant::now() + RETRY_AFTER);
        Failure::Failed(error)
    }

    /// Sends `request` and reads its answer until `deadline`: `None` if it has not come by then
    /// (the broker owes it).
    fn exchange(&mut self, request: &TryBuild, deadline: Instant) -> Result<Option<FromBroker>, String> {
        self.send(Some(request), deadline)?;
        if self.late.is_some() && !self.take_late_answer(deadline)? {
            // Late twice with the same answer: not merely slow.
            return Err(late());
        }
        match self.read_answer(deadline) {
            // A broker that exits for being idle closes the connections it has not served:
            // on a connection that had no answer yet, the question is asked once more, on a
            // new one (starting a broker if none listens), before the deadline.
            Err(_) if !self.answered => {
                self.disconnect();
                self.send(Some(request), deadline)?;
                self.read_answer(deadline)
            }
            answer => answer,
        }
    }

    /// Whether the broker, late with an answer on this connection, has given it since: it is
    /// taken without waiting (the broker writes an answer whole).
    fn caught_up(&mut self) -> bool {
        let Some(connection) = self.connection.as_ref().filter(|_| self.late.is_some()) else { return false };
        if connection.buffer().is_empty() && !readable_now(connection.get_ref().get_ref()) {
            return false;
        }
        match self.take_late_answer(Instant::now() + Duration::from_millis(1)) {
            Ok(came) => came,
            Err(error) => {
                self.failed(error);
                false
            }
        }
    }

    /// Reads the answer the broker was late with, until `deadline`; whether it came. A build
    /// it admitted holds a lease: it need not be told as declined (the others were, and Nix
    /// builds them: the broker counts them as they start).
    fn take_late_answer(&mut self, deadline: Instant) -> Result<bool, String> {
        let Some(answer) = self.read_answer(deadline)? else { return Ok(false) };
        let build = self.late.take().expect("an answer is owed");
        if self.answer_about(&build, answer)? == FromBroker::Admit {
            self.unsent.remove(&build.job.drv);
        }
        Ok(true)
    }

    /// Reads the next answer, until `deadline`: `None` if it has not come by then.
    fn read_answer(&mut self, deadline: Instant) -> Result<Option<FromBroker>, String> {
        let connection = self.connection.as_mut().expect("connected by send");
        // A slot said to be free before the answer may have freed after the broker decided.
        let mut slot_freed = false;
        loop {
            let Some(timeout) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else { return Ok(None) };
            connection.get_mut().set_read_timeout(Some(timeout));
            let mut answer = Vec::new();
            match connection.by_ref().take(MAX_LINE).read_until(b'\n', &mut answer) {
                Ok(0) => return Err("the broker closed the connection".to_string()),
                Ok(_) if answer.ends_with(b"\n") => {}
                Ok(_) => return Err(format!("the broker's answer was cut short (connection closed, or over {} MiB)", MAX_LINE >> 20)),
                // What was read of a line is gone with `answer`: the connection cannot be kept.
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) && answer.is_empty() => return Ok(None),
                Err(e) => return Err(format!("reading from the broker: {e}")),
            }
            let answer = match serde_json::from_slice(&answer).map_err(|e| format!("the broker's answer is unreadable ({e})"))? {
                FromBroker::SlotFreed => {
                    // The answer is still owed, within what is left of the deadline.
                    slot_freed = true;
                    continue;
                }
                FromBroker::WorkerFull { reserved_mib, .. } if slot_freed => FromBroker::WorkerFull { alike: None, reserved_mib },
                answer => answer,
            };
            self.answered = true;
            return Ok(Some(answer));
        }
    }

    /// Whether the broker may have said, since its last answer, that a slot of this worker may
    /// be free ([`FromBroker::SlotFreed`]; or the connection is gone): until then, the worker is
    /// as full as that answer said. A look at the socket, without waiting.
    pub fn slot_may_be_free(&mut self) -> bool {
        let Some(connection) = self.connection.as_ref().filter(|_| self.answered) else { return true };
        !connection.buffer().is_empty() || readable_now(connection.get_ref().get_ref())
    }

    /// Takes `stream` as the connection to a broker that knows nothing of this hook yet.
    fn connected(&mut self, stream: UnixStream) {
        self.connection = Some(BufReader::new(ReadWhenReady::new(stream)));
        self.said_hello = false;
        self.answered = false;
        self.told.clear();
        self.write_timeout = None;
    }

    /// Drops the connection, and the answer the broker was late with on it.
    fn disconnect(&mut self) {
        self.connection = None;
        self.late = None;
    }

    /// Writes the builds declined since the last message, then `request` if any, connecting
    /// first if needed.
    fn send(&mut self, request: Option<&TryBuild>, deadline: Instant) -> Result<(), String> {
        if self.told.len() > MAX_TOLD {
            self.disconnect();
        }
        let mut lines = Vec::new();
        if self.connection.is_none() {
            let stream = self.connect(deadline)?;
            self.connected(stream);
        }
        if !self.said_hello {
            // Written with what follows, under the write timeout.
            serde_json::to_writer(&mut lines, &ToBroker::Hello(self.hello.clone())).map_err(|e| e.to_string())?;
            lines.push(b'\n');
            self.said_hello = true;
        }
        if !self.unsent.is_empty() {
            let unsent = std::mem::take(&mut self.unsent);
            let builds = unsent.into_values().map(|(build, times)| Declined { build: self.told(&build), times }).collect();
            serde_json::to_writer(&mut lines, &ToBroker::Declined(builds)).map_err(|e| e.to_string())?;
            lines.push(b'\n');
        }
        if let Some(request) = request {
            serde_json::to_writer(&mut lines, &ToBroker::Try(self.told(request))).map_err(|e| e.to_string())?;
            lines.push(b'\n');
        }
        let connection = self.connection.as_mut().expect("connected above");
        let timeout = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero());
        let timeout = timeout.ok_or(format!("the broker did not read the request within {ANSWER_WITHIN:?}"))?;
        keep_timeout(&mut self.write_timeout, timeout, |t| connection.get_ref().get_ref().set_write_timeout(t)).map_err(|e| e.to_string())?;
        connection.get_ref().get_ref().write_all(&lines).map_err(|e| format!("writing to the broker: {e}"))
    }

    /// `build` as this connection's broker is to be told of it: whole the first time, by its
    /// `.drv` after that.
    fn told(&mut self, build: &TryBuild) -> Told {
        match self.told.insert(build.job.drv.clone()) {
            true => Told::Whole(Box::new(build.clone())),
            false => Told::Known(build.job.drv.clone()),
        }
    }

    /// Connects, starting a broker when none listens, until `deadline`.
    fn connect(&mut self, deadline: Instant) -> Result<UnixStream, String> {
        let socket = self.state_dir.path().join(SOCKET);
        let mut started = false;
        loop {
            match connect_at_once(&socket) {
                Ok(stream) => return Ok(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(format!(
                        "the broker at {} accepts no connections (its queue is full: is it stopped?)",
                        socket.display()
                    ))
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
                    if !started {
                        self.start_broker().map_err(|e| format!("cannot start the broker: {e}"))?;
                        started = true;
                    }
                }
                Err(e) => return Err(format!("cannot connect to the broker at {}: {e}", socket.display())),
            }
            if Instant::now() >= deadline {
                return Err(format!("no broker at {} within {ANSWER_WITHIN:?}", socket.display()));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Starts `nix-tier-hook --broker` in its own process group (Nix ends the hook's group with
    /// its worker; the broker serves every worker), its errors appended to `broker.log` in the
    /// state directory. Should another hook start one at the same moment, one of the two exits
    /// at once (the broker's lock).
    fn start_broker(&mut self) -> io::Result<()> {
        if let Some((child, _)) = self.started.as_mut() {
            if child.try_wait()?.is_none() {
                return Ok(());
            }
        }
        let log = self
            .state_dir
            .append("broker.log")
            .map_err(|e| io::Error::new(e.kind(), format!("state directory {}: {e}", self.state_dir.path().display())))?;
        // /proc/self/exe still works after the binary was upgraded in place.
        let child = Command::new("/proc/self/exe")
            .arg(BROKER_ARG)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()?;
        self.started = Some((child, Instant::now()));
        Ok(())
    }
}

/// Why a hook gave up on an answer.
fn late() -> String {
    format!("the broker did not answer within {ANSWER_WITHIN:?}")
}

/// Whether `connection` has something to read (or is closed), without waiting; an error counts
/// as something to read.
fn readable_now(connection: &UnixStream) -> bool {
    let mut fds = [nix::poll::PollFd::new(connection.as_fd(), nix::poll::PollFlags::POLLIN)];
    nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).map_or(true, |ready| ready > 0)
}

/// Connects to `socket` without waiting: a broker that stopped accepting (hung, or stopped)
/// leaves connections queued, closed or not, and once its queue is full a blocking `connect`
/// would wait for good, with no timeout to end it. Refused at once instead (`WouldBlock`).
fn connect_at_once(socket: &Path) -> io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket as new_socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = new_socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
    connect(fd.as_raw_fd(), &UnixAddr::new(socket)?)?;
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Sets a socket's timeout (`set`, which `apply` gave it last) to `wanted`, unless it is within
/// a millisecond of it already. Every question comes with a fresh deadline, so the timeout
/// set at a connection's first question serves the rest: two system calls less per question
/// on Nix's path, and the answer still comes, or fails, within a millisecond of its deadline.
fn keep_timeout(set: &mut Option<Duration>, wanted: Duration, apply: impl FnOnce(Option<Duration>) -> io::Result<()>) -> io::Result<()> {
    if set.is_some_and(|t| t.abs_diff(wanted) < Duration::from_millis(1)) {
        return Ok(());
    }
    apply(Some(wanted))?;
    *set = Some(wanted);
    Ok(())
}
