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
use std::time::Duration;

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
        let timeout = self.timeout.map(TimeSpec::from_duration);
        loop {
            let mut fds = [PollFd::new(self.stream.as_fd(), PollFlags::POLLIN)];
            match nix::poll::ppoll(&mut fds, timeout, None) {
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
    use std::time::Instant;

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
}
