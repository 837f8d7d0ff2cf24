//! The real `heraldctl` binary against a Herald running in-process (API,
//! workers and replay runner), with no terminal: JSON output, exit codes,
//! and the `--yes` that destructive commands need when nobody can be asked.

use std::process::Stdio;
use std::time::Duration;

use herald_testkit::TestApp;
use herald_testkit::seed::{DeadLetters, seed_dead_letters};
use serde_json::Value;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

async fn heraldctl_with(app: &TestApp, key: &str, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_heraldctl"))
        .args(args)
        .env("HERALD_API_URL", &app.base_url)
        .env("HERALD_API_KEY", key)
        .env("DATABASE_URL", &app.db.url)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run heraldctl");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn heraldctl(app: &TestApp, args: &[&str]) -> Run {
    heraldctl_with(app, &app.api_key, args).await
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(app.pool()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_and_show_print_json_for_scripts_and_tables_for_people() {
    let app = TestApp::spawn().await;
    let ids = seed_dead_letters(
        &app.db.pool,
        &DeadLetters {
            count: 12,
            channel: "email",
            error: "SMTP 550 mailbox unavailable",
            error_class: "permanent",
            provider_status: Some(550),
            ..DeadLetters::default()
        },
    )
    .await;

    let r = heraldctl(&app, &["dlq", "list", "--json", "--limit", "5"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let page = r.json();
    assert_eq!(page["deliveries"].as_array().unwrap().len(), 5);
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let r = heraldctl(&app, &["dlq", "list", "--json", "--limit", "5", "--cursor", &cursor]).await;
    assert_eq!(r.json()["deliveries"][0]["id"], ids[5].as_str());

    let r = heraldctl(&app, &["dlq", "list", "--all", "--limit", "5", "--json"]).await;
    assert_eq!(r.json()["deliveries"].as_array().unwrap().len(), 12);
    let r = heraldctl(&app, &["dlq", "list", "--json", "--channel", "push"]).await;
    assert_eq!(r.json()["deliveries"].as_array().unwrap().len(), 0);
    let r = heraldctl(
        &app,
        &[
            "dlq",
            "list",
            "--json",
            "--grep",
            "MAILBOX",
            "--provider-status",
            "550",
            "--since",
            "1h",
        ],
    )
    .await;
    assert_eq!(r.json()["deliveries"].as_array().unwrap().len(), 12, "{}", r.stderr);

    // For people: a table, and no colour codes when NO_COLOR is set.
    let r = heraldctl(&app, &["dlq", "list", "--limit", "3"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("STATUS") && r.stdout.contains(&ids[0]),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("mailbox unavailable"), "{}", r.stdout);
    assert!(!r.stdout.contains('\x1b'), "{}", r.stdout);
    assert!(r.stderr.contains("--cursor"), "{}", r.stderr);

    let r = heraldctl(&app, &["dlq", "show", &ids[0], "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["attempts"].as_array().unwrap().len(), 3);
    let r = heraldctl(&app, &["deliveries", "show", &ids[0]]).await;
    assert!(
        r.stdout.contains("OUTCOME") && r.stdout.contains("3 of 3"),
        "{}",
        r.stdout
    );

    let r = heraldctl(&app, &["queues"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("CHANNEL") && r.stdout.contains("email:high"),
        "{}",
        r.stdout
    );
    let r = heraldctl(&app, &["queues", "--json"]).await;
    assert_eq!(r.json()["channels"].as_array().unwrap().len(), 3);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_exit_with_distinct_documented_codes() {
    let app = TestApp::spawn_with(herald_testkit::Parts::api_only(), |_| {}).await;
    let r = heraldctl(&app, &["dlq", "list", "--status", "bogus"]).await;
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr.contains("invalid_filter") && r.stderr.contains("status"),
        "{}",
        r.stderr
    );
    let r = heraldctl(&app, &["dlq", "list", "--since", "yesterday"]).await;
    assert_eq!(r.code, 3, "{}", r.stderr);
    let r = heraldctl(&app, &["dlq", "show", "dlv_01JD0000000000000000000000"]).await;
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("not_found"), "{}", r.stderr);

    let r = heraldctl_with(&app, "", &["queues"]).await;
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains("HERALD_API_KEY"), "{}", r.stderr);
    let reader = app.key_with_scopes(&["read"]).await;
    let r = heraldctl_with(&app, &reader, &["queues"]).await;
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains("insufficient_scope"), "{}", r.stderr);

    let r = tokio::process::Command::new(env!("CARGO_BIN_EXE_heraldctl"))
        .args(["--api-url", "http://127.0.0.1:1", "queues"])
        .env("HERALD_API_KEY", &app.api_key)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(r.status.code(), Some(5));

    let r = heraldctl(&app, &["dlq", "list", "--no-such-flag"]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = heraldctl(
        &app,
        &[
            "dlq",
            "replay",
            "--id",
            "dlv_01JD0000000000000000000000",
            "--channel",
            "push",
        ],
    )
    .await;
    assert_eq!(r.code, 2, "{}", r.stderr);

    // The bootstrap path: keys straight in Postgres, then the API with the new key.
    let r = heraldctl(
        &app,
        &["keys", "create", "--name", "ops", "--scopes", "admin", "--json"],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let token = r.json()["token"].as_str().unwrap().to_owned();
    let r = heraldctl_with(&app, &token, &["queues", "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);

    let help = heraldctl(&app, &["--help"]).await;
    assert!(
        help.stdout.contains("Examples:") && help.stdout.contains("Exit codes:"),
        "{}",
        help.stdout
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destructive_commands_need_yes_when_stdin_is_not_a_terminal() {
    let app = TestApp::spawn_with(herald_testkit::Parts::api_only(), |_| {}).await;
    seed_dead_letters(&app.db.pool, &DeadLetters::default()).await;
    let r = heraldctl(&app, &["dlq", "replay"]).await;
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("--yes"), "{}", r.stderr);
    let r = heraldctl(&app, &["dlq", "purge", "--before", "0s"]).await;
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert_eq!(count(&app, "SELECT count(*) FROM replays").await, 0);
    assert_eq!(count(&app, "SELECT count(*) FROM purges").await, 0);
    assert_eq!(
        count(&app, "SELECT count(*) FROM deliveries WHERE status = 'dead'").await,
        10
    );
    // Dry runs change nothing and need no confirmation.
    let r = heraldctl(&app, &["dlq", "replay", "--dry-run", "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["would_replay"], 10);
    let r = heraldctl(&app, &["dlq", "purge", "--before", "0s", "--dry-run", "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["deleted"], 10);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_with_yes_follows_the_replay_to_its_end_and_sends_each_once() {
    let app = TestApp::spawn().await;
    let ids = seed_dead_letters(
        &app.db.pool,
        &DeadLetters {
            count: 30,
            ..DeadLetters::default()
        },
    )
    .await;
    let r = heraldctl(&app, &["dlq", "replay", "--dry-run"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("30 would be replayed of 30 matched"), "{}", r.stdout);

    let r = heraldctl(&app, &["dlq", "replay", "--yes", "--json"]).await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let done = r.json();
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["replayed"], 30);
    let delivered = app
        .wait_count(
            "SELECT count(*) FROM deliveries WHERE status = 'delivered'",
            30,
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(delivered, 30);

    // The same ids again: all skipped, none sent twice.
    let mut args = vec!["dlq", "replay", "--yes", "--json"];
    for id in &ids {
        args.push("--id");
        args.push(id);
    }
    let r = heraldctl(&app, &args).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        (r.json()["replayed"].as_i64(), r.json()["skipped"].as_i64()),
        (Some(0), Some(30))
    );
    assert_eq!(count(&app, "SELECT count(*) FROM delivery_attempts").await, 30 * 4);

    let r = heraldctl(&app, &["dlq", "replays"]).await;
    assert!(
        r.stdout.contains("completed") && r.stdout.contains("test"),
        "{}",
        r.stdout
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_replay_ends_the_wait_with_exit_code_seven() {
    let app = TestApp::spawn().await;
    seed_dead_letters(
        &app.db.pool,
        &DeadLetters {
            count: 40,
            ..DeadLetters::default()
        },
    )
    .await;
    let r = heraldctl(&app, &["dlq", "replay", "--yes", "--no-wait", "--pace", "4", "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let r = heraldctl(&app, &["dlq", "cancel", &id, "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["status"], "cancelled");
    let r = heraldctl(&app, &["dlq", "status", &id, "--wait"]).await;
    assert_eq!(r.code, 7, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("cancelled"), "{}", r.stdout);
    let r = heraldctl(&app, &["dlq", "cancel", &id]).await;
    assert_eq!(r.code, 3, "{}", r.stderr);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_with_yes_deletes_old_dead_letters() {
    let app = TestApp::spawn_with(herald_testkit::Parts::api_only(), |_| {}).await;
    seed_dead_letters(
        &app.db.pool,
        &DeadLetters {
            count: 20,
            ..DeadLetters::default()
        },
    )
    .await;
    // Row n finished n - 1 seconds ago.
    let r = heraldctl(&app, &["dlq", "purge", "--before", "10s", "--yes", "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let deleted = r.json()["deleted"].as_i64().unwrap();
    assert!((9..=10).contains(&deleted), "{deleted}");
    assert_eq!(count(&app, "SELECT count(*) FROM deliveries").await, 20 - deleted);
    let r = heraldctl(&app, &["dlq", "purge", "--before", "10s", "--yes"]).await;
    assert!(r.stdout.contains("0 dead letters deleted"), "{}", r.stdout);
    app.stop().await;
}
