//! Parts of Herald's work that no version of it can skip, each alone in a
//! process of its own with the workers' environment, on a runtime built as
//! a worker's is (one thread: for the API's part that is cheaper than the
//! API's own one per CPU, so still a lower bound):
//!
//! - **a channel's protocol**: the channel's sender (the code the workers
//!   send with: lettre's SMTP client driven by `herald-channels`, reqwest to
//!   FCM and APNs) sending to the bench's sinks, with no database, queue or
//!   Herald process around it. Whatever a worker does, it speaks the other
//!   end of every exchange the sinks answer: the floor under a rate target
//!   (`cpu::reach`) counts what that costs the client side.
//! - **the queue**: jobs enqueued in bulk and consumed by an apalis worker
//!   on Herald's Redis backend whose handler does nothing. What Redis
//!   spends per job here (enqueue, fetch, ack) is the queue's part of the
//!   floor; what the process spends is the per-job cost of the queue
//!   machinery every worker carries.
//! - **the API's HTTP side**: an axum server whose one route parses the
//!   bench's POST into the API's own request type and answers 202 with the
//!   API's own answer type, as if stored; the bench's load generator posts
//!   to it. The API does at least this per notification.
//!
//! The bench runs itself as that process (`--alone-client`), which reports
//! its own CPU time (getrusage); the peers' share (sinks, Redis) is their
//! CPU meanwhile.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use apalis::prelude::*;
use futures::StreamExt;
use herald_api::routes::notifications::{Accepted, AcceptedDelivery, CreateNotification};
use herald_channels::email::Email;
use herald_channels::push::{PushMessage, Target};
use herald_core::{Channel, DeliveryId, DevicePlatform, EmailAddress, NotificationId, Priority, PushProvider};
use herald_queue::{Fetched, QueueConfig, QueueName, RedisBackend, WorkerId};
use herald_workers::Sender;
use nix::sys::resource::{UsageWho, getrusage};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// What the client process reports on its last line of output.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Sends that succeeded, or jobs handled.
    pub sent: u64,
    pub failed: u64,
    /// The first failure, to say why.
    pub first_error: Option<String>,
    pub secs: f64,
    /// User and system CPU time of the whole process, µs.
    pub cpu_us: f64,
}

/// The process for `part` (`email`, `push`, `queue` or `http`): `count`
/// sends, jobs or requests; senders and the queue keep as many in flight
/// as a worker holds (`HERALD_WORKER_CONCURRENCY`). Prints a [`Report`]
/// as JSON on its last line.
pub fn client_main(part: &str, count: u64) -> anyhow::Result<()> {
    let settings = herald_config::Settings::from_env().context("the workers' settings")?;
    let runtime = herald_telemetry::runtime(Some(
        settings
            .runtime_threads
            .unwrap_or(herald_workers::DEFAULT_RUNTIME_THREADS),
    ))?;
    let started = Instant::now();
    let (sent, failed, first_error) = if part == "http" {
        runtime.block_on(serve(count))?
    } else if part == "queue" {
        runtime.block_on(consume(&settings, count))?
    } else {
        let channel: Channel = part.parse().map_err(|_| anyhow::anyhow!("unknown part `{part}`"))?;
        let sender = herald_workers::sender_for(&settings, channel)?;
        let concurrency = settings.worker_concurrency;
        runtime.block_on(async move {
            let outcomes: Vec<Result<(), String>> = futures::stream::iter(0..count)
                .map(|i| send_one(&sender, i))
                .buffer_unordered(concurrency)
                .collect()
                .await;
            let failed = outcomes.iter().filter(|o| o.is_err()).count() as u64;
            let first_error = outcomes.into_iter().find_map(Result::err);
            (count - failed, failed, first_error)
        })
    };
    let secs = started.elapsed().as_secs_f64();
    let usage = getrusage(UsageWho::RUSAGE_SELF)?;
    let us = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e6 + t.tv_usec() as f64;
    let report = Report {
        sent,
        failed,
        first_error,
        secs,
        cpu_us: us(usage.user_time()) + us(usage.system_time()),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Counts what a part handled and stops it once `count` were: its
/// handlers tick, its server or worker runs until `done` is cancelled.
struct Countdown {
    handled: AtomicU64,
    done: CancellationToken,
    count: u64,
}

type Counter = Arc<Countdown>;

impl Countdown {
    fn new(count: u64) -> Counter {
        Arc::new(Self {
            handled: AtomicU64::new(0),
            done: CancellationToken::new(),
            count,
        })
    }

    fn tick(&self) {
        if self.handled.fetch_add(1, Ordering::Relaxed) + 1 >= self.count {
            self.done.cancel();
        }
    }

    /// Handled, missing, and why when some are missing.
    fn outcome(&self, what: &str) -> (u64, u64, Option<String>) {
        let handled = self.handled.load(Ordering::Relaxed);
        let missing = self.count.saturating_sub(handled);
        (
            handled,
            missing,
            (missing > 0).then(|| format!("{missing} {what} never came")),
        )
    }
}

/// Handles `count` email jobs with a handler that does nothing, through
/// an apalis worker on Herald's backend built as `herald_workers` builds
/// it (same concurrency and timeout layers), then stops it (a graceful
/// close writes the last acks).
async fn consume(settings: &herald_config::Settings, count: u64) -> anyhow::Result<(u64, u64, Option<String>)> {
    let counter = Countdown::new(count);
    let worker_id = WorkerId::generate("bench-queue");
    let backend = RedisBackend::new(
        QueueConfig::from_settings(settings),
        QueueName::for_channel(Channel::Email).to_vec(),
        worker_id.clone(),
    )?;
    WorkerBuilder::new(worker_id.to_string())
        .backend(backend)
        .concurrency(settings.worker_concurrency)
        .timeout(settings.send_timeout + settings.lease)
        .data(Arc::clone(&counter))
        .build(nothing)
        .run_until(herald_queue::stop_on(counter.done.clone()))
        .await?;
    Ok(counter.outcome("jobs"))
}

async fn nothing(_job: Fetched, counter: Data<Counter>) -> Result<(), BoxDynError> {
    counter.tick();
    Ok(())
}

/// Answers `count` POSTs of notifications, then stops. The first line of
/// output is the address it listens on.
async fn serve(count: u64) -> anyhow::Result<(u64, u64, Option<String>)> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    println!("{}", listener.local_addr()?);
    let counter = Countdown::new(count);
    let app = axum::Router::new()
        .route("/v1/notifications", axum::routing::post(accept))
        .with_state(Arc::clone(&counter));
    axum::serve(listener, app)
        .with_graceful_shutdown(counter.done.clone().cancelled_owned())
        .await?;
    Ok(counter.outcome("requests"))
}

async fn accept(
    axum::extract::State(counter): axum::extract::State<Counter>,
    axum::Json(req): axum::Json<CreateNotification>,
) -> (axum::http::StatusCode, axum::Json<Accepted>) {
    let id = NotificationId::generate();
    let deliveries = [Channel::Email, Channel::Push, Channel::InApp]
        .into_iter()
        .map(|c| AcceptedDelivery {
            id: DeliveryId::of(id, c).to_string(),
            channel: c.as_str().to_owned(),
            status: "queued".to_owned(),
            skip_reason: None,
        })
        .collect();
    counter.tick();
    (
        axum::http::StatusCode::ACCEPTED,
        axum::Json(Accepted {
            id: id.to_string(),
            user_id: req.user_id,
            created_at: chrono::Utc::now(),
            deliveries,
        }),
    )
}

/// One delivery's worth of protocol work, shaped as the bench's
/// notifications are: user `i`'s address, or its device (APNs and FCM
/// alternating, as `seed::users` registers them).
async fn send_one(sender: &Sender, i: u64) -> Result<(), String> {
    let id = DeliveryId::generate().to_string();
    match sender {
        Sender::Email(email) => {
            let to = EmailAddress::parse(&format!("bench_u{i}@example.com")).map_err(|e| e.to_string())?;
            email
                .send(&Email {
                    delivery_id: &id,
                    to: &to,
                    subject: "Your order shipped",
                    text: "Order 1234 is on its way.",
                })
                .await
                .map_err(|e| e.to_string())
        }
        Sender::Push(push) => {
            let notification_id = NotificationId::generate().to_string();
            let data = json!({"order_id": "1234"});
            let (platform, provider, token) = if i.is_multiple_of(2) {
                (DevicePlatform::Ios, PushProvider::Apns, format!("{i:064x}"))
            } else {
                (
                    DevicePlatform::Android,
                    PushProvider::Fcm,
                    format!("bench-fcm-token-{i}"),
                )
            };
            let results = push
                .send(
                    &PushMessage {
                        delivery_id: &id,
                        notification_id: &notification_id,
                        title: "Your order shipped",
                        body: "Order 1234 is on its way.",
                        data: &data,
                        priority: Priority::Normal,
                    },
                    &[Target {
                        device_id: "dev_bench",
                        provider,
                        platform,
                        token: &token,
                    }],
                )
                .await
                .map_err(|e| e.to_string())?;
            match results.into_iter().find_map(|r| r.error) {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }
        Sender::InApp => Err("in-app has no protocol to speak".to_owned()),
    }
}

/// This executable as the process for `part`, with the workers'
/// environment: its report comes on stdout, and it dies with its handle.
fn process(part: &str, count: u64, env: &HashMap<String, String>) -> anyhow::Result<tokio::process::Command> {
    let exe = std::env::current_exe().context("locating herald-bench")?;
    let mut command = tokio::process::Command::new(exe);
    command
        .args(["--alone-client", part, "--alone", &count.to_string()])
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    Ok(command)
}

/// Runs the client process for `part` and waits for its report (bounded:
/// it is killed after `limit`).
pub async fn measure(part: &str, count: u64, env: &HashMap<String, String>, limit: Duration) -> anyhow::Result<Report> {
    let child = process(part, count, env)?
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting the {part} client"))?;
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .with_context(|| format!("the {part} client did not finish within {limit:?}"))??;
    if !out.status.success() {
        bail!(
            "the {part} client failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("the {part} client's report: {last:?}"))
}

/// Runs the HTTP part's process and the load generator against it: `n`
/// POSTs of the bench's bodies on `connections` connections.
pub async fn measure_http(
    target: &crate::load::Target,
    n: u64,
    connections: usize,
    env: &HashMap<String, String>,
    limit: Duration,
) -> anyhow::Result<Report> {
    use tokio::io::AsyncBufReadExt;
    let mut child = process("http", n, env)?
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the http part")?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let addr = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("the http part did not say where it listens")??
        .context("the http part exited at once")?;
    let target = crate::load::Target {
        addr: addr
            .parse()
            .with_context(|| format!("the http part's address {addr:?}"))?,
        ..target.clone()
    };
    let load = crate::load::closed_loop(&target, n, connections, limit).await?;
    if load.errors > 0 {
        bail!(
            "the http part answered {} errors: {:?}",
            load.errors,
            load.error_samples
        );
    }
    let last = tokio::time::timeout(Duration::from_secs(10), async {
        let mut last = String::new();
        while let Some(line) = lines.next_line().await? {
            last = line;
        }
        anyhow::Ok(last)
    })
    .await
    .context("the http part did not stop")??;
    child.wait().await?;
    serde_json::from_str(&last).with_context(|| format!("the http part's report: {last:?}"))
}

/// The JSON of one part's measurement; `peer_us` is the CPU per operation
/// of what answered it (the sinks, Redis).
pub fn json(report: &Report, peer_us: f64) -> Value {
    json!({"done": report.sent, "failed": report.failed, "secs": report.secs,
           "per_sec": report.sent as f64 / report.secs.max(1e-9),
           "client_cpu_us_per_op": report.cpu_us / report.sent.max(1) as f64,
           "peer_cpu_us_per_op": peer_us})
}
