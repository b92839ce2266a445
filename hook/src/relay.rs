//! Nix's own remote builders, kept working behind the tier hook: Nix's `build-remote` runs as a
//! child hook, gets the same settings and every `try` first, and its answer is relayed. Only
//! builds it declines (to be built locally) are subject to the tiers.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStderr, ChildStdin, Command, Stdio};

use crate::protocol::{self, Reply, Settings, TryRequest};

/// A running build-remote.
pub struct Relay {
    child: Child,
    stdin: ChildStdin,
    stderr: BufReader<ChildStderr>,
}

/// What build-remote said about one request.
pub struct RelayAnswer {
    /// Its reply.
    pub reply: Reply,
    /// Lines it printed before the reply (log messages for the user), to pass on.
    pub lines: Vec<String>,
}

impl Relay {
    /// Starts `program` as Nix starts a hook (argv `build-remote <verbosity>`; fds 4 and 5, the
    /// builder-log pipe Nix gave us, are inherited) and sends it the settings.
    pub fn start(program: &Path, verbosity: &str, settings: &Settings) -> io::Result<Relay> {
        let mut child = Command::new(program)
            .arg0("build-remote")
            .arg(verbosity)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
        protocol::write_settings(&mut stdin, settings)?;
        stdin.flush()?;
        Ok(Relay { child, stdin, stderr })
    }

    /// Asks build-remote about `request`. It may have answered `# decline-permanently` before
    /// reading anything (no machines configured): then the write fails or its reply is that.
    pub fn ask(&mut self, request: &TryRequest) -> io::Result<RelayAnswer> {
        let sent = protocol::write_request(&mut self.stdin, request).and_then(|()| self.stdin.flush());
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if self.stderr.read_line(&mut line)? == 0 {
                sent?;
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "build-remote exited without replying"));
            }
            let line = line.trim_end_matches('\n').to_string();
            match Reply::parse(&line) {
                Some(reply) => return Ok(RelayAnswer { reply, lines }),
                None => lines.push(line),
            }
        }
    }

    /// After `# accept`: passes the machine name on, then connects Nix and build-remote
    /// directly (our stdin to its stdin, its stderr to ours) until it exits; returns its status.
    pub fn hand_over(mut self) -> io::Result<i32> {
        let mut stdin = self.stdin;
        let feeder = std::thread::spawn(move || {
            let _ = io::copy(&mut io::stdin().lock(), &mut stdin);
        });
        io::copy(&mut self.stderr, &mut io::stderr().lock())?;
        let status = self.child.wait()?;
        drop(feeder);
        Ok(status.code().unwrap_or(1))
    }

    /// Stops the child (it has nothing more to do).
    pub fn stop(mut self) {
        drop(self.stdin);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
