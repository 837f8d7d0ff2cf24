//! `herald-bench`: Herald's benchmark. It runs Herald's real binaries as
//! separate processes (the API and one process per channel worker) against
//! a fresh database and Redis prefix of its own, delivers over SMTP and
//! HTTP/1.1 + HTTP/2 to lean sinks on loopback, and reports per scenario a
//! table on stdout (and JSON with `--json`): ingest, drain, end to end, idle
//! latency, footprint, backlog scaling, plus a `pgbench` baseline of the
//! database alone. Every scenario checks that nothing was lost: every
//! accepted delivery final, every sent one seen at its sink.
//!
//! See docs/performance.md for how to run it and what it measured.

mod alone;
mod ceiling;
mod clients;
mod cluster;
mod cpu;
mod load;
mod seed;
mod sinks;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use cluster::{BenchDb, HeraldProcess};
use futures::StreamExt;
use herald_queue::{QueueClient, QueueConfig, QueueName};
use serde_json::{Value, json};
use sinks::Receipts;

#[derive(Debug, Parser)]
#[command(name = "herald-bench", about = "Benchmark Herald's real binaries on this machine")]
struct Args {
    /// Every scenario at small N (well under a minute): checks that the
    /// bench runs and nothing is lost, not the speed.
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep-alive connections of the load generator.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Notifications (× 3 channels) POSTed in the ingest scenario; their
    /// deliveries are the drain scenario's backlog. Default 100,000 (quick 2,000).
    #[arg(long)]
    ingest: Option<u64>,
    /// Offered rate of the end-to-end scenario, notifications/s. Default 5,000 (quick 300).
    #[arg(long)]
    rate: Option<u64>,
    /// Length of the end-to-end scenario in seconds. Default 20 (quick 3).
    #[arg(long)]
    e2e_secs: Option<u64>,
    /// Shorter end-to-end windows after the main one, bisecting the offered
    /// rate for the highest the workers keep up with (a flat backlog);
    /// 0 skips the search. Default 4 windows of 10 s (quick 2 of 2 s).
    #[arg(long)]
    sustain_windows: Option<usize>,
    /// Notifications sent one at a time in the idle-latency scenario. Default 300 (quick 20).
    #[arg(long)]
    idle: Option<u64>,
    /// Deliveries in the small backlog of the scaling scenario. Default 10,000 (quick 1,500).
    #[arg(long)]
    backlog: Option<u64>,
    /// Also drain a backlog of this many deliveries (e.g. 1000000) in the
    /// scaling scenario; takes minutes.
    #[arg(long)]
    big_backlog: Option<u64>,
    /// Seconds of the pgbench baseline. Default 10 (quick 2).
    #[arg(long)]
    pgbench_secs: Option<u64>,
    /// Recipients (each with an email address and one push device).
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Postgres server (the bench creates and drops its own database on it).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    pg: String,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// `RUST_LOG` of Herald's processes. Per-delivery info lines cost CPU;
    /// the default keeps warnings only.
    #[arg(long, default_value = "warn")]
    log: String,
    /// Scenarios to run, comma-separated, from ceiling, ingest, drain, e2e,
    /// idle, scaling, clients (drain needs ingest's backlog, and runs after
    /// ingest whenever e2e, idle or scaling follow, so they start without
    /// it; the pgbench baseline runs with ingest). Default: all. Footprint
    /// is reported from whatever ran.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ceiling,ingest,drain,e2e,idle,scaling,clients"
    )]
    only: Vec<String>,
    /// Concurrent live-stream clients held by the API in the clients
    /// scenario. Default 10,000 (quick 200); capped by the open-files limit.
    #[arg(long)]
    clients: Option<u64>,
    /// Keep Herald's process logs after a successful run (they are always
    /// kept after a failure).
    #[arg(long)]
    keep_logs: bool,
    /// Extra `KEY=VALUE` settings for Herald's processes (tuning experiments).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Like `--set`, for the worker processes only.
    #[arg(long = "set-workers", value_name = "KEY=VALUE")]
    set_workers: Vec<String>,
    /// Sends per channel, and jobs through the queue, in the ceiling
    /// scenario's measurements of a worker's parts alone. Default 20,000
    /// (quick 500).
    #[arg(long)]
    alone: Option<u64>,
    /// Internal: run as one part alone (`email`, `push`, `queue`, `http`:
    /// alone.rs), with the workers' environment.
    #[arg(long, hide = true)]
    alone_client: Option<String>,
}

struct Sizes {
    ingest: u64,
    rate: u64,
    e2e: Duration,
    /// Windows of the sustained-rate search, and each one's length.
    sustain_windows: usize,
    sustain: Duration,
    idle: u64,
    backlog: u64,
    pgbench_secs: u64,
    ceiling_ingest: u64,
    ceiling_drain: u64,
    /// Sends per channel, and queue jobs, of the parts alone (ceiling).
    alone: u64,
}

impl Sizes {
    fn from(args: &Args) -> Self {
        let q = args.quick;
        Self {
            ingest: args.ingest.unwrap_or(if q { 2_000 } else { 100_000 }),
            rate: args.rate.unwrap_or(if q { 300 } else { 5_000 }),
            e2e: Duration::from_secs(args.e2e_secs.unwrap_or(if q { 3 } else { 20 })),
            sustain_windows: args.sustain_windows.unwrap_or(if q { 2 } else { 4 }),
            sustain: Duration::from_secs(if q { 2 } else { 10 }),
            idle: args.idle.unwrap_or(if q { 20 } else { 300 }),
            backlog: args.backlog.unwrap_or(if q { 1_500 } else { 10_000 }),
            pgbench_secs: args.pgbench_secs.unwrap_or(if q { 2 } else { 10 }),
            ceiling_ingest: if q { 1_000 } else { 60_000 },
            ceiling_drain: if q { 1_500 } else { 90_000 },
            alone: args.alone.unwrap_or(if q { 500 } else { 20_000 }),
        }
    }
}

/// What the sinks received, per channel (in-app: the live event, keyed by
/// notification id; the inbox row is checked in Postgres).
struct AllReceipts {
    email: Arc<Receipts>,
    push: Arc<Receipts>,
    inapp: Arc<Receipts>,
}

impl AllReceipts {
    fn clear(&self) {
        self.email.clear();
        self.push.clear();
        self.inapp.clear();
    }
}

struct Bench {
    args: Args,
    sizes: Sizes,
    dir: PathBuf,
    db: BenchDb,
    queue: QueueClient,
    redis: redis::aio::MultiplexedConnection,
    env: HashMap<String, String>,
    /// `env` with `--set-workers` on top.
    worker_env: HashMap<String, String>,
    log_dir: tempfile::TempDir,
    api: Option<HeraldProcess>,
    api_addr: std::net::SocketAddr,
    workers: Vec<HeraldProcess>,
    /// Peak resident memory per binary, kB (max over its processes).
    peaks: HashMap<&'static str, u64>,
    receipts: AllReceipts,
    users: Vec<String>,
    target: load::Target,
    report: serde_json::Map<String, Value>,
    /// One row per target: (what, goal, measured, met).
    verdicts: Vec<(String, String, String, Option<bool>)>,
    lost: u64,
    /// The database's ceiling at Herald's own batching: ingest
    /// notifications/s, drain deliveries/s (the ceiling scenario).
    ceiling_ingest: Option<f64>,
    ceiling_drain: Option<f64>,
    /// Derived from both: notifications/s end to end.
    ceiling_e2e: Option<f64>,
    /// Postgres CPU per notification (ingest) and per delivery (drain), µs,
    /// at the ceiling's cheaper batching: the database's part of a floor.
    pg_floor_ingest_us: Option<f64>,
    pg_floor_drain_us: Option<f64>,
    /// The bench's CPU per notification and per delivery at those
    /// batchings: the client side of the statements (encoding them,
    /// decoding their rows).
    db_client_floor_ingest_us: f64,
    db_client_floor_drain_us: f64,
    /// Redis's CPU per job enqueued in bulk, and the API's HTTP side per
    /// POST, each alone (`Bench::parts_alone`).
    redis_enqueue_floor_us: f64,
    http_floor_ingest_us: f64,
    /// The parts of the workers' work that no worker can skip, each
    /// measured alone (`Bench::parts_alone`), µs per delivery: the
    /// statements' client side, the protocols' client side, the queue's
    /// worker side and Redis.
    floor_parts_drain_us: Vec<(&'static str, f64)>,
    /// The whole floor per unit (Postgres + load generator and sinks + the
    /// parts alone), µs, as the ingest and drain scenarios measured it.
    floor_ingest_us: Option<f64>,
    floor_drain_us: Option<f64>,
    _sinks: Vec<sinks::Running>,
}

/// A scenario's nothing-lost check.
#[derive(Debug, Default)]
struct Check {
    deliveries: i64,
    not_final: i64,
    not_sent: i64,
    lost: i64,
    duplicates: u64,
}

impl Check {
    fn ok(&self) -> bool {
        self.not_final == 0 && self.not_sent == 0 && self.lost == 0
    }

    fn json(&self) -> Value {
        json!({"deliveries": self.deliveries, "not_final": self.not_final, "not_sent": self.not_sent,
               "lost": self.lost, "duplicates_at_sinks": self.duplicates, "ok": self.ok()})
    }

    fn line(&self) -> String {
        format!(
            "{} deliveries; not final {}, failed/other {}, lost (not at sink) {}, duplicates at sinks {} → {}",
            self.deliveries,
            self.not_final,
            self.not_sent,
            self.lost,
            self.duplicates,
            if self.ok() {
                "nothing lost"
            } else {
                "LOST OR UNFINISHED"
            }
        )
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn sorted_ms(us: &[u32]) -> Vec<f64> {
    let mut v: Vec<f64> = us.iter().map(|u| f64::from(*u) / 1000.0).collect();
    v.sort_by(f64::total_cmp);
    v
}

fn print_table(title: &str, rows: &[(&str, String)]) {
    println!("\n## {title}");
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("  {k:<w$}  {v}");
    }
}

/// How a missed rate target reads when even its floor (`cpu::reach`)
/// needs more cores than the machine has.
fn out_of_reach(floor_cores: Option<f64>) -> String {
    let machine = cpu::machine_cores();
    match floor_cores {
        Some(f) if f > machine => format!("; floor {f:.2} cores > {machine:.0}: out of reach here"),
        _ => String::new(),
    }
}

/// Samples the jobs waiting, scheduled or in flight in every queue every
/// 0.5 s for `dur`.
fn sample_backlog(queue: QueueClient, dur: Duration) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        let mut samples = Vec::new();
        let started = Instant::now();
        while started.elapsed() < dur {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut n = 0;
            for q in QueueName::all() {
                if let Ok(c) = queue.counts(q).await {
                    n += c.ready + c.in_flight + c.scheduled;
                }
            }
            samples.push(n);
        }
        samples
    })
}

/// Whether a window's backlog grew: its second and last quarters' means.
/// The samples count the jobs in the workers' hands too (up to
/// `HERALD_WORKER_CONCURRENCY` each), which rise with the rate without any
/// falling behind.
struct Growth {
    mid: f64,
    last: f64,
    grows: bool,
}

fn growth(samples: &[u64], rate: u64) -> Growth {
    let q = samples.len() / 4;
    let mean = |s: &[u64]| s.iter().sum::<u64>() as f64 / s.len().max(1) as f64;
    let (mid, last) = if samples.len() >= 4 {
        (mean(&samples[q..2 * q]), mean(&samples[samples.len() - q..]))
    } else {
        (mean(samples), mean(samples))
    };
    // Growing: the last quarter clearly holds more than the second one (by
    // a third, and by more than a jitter: 500 jobs, or a tenth of a second
    // of the offered deliveries when that is more), whatever the rate
    // Herald kept up with.
    let jitter = (0.3 * rate as f64).max(500.0);
    let grows = last > (4.0 / 3.0) * mid && last - mid > jitter;
    Growth { mid, last, grows }
}

fn cpu_json(usage: &[(&str, f64)]) -> Value {
    Value::Object(usage.iter().map(|(n, c)| ((*n).to_owned(), json!(c))).collect())
}

/// The soft limit on open files of this process (`/proc/self/limits`).
fn open_files_limit() -> Option<u64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

impl Bench {
    async fn start(args: Args) -> anyhow::Result<Self> {
        let sizes = Sizes::from(&args);
        let dir = cluster::binaries_dir()?;
        let db = BenchDb::create(&args.pg).await?;
        let prefix = format!("herald-bench-{}", std::process::id());
        let mut qcfg = QueueConfig {
            redis_url: args.redis.clone(),
            prefix: prefix.clone(),
            ..QueueConfig::default()
        };
        qcfg.lease = Duration::from_secs(30);
        let queue = QueueClient::new(qcfg).context("REDIS_URL")?;
        // A long-running deployment has its epoch marker; without it the
        // first worker's sweeper would take the bench's backlog for a Redis
        // that lost its data and push every job again.
        queue.check_epoch().await.context("Redis (is it running?)")?;
        let client = redis::Client::open(args.redis.as_str())?;
        let redis = client.get_multiplexed_async_connection().await?;
        let log_dir = tempfile::Builder::new().prefix("herald-bench-").tempdir()?;

        let receipts = AllReceipts {
            email: Arc::default(),
            push: Arc::default(),
            inapp: Arc::default(),
        };
        let smtp = sinks::start_smtp(Arc::clone(&receipts.email)).await?;
        let push = sinks::start_push(Arc::clone(&receipts.push)).await?;
        // In-app: the live event each delivery publishes.
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(queue.events_channel()).await?;
        let inapp = Arc::clone(&receipts.inapp);
        tokio::spawn(async move {
            let mut stream = pubsub.into_on_message();
            while let Some(msg) = stream.next().await {
                let payload: Vec<u8> = msg.get_payload_bytes().to_vec();
                const NEEDLE: &[u8] = b"\"notification_id\":\"";
                if let Some(at) = memchr::memmem::find(&payload, NEEDLE).map(|a| a + NEEDLE.len())
                    && let Some(end) = memchr::memchr(b'"', &payload[at..])
                {
                    inapp.record(&String::from_utf8_lossy(&payload[at..at + end]));
                }
            }
        });

        let api_port = cluster::free_port()?;
        let api_addr: std::net::SocketAddr = ([127, 0, 0, 1], api_port).into();
        let mut env: HashMap<String, String> = [
            ("DATABASE_URL", db.url.clone()),
            ("REDIS_URL", args.redis.clone()),
            ("HERALD_QUEUE_PREFIX", prefix),
            ("HERALD_BIND", api_addr.to_string()),
            ("HERALD_EMAIL_TRANSPORT", "smtp".to_owned()),
            ("HERALD_SMTP_URL", format!("smtp://{}", smtp.addr)),
            ("HERALD_LOG_FORMAT", "json".to_owned()),
            ("RUST_LOG", args.log.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        env.extend(sinks::push_env(log_dir.path(), push.addr)?);
        for kv in &args.set {
            let (k, v) = kv.split_once('=').context("--set takes KEY=VALUE")?;
            env.insert(k.to_owned(), v.to_owned());
        }
        let mut worker_env = env.clone();
        for kv in &args.set_workers {
            let (k, v) = kv.split_once('=').context("--set-workers takes KEY=VALUE")?;
            worker_env.insert(k.to_owned(), v.to_owned());
        }

        let users = seed::users(&db.pool, args.users.max(1)).await?;
        let scopes = vec!["send".to_owned(), "read".to_owned()];
        let (_, key) = herald_db::api_keys::create_api_key(&db.pool, "bench", &scopes).await?;
        let bodies: Vec<Bytes> = users
            .iter()
            .map(|u| {
                Bytes::from(
                    json!({"user_id": u, "category": "bench", "priority": "normal",
                           "channels": ["email", "push", "in_app"], "title": "Your order shipped",
                           "body": "Order 1234 is on its way.", "data": {"order_id": "1234"}})
                    .to_string(),
                )
            })
            .collect();
        let target = load::Target {
            addr: api_addr,
            authorization: format!("Bearer {key}"),
            bodies: Arc::new(bodies),
        };
        Ok(Self {
            args,
            sizes,
            dir,
            db,
            queue,
            redis,
            env,
            worker_env,
            log_dir,
            api: None,
            api_addr,
            workers: Vec::new(),
            peaks: HashMap::new(),
            receipts,
            users,
            target,
            report: serde_json::Map::new(),
            verdicts: Vec::new(),
            lost: 0,
            ceiling_ingest: None,
            ceiling_drain: None,
            ceiling_e2e: None,
            pg_floor_ingest_us: None,
            pg_floor_drain_us: None,
            db_client_floor_ingest_us: 0.0,
            db_client_floor_drain_us: 0.0,
            redis_enqueue_floor_us: 0.0,
            http_floor_ingest_us: 0.0,
            floor_parts_drain_us: Vec::new(),
            floor_ingest_us: None,
            floor_drain_us: None,
            _sinks: vec![smtp, push],
        })
    }

    async fn start_api(&mut self) -> anyhow::Result<()> {
        let mut api = HeraldProcess::spawn(&self.dir, cluster::API, &self.env, self.log_dir.path())?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            api.check_alive()?;
            if let Ok(mut s) = load::connect(self.api_addr).await {
                let req = hyper::Request::get("/readyz")
                    .header("host", "herald")
                    .body(http_body_util::Full::new(Bytes::new()))?;
                if s.send_request(req).await.is_ok_and(|r| r.status() == 200) {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("the API did not become ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.api = Some(api);
        Ok(())
    }

    fn start_workers(&mut self) -> anyhow::Result<()> {
        for name in cluster::WORKERS {
            self.workers.push(HeraldProcess::spawn(
                &self.dir,
                name,
                &self.worker_env,
                self.log_dir.path(),
            )?);
        }
        Ok(())
    }

    /// Waits until all three workers registered with Redis.
    async fn workers_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.queue.workers().await.map(|w| w.len()).unwrap_or(0) < 3 {
            for w in &mut self.workers {
                w.check_alive()?;
            }
            if Instant::now() > deadline {
                bail!("the workers did not register within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn stop_workers(&mut self) {
        for w in self.workers.drain(..) {
            let name = w.name;
            let peak = w.stop();
            let e = self.peaks.entry(name).or_default();
            *e = (*e).max(peak);
        }
    }

    fn sample_memory(&mut self) {
        for p in self.api.iter_mut().chain(self.workers.iter_mut()) {
            p.sample_memory();
            let e = self.peaks.entry(p.name).or_default();
            *e = (*e).max(p.peak_kb);
        }
    }

    /// Waits until no delivery is waiting or being sent (bounded).
    async fn wait_all_final(&mut self, limit: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            // EXISTS stops at the first waiting row (partial index
            // `deliveries_pending`): a count of a large backlog ten times a
            // second would take Postgres CPU from what is measured.
            let pending: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM deliveries WHERE status IN ('queued', 'sending', 'retrying'))",
            )
            .fetch_one(&self.db.pool)
            .await?;
            if !pending {
                return Ok(started.elapsed());
            }
            for w in &mut self.workers {
                w.check_alive()?;
            }
            self.sample_memory();
            if started.elapsed() > limit {
                eprintln!("warning: deliveries still not final after {limit:?}");
                return Ok(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every delivery final and sent (in-app: delivered), and each one seen
    /// where it was sent: email and push at their sinks, in-app in the inbox.
    async fn check(&mut self) -> anyhow::Result<Check> {
        let pool = &self.db.pool;
        let counts: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT channel, status, count(*) FROM deliveries GROUP BY 1, 2")
                .fetch_all(pool)
                .await?;
        let mut c = Check::default();
        for (channel, status, n) in &counts {
            c.deliveries += n;
            match status.as_str() {
                "queued" | "sending" | "retrying" => c.not_final += n,
                "sent" if channel != "in_app" => {}
                "delivered" if channel == "in_app" => {}
                _ => c.not_sent += n,
            }
        }
        for (channel, receipts) in [("email", &self.receipts.email), ("push", &self.receipts.push)] {
            let ids: Vec<String> =
                sqlx::query_scalar("SELECT id FROM deliveries WHERE channel = $1 AND status = 'sent'")
                    .bind(channel)
                    .fetch_all(pool)
                    .await?;
            c.lost += ids.iter().filter(|id| receipts.get(id).is_none()).count() as i64;
            c.duplicates += receipts.total().saturating_sub(receipts.unique());
        }
        let no_inbox: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM deliveries d WHERE d.channel = 'in_app' AND d.status = 'delivered'
             AND NOT EXISTS (SELECT 1 FROM inbox_items i WHERE i.notification_id = d.notification_id)",
        )
        .fetch_one(pool)
        .await?;
        c.lost += no_inbox;
        if !c.ok() {
            self.lost += (c.not_final + c.not_sent + c.lost).unsigned_abs();
        }
        Ok(c)
    }

    /// Empties the tables and the sinks' records between scenarios.
    async fn reset(&mut self) -> anyhow::Result<()> {
        sqlx::query(
            "TRUNCATE notifications, deliveries, delivery_attempts, inbox_items, idempotency_keys, push_intents",
        )
        .execute(&self.db.pool)
        .await?;
        self.receipts.clear();
        Ok(())
    }

    /// Redis's own CPU time so far (`INFO cpu`: user and system, all its
    /// threads), µs: finer than /proc's ticks for short phases.
    async fn redis_cpu_us(&mut self) -> anyhow::Result<f64> {
        let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut self.redis).await?;
        let field = |name: &str| -> f64 {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0)
        };
        Ok((field("used_cpu_user:") + field("used_cpu_sys:")) * 1e6)
    }

    async fn used_memory(&mut self) -> anyhow::Result<i64> {
        let info: String = redis::cmd("INFO").arg("memory").query_async(&mut self.redis).await?;
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .context("INFO memory has no used_memory")
    }

    /// Keys under the bench's prefix and their `MEMORY USAGE` sum: exact,
    /// unlike `used_memory`, which other users of this Redis move too.
    async fn prefix_memory(&mut self) -> anyhow::Result<(u64, u64)> {
        let pattern = format!("*{}:*", self.queue.config().prefix);
        let mut cursor: u64 = 0;
        let (mut keys, mut bytes) = (0u64, 0u64);
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut self.redis)
                .await?;
            for k in batch {
                let used: Option<u64> = redis::cmd("MEMORY")
                    .arg("USAGE")
                    .arg(&k)
                    .arg("SAMPLES")
                    .arg(0)
                    .query_async(&mut self.redis)
                    .await?;
                keys += 1;
                bytes += used.unwrap_or(0);
            }
            cursor = next;
            if cursor == 0 {
                return Ok((keys, bytes));
            }
        }
    }

    async fn queue_keys_bytes(&mut self) -> anyhow::Result<u64> {
        let prefix = self.queue.config().prefix.clone();
        let mut total = 0;
        for q in QueueName::all() {
            for k in q.keys(&prefix).all() {
                let used: Option<u64> = redis::cmd("MEMORY")
                    .arg("USAGE")
                    .arg(k)
                    .arg("SAMPLES")
                    .arg(0)
                    .query_async(&mut self.redis)
                    .await?;
                total += used.unwrap_or(0);
            }
        }
        Ok(total)
    }

    async fn pg_bytes(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT (pg_total_relation_size('notifications') + pg_total_relation_size('deliveries')
                   + pg_total_relation_size('delivery_attempts') + pg_total_relation_size('inbox_items'))::BIGINT",
        )
        .fetch_one(&self.db.pool)
        .await?)
    }

    async fn backlog_now(&self) -> u64 {
        let mut n = 0;
        for q in QueueName::all() {
            if let Ok(c) = self.queue.counts(q).await {
                n += c.ready + c.in_flight + c.scheduled;
            }
        }
        n
    }

    /// Deliveries per second between the first claim and the last final
    /// state, by the database's clock (process start-up excluded).
    async fn drain_rate(&self) -> anyhow::Result<(i64, f64)> {
        let (n, secs): (i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*), extract(epoch FROM max(finished_at) - (SELECT min(started_at) FROM delivery_attempts))::FLOAT8
             FROM deliveries WHERE finished_at IS NOT NULL",
        )
        .fetch_one(&self.db.pool)
        .await?;
        let secs = secs.unwrap_or(f64::NAN).max(1e-3);
        Ok((n, n as f64 / secs))
    }

    fn verdict(&mut self, what: &str, goal: &str, measured: String, met: Option<bool>) {
        // Quick runs check that everything works, not the speed.
        let met = if self.args.quick { None } else { met };
        self.verdicts.push((what.to_owned(), goal.to_owned(), measured, met));
    }

    // ------------------------------------------------------------ scenarios

    async fn pgbench(&mut self) -> anyhow::Result<Option<f64>> {
        let Some(bin) = pgbench_binary() else {
            println!("\n## Database baseline: pgbench not found (apt-get install postgresql-contrib)");
            return Ok(None);
        };
        let script = self.log_dir.path().join("accept.sql");
        std::fs::write(
            &script,
            "\\set u random(0, 999)\n\
             WITH n AS (INSERT INTO notifications (id, user_id, category, priority, title, body, data, request_id) \
             VALUES ('ntf_' || gen_random_uuid(), 'bench_u' || :u, 'bench', 'normal', 'Your order shipped', \
             'Order 1234 is on its way.', '{\"order_id\": \"1234\"}', 'req') RETURNING id, user_id) \
             INSERT INTO deliveries (id, notification_id, user_id, channel, priority, status, max_attempts) \
             SELECT 'dlv_' || substr(n.id, 5, 25) || d, n.id, n.user_id, c, 'normal', 'queued', 8 \
             FROM n, unnest(ARRAY['email', 'push', 'in_app'], ARRAY['1', '2', '3']) AS x (c, d);\n",
        )?;
        let out = tokio::process::Command::new(&bin)
            .args(["-n", "-f"])
            .arg(&script)
            .args([
                "-c",
                &self.args.connections.to_string(),
                "-j",
                "2",
                "-T",
                &self.sizes.pgbench_secs.to_string(),
            ])
            .arg(&self.db.url)
            .output()
            .await
            .context("running pgbench")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let tps = text
            .lines()
            .find(|l| l.starts_with("tps = "))
            .and_then(|l| l[6..].split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok());
        let Some(tps) = tps else {
            println!(
                "\n## Database baseline: pgbench failed: {}",
                String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
            );
            return Ok(None);
        };
        // The same statement from one client: the latency of one durable
        // commit, the floor under every POST and every claim.
        let single = tokio::process::Command::new(&bin)
            .args(["-n", "-f"])
            .arg(&script)
            .args(["-c", "1", "-T", "1"])
            .arg(&self.db.url)
            .output()
            .await
            .context("running pgbench")?;
        let commit_ms = String::from_utf8_lossy(&single.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("latency average = "))
            .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok());
        self.reset().await?;
        print_table(
            "Database baseline (pgbench: 1 notification + 3 deliveries in one statement per transaction)",
            &[
                ("clients", self.args.connections.to_string()),
                ("duration", format!("{} s", self.sizes.pgbench_secs)),
                ("transactions/s", format!("{tps:.0}")),
                (
                    "1 client: latency",
                    commit_ms.map_or("-".to_owned(), |ms| {
                        format!("{ms:.2} ms per transaction (a durable commit)")
                    }),
                ),
            ],
        );
        self.report.insert(
            "pgbench".into(),
            json!({"clients": self.args.connections, "secs": self.sizes.pgbench_secs, "tps": tps,
                   "single_client_latency_ms": commit_ms}),
        );
        Ok(Some(tps))
    }

    /// The database's own ceiling for Herald's statements (see
    /// [`ceiling`]): at Herald's batching, and at batches no load of
    /// `--connections` could form, to show how much batching alone leaves.
    async fn ceiling(&mut self) -> anyhow::Result<()> {
        let url = self.db.url.clone();
        // The API: three batches in flight (api/src/ingest.rs), so at
        // most a third of the connections' requests per statement.
        let api = ceiling::Shape {
            batch: (self.args.connections / 3).max(1),
            in_flight: 3,
        };
        // The workers: 64 per statement, one claim and one result
        // statement at a time (workers/src/deliver.rs); each worker holds
        // 256 deliveries (HERALD_WORKER_CONCURRENCY), spread over claims,
        // sends and results.
        let workers = ceiling::Shape {
            batch: 64,
            in_flight: 1,
        };
        let big = ceiling::Shape {
            batch: 256,
            in_flight: 4,
        };
        let mut rows = Vec::new();
        let mut j = serde_json::Map::new();
        let (mut best_ingest, mut best_drain) = (f64::NAN, f64::NAN);
        for (label, shape) in [("herald", api), ("big_batches", big)] {
            let n = self.sizes.ceiling_ingest;
            let out = ceiling::ingest(&url, &self.users, n, shape).await?;
            self.reset().await?;
            rows.push((
                if label == "herald" {
                    "ingest, API's batching"
                } else {
                    "ingest, big batches"
                },
                format!(
                    "{:.0} notifications/s ({shape}); CPU {}",
                    out.rate,
                    cpu::describe(&out.cpu)
                ),
            ));
            j.insert(
                format!("ingest_{label}"),
                json!({"notifications": n, "batch": shape.batch, "in_flight": shape.in_flight,
                       "notifications_per_sec": out.rate, "cpu_cores": cpu_json(&out.cpu)}),
            );
            if label == "herald" {
                self.ceiling_ingest = Some(out.rate);
            } else {
                best_ingest = out.rate;
            }
            let pg_us = cpu::cores(&out.cpu, "postgres") * 1e6 / out.rate;
            if self.pg_floor_ingest_us.is_none_or(|f| pg_us < f) {
                self.pg_floor_ingest_us = Some(pg_us);
                self.db_client_floor_ingest_us = cpu::cores(&out.cpu, "bench") * 1e6 / out.rate;
            }
        }
        for (label, shape) in [("herald", workers), ("big_batches", big)] {
            seed::backlog(&self.db.pool, None, &self.users, self.sizes.ceiling_drain).await?;
            let (n, out) = ceiling::drain(&url, shape).await?;
            self.reset().await?;
            rows.push((
                if label == "herald" {
                    "drain, workers' batching"
                } else {
                    "drain, big batches"
                },
                format!(
                    "{:.0} deliveries/s ({shape}); CPU {}",
                    out.rate,
                    cpu::describe(&out.cpu)
                ),
            ));
            j.insert(
                format!("drain_{label}"),
                json!({"deliveries": n, "batch": shape.batch, "in_flight": shape.in_flight,
                       "deliveries_per_sec": out.rate, "cpu_cores": cpu_json(&out.cpu)}),
            );
            if label == "herald" {
                self.ceiling_drain = Some(out.rate);
            } else {
                best_drain = out.rate;
            }
            let pg_us = cpu::cores(&out.cpu, "postgres") * 1e6 / out.rate;
            if self.pg_floor_drain_us.is_none_or(|f| pg_us < f) {
                self.pg_floor_drain_us = Some(pg_us);
                // The bench ran the statements: their client side.
                self.db_client_floor_drain_us = cpu::cores(&out.cpu, "bench") * 1e6 / out.rate;
            }
        }
        self.parts_alone(&mut rows, &mut j).await?;
        // End to end does both for every notification on the same machine:
        // 1/I s of the database's time for its ingest, 3/D for its three
        // deliveries, at the best batching measured.
        let e2e = 1.0 / (1.0 / best_ingest + 3.0 / best_drain);
        self.ceiling_e2e = Some(e2e);
        rows.push((
            "end to end (derived)",
            format!("{e2e:.0} notifications/s = 1 / (1/ingest + 3/drain), big batches"),
        ));
        j.insert("end_to_end_derived".into(), json!({"notifications_per_sec": e2e}));
        print_table(
            "Database ceiling (Herald's own statements from one process: no HTTP, Redis, sinks or Herald processes), and the other parts alone",
            &rows,
        );
        self.report.insert("ceiling".into(), Value::Object(j));
        Ok(())
    }

    /// The parts alone (alone.rs), each in a process of its own: each
    /// channel's protocol against the sinks, the queue, and the API's HTTP
    /// side. Sets the parts of the floors: for the drain the statements'
    /// client side (from the database ceiling), the protocols' client
    /// side, the queue's worker side and Redis's fetch and ack; for ingest
    /// the HTTP side and Redis's enqueue (with the ingest ceiling's
    /// statements' client side).
    async fn parts_alone(
        &mut self,
        rows: &mut Vec<(&'static str, String)>,
        j: &mut serde_json::Map<String, Value>,
    ) -> anyhow::Result<()> {
        let n = self.sizes.alone;
        let limit = Duration::from_secs(60 + n / 500);
        let mut client_us = 0.0;
        for (channel, label) in [
            (herald_core::Channel::Email, "email sender alone"),
            (herald_core::Channel::Push, "push sender alone"),
        ] {
            let received = |r: &AllReceipts| match channel {
                herald_core::Channel::Email => r.email.unique(),
                _ => r.push.unique(),
            };
            let before = received(&self.receipts);
            let (cpu0, t0) = (cpu::snapshot(), Instant::now());
            let out = alone::measure(channel.as_str(), n, &self.worker_env, limit).await?;
            let cpu = cpu::usage(&cpu0, &cpu::snapshot());
            let arrived = received(&self.receipts) - before;
            self.reset().await?;
            if out.failed > 0 || arrived != out.sent {
                bail!(
                    "the {channel} sender alone: {} sent, {} failed ({}), {arrived} at the sink",
                    out.sent,
                    out.failed,
                    out.first_error.as_deref().unwrap_or("-")
                );
            }
            let per = |us: f64| us / out.sent.max(1) as f64;
            let (client, sinks) = (
                per(out.cpu_us),
                per(cpu::cores(&cpu, "bench") * t0.elapsed().as_secs_f64() * 1e6),
            );
            client_us += client;
            rows.push((
                label,
                format!(
                    "{:.0}/s; client {client:.0} µs, sinks {sinks:.0} µs of CPU per {channel}",
                    out.sent as f64 / out.secs.max(1e-9)
                ),
            ));
            j.insert(format!("alone_{channel}"), alone::json(&out, sinks));
        }
        // The queue: n jobs enqueued in bulk, then consumed and acked.
        let queues = herald_queue::QueueName::for_channel(herald_core::Channel::Email);
        let redis0 = self.redis_cpu_us().await?;
        let mut left = n;
        while left > 0 {
            let chunk = left.min(5_000);
            let jobs: Vec<_> = (0..chunk)
                .map(|_| {
                    (
                        queues[1],
                        herald_queue::DeliveryJob::new(herald_core::DeliveryId::generate(), 0),
                    )
                })
                .collect();
            self.queue.enqueue(&jobs).await.context("enqueueing the queue's jobs")?;
            left -= chunk;
        }
        let redis1 = self.redis_cpu_us().await?;
        let out = alone::measure("queue", n, &self.worker_env, limit).await?;
        let redis2 = self.redis_cpu_us().await?;
        let (redis_enqueue_us, redis_consume_us) = (redis1 - redis0, redis2 - redis1);
        let mut waiting = 0;
        for q in queues {
            let c = self.queue.counts(q).await?;
            waiting += c.ready + c.scheduled + c.in_flight + c.dead;
        }
        if out.failed > 0 || out.sent != n || waiting > 0 {
            bail!(
                "the queue alone: {} of {n} jobs handled ({}), {waiting} left in Redis",
                out.sent,
                out.first_error.as_deref().unwrap_or("-")
            );
        }
        let per = |us: f64| us / n.max(1) as f64;
        // A job is enqueued with its notification (ingest's floor) and
        // fetched and acked with its delivery (the drain's).
        let (client, redis) = (per(out.cpu_us), per(redis_consume_us));
        self.redis_enqueue_floor_us = per(redis_enqueue_us);
        rows.push((
            "queue alone",
            format!(
                "{:.0} jobs/s consumed; worker {client:.1} µs, Redis {:.1} µs of CPU per job (enqueue in bulk {:.1}, fetch and ack {redis:.1})",
                out.sent as f64 / out.secs.max(1e-9),
                per(redis_enqueue_us + redis_consume_us),
                per(redis_enqueue_us)
            ),
        ));
        let mut queue_json = alone::json(&out, redis);
        queue_json["redis_enqueue_cpu_us_per_job"] = json!(per(redis_enqueue_us));
        j.insert("alone_queue".into(), queue_json);
        // The API's HTTP side: the bench's POSTs, parsed and answered.
        let out = alone::measure_http(&self.target, n, self.args.connections, &self.worker_env, limit).await?;
        if out.failed > 0 || out.sent != n {
            bail!(
                "the API's HTTP side alone: {} of {n} requests answered ({})",
                out.sent,
                out.first_error.as_deref().unwrap_or("-")
            );
        }
        let http = per(out.cpu_us);
        self.http_floor_ingest_us = http;
        rows.push((
            "API's HTTP side alone",
            format!(
                "{:.0} requests/s; server {http:.0} µs of CPU per POST (axum, the API's request and answer types, nothing stored)",
                out.sent as f64 / out.secs.max(1e-9)
            ),
        ));
        j.insert("alone_http".into(), alone::json(&out, 0.0));
        // One email and one push in every three deliveries (in-app speaks
        // no protocol); every delivery is one job and takes its statements.
        let protocols = client_us / 3.0;
        self.floor_parts_drain_us = vec![
            ("the statements' client side", self.db_client_floor_drain_us),
            ("the protocols' client side", protocols),
            ("the queue's worker side", client),
            ("Redis", redis),
        ];
        rows.push((
            "per delivery",
            format!(
                "statements' client side {:.0} + protocols {protocols:.0} ((email + push) ÷ 3) + queue {client:.0} + Redis {redis:.0} µs of CPU: the workers' part of the drain's floor",
                self.db_client_floor_drain_us
            ),
        ));
        Ok(())
    }

    async fn ingest(&mut self, pgbench_tps: Option<f64>) -> anyhow::Result<()> {
        let n = self.sizes.ingest;
        let (redis_before, pg_before) = (self.used_memory().await?, self.pg_bytes().await?);
        let limit = Duration::from_secs(if self.args.quick { 30 } else { 300 });
        let cpu0 = cpu::snapshot();
        let r = load::closed_loop(&self.target, n, self.args.connections, limit).await?;
        let cpu = cpu::usage(&cpu0, &cpu::snapshot());
        self.sample_memory();
        // Jobs are pushed before each 202; the enqueued marks follow.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (redis_after, pg_after) = (self.used_memory().await?, self.pg_bytes().await?);
        let queue_bytes = self.queue_keys_bytes().await?;
        let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE status = 'queued'")
            .fetch_one(&self.db.pool)
            .await?;
        let jobs = self.backlog_now().await;
        let lat = sorted_ms(&r.latencies_us);
        let rps = r.accepted as f64 / r.elapsed.as_secs_f64();
        let (p50, p95, p99) = (percentile(&lat, 50.0), percentile(&lat, 95.0), percentile(&lat, 99.0));
        let ratio = pgbench_tps.map(|t| rps / t);
        let mut rows = vec![
            ("notifications", format!("{} accepted, {} errors", r.accepted, r.errors)),
            ("connections", self.args.connections.to_string()),
            ("requests/s", format!("{rps:.0} ({:.0} deliveries/s)", rps * 3.0)),
            ("latency p50/p95/p99", format!("{p50:.2} / {p95:.2} / {p99:.2} ms")),
            (
                "deliveries queued",
                format!("{queued} in Postgres, {jobs} jobs in Redis"),
            ),
        ];
        if let Some(ratio) = ratio {
            rows.push((
                "vs pgbench",
                format!("{ratio:.2}× the database's one-statement-per-request rate"),
            ));
        }
        if let Some(c) = self.ceiling_ingest {
            rows.push((
                "vs ceiling",
                format!("{:.2}× the database's ceiling for these writes ({c:.0}/s)", rps / c),
            ));
        }
        if !r.error_samples.is_empty() {
            rows.push(("errors, e.g.", r.error_samples.join(" | ")));
        }
        rows.push(("CPU, cores", cpu::describe(&cpu)));
        // Three jobs per notification.
        let parts = [
            ("the API's HTTP side", self.http_floor_ingest_us),
            ("the statements' client side", self.db_client_floor_ingest_us),
            ("Redis", 3.0 * self.redis_enqueue_floor_us),
        ];
        let parts = if self.pg_floor_ingest_us.is_some() {
            &parts[..]
        } else {
            &[]
        };
        let reach = cpu::reach(&cpu, rps, "notification", 10_000.0, self.pg_floor_ingest_us, parts);
        rows.push(("CPU per notification", reach.text.clone()));
        self.floor_ingest_us = reach.floor_us;
        print_table("1. Ingest (workers stopped)", &rows);
        let per_delivery_redis = (redis_after - redis_before) as f64 / queued.max(1) as f64;
        let per_delivery_exact = queue_bytes as f64 / jobs.max(1) as f64;
        let per_ntf_pg = (pg_after - pg_before) as f64 / r.accepted.max(1) as f64;
        self.report.insert(
            "ingest".into(),
            json!({"notifications": n, "accepted": r.accepted, "errors": r.errors, "connections": self.args.connections,
                   "requests_per_sec": rps, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
                   "elapsed_secs": r.elapsed.as_secs_f64(), "vs_pgbench": ratio,
                   "vs_ceiling": self.ceiling_ingest.map(|c| rps / c),
                   "queued_in_postgres": queued, "jobs_in_redis": jobs, "cpu_cores": cpu_json(&cpu),
                   "reach": reach.json}),
        );
        self.report.insert(
            "footprint_queued".into(),
            json!({"redis_used_memory_delta": redis_after - redis_before,
                   "redis_bytes_per_queued_delivery": per_delivery_redis,
                   "redis_queue_keys_bytes": queue_bytes,
                   "redis_memory_usage_per_queued_delivery": per_delivery_exact,
                   "postgres_bytes_per_notification_queued": per_ntf_pg}),
        );
        let ok_count = queued == (r.accepted * 3) as i64 && jobs >= r.accepted * 3;
        if !ok_count || r.errors > 0 {
            eprintln!(
                "warning: ingest wrote {queued} queued deliveries and {jobs} jobs for {} accepted",
                r.accepted
            );
        }
        if r.errors > 0 {
            self.lost += r.errors;
        }
        self.verdict(
            "ingest rate",
            "≥ 10,000 notifications/s",
            format!("{rps:.0}/s{}", out_of_reach(reach.floor_cores)),
            Some(rps >= 10_000.0),
        );
        self.verdict("ingest p99", "≤ 20 ms", format!("{p99:.1} ms"), Some(p99 <= 20.0));
        Ok(())
    }

    async fn drain(&mut self) -> anyhow::Result<()> {
        let backlog: i64 = sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE status = 'queued'")
            .fetch_one(&self.db.pool)
            .await?;
        let redis_before = self.used_memory().await?;
        let cpu0 = cpu::snapshot();
        self.start_workers()?;
        let limit = Duration::from_secs(if self.args.quick {
            60
        } else {
            60 + backlog.unsigned_abs() / 2_000
        });
        let wall = self.wait_all_final(limit).await?;
        let cpu = cpu::usage(&cpu0, &cpu::snapshot());
        let (n, rate) = self.drain_rate().await?;
        let check = self.check().await?;
        // Acks are written a few ms after the results.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (keys, left) = self.prefix_memory().await?;
        let queue_left = self.queue_keys_bytes().await?;
        let redis_after = self.used_memory().await?;
        let pg = self.pg_bytes().await?;
        let notifications: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications")
            .fetch_one(&self.db.pool)
            .await?;
        let reach = cpu::reach(
            &cpu,
            rate,
            "delivery",
            20_000.0,
            self.pg_floor_drain_us,
            &self.floor_parts_drain_us,
        );
        self.floor_drain_us = reach.floor_us;
        print_table(
            "2. Drain (the ingest backlog, workers started)",
            &[
                ("backlog", format!("{backlog} deliveries")),
                (
                    "deliveries/s",
                    format!("{rate:.0} (first claim to last final state, database clock)"),
                ),
                (
                    "wall time",
                    format!("{:.2} s incl. worker start-up", wall.as_secs_f64()),
                ),
                ("check", check.line()),
                (
                    "vs ceiling",
                    self.ceiling_drain.map_or("-".to_owned(), |c| {
                        format!("{:.2}× the database's ceiling for these writes ({c:.0}/s)", rate / c)
                    }),
                ),
                ("CPU, cores", cpu::describe(&cpu)),
                ("CPU per delivery", reach.text.clone()),
                (
                    "Redis left after completion",
                    format!(
                        "{queue_left} bytes in queue keys; {keys} keys / {left} bytes under the prefix (workers registry, epoch)"
                    ),
                ),
            ],
        );
        self.report.insert(
            "drain".into(),
            json!({"backlog": backlog, "deliveries": n, "deliveries_per_sec": rate, "wall_secs": wall.as_secs_f64(),
                   "vs_ceiling": self.ceiling_drain.map(|c| rate / c),
                   "check": check.json(), "cpu_cores": cpu_json(&cpu), "reach": reach.json}),
        );
        self.report.insert(
            "footprint_completed".into(),
            json!({"redis_queue_keys_bytes_left": queue_left, "redis_prefix_keys": keys, "redis_prefix_bytes": left,
                   "redis_used_memory_delta_vs_before_drain": redis_after - redis_before,
                   "postgres_bytes_per_notification_completed": pg as f64 / notifications.max(1) as f64}),
        );
        self.verdict(
            "drain rate",
            "≥ 20,000 deliveries/s",
            format!("{rate:.0}/s{}", out_of_reach(reach.floor_cores)),
            Some(rate >= 20_000.0),
        );
        self.verdict(
            "Redis after completion",
            "nothing retained",
            format!("{queue_left} bytes in queue keys"),
            Some(queue_left == 0),
        );
        self.reset().await
    }

    async fn end_to_end(&mut self) -> anyhow::Result<()> {
        if self.workers.is_empty() {
            self.start_workers()?;
        }
        self.workers_ready().await?;
        let (rate, dur) = (self.sizes.rate, self.sizes.e2e);
        let sampler = sample_backlog(self.queue.clone(), dur);
        let cpu0 = cpu::snapshot();
        let (r, behind) = load::paced(&self.target, rate, dur, self.args.connections).await?;
        let cpu = cpu::usage(&cpu0, &cpu::snapshot());
        let offered_secs = r.elapsed.as_secs_f64();
        let samples = sampler.await.unwrap_or_default();
        let final_in_window: i64 = sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE finished_at IS NOT NULL")
            .fetch_one(&self.db.pool)
            .await?;
        self.sample_memory();
        let tail = self.wait_all_final(Duration::from_secs(120)).await?;
        let check = self.check().await?;
        // POST-to-final per delivery, from the POST's send time to the
        // database's finished_at.
        let finished: Vec<(String, f64)> =
            sqlx::query_as("SELECT notification_id, extract(epoch FROM finished_at)::FLOAT8 FROM deliveries")
                .fetch_all(&self.db.pool)
                .await?;
        let mut by_ntf: HashMap<String, Vec<f64>> = HashMap::new();
        for (ntf, at) in finished {
            by_ntf.entry(ntf).or_default().push(at);
        }
        let mut lat: Vec<f64> = Vec::new();
        for s in &r.sent {
            let sent =
                s.at.duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
            for f in by_ntf.get(&s.notification_id).into_iter().flatten() {
                lat.push((f - sent) * 1000.0);
            }
        }
        lat.sort_by(f64::total_cmp);
        let achieved = r.accepted as f64 / offered_secs;
        let completed = final_in_window as f64 / offered_secs;
        let Growth { mid, last, grows } = growth(&samples, rate);
        let (p50, p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
        let post = sorted_ms(&r.latencies_us);
        // One ingest and three deliveries per notification, each at its floor.
        let e2e_floor_us = self.floor_ingest_us.zip(self.floor_drain_us).map(|(i, d)| i + 3.0 * d);
        // What the window cost per accepted notification, every process
        // counted, against that floor. Only when the workers keep up (three
        // deliveries final per accepted notification) is it a whole
        // notification's cost; a growing backlog leaves some of the cost
        // after the window, so the figure is then a lower bound.
        let cost = cpu::reach(&cpu, achieved, "accepted notification", 5_000.0, None, &[]);
        let finals_per_accepted = completed / achieved.max(1e-9);
        print_table(
            "3. End to end (paced, workers running)",
            &[
                ("offered", format!("{rate} notifications/s for {} s", dur.as_secs())),
                (
                    "achieved",
                    format!(
                        "{achieved:.0} notifications/s accepted ({} errors, {behind} not sent in time); {completed:.0} deliveries/s final during the window",
                        r.errors
                    ),
                ),
                (
                    "POST latency p50/p99",
                    format!("{:.2} / {:.2} ms", percentile(&post, 50.0), percentile(&post, 99.0)),
                ),
                (
                    "POST-to-final p50/p99",
                    format!("{p50:.1} / {p99:.1} ms (per delivery)"),
                ),
                ("backlog (jobs, every 0.5 s)", format!("{samples:?}")),
                (
                    "backlog grows",
                    format!(
                        "{} (2nd quarter mean {mid:.0}, last quarter mean {last:.0})",
                        if grows { "YES" } else { "no" }
                    ),
                ),
                (
                    "tail",
                    format!("{:.2} s to finish after the window", tail.as_secs_f64()),
                ),
                ("check", check.line()),
                ("CPU, cores (window)", cpu::describe(&cpu)),
                (
                    "CPU per notification",
                    format!(
                        "{}; {finals_per_accepted:.2} deliveries final per accepted notification in the window (3 when the workers keep up; fewer, and this is a lower bound)",
                        cost.text
                    ),
                ),
                (
                    "vs ceiling",
                    self.ceiling_e2e.map_or("-".to_owned(), |c| {
                        format!(
                            "{:.2}× the database's derived end-to-end ceiling ({c:.0}/s)",
                            achieved / c
                        )
                    }),
                ),
                (
                    "floor per notification",
                    e2e_floor_us.map_or("- (needs the ingest and drain scenarios)".to_owned(), |f| {
                        format!(
                            "{f:.0} µs = ingest's floor + 3 × drain's; 5000/s takes {:.2} cores",
                            f * 5_000.0 / 1e6
                        )
                    }),
                ),
            ],
        );
        self.report.insert(
            "end_to_end".into(),
            json!({"offered_per_sec": rate, "secs": dur.as_secs(), "accepted": r.accepted, "errors": r.errors,
                   "behind_schedule": behind, "achieved_per_sec": achieved, "final_deliveries_per_sec": completed,
                   "post_p50_ms": percentile(&post, 50.0), "post_p99_ms": percentile(&post, 99.0),
                   "post_to_final_p50_ms": p50, "post_to_final_p99_ms": p99, "backlog_samples": samples,
                   "backlog_grows": grows, "tail_secs": tail.as_secs_f64(), "check": check.json(),
                   "cpu_cores": cpu_json(&cpu), "vs_ceiling": self.ceiling_e2e.map(|c| achieved / c),
                   "floor_us_per_notification": e2e_floor_us, "cost": cost.json,
                   "finals_per_accepted": finals_per_accepted}),
        );
        let met = achieved >= 5_000.0 * 0.98 && !grows && r.errors == 0;
        let e2e_floor_cores = e2e_floor_us.map(|f| f * 5_000.0 / 1e6);
        self.lost += r.errors;
        self.reset().await?;
        let flat = !grows && r.errors == 0 && behind == 0 && achieved >= rate as f64 * 0.98;
        let highest_flat = self.sustained(rate, flat, completed).await?;
        self.verdict(
            "end to end",
            "≥ 5,000 notifications/s, flat backlog",
            format!(
                "{achieved:.0}/s offered {rate}/s, backlog {}{}{}",
                if grows { "grows" } else { "flat" },
                highest_flat.map_or(String::new(), |f| format!("; flat at {f}/s")),
                out_of_reach(e2e_floor_cores)
            ),
            Some(met),
        );
        Ok(())
    }

    /// How close end to end gets: after the main window, shorter windows
    /// bisect the offered rate for the highest one the workers keep up
    /// with (every request accepted on time, the backlog not growing).
    /// They start from the main window's own measure: above the offered
    /// rate when it stayed flat, else at the rate its final deliveries
    /// would sustain (a third of them per second). Each window starts on
    /// an empty database and ends when every delivery is final, and is
    /// checked like every scenario. Returns the highest flat rate seen.
    async fn sustained(
        &mut self,
        offered: u64,
        offered_flat: bool,
        finals_per_sec: f64,
    ) -> anyhow::Result<Option<u64>> {
        let (windows, dur) = (self.sizes.sustain_windows, self.sizes.sustain);
        if windows == 0 {
            return Ok(offered_flat.then_some(offered));
        }
        let (mut lo, mut hi) = if offered_flat {
            (Some(offered), None)
        } else {
            (None, Some(offered))
        };
        let mut next = if offered_flat {
            offered + offered / 4
        } else {
            ((finals_per_sec / 3.0) as u64).clamp(1, offered.saturating_sub(1).max(1))
        };
        let mut rows = Vec::new();
        let mut json_rows = Vec::new();
        for _ in 0..windows {
            let rate = next.max(1);
            let sampler = sample_backlog(self.queue.clone(), dur);
            let (r, behind) = load::paced(&self.target, rate, dur, self.args.connections).await?;
            let secs = r.elapsed.as_secs_f64().max(1e-9);
            let samples = sampler.await.unwrap_or_default();
            let finals: i64 = sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE finished_at IS NOT NULL")
                .fetch_one(&self.db.pool)
                .await?;
            let tail = self.wait_all_final(Duration::from_secs(120)).await?;
            let check = self.check().await?;
            self.lost += r.errors;
            self.reset().await?;
            let g = growth(&samples, rate);
            let accepted = r.accepted as f64 / secs;
            let flat = !g.grows && r.errors == 0 && behind == 0 && accepted >= rate as f64 * 0.98;
            rows.push((
                format!("{rate}/s"),
                format!(
                    "{} ({accepted:.0}/s accepted, {:.0} deliveries/s final; backlog {:.0} → {:.0} jobs, 2nd to last quarter; {:.2} s tail; {})",
                    if flat { "flat" } else { "grows" },
                    finals as f64 / secs,
                    g.mid,
                    g.last,
                    tail.as_secs_f64(),
                    check.line()
                ),
            ));
            json_rows.push(json!({"offered_per_sec": rate, "accepted_per_sec": accepted,
                                  "final_deliveries_per_sec": finals as f64 / secs, "backlog_mid": g.mid,
                                  "backlog_last": g.last, "flat": flat, "tail_secs": tail.as_secs_f64(),
                                  "check": check.json()}));
            if flat {
                lo = lo.max(Some(rate));
            } else {
                hi = Some(hi.map_or(rate, |h| h.min(rate)));
            }
            next = match (lo, hi) {
                (Some(l), Some(h)) if h <= l + (h / 50).max(1) => break,
                (Some(l), Some(h)) => l + (h - l) / 2,
                (Some(l), None) => l + l / 4,
                (None, Some(h)) => h - h / 5,
                (None, None) => break,
            };
        }
        let summary = match (lo, hi) {
            (Some(l), Some(h)) => format!(
                "flat at {l}/s, grows at {h}/s (flat at {:.0}% of the 5,000/s target)",
                l as f64 / 50.0
            ),
            (Some(l), None) => format!("flat up to {l}/s, the highest offered"),
            (None, Some(h)) => format!("grows at every rate tried, down to {h}/s"),
            (None, None) => "-".to_owned(),
        };
        let mut table: Vec<(&str, String)> = vec![(
            "windows",
            format!("{} of {} s each, on an empty database", rows.len(), dur.as_secs()),
        )];
        table.extend(rows.iter().map(|(k, v)| (k.as_str(), v.clone())));
        table.push(("sustained", summary));
        print_table("3b. Sustained end to end (the offered rate bisected)", &table);
        self.report.insert(
            "sustained_end_to_end".into(),
            json!({"windows": json_rows, "highest_flat_per_sec": lo, "lowest_growing_per_sec": hi,
                   "window_secs": dur.as_secs()}),
        );
        Ok(lo)
    }

    async fn idle(&mut self) -> anyhow::Result<()> {
        if self.workers.is_empty() {
            self.start_workers()?;
        }
        self.workers_ready().await?;
        let mut sender = load::Poster::connect(&self.target).await?;
        let mut lat: HashMap<&str, Vec<f64>> = HashMap::new();
        // Per delivery: (channel, POST sent (wall clock, s), 202 after ms,
        // receipt after ms), to split the latency at the database's own
        // timestamps below.
        let mut hops: HashMap<String, (&str, f64, f64, f64)> = HashMap::new();
        let mut timeouts = 0;
        for i in 0..self.sizes.idle {
            // Idle between notifications, so each finds the workers waiting.
            tokio::time::sleep(Duration::from_millis(10)).await;
            let body = self.target.bodies[i as usize % self.target.bodies.len()].clone();
            let t0 = Instant::now();
            let sent_wall = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            let (status, answer) = sender.post(&body).await?;
            let answered_ms = t0.elapsed().as_secs_f64() * 1000.0;
            if status != 202 {
                bail!("idle POST answered {status}: {}", String::from_utf8_lossy(&answer));
            }
            let doc: Value = serde_json::from_slice(&answer)?;
            let ntf = doc["id"].as_str().unwrap_or_default().to_owned();
            let id_of = |ch: &str| {
                doc["deliveries"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|d| d["channel"] == ch)
                    .and_then(|d| d["id"].as_str())
                    .unwrap_or_default()
                    .to_owned()
            };
            let waits: [(&str, &Arc<Receipts>, String, String); 3] = [
                ("email", &self.receipts.email, id_of("email"), id_of("email")),
                ("push", &self.receipts.push, id_of("push"), id_of("push")),
                ("in_app", &self.receipts.inapp, ntf, id_of("in_app")),
            ];
            let deadline = t0 + Duration::from_secs(5);
            for (ch, receipts, id, delivery) in waits {
                loop {
                    let notified = receipts.arrived.notified();
                    if let Some(at) = receipts.get(&id) {
                        let ms = at.saturating_duration_since(t0).as_secs_f64() * 1000.0;
                        lat.entry(ch).or_default().push(ms);
                        hops.insert(delivery, (ch, sent_wall, answered_ms, ms));
                        break;
                    }
                    if Instant::now() > deadline {
                        timeouts += 1;
                        break;
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(5), notified).await;
                }
            }
        }
        self.wait_all_final(Duration::from_secs(30)).await?;
        let check = self.check().await?;
        let mut rows = vec![(
            "notifications",
            format!("{} one at a time, 3 channels each", self.sizes.idle),
        )];
        let mut json_ch = serde_json::Map::new();
        let mut worst = (0.0f64, 0.0f64);
        let mut texts = Vec::new();
        for ch in ["email", "push", "in_app"] {
            let mut v = lat.remove(ch).unwrap_or_default();
            v.sort_by(f64::total_cmp);
            let (p50, p99) = (percentile(&v, 50.0), percentile(&v, 99.0));
            worst = (worst.0.max(p50), worst.1.max(p99));
            texts.push((ch, format!("p50 {p50:.2} ms, p99 {p99:.2} ms ({} samples)", v.len())));
            json_ch.insert(ch.into(), json!({"p50_ms": p50, "p99_ms": p99, "samples": v.len()}));
        }
        for (ch, t) in texts {
            rows.push((ch, t));
        }
        rows.push(("timeouts (> 5 s)", timeouts.to_string()));
        let split = self.idle_hops(&hops).await?;
        for (ch, text, _) in &split {
            rows.push((ch, text.clone()));
        }
        rows.push(("check", check.line()));
        print_table("4. Idle latency (POST to receipt at the sink)", &rows);
        let split_json: serde_json::Map<String, Value> =
            split.into_iter().map(|(ch, _, j)| (ch.to_owned(), j)).collect();
        self.report.insert(
            "idle_latency".into(),
            json!({"notifications": self.sizes.idle, "channels": json_ch, "timeouts": timeouts, "check": check.json(),
                   "hops_p50_ms": split_json}),
        );
        self.verdict(
            "idle POST-to-sink",
            "p50 ≤ 5 ms, p99 ≤ 25 ms",
            format!("worst channel p50 {:.1} ms, p99 {:.1} ms", worst.0, worst.1),
            Some(worst.0 <= 5.0 && worst.1 <= 25.0 && timeouts == 0),
        );
        self.lost += timeouts;
        self.reset().await
    }

    /// Where the idle latency goes, per channel (medians, ms), split at
    /// the database's own timestamps (same machine, same clock): the
    /// insert's transaction start, and the first attempt's (the claim; for
    /// in-app, the one statement that delivers it).
    async fn idle_hops(
        &self,
        hops: &HashMap<String, (&'static str, f64, f64, f64)>,
    ) -> anyhow::Result<Vec<(&'static str, String, Value)>> {
        let ids: Vec<&str> = hops.keys().map(String::as_str).collect();
        let stamps: Vec<(String, f64, f64)> = sqlx::query_as(
            "SELECT d.id, extract(epoch FROM n.created_at)::FLOAT8, extract(epoch FROM a.started_at)::FLOAT8
             FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             JOIN delivery_attempts a ON a.delivery_id = d.id AND a.attempt = 1
             WHERE d.id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&self.db.pool)
        .await?;
        let mut by_ch: HashMap<&str, [Vec<f64>; 4]> = HashMap::new();
        for (id, inserted, claimed) in stamps {
            let Some(&(ch, sent, answered, received)) = hops.get(&id) else {
                continue;
            };
            let (ins, cl) = ((inserted - sent) * 1000.0, (claimed - sent) * 1000.0);
            let v = by_ch.entry(ch).or_default();
            v[0].push(ins);
            v[1].push(answered - ins);
            v[2].push(cl - ins);
            v[3].push(received - cl);
        }
        let mut out = Vec::new();
        for ch in ["email", "push", "in_app"] {
            let Some(mut v) = by_ch.remove(ch) else { continue };
            let m: Vec<f64> = v
                .iter_mut()
                .map(|s| {
                    s.sort_by(f64::total_cmp);
                    percentile(s, 50.0)
                })
                .collect();
            let label = match ch {
                "email" => "email, split",
                "push" => "push, split",
                _ => "in_app, split",
            };
            out.push((
                label,
                format!(
                    "POST → insert starts {:.2}; insert → 202 back {:.2}; insert → {} starts {:.2}; → received {:.2} (p50s, ms)",
                    m[0],
                    m[1],
                    if ch == "in_app" { "delivery" } else { "claim" },
                    m[2],
                    m[3]
                ),
                json!({"post_to_insert": m[0], "insert_to_202": m[1], "insert_to_claim": m[2], "claim_to_received": m[3]}),
            ));
        }
        Ok(out)
    }

    /// Seeds `n` deliveries with the workers stopped, then drains them.
    async fn backlog_drain(&mut self, n: u64) -> anyhow::Result<(f64, Check, f64, Vec<(&'static str, f64)>)> {
        self.stop_workers();
        let t = Instant::now();
        let written = seed::backlog(&self.db.pool, Some(&self.queue), &self.users, n).await?;
        let seeded = t.elapsed().as_secs_f64();
        let cpu0 = cpu::snapshot();
        self.start_workers()?;
        let limit = Duration::from_secs(60 + written / 2_000);
        self.wait_all_final(limit).await?;
        let cpu = cpu::usage(&cpu0, &cpu::snapshot());
        let (_, rate) = self.drain_rate().await?;
        let check = self.check().await?;
        self.reset().await?;
        Ok((rate, check, seeded, cpu))
    }

    async fn scaling(&mut self) -> anyhow::Result<()> {
        let small = self.sizes.backlog;
        // A small backlog drains in about a second, so one drain's rate
        // swings with whatever else the VM does in that second: the median
        // of three is what the big backlog is held to. With a big backlog,
        // whose drain takes minutes, two more small drains follow it, and
        // the median is of all five: a VM that changes pace during the
        // scenario then weighs on both sides, not only on the big drain.
        let mut runs = Vec::with_capacity(5);
        for _ in 0..3 {
            runs.push(self.backlog_drain(small).await?);
        }
        let big_run = match self.args.big_backlog {
            Some(big) => {
                let run = self.backlog_drain(big).await?;
                // The big drain's WAL leaves Postgres a checkpoint to write:
                // done now, not during the small drains that follow.
                if let Err(e) = sqlx::query("CHECKPOINT").execute(&self.db.pool).await {
                    println!("(no CHECKPOINT before the last small drains: {e})");
                }
                for _ in 0..2 {
                    runs.push(self.backlog_drain(small).await?);
                }
                Some((big, run))
            }
            None => None,
        };
        let all_rates: Vec<f64> = runs.iter().map(|r| r.0).collect();
        let drains = match all_rates.len() {
            3 => "3 times".to_owned(),
            n => format!("{n} times (3 before the big backlog, {} after)", n - 3),
        };
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (rate_small, check_small, seed_small, cpu_small) = runs.swap_remove(runs.len() / 2);
        let mut rows = vec![
            (
                "seeding",
                "SQL (UNNEST, 20k notifications per statement) + bulk LPUSH pipelines, not HTTP".to_owned(),
            ),
            (
                "small backlog",
                format!(
                    "{small} deliveries, drained {drains}: {} deliveries/s, median {rate_small:.0} (seeded in {seed_small:.1} s); {}",
                    all_rates
                        .iter()
                        .map(|r| format!("{r:.0}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    check_small.line()
                ),
            ),
            ("small: CPU, cores", cpu::describe(&cpu_small)),
        ];
        let mut j = json!({"small": {"deliveries": small, "deliveries_per_sec": rate_small, "runs_per_sec": all_rates,
                                     "check": check_small.json(), "cpu_cores": cpu_json(&cpu_small)}});
        if let Some((big, (rate_big, check_big, seed_big, cpu_big))) = big_run {
            let ratio = rate_big / rate_small;
            rows.push((
                "big backlog",
                format!(
                    "{big} deliveries: {rate_big:.0} deliveries/s (seeded in {seed_big:.1} s); {}",
                    check_big.line()
                ),
            ));
            rows.push(("big: CPU, cores", cpu::describe(&cpu_big)));
            rows.push(("big / small", format!("{ratio:.2}")));
            j["big"] = json!({"deliveries": big, "deliveries_per_sec": rate_big, "check": check_big.json(),
                              "ratio": ratio, "cpu_cores": cpu_json(&cpu_big)});
            self.verdict(
                "drain at big backlog",
                "within 10% of the small one",
                format!(
                    "{rate_big:.0}/s vs {rate_small:.0}/s, median of {} ({ratio:.2})",
                    all_rates.len()
                ),
                Some(ratio >= 0.9),
            );
        } else {
            rows.push(("big backlog", "skipped (--big-backlog 1000000 to run it)".to_owned()));
            self.verdict(
                "drain at big backlog",
                "within 10% of the small one",
                "not run".into(),
                None,
            );
        }
        print_table("6. Backlog scaling (workers started on a seeded backlog)", &rows);
        self.report.insert("backlog_scaling".into(), j);
        Ok(())
    }

    /// Many idle live streams on one API process, a status change reaching
    /// them, and `If-None-Match` polling against full reads.
    async fn clients(&mut self) -> anyhow::Result<()> {
        let wanted = self.args.clients.unwrap_or(if self.args.quick { 200 } else { 10_000 });
        // Each stream is one file descriptor here and one in the API.
        let limit = open_files_limit().unwrap_or(1024);
        let n = wanted.min(limit.saturating_sub(512)).max(2);
        if n < wanted {
            println!("\n(clients capped at {n} by the open-files limit {limit}; raise `ulimit -n` for more)");
        }
        let n_usize = usize::try_from(n)?;
        // A fresh API process of its own: its memory with the streams open
        // is this scenario's figure, not the footprint of the others.
        self.sample_memory();
        if let Some(api) = self.api.take() {
            let kb = api.stop();
            let peak = self.peaks.entry(cluster::API).or_default();
            *peak = (*peak).max(kb);
        }
        self.start_api().await?;
        if self.workers.is_empty() {
            self.start_workers()?;
        }
        self.workers_ready().await?;
        let users: Vec<String> = (0..n_usize).map(|i| format!("bench_c{i}")).collect();
        let addr = self.api_addr;
        let in_app = |user: &str| {
            Bytes::from(
                json!({"user_id": user, "category": "bench", "channels": ["in_app"],
                       "title": "Your order shipped", "body": "Order 1234 is on its way."})
                .to_string(),
            )
        };
        // The polling user's inbox: 20 items, settled long before it is polled.
        let mut sender = load::connect(addr).await?;
        for _ in 0..20 {
            let (status, body) = load::post(&mut sender, &self.target, in_app(&users[0])).await?;
            if status != 202 {
                bail!("POST answered {status}: {}", String::from_utf8_lossy(&body));
            }
        }
        let t_mint = Instant::now();
        let tokens = clients::mint_tokens(addr, &self.target.authorization, &users).await?;
        let mint_secs = t_mint.elapsed().as_secs_f64();
        let api_pid = self.api.as_ref().map(HeraldProcess::pid);
        let rss_kb = |pid: Option<u32>| -> u64 {
            let Some(pid) = pid else { return 0 };
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmRSS:"))?
                        .split_whitespace()
                        .nth(1)?
                        .parse()
                        .ok()
                })
                .unwrap_or(0)
        };
        let rss_before = rss_kb(api_pid);

        // Every client opens its stream and waits.
        let seen = Arc::new(clients::Seen::default());
        let stop = Instant::now() + Duration::from_secs(300);
        let t_open = Instant::now();
        let mut streams = tokio::task::JoinSet::new();
        for token in tokens.iter().skip(1) {
            streams.spawn(clients::stream_client(addr, token.clone(), Arc::clone(&seen), stop));
        }
        let expected_open = n - 1;
        let open_deadline = Instant::now() + Duration::from_secs(120);
        while seen.open.load(Ordering::Relaxed) + seen.failed.load(Ordering::Relaxed) < expected_open
            && Instant::now() < open_deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let open_secs = t_open.elapsed().as_secs_f64();
        let opened = seen.open.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_open = rss_kb(api_pid);

        // Status changes for random connected users, paced, through the
        // in-app worker: the client sees its delivery move to `delivered`.
        let m = if self.args.quick { 100 } else { 2_000 }.min(n - 1);
        let mut sent = Vec::new();
        let mut rng_state = 0x9E37_79B9_7F4A_7C15_u64;
        let pace = Duration::from_millis(2);
        for _ in 0..m {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            let user = &users[1 + usize::try_from(rng_state % (n - 1))?];
            let (status, body) = load::post(&mut sender, &self.target, in_app(user)).await?;
            if status != 202 {
                bail!("POST answered {status}: {}", String::from_utf8_lossy(&body));
            }
            if let Some(id) = load::notification_id(&body) {
                sent.push(id);
            }
            tokio::time::sleep(pace).await;
        }
        let seen_deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = {
                let d = seen.delivered_ms.lock().await;
                sent.iter().filter(|id| d.contains_key(*id)).count()
            };
            if got == sent.len() || Instant::now() > seen_deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let rss_peak = rss_kb(api_pid).max(rss_open);
        let mut lat: Vec<f64> = {
            let d = seen.delivered_ms.lock().await;
            sent.iter().filter_map(|id| d.get(id).copied()).collect()
        };
        lat.sort_by(f64::total_cmp);
        let missed = sent.len() - lat.len();
        streams.abort_all();
        while streams.join_next().await.is_some() {}

        // Polling one user whose inbox has not changed: 304 against 200.
        let path = "/v1/me/notifications?limit=20";
        let mut etag = None;
        let settle_deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < settle_deadline {
            // The ETag is trusted (304) once the user's last change settled.
            let (_, e, _) = clients::get_once(addr, &tokens[0], path).await?;
            if e.is_some() {
                let (_, counts) =
                    clients::get_loop(addr, &tokens[0], path, e.as_deref(), 1, Duration::from_millis(20)).await?;
                if counts.contains_key(&304) {
                    etag = e;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let secs = Duration::from_secs(if self.args.quick { 1 } else { 5 });
        let conns = self.args.connections;
        let (rate_304, counts_304) = match &etag {
            Some(e) => clients::get_loop(addr, &tokens[0], path, Some(e), conns, secs).await?,
            None => (0.0, HashMap::new()),
        };
        let (rate_200, counts_200) = clients::get_loop(addr, &tokens[0], path, None, conns, secs).await?;
        let fmt_counts = |c: &HashMap<u16, u64>| {
            let mut v: Vec<_> = c.iter().map(|(s, n)| format!("{n}×{s}")).collect();
            v.sort();
            v.join(", ")
        };
        if missed > 0 || opened < expected_open {
            self.lost += missed as u64 + (expected_open - opened);
        }
        let per_conn_kb = (rss_open.saturating_sub(rss_before)) as f64 / opened.max(1) as f64;
        print_table(
            "7. Clients (live streams on one API process, and cheap polling)",
            &[
                (
                    "streams",
                    format!(
                        "{opened} of {expected_open} open (SSE, GET /v1/me/stream) in {open_secs:.1} s; tokens minted in {mint_secs:.1} s"
                    ),
                ),
                (
                    "API resident",
                    format!(
                        "{:.1} MB before, {:.1} MB with every stream open ({per_conn_kb:.1} KB per stream), {:.1} MB after the changes",
                        mb(rss_before),
                        mb(rss_open),
                        mb(rss_peak)
                    ),
                ),
                (
                    "change to client",
                    format!(
                        "{} in-app deliveries to random users: p50 {:.1} ms, p99 {:.1} ms from the worker's status change (updated_at) to the client reading it; {missed} not seen",
                        sent.len(),
                        percentile(&lat, 50.0),
                        percentile(&lat, 99.0)
                    ),
                ),
                (
                    "If-None-Match",
                    format!(
                        "{rate_304:.0} requests/s ({}) on {conns} connections",
                        fmt_counts(&counts_304)
                    ),
                ),
                (
                    "full read",
                    format!(
                        "{rate_200:.0} requests/s ({}), same route and user",
                        fmt_counts(&counts_200)
                    ),
                ),
                (
                    "304 vs 200",
                    if rate_200 > 0.0 {
                        format!("{:.1}×", rate_304 / rate_200)
                    } else {
                        "-".to_owned()
                    },
                ),
            ],
        );
        self.report.insert(
            "clients".into(),
            json!({"streams_open": opened, "streams_wanted": expected_open, "open_secs": open_secs,
                   "api_rss_kb": {"before": rss_before, "open": rss_open, "peak": rss_peak}, "kb_per_stream": per_conn_kb,
                   "changes": sent.len(), "missed": missed, "latency_ms": {"p50": percentile(&lat, 50.0), "p99": percentile(&lat, 99.0)},
                   "poll_304_per_sec": rate_304, "poll_200_per_sec": rate_200,
                   "poll_304_statuses": counts_304, "poll_200_statuses": counts_200}),
        );
        // The footprint scenario reports the API's peak at ingest rates:
        // the streams' process is replaced by a fresh one.
        if let Some(api) = self.api.take() {
            api.stop();
        }
        self.start_api().await?;
        Ok(())
    }

    fn footprint(&mut self) {
        self.sample_memory();
        self.stop_workers();
        let api = self.api.take().map_or(0, HeraldProcess::stop);
        self.peaks.insert(
            cluster::API,
            api.max(self.peaks.get(cluster::API).copied().unwrap_or(0)),
        );
        let q = self.report.get("footprint_queued").cloned().unwrap_or(Value::Null);
        let c = self.report.get("footprint_completed").cloned().unwrap_or(Value::Null);
        let mut rows = Vec::new();
        let mut worst = 0u64;
        let mut mem = serde_json::Map::new();
        for name in std::iter::once(cluster::API).chain(cluster::WORKERS) {
            let kb = self.peaks.get(name).copied().unwrap_or(0);
            worst = worst.max(kb);
            rows.push((name, format!("{:.1} MB peak resident (VmHWM)", mb(kb))));
            mem.insert(name.into(), json!(kb * 1024));
        }
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        if q.is_null() {
            rows.push((
                "Redis and Postgres",
                "not measured (the ingest scenario did not run)".to_owned(),
            ));
            print_table("5. Footprint", &rows);
            self.report.insert("resident_bytes_peak".into(), Value::Object(mem));
            return;
        }
        rows.push((
            "Redis per queued delivery",
            format!(
                "{:.0} bytes (INFO used_memory delta ÷ deliveries); {:.0} bytes (MEMORY USAGE of the queue keys ÷ jobs)",
                f(&q, "redis_bytes_per_queued_delivery"),
                f(&q, "redis_memory_usage_per_queued_delivery")
            ),
        ));
        rows.push((
            "Redis after completion",
            format!("{} bytes in queue keys", c["redis_queue_keys_bytes_left"]),
        ));
        rows.push((
            "Postgres per notification",
            format!(
                "{:.0} bytes queued (notification + 3 deliveries, with indexes); {:.0} bytes completed (+ attempts, inbox item)",
                f(&q, "postgres_bytes_per_notification_queued"),
                f(&c, "postgres_bytes_per_notification_completed")
            ),
        ));
        print_table("5. Footprint", &rows);
        self.report.insert("resident_bytes_peak".into(), Value::Object(mem));
        let per = f(&q, "redis_bytes_per_queued_delivery").max(f(&q, "redis_memory_usage_per_queued_delivery"));
        self.verdict(
            "Redis per queued delivery",
            "≤ 150 bytes",
            format!("{per:.0} bytes"),
            Some(per <= 150.0),
        );
        self.verdict(
            "resident memory",
            "≤ 64 MB per process",
            format!("largest {:.1} MB", mb(worst)),
            Some(worst <= 64 * 1024),
        );
    }

    fn summary(&mut self) {
        println!("\n## Targets");
        for (what, goal, measured, met) in &self.verdicts {
            let mark = match met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None if self.args.quick => "(quick: not judged)",
                None => "-",
            };
            println!("  {what:<26} {goal:<40} {measured:<45} {mark}");
        }
        let v: Vec<Value> = self
            .verdicts
            .iter()
            .map(|(w, g, m, met)| json!({"target": w, "goal": g, "measured": m, "met": met}))
            .collect();
        self.report.insert("targets".into(), Value::Array(v));
        self.report.insert("lost".into(), json!(self.lost));
    }

    async fn cleanup(mut self) -> anyhow::Result<()> {
        self.stop_workers();
        if let Some(api) = self.api.take() {
            api.stop();
        }
        let _ = self.queue.delete_all_keys().await;
        let pattern = format!("*{}:*", self.queue.config().prefix);
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut self.redis)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(&mut self.redis).await;
        }
        self.db.drop_db().await
    }
}

fn pgbench_binary() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin/pgbench"))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop()
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({"cpus": cpus, "cpu_model": model, "memory_gb": mem_kb as f64 / 1_048_576.0,
           "loadavg_at_start": load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")})
}

async fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let m = machine();
    println!(
        "herald-bench{}: {} CPUs ({}), {:.1} GB, load average at start {}",
        if bench.args.quick { " --quick" } else { "" },
        m["cpus"],
        m["cpu_model"].as_str().unwrap_or("?"),
        m["memory_gb"].as_f64().unwrap_or(0.0),
        m["loadavg_at_start"].as_str().unwrap_or("?")
    );
    println!("Herald processes log to {}", bench.log_dir.path().display());
    bench.report.insert("machine".into(), m);
    bench.report.insert("quick".into(), json!(bench.args.quick));
    let on = |s: &str| bench.args.only.iter().any(|o| o == s);
    let (ceiling, ingest, drain, e2e, idle, scaling, clients) = (
        on("ceiling"),
        on("ingest"),
        on("drain"),
        on("e2e"),
        on("idle"),
        on("scaling"),
        on("clients"),
    );
    if drain && !ingest {
        bail!("--only drain needs ingest too: it drains ingest's backlog");
    }
    // Ingest leaves its deliveries queued: a later scenario run on top of
    // them would measure the drain instead (idle notifications wait behind
    // the backlog).
    let drain = drain || (ingest && (e2e || idle || scaling));
    if drain && !on("drain") {
        println!("(drain added: ingest's backlog must be drained before e2e, idle or scaling)");
    }
    if ceiling {
        bench.ceiling().await?;
    }
    if ingest {
        let tps = bench.pgbench().await?;
        bench.start_api().await?;
        bench.ingest(tps).await?;
    } else {
        bench.start_api().await?;
    }
    if drain {
        bench.drain().await?;
    }
    if e2e {
        bench.end_to_end().await?;
    }
    if idle {
        bench.idle().await?;
    }
    if scaling {
        bench.scaling().await?;
    }
    if clients {
        bench.clients().await?;
    }
    bench.footprint();
    bench.summary();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(part) = &args.alone_client {
        // A process of its own, with a runtime built as a worker's is.
        return alone::client_main(part, args.alone.unwrap_or(0));
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench_main(args))
}

async fn bench_main(args: Args) -> anyhow::Result<()> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let json_path = args.json.clone();
    let started = Instant::now();
    let mut bench = Bench::start(args).await?;
    let outcome = run(&mut bench).await;
    let lost = bench.lost;
    let mut report = std::mem::take(&mut bench.report);
    report.insert("elapsed_secs".into(), json!(started.elapsed().as_secs_f64()));
    if outcome.is_err() || lost > 0 || bench.args.keep_logs {
        // Keep the processes' logs for the post-mortem.
        let kept = bench.log_dir.path().to_owned();
        let dir = std::mem::replace(&mut bench.log_dir, tempfile::tempdir()?);
        let _ = dir.keep();
        eprintln!("Herald's process logs kept in {}", kept.display());
    }
    if let Err(e) = bench.cleanup().await {
        eprintln!("warning: clean-up failed: {e:#}");
    }
    if let Some(path) = json_path {
        std::fs::write(&path, serde_json::to_vec_pretty(&Value::Object(report))?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    outcome?;
    println!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    if lost > 0 {
        bail!("{lost} deliveries or requests were lost, unfinished or refused: see the checks above");
    }
    Ok(())
}
