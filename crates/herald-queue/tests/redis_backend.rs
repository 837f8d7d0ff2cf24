//! Black-box tests of Herald's Redis backend for apalis against the real Redis
//! on 127.0.0.1:6379. Each test works under its own random key prefix and
//! deletes its keys at the end, so tests run in parallel on the shared server.
//! Most reproduce one of the apalis-redis 1.0 defects this backend exists to
//! avoid (a fetch that fails on a large backlog, a SIGKILLed worker's jobs
//! not coming back, a worker stopped by `CLIENT KILL`, a panicking handler
//! or a Redis restart, slow idle pick-up) and show it does not happen here.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use apalis::prelude::{BoxDynError, WorkerBuilder, WorkerBuilderExt, WorkerError};
use herald_core::{Channel, DeliveryId, Priority};
use herald_queue::{DeliveryJob, Fetched, QueueClient, QueueConfig, QueueName, RedisBackend, WorkerId, names};
use rand::Rng;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const REDIS_URL: &str = "redis://127.0.0.1:6379";

// ---------------------------------------------------------------- helpers

/// A unique key prefix, deleted when dropped (also when the test panics).
struct TestPrefix {
    cfg: QueueConfig,
}

impl TestPrefix {
    fn new(name: &str) -> Self {
        let random: u32 = rand::rng().random();
        Self {
            cfg: QueueConfig {
                redis_url: REDIS_URL.to_owned(),
                prefix: format!("hqtest-{name}-{random:08x}"),
                ..QueueConfig::default()
            },
        }
    }

    fn client(&self) -> QueueClient {
        QueueClient::new(self.cfg.clone()).expect("valid config")
    }
}

impl Drop for TestPrefix {
    fn drop(&mut self) {
        // Synchronous on purpose: Drop may run while a runtime shuts down.
        let Ok(client) = redis::Client::open(REDIS_URL) else {
            return;
        };
        let Ok(mut conn) = client.get_connection() else {
            return;
        };
        let mut keys: Vec<String> = QueueName::all()
            .iter()
            .flat_map(|q| q.keys(&self.cfg.prefix).all().map(str::to_owned).into_iter())
            .collect();
        keys.push(names::workers_key(&self.cfg.prefix));
        let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query(&mut conn);
    }
}

fn email(p: Priority) -> QueueName {
    QueueName::new(Channel::Email, p)
}

fn new_jobs(n: usize) -> Vec<DeliveryJob> {
    (0..n)
        .map(|i| DeliveryJob::new(DeliveryId::generate(), 1).with_request_id(format!("req-{i}")))
        .collect()
}

fn on(queue: QueueName, jobs: &[DeliveryJob]) -> Vec<(QueueName, DeliveryJob)> {
    jobs.iter().map(|j| (queue, j.clone())).collect()
}

/// An apalis worker on our backend, running in a task.
struct TestWorker {
    id: WorkerId,
    stop: CancellationToken,
    handle: JoinHandle<Result<(), WorkerError>>,
}

impl TestWorker {
    fn start<H, Fut>(cfg: &QueueConfig, queues: Vec<QueueName>, concurrency: usize, handler: H) -> Self
    where
        H: Fn(Fetched) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxDynError>> + Send + 'static,
    {
        let id = WorkerId::generate("test-worker");
        let backend = RedisBackend::new(cfg.clone(), queues, id.clone()).expect("valid backend");
        assert_eq!(backend.worker_id(), &id);
        let worker = WorkerBuilder::new(id.to_string())
            .backend(backend)
            .catch_panic()
            .concurrency(concurrency)
            .build(handler);
        let stop = CancellationToken::new();
        let handle = tokio::spawn(worker.run_until(herald_queue::stop_on(stop.clone())));
        Self { id, stop, handle }
    }

    /// A worker on the email queues whose handler only records each job's
    /// delivery id.
    fn recording(cfg: &QueueConfig, concurrency: usize) -> (Self, Arc<Mutex<HashSet<DeliveryId>>>) {
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let worker = Self::start(cfg, QueueName::for_channel(Channel::Email).to_vec(), concurrency, {
            let seen = seen.clone();
            move |task: Fetched| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().insert(task.job.delivery_id);
                    Ok::<(), BoxDynError>(())
                }
            }
        });
        (worker, seen)
    }

    fn is_running(&self) -> bool {
        !self.handle.is_finished()
    }

    /// Graceful stop; returns how long it took.
    async fn stop(self) -> Duration {
        let started = Instant::now();
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.handle)
            .await
            .expect("the worker stops in time")
            .expect("the worker task did not panic")
            .expect("the worker stopped without error");
        started.elapsed()
    }
}

/// Polls `cond` every 10 ms until it holds or `limit` passes.
async fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_for_counts(
    client: &QueueClient,
    queue: QueueName,
    limit: Duration,
    what: &str,
    cond: impl Fn(&herald_queue::QueueCounts) -> bool,
) -> herald_queue::QueueCounts {
    let deadline = Instant::now() + limit;
    loop {
        let counts = client.counts(queue).await.expect("counts");
        if cond(&counts) {
            return counts;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}; counts {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn empty(c: &herald_queue::QueueCounts) -> bool {
    c.ready == 0 && c.scheduled == 0 && c.in_flight == 0
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_50_000_due_jobs_drains_without_any_worker_stopping() {
    const READY: usize = 50_000;
    // More than Lua's ~8,000 unpack limit: apalis-redis's fetch fails here.
    const DELAYED_DUE: usize = 10_000;
    let prefix = TestPrefix::new("backlog");
    let client = prefix.client();
    let queue = email(Priority::Normal);

    let started = Instant::now();
    client.enqueue(&on(queue, &new_jobs(READY))).await.unwrap();
    let past = SystemTime::now() - Duration::from_secs(1);
    let delayed: Vec<_> = new_jobs(DELAYED_DUE).into_iter().map(|j| (queue, j, past)).collect();
    client.enqueue_at(&delayed).await.unwrap();
    println!("enqueued {} jobs in {:?}", READY + DELAYED_DUE, started.elapsed());

    let seen = Arc::new(Mutex::new(HashSet::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (seen, calls) = (seen.clone(), calls.clone());
        move |task: Fetched| {
            let (seen, calls) = (seen.clone(), calls.clone());
            async move {
                calls.fetch_add(1, Ordering::Relaxed);
                seen.lock().unwrap().insert(task.job.delivery_id);
                Ok::<(), BoxDynError>(())
            }
        }
    };
    let started = Instant::now();
    let workers = [
        TestWorker::start(
            &prefix.cfg,
            QueueName::for_channel(Channel::Email).to_vec(),
            32,
            handler.clone(),
        ),
        TestWorker::start(
            &prefix.cfg,
            QueueName::for_channel(Channel::Email).to_vec(),
            32,
            handler,
        ),
    ];
    let total = READY + DELAYED_DUE;
    wait_until(Duration::from_secs(45), "every job handled", || {
        assert!(workers.iter().all(TestWorker::is_running), "a worker stopped");
        seen.lock().unwrap().len() == total
    })
    .await;
    let elapsed = started.elapsed();
    let counts = wait_for_counts(&client, queue, Duration::from_secs(5), "empty queue", empty).await;
    assert!(workers.iter().all(TestWorker::is_running), "a worker stopped");
    println!(
        "drained {total} jobs with 2 workers in {elapsed:?}: {:.0} jobs/s; handler calls {} (duplicates {}); final counts {counts:?}",
        total as f64 / elapsed.as_secs_f64(),
        calls.load(Ordering::Relaxed),
        calls.load(Ordering::Relaxed) - total,
    );
    assert_eq!(counts.dead, 0);
    for w in workers {
        w.stop().await;
    }
}

const SIGKILL_CHILD_ENV: &str = "HERALD_QUEUE_TEST_SIGKILL_CHILD_PREFIX";
const SIGKILL_CHILD_TEST: &str = "the_child_process_of_the_sigkill_test_holds_jobs_until_killed";
const SIGKILL_LEASE: Duration = Duration::from_secs(2);

/// Not a test: the SIGKILL test re-executes this binary with `--ignored
/// --exact` to run this function as a separate worker process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the worker process the SIGKILL test starts and kills, not a test"]
async fn the_child_process_of_the_sigkill_test_holds_jobs_until_killed() {
    let prefix = std::env::var(SIGKILL_CHILD_ENV).expect("the SIGKILL test names the prefix");
    let cfg = QueueConfig {
        redis_url: REDIS_URL.to_owned(),
        prefix,
        lease: SIGKILL_LEASE,
        ..QueueConfig::default()
    };
    let _worker = TestWorker::start(&cfg, vec![email(Priority::High)], 8, |_task: Fetched| async {
        // Stuck for good: only the SIGKILL ends this.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok::<(), BoxDynError>(())
    });
    tokio::time::sleep(Duration::from_secs(60)).await;
    panic!("the parent test should have killed this process");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_with_sigkill_gets_its_jobs_back_after_the_lease() {
    const JOBS: usize = 20;
    let prefix = TestPrefix::new("sigkill");
    let cfg = QueueConfig {
        lease: SIGKILL_LEASE,
        ..prefix.cfg.clone()
    };
    let client = prefix.client();
    let queue = email(Priority::High);
    let jobs = new_jobs(JOBS);
    client.enqueue(&on(queue, &jobs)).await.unwrap();

    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", SIGKILL_CHILD_TEST, "--nocapture"])
        .env(SIGKILL_CHILD_ENV, &cfg.prefix)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the child worker");
    // The child holds all jobs: 8 running, 12 buffered, all leased.
    wait_for_counts(
        &client,
        queue,
        Duration::from_secs(20),
        "the child to fetch every job",
        |c| c.ready == 0 && c.in_flight == JOBS as u64,
    )
    .await;
    // Long enough for several lease extensions: they must not outlive the child.
    tokio::time::sleep(SIGKILL_LEASE + Duration::from_millis(500)).await;
    assert_eq!(
        client.counts(queue).await.unwrap().in_flight,
        JOBS as u64,
        "leases were extended"
    );

    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let killed_at = Instant::now();
    child.wait().unwrap();

    let back = Arc::new(Mutex::new(HashMap::new()));
    let worker = TestWorker::start(&cfg, vec![queue], 8, {
        let back = back.clone();
        move |task: Fetched| {
            let back = back.clone();
            async move {
                back.lock()
                    .unwrap()
                    .insert(task.job.delivery_id, (killed_at.elapsed(), task.handbacks));
                Ok::<(), BoxDynError>(())
            }
        }
    });
    wait_until(Duration::from_secs(10), "every job back", || {
        back.lock().unwrap().len() == JOBS
    })
    .await;
    let back = back.lock().unwrap().clone();
    let mut times: Vec<Duration> = back.values().map(|(t, _)| *t).collect();
    times.sort();
    println!(
        "after SIGKILL (lease {SIGKILL_LEASE:?}) jobs came back after {:?} (first) to {:?} (last)",
        times[0],
        times[JOBS - 1]
    );
    for job in &jobs {
        let (_, handbacks) = back[&job.delivery_id];
        assert_eq!(handbacks, 1, "a lease expiry counts as a handback");
    }
    assert!(times[JOBS - 1] <= SIGKILL_LEASE + Duration::from_secs(2), "{times:?}");
    wait_for_counts(&client, queue, Duration::from_secs(5), "empty queue", empty).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_of_the_workers_connections_does_not_stop_it() {
    const JOBS: usize = 3_000;
    let prefix = TestPrefix::new("clientkill");
    // A long fallback poll: only a working wake-up explains a fast pickup.
    let cfg = QueueConfig {
        idle_poll: Duration::from_secs(5),
        ..prefix.cfg.clone()
    };
    let client = prefix.client();
    let queue = email(Priority::Normal);
    client.enqueue(&on(queue, &new_jobs(JOBS))).await.unwrap();

    let seen = Arc::new(Mutex::new(HashMap::<DeliveryId, Instant>::new()));
    let worker = TestWorker::start(&cfg, QueueName::for_channel(Channel::Email).to_vec(), 8, {
        let seen = seen.clone();
        move |task: Fetched| {
            let seen = seen.clone();
            async move {
                tokio::time::sleep(Duration::from_micros(200)).await;
                seen.lock().unwrap().insert(task.job.delivery_id, Instant::now());
                Ok::<(), BoxDynError>(())
            }
        }
    });
    wait_until(Duration::from_secs(20), "some jobs handled", || {
        seen.lock().unwrap().len() >= 300
    })
    .await;

    let raw = redis::Client::open(REDIS_URL).unwrap();
    let mut conn = raw.get_multiplexed_async_connection().await.unwrap();
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut conn).await.unwrap();
    let marker = format!("name=herald-worker:{}", worker.id);
    let ids: Vec<String> = list
        .lines()
        .filter(|l| l.split(' ').any(|f| f == marker))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")).map(str::to_owned))
        .collect();
    let pubsub = list
        .lines()
        .filter(|l| l.split(' ').any(|f| f == marker) && l.contains(" sub=1 "))
        .count();
    for id in &ids {
        let _: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let at_kill = seen.lock().unwrap().len();
    println!(
        "killed {} connections of the worker (pub/sub: {pubsub}) after {at_kill} jobs",
        ids.len()
    );
    assert!(
        ids.len() >= 2 && pubsub == 1,
        "the worker's connections are named: {list}"
    );

    wait_until(Duration::from_secs(30), "every job handled after the kill", || {
        assert!(worker.is_running(), "the worker stopped");
        seen.lock().unwrap().len() == JOBS
    })
    .await;
    wait_for_counts(&client, queue, Duration::from_secs(5), "empty queue", empty).await;

    // Wake-ups still arrive: the subscription came back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::new();
    for job in new_jobs(20) {
        let pushed = Instant::now();
        client.enqueue(&[(queue, job.clone())]).await.unwrap();
        wait_until(Duration::from_secs(3), "a pushed job", || {
            seen.lock().unwrap().contains_key(&job.delivery_id)
        })
        .await;
        latencies.push(seen.lock().unwrap()[&job.delivery_id] - pushed);
    }
    latencies.sort();
    println!(
        "after the kill: push to handler p50 {:?}, max {:?} (idle_poll {:?})",
        percentile(&latencies, 0.5),
        latencies[latencies.len() - 1],
        cfg.idle_poll
    );
    assert!(
        latencies[latencies.len() - 1] < Duration::from_millis(500),
        "{latencies:?}"
    );
    assert!(worker.is_running());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_does_not_stop_the_worker() {
    const JOBS: usize = 100;
    let prefix = TestPrefix::new("panic");
    let cfg = QueueConfig {
        max_handbacks: 2,
        idle_poll: Duration::from_millis(200),
        ..prefix.cfg.clone()
    };
    let client = prefix.client();
    let queue = email(Priority::High);
    let jobs = new_jobs(JOBS);
    // Every tenth job panics, every time.
    let doomed: HashSet<DeliveryId> = jobs.iter().step_by(10).map(|j| j.delivery_id).collect();
    client.enqueue(&on(queue, &jobs)).await.unwrap();

    let calls = Arc::new(Mutex::new(HashMap::<DeliveryId, Vec<u32>>::new()));
    let worker = TestWorker::start(&cfg, vec![queue], 4, {
        let (calls, doomed) = (calls.clone(), Arc::new(doomed.clone()));
        move |task: Fetched| {
            let (calls, doomed) = (calls.clone(), doomed.clone());
            async move {
                calls
                    .lock()
                    .unwrap()
                    .entry(task.job.delivery_id)
                    .or_default()
                    .push(task.handbacks);
                if doomed.contains(&task.job.delivery_id) {
                    panic!("deliberate test panic for {}", task.job.delivery_id);
                }
                Ok::<(), BoxDynError>(())
            }
        }
    });
    let counts = wait_for_counts(&client, queue, Duration::from_secs(20), "panicking jobs dead", |c| {
        c.dead == doomed.len() as u64 && empty(c)
    })
    .await;
    assert!(worker.is_running(), "the worker stopped");
    let calls = calls.lock().unwrap().clone();
    for job in &jobs {
        let expected: Vec<u32> = if doomed.contains(&job.delivery_id) {
            vec![0, 1, 2]
        } else {
            vec![0]
        };
        assert_eq!(calls[&job.delivery_id], expected, "{}", job.delivery_id);
    }
    println!(
        "{} panicking jobs ran {} times each and are dead; {} others completed once; counts {counts:?}",
        doomed.len(),
        cfg.max_handbacks + 1,
        JOBS - doomed.len()
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_picks_up_a_push_within_milliseconds() {
    const PUSHES: usize = 50;
    let prefix = TestPrefix::new("idle");
    let cfg = QueueConfig {
        idle_poll: Duration::from_secs(5),
        ..prefix.cfg.clone()
    };
    let client = prefix.client();
    let queue = email(Priority::Low);
    let started = Arc::new(Mutex::new(HashMap::<DeliveryId, Instant>::new()));
    let worker = TestWorker::start(&cfg, QueueName::for_channel(Channel::Email).to_vec(), 4, {
        let started = started.clone();
        move |task: Fetched| {
            let started = started.clone();
            async move {
                started.lock().unwrap().insert(task.job.delivery_id, Instant::now());
                Ok::<(), BoxDynError>(())
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(2_200)).await;

    let mut latencies = Vec::new();
    for job in new_jobs(PUSHES) {
        let pushed = Instant::now();
        client.enqueue(&[(queue, job.clone())]).await.unwrap();
        wait_until(Duration::from_secs(6), "the pushed job", || {
            started.lock().unwrap().contains_key(&job.delivery_id)
        })
        .await;
        latencies.push(started.lock().unwrap()[&job.delivery_id] - pushed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    latencies.sort();
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    println!(
        "idle worker, {PUSHES} single pushes: push to handler start p50 {p50:?}, p99 {p99:?}, max {:?}",
        latencies[PUSHES - 1]
    );
    assert!(p99 < Duration::from_millis(250), "{latencies:?}");
    worker.stop().await;
}

/// An idle worker woken by a push to one of its queues looks at that queue
/// once: one fetch script run (counted with MONITOR, which sees every
/// command the server runs), not a walk through its empty queues nor a
/// second round: those runs would compete with the claim for the CPU at
/// the very moment a delivery's latency is at stake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_woken_for_one_queue_runs_one_fetch() {
    use futures::StreamExt;
    let prefix = TestPrefix::new("onefetch");
    let cfg = QueueConfig {
        idle_poll: Duration::from_secs(30),
        ..prefix.cfg.clone()
    };
    let client = prefix.client();
    let (worker, started) = TestWorker::recording(&cfg, 4);
    // Its first look at every queue, then idle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let monitor = redis::Client::open(REDIS_URL)
        .unwrap()
        .get_async_monitor()
        .await
        .unwrap();
    let scripts = Arc::new(Mutex::new(Vec::<String>::new()));
    let watch = tokio::spawn({
        let (scripts, prefix) = (scripts.clone(), cfg.prefix.clone());
        async move {
            let mut lines = monitor.into_on_message::<String>();
            while let Some(line) = lines.next().await {
                if line.contains("\"EVALSHA\"") && line.contains(&prefix) {
                    scripts.lock().unwrap().push(line);
                }
            }
        }
    });
    for (i, (priority, job)) in [Priority::Low, Priority::High, Priority::Normal]
        .into_iter()
        .zip(new_jobs(3))
        .enumerate()
    {
        client.enqueue(&[(email(priority), job.clone())]).await.unwrap();
        wait_until(Duration::from_secs(5), "the pushed job", || {
            started.lock().unwrap().contains(&job.delivery_id)
        })
        .await;
        // Room for any further rounds to show.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seen = scripts.lock().unwrap().clone();
        assert_eq!(seen.len(), i + 1, "one fetch per push to an idle worker: {seen:#?}");
        let ready = email(priority).keys(&cfg.prefix).ready.clone();
        assert!(seen[i].contains(&ready), "it fetched {ready}: {}", seen[i]);
    }
    watch.abort();
    worker.stop().await;
}

/// Jobs also become ready without a wake-up (another worker's handbacks
/// and returns): however often wake-ups name only other queues, an idle
/// worker still looks at every queue once per idle poll. Here a job appears
/// on the low queue with no wake-up (moved in from another prefix's queue)
/// while a high job is pushed every 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_ready_without_a_wake_up_is_found_within_the_idle_poll() {
    let prefix = TestPrefix::new("nowake");
    let elsewhere = TestPrefix::new("nowake-src");
    let cfg = QueueConfig {
        idle_poll: Duration::from_millis(300),
        ..prefix.cfg.clone()
    };
    let client = prefix.client();
    let (worker, seen) = TestWorker::recording(&cfg, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pushing = tokio::spawn({
        let client = client.clone();
        async move {
            for job in new_jobs(40) {
                client.enqueue(&[(email(Priority::High), job)]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let quiet = new_jobs(1).remove(0);
    elsewhere
        .client()
        .enqueue(&[(email(Priority::Low), quiet.clone())])
        .await
        .unwrap();
    let mut conn = redis::Client::open(REDIS_URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let moved: Option<String> = redis::cmd("LMOVE")
        .arg(&email(Priority::Low).keys(&elsewhere.cfg.prefix).ready)
        .arg(&email(Priority::Low).keys(&cfg.prefix).ready)
        .arg("RIGHT")
        .arg("LEFT")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(moved.is_some(), "the job was moved in");
    let appeared = Instant::now();
    wait_until(
        Duration::from_millis(1_500),
        "the job that came without a wake-up",
        || seen.lock().unwrap().contains(&quiet.delivery_id),
    )
    .await;
    println!("found after {:?} (idle poll 300 ms)", appeared.elapsed());
    assert!(!pushing.is_finished(), "found while wake-ups for high still came");
    pushing.abort();
    worker.stop().await;
}

/// The wake-up names the priorities that got jobs, so an idle worker
/// fetches those queues first instead of walking through empty ones.
#[tokio::test]
async fn a_wake_up_names_the_priorities_that_got_jobs_per_channel() {
    use futures::StreamExt;
    let prefix = TestPrefix::new("wakenames");
    let client = prefix.client();
    let raw = redis::Client::open(REDIS_URL).unwrap();
    let mut pubsub = raw.get_async_pubsub().await.unwrap();
    let email_channel = names::wake_channel(&prefix.cfg.prefix, Channel::Email);
    let push_channel = names::wake_channel(&prefix.cfg.prefix, Channel::Push);
    pubsub.subscribe(&email_channel).await.unwrap();
    pubsub.subscribe(&push_channel).await.unwrap();
    let jobs = new_jobs(4);
    let push_normal = QueueName::new(Channel::Push, Priority::Normal);
    client
        .enqueue(&[
            (email(Priority::Low), jobs[0].clone()),
            (email(Priority::High), jobs[1].clone()),
            (push_normal, jobs[2].clone()),
            (email(Priority::Low), jobs[3].clone()),
        ])
        .await
        .unwrap();
    let mut messages = pubsub.on_message();
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .expect("a wake-up per channel")
            .unwrap();
        got.push((m.get_channel_name().to_owned(), m.get_payload::<String>().unwrap()));
    }
    got.sort();
    assert_eq!(
        got,
        [
            (email_channel, "high,low".to_owned()),
            (push_channel, "normal".to_owned())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_jobs_are_handed_out_when_due_and_not_before() {
    let prefix = TestPrefix::new("delayed");
    let client = prefix.client();
    let queue = email(Priority::Normal);
    let handled = Arc::new(Mutex::new(HashMap::<DeliveryId, SystemTime>::new()));
    let worker = TestWorker::start(&prefix.cfg, QueueName::for_channel(Channel::Email).to_vec(), 4, {
        let handled = handled.clone();
        move |task: Fetched| {
            let handled = handled.clone();
            async move {
                handled.lock().unwrap().insert(task.job.delivery_id, SystemTime::now());
                Ok::<(), BoxDynError>(())
            }
        }
    });
    let now = SystemTime::now();
    let mut due = HashMap::new();
    let mut scheduled = Vec::new();
    for (i, job) in new_jobs(13).into_iter().enumerate() {
        let delay = match i {
            0..5 => Duration::from_millis(700),
            5..10 => Duration::from_millis(1_500),
            _ => Duration::from_secs(120),
        };
        due.insert(job.delivery_id, now + delay);
        scheduled.push((queue, job, now + delay));
    }
    client.enqueue_at(&scheduled).await.unwrap();
    assert_eq!(client.counts(queue).await.unwrap().scheduled, 13);

    wait_until(Duration::from_secs(5), "the ten due jobs", || {
        handled.lock().unwrap().len() >= 10
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let handled = handled.lock().unwrap().clone();
    assert_eq!(handled.len(), 10, "the far-future jobs were not handed out");
    let mut lateness = Vec::new();
    for (id, at) in &handled {
        let due = due[id];
        // ms resolution on both sides.
        assert!(
            *at + Duration::from_millis(2) >= due,
            "{id} handed out before it was due"
        );
        lateness.push(at.duration_since(due).unwrap_or_default());
    }
    lateness.sort();
    println!(
        "delayed jobs handed out after their due time by {:?} (min) to {:?} (max); idle_poll {:?}",
        lateness[0],
        lateness[lateness.len() - 1],
        prefix.cfg.idle_poll
    );
    assert!(
        lateness[lateness.len() - 1] < Duration::from_millis(500),
        "{lateness:?}"
    );
    let counts = client.counts(queue).await.unwrap();
    assert_eq!(
        (counts.scheduled, counts.ready, counts.in_flight),
        (3, 0, 0),
        "{counts:?}"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priorities_go_first_but_low_priority_is_never_starved() {
    const EACH: usize = 200;
    let prefix = TestPrefix::new("priority");
    let cfg = QueueConfig {
        fetch_batch: 10,
        ..prefix.cfg.clone()
    };
    let client = prefix.client();
    for p in [Priority::Low, Priority::Normal, Priority::High] {
        client.enqueue(&on(email(p), &new_jobs(EACH))).await.unwrap();
    }
    let order = Arc::new(Mutex::new(Vec::new()));
    let worker = TestWorker::start(&cfg, QueueName::for_channel(Channel::Email).to_vec(), 1, {
        let order = order.clone();
        move |task: Fetched| {
            let order = order.clone();
            async move {
                order.lock().unwrap().push(task.queue.priority);
                Ok::<(), BoxDynError>(())
            }
        }
    });
    wait_until(Duration::from_secs(20), "every job", || {
        order.lock().unwrap().len() == 3 * EACH
    })
    .await;
    let order = order.lock().unwrap().clone();
    let first: Vec<Priority> = order[..100].to_vec();
    let count = |p| first.iter().filter(|&&x| x == p).count();
    let (high, normal, low) = (count(Priority::High), count(Priority::Normal), count(Priority::Low));
    let last = |p| order.iter().rposition(|&x| x == p).unwrap();
    println!(
        "first 100 handled: high {high}, normal {normal}, low {low}; last high at #{}, last normal at #{}, last low at #{}",
        last(Priority::High),
        last(Priority::Normal),
        last(Priority::Low)
    );
    assert!(high > normal && normal > low, "{high} {normal} {low}");
    assert!(low >= 5, "low priority is starved: {low} of the first 100");
    assert!(last(Priority::High) < last(Priority::Low));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gracefully_stopped_worker_hands_back_buffered_jobs_and_a_new_one_starts_at_once() {
    const JOBS: usize = 50;
    let prefix = TestPrefix::new("graceful");
    let cfg = QueueConfig {
        fetch_batch: 20,
        ..prefix.cfg.clone()
    };
    let client = prefix.client();
    let queue = email(Priority::Normal);
    let jobs = new_jobs(JOBS);
    client.enqueue(&on(queue, &jobs)).await.unwrap();

    let done = Arc::new(Mutex::new(Vec::new()));
    let started = Arc::new(AtomicUsize::new(0));
    let first = TestWorker::start(&cfg, vec![queue], 2, {
        let (done, started) = (done.clone(), started.clone());
        move |task: Fetched| {
            let (done, started) = (done.clone(), started.clone());
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                done.lock().unwrap().push(task.job.delivery_id);
                Ok::<(), BoxDynError>(())
            }
        }
    });
    wait_until(Duration::from_secs(5), "two jobs started", || {
        started.load(Ordering::SeqCst) >= 2
    })
    .await;
    let first_id = first.id.clone();
    assert!(
        client
            .workers()
            .await
            .unwrap()
            .iter()
            .any(|(id, _)| id == first_id.as_str())
    );
    let took = first.stop().await;
    let finished = done.lock().unwrap().len();
    assert_eq!(
        finished,
        started.load(Ordering::SeqCst),
        "running jobs finish before the stop"
    );
    let counts = client.counts(queue).await.unwrap();
    println!("graceful stop took {took:?}; {finished} jobs finished; then counts {counts:?}");
    assert_eq!(counts.in_flight, 0, "buffered jobs were handed back");
    assert_eq!(counts.ready, (JOBS - finished) as u64);
    assert!(
        !client
            .workers()
            .await
            .unwrap()
            .iter()
            .any(|(id, _)| id == first_id.as_str()),
        "the stopped worker deregistered"
    );

    let restart = Instant::now();
    let first_pickup = Arc::new(Mutex::new(None));
    let second = TestWorker::start(&cfg, vec![queue], 8, {
        let (done, first_pickup) = (done.clone(), first_pickup.clone());
        move |task: Fetched| {
            let (done, first_pickup) = (done.clone(), first_pickup.clone());
            async move {
                first_pickup.lock().unwrap().get_or_insert(restart.elapsed());
                assert_eq!(task.handbacks, 0, "an unstarted job is not counted as handed back");
                done.lock().unwrap().push(task.job.delivery_id);
                Ok::<(), BoxDynError>(())
            }
        }
    });
    assert_ne!(second.id, first_id);
    wait_until(Duration::from_secs(5), "all jobs", || {
        done.lock().unwrap().len() >= JOBS
    })
    .await;
    let pickup = first_pickup.lock().unwrap().unwrap();
    println!(
        "a new worker picked up its first handed-back job {pickup:?} after starting; all {JOBS} done after {:?}",
        restart.elapsed()
    );
    assert!(pickup < Duration::from_millis(500), "{pickup:?}");
    let done: HashSet<DeliveryId> = done.lock().unwrap().iter().copied().collect();
    assert_eq!(done.len(), JOBS, "nothing lost");
    wait_for_counts(&client, queue, Duration::from_secs(5), "empty queue", empty).await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_report_ready_scheduled_in_flight_dead_and_oldest_age() {
    let prefix = TestPrefix::new("counts");
    let client = prefix.client();

    // A queue nobody serves: ready, scheduled, oldest age.
    let idle_queue = email(Priority::Low);
    assert_eq!(
        client.counts(idle_queue).await.unwrap(),
        herald_queue::QueueCounts::default()
    );
    client.enqueue(&on(idle_queue, &new_jobs(5))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    client.enqueue(&on(idle_queue, &new_jobs(2))).await.unwrap();
    let later = SystemTime::now() + Duration::from_secs(60);
    let delayed: Vec<_> = new_jobs(3).into_iter().map(|j| (idle_queue, j, later)).collect();
    client.enqueue_at(&delayed).await.unwrap();
    let c = client.counts(idle_queue).await.unwrap();
    println!("unserved queue: {c:?}");
    assert_eq!((c.ready, c.scheduled, c.in_flight, c.dead), (7, 3, 0, 0));
    let age = c.oldest_ready_age_ms.unwrap();
    assert!((120..5_000).contains(&age), "oldest age {age} ms");

    // A served queue: in flight while handlers run; an unparseable member
    // goes to the dead set instead of stopping anything.
    let queue = email(Priority::High);
    let raw = redis::Client::open(REDIS_URL).unwrap();
    let mut conn = raw.get_multiplexed_async_connection().await.unwrap();
    let ready_key = queue.keys(&prefix.cfg.prefix).ready;
    let _: () = redis::cmd("LPUSH")
        .arg(&ready_key)
        .arg("not a job")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("LPUSH")
        .arg(&ready_key)
        .arg("2|dlv_future_version|1|0|0|")
        .query_async(&mut conn)
        .await
        .unwrap();
    client.enqueue(&on(queue, &new_jobs(3))).await.unwrap();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let worker = TestWorker::start(&prefix.cfg, vec![queue], 8, {
        let release = release.clone();
        move |_task: Fetched| {
            let release = release.clone();
            async move {
                release.acquire().await.unwrap().forget();
                Ok::<(), BoxDynError>(())
            }
        }
    });
    let c = wait_for_counts(&client, queue, Duration::from_secs(5), "3 in flight, 2 dead", |c| {
        c.in_flight == 3 && c.dead == 2
    })
    .await;
    println!("served queue with 3 running handlers and 2 malformed members: {c:?}");
    assert_eq!((c.ready, c.scheduled, c.oldest_ready_age_ms), (0, 0, None));
    release.add_permits(3);
    let c = wait_for_counts(&client, queue, Duration::from_secs(5), "nothing in flight", |c| {
        c.in_flight == 0
    })
    .await;
    assert_eq!(c.dead, 2);
    assert!(worker.is_running());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_is_retried_then_dead_lettered_after_max_handbacks() {
    let prefix = TestPrefix::new("retry");
    let cfg = QueueConfig {
        max_handbacks: 3,
        ..prefix.cfg.clone()
    };
    let client = prefix.client();
    let queue = email(Priority::Normal);
    let jobs = new_jobs(3);
    let (always_fails, fails_once, succeeds) = (jobs[0].delivery_id, jobs[1].delivery_id, jobs[2].delivery_id);
    client.enqueue(&on(queue, &jobs)).await.unwrap();

    let calls = Arc::new(Mutex::new(HashMap::<DeliveryId, Vec<(u32, Instant)>>::new()));
    let cured = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = TestWorker::start(&cfg, vec![queue], 4, {
        let (calls, cured) = (calls.clone(), cured.clone());
        move |task: Fetched| {
            let (calls, cured) = (calls.clone(), cured.clone());
            async move {
                let id = task.job.delivery_id;
                calls
                    .lock()
                    .unwrap()
                    .entry(id)
                    .or_default()
                    .push((task.handbacks, Instant::now()));
                let fail =
                    (id == always_fails && !cured.load(Ordering::SeqCst)) || (id == fails_once && task.handbacks == 0);
                if fail {
                    return Err::<(), BoxDynError>(format!("deliberate failure of {id}").into());
                }
                Ok(())
            }
        }
    });
    let c = wait_for_counts(&client, queue, Duration::from_secs(15), "the failing job dead", |c| {
        c.dead == 1 && empty(c)
    })
    .await;
    let calls_now = calls.lock().unwrap().clone();
    let attempts = &calls_now[&always_fails];
    let handbacks: Vec<u32> = attempts.iter().map(|(h, _)| *h).collect();
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1].1 - w[0].1).collect();
    println!("always-failing job: handbacks seen {handbacks:?}, gaps between runs {gaps:?}; then dead; counts {c:?}");
    assert_eq!(handbacks, vec![0, 1, 2, 3]);
    assert!(gaps.windows(2).all(|w| w[1] > w[0]), "delays grow: {gaps:?}");
    assert_eq!(
        calls_now[&fails_once].iter().map(|(h, _)| *h).collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert_eq!(calls_now[&succeeds].len(), 1);

    // An operator requeues the dead job; it runs again with a fresh count.
    cured.store(true, Ordering::SeqCst);
    assert_eq!(client.requeue_dead(queue, 10).await.unwrap(), 1);
    wait_until(Duration::from_secs(5), "the requeued job", || {
        calls.lock().unwrap()[&always_fails].len() == 5
    })
    .await;
    assert_eq!(calls.lock().unwrap()[&always_fails][4].0, 0);
    let c = wait_for_counts(&client, queue, Duration::from_secs(5), "all done", |c| {
        empty(c) && c.dead == 0
    })
    .await;
    println!("after requeue_dead: {c:?}");
    worker.stop().await;
}

#[tokio::test]
async fn a_client_for_an_unreachable_redis_is_created_at_once_and_reports_errors() {
    let cfg = QueueConfig {
        // Nothing listens on port 1.
        redis_url: "redis://127.0.0.1:1".to_owned(),
        prefix: "hqtest-unreachable".to_owned(),
        ..QueueConfig::default()
    };
    let started = Instant::now();
    let client = QueueClient::new(cfg.clone()).expect("construction does not connect");
    let backend = RedisBackend::new(cfg, vec![email(Priority::High)], WorkerId::generate("t"));
    assert!(backend.is_ok());
    let err = client
        .enqueue(&on(email(Priority::High), &new_jobs(1)))
        .await
        .unwrap_err();
    println!("enqueue with Redis down failed after {:?}: {err}", started.elapsed());
    assert!(err.to_string().contains("enqueue"), "{err}");
    assert!(client.ping().await.is_err());
    assert!(
        QueueClient::new(QueueConfig {
            redis_url: "nonsense://".into(),
            ..QueueConfig::default()
        })
        .is_err()
    );
}

#[tokio::test]
async fn durability_warnings_flag_a_redis_without_persistence() {
    let prefix = TestPrefix::new("durability");
    let warnings = prefix.client().durability_warnings().await.unwrap();
    println!("durability warnings for the test Redis: {warnings:#?}");
    // The CI Redis runs with --save "" --appendonly no.
    assert!(warnings.iter().any(|w| w.contains("no persistence")), "{warnings:?}");
}

/// A private `redis-server` on its own port, so this test can stop and
/// restart it without disturbing the tests sharing the main server.
struct PrivateRedis {
    port: u16,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    fn new() -> Self {
        Self {
            port: rand::rng().random_range(20_000..40_000),
            child: None,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn start(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir", "/tmp"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_redis_survives_a_redis_restart() {
    const JOBS: usize = 100;
    let mut redis = PrivateRedis::new();
    let cfg = QueueConfig {
        redis_url: redis.url(),
        prefix: "hqtest-restart".to_owned(),
        // A long fallback poll: pickups after the restart must come from the
        // re-subscribed wake-up, not from polling.
        idle_poll: Duration::from_secs(5),
        ..QueueConfig::default()
    };
    let client = QueueClient::new(cfg.clone()).unwrap();
    let queue = email(Priority::High);
    // Redis is not running yet: the worker must wait for it, not exit.
    let (worker, seen) = TestWorker::recording(&cfg, 8);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(worker.is_running());
    redis.start().await;
    let started = Instant::now();
    client.enqueue(&on(queue, &new_jobs(JOBS))).await.unwrap();
    wait_until(Duration::from_secs(10), "jobs after Redis came up", || {
        seen.lock().unwrap().len() == JOBS
    })
    .await;
    println!(
        "Redis came up after the worker: {JOBS} jobs handled {:?} after the push",
        started.elapsed()
    );

    redis.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(client.enqueue(&on(queue, &new_jobs(1))).await.is_err(), "Redis is down");
    assert!(worker.is_running());
    redis.start().await;
    let restarted = Instant::now();
    client.enqueue(&on(queue, &new_jobs(JOBS))).await.unwrap();
    wait_until(Duration::from_secs(10), "jobs after the restart", || {
        assert!(worker.is_running(), "the worker stopped");
        seen.lock().unwrap().len() == 2 * JOBS
    })
    .await;
    println!(
        "after a Redis restart: {JOBS} new jobs handled {:?} after the push",
        restarted.elapsed()
    );
    assert!(
        restarted.elapsed() < Duration::from_secs(4),
        "picked up before the fallback poll"
    );
    worker.stop().await;
}
