//! Push credentials stay out of the logs, even at `RUST_LOG=trace`: the
//! private keys (FCM service account, APNs .p8, VAPID), the OAuth2 access
//! token and the JWTs Herald signs, and full device tokens.
//!
//! A file of its own: it installs the process-wide subscriber, which a
//! test sharing the process with others could not do reliably.

use std::time::Duration;

use herald_channels::push::{PushMessage, PushSender, Target};
use herald_config::Settings;
use herald_core::{DevicePlatform, Priority, PushProvider};
use herald_testkit::logs::Captured;
use herald_testkit::push_providers::{ApnsStandIn, FcmStandIn, WebPushStandIn, push_env};
use serde_json::json;

/// The lines of a PEM's body long enough to be telling.
fn pem_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 20)
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_credentials_tokens_and_jwts_never_appear_in_trace_logs() {
    let logs = Captured::install_trace();

    let (fcm, apns, web) = (
        FcmStandIn::start().await,
        ApnsStandIn::start().await,
        WebPushStandIn::start().await,
    );
    let settings = Settings::from_map(&push_env(&[fcm.env(), apns.env(), web.env()])).unwrap();
    let sender = PushSender::from_settings(&settings.push_transport, Duration::from_secs(5)).unwrap();
    let sub = web.subscribe();
    let web_token = sub.token();
    let fcm_token = "fcm-device-token-Secret-0123456789abcdef";
    let apns_token = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
    let data = json!({"k": "v"});
    let message = PushMessage {
        delivery_id: "dlv_01J00000000000000000000009",
        notification_id: "ntf_01J00000000000000000000009",
        title: "Hello",
        body: "World",
        data: &data,
        priority: Priority::High,
    };
    let targets = [
        Target {
            device_id: "dev_f",
            provider: PushProvider::Fcm,
            platform: DevicePlatform::Android,
            token: fcm_token,
        },
        Target {
            device_id: "dev_a",
            provider: PushProvider::Apns,
            platform: DevicePlatform::Ios,
            token: apns_token,
        },
        Target {
            device_id: "dev_w",
            provider: PushProvider::WebPush,
            platform: DevicePlatform::Web,
            token: &web_token,
        },
    ];
    for _ in 0..2 {
        let results = sender.send(&message, &targets).await.unwrap();
        assert!(results.iter().all(|r| r.ok), "{results:?}");
    }

    let mut secrets: Vec<String> = Vec::new();
    let fcm_key: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&fcm.credentials_file).unwrap()).unwrap();
    secrets.extend(
        fcm_key["private_key"]
            .as_str()
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 20)
            .map(str::to_owned),
    );
    secrets.extend(pem_lines(&apns.key_file));
    secrets.extend(pem_lines(&web.vapid_key_file));
    // What went over the wire: the access token, the JWTs.
    for r in fcm
        .requests()
        .iter()
        .chain(apns.requests().iter())
        .chain(web.requests().iter())
    {
        if let Some(auth) = r.header("authorization") {
            let credential = auth.rsplit([' ', '=']).next().unwrap_or_default();
            if credential.len() >= 20 {
                secrets.push(credential.to_owned());
            }
            if let Some(t) = auth.strip_prefix("vapid t=").and_then(|v| v.split(',').next()) {
                secrets.push(t.to_owned());
            }
        }
    }
    for r in fcm.token_requests() {
        secrets.push(
            String::from_utf8_lossy(&r.body)
                .split("assertion=")
                .nth(1)
                .unwrap_or_default()
                .to_owned(),
        );
    }
    secrets.extend([fcm_token.to_owned(), apns_token.to_owned(), web_token.clone()]);
    secrets.retain(|s| s.len() >= 20);
    assert!(
        secrets.len() >= 8,
        "the test found the secrets it looks for: {}",
        secrets.len()
    );

    let captured = logs.text();
    assert!(captured.len() > 1_000, "trace logging was captured");
    for secret in &secrets {
        assert!(
            !captured.contains(secret.as_str()),
            "a secret appeared in the trace logs: {}…",
            &secret[..8]
        );
    }
    // The masked form is what the logs may show.
    println!(
        "{} bytes of trace logs checked for {} secrets",
        captured.len(),
        secrets.len()
    );
}
