//! Load sinks on loopback that speak the real protocols, lean enough not to
//! be the bottleneck: an SMTP receiver, and one HTTP server answering like
//! FCM HTTP v1 (with its OAuth2 token endpoint) over HTTP/1.1 and like APNs
//! over HTTP/2 cleartext. They do not verify credentials (the channel tests
//! do that against the testkit's stand-ins); they count what arrives by
//! delivery id and note when it arrived.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// What one sink received: first receipt per id, and how many arrived in
/// all (so duplicates show).
#[derive(Default)]
pub struct Receipts {
    first: Mutex<HashMap<u128, Instant>>,
    total: AtomicU64,
    /// Woken on every receipt (the idle-latency loop waits on it).
    pub arrived: Notify,
}

impl Receipts {
    /// Records `id` (`dlv_…` or `ntf_…`); ids that are not ours are ignored.
    pub fn record(&self, id: &str) {
        let Some(key) = id.get(4..).and_then(|u| ulid::Ulid::from_string(u).ok()) else {
            return;
        };
        let now = Instant::now();
        self.total.fetch_add(1, Ordering::Relaxed);
        self.first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.0)
            .or_insert(now);
        self.arrived.notify_waiters();
    }

    /// When `id` first arrived.
    pub fn get(&self, id: &str) -> Option<Instant> {
        let key = ulid::Ulid::from_string(id.get(4..)?).ok()?;
        self.first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key.0)
            .copied()
    }

    pub fn unique(&self) -> u64 {
        self.first.lock().unwrap_or_else(PoisonError::into_inner).len() as u64
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub fn clear(&self) {
        self.first.lock().unwrap_or_else(PoisonError::into_inner).clear();
        self.total.store(0, Ordering::Relaxed);
    }
}

/// A running sink; its task ends when dropped.
pub struct Running {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------- SMTP

/// A minimal ESMTP receiver: answers every command with success, reads
/// the content up to the lone dot, and records its `X-Herald-Delivery-Id`.
pub async fn start_smtp(receipts: Arc<Receipts>) -> anyhow::Result<Running> {
    let listener = TcpListener::bind("127.0.0.1:0").await.context("bind the SMTP sink")?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let receipts = Arc::clone(&receipts);
            tokio::spawn(async move {
                let _ = smtp_session(stream, &receipts).await;
            });
        }
    });
    Ok(Running { addr, task })
}

async fn smtp_session(stream: tokio::net::TcpStream, receipts: &Receipts) -> std::io::Result<()> {
    let (read, write) = stream.into_split();
    let mut read = BufReader::with_capacity(16 * 1024, read);
    // Replies to pipelined commands go out together, once every command
    // already received is answered (as Postfix does).
    let mut write = BufWriter::with_capacity(4 * 1024, write);
    write.write_all(b"220 herald-bench ESMTP\r\n").await?;
    write.flush().await?;
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        if read.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let verb = line.get(..4).map(<[u8]>::to_ascii_uppercase).unwrap_or_default();
        let reply: &[u8] = match verb.as_slice() {
            b"EHLO" => b"250-herald-bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 10485760\r\n",
            b"HELO" | b"MAIL" | b"RCPT" | b"RSET" | b"NOOP" => b"250 OK\r\n",
            b"DATA" => {
                write.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n").await?;
                write.flush().await?;
                let mut id: Option<String> = None;
                let mut in_headers = true;
                loop {
                    line.clear();
                    if read.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == b".\r\n" || line == b".\n" {
                        break;
                    }
                    if in_headers {
                        if line == b"\r\n" || line == b"\n" {
                            in_headers = false;
                        } else if line.len() > 21 && line[..21].eq_ignore_ascii_case(b"x-herald-delivery-id:") {
                            id = Some(String::from_utf8_lossy(&line[21..]).trim().to_owned());
                        }
                    }
                }
                if let Some(id) = id {
                    receipts.record(&id);
                }
                b"250 OK queued\r\n"
            }
            b"QUIT" => {
                write.write_all(b"221 Bye\r\n").await?;
                write.flush().await?;
                return Ok(());
            }
            _ => b"502 Command not implemented\r\n",
        };
        write.write_all(reply).await?;
        if read.buffer().is_empty() {
            write.flush().await?;
        }
    }
}

// ---------------------------------------------------------------- push

/// FCM HTTP v1 and APNs on one port: FCM's `/token` and
/// `/v1/projects/{p}/messages:send` (HTTP/1.1), APNs's `/3/device/{token}`
/// (HTTP/2 prior knowledge). Success answers as documented: FCM
/// `{"name": "projects/…/messages/…"}`, APNs 200 with `apns-id`.
pub async fn start_push(receipts: Arc<Receipts>) -> anyhow::Result<Running> {
    let listener = TcpListener::bind("127.0.0.1:0").await.context("bind the push sink")?;
    let addr = listener.local_addr()?;
    let counter = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let (receipts, counter) = (Arc::clone(&receipts), Arc::clone(&counter));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let (receipts, counter) = (Arc::clone(&receipts), Arc::clone(&counter));
                    async move { Ok::<_, Infallible>(push_answer(req, &receipts, &counter).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(Running { addr, task })
}

async fn push_answer(req: Request<Incoming>, receipts: &Receipts, counter: &AtomicU64) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let apns_id = req.headers().get("apns-id").cloned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return answer(400, "{}"),
    };
    if path == "/token" {
        return answer(
            200,
            r#"{"access_token":"ya29.herald-bench","expires_in":3600,"token_type":"Bearer"}"#,
        );
    }
    if let Some(id) = delivery_id_in(&body) {
        receipts.record(id);
    }
    if path.starts_with("/3/device/") {
        let mut res = answer(200, "");
        if let Some(id) = apns_id {
            res.headers_mut().insert("apns-id", id);
        }
        return res;
    }
    if path.ends_with("/messages:send") {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        return answer(200, &format!(r#"{{"name":"projects/herald-bench/messages/0:{n}"}}"#));
    }
    answer(404, r#"{"error":{"code":404,"status":"NOT_FOUND"}}"#)
}

fn answer(status: u16, body: &str) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *res.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    if !body.is_empty() {
        res.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("application/json"),
        );
    }
    res
}

/// `"herald_delivery_id":"dlv_…"` in a push body (FCM puts it in `data`,
/// APNs at the top level).
fn delivery_id_in(body: &[u8]) -> Option<&str> {
    const NEEDLE: &[u8] = b"\"herald_delivery_id\":\"";
    let at = memchr::memmem::find(body, NEEDLE)? + NEEDLE.len();
    let end = memchr::memchr(b'"', &body[at..])? + at;
    std::str::from_utf8(&body[at..end]).ok()
}

/// Writes the credentials Herald's push worker needs into `dir` and
/// returns the `HERALD_*` variables that point it at the sink.
pub fn push_env(dir: &Path, sink: SocketAddr) -> anyhow::Result<Vec<(String, String)>> {
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    let base = format!("http://{sink}");
    // FCM: a service account whose RSA key signs the OAuth2 assertion.
    let rsa = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).context("generate an RSA key")?;
    let pem = rsa.to_pkcs8_pem(LineEnding::LF).context("RSA key to PEM")?;
    let account = serde_json::json!({
        "type": "service_account",
        "project_id": "herald-bench",
        "private_key_id": "0123456789abcdef",
        "private_key": pem.as_str(),
        "client_email": "bench@herald-bench.iam.gserviceaccount.com",
        "token_uri": format!("{base}/token"),
    });
    let fcm_file = dir.join("fcm.json");
    std::fs::write(&fcm_file, serde_json::to_vec(&account)?).context("write the FCM credentials")?;
    // APNs: a P-256 token-auth key.
    let ec = p256::SecretKey::random(&mut rand_core::OsRng);
    let p8 = ec.to_pkcs8_pem(LineEnding::LF).context("EC key to PEM")?;
    let apns_file = dir.join("AuthKey_BENCHKEY01.p8");
    std::fs::write(&apns_file, p8.as_bytes()).context("write the APNs key")?;
    Ok([
        ("HERALD_PUSH_TRANSPORT", "http".to_owned()),
        ("HERALD_FCM_CREDENTIALS_FILE", fcm_file.display().to_string()),
        ("HERALD_FCM_BASE_URL", base.clone()),
        ("HERALD_APNS_KEY_FILE", apns_file.display().to_string()),
        ("HERALD_APNS_KEY_ID", "BENCHKEY01".to_owned()),
        ("HERALD_APNS_TEAM_ID", "BENCHTEAM1".to_owned()),
        ("HERALD_APNS_TOPIC", "com.example.herald".to_owned()),
        ("HERALD_APNS_BASE_URL", base),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delivery_id_is_found_in_fcm_and_apns_bodies() {
        let fcm =
            br#"{"message":{"token":"t","data":{"a":"1","herald_delivery_id":"dlv_01J9Z3M6XK1V4N9Q7W2C5B8D0E"}}}"#;
        assert_eq!(delivery_id_in(fcm), Some("dlv_01J9Z3M6XK1V4N9Q7W2C5B8D0E"));
        assert_eq!(delivery_id_in(b"{}"), None);
    }

    #[test]
    fn receipts_count_duplicates_but_keep_the_first_time() {
        let r = Receipts::default();
        r.record("dlv_01J9Z3M6XK1V4N9Q7W2C5B8D0E");
        let first = r.get("dlv_01J9Z3M6XK1V4N9Q7W2C5B8D0E").unwrap();
        r.record("dlv_01J9Z3M6XK1V4N9Q7W2C5B8D0E");
        r.record("not-an-id");
        assert_eq!((r.unique(), r.total()), (1, 2));
        assert_eq!(r.get("dlv_01J9Z3M6XK1V4N9Q7W2C5B8D0E"), Some(first));
    }
}
