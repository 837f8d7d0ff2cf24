//! The HTTP load generator: keep-alive HTTP/1.1 connections, one task each,
//! closed-loop for ingest, paced for the end-to-end run. Every loop is
//! bounded by a count and a deadline.
//!
//! The notifications go through a [`Poster`], a client that does only what
//! the load needs, as wrk does: one write of a prebuilt request head and the
//! body, and the answer parsed with `httparse` (status and `content-length`
//! body) on the same task. hyper's client connection, used for everything
//! else here, runs each request through a second task and a channel, too
//! heavy for the generator: on the cores it shares with them, what the
//! generator burns the API and Postgres do not get.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
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

/// A TCP connection to the API, without Nagle's delay.
async fn open(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the API at {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

pub async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = open(addr).await?;
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

/// A keep-alive connection that POSTs notifications (module docs).
pub struct Poster {
    addr: SocketAddr,
    stream: TcpStream,
    /// The request up to its `content-length` value.
    head: Vec<u8>,
    out: Vec<u8>,
    buf: BytesMut,
}

impl Poster {
    pub async fn connect(target: &Target) -> anyhow::Result<Self> {
        let stream = open(target.addr).await?;
        let head = format!(
            "POST /v1/notifications HTTP/1.1\r\nhost: herald\r\nauthorization: {}\r\n\
             content-type: application/json\r\ncontent-length: ",
            target.authorization
        )
        .into_bytes();
        Ok(Self {
            addr: target.addr,
            stream,
            head,
            out: Vec::with_capacity(2048),
            buf: BytesMut::with_capacity(16 * 1024),
        })
    }

    /// Opens a fresh connection in place of this one (after an error).
    pub async fn reconnect(&mut self) -> anyhow::Result<()> {
        self.stream = open(self.addr).await?;
        self.buf.clear();
        Ok(())
    }

    /// POSTs one notification; the status and the response body.
    pub async fn post(&mut self, body: &[u8]) -> anyhow::Result<(u16, Bytes)> {
        self.out.clear();
        self.out.extend_from_slice(&self.head);
        self.out.extend_from_slice(body.len().to_string().as_bytes());
        self.out.extend_from_slice(b"\r\n\r\n");
        self.out.extend_from_slice(body);
        self.stream.write_all(&self.out).await.context("sending the request")?;
        loop {
            if let Some((status, head, len)) = parse_answer(&self.buf)?
                && self.buf.len() >= head + len
            {
                let mut answer = self.buf.split_to(head + len);
                return Ok((status, answer.split_off(head).freeze()));
            }
            self.buf.reserve(4096);
            if self
                .stream
                .read_buf(&mut self.buf)
                .await
                .context("reading the answer")?
                == 0
            {
                bail!("the API closed the connection");
            }
        }
    }
}

/// The status, head length and body length of the answer at the start of
/// `buf`, once its head is complete.
fn parse_answer(buf: &[u8]) -> anyhow::Result<Option<(u16, usize, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut answer = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = answer.parse(buf).context("parsing the answer")? else {
        return Ok(None);
    };
    let mut len = None;
    for h in answer.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            len = Some(std::str::from_utf8(h.value)?.trim().parse::<usize>()?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("a chunked answer: the load generator reads content-length bodies only");
        }
    }
    let len = len.context("an answer without content-length")?;
    Ok(Some((answer.code.unwrap_or(0), head, len)))
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
        senders.push(Poster::connect(target).await?);
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
                let body = &target.bodies[usize::try_from(i).unwrap_or(0) % target.bodies.len()];
                let t = Instant::now();
                match sender.post(body).await {
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
                        if sender.reconnect().await.is_err() {
                            break;
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
        senders.push(Poster::connect(target).await?);
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
                let body = &target.bodies[usize::try_from(i).unwrap_or(0) % target.bodies.len()];
                let (t, at) = (Instant::now(), SystemTime::now());
                match sender.post(body).await {
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
                        if sender.reconnect().await.is_err() {
                            break;
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
    fn an_answer_is_complete_once_its_head_and_content_length_body_are_in() {
        let answer = b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}";
        let head = answer.len() - 7;
        assert_eq!(parse_answer(&answer[..head - 2]).unwrap(), None, "head not complete");
        assert_eq!(parse_answer(&answer[..head]).unwrap(), Some((202, head, 7)));
        assert_eq!(parse_answer(answer).unwrap(), Some((202, head, 7)));
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n\r\n").is_err(), "no content-length");
    }

    /// Against a real HTTP server (hyper's, on loopback): answers of every
    /// status come back whole, several on one kept-alive connection.
    #[tokio::test]
    async fn a_poster_gets_each_answer_whole_over_one_connection() {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let auth = req.headers()["authorization"].to_str().unwrap().to_owned();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let status = if body.starts_with(b"bad") { 422 } else { 202 };
                let answer = format!("{auth} {}", String::from_utf8_lossy(&body));
                Ok::<_, std::convert::Infallible>(
                    hyper::Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::from(answer)))
                        .unwrap(),
                )
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        let target = Target {
            addr,
            authorization: "Bearer k".into(),
            bodies: Arc::new(Vec::new()),
        };
        let mut poster = Poster::connect(&target).await.unwrap();
        for i in 0..3 {
            let (status, body) = poster.post(format!("{{\"n\":{i}}}").as_bytes()).await.unwrap();
            assert_eq!((status, &body[..]), (202, format!("Bearer k {{\"n\":{i}}}").as_bytes()));
        }
        let (status, body) = poster.post(b"bad").await.unwrap();
        assert_eq!((status, &body[..]), (422, &b"Bearer k bad"[..]));
        drop(poster);
        server.await.unwrap();
    }

    #[test]
    fn the_notification_id_is_read_from_a_202_answer() {
        let body = br#"{"id":"ntf_01J9Z3M6XK1V4N9Q7W2C5B8D0E","user_id":"u","deliveries":[{"id":"dlv_x"}]}"#;
        assert_eq!(notification_id(body).as_deref(), Some("ntf_01J9Z3M6XK1V4N9Q7W2C5B8D0E"));
    }
}
