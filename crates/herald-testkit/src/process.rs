//! Workers as real processes, for tests that signal them (SIGKILL, SIGSTOP,
//! SIGTERM). The process is the test binary itself, re-executed to run its
//! one ignored test, `child_worker`, which the binary defines as:
//!
//! ```ignore
//! #[test]
//! #[ignore = "a worker process started by the fault tests, not a test"]
//! fn child_worker() {
//!     herald_testkit::process::run_child_worker();
//! }
//! ```
//!
//! Ignored, it never counts as a passing test in a normal run; started with
//! `--ignored --exact child_worker` and [`CHILD_ENV`] set, it runs exactly
//! what the `herald-*-worker` binaries run (`herald_workers::main_for`),
//! configured from the environment like in production.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herald_core::Channel;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Names the channel the child process works for.
pub const CHILD_ENV: &str = "HERALD_TEST_CHILD";

/// The body of `child_worker`: the worker process for the channel that
/// [`CHILD_ENV`] names.
pub fn run_child_worker() {
    let role = std::env::var(CHILD_ENV).expect("HERALD_TEST_CHILD names the worker's channel");
    let channel: Channel = role.parse().expect("a channel name");
    herald_workers::main_for(channel).expect("worker ran");
}

/// A worker process started by a test.
pub struct WorkerProcess {
    child: Child,
}

impl WorkerProcess {
    /// Starts a worker for `channel` with the given environment (usually
    /// `TestApp::env`, adjusted).
    pub fn spawn(env: &HashMap<String, String>, channel: Channel) -> Self {
        let child = Command::new(std::env::current_exe().expect("test binary path"))
            .args([
                "--ignored",
                "--exact",
                "child_worker",
                "--nocapture",
                "--test-threads=1",
            ])
            .envs(env)
            .env(CHILD_ENV, channel.as_str())
            .env(
                "RUST_LOG",
                std::env::var("HERALD_TEST_CHILD_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn worker process");
        Self { child }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits"))
    }

    pub fn signal(&self, sig: Signal) {
        let _ = kill(self.pid(), sig);
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for a clean exit; true if it exited successfully
    /// in time (otherwise it is killed).
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}
