//! Load from mobile and web clients: many idle live streams held by one API
//! process, and `If-None-Match` polling against full reads.
//!
//! A stream client is a bare TCP connection speaking just enough HTTP/1.1
//! to read `GET /v1/me/stream` (Server-Sent Events), so ten thousand of them
//! cost the bench little; each `data:` line is parsed as a change and, for
//! a delivery reaching `delivered`, the time since its `updated_at` (the
//! database's clock on this same machine) is recorded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

/// What the stream clients saw.
#[derive(Default)]
pub struct Seen {
    /// Notification id → milliseconds from the delivery's status change
    /// (its `updated_at`) to the client reading it.
    pub delivered_ms: Mutex<HashMap<String, f64>>,
    /// Clients whose stream answered 200 and is open.
    pub open: AtomicU64,
    /// Streams that failed or ended early.
    pub failed: AtomicU64,
    pub events: AtomicU64,
}

/// Mints one user token per user id with the API key in `authorization`.
pub async fn mint_tokens(addr: SocketAddr, authorization: &str, users: &[String]) -> anyhow::Result<Vec<String>> {
    let next = Arc::new(AtomicU64::new(0));
    let users = Arc::new(users.to_vec());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (next, users, authorization) = (Arc::clone(&next), Arc::clone(&users), authorization.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut sender = crate::load::connect(addr).await?;
            let mut out = Vec::new();
            loop {
                let i = usize::try_from(next.fetch_add(1, Ordering::Relaxed)).unwrap_or(usize::MAX);
                let Some(user) = users.get(i) else { break };
                sender.ready().await.context("connection closed")?;
                let req = hyper::Request::post(format!("/v1/users/{user}/tokens"))
                    .header("host", "herald")
                    .header("authorization", &authorization)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(b"{}")))?;
                let res = sender.send_request(req).await?;
                let status = res.status().as_u16();
                let body = res.into_body().collect().await?.to_bytes();
                if status != 201 {
                    bail!("minting a token answered {status}: {}", String::from_utf8_lossy(&body));
                }
                let doc: Value = serde_json::from_slice(&body)?;
                let token = doc["token"].as_str().context("no token in the answer")?.to_owned();
                out.push((i, token));
            }
            anyhow::Ok(out)
        }));
    }
    let mut all = vec![String::new(); users.len()];
    for t in tasks {
        for (i, token) in t.await?? {
            all[i] = token;
        }
    }
    Ok(all)
}

/// Opens one live stream for `token` and reads it until `stop` passes.
pub async fn stream_client(addr: SocketAddr, token: String, seen: Arc<Seen>, stop: Instant) {
    let outcome = tokio::time::timeout_at(stop.into(), read_stream(addr, &token, &seen)).await;
    if let Ok(Err(_)) = outcome {
        seen.failed.fetch_add(1, Ordering::Relaxed);
    }
}

async fn read_stream(addr: SocketAddr, token: &str, seen: &Seen) -> anyhow::Result<()> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    stream
        .write_all(
            format!(
                "GET /v1/me/stream HTTP/1.1\r\nhost: herald\r\nauthorization: Bearer {token}\r\n\
                 accept: text/event-stream\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    let mut lines = BufReader::with_capacity(2048, stream).lines();
    let status = lines.next_line().await?.context("no status line")?;
    if !status.starts_with("HTTP/1.1 200") {
        bail!("stream answered {status}");
    }
    seen.open.fetch_add(1, Ordering::Relaxed);
    while let Some(line) = lines.next_line().await? {
        // Chunk-size lines and heartbeats (`:`) are skipped; a data line
        // holds one change.
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        seen.events.fetch_add(1, Ordering::Relaxed);
        let Ok(change) = serde_json::from_str::<Value>(data.trim()) else {
            continue;
        };
        if change["status"] != "delivered" {
            continue;
        }
        let (Some(ntf), Some(at)) = (change["notification_id"].as_str(), change["updated_at"].as_str()) else {
            continue;
        };
        let Ok(at) = chrono::DateTime::parse_from_rfc3339(at) else {
            continue;
        };
        let now = chrono::DateTime::<chrono::Utc>::from(SystemTime::now());
        let ms = (now - at.with_timezone(&chrono::Utc)).num_microseconds().unwrap_or(0) as f64 / 1000.0;
        seen.delivered_ms.lock().await.entry(ntf.to_owned()).or_insert(ms);
    }
    bail!("stream ended")
}

/// Closed-loop `GET path` for `secs` on `connections` keep-alive
/// connections, with `If-None-Match: etag` when given: (requests/s, count
/// per status).
pub async fn get_loop(
    addr: SocketAddr,
    token: &str,
    path: &str,
    etag: Option<&str>,
    connections: usize,
    secs: Duration,
) -> anyhow::Result<(f64, HashMap<u16, u64>)> {
    let started = Instant::now();
    let deadline = started + secs;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut sender = crate::load::connect(addr).await?;
        let (token, path, etag) = (token.to_owned(), path.to_owned(), etag.map(str::to_owned));
        tasks.push(tokio::spawn(async move {
            let mut counts: HashMap<u16, u64> = HashMap::new();
            while Instant::now() < deadline {
                sender.ready().await.context("connection closed")?;
                let mut req = hyper::Request::get(path.as_str())
                    .header("host", "herald")
                    .header("authorization", format!("Bearer {token}"));
                if let Some(e) = &etag {
                    req = req.header("if-none-match", e.as_str());
                }
                let res = sender.send_request(req.body(Full::new(Bytes::new()))?).await?;
                let status = res.status().as_u16();
                res.into_body().collect().await?;
                *counts.entry(status).or_default() += 1;
            }
            anyhow::Ok(counts)
        }));
    }
    let mut all: HashMap<u16, u64> = HashMap::new();
    for t in tasks {
        for (s, n) in t.await?? {
            *all.entry(s).or_default() += n;
        }
    }
    let total: u64 = all.values().sum();
    Ok((total as f64 / started.elapsed().as_secs_f64(), all))
}

/// One GET: status, ETag and body.
pub async fn get_once(addr: SocketAddr, token: &str, path: &str) -> anyhow::Result<(u16, Option<String>, Bytes)> {
    let mut sender = crate::load::connect(addr).await?;
    let req = hyper::Request::get(path)
        .header("host", "herald")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))?;
    let res = sender.send_request(req).await?;
    let status = res.status().as_u16();
    let etag = res
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, etag, body))
}
