//! SMTP delivery: lettre's SMTP client, driven one command at a time over a
//! small connection pool of Herald's own, so that a failure is classified
//! by how far the conversation got. (lettre's `AsyncSmtpTransport` runs
//! MAIL … DATA in one call and cannot say whether the content had been sent
//! when the connection broke, which is the difference between "nothing was
//! accepted" and "the server may have accepted it".)
//!
//! # `HERALD_SMTP_URL`
//!
//! The forms lettre 0.11's `AsyncSmtpTransport::from_url` accepts, with the
//! same meaning and default ports:
//!
//! | URL | connection | default port |
//! |---|---|---|
//! | `smtp://host[:port]` | plain text, no TLS (development, trusted networks) | 25 |
//! | `smtp://host[:port]?tls=required` | STARTTLS; fails if the server does not offer it | 587 |
//! | `smtp://host[:port]?tls=opportunistic` | STARTTLS if offered, else plain text (open to a man in the middle) | 587 |
//! | `smtps://host[:port]` | implicit TLS from the first byte | 465 |
//!
//! `user:password@` before the host turns on AUTH (PLAIN, or LOGIN when the
//! server offers only that); percent-encode reserved characters
//! (`p%40ss` for `p@ss`). A user without a password is refused. A path
//! (`smtps://host/mx1.example.com`) sets the EHLO name (default: this
//! machine's host name). TLS trusts the Mozilla roots (webpki-roots) plus
//! every certificate in `HERALD_SMTP_CA_FILE`. The URL, and the password
//! above all, is never logged nor echoed in an error.
//!
//! # How a failed send is classified
//!
//! | where | what happened | class | `provider_status` |
//! |---|---|---|---|
//! | connect, TLS, greeting, EHLO, STARTTLS | refused, reset, TLS failure, any reply | Transient | reply code, if any |
//! | AUTH | rejected (535 …), no common mechanism | Transient | reply code |
//! | MAIL FROM, RCPT TO, DATA | 4xx | Transient | 4xx |
//! | MAIL FROM, RCPT TO, DATA | 5xx | Permanent | 5xx |
//! | MAIL FROM, RCPT TO, DATA | connection lost | Transient | — |
//! | after the content was sent | 4xx / 5xx | Transient / Permanent | the code |
//! | after the content was sent | connection lost | **Ambiguous** | — |
//! | timeout before the content was sent | | Transient | — |
//! | timeout once the content was being sent | | **Ambiguous** | — |
//! | a non-ASCII address, server without SMTPUTF8 | | Permanent | — |
//!
//! "The content was sent" starts when the server answers `354` to DATA:
//! from then on it may end up with the whole message, so a broken or silent
//! connection means it may have accepted it (a retry may duplicate it; the
//! `Message-ID` lets the receiver drop the copy).
//!
//! A rejected AUTH is Transient, not Permanent: a wrong password is the
//! operator's mistake, true of every message, not of this one. Retrying on
//! the schedule gives the operator hours to fix `HERALD_SMTP_URL` before
//! deliveries are dead-lettered (and dead letters can be replayed), instead
//! of failing every delivery for good. The same holds for session-level
//! 5xx replies (EHLO, STARTTLS).
//!
//! # Pipelining
//!
//! When the server offers PIPELINING (RFC 2920; Postfix, Exim, Exchange and
//! the big providers do), MAIL FROM, RCPT TO and DATA go out in one write
//! and their replies are read in order: two round trips per message instead
//! of four. Each reply is still read and classified at its own stage, and
//! the content goes out only after the `354` to DATA, so the table above
//! holds as written. The content and the `.` line that ends it go in one
//! write too (lettre's `message()` makes two). lettre keeps no record of
//! the EHLO keywords it does not know, so a new connection asks EHLO once
//! more, itself, before AUTH.
//!
//! # Timeout
//!
//! One `tokio::time::timeout` (`HERALD_SEND_TIMEOUT_SECS`) bounds the whole
//! send, including the wait for a free connection, a fresh connection and
//! a retry on a stale pooled one.
//! When it fires the connection is dropped, never reused.
//!
//! # Pool
//!
//! At most `connections` conversations run at once
//! (`EmailSender::from_settings`; `HERALD_SMTP_MAX_CONNECTIONS`, 50 by
//! default, Postfix's per-client limit): a send beyond them waits for one
//! to finish, within its own deadline, so a worker may hold more
//! deliveries in flight than it has connections (its claims and results
//! batch better with more; the connections stay within what the relay
//! allows). As many idle connections are kept for 30 s; each send takes
//! the most recently used one or opens a new one, so no more than
//! `connections` are ever open. Keeping fewer idle ones than sends would
//! make a busy worker close connections and open new ones all the time,
//! paying a handshake per email (docs/performance.md). A pooled
//! connection the server has meanwhile closed fails at MAIL FROM, before
//! anything was sent: that send moves to a fresh
//! connection once, within the same deadline. A connection that saw any
//! error is closed (with QUIT when it is still healthy), never reused.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use herald_core::ErrorClass;
use herald_core::validate::mask_email;
use lettre::Message;
use lettre::address::Envelope;
use lettre::transport::smtp::Error as SmtpError;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};

use super::EmailSetupError;
use crate::SendError;

/// How long an idle connection is kept; well under the usual server-side
/// idle limits (Postfix: 300 s), so most pooled connections are still open.
const IDLE_FOR: Duration = Duration::from_secs(30);
/// Bound on the courtesy QUIT when a connection is retired.
const QUIT_WITHIN: Duration = Duration::from_secs(5);

/// How the connection to the SMTP server is secured (from the URL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// `smtp://`: no TLS.
    Plain,
    /// `smtp://…?tls=opportunistic`: STARTTLS when the server offers it.
    StartTlsOpportunistic,
    /// `smtp://…?tls=required`: STARTTLS, or no send.
    StartTls,
    /// `smtps://`: TLS from the first byte.
    Tls,
}

impl SmtpSecurity {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "none",
            Self::StartTlsOpportunistic => "starttls-opportunistic",
            Self::StartTls => "starttls",
            Self::Tls => "tls",
        }
    }
}

/// What `HERALD_SMTP_URL` says.
struct Endpoint {
    host: String,
    port: u16,
    security: SmtpSecurity,
    /// User and password, percent-decoded.
    credentials: Option<(String, String)>,
    hello: ClientId,
}

/// Parses the URL; errors never quote it.
fn parse_url(raw: &str) -> Result<Endpoint, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("{e} (e.g. smtp://mail.internal:25)"))?;
    let tls = url.query_pairs().find(|(k, _)| k == "tls").map(|(_, v)| v.into_owned());
    let (security, default_port) = match (url.scheme(), tls.as_deref()) {
        ("smtp", None) => (SmtpSecurity::Plain, 25),
        ("smtp", Some("required")) => (SmtpSecurity::StartTls, 587),
        ("smtp", Some("opportunistic")) => (SmtpSecurity::StartTlsOpportunistic, 587),
        ("smtps", _) => (SmtpSecurity::Tls, 465),
        ("smtp", Some(_)) => return Err("the `tls` parameter must be `required` or `opportunistic`".into()),
        _ => return Err("the scheme must be smtp:// or smtps://".into()),
    };
    let host = match url.host() {
        Some(url::Host::Domain(d)) if !d.is_empty() => d.to_owned(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        _ => return Err("it names no host".into()),
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(std::borrow::Cow::into_owned)
            .map_err(|_| "its credentials are not UTF-8 once percent-decoded".to_owned())
    };
    let credentials = match (url.username(), url.password()) {
        ("", None) => None,
        (user, Some(password)) => Some((decode(user)?, decode(password)?)),
        (_, None) => return Err("it names a user but no password (smtp://user:password@host)".into()),
    };
    let name = url.path().trim_matches('/');
    let hello = if name.is_empty() {
        ClientId::default()
    } else {
        ClientId::Domain(name.to_owned())
    };
    Ok(Endpoint {
        host,
        port: url.port().unwrap_or(default_port),
        security,
        credentials,
        hello,
    })
}

/// TLS settings for `host`: the Mozilla roots plus the CA file's.
fn tls_parameters(host: &str, ca_file: Option<&Path>) -> Result<TlsParameters, EmailSetupError> {
    let mut builder = TlsParameters::builder(host.to_owned());
    if let Some(path) = ca_file {
        let ca_error = |m: String| EmailSetupError::CaFile(path.display().to_string(), m);
        let pem = std::fs::read(path).map_err(|e| ca_error(format!("cannot be read: {e}")))?;
        if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
            return Err(ca_error("holds no PEM certificate".into()));
        }
        let certs = Certificate::from_pem(&pem).map_err(|e| ca_error(format!("is not valid PEM: {e}")))?;
        builder = builder.add_root_certificate(certs);
        return builder
            .build_rustls()
            .map_err(|e| ca_error(format!("cannot be used: {e}")));
    }
    builder
        .build_rustls()
        .map_err(|e| EmailSetupError::SmtpUrl(format!("TLS cannot be set up: {e}")))
}

/// How far a conversation got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Stage {
    /// Waiting for one of the `connections` to be free.
    Waiting,
    Connect,
    Auth,
    Mail,
    Rcpt,
    Data,
    /// The server said 354: the content is on its way, or arrived.
    Content,
}

impl Stage {
    const ALL: [Self; 7] = [
        Self::Waiting,
        Self::Connect,
        Self::Auth,
        Self::Mail,
        Self::Rcpt,
        Self::Data,
        Self::Content,
    ];

    const fn describe(self) -> &'static str {
        match self {
            Self::Waiting => "waiting for a free connection",
            Self::Connect => "connecting",
            Self::Auth => "AUTH",
            Self::Mail => "MAIL FROM",
            Self::Rcpt => "RCPT TO",
            Self::Data => "DATA",
            Self::Content => "the message content",
        }
    }
}

/// The stage, readable after the timeout has dropped the conversation.
struct Progress(AtomicU8);

impl Progress {
    fn new() -> Self {
        Self(AtomicU8::new(Stage::Waiting as u8))
    }

    fn set(&self, stage: Stage) {
        self.0.store(stage as u8, Ordering::Relaxed);
    }

    fn get(&self) -> Stage {
        let n = self.0.load(Ordering::Relaxed);
        // Only `set` writes it, always from a Stage.
        Stage::ALL.into_iter().find(|s| *s as u8 == n).unwrap_or(Stage::Content)
    }
}

enum Failure {
    Smtp(Stage, SmtpError),
    /// The TCP connection could not be opened.
    Connect(std::io::Error),
    TimedOut(Stage),
    /// The server lacks an extension this message needs.
    Unsupported(&'static str),
}

/// An open connection, and whether its server takes pipelined commands.
struct Session {
    conn: AsyncSmtpConnection,
    pipelining: bool,
}

struct Idle {
    session: Session,
    since: Instant,
}

/// MAIL FROM, every RCPT TO and DATA as one write (each renders with its
/// own CRLF).
struct Pipelined<'a> {
    mail: Mail,
    rcpts: &'a [Rcpt],
}

impl fmt::Display for Pipelined<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.mail.fmt(f)?;
        for rcpt in self.rcpts {
            rcpt.fmt(f)?;
        }
        Data.fmt(f)
    }
}

/// The message content, dot-stuffed (RFC 5321 4.5.2: a line that starts
/// with `.` gets one more), and the `.` line that ends it, as one write.
/// lettre's `message()` writes the two separately: two syscalls, two TLS
/// records and, with Nagle's algorithm, a wait for the server's delayed
/// ACK before the second.
struct Content<'a>(&'a str);

impl fmt::Display for Content<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        if rest.starts_with('.') {
            f.write_str(".")?;
        }
        while let Some(at) = rest.find("\r\n.") {
            // Up to and including the line's leading dot, then its double.
            let (line, next) = rest.split_at(at + 3);
            f.write_str(line)?;
            f.write_str(".")?;
            rest = next;
        }
        f.write_str(rest)?;
        f.write_str("\r\n.\r\n")
    }
}

/// A pooled SMTP client for one server.
pub(crate) struct SmtpTransport {
    host: String,
    port: u16,
    security: SmtpSecurity,
    /// `Some` unless the security is `Plain`.
    tls: Option<TlsParameters>,
    credentials: Option<Credentials>,
    /// Kept only to scrub it from error text, should a server echo it.
    password: Option<String>,
    hello: ClientId,
    timeout: Duration,
    /// One permit per connection that may be open: a conversation holds
    /// one from before it takes or opens a connection until it is done.
    slots: tokio::sync::Semaphore,
    /// `slots`' permits: also the most idle connections kept for reuse.
    max_connections: usize,
    idle: Mutex<Vec<Idle>>,
}

impl fmt::Debug for SmtpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpTransport")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
            .field("auth", &self.credentials.is_some())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl SmtpTransport {
    pub(crate) fn new(
        url: &str,
        ca_file: Option<&Path>,
        timeout: Duration,
        max_connections: usize,
    ) -> Result<Self, EmailSetupError> {
        let max_connections = max_connections.max(1);
        let endpoint = parse_url(url).map_err(EmailSetupError::SmtpUrl)?;
        let tls = match endpoint.security {
            SmtpSecurity::Plain => None,
            _ => Some(tls_parameters(&endpoint.host, ca_file)?),
        };
        if endpoint.credentials.is_some()
            && matches!(
                endpoint.security,
                SmtpSecurity::Plain | SmtpSecurity::StartTlsOpportunistic
            )
        {
            tracing::warn!("HERALD_SMTP_URL has credentials but does not require TLS: the password may cross in clear");
        }
        Ok(Self {
            host: endpoint.host,
            port: endpoint.port,
            security: endpoint.security,
            tls,
            credentials: endpoint
                .credentials
                .as_ref()
                .map(|(user, password)| Credentials::new(user.clone(), password.clone())),
            password: endpoint.credentials.map(|(_, password)| password),
            hello: endpoint.hello,
            timeout,
            slots: tokio::sync::Semaphore::new(max_connections),
            max_connections,
            idle: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn security(&self) -> SmtpSecurity {
        self.security
    }

    /// Sends one message, the whole conversation bounded by the timeout.
    pub(crate) async fn send(&self, delivery_id: &str, message: &Message) -> Result<(), SendError> {
        let progress = Progress::new();
        let started = Instant::now();
        let outcome = match tokio::time::timeout(self.timeout, self.converse(message, &progress)).await {
            Ok(outcome) => outcome,
            // The conversation (and its connection) has been dropped.
            Err(_) => Err(Failure::TimedOut(progress.get())),
        };
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match outcome {
            Ok(()) => {
                tracing::debug!(delivery_id, elapsed_ms, "SMTP server accepted the message");
                Ok(())
            }
            Err(failure) => {
                let err = self.classify(failure, message.envelope());
                tracing::debug!(
                    delivery_id,
                    elapsed_ms,
                    class = %err.class,
                    status = ?err.provider_status,
                    "SMTP send failed"
                );
                Err(err)
            }
        }
    }

    async fn converse(&self, message: &Message, progress: &Progress) -> Result<(), Failure> {
        let raw = message.formatted();
        let envelope = message.envelope();
        // Held to the end of the conversation; a connection is only ever
        // taken or opened with one, so at most `max_connections` are open.
        // (The semaphore is never closed.)
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| Failure::TimedOut(Stage::Waiting))?;
        progress.set(Stage::Connect);
        if let Some(session) = self.checkout() {
            match self.transact(session, envelope, &raw, progress).await {
                // Closed by the server while idle (no reply, or 421 "closing"):
                // nothing was sent, so a fresh connection may take over.
                Err(Failure::Smtp(Stage::Mail, e)) if e.status().is_none_or(|c| u16::from(c) == 421) => {
                    tracing::debug!("pooled SMTP connection had gone stale; opening a new one");
                }
                outcome => return outcome,
            }
        }
        let session = self.connect(progress).await?;
        self.transact(session, envelope, &raw, progress).await
    }

    async fn connect(&self, progress: &Progress) -> Result<Session, Failure> {
        progress.set(Stage::Connect);
        let at_connect = |e| Failure::Smtp(Stage::Connect, e);
        let implicit_tls = match self.security {
            SmtpSecurity::Tls => self.tls.clone(),
            _ => None,
        };
        let mut conn = match implicit_tls {
            Some(tls) => AsyncSmtpConnection::connect_tokio1(
                (self.host.as_str(), self.port),
                Some(self.timeout),
                &self.hello,
                Some(tls),
                None,
            )
            .await
            .map_err(at_connect)?,
            None => {
                // Our own socket, for TCP_NODELAY: lettre writes an 8BITMIME
                // body and its closing dot in two writes (`Content` keeps
                // them in one otherwise), and with Nagle's algorithm the
                // second waits for the server's delayed ACK (~40 ms per
                // email on Linux).
                let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                    .await
                    .map_err(Failure::Connect)?;
                let _ = stream.set_nodelay(true);
                AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.hello)
                    .await
                    .map_err(at_connect)?
            }
        };
        match (self.security, &self.tls) {
            (SmtpSecurity::StartTls, Some(tls)) => conn.starttls(tls.clone(), &self.hello).await.map_err(at_connect)?,
            (SmtpSecurity::StartTlsOpportunistic, Some(tls)) if conn.can_starttls() => {
                conn.starttls(tls.clone(), &self.hello).await.map_err(at_connect)?;
            }
            _ => {}
        }
        // Before AUTH: EHLO resets the session (RFC 5321 4.1.4).
        let pipelining = match conn.command(Ehlo::new(self.hello.clone())).await {
            Ok(reply) => offers_pipelining(reply.message()),
            Err(e) => return Err(fail(conn, Stage::Connect, e)),
        };
        if let Some(credentials) = &self.credentials {
            progress.set(Stage::Auth);
            if let Err(e) = conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials).await {
                retire(conn);
                return Err(Failure::Smtp(Stage::Auth, e));
            }
        }
        tracing::debug!(
            security = self.security.as_str(),
            encrypted = conn.is_encrypted(),
            pipelining,
            "opened an SMTP connection"
        );
        Ok(Session { conn, pipelining })
    }

    /// MAIL, RCPT, DATA and the content on `session`; the connection goes
    /// back to the pool only if all of it succeeded.
    async fn transact(
        &self,
        session: Session,
        envelope: &Envelope,
        raw: &[u8],
        progress: &Progress,
    ) -> Result<(), Failure> {
        let Session { mut conn, pipelining } = session;
        let mut options = Vec::new();
        let non_ascii_address = envelope
            .to()
            .iter()
            .chain(envelope.from())
            .any(|a| !AsRef::<str>::as_ref(a).is_ascii());
        if non_ascii_address {
            if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
                self.checkin(Session { conn, pipelining });
                return Err(Failure::Unsupported("SMTPUTF8"));
            }
            options.push(MailParameter::SmtpUtfEight);
        }
        // lettre's builder encodes every part as 7-bit; this is for safety.
        if !raw.is_ascii() {
            if !conn.server_info().supports_feature(Extension::EightBitMime) {
                self.checkin(Session { conn, pipelining });
                return Err(Failure::Unsupported("8BITMIME"));
            }
            options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }

        let mail = Mail::new(envelope.from().cloned(), options);
        let rcpts: Vec<Rcpt> = envelope.to().iter().map(|to| Rcpt::new(to.clone(), vec![])).collect();
        progress.set(Stage::Mail);
        if pipelining {
            // One write; then the replies in order. After a refusal the
            // replies still due are never read: the connection is closed.
            if let Err(e) = conn.command(Pipelined { mail, rcpts: &rcpts }).await {
                return Err(fail(conn, Stage::Mail, e));
            }
            progress.set(Stage::Rcpt);
            for _ in &rcpts {
                if let Err(e) = conn.read_response().await {
                    return Err(fail(conn, Stage::Rcpt, e));
                }
            }
            progress.set(Stage::Data);
            if let Err(e) = conn.read_response().await {
                return Err(fail(conn, Stage::Data, e));
            }
        } else {
            if let Err(e) = conn.command(mail).await {
                return Err(fail(conn, Stage::Mail, e));
            }
            progress.set(Stage::Rcpt);
            for rcpt in rcpts {
                if let Err(e) = conn.command(rcpt).await {
                    return Err(fail(conn, Stage::Rcpt, e));
                }
            }
            progress.set(Stage::Data);
            if let Err(e) = conn.command(Data).await {
                return Err(fail(conn, Stage::Data, e));
            }
        }
        progress.set(Stage::Content);
        // lettre's builder makes 7-bit text; bytes that are not UTF-8 (an
        // 8BITMIME body) take lettre's own two writes.
        let sent = match std::str::from_utf8(raw) {
            Ok(text) => conn.command(Content(text)).await,
            Err(_) => conn.message(raw).await,
        };
        if let Err(e) = sent {
            return Err(fail(conn, Stage::Content, e));
        }
        self.checkin(Session { conn, pipelining });
        Ok(())
    }

    fn checkout(&self) -> Option<Session> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(parked) = idle.pop() {
            if parked.since.elapsed() < IDLE_FOR && !parked.session.conn.has_broken() {
                return Some(parked.session);
            }
            retire(parked.session.conn);
        }
        None
    }

    fn checkin(&self, session: Session) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_connections && !session.conn.has_broken() {
            idle.push(Idle {
                session,
                since: Instant::now(),
            });
        } else {
            drop(idle);
            retire(session.conn);
        }
    }

    fn classify(&self, failure: Failure, envelope: &Envelope) -> SendError {
        let timeout = self.timeout;
        let err = match failure {
            Failure::TimedOut(Stage::Content) => SendError::new(
                ErrorClass::Ambiguous,
                format!("SMTP server did not answer the message content within {timeout:?}; it may have accepted it"),
            ),
            Failure::TimedOut(Stage::Waiting) => SendError::new(
                ErrorClass::Transient,
                format!(
                    "no SMTP connection came free within {timeout:?} (all HERALD_SMTP_MAX_CONNECTIONS were busy); nothing was sent"
                ),
            ),
            Failure::TimedOut(stage) => SendError::new(
                ErrorClass::Transient,
                format!(
                    "SMTP server did not answer within {timeout:?} (at {}); nothing was accepted",
                    stage.describe()
                ),
            ),
            Failure::Connect(e) => SendError::new(ErrorClass::Transient, format!("SMTP connection failed: {e}")),
            Failure::Unsupported(extension) => SendError::new(
                ErrorClass::Permanent,
                format!("SMTP server does not support {extension}, which this message needs"),
            ),
            Failure::Smtp(stage, e) => {
                let code = e.status().map(u16::from);
                let class = match (stage, code) {
                    (_, Some(_)) if e.is_transient() => ErrorClass::Transient,
                    // A 5xx about the session is the operator's to fix (see
                    // the module docs); about the message, it is final.
                    (Stage::Connect | Stage::Auth, _) => ErrorClass::Transient,
                    (_, Some(_)) => ErrorClass::Permanent,
                    (Stage::Content, None) => ErrorClass::Ambiguous,
                    (_, None) => ErrorClass::Transient,
                };
                let message = match (stage, code) {
                    (Stage::Connect, _) => format!("SMTP connection failed: {e}"),
                    (Stage::Auth, _) => {
                        format!("SMTP authentication failed: {e} (check the credentials in HERALD_SMTP_URL)")
                    }
                    (Stage::Content, Some(_)) => format!("SMTP server refused the message: {e}"),
                    (Stage::Content, None) => format!(
                        "SMTP connection lost after the message content was sent; it may have been accepted: {e}"
                    ),
                    (stage, Some(_)) => format!("SMTP server refused {}: {e}", stage.describe()),
                    (stage, None) => {
                        format!(
                            "SMTP connection lost at {}: {e}; nothing was accepted",
                            stage.describe()
                        )
                    }
                };
                let err = SendError::new(class, message);
                match code {
                    Some(code) => err.with_status(code),
                    None => err,
                }
            }
        };
        SendError {
            message: self.scrub(err.message.clone(), envelope),
            ..err
        }
    }

    /// Servers may quote the recipient in their replies; a password must
    /// never get out, whatever a server says.
    fn scrub(&self, mut message: String, envelope: &Envelope) -> String {
        for to in envelope.to() {
            let to: &str = to.as_ref();
            message = message.replace(to, &mask_email(to));
        }
        if let Some(password) = self.password.as_deref().filter(|p| p.len() >= 4) {
            message = message.replace(password, "***");
        }
        message
    }
}

/// Whether an EHLO reply's lines (after the greeting) name PIPELINING.
fn offers_pipelining<'a>(mut lines: impl Iterator<Item = &'a str>) -> bool {
    lines.next();
    lines.any(|line| {
        line.split_whitespace()
            .next()
            .is_some_and(|keyword| keyword.eq_ignore_ascii_case("PIPELINING"))
    })
}

/// Closes a connection after an error: politely (QUIT) when the server
/// answered, so it is still in step; at once when the connection broke.
fn fail(conn: AsyncSmtpConnection, stage: Stage, e: SmtpError) -> Failure {
    if e.status().is_some() {
        retire(conn);
    }
    Failure::Smtp(stage, e)
}

/// Says QUIT and closes, off the send's path.
fn retire(mut conn: AsyncSmtpConnection) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(QUIT_WITHIN, conn.abort()).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Endpoint {
        parse_url(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    fn content_is_dot_stuffed_and_ends_with_the_dot_line_in_one_piece() {
        for (text, wire) in [
            ("", "\r\n.\r\n"),
            ("plain", "plain\r\n.\r\n"),
            (".first", "..first\r\n.\r\n"),
            ("a\r\n.\r\nb", "a\r\n..\r\nb\r\n.\r\n"),
            ("a\r\n..b\r\n.", "a\r\n...b\r\n..\r\n.\r\n"),
            ("a\r\n.\r\n.\r\n", "a\r\n..\r\n..\r\n\r\n.\r\n"),
            // Only a dot after CRLF starts a line (lettre's rule too).
            ("a\n.b\r.c", "a\n.b\r.c\r\n.\r\n"),
            ("x.y\r\n", "x.y\r\n\r\n.\r\n"),
        ] {
            assert_eq!(Content(text).to_string(), wire, "{text:?}");
        }
        // Undoing the stuffing gives the text back, and the only line that
        // is a lone dot is the last.
        let text = ".a\r\n..\r\n.\r\nb.\r\n\r\n.";
        let wire = Content(text).to_string();
        let body = wire.strip_suffix("\r\n.\r\n").expect("ends with the dot line");
        let lines: Vec<&str> = body.split("\r\n").collect();
        assert!(lines.iter().all(|l| *l != "."), "{lines:?}");
        let undone: Vec<&str> = lines.iter().map(|l| l.strip_prefix('.').unwrap_or(l)).collect();
        assert_eq!(undone.join("\r\n"), text);
    }

    #[test]
    fn pipelining_is_read_from_the_ehlo_keywords_not_the_greeting() {
        assert!(offers_pipelining(
            ["mx.example.com", "SIZE 1000", "pipelining", "8BITMIME"].into_iter()
        ));
        assert!(!offers_pipelining(
            ["PIPELINING ready", "SIZE 1000", "8BITMIME"].into_iter()
        ));
        assert!(!offers_pipelining(
            ["mx.example.com", "XPIPELINING", "HELP"].into_iter()
        ));
    }

    #[test]
    fn the_url_forms_lettre_accepts_mean_the_same_here() {
        let cases = [
            ("smtp://mail.internal", SmtpSecurity::Plain, 25),
            ("smtp://mail.internal:2525", SmtpSecurity::Plain, 2525),
            ("smtp://mail.internal?tls=required", SmtpSecurity::StartTls, 587),
            (
                "smtp://mail.internal?tls=opportunistic",
                SmtpSecurity::StartTlsOpportunistic,
                587,
            ),
            ("smtps://smtp.example.com", SmtpSecurity::Tls, 465),
            ("smtps://smtp.example.com:1465", SmtpSecurity::Tls, 1465),
        ];
        for (url, security, port) in cases {
            let e = parse(url);
            assert_eq!((e.security, e.port), (security, port), "{url}");
            assert!(e.credentials.is_none());
        }
        let e = parse("smtps://ada%40example.com:p%40ss%3Aw%2Frd@127.0.0.1:465/mx1.example.com");
        assert_eq!(e.host, "127.0.0.1");
        assert_eq!(
            e.credentials,
            Some(("ada@example.com".to_owned(), "p@ss:w/rd".to_owned()))
        );
        assert_eq!(e.hello, ClientId::Domain("mx1.example.com".to_owned()));
        assert_eq!(parse("smtp://[::1]:25").host, "::1");
    }

    #[test]
    fn a_bad_url_is_refused_without_quoting_it() {
        for url in [
            "http://user:hunter22@mx.corp.test",
            "smtp://user:hunter22@mx.corp.test?tls=yes",
            "smtp://user@mx.corp.test",
            "smtp://user:hunter22@:25",
            "user:hunter22@mx.corp.test",
        ] {
            let message = parse_url(url).err().unwrap_or_else(|| panic!("{url} was accepted"));
            assert!(
                !message.contains("hunter22") && !message.contains("mx.corp.test"),
                "{message}"
            );
        }
    }

    #[tokio::test]
    async fn an_unreadable_ca_file_names_the_variable() {
        let err = SmtpTransport::new(
            "smtps://127.0.0.1:465",
            Some(Path::new("/nonexistent/ca.pem")),
            Duration::from_secs(1),
            1,
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("HERALD_SMTP_CA_FILE"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let err = SmtpTransport::new("smtps://127.0.0.1:465", Some(&path), Duration::from_secs(1), 1).unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }
}
