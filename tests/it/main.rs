//! Herald's integration tests: one binary, so the suite links once.
//!
//! Every test talks to the real Postgres and Redis (each test its own
//! database and key prefix) and, where it delivers, to real receivers.
//! Modules by kind: the HTTP API, delivery through the workers, the
//! delivery guarantees under faults, the client routes, operators' tools,
//! the database statements and their plans, and checks of the project's
//! own files.

mod admin;
mod api;
mod clients;
mod db;
mod delivery;
mod faults;
mod project;

/// A worker process's entry point, not a test: the tests that signal
/// workers (SIGKILL, SIGSTOP, SIGTERM) re-execute this binary with
/// `--ignored --exact child_worker` and the channel in `HERALD_TEST_CHILD`,
/// and it then runs exactly what the `herald-*-worker` binaries run.
#[test]
#[ignore = "a worker process started by the fault tests, not a test"]
fn child_worker() {
    herald_testkit::process::run_child_worker();
}
