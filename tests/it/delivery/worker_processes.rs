//! Workers as separate processes: each starts on its own against the same
//! Postgres and Redis, and replicas of one worker share its queue without
//! sending anything twice.
//!
//! The worker processes are this test binary re-executed to run its
//! ignored `child_worker` entry point, which runs exactly what the
//! `herald-*-worker` binaries run (`herald_workers::main_for`), configured
//! from the environment like in production.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use herald_core::Channel;
use herald_testkit::process::WorkerProcess;
use herald_testkit::{Parts, TestApp};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_email_worker_processes_share_the_queue_without_double_sending() {
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    let mut workers = vec![
        WorkerProcess::spawn(&app.env, Channel::Email),
        WorkerProcess::spawn(&app.env, Channel::Email),
    ];

    // Both replicas are up (registered in Redis) before any work arrives.
    let queue = herald_queue::QueueClient::new(herald_queue::QueueConfig::from_settings(&app.settings)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while queue.workers().await.map(|w| w.len()).unwrap_or(0) < 2 {
        assert!(Instant::now() < deadline, "worker processes did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    const N: i64 = 300;
    app.put_json("/v1/users/u_many", &json!({"email": "many@example.com"}))
        .await;
    let started = Instant::now();
    for i in 0..N {
        let (s, b) = app
            .post_json(
                "/v1/notifications",
                &json!({"user_id": "u_many", "channels": ["email"], "title": format!("n{i}")}),
            )
            .await;
        assert_eq!(s, 202, "{b}");
    }
    let sent = app
        .wait_count(
            "SELECT count(*) FROM deliveries WHERE status = 'sent'",
            N,
            Duration::from_secs(60),
        )
        .await;
    println!("{sent} emails sent by 2 worker processes in {:?}", started.elapsed());
    assert_eq!(sent, N);

    // Exactly one attempt per delivery, spread over both replicas.
    let attempts: Vec<(String, i32, String)> =
        sqlx::query_as("SELECT delivery_id, attempt, worker_id FROM delivery_attempts")
            .fetch_all(app.pool())
            .await
            .unwrap();
    assert_eq!(attempts.len() as i64, N, "a delivery was attempted twice");
    assert!(attempts.iter().all(|(_, a, _)| *a == 1));
    let ids: HashSet<&str> = attempts.iter().map(|(_, _, w)| w.as_str()).collect();
    println!("work split across {} worker ids", ids.len());
    assert_eq!(ids.len(), 2, "both replicas should have worked: {ids:?}");
    let files = std::fs::read_dir(app.mail_dir()).unwrap().filter(|e| {
        e.as_ref()
            .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".eml"))
    });
    assert_eq!(files.count() as i64, N);

    // SIGTERM: both stop cleanly.
    for w in &mut workers {
        assert!(
            w.terminate(Duration::from_secs(30)),
            "worker did not exit cleanly on SIGTERM"
        );
    }
    app.stop().await;
}
