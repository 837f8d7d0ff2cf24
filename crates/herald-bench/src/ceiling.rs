//! The database's own ceiling for Herald's work: the very statements the
//! API and the workers run (`herald_db`'s functions, through pools set up as
//! theirs are), issued straight from this process in full batches, with
//! nothing else on the machine busy: no HTTP, no Redis, no sinks, no Herald
//! process doing anything. Herald runs the same statements and does more
//! besides on the same cores, so it cannot go faster than this; a target
//! above the ceiling is out of reach without writing less per notification.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use herald_core::{Channel, DeliveryId, NotificationId};
use herald_db::deliveries::{AttemptResult, NextState, claim_deliveries, deliver_in_app, record_attempts};
use herald_db::notifications::{NewDelivery, NewNotification, NewNotificationWithDeliveries, insert_notifications};
use sqlx::PgPool;

use crate::cpu;

/// How the work is batched: rows per statement, statements at once.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub batch: usize,
    pub in_flight: usize,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} per statement, {} at once", self.batch, self.in_flight)
    }
}

pub struct Outcome {
    pub rate: f64,
    pub cpu: Vec<(&'static str, f64)>,
}

/// The API's writes for `n` notifications of three channels each: the
/// batched insert (what a 202 waits for), then the confirmation of its push
/// intent, which the API writes off the request path, merged across the
/// batches of one `CONFIRM_LINGER`; the clock stops with the last insert.
pub async fn ingest(url: &str, users: &[String], n: u64, shape: Shape) -> anyhow::Result<Outcome> {
    let pool = herald_db::connect_lazy_planned_once(url, shape.in_flight as u32 + 1)?;
    herald_db::ping(&pool).await?;
    let left = Arc::new(AtomicU64::new(n));
    let users: Arc<[String]> = users.into();
    let intents: Arc<Mutex<Vec<i64>>> = Arc::default();
    let inserting = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let cpu0 = cpu::snapshot();
    let started = Instant::now();
    let confirmer = {
        let (pool, intents, inserting) = (pool.clone(), intents.clone(), inserting.clone());
        tokio::spawn(async move {
            // One connection for the whole run, as Herald keeps its own
            // (`herald_db::held`): no ping after every statement.
            let mut conn = pool.acquire().await?;
            loop {
                let done = !inserting.load(Ordering::SeqCst);
                if !done {
                    tokio::time::sleep(herald_db::notifications::CONFIRM_LINGER).await;
                }
                let batch = std::mem::take(&mut *intents.lock().expect("intents"));
                herald_db::notifications::confirm_pushes(&mut *conn, &batch).await?;
                if done {
                    return anyhow::Ok(());
                }
            }
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..shape.in_flight {
        let (pool, left, users, intents) = (pool.clone(), left.clone(), users.clone(), intents.clone());
        tasks.spawn(async move {
            let mut conn = pool.acquire().await?;
            loop {
                let batch = shape.batch as u64;
                let take = left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
                        (l > 0).then(|| l - l.min(batch))
                    })
                    .map_or(0, |before| before.min(batch));
                if take == 0 {
                    break;
                }
                let items: Vec<NewNotificationWithDeliveries> = (0..take)
                    .map(|i| notification(&users[i as usize % users.len()]))
                    .collect();
                let inserted = insert_notifications(&mut *conn, &items).await?;
                intents.lock().expect("intents").extend(inserted.push_intent);
            }
            anyhow::Ok(())
        });
    }
    while let Some(t) = tasks.join_next().await {
        t??;
    }
    // The clock stops with the last insert: the last linger is idle time,
    // and the last confirmation one small statement.
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu::usage(&cpu0, &cpu::snapshot());
    inserting.store(false, Ordering::SeqCst);
    confirmer.await??;
    let (queued, unconfirmed): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM deliveries WHERE status = 'queued' AND enqueued_at IS NOT NULL),
                (SELECT count(*) FROM push_intents)",
    )
    .fetch_one(&pool)
    .await?;
    if queued != 3 * n as i64 || unconfirmed != 0 {
        bail!(
            "the ingest ceiling wrote {queued} marked deliveries for {n} notifications, {unconfirmed} batches unconfirmed"
        );
    }
    pool.close().await;
    Ok(Outcome {
        rate: n as f64 / elapsed,
        cpu,
    })
}

fn notification(user: &str) -> NewNotificationWithDeliveries {
    let ntf_id = NotificationId::generate();
    NewNotificationWithDeliveries {
        notification: NewNotification {
            id: ntf_id.to_string(),
            api_key_id: None,
            user_id: user.to_owned(),
            category: "bench".to_owned(),
            priority: "normal",
            title: "Your order shipped".to_owned(),
            body: "Order 1234 is on its way.".to_owned(),
            data: serde_json::json!({"order_id": "1234"}),
            request_id: Some("bench".to_owned()),
        },
        deliveries: [Channel::Email, Channel::Push, Channel::InApp]
            .into_iter()
            .map(|channel| NewDelivery {
                id: DeliveryId::of(ntf_id, channel).to_string(),
                channel: channel.as_str(),
                max_attempts: 8,
                requested: true,
            })
            .collect(),
    }
}

/// The workers' writes for every delivery in the table (seeded `queued`):
/// email and push claim a batch, then record it sent, with claims and
/// results each `in_flight` at once as a worker runs them; in-app writes
/// its batches whole in one statement. The clock stops when every delivery
/// is final.
pub async fn drain(url: &str, shape: Shape) -> anyhow::Result<(u64, Outcome)> {
    // Three workers' pools, as each worker process has its own: claims,
    // results and in-app on connections that plan once (the other pool
    // only lists the backlog and counts what is left).
    let mut tasks = tokio::task::JoinSet::new();
    let mut total = 0u64;
    let mut prepared = Vec::new();
    for channel in ["email", "push", "in_app"] {
        let pool = herald_db::connect_lazy_planned_per_call(url, 2 * shape.in_flight as u32)?;
        let planned_once = herald_db::connect_lazy_planned_once(url, 2 * shape.in_flight as u32)?;
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT id FROM deliveries WHERE channel = $1 AND status = 'queued' ORDER BY id")
                .bind(channel)
                .fetch_all(&pool)
                .await
                .context("listing the seeded backlog")?;
        total += ids.len() as u64;
        let chunks: VecDeque<Vec<(String, i32)>> = ids
            .chunks(shape.batch)
            .map(|c| c.iter().map(|id| (id.clone(), 0)).collect())
            .collect();
        prepared.push((channel, pool, planned_once, Arc::new(Mutex::new(chunks))));
    }
    let cpu0 = cpu::snapshot();
    let started = Instant::now();
    for (channel, _, planned_once, chunks) in &prepared {
        // A claim and a result statement each `in_flight` at once: twice as
        // many loops, each alternating between the two.
        let loops = if *channel == "in_app" {
            shape.in_flight
        } else {
            2 * shape.in_flight
        };
        for _ in 0..loops {
            let (planned_once, chunks, channel) = (planned_once.clone(), chunks.clone(), *channel);
            tasks.spawn(async move {
                let mut conn = planned_once.acquire().await?;
                loop {
                    let Some(jobs) = chunks.lock().unwrap_or_else(|e| e.into_inner()).pop_front() else {
                        break;
                    };
                    if channel == "in_app" {
                        deliver_in_app(&mut conn, &jobs, "ceiling").await?;
                        continue;
                    }
                    let claimed = claim_deliveries(&mut conn, &jobs, 60.0, "ceiling").await?;
                    let results: Vec<AttemptResult> = claimed
                        .into_iter()
                        .flatten()
                        .map(|d| AttemptResult {
                            delivery_id: d.id.to_string(),
                            attempt: d.attempt,
                            next: NextState::Sent,
                            outcome: "sent",
                            provider_status: Some(250),
                            error: None,
                            detail: None,
                        })
                        .collect();
                    record_attempts(&mut *conn, &results).await?;
                }
                anyhow::Ok(())
            });
        }
    }
    while let Some(t) = tasks.join_next().await {
        t??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu::usage(&cpu0, &cpu::snapshot());
    let pool: &PgPool = &prepared[0].1;
    let unfinished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE status NOT IN ('sent', 'delivered')")
            .fetch_one(pool)
            .await?;
    if unfinished != 0 {
        bail!("the drain ceiling left {unfinished} of {total} deliveries unfinished");
    }
    for (_, pool, planned_once, _) in prepared {
        pool.close().await;
        planned_once.close().await;
    }
    Ok((
        total,
        Outcome {
            rate: total as f64 / elapsed,
            cpu,
        },
    ))
}
