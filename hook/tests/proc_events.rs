//! The kernel's process events, as the broker's watcher reads them: a child's fork with its
//! parent, its execs and its exit, in order; threads left out.

use std::process::Command;
use std::time::{Duration, Instant};

use nix_tier_hook::proc_events::{ProcEvent, ProcEvents};
use nix_tier_tests::requires;

/// Opens the events; on a kernel that refuses them this fails under CI=true (this project's
/// machine lets any process listen).
fn open_or_require() -> Option<ProcEvents> {
    let opened = ProcEvents::open();
    let what = format!("the kernel's process events (NETLINK_CONNECTOR, CN_IDX_PROC): {:?}", opened.as_ref().err());
    requires(opened.is_ok(), &what).then(|| opened.unwrap())
}

#[test]
fn a_childs_fork_execs_and_exit_are_seen_in_order_and_threads_left_out() {
    let Some(events) = open_or_require() else { return };
    let me = std::process::id();
    // A thread first: its creation is no process's fork.
    std::thread::spawn(|| ()).join().unwrap();
    let mut child = Command::new("/bin/sh").args(["-c", "exec /bin/true"]).spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    while !seen.contains(&ProcEvent::Exit { pid }) {
        assert!(Instant::now() < deadline, "no exit event of {pid} within 5 s; seen: {seen:?}");
        let mut fds = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(&events), nix::poll::PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u8));
        events.drain(|event| match event {
            ProcEvent::Fork { parent, .. } if parent == me => seen.push(event),
            ProcEvent::Exec { pid: p } | ProcEvent::Exit { pid: p } if p == pid => seen.push(event),
            ProcEvent::Lost => seen.push(event),
            _ => {}
        });
    }
    assert_eq!(
        seen,
        vec![ProcEvent::Fork { parent: me, child: pid }, ProcEvent::Exec { pid }, ProcEvent::Exec { pid }, ProcEvent::Exit { pid }],
        "this process's one fork (sh; not the thread), sh's exec, /bin/true's in its place, its exit"
    );
}
