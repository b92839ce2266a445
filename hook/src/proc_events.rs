//! The kernel's process events (the netlink process connector): every fork, exec and exit on
//! the machine, as it happens. The watcher learns from them the moment a Nix worker's child
//! executes its builder, instead of reading the workers' children over and over. Recent kernels
//! let any process of the initial namespaces listen (Linux 6.18 here); older ones want
//! `CAP_NET_ADMIN` when it subscribes, which the broker holds only before it drops its
//! capabilities, if it was started with them: elsewhere [`ProcEvents::open`] fails and the
//! watcher looks for builders in `/proc`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::libc;
use nix::sys::socket::{bind, setsockopt, sockopt, NetlinkAddr};

/// One process event; threads' forks and exits are left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcEvent {
    /// Process `child` was forked by process `parent` (its real parent: with `CLONE_PARENT`,
    /// the parent of the one that cloned it).
    Fork { parent: u32, child: u32 },
    /// Process `pid` executed a new program.
    Exec { pid: u32 },
    /// Process `pid` exited.
    Exit { pid: u32 },
    /// The kernel dropped events (the socket's buffer was full): what happened meanwhile must
    /// be read from `/proc`.
    Lost,
}

/// A socket subscribed to the machine's process events.
pub struct ProcEvents {
    socket: OwnedFd,
}

/// `struct nlmsghdr` (16 bytes), then `struct cn_msg` (20 bytes), then `struct proc_event`:
/// `what` (u32), `cpu` (u32), `timestamp_ns` (u64), then the event's fields.
const NLMSG_HEADER: usize = 16;
const CN_MSG_HEADER: usize = 20;
const EVENT: usize = NLMSG_HEADER + CN_MSG_HEADER;
const EVENT_FIELDS: usize = EVENT + 16;
/// How long the kernel may take to acknowledge the subscription (it does so at once).
const ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(200);
/// The buffer asked for: bursts of forks (a `make -j`) must not overflow it.
const RECEIVE_BUFFER_BYTES: usize = 4 << 20;

impl ProcEvents {
    /// Subscribes to the machine's process events; non-blocking.
    pub fn open() -> io::Result<ProcEvents> {
        // nix's `socket` knows no NETLINK_CONNECTOR.
        // SAFETY: a plain system call; the descriptor is owned exactly once, below.
        let fd = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, libc::NETLINK_CONNECTOR)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // A failure leaves the default buffer (SO_RCVBUFFORCE wants CAP_NET_ADMIN).
        if setsockopt(&socket, sockopt::RcvBufForce, &RECEIVE_BUFFER_BYTES).is_err() {
            let _ = setsockopt(&socket, sockopt::RcvBuf, &RECEIVE_BUFFER_BYTES);
        }
        bind(socket.as_raw_fd(), &NetlinkAddr::new(0, libc::CN_IDX_PROC))?;
        let events = ProcEvents { socket };
        events.send_listen()?;
        events.acknowledged()?;
        Ok(events)
    }

    /// Waits (briefly) for the kernel's answer to the subscription: one that refuses it (an
    /// older kernel, to a process without `CAP_NET_ADMIN`) would leave the socket silent.
    fn acknowledged(&self) -> io::Result<()> {
        let deadline = std::time::Instant::now() + ACK_TIMEOUT;
        let mut buffer = [0u8; 512];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut fds = [nix::poll::PollFd::new(self.socket.as_fd(), nix::poll::PollFlags::POLLIN)];
            let timeout = nix::poll::PollTimeout::try_from(left.as_millis().max(1) as i32).unwrap_or(nix::poll::PollTimeout::MAX);
            if nix::poll::poll(&mut fds, timeout)? == 0 {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the kernel did not acknowledge the subscription"));
            }
            let n = nix::sys::socket::recv(self.socket.as_raw_fd(), &mut buffer, nix::sys::socket::MsgFlags::empty())?;
            if u32_at(&buffer[..n], EVENT) == Some(libc::PROC_EVENT_NONE) {
                return match u32_at(&buffer[..n], EVENT_FIELDS) {
                    Some(0) => Ok(()),
                    Some(errno) => Err(io::Error::from_raw_os_error(errno as i32)),
                    None => Err(io::Error::new(io::ErrorKind::InvalidData, "a short acknowledgement")),
                };
            }
        }
    }

    /// Asks the kernel to send process events (`PROC_CN_MCAST_LISTEN`); it answers with an
    /// acknowledgement, or with nothing where the caller may not listen.
    fn send_listen(&self) -> io::Result<()> {
        let mut message = Vec::with_capacity(EVENT + 4);
        let length = (EVENT + 4) as u32;
        message.extend_from_slice(&length.to_ne_bytes());
        message.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
        message.extend_from_slice(&0u16.to_ne_bytes()); // flags
        message.extend_from_slice(&0u32.to_ne_bytes()); // sequence
        message.extend_from_slice(&std::process::id().to_ne_bytes());
        message.extend_from_slice(&libc::CN_IDX_PROC.to_ne_bytes());
        message.extend_from_slice(&libc::CN_VAL_PROC.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes()); // sequence
        message.extend_from_slice(&0u32.to_ne_bytes()); // ack
        message.extend_from_slice(&4u16.to_ne_bytes()); // data length
        message.extend_from_slice(&0u16.to_ne_bytes()); // flags
        message.extend_from_slice(&libc::PROC_CN_MCAST_LISTEN.to_ne_bytes());
        nix::sys::socket::send(self.socket.as_raw_fd(), &message, nix::sys::socket::MsgFlags::empty())?;
        Ok(())
    }

    /// Every event received so far, in order, handed to `each`; without waiting.
    pub fn drain(&self, mut each: impl FnMut(ProcEvent)) {
        let mut buffer = [0u8; 4096];
        loop {
            match nix::sys::socket::recv(self.socket.as_raw_fd(), &mut buffer, nix::sys::socket::MsgFlags::empty()) {
                Ok(0) | Err(nix::errno::Errno::EAGAIN) => return,
                Ok(n) => {
                    if let Some(event) = parse(&buffer[..n]) {
                        each(event);
                    }
                }
                Err(nix::errno::Errno::ENOBUFS) => each(ProcEvent::Lost),
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return,
            }
        }
    }
}

impl AsFd for ProcEvents {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// The event in one datagram from the connector; `None` for what is not a process's fork,
/// exec or exit (acknowledgements, other events, threads).
fn parse(datagram: &[u8]) -> Option<ProcEvent> {
    let field = |i: usize| u32_at(datagram, EVENT_FIELDS + 4 * i);
    let what = u32_at(datagram, EVENT)?;
    // Fields: fork (parent pid, parent tgid, child pid, child tgid); exec and exit (pid, tgid).
    match what {
        libc::PROC_EVENT_FORK => {
            let (parent, child, child_tgid) = (field(1)?, field(2)?, field(3)?);
            (child == child_tgid).then_some(ProcEvent::Fork { parent, child })
        }
        libc::PROC_EVENT_EXEC => Some(ProcEvent::Exec { pid: field(1)? }),
        libc::PROC_EVENT_EXIT => {
            let (pid, tgid) = (field(0)?, field(1)?);
            (pid == tgid).then_some(ProcEvent::Exit { pid })
        }
        _ => None,
    }
}

/// The native-endian `u32` at byte `at` of `datagram`, if it holds one there.
fn u32_at(datagram: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(datagram.get(at..at + 4)?.try_into().ok()?))
}
