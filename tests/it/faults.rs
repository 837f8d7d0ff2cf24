//! Fault tests: post a known set of notifications, inject a
//! fault during delivery, wait, then check against the sink that received
//! the messages: no delivery lost (every accepted delivery final and, if
//! `sent`, present at the sink), duplicates counted and bounded, no status
//! moved backwards.
//!
//! The sink is the push channel's JSON-lines transport: it appends one line
//! per send, so a duplicate send shows up as a second line. Faults are
//! injected into servers and processes of the test's own (a private Redis,
//! a private Postgres cluster, worker processes), never the shared ones.
//! Each test prints its figures. `HERALD_FAULT_SCALE=10` runs ten times the
//! notifications.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use herald_core::Channel;
use herald_testkit::process::WorkerProcess;
use herald_testkit::servers::{PrivatePostgres, PrivateRedis};
use herald_testkit::{Parts, TestApp, status_and_json};
use nix::sys::signal::Signal;
use serde_json::json;

const FINAL_WAIT: Duration = Duration::from_secs(90);
const CONCURRENCY: i64 = 16;

fn scale() -> usize {
    std::env::var("HERALD_FAULT_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// Short leases and sweeps, so recovery happens within the test's time.
fn fast_recovery(env: &mut HashMap<String, String>) {
    env.insert("HERALD_LEASE_SECS".into(), "2".into());
    env.insert("HERALD_SWEEP_INTERVAL_SECS".into(), "1".into());
    env.insert("HERALD_WORKER_CONCURRENCY".into(), CONCURRENCY.to_string());
    env.insert("HERALD_DB_MAX_CONNECTIONS".into(), "12".into());
}

/// A user with one push device, so each push delivery is one sink line.
async fn push_user(app: &TestApp) {
    let (s, _) = app.put_json("/v1/users/u_f", &json!({})).await;
    assert!(s == 201 || s == 200);
    let (s, b) = app
        .post_json(
            "/v1/users/u_f/devices",
            &json!({"platform": "android", "provider": "fcm", "token": "tok-fault"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
}

/// Posts `n` push notifications, 16 at a time; returns how many were
/// accepted (202). Others (503 while Postgres restarts) are not counted.
async fn post_many(app: &TestApp, n: usize) -> usize {
    let mut accepted = 0;
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..n {
        let req = app
            .request(reqwest::Method::POST, "/v1/notifications")
            .json(&json!({"user_id": "u_f", "channels": ["push"], "title": format!("n{i}")}));
        pending.spawn(async move { req.send().await.map(|r| r.status().as_u16()).unwrap_or(0) });
        if pending.len() >= 16
            && let Some(Ok(202)) = pending.join_next().await
        {
            accepted += 1;
        }
    }
    while let Some(r) = pending.join_next().await {
        if let Ok(202) = r {
            accepted += 1;
        }
    }
    accepted
}

/// What the sink received: sends per delivery id. A line cut short by a
/// killed process is not a send and is skipped.
fn sink_counts(app: &TestApp) -> HashMap<String, usize> {
    let text = std::fs::read_to_string(app.push_file()).unwrap_or_default();
    let mut counts = HashMap::new();
    for line in text.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line)
            && let Some(id) = v["delivery_id"].as_str()
        {
            *counts.entry(id.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

/// Waits until every delivery is final (tolerating a database that is
/// briefly down), then checks the three promises. Returns the duplicates.
///
/// `expected` is how many deliveries there must be: exactly the accepted
/// ones, plus at most those whose request got a 503 saying it may have
/// been stored (the connection failed while it committed).
async fn check_nothing_lost(
    app: &TestApp,
    expected: std::ops::RangeInclusive<usize>,
    label: &str,
    started: Instant,
) -> usize {
    let deadline = Instant::now() + FINAL_WAIT;
    let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let expected = as_i64(*expected.start())..=as_i64(*expected.end());
    loop {
        let counts: Result<(i64, i64), _> = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE status IN ('sent','delivered','failed','dead','cancelled','skipped'))
             FROM deliveries",
        )
        .fetch_one(app.pool())
        .await;
        if let Ok((total, done)) = counts {
            assert!(
                expected.contains(&total),
                "{label}: every accepted notification has its delivery, and no other: {total} deliveries, \
                 expected {expected:?}"
            );
            if done == total {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{label}: only {done} of {total} deliveries final after {FINAL_WAIT:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT id, status FROM deliveries")
        .fetch_all(app.pool())
        .await
        .unwrap();
    let sink = sink_counts(app);
    let mut lost = Vec::new();
    for (id, status) in &rows {
        if status == "sent" && !sink.contains_key(id) {
            lost.push(id.clone());
        }
    }
    let not_sent = rows.iter().filter(|(_, s)| s != "sent").count();
    let duplicates: usize = sink.values().map(|c| c - 1).sum();
    // Backwards: a delivery claimed again after it was sent.
    let reclaimed_after_sent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM deliveries d JOIN delivery_attempts a ON a.delivery_id = d.id
         WHERE d.sent_at IS NOT NULL AND a.started_at > d.sent_at",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    let ambiguous: i64 = sqlx::query_scalar("SELECT coalesce(sum(ambiguous_attempts), 0)::BIGINT FROM deliveries")
        .fetch_one(app.pool())
        .await
        .unwrap();
    println!(
        "{label}: {} deliveries final in {elapsed:?}; lost 0 of them? {}; not sent: {not_sent}; \
         duplicate sends: {duplicates}; ambiguous attempts recorded: {ambiguous}",
        rows.len(),
        lost.is_empty()
    );
    assert!(lost.is_empty(), "{label}: sent but never received: {lost:?}");
    assert_eq!(not_sent, 0, "{label}: every delivery should end sent");
    assert_eq!(reclaimed_after_sent, 0, "{label}: a sent delivery was claimed again");
    duplicates
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_with_sigkill_several_times_loses_nothing() {
    let app = TestApp::spawn_with(Parts::api_only(), fast_recovery).await;
    push_user(&app).await;
    let n = post_many(&app, 1500 * scale()).await;
    let started = Instant::now();
    const KILLS: usize = 3;
    for k in 0..KILLS {
        let mut w = WorkerProcess::spawn(&app.env, Channel::Push);
        tokio::time::sleep(Duration::from_millis(600 + 150 * k as u64)).await;
        w.kill();
    }
    let mut last = WorkerProcess::spawn(&app.env, Channel::Push);
    let dups = check_nothing_lost(&app, n..=n, "SIGKILL x3", started).await;
    // Each kill can leave at most the sends in flight unrecorded.
    assert!(
        dups <= KILLS * CONCURRENCY as usize,
        "{dups} duplicates for {KILLS} kills"
    );
    assert!(last.terminate(Duration::from_secs(20)));
    app.stop().await;
}

/// Waits until `at_least` deliveries are sent; returns how many are still
/// waiting then (so a test can show its fault landed mid-delivery).
async fn wait_until_sent(app: &TestApp, at_least: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (sent, waiting): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'sent'), count(*) FILTER (WHERE status <> 'sent') FROM deliveries",
        )
        .fetch_one(app.pool())
        .await
        .unwrap();
        if sent >= at_least {
            return waiting;
        }
        assert!(Instant::now() < deadline, "only {sent} sent");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn redis_loses_everything_during_delivery(flush: bool) {
    let mut redis = PrivateRedis::start();
    let url = redis.url();
    let app = TestApp::spawn_with(Parts::api_only(), |env| {
        fast_recovery(env);
        env.insert("REDIS_URL".into(), url);
    })
    .await;
    push_user(&app).await;
    let mut n = post_many(&app, 1500 * scale()).await;
    let started = Instant::now();
    let mut worker = WorkerProcess::spawn(&app.env, Channel::Push);
    let waiting = wait_until_sent(&app, 100).await;
    let label = if flush {
        redis.flushall();
        "FLUSHALL during delivery"
    } else {
        redis.kill();
        // The API keeps accepting while Redis is down.
        let during = post_many(&app, 200).await;
        assert_eq!(during, 200, "every POST answered 202 while Redis was down");
        n += during;
        tokio::time::sleep(Duration::from_secs(1)).await;
        redis.restart();
        "Redis killed and restarted empty"
    };
    println!("{label}: {waiting} deliveries were still waiting when Redis lost its data");
    assert!(waiting > 0, "the fault must land during delivery");
    let dups = check_nothing_lost(&app, n..=n, label, started).await;
    assert!(dups <= 2 * CONCURRENCY as usize, "{dups} duplicates");
    assert!(worker.terminate(Duration::from_secs(20)));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_empty_during_delivery_loses_nothing() {
    redis_loses_everything_during_delivery(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_during_delivery_loses_nothing() {
    redis_loses_everything_during_delivery(true).await;
}

fn probe_body() -> serde_json::Value {
    json!({"user_id": "u_f", "channels": ["push"], "title": "probe"})
}

/// What the API answered the probes sent while Postgres restarted.
#[derive(Default)]
struct Probes {
    seen: std::collections::BTreeMap<u16, usize>,
    /// Keys of the probes whose 503 said they may have been stored.
    in_doubt_keyed: Vec<String>,
    /// Probes without a key whose 503 said so: each may have stored one.
    in_doubt_unkeyed: usize,
}

impl Probes {
    async fn record(&mut self, res: reqwest::Response, key: Option<String>) {
        let (status, body) = status_and_json(res).await;
        *self.seen.entry(status).or_insert(0) += 1;
        if status == 503 {
            assert_eq!(body["error"]["code"], "database_unavailable", "{body}");
            if body["error"]["details"]["stored"] == "unknown" {
                match key {
                    Some(k) => self.in_doubt_keyed.push(k),
                    None => self.in_doubt_unkeyed += 1,
                }
            }
        }
    }

    /// Sends each in-doubt probe that has a key again, with that key,
    /// until it is answered 202 (the first answer replayed if it had been
    /// stored, a fresh one if not): one notification each either way.
    async fn settle_in_doubt(&self, app: &TestApp) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        for key in &self.in_doubt_keyed {
            loop {
                let res = app
                    .request(reqwest::Method::POST, "/v1/notifications")
                    .header("idempotency-key", key)
                    .json(&probe_body())
                    .send()
                    .await;
                if res.is_ok_and(|r| r.status() == 202) {
                    break;
                }
                assert!(Instant::now() < deadline, "probe {key} not settled within 30 s");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self.in_doubt_keyed.len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_fast_and_immediate_during_delivery_loses_nothing() {
    let pg = PrivatePostgres::start();
    let app = TestApp::spawn_with(
        Parts {
            workers: false,
            pg_server: Some(pg.server_url()),
        },
        fast_recovery,
    )
    .await;
    push_user(&app).await;
    let n = post_many(&app, 1500 * scale()).await;
    assert_eq!(n, 1500 * scale());
    let started = Instant::now();
    let mut worker = WorkerProcess::spawn(&app.env, Channel::Push);
    let waiting = wait_until_sent(&app, 100).await;
    // Requests during the restarts: a 202 (stored), or a 503 with
    // Retry-After that says either that nothing was stored or, when the
    // connection failed while the request committed, that it may have
    // been; never a 500. Every other probe carries an Idempotency-Key, so
    // its in-doubt 503s can be settled afterwards as a client would: by
    // sending it again with the same key.
    let stop = tokio_util::sync::CancellationToken::new();
    let prober = {
        let (stop, req) = (stop.clone(), app.request(reqwest::Method::POST, "/v1/notifications"));
        tokio::spawn(async move {
            let mut probes = Probes::default();
            let mut i = 0;
            while !stop.is_cancelled() {
                let Some(r) = req.try_clone() else { break };
                i += 1;
                let key = (i % 2 == 0).then(|| format!("probe-{i}"));
                let r = match &key {
                    Some(k) => r.header("idempotency-key", k),
                    None => r,
                };
                if let Ok(res) = r.json(&probe_body()).send().await {
                    probes.record(res, key).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            probes
        })
    };
    pg.restart("fast");
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.restart("immediate");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    let probes = prober.await.unwrap();
    println!(
        "Postgres restart: API answers during the restarts: {:?}; in doubt: {} with a key, {} without",
        probes.seen,
        probes.in_doubt_keyed.len(),
        probes.in_doubt_unkeyed
    );
    assert!(
        probes.seen.keys().all(|s| *s == 202 || *s == 503),
        "only 202 or 503 while Postgres restarts: {:?}",
        probes.seen
    );
    let probes_accepted = probes.seen.get(&202).copied().unwrap_or(0);
    let accepted = n + probes_accepted + probes.settle_in_doubt(&app).await;
    println!("Postgres restart: {waiting} deliveries were still waiting at the first restart");
    assert!(waiting > 0, "the fault must land during delivery");
    let dups = check_nothing_lost(
        &app,
        accepted..=accepted + probes.in_doubt_unkeyed,
        "Postgres restarted (fast, then immediate)",
        started,
    )
    .await;
    assert!(dups <= 2 * CONCURRENCY as usize, "{dups} duplicates");
    assert!(worker.terminate(Duration::from_secs(20)));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_past_its_lease_cannot_overwrite_the_newer_attempt() {
    let app = TestApp::spawn_with(Parts::api_only(), fast_recovery).await;
    push_user(&app).await;
    let n = post_many(&app, 1000 * scale()).await;
    let started = Instant::now();
    let stalled = WorkerProcess::spawn(&app.env, Channel::Push);
    // Freeze it while it holds claims. A claim batch is held for a few
    // milliseconds only, so stop it when claims are seen, give statements it
    // already sent time to commit, and look again: if it held none after
    // all, let it go on and try again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = loop {
        let sending = || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM deliveries WHERE status = 'sending'")
                .fetch_one(app.pool())
                .await
                .unwrap()
        };
        while sending().await == 0 {
            assert!(Instant::now() < deadline, "the worker never claimed work");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stalled.signal(Signal::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let held = sending().await;
        if held > 0 {
            break held;
        }
        assert!(
            Instant::now() < deadline,
            "never stopped the worker while it held claims"
        );
        stalled.signal(Signal::SIGCONT);
    };
    println!("SIGSTOP: the stopped worker holds {held} claims");
    let mut rescuer = WorkerProcess::spawn(&app.env, Channel::Push);
    check_nothing_lost(&app, n..=n, "SIGSTOP past the lease (before resuming)", started).await;
    let before: Vec<(String, String, i32)> = sqlx::query_as("SELECT id, status, attempt FROM deliveries ORDER BY id")
        .fetch_all(app.pool())
        .await
        .unwrap();
    let stale: i64 = sqlx::query_scalar("SELECT count(*) FROM delivery_attempts WHERE outcome = 'lease_expired'")
        .fetch_one(app.pool())
        .await
        .unwrap();
    // Wake the stalled worker: whatever it finishes now is a late result.
    stalled.signal(Signal::SIGCONT);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after: Vec<(String, String, i32)> = sqlx::query_as("SELECT id, status, attempt FROM deliveries ORDER BY id")
        .fetch_all(app.pool())
        .await
        .unwrap();
    let late_sends: usize = sink_counts(&app).values().map(|c| c - 1).sum();
    println!(
        "SIGSTOP: {stale} attempts expired while stopped; {late_sends} duplicate sends after resuming; statuses unchanged"
    );
    assert!(stale > 0, "the stopped worker held claims when it was stopped");
    assert_eq!(before, after, "a late result moved a delivery");
    assert!(rescuer.terminate(Duration::from_secs(20)));
    drop(stalled);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_delivery_loses_and_duplicates_nothing() {
    let app = TestApp::spawn_with(Parts::api_only(), fast_recovery).await;
    push_user(&app).await;
    let n = post_many(&app, 1500 * scale()).await;
    let started = Instant::now();
    let mut first = WorkerProcess::spawn(&app.env, Channel::Push);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sent: i64 = sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE status = 'sent'")
            .fetch_one(app.pool())
            .await
            .unwrap();
        if sent > 50 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    assert!(
        first.terminate(Duration::from_secs(30)),
        "the worker exits cleanly on SIGTERM"
    );
    let in_flight: i64 = sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE status = 'sending'")
        .fetch_one(app.pool())
        .await
        .unwrap();
    println!(
        "SIGTERM: exited in {:?}, leaving {in_flight} deliveries mid-send",
        t.elapsed()
    );
    assert_eq!(in_flight, 0, "in-flight deliveries are finished before exiting");
    let mut second = WorkerProcess::spawn(&app.env, Channel::Push);
    let dups = check_nothing_lost(&app, n..=n, "SIGTERM during delivery", started).await;
    assert_eq!(dups, 0, "a graceful stop sends nothing twice");
    assert!(second.terminate(Duration::from_secs(20)));
    app.stop().await;
}
