//! The SMTP channel against a real SMTP server that is not ours (aiosmtpd,
//! via `herald_testkit::smtp::SmtpSink`): what the server receives, each
//! TLS mode, AUTH, and how every kind of failure is classified.

use std::path::Path;
use std::time::{Duration, Instant};

use herald_channels::SendError;
use herald_channels::email::{Email, EmailSender, SmtpSecurity};
use herald_config::{EmailTransport as EmailSettings, Secret};
use herald_core::{EmailAddress, ErrorClass};
use herald_testkit::smtp::{SmtpSink, SmtpSinkOptions, address};

const FROM: &str = "Herald <herald@example.com>";

fn sender_with(url: &str, ca_file: Option<&Path>, timeout: Duration) -> EmailSender {
    EmailSender::from_settings(
        &EmailSettings::Smtp { url: Secret::new(url) },
        FROM,
        timeout,
        ca_file,
        16,
    )
    .expect("sender")
}

fn sender_for(sink: &SmtpSink) -> EmailSender {
    sender_with(&sink.url(), Some(&sink.ca_file()), Duration::from_secs(10))
}

async fn send_to(sender: &EmailSender, to: &str, delivery_id: &str) -> Result<(), SendError> {
    send(sender, to, delivery_id, "Hello", "Hi there").await
}

async fn send(sender: &EmailSender, to: &str, delivery_id: &str, subject: &str, text: &str) -> Result<(), SendError> {
    let to = EmailAddress::parse(to).expect("test address");
    sender
        .send(&Email {
            delivery_id,
            to: &to,
            subject,
            text,
        })
        .await
}

/// The delivery id of every message the sink received, in order.
fn delivery_ids(sink: &SmtpSink) -> Vec<String> {
    sink.messages()
        .iter()
        .map(|m| m.delivery_id().expect("X-Herald-Delivery-Id").to_owned())
        .collect()
}

fn assert_class(result: Result<(), SendError>, class: ErrorClass, status: Option<u16>) -> SendError {
    let err = result.expect_err("the send should fail");
    assert_eq!((err.class, err.provider_status), (class, status), "{err}");
    err
}

#[tokio::test]
async fn the_server_receives_one_multipart_message_with_its_headers_and_delivery_id() {
    let sink = SmtpSink::start(SmtpSinkOptions::plain());
    let sender = sender_for(&sink);
    assert_eq!(sender.smtp_security(), Some(SmtpSecurity::Plain));
    let to = address::accept("ada");

    send(
        &sender,
        &to,
        "dlv_01JTESTMESSAGE0000000000",
        "Ihre Rechnung – März",
        "Total: 12 €\nThank you <3",
    )
    .await
    .unwrap();

    let got = sink.messages();
    assert_eq!(got.len(), 1, "{got:#?}");
    let m = &got[0];
    assert_eq!(m.from, "herald@example.com");
    assert_eq!(m.to, vec![to.clone()]);
    assert_eq!(m.header("From"), Some(FROM));
    assert_eq!(m.header("To"), Some(to.as_str()));
    assert_eq!(m.subject(), Some("Ihre Rechnung – März"));
    assert_eq!(m.message_id(), Some("<dlv_01JTESTMESSAGE0000000000@herald>"));
    assert_eq!(m.delivery_id(), Some("dlv_01JTESTMESSAGE0000000000"));
    assert!(
        m.header("Content-Type").unwrap().starts_with("multipart/alternative"),
        "{:?}",
        m.header("Content-Type")
    );
    // MIME text travels with CRLF line ends.
    assert_eq!(
        m.text
            .as_deref()
            .map(|t| t.replace("\r\n", "\n"))
            .as_deref()
            .map(str::trim_end),
        Some("Total: 12 €\nThank you <3")
    );
    let html = m.html.as_deref().expect("an HTML part");
    assert!(html.contains("<h1>Ihre Rechnung – März</h1>"), "{html}");
    assert!(
        html.contains("Total: 12 €<br>") && html.contains("Thank you &lt;3"),
        "{html}"
    );
    assert!(!m.tls && m.auth_user.is_none());
}

#[tokio::test]
async fn starttls_is_used_when_the_url_requires_it() {
    let sink = SmtpSink::start(SmtpSinkOptions::starttls());
    assert!(sink.url().ends_with("?tls=required"));
    let sender = sender_for(&sink);
    assert_eq!(sender.smtp_security(), Some(SmtpSecurity::StartTls));

    send_to(&sender, &address::accept("ada"), "dlv_starttls").await.unwrap();

    let got = sink.messages();
    assert_eq!(got.len(), 1);
    assert!(got[0].tls, "the session was not encrypted");
}

#[tokio::test]
async fn implicit_tls_is_used_for_smtps_urls() {
    let sink = SmtpSink::start(SmtpSinkOptions::tls());
    assert!(sink.url().starts_with("smtps://"));
    let sender = sender_for(&sink);
    assert_eq!(sender.smtp_security(), Some(SmtpSecurity::Tls));

    send_to(&sender, &address::accept("ada"), "dlv_smtps").await.unwrap();

    let got = sink.messages();
    assert_eq!(got.len(), 1);
    assert!(got[0].tls, "the session was not encrypted");
}

#[tokio::test]
async fn a_server_certificate_outside_the_trusted_roots_is_a_transient_failure() {
    let sink = SmtpSink::start(SmtpSinkOptions::tls());
    // No HERALD_SMTP_CA_FILE: the sink's private CA is unknown.
    let sender = sender_with(&sink.url(), None, Duration::from_secs(10));

    let err = assert_class(
        send_to(&sender, &address::accept("ada"), "dlv_untrusted").await,
        ErrorClass::Transient,
        None,
    );
    assert!(err.message.contains("certificate"), "{err}");
    assert!(sink.received().is_empty());
}

#[tokio::test]
async fn requiring_starttls_from_a_server_that_does_not_offer_it_is_a_transient_failure() {
    let sink = SmtpSink::start(SmtpSinkOptions::plain());
    let url = format!("smtp://127.0.0.1:{}?tls=required", sink.port());
    let sender = sender_with(&url, Some(&sink.ca_file()), Duration::from_secs(10));

    let err = assert_class(
        send_to(&sender, &address::accept("ada"), "dlv_nostarttls").await,
        ErrorClass::Transient,
        None,
    );
    assert!(err.message.contains("STARTTLS"), "{err}");
    assert!(sink.received().is_empty());
}

#[tokio::test]
async fn valid_credentials_with_reserved_characters_authenticate() {
    let sink = SmtpSink::start(SmtpSinkOptions::starttls().with_auth("herald@example.com", "p@ss:w/rd %1?"));
    let sender = sender_for(&sink);

    send_to(&sender, &address::accept("ada"), "dlv_auth").await.unwrap();

    let got = sink.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].auth_user.as_deref(), Some("herald@example.com"));
    assert!(got[0].tls);
}

#[tokio::test]
async fn a_wrong_password_is_transient_with_code_535_and_is_not_echoed() {
    let sink = SmtpSink::start(SmtpSinkOptions::tls().with_auth("herald", "right-password"));
    let url = sink.url_with_credentials("herald", "wrong-password");
    let sender = sender_with(&url, Some(&sink.ca_file()), Duration::from_secs(10));

    let err = assert_class(
        send_to(&sender, &address::accept("ada"), "dlv_badauth").await,
        ErrorClass::Transient,
        Some(535),
    );
    assert!(err.message.contains("HERALD_SMTP_URL"), "{err}");
    assert!(!err.message.contains("wrong-password"), "{err}");
    assert!(sink.received().is_empty());
}

#[tokio::test]
async fn a_temporary_rejection_is_transient_with_code_451_until_the_server_accepts() {
    let sink = SmtpSink::start(SmtpSinkOptions::plain());
    let sender = sender_for(&sink);
    let to = address::tempfail(2, "ada");

    for _ in 0..2 {
        assert_class(
            send_to(&sender, &to, "dlv_tempfail").await,
            ErrorClass::Transient,
            Some(451),
        );
    }
    send_to(&sender, &to, "dlv_tempfail").await.unwrap();

    let got = sink.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].delivery_id(), Some("dlv_tempfail"));
}

#[tokio::test]
async fn a_permanent_rejection_is_permanent_with_code_550() {
    let sink = SmtpSink::start(SmtpSinkOptions::plain());
    let sender = sender_for(&sink);

    let err = assert_class(
        send_to(&sender, &address::reject("ada"), "dlv_reject").await,
        ErrorClass::Permanent,
        Some(550),
    );
    assert!(err.message.contains("RCPT TO"), "{err}");
    assert!(sink.received().is_empty());
}

#[tokio::test]
async fn a_server_silent_after_the_content_is_ambiguous_and_the_send_returns_at_the_timeout() {
    let sink = SmtpSink::start(SmtpSinkOptions::plain());
    let timeout = Duration::from_millis(1000);
    let sender = sender_with(&sink.url(), None, timeout);

    let started = Instant::now();
    let result = send_to(&sender, &address::slow(4000, "ada"), "dlv_slow").await;
    let took = started.elapsed();

    assert_class(result, ErrorClass::Ambiguous, None);
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(500),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_server_silent_before_the_content_is_transient_and_the_send_returns_at_the_timeout() {
    let sink = SmtpSink::start(SmtpSinkOptions::plain());
    let timeout = Duration::from_millis(1000);
    let sender = sender_with(&sink.url(), None, timeout);

    let started = Instant::now();
    let result = send_to(&sender, &address::slow_rcpt(4000, "ada"), "dlv_slowrcpt").await;
    let took = started.elapsed();

    let err = assert_class(result, ErrorClass::Transient, None);
    assert!(err.message.contains("RCPT TO"), "{err}");
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(500),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_connection_dropped_after_the_content_is_ambiguous() {
    let sink = SmtpSink::start(SmtpSinkOptions::plain());
    let sender = sender_for(&sink);
    let to = address::drop_first(1, "ada");

    assert_class(send_to(&sender, &to, "dlv_drop").await, ErrorClass::Ambiguous, None);
    // The server did get it: that is why it is ambiguous.
    let received = sink.received();
    assert_eq!(received.len(), 1);
    assert!(received[0].dropped);
    assert!(sink.messages().is_empty());

    // The retry carries the same ids, so the receiver can drop the copy.
    send_to(&sender, &to, "dlv_drop").await.unwrap();
    let received = sink.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].message_id(), received[1].message_id());
    assert_eq!(sink.messages().len(), 1);
}

#[tokio::test]
async fn a_refused_connection_is_transient() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let sender = sender_with(&format!("smtp://127.0.0.1:{port}"), None, Duration::from_secs(5));

    let started = Instant::now();
    let err = assert_class(
        send_to(&sender, &address::accept("ada"), "dlv_refused").await,
        ErrorClass::Transient,
        None,
    );
    assert!(err.message.contains("connection"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_server_that_goes_away_and_comes_back_fails_transiently_then_receives() {
    let mut sink = SmtpSink::start(SmtpSinkOptions::plain());
    let sender = sender_for(&sink);
    send_to(&sender, &address::accept("ada"), "dlv_before").await.unwrap();

    sink.stop();
    assert_class(
        send_to(&sender, &address::accept("ada"), "dlv_during").await,
        ErrorClass::Transient,
        None,
    );
    sink.resume();
    send_to(&sender, &address::accept("ada"), "dlv_after").await.unwrap();

    assert_eq!(delivery_ids(&sink), ["dlv_before", "dlv_after"]);
}

#[tokio::test]
async fn a_line_break_in_the_title_or_body_cannot_add_a_header_or_a_message_at_the_server() {
    let sink = SmtpSink::start(SmtpSinkOptions::plain());
    let sender = sender_for(&sink);
    let to = address::accept("ada");

    send(
        &sender,
        &to,
        "dlv_inject",
        "hello\r\nBcc: eve@evil.test\r\nX-Injected: yes",
        "line one\r\n.\r\nMAIL FROM:<eve@evil.test>\r\nRCPT TO:<eve@evil.test>\r\nDATA\r\nSubject: smuggled\r\n",
    )
    .await
    .unwrap();

    let got = sink.received();
    assert_eq!(got.len(), 1, "a second message was smuggled in: {got:#?}");
    let m = &got[0];
    assert_eq!(m.to, vec![to]);
    assert!(
        m.header("Bcc").is_none() && m.header("X-Injected").is_none(),
        "{:?}",
        m.headers
    );
    assert_eq!(m.header_all("Subject").len(), 1);
    assert!(
        !m.raw_headers()
            .lines()
            .any(|l| l.starts_with("Bcc:") || l.starts_with("X-Injected:")),
        "{}",
        m.raw_headers()
    );
    // The would-be commands stayed in the body, as text.
    assert!(m.text.as_deref().unwrap().contains("MAIL FROM:<eve@evil.test>"));
}

#[tokio::test]
async fn lines_that_start_with_a_dot_arrive_as_written() {
    let sink = SmtpSink::start(SmtpSinkOptions::plain());
    let sender = sender_for(&sink);
    let text = ".starts the body\n..two dots\n.\nend.";

    send(&sender, &address::accept("ada"), "dlv_dots", "Dots", text)
        .await
        .unwrap();

    let got = sink.messages();
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(
        got[0]
            .text
            .as_deref()
            .map(|t| t.replace("\r\n", "\n"))
            .as_deref()
            .map(str::trim_end),
        Some(text)
    );
}

#[tokio::test]
async fn consecutive_sends_reuse_one_pooled_connection() {
    let sink = SmtpSink::start(SmtpSinkOptions::starttls());
    let sender = sender_for(&sink);

    for i in 0..3 {
        send_to(&sender, &address::accept("ada"), &format!("dlv_pool{i}"))
            .await
            .unwrap();
    }

    let ports: Vec<_> = sink.messages().iter().map(|m| m.peer_port).collect();
    assert_eq!(ports.len(), 3);
    assert!(ports.iter().all(|p| *p == ports[0]), "{ports:?}");
}

#[tokio::test]
async fn a_pooled_connection_the_server_closed_is_replaced_without_a_failure() {
    let sink = SmtpSink::start(SmtpSinkOptions::plain().with_idle_timeout(Duration::from_millis(300)));
    let sender = sender_for(&sink);

    send_to(&sender, &address::accept("ada"), "dlv_stale1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    send_to(&sender, &address::accept("ada"), "dlv_stale2").await.unwrap();

    let got = sink.messages();
    assert_eq!(got.len(), 2);
    assert_ne!(got[0].peer_port, got[1].peer_port);
}

#[tokio::test]
async fn concurrent_sends_all_arrive_once() {
    let sink = SmtpSink::start(SmtpSinkOptions::tls());
    let sender = sender_for(&sink);

    let sends = (0..8).map(|i| {
        let sender = sender.clone();
        tokio::spawn(async move { send_to(&sender, &address::accept("ada"), &format!("dlv_many{i}")).await })
    });
    for handle in futures::future::join_all(sends).await {
        handle.unwrap().unwrap();
    }

    let mut ids = delivery_ids(&sink);
    ids.sort();
    assert_eq!(ids, (0..8).map(|i| format!("dlv_many{i}")).collect::<Vec<_>>());
}

#[tokio::test]
async fn commands_go_in_one_write_to_a_server_that_offers_pipelining_and_one_at_a_time_otherwise() {
    for (options, pipelined) in [
        (SmtpSinkOptions::starttls(), true),
        (SmtpSinkOptions::starttls().without_pipelining(), false),
    ] {
        let sink = SmtpSink::start(options);
        let sender = sender_for(&sink);
        // The second send reuses the pooled connection, which remembers
        // what its server offered.
        for i in 0..2 {
            send_to(&sender, &address::accept("ada"), &format!("dlv_pipe{i}"))
                .await
                .unwrap();
        }
        let got = sink.messages();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].peer_port, got[1].peer_port);
        for m in &got {
            assert_eq!(m.pipelined, pipelined, "{}", m.raw_headers());
            assert!(m.tls);
        }
    }
}

#[tokio::test]
async fn each_reply_is_classified_at_its_own_stage_with_or_without_pipelining() {
    for options in [SmtpSinkOptions::plain(), SmtpSinkOptions::plain().without_pipelining()] {
        let sink = SmtpSink::start(options);
        let sender = sender_for(&sink);

        let err = assert_class(
            send_to(&sender, &address::tempfail(1, "ada"), "dlv_stage1").await,
            ErrorClass::Transient,
            Some(451),
        );
        assert!(err.message.contains("RCPT TO"), "{err}");
        let err = assert_class(
            send_to(&sender, &address::reject("bob"), "dlv_stage2").await,
            ErrorClass::Permanent,
            Some(550),
        );
        assert!(err.message.contains("RCPT TO"), "{err}");
        // A refused RCPT leaves the DATA reply unread on that connection,
        // which is closed: the next send starts clean and arrives once.
        send_to(&sender, &address::tempfail(1, "ada"), "dlv_stage3")
            .await
            .unwrap();
        send_to(&sender, &address::accept("cy"), "dlv_stage4").await.unwrap();

        assert_eq!(delivery_ids(&sink), ["dlv_stage3", "dlv_stage4"]);
    }
}

#[tokio::test]
async fn no_more_connections_open_than_the_sender_was_told_and_all_of_them_stay_open() {
    let sink = SmtpSink::start(SmtpSinkOptions::plain());
    let round = |sender: EmailSender, round: usize| async move {
        let sends = (0..8).map(|i| {
            let sender = sender.clone();
            tokio::spawn(async move { send_to(&sender, &address::accept("ada"), &format!("dlv_r{round}_{i}")).await })
        });
        for handle in futures::future::join_all(sends).await {
            handle.unwrap().unwrap();
        }
    };
    let ports = |round: usize| -> std::collections::BTreeSet<u16> {
        sink.messages()
            .iter()
            .filter(|m| m.delivery_id().unwrap().starts_with(&format!("dlv_r{round}_")))
            .map(|m| m.peer_port)
            .collect()
    };
    for (connections, round1, round2) in [(8, 1, 2), (2, 3, 4)] {
        let sender = EmailSender::from_settings(
            &EmailSettings::Smtp {
                url: Secret::new(sink.url()),
            },
            FROM,
            Duration::from_secs(10),
            None,
            connections,
        )
        .unwrap();
        // Eight sends at once: with eight allowed, eight connections; with
        // two, two, and the other six sends wait for them (all arrive).
        round(sender.clone(), round1).await;
        round(sender, round2).await;
        let (first, second) = (ports(round1), ports(round2));
        assert_eq!(first.len(), connections, "{first:?}");
        // All of them were kept open: the next round opens none.
        assert_eq!(second, first, "allowed {connections}: {first:?} then {second:?}");
    }
}
