//! A real SMTP server that is not ours: Python's `aiosmtpd`, driven by
//! `tests/support/smtp_sink.py` (its docstring is the reference for the
//! modes). Needs `python3` with `pip install -r tests/support/requirements.txt`
//! (CI does it) and the `openssl` command, which makes a CA and a server
//! certificate for `127.0.0.1` per sink.
//!
//! Failure modes are picked by the recipient address, so one sink serves
//! many scenarios at once; [`address`] builds them:
//!
//! | address | server behaviour | Herald's class |
//! |---|---|---|
//! | [`address::accept`] | 250 | sent |
//! | [`address::tempfail`]`(n, …)` | 451 to the first `n` RCPTs, then 250 | Transient ×n, then sent |
//! | [`address::tempfail_always`] | 451 to every RCPT | Transient until dead |
//! | [`address::reject`] | 550 to RCPT | Permanent |
//! | [`address::slow_rcpt`]`(ms, …)` | waits `ms` before answering RCPT | Transient if `ms` > timeout |
//! | [`address::slow`]`(ms, …)` | waits `ms` before the final reply to DATA | Ambiguous if `ms` > timeout |
//! | [`address::drop_always`] | closes the connection after the content, unanswered | Ambiguous |
//! | [`address::drop_first`]`(n, …)` | that, the first `n` times; then 250 | Ambiguous ×n, then sent |
//!
//! The sink offers PIPELINING unless [`SmtpSinkOptions::without_pipelining`];
//! [`ReceivedMessage::pipelined`] says whether a message's commands came
//! pipelined.
//!
//! [`SmtpSink::stop`] and [`SmtpSink::resume`] take the whole server away
//! and back on the same port (connection refused meanwhile: Transient).
//!
//! ```ignore
//! use herald_testkit::smtp::{SmtpSink, SmtpSinkOptions, address};
//!
//! let sink = SmtpSink::start(SmtpSinkOptions::starttls().with_auth("herald", "s3cret"));
//! // HERALD_EMAIL_TRANSPORT=smtp, HERALD_SMTP_URL, HERALD_SMTP_CA_FILE:
//! let env = sink.env();
//! // … start the app with `env`, send to `address::tempfail(2, "ada")` …
//! let got = sink.wait_for_messages(1, Duration::from_secs(30)).await;
//! assert_eq!(got[0].delivery_id(), Some(delivery_id.as_str()));
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How the sink secures connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SinkTls {
    /// Plain SMTP: `smtp://`.
    #[default]
    None,
    /// STARTTLS, required before MAIL: `smtp://…?tls=required`.
    StartTls,
    /// Implicit TLS: `smtps://`.
    Tls,
}

/// What kind of server to start.
#[derive(Debug, Clone, Default)]
pub struct SmtpSinkOptions {
    pub tls: SinkTls,
    /// Require AUTH (PLAIN or LOGIN) with this user and password.
    pub auth: Option<(String, String)>,
    /// Close connections idle this long (aiosmtpd's default: 300 s).
    pub idle_timeout: Option<Duration>,
    /// Leave PIPELINING out of the EHLO reply (offered by default, as
    /// Postfix and Exim do).
    pub without_pipelining: bool,
}

impl SmtpSinkOptions {
    #[must_use]
    pub fn plain() -> Self {
        Self::default()
    }

    #[must_use]
    pub fn starttls() -> Self {
        Self {
            tls: SinkTls::StartTls,
            ..Self::default()
        }
    }

    #[must_use]
    pub fn tls() -> Self {
        Self {
            tls: SinkTls::Tls,
            ..Self::default()
        }
    }

    #[must_use]
    pub fn with_auth(mut self, user: &str, password: &str) -> Self {
        self.auth = Some((user.to_owned(), password.to_owned()));
        self
    }

    /// A server that does not offer PIPELINING: one command at a time.
    #[must_use]
    pub fn without_pipelining(mut self) -> Self {
        self.without_pipelining = true;
        self
    }

    #[must_use]
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = Some(idle);
        self
    }
}

/// Addresses that select the sink's failure modes. `tag` keeps scenarios
/// (and their counters) apart; counters are per exact address.
pub mod address {
    const DOMAIN: &str = "example.com";

    #[must_use]
    pub fn accept(tag: &str) -> String {
        format!("{tag}@{DOMAIN}")
    }

    /// 451 to the first `n` RCPTs, then accepted.
    #[must_use]
    pub fn tempfail(n: u32, tag: &str) -> String {
        format!("tempfail-{n}-{tag}@{DOMAIN}")
    }

    /// 451 to every RCPT.
    #[must_use]
    pub fn tempfail_always(tag: &str) -> String {
        format!("tempfail-{tag}@{DOMAIN}")
    }

    /// 550 to RCPT.
    #[must_use]
    pub fn reject(tag: &str) -> String {
        format!("reject-{tag}@{DOMAIN}")
    }

    /// Waits `ms` before answering RCPT (nothing sent yet).
    #[must_use]
    pub fn slow_rcpt(ms: u64, tag: &str) -> String {
        format!("slowrcpt-{ms}-{tag}@{DOMAIN}")
    }

    /// Waits `ms` after the content arrived, before the final reply.
    #[must_use]
    pub fn slow(ms: u64, tag: &str) -> String {
        format!("slow-{ms}-{tag}@{DOMAIN}")
    }

    /// Closes the connection after the content arrived, every time.
    #[must_use]
    pub fn drop_always(tag: &str) -> String {
        format!("drop-{tag}@{DOMAIN}")
    }

    /// Closes the connection after the content the first `n` times.
    #[must_use]
    pub fn drop_first(n: u32, tag: &str) -> String {
        format!("drop-{n}-{tag}@{DOMAIN}")
    }
}

/// One message whose content reached the sink, as Python's `email` parser
/// read it (an implementation independent of lettre).
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    /// Envelope sender (MAIL FROM).
    pub from: String,
    /// Envelope recipients (RCPT TO).
    pub to: Vec<String>,
    /// The message as it arrived (dot-stuffing undone).
    pub raw: String,
    /// Every header in order, values decoded (RFC 2047, unfolded).
    pub headers: Vec<(String, String)>,
    /// The text/plain part, transfer encoding undone.
    pub text: Option<String>,
    /// The text/html part, transfer encoding undone.
    pub html: Option<String>,
    /// The session was encrypted (STARTTLS or implicit TLS).
    pub tls: bool,
    /// The user that authenticated, if any.
    pub auth_user: Option<String>,
    /// The client's port: equal for messages sent on one connection.
    pub peer_port: u16,
    /// The sink closed the connection instead of answering: the sender
    /// could not know it arrived.
    pub dropped: bool,
    /// The client sent RCPT TO before the sink answered MAIL FROM
    /// (pipelining).
    pub pipelined: bool,
}

impl ReceivedMessage {
    fn from_json(line: &str) -> Self {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("sink wrote a bad line ({e}): {line}"));
        let s = |k: &str| v[k].as_str().map(str::to_owned);
        Self {
            from: s("mail_from").unwrap_or_default(),
            to: v["rcpt_tos"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
                .unwrap_or_default(),
            raw: s("raw").unwrap_or_default(),
            headers: v["headers"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|h| {
                            (
                                h[0].as_str().unwrap_or_default().to_owned(),
                                h[1].as_str().unwrap_or_default().to_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            text: s("text"),
            html: s("html"),
            tls: v["tls"].as_bool().unwrap_or(false),
            auth_user: s("auth_user"),
            peer_port: v["peer_port"].as_u64().and_then(|p| u16::try_from(p).ok()).unwrap_or(0),
            dropped: v["dropped"].as_bool().unwrap_or(false),
            pipelined: v["pipelined"].as_bool().unwrap_or(false),
        }
    }

    /// The first header called `name` (any case).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_all(name).into_iter().next()
    }

    /// Every header called `name` (any case), in order.
    #[must_use]
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// `X-Herald-Delivery-Id`.
    #[must_use]
    pub fn delivery_id(&self) -> Option<&str> {
        self.header("X-Herald-Delivery-Id")
    }

    #[must_use]
    pub fn message_id(&self) -> Option<&str> {
        self.header("Message-ID")
    }

    #[must_use]
    pub fn subject(&self) -> Option<&str> {
        self.header("Subject")
    }

    /// The header section exactly as sent (up to the first empty line).
    #[must_use]
    pub fn raw_headers(&self) -> &str {
        let end = self
            .raw
            .find("\r\n\r\n")
            .or_else(|| self.raw.find("\n\n"))
            .unwrap_or(self.raw.len());
        &self.raw[..end]
    }
}

/// A running `smtp_sink.py`; killed on drop.
pub struct SmtpSink {
    options: SmtpSinkOptions,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    /// The sink exits when this closes, even if the test process dies.
    stdin: Option<ChildStdin>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/support/smtp_sink.py")
}

fn ensure_aiosmtpd() {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let checked = CHECKED.get_or_init(|| {
        match Command::new("python3")
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
        {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            Err(e) => Err(format!("python3 cannot be run: {e}")),
        }
    });
    if let Err(why) = checked {
        panic!(
            "the SMTP test server needs Python's aiosmtpd: run `pip install -r tests/support/requirements.txt` \
             (CI does). ({why})"
        );
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("the SMTP test server needs the `openssl` command for its certificate: {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.pem`) and a certificate it signed for 127.0.0.1 and localhost
/// (`server.pem`, `server.key`). A separate CA because rustls refuses a
/// CA certificate used as a server's own.
fn make_certificates(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=Herald test CA",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write server.ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}

/// Percent-encodes a URL user or password.
fn userinfo(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl SmtpSink {
    /// Starts a sink on a free port of 127.0.0.1 and waits until it accepts
    /// connections. Panics (saying what to install) if it cannot.
    pub fn start(options: SmtpSinkOptions) -> Self {
        ensure_aiosmtpd();
        let dir = tempfile::tempdir().expect("temp dir for the SMTP sink");
        make_certificates(dir.path());
        let mut sink = Self {
            options,
            dir,
            port: 0,
            child: None,
            stdin: None,
        };
        sink.spawn(0);
        sink
    }

    fn spawn(&mut self, port: u16) {
        let tls = match self.options.tls {
            SinkTls::None => "none",
            SinkTls::StartTls => "starttls",
            SinkTls::Tls => "tls",
        };
        let dir = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("sink.log"))
            .expect("sink log");
        let mut cmd = Command::new("python3");
        cmd.arg(script())
            .args(["--port", &port.to_string(), "--tls", tls])
            .arg("--out")
            .arg(dir.join("messages.jsonl"))
            .arg("--cert")
            .arg(dir.join("server.pem"))
            .arg("--key")
            .arg(dir.join("server.key"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log);
        if let Some((user, password)) = &self.options.auth {
            cmd.args(["--user", user]).env("SMTP_SINK_PASSWORD", password);
        }
        if !self.options.without_pipelining {
            cmd.arg("--pipelining");
        }
        if let Some(idle) = self.options.idle_timeout {
            cmd.args(["--idle-timeout", &idle.as_secs_f64().to_string()]);
        }
        let mut child = cmd.spawn().expect("spawn python3 smtp_sink.py");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        let Some(bound) = line.trim().strip_prefix("LISTENING ").and_then(|p| p.parse().ok()) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the SMTP sink did not start; its log:\n{}", self.log());
        };
        self.port = bound;
        self.stdin = child.stdin.take();
        self.child = Some(child);
    }

    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A value for `HERALD_SMTP_URL`, with the sink's credentials if it
    /// requires AUTH.
    #[must_use]
    pub fn url(&self) -> String {
        match &self.options.auth {
            Some((user, password)) => self.url_with_credentials(user, password),
            None => self.url_for(""),
        }
    }

    /// The URL with other credentials (to test a wrong password).
    #[must_use]
    pub fn url_with_credentials(&self, user: &str, password: &str) -> String {
        self.url_for(&format!("{}:{}@", userinfo(user), userinfo(password)))
    }

    fn url_for(&self, credentials: &str) -> String {
        let port = self.port;
        match self.options.tls {
            SinkTls::None => format!("smtp://{credentials}127.0.0.1:{port}"),
            SinkTls::StartTls => format!("smtp://{credentials}127.0.0.1:{port}?tls=required"),
            SinkTls::Tls => format!("smtps://{credentials}127.0.0.1:{port}"),
        }
    }

    /// A value for `HERALD_SMTP_CA_FILE`: the CA that signed the sink's
    /// certificate (exists for plain sinks too).
    #[must_use]
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// `HERALD_EMAIL_TRANSPORT`, `HERALD_SMTP_URL`, `HERALD_SMTP_CA_FILE` for an
    /// app or worker that should send here.
    #[must_use]
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("HERALD_EMAIL_TRANSPORT".into(), "smtp".into()),
            ("HERALD_SMTP_URL".into(), self.url()),
            ("HERALD_SMTP_CA_FILE".into(), self.ca_file().display().to_string()),
        ]
    }

    /// Every message whose content arrived, including the dropped ones.
    #[must_use]
    pub fn received(&self) -> Vec<ReceivedMessage> {
        std::fs::read_to_string(self.dir.path().join("messages.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(ReceivedMessage::from_json)
            .collect()
    }

    /// The messages the sink accepted (answered 250), in arrival order.
    #[must_use]
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        self.received().into_iter().filter(|m| !m.dropped).collect()
    }

    /// Waits until at least `n` messages were accepted; panics after
    /// `timeout` with what did arrive.
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<ReceivedMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.messages();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} messages at the SMTP sink within {timeout:?}, got {}: {:?}",
                got.len(),
                got.iter().map(|m| &m.to).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The sink's own log (aiosmtpd's errors), for failure messages.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sink.log")).unwrap_or_default()
    }

    /// Takes the server away: connections are refused until [`Self::resume`].
    pub fn stop(&mut self) {
        self.stdin = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (failure-mode counters
    /// start again from zero; received messages are kept).
    pub fn resume(&mut self) {
        if self.child.is_none() {
            self.spawn(self.port);
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.stop();
    }
}
