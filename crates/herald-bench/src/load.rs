//! The HTTP load generator: keep-alive HTTP/1.1 connections (one task
//! each, hyper's client connection directly, so the generator costs little
//! CPU next to the API it measures), closed-loop for ingest, paced for the
//! end-to-end run. Every loop is bounded by a count and a deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::Mutex;

/// Where and how to POST notifications.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub authorization: String,
    /// Request bodies, used round robin.
    pub bodies: Arc<Vec<Bytes>>,
}

/// One accepted notification: its id and when its POST was sent.
pub struct Sent {
    pub notification_id: String,
    pub at: SystemTime,
}

#[derive(Default)]
pub struct LoadResult {
    pub accepted: u64,
    pub errors: u64,
    /// The first few error descriptions, to show what went wrong.
    pub error_samples: Vec<String>,
    /// Per request, in microseconds.
    pub latencies_us: Vec<u32>,
    pub elapsed: Duration,
    pub sent: Vec<Sent>,
}

impl LoadResult {
    fn merge(&mut self, other: Self) {
        self.accepted += other.accepted;
        self.errors += other.errors;
        if self.error_samples.len() < 5 {
            self.error_samples.extend(other.error_samples.into_iter().take(5));
        }
        self.latencies_us.extend(other.latencies_us);
        self.sent.extend(other.sent);
    }
}

pub async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the API at {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake with the API")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// POSTs one notification; the status and the response body.
pub async fn post(sender: &mut SendRequest<Full<Bytes>>, target: &Target, body: Bytes) -> anyhow::Result<(u16, Bytes)> {
    sender.ready().await.context("connection closed")?;
    let req = hyper::Request::post("/v1/notifications")
        .header("host", "herald")
        .header("authorization", &target.authorization)
        .header("content-type", "application/json")
        .body(Full::new(body))?;
    let res = sender.send_request(req).await.context("sending the request")?;
    let status = res.status().as_u16();
    let body = res
        .into_body()
        .collect()
        .await
        .context("reading the answer")?
        .to_bytes();
    Ok((status, body))
}

/// `"id":"ntf_…"` of a 202 answer (the notification's id comes first).
pub fn notification_id(body: &[u8]) -> Option<String> {
    const NEEDLE: &[u8] = b"\"id\":\"ntf_";
    let at = memchr::memmem::find(body, NEEDLE)? + NEEDLE.len() - 4;
    let end = memchr::memchr(b'"', &body[at..])? + at;
    String::from_utf8(body[at..end].to_vec()).ok()
}

/// Closed loop: `connections` tasks POST back to back until `n` requests
/// were made or `limit` passed.
pub async fn closed_loop(target: &Target, n: u64, connections: usize, limit: Duration) -> anyhow::Result<LoadResult> {
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + limit;
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections {
        senders.push(connect(target.addr).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut sender in senders {
        let (target, next) = (target.clone(), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            let mut r = LoadResult::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || Instant::now() > deadline {
                    break;
                }
                let body = target.bodies[usize::try_from(i).unwrap_or(0) % target.bodies.len()].clone();
                let t = Instant::now();
                match post(&mut sender, &target, body).await {
                    Ok((202, _)) => r.accepted += 1,
                    Ok((status, body)) => {
                        r.errors += 1;
                        if r.error_samples.len() < 3 {
                            r.error_samples
                                .push(format!("{status}: {}", String::from_utf8_lossy(&body)));
                        }
                    }
                    Err(e) => {
                        r.errors += 1;
                        if r.error_samples.len() < 3 {
                            r.error_samples.push(format!("{e:#}"));
                        }
                        match connect(target.addr).await {
                            Ok(s) => sender = s,
                            Err(_) => break,
                        }
                    }
                }
                r.latencies_us
                    .push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
            r
        }));
    }
    let mut total = LoadResult::default();
    for t in tasks {
        total.merge(t.await.context("a load task panicked")?);
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

/// Open loop: requests are released at `rate` per second for `duration`
/// and taken by whichever of the `connections` is free. `behind` counts
/// how far the generator fell behind its schedule (requests waiting for a
/// free connection at the end).
pub async fn paced(
    target: &Target,
    rate: u64,
    duration: Duration,
    connections: usize,
) -> anyhow::Result<(LoadResult, u64)> {
    let total = rate.saturating_mul(duration.as_millis() as u64) / 1000;
    let released = Arc::new(AtomicU64::new(0));
    let taken = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Mutex::new(()));
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections {
        senders.push(connect(target.addr).await?);
    }
    let started = Instant::now();
    // The pacer: releases requests as time passes (1 ms resolution).
    let pacer = {
        let released = Arc::clone(&released);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let due = (started.elapsed().as_micros() as u64).saturating_mul(rate) / 1_000_000;
                released.store(due.min(total), Ordering::Release);
                if due >= total {
                    break;
                }
            }
        })
    };
    let hard_deadline = started + duration + Duration::from_secs(30);
    let mut tasks = Vec::new();
    for mut sender in senders {
        let (target, released, taken, gate) = (
            target.clone(),
            Arc::clone(&released),
            Arc::clone(&taken),
            Arc::clone(&gate),
        );
        tasks.push(tokio::spawn(async move {
            let mut r = LoadResult::default();
            loop {
                // Take the next released request, or wait for one.
                let i = {
                    let _g = gate.lock().await;
                    let i = taken.load(Ordering::Relaxed) as u64;
                    if i >= total || Instant::now() > hard_deadline {
                        break;
                    }
                    if i < released.load(Ordering::Acquire) {
                        taken.fetch_add(1, Ordering::Relaxed);
                        Some(i)
                    } else {
                        None
                    }
                };
                let Some(i) = i else {
                    tokio::time::sleep(Duration::from_micros(500)).await;
                    continue;
                };
                let body = target.bodies[usize::try_from(i).unwrap_or(0) % target.bodies.len()].clone();
                let (t, at) = (Instant::now(), SystemTime::now());
                match post(&mut sender, &target, body).await {
                    Ok((202, body)) => {
                        r.accepted += 1;
                        if let Some(id) = notification_id(&body) {
                            r.sent.push(Sent {
                                notification_id: id,
                                at,
                            });
                        }
                    }
                    Ok((status, body)) => {
                        r.errors += 1;
                        if r.error_samples.len() < 3 {
                            r.error_samples
                                .push(format!("{status}: {}", String::from_utf8_lossy(&body)));
                        }
                    }
                    Err(e) => {
                        r.errors += 1;
                        if r.error_samples.len() < 3 {
                            r.error_samples.push(format!("{e:#}"));
                        }
                        match connect(target.addr).await {
                            Ok(s) => sender = s,
                            Err(_) => break,
                        }
                    }
                }
                r.latencies_us
                    .push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
            r
        }));
    }
    let mut result = LoadResult::default();
    for t in tasks {
        result.merge(t.await.context("a load task panicked")?);
    }
    pacer.abort();
    result.elapsed = started.elapsed();
    let behind = total.saturating_sub(result.accepted + result.errors);
    Ok((result, behind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_notification_id_is_read_from_a_202_answer() {
        let body = br#"{"id":"ntf_01J9Z3M6XK1V4N9Q7W2C5B8D0E","user_id":"u","deliveries":[{"id":"dlv_x"}]}"#;
        assert_eq!(notification_id(body).as_deref(), Some("ntf_01J9Z3M6XK1V4N9Q7W2C5B8D0E"));
    }
}
