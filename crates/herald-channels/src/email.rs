//! Email: a multipart (text + HTML) message built with lettre, sent over
//! SMTP or written to an `.eml` file for development.
//!
//! Every message carries a stable `Message-ID` and an `X-Herald-Delivery-Id`
//! derived from the delivery id, so a receiver can drop the duplicate that
//! at-least-once delivery may produce.

use std::path::PathBuf;
use std::time::Duration;

use herald_config::EmailTransport as EmailSettings;
use herald_core::{EmailAddress, ErrorClass};
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, header};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::SendError;

/// The parts of a notification an email is made of.
#[derive(Debug, Clone)]
pub struct Email<'a> {
    pub delivery_id: &'a str,
    pub to: &'a EmailAddress,
    pub subject: &'a str,
    pub text: &'a str,
}

#[derive(Debug, Clone)]
struct XHeraldDeliveryId(String);

impl header::Header for XHeraldDeliveryId {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("X-Herald-Delivery-Id")
    }

    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Self(s.to_owned()))
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), self.0.clone())
    }
}

/// Escapes text for the HTML part.
fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' => out.push_str("<br>\n"),
            c => out.push(c),
        }
    }
    out
}

/// Builds the message. Subject and addresses are typed header values:
/// lettre encodes them, so a CR/LF in a title cannot start a new header.
pub fn build_message(from: &Mailbox, email: &Email<'_>) -> Result<Message, SendError> {
    let to: Mailbox = email
        .to
        .as_str()
        .parse()
        .map_err(|e| SendError::new(ErrorClass::Permanent, format!("recipient address rejected: {e}")))?;
    // A subject is one line; lettre would encode a line break safely, but
    // a title never needs one.
    let subject = email.subject.replace(['\r', '\n'], " ");
    let html = format!(
        "<!doctype html><html><body><h1>{}</h1><p>{}</p></body></html>",
        html_escape(&subject),
        html_escape(email.text)
    );
    Message::builder()
        .from(from.clone())
        .to(to)
        .subject(subject)
        .message_id(Some(format!("<{}@herald>", email.delivery_id)))
        .header(XHeraldDeliveryId(email.delivery_id.to_owned()))
        .multipart(MultiPart::alternative_plain_html(email.text.to_owned(), html))
        .map_err(|e| SendError::new(ErrorClass::Permanent, format!("message could not be built: {e}")))
}

/// Where emails go.
#[derive(Clone)]
pub enum EmailTransport {
    /// `<dir>/<delivery id>.eml` (development).
    File { dir: PathBuf },
    Smtp {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        timeout: Duration,
    },
}

impl std::fmt::Debug for EmailTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File { dir } => f.debug_struct("File").field("dir", dir).finish(),
            Self::Smtp { timeout, .. } => f.debug_struct("Smtp").field("timeout", timeout).finish_non_exhaustive(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EmailSetupError {
    #[error("HERALD_SMTP_URL is not a valid SMTP URL: {0}")]
    SmtpUrl(String),
    #[error("HERALD_EMAIL_FROM `{0}` is not a valid mailbox (e.g. `Herald <herald@example.com>`)")]
    From(String),
    #[error("HERALD_EMAIL_DIR `{0}` cannot be created: {1}")]
    Dir(String, std::io::Error),
}

/// The configured sender.
#[derive(Debug, Clone)]
pub struct EmailSender {
    from: Mailbox,
    transport: EmailTransport,
}

impl EmailSender {
    pub fn from_settings(settings: &EmailSettings, from: &str, timeout: Duration) -> Result<Self, EmailSetupError> {
        let from: Mailbox = from.parse().map_err(|_| EmailSetupError::From(from.to_owned()))?;
        let transport = match settings {
            EmailSettings::File { dir } => {
                std::fs::create_dir_all(dir).map_err(|e| EmailSetupError::Dir(dir.display().to_string(), e))?;
                EmailTransport::File { dir: dir.clone() }
            }
            EmailSettings::Smtp { url } => EmailTransport::Smtp {
                // The URL may hold credentials: the error must not echo it.
                transport: AsyncSmtpTransport::<Tokio1Executor>::from_url(url.expose())
                    .map_err(|e| EmailSetupError::SmtpUrl(e.to_string().replace(url.expose(), "***")))?
                    .timeout(Some(timeout))
                    .build(),
                timeout,
            },
        };
        Ok(Self { from, transport })
    }

    /// Sends one email; the whole SMTP conversation is bounded by the
    /// timeout (lettre's own only covers single reads and writes).
    pub async fn send(&self, email: &Email<'_>) -> Result<(), SendError> {
        let message = build_message(&self.from, email)?;
        match &self.transport {
            EmailTransport::File { dir } => write_eml(dir, email.delivery_id, &message.formatted()).await,
            EmailTransport::Smtp { transport, timeout } => {
                match tokio::time::timeout(*timeout, transport.send(message)).await {
                    Err(_) => Err(SendError::new(
                        ErrorClass::Ambiguous,
                        format!("SMTP conversation took longer than {timeout:?}"),
                    )),
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(classify_smtp(&e)),
                }
            }
        }
    }
}

/// 4xx → transient, 5xx → permanent, anything else (connection, TLS) →
/// transient: nothing was accepted yet.
fn classify_smtp(e: &lettre::transport::smtp::Error) -> SendError {
    let status = e.status().map(u16::from);
    let class = if e.is_permanent() {
        ErrorClass::Permanent
    } else {
        ErrorClass::Transient
    };
    let err = SendError::new(class, format!("SMTP: {e}"));
    match status {
        Some(s) => err.with_status(s),
        None => err,
    }
}

async fn write_eml(dir: &std::path::Path, delivery_id: &str, bytes: &[u8]) -> Result<(), SendError> {
    // Written aside and renamed, so a reader never sees half a message.
    let tmp = dir.join(format!(".{delivery_id}.eml.tmp"));
    let path = dir.join(format!("{delivery_id}.eml"));
    let io = |e: std::io::Error| SendError::new(ErrorClass::Transient, format!("writing {}: {e}", path.display()));
    tokio::fs::write(&tmp, bytes).await.map_err(io)?;
    tokio::fs::rename(&tmp, &path).await.map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_title_with_a_line_break_cannot_add_a_header() {
        let from: Mailbox = "Herald <herald@example.com>".parse().unwrap();
        let to = EmailAddress::parse("ada@example.com").unwrap();
        let msg = build_message(
            &from,
            &Email {
                delivery_id: "dlv_01JABCDEFGHJKMNPQRSTVWXYZ0",
                to: &to,
                subject: "hello\r\nBcc: eve@evil.test",
                text: "body",
            },
        )
        .unwrap();
        let text = String::from_utf8(msg.formatted()).unwrap();
        assert!(!text.lines().any(|l| l.starts_with("Bcc:")), "{text}");
        assert!(text.contains("X-Herald-Delivery-Id: dlv_01JABCDEFGHJKMNPQRSTVWXYZ0"));
        assert!(text.contains("Message-ID: <dlv_01JABCDEFGHJKMNPQRSTVWXYZ0@herald>"));
        assert!(text.contains("text/plain") && text.contains("text/html"));
    }

    #[tokio::test]
    async fn the_file_transport_writes_one_eml_per_delivery() {
        let dir = tempfile::tempdir().unwrap();
        let sender = EmailSender::from_settings(
            &EmailSettings::File {
                dir: dir.path().to_owned(),
            },
            "Herald <herald@example.com>",
            Duration::from_secs(5),
        )
        .unwrap();
        let to = EmailAddress::parse("ada@example.com").unwrap();
        sender
            .send(&Email {
                delivery_id: "dlv_x",
                to: &to,
                subject: "Hi",
                text: "<b>x</b>",
            })
            .await
            .unwrap();
        let eml = std::fs::read_to_string(dir.path().join("dlv_x.eml")).unwrap();
        assert!(eml.contains("To: ada@example.com"));
        assert!(eml.contains("&lt;b&gt;x&lt;/b&gt;"));
    }
}
