//! Email: a multipart (text + HTML) message built with lettre, sent over
//! SMTP ([`smtp`]) or written to an `.eml` file for development.
//!
//! Every message carries a stable `Message-ID` and an `X-Herald-Delivery-Id`
//! derived from the delivery id, so a receiver can drop the duplicate that
//! at-least-once delivery may produce.

pub mod smtp;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use herald_config::EmailTransport as EmailSettings;
use herald_core::{EmailAddress, ErrorClass};
use lettre::Message;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, header};

pub use self::smtp::SmtpSecurity;
use self::smtp::SmtpTransport;
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
    // The id goes into two headers verbatim; ours are `dlv_<ulid>`, so
    // anything else (a line break above all) is refused rather than encoded.
    if email.delivery_id.is_empty()
        || !email
            .delivery_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(SendError::new(
            ErrorClass::Permanent,
            "delivery id is not usable in a Message-ID",
        ));
    }
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
    // The envelope given, so that `build()` does not parse it back out of
    // the From and To headers it was just given (lettre keeps headers
    // encoded, so that parse would be paid on every email).
    let envelope = lettre::address::Envelope::new(Some(from.email.clone()), vec![to.email.clone()])
        .map_err(|e| SendError::new(ErrorClass::Permanent, format!("message could not be built: {e}")))?;
    Message::builder()
        .envelope(envelope)
        .from(from.clone())
        .to(to)
        .subject(subject)
        .message_id(Some(format!("<{}@herald>", email.delivery_id)))
        .header(XHeraldDeliveryId(email.delivery_id.to_owned()))
        .multipart(MultiPart::alternative_plain_html(email.text.to_owned(), html))
        .map_err(|e| SendError::new(ErrorClass::Permanent, format!("message could not be built: {e}")))
}

/// Where emails go.
#[derive(Debug, Clone)]
enum Transport {
    /// `<dir>/<delivery id>.eml` (development).
    File { dir: PathBuf },
    /// Shared by every clone of the sender, so they share its pool.
    Smtp(Arc<SmtpTransport>),
}

/// Why the email channel cannot start; each names the variable to fix and
/// never echoes the SMTP URL (it may hold a password).
#[derive(Debug, thiserror::Error)]
pub enum EmailSetupError {
    #[error("HERALD_SMTP_URL is not a usable SMTP URL: {0}")]
    SmtpUrl(String),
    #[error("HERALD_SMTP_CA_FILE `{0}`: {1}")]
    CaFile(String, String),
    #[error("HERALD_EMAIL_FROM `{0}` is not a valid mailbox (e.g. `Herald <herald@example.com>`)")]
    From(String),
    #[error("HERALD_EMAIL_DIR `{0}` cannot be created: {1}")]
    Dir(String, std::io::Error),
}

/// The configured sender. Cheap to clone; clones share the SMTP pool.
#[derive(Debug, Clone)]
pub struct EmailSender {
    from: Mailbox,
    transport: Transport,
}

impl EmailSender {
    /// Builds the sender from `HERALD_EMAIL_TRANSPORT` (and `HERALD_SMTP_URL`),
    /// `HERALD_EMAIL_FROM`, `HERALD_SEND_TIMEOUT_SECS` and
    /// `HERALD_SMTP_CA_FILE`. Opens no connection: an unreachable server
    /// shows up as transient failures of the first sends, not as a worker
    /// that cannot start. At most `connections` SMTP connections are open
    /// at once (`HERALD_SMTP_MAX_CONNECTIONS`): a send beyond them waits
    /// for one to finish, within its timeout; they stay open between sends
    /// (30 s idle).
    pub fn from_settings(
        settings: &EmailSettings,
        from: &str,
        timeout: Duration,
        smtp_ca_file: Option<&Path>,
        connections: usize,
    ) -> Result<Self, EmailSetupError> {
        let from: Mailbox = from.parse().map_err(|_| EmailSetupError::From(from.to_owned()))?;
        let transport = match settings {
            EmailSettings::File { dir } => {
                std::fs::create_dir_all(dir).map_err(|e| EmailSetupError::Dir(dir.display().to_string(), e))?;
                Transport::File { dir: dir.clone() }
            }
            EmailSettings::Smtp { url } => Transport::Smtp(Arc::new(SmtpTransport::new(
                url.expose(),
                smtp_ca_file,
                timeout,
                connections,
            )?)),
        };
        Ok(Self { from, transport })
    }

    /// How the SMTP connection is secured; `None` for the file transport.
    #[must_use]
    pub fn smtp_security(&self) -> Option<SmtpSecurity> {
        match &self.transport {
            Transport::File { .. } => None,
            Transport::Smtp(smtp) => Some(smtp.security()),
        }
    }

    /// Sends one email. Over SMTP the whole conversation (connect, TLS,
    /// AUTH, MAIL, RCPT, DATA, the final reply) is bounded by the timeout,
    /// and a failure is classified by how far it got (see [`smtp`]).
    pub async fn send(&self, email: &Email<'_>) -> Result<(), SendError> {
        let message = build_message(&self.from, email)?;
        match &self.transport {
            Transport::File { dir } => write_eml(dir, email.delivery_id, &message.formatted()).await,
            Transport::Smtp(smtp) => smtp.send(email.delivery_id, &message).await,
        }
    }
}

async fn write_eml(dir: &Path, delivery_id: &str, bytes: &[u8]) -> Result<(), SendError> {
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

    fn from() -> Mailbox {
        "Herald <herald@example.com>".parse().unwrap()
    }

    #[test]
    fn a_title_with_a_line_break_cannot_add_a_header() {
        let to = EmailAddress::parse("ada@example.com").unwrap();
        let msg = build_message(
            &from(),
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

    #[test]
    fn the_envelope_is_the_from_and_to_of_the_headers() {
        let to = EmailAddress::parse("Ada.Lovelace+news@example.com").unwrap();
        let msg = build_message(
            &from(),
            &Email {
                delivery_id: "dlv_01JABCDEFGHJKMNPQRSTVWXYZ1",
                to: &to,
                subject: "Hi",
                text: "body",
            },
        )
        .unwrap();
        let envelope = msg.envelope();
        assert_eq!(
            envelope.from().map(ToString::to_string).as_deref(),
            Some("herald@example.com")
        );
        let rcpt: Vec<String> = envelope.to().iter().map(ToString::to_string).collect();
        assert_eq!(rcpt, ["Ada.Lovelace+news@example.com"]);
        let text = String::from_utf8(msg.formatted()).unwrap();
        assert!(text.contains("From: Herald <herald@example.com>\r\n"), "{text}");
        assert!(text.contains("To: Ada.Lovelace+news@example.com\r\n"), "{text}");
    }

    #[test]
    fn a_delivery_id_with_a_line_break_is_refused_rather_than_put_in_a_header() {
        let to = EmailAddress::parse("ada@example.com").unwrap();
        for id in ["dlv_x\r\nBcc: eve@evil.test", "dlv x", "<dlv>", ""] {
            let err = build_message(
                &from(),
                &Email {
                    delivery_id: id,
                    to: &to,
                    subject: "Hi",
                    text: "body",
                },
            )
            .unwrap_err();
            assert_eq!(err.class, ErrorClass::Permanent, "{id:?}");
        }
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
            None,
            1,
        )
        .unwrap();
        assert_eq!(sender.smtp_security(), None);
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
