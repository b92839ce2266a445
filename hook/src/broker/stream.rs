//! How both ends of a broker connection read: only once poll(2) finds the socket readable.
//!
//! A thread blocked in `read` on a Unix stream socket sleeps on the socket's one wait queue,
//! which is also woken whenever the peer reads what this end wrote (the freed send buffer makes
//! the socket writable). Each exchange thus woke the hook while the broker read its question,
//! and the broker's connection thread while the hook read the answer: a context switch for
//! nothing each, on two cores that Nix's worker and the builders need. poll(2) is woken only
//! for what it waits for (docs/benchmarks.md, "Evening, 2026-12-04").

use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags};
use nix::sys::time::TimeSpec;

/// A Unix stream read once it is readable, within a read timeout of its own (instead of the
/// socket's `SO_RCVTIMEO`).
pub struct ReadWhenReady {
    stream: UnixStream,
    timeout: Option<Duration>,
}

impl ReadWhenReady {
    /// Reads `stream`, waiting for good until [`ReadWhenReady::set_read_timeout`].
    pub fn new(stream: UnixStream) -> ReadWhenReady {
        ReadWhenReady { stream, timeout: None }
    }

    /// How long a read waits for the stream to become readable before it fails with
    /// `WouldBlock`; `None` waits for good.
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// The stream, for writing and for looks that do not read.
    pub fn get_ref(&self) -> &UnixStream {
        &self.stream
    }
}

impl Read for ReadWhenReady {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // A signal interrupts the wait, which goes on for what is left of the timeout.
        let deadline = self.timeout.map(|timeout| Instant::now() + timeout);
        loop {
            let left = deadline.map(|deadline| TimeSpec::from_duration(deadline.saturating_duration_since(Instant::now())));
            let mut fds = [PollFd::new(self.stream.as_fd(), PollFlags::POLLIN)];
            match nix::poll::ppoll(&mut fds, left, None) {
                Ok(0) => return Err(io::ErrorKind::WouldBlock.into()),
                // Readable, closed or failed: the read says which, without waiting.
                Ok(_) => return self.stream.read(buf),
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(errno.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_read_waits_for_data_within_its_timeout_and_sees_the_peer_go() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut reader = ReadWhenReady::new(ours);
        reader.set_read_timeout(Some(Duration::from_millis(30)));
        let mut buf = [0u8; 8];
        let began = Instant::now();
        let error = reader.read(&mut buf).expect_err("nothing was written");
        assert_eq!(error.kind(), io::ErrorKind::WouldBlock);
        assert!(began.elapsed() >= Duration::from_millis(30), "gave up after {:?}", began.elapsed());
        theirs.write_all(b"answer\n").unwrap();
        assert_eq!(reader.read(&mut buf).unwrap(), 7);
        assert_eq!(&buf[..7], b"answer\n");
        drop(theirs);
        assert_eq!(reader.read(&mut buf).unwrap(), 0, "the peer closed");
    }

    #[test]
    fn signals_do_not_stretch_a_read_timeout() {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
        extern "C" fn ignore(_: i32) {}
        // Without SA_RESTART, as a process with a handler of its own may have: ppoll fails with EINTR.
        let action = SigAction::new(SigHandler::Handler(ignore), SaFlags::empty(), SigSet::empty());
        unsafe { sigaction(Signal::SIGUSR1, &action) }.unwrap();
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            tx.send(nix::sys::pthread::pthread_self()).unwrap();
            let mut reader = ReadWhenReady::new(ours);
            reader.set_read_timeout(Some(Duration::from_millis(100)));
            let began = Instant::now();
            let error = reader.read(&mut [0u8; 8]).expect_err("nothing was written");
            (error.kind(), began.elapsed())
        });
        let thread = rx.recv().unwrap();
        // A signal every 10 ms for as long as the read lasts, up to two seconds.
        let began = Instant::now();
        while !reader.is_finished() && began.elapsed() < Duration::from_secs(2) {
            let _ = nix::sys::pthread::pthread_kill(thread, Signal::SIGUSR1);
            std::thread::sleep(Duration::from_millis(10));
        }
        let (kind, took) = reader.join().unwrap();
        assert_eq!(kind, io::ErrorKind::WouldBlock);
        assert!(took < Duration::from_millis(600), "a 100 ms timeout took {took:?} under signals");
    }
}
