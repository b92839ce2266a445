//! A guest kernel for what this machine's own kernel cannot show: cgroup v2 with the memory and
//! cpu controllers, as NixOS has it (this machine binds them to cgroup v1).
//!
//! qemu boots Debian's kernel (`build/guest/`, made by `scripts/guest-kernel`) under software
//! emulation (KVM does not run a nested guest here) with this machine's root file system as its
//! own, read-only over 9p under an overlay that keeps the guest's writes in memory: the same
//! Nix, binaries and tests. `tests/guest/init` mounts fresh kernel file systems and cgroup2 alone
//! at `/sys/fs/cgroup`, then runs the command this side left in a shared directory and powers off.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::requires;

/// What the guest kernel's watchdog prints when a CPU has been stuck in the kernel for seconds.
const SOFT_LOCKUP: &str = "BUG: soft lockup";

/// The guest's kernel and initramfs.
pub struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
}

/// How a command run in the guest ended.
#[derive(Debug)]
pub struct GuestRun {
    /// Its exit status; `None` if the guest stopped before it ended.
    pub status: Option<i32>,
    /// Its standard output and error.
    pub output: String,
    /// What the guest kernel printed on its console.
    pub console: String,
}

impl Guest {
    /// The guest made by `scripts/guest-kernel`, with qemu to boot it; `None` (a failure under
    /// `CI=true`) when either is missing.
    pub fn find() -> Option<Guest> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest");
        let guest = Guest { kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.gz") };
        let qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
        (requires(qemu, "qemu-system-x86_64 (Debian's qemu-system-x86: scripts/setup installs it)")
            && requires(guest.kernel.is_file() && guest.initrd.is_file(), "build/guest/vmlinuz and initrd.gz (scripts/guest-kernel)"))
        .then_some(guest)
    }

    /// Runs `program` with `args` and `env` in the guest, in `dir`, as root; gives up on the
    /// guest after `timeout`. A guest whose kernel locks up is stopped at once and booted once
    /// more; a second lockup is the run's result. Under this software emulation both virtual
    /// CPUs were seen stuck in the guest's kernel, in about one boot of twenty-five, where it
    /// patched its code for the first memory cgroup (`tests/guest/init` now makes that one
    /// before anything else runs); the kernel's watchdog tells a lockup on the console, with
    /// the stacks at `loglevel=5`.
    pub fn run(&self, dir: &Path, program: &Path, args: &[&str], env: &[(&str, &str)], timeout: Duration) -> GuestRun {
        let run = self.run_once(dir, program, args, env, timeout);
        if !run.console.contains(SOFT_LOCKUP) {
            return run;
        }
        eprintln!("the guest's kernel locked up; booting it once more. Its console:\n{}", run.console);
        self.run_once(dir, program, args, env, timeout)
    }

    fn run_once(&self, dir: &Path, program: &Path, args: &[&str], env: &[(&str, &str)], timeout: Duration) -> GuestRun {
        let share = tempfile::tempdir().unwrap();
        let quoted = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let mut script = format!("cd {} || exit 1\nexec env", quoted(&dir.to_string_lossy()));
        for (name, value) in env {
            script.push_str(&format!(" {}", quoted(&format!("{name}={value}"))));
        }
        script.push_str(&format!(" {}", quoted(&program.to_string_lossy())));
        for arg in args {
            script.push_str(&format!(" {}", quoted(arg)));
        }
        script.push('\n');
        fs::write(share.path().join("run.sh"), script).unwrap();

        let console = fs::File::create(share.path().join("console.log")).unwrap();
        // qemu64, the plainest x86-64, emulates faster than `max` (-25 % in the cgroup tests).
        let mut qemu = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg,thread=multi", "-cpu", "qemu64", "-smp", "2", "-m", "4096"])
            .args(["-nographic", "-no-reboot", "-net", "none", "-kernel"])
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", "console=ttyS0 panic=-1 loglevel=5"])
            .args(["-virtfs", "local,path=/,mount_tag=host,security_model=passthrough,readonly=on,multidevs=remap"])
            .arg("-virtfs")
            .arg(format!("local,path={},mount_tag=share,security_model=passthrough", share.path().display()))
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console)
            .spawn()
            .expect("starting qemu-system-x86_64");
        let read = |name: &str| fs::read_to_string(share.path().join(name)).unwrap_or_default();
        let deadline = Instant::now() + timeout;
        let mut console_read = Instant::now();
        while qemu.try_wait().unwrap().is_none() {
            let locked_up = console_read.elapsed() >= Duration::from_secs(1) && {
                console_read = Instant::now();
                read("console.log").contains(SOFT_LOCKUP)
            };
            if locked_up || Instant::now() > deadline {
                let _ = qemu.kill();
                let _ = qemu.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        GuestRun {
            status: read("status").trim().parse().ok(),
            output: read("output.log"),
            console: read("console.log"),
        }
    }
}
