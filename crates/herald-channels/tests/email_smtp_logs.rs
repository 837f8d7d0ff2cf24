//! The SMTP password stays out of the logs, even at `RUST_LOG=trace`.
//!
//! A file of its own: it installs the process-wide subscriber, which a
//! test sharing the process with others could not do reliably (tracing
//! caches per call site whether anyone listens).

use std::time::Duration;

use base64::Engine as _;
use herald_channels::email::{Email, EmailSender};
use herald_config::{EmailTransport as EmailSettings, Secret};
use herald_core::EmailAddress;
use herald_testkit::logs::Captured;
use herald_testkit::smtp::{SmtpSink, SmtpSinkOptions, address};

const FROM: &str = "Herald <herald@example.com>";
const USER: &str = "herald";
const PASSWORD: &str = "Tr4ce-S3cret-Pw";
const WRONG: &str = "Wr0ng-S3cret-Pw";

fn sender_with(url: &str, sink: &SmtpSink) -> EmailSender {
    EmailSender::from_settings(
        &EmailSettings::Smtp { url: Secret::new(url) },
        FROM,
        Duration::from_secs(10),
        Some(&sink.ca_file()),
        16,
    )
    .expect("sender")
}

async fn send_to(sender: &EmailSender, to: &str, delivery_id: &str) -> Result<(), herald_channels::SendError> {
    let to = EmailAddress::parse(to).unwrap();
    sender
        .send(&Email {
            delivery_id,
            to: &to,
            subject: "Hello",
            text: "Hi there",
        })
        .await
}

#[tokio::test]
async fn the_smtp_password_never_appears_in_trace_logs_or_errors() {
    // RUST_LOG=trace for the whole process; `log` records (rustls) too.
    let logs = Captured::install_trace();

    let sink = SmtpSink::start(SmtpSinkOptions::starttls().with_auth(USER, PASSWORD));
    let sender = sender_with(&sink.url(), &sink);
    tracing::info!(?sender, "configured");
    send_to(&sender, &address::accept("ada"), "dlv_trace1").await.unwrap();
    let err = send_to(&sender, &address::tempfail(1, "ada"), "dlv_trace2")
        .await
        .unwrap_err();
    tracing::error!(error = %err, ?err, "send failed");

    let wrong = sender_with(&sink.url_with_credentials(USER, WRONG), &sink);
    let auth_err = send_to(&wrong, &address::accept("ada"), "dlv_trace3")
        .await
        .unwrap_err();
    tracing::error!(error = %auth_err, ?auth_err, "send failed");
    let setup_err = EmailSender::from_settings(
        &EmailSettings::Smtp {
            url: Secret::new(format!("smtp://{USER}:{PASSWORD}@127.0.0.1:25?tls=maybe")),
        },
        FROM,
        Duration::from_secs(1),
        None,
        1,
    )
    .unwrap_err();
    tracing::error!(error = %setup_err, ?setup_err, "set-up failed");
    assert_eq!(sink.messages().len(), 1);

    let text = logs.text();
    for expected in [
        "opened an SMTP connection",
        "SMTP server accepted the message",
        "SMTP send failed",
    ] {
        assert!(text.contains(expected), "`{expected}` was not captured:\n{text}");
    }
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    for secret in [PASSWORD, WRONG] {
        // As given, as AUTH LOGIN sends it, as AUTH PLAIN sends it.
        for form in [secret.to_owned(), b64(secret), b64(&format!("\0{USER}\0{secret}"))] {
            assert!(!text.contains(&form), "`{form}` is in the logs:\n{text}");
        }
    }
}
