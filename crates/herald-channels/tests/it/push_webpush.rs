//! Web Push against the stand-in: VAPID, RFC 8291 encryption (checked by an
//! independent implementation), classification, and the SSRF guard.

use std::collections::HashMap;
use std::time::Duration;

use herald_channels::push::{DeviceResult, PushMessage, PushSender, Target};
use herald_config::Settings;
use herald_core::{DevicePlatform, ErrorClass, PushProvider};
use herald_testkit::push_providers::{
    BrowserSubscription, Reply, WebPushStandIn, decrypt_independently, jwt_claims, push_env,
};
use serde_json::{Value, json};

fn sender(env: &HashMap<String, String>) -> PushSender {
    let settings = Settings::from_map(env).expect("settings");
    PushSender::from_settings(&settings.push_transport, Duration::from_secs(5)).expect("push sender")
}

fn message<'a>(delivery_id: &'a str, data: &'a Value, priority: &'a str) -> PushMessage<'a> {
    PushMessage {
        delivery_id,
        notification_id: "ntf_01J0000000000000000000000A",
        title: "Your order shipped",
        body: "It arrives on Tuesday.",
        data,
        priority: priority.parse().expect("a priority"),
    }
}

fn web_target<'a>(device_id: &'a str, token: &'a str) -> Target<'a> {
    Target {
        device_id,
        provider: PushProvider::WebPush,
        platform: DevicePlatform::Web,
        token,
    }
}

async fn send_token(sender: &PushSender, token: &str, priority: &str) -> DeviceResult {
    let data = json!({"order_id": 42});
    let results = sender
        .send(
            &message("dlv_01J00000000000000000000001", &data, priority),
            &[web_target("dev_1", token)],
        )
        .await
        .expect("send");
    results.into_iter().next().expect("one result")
}

async fn send_to(sender: &PushSender, sub: &BrowserSubscription) -> DeviceResult {
    send_token(sender, &sub.token(), "high").await
}

#[tokio::test]
async fn the_vapid_header_verifies_and_the_payload_decrypts_with_an_independent_implementation() {
    let push = WebPushStandIn::start().await;
    let sender = sender(&push_env(&[push.env()]));
    let sub = push.subscribe();

    let result = send_to(&sender, &sub).await;

    assert!(result.ok, "{result:?}");
    let requests = push.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.answered, 201, "the stand-in verified the VAPID JWT against k=");
    assert_eq!(r.path, sub.path());
    let auth = r.header("authorization").unwrap();
    let (t, k) = auth
        .strip_prefix("vapid t=")
        .and_then(|rest| rest.split_once(", k="))
        .expect("vapid t=…, k=…");
    assert_eq!(k, push.vapid_public_key);
    let claims = jwt_claims(t);
    assert_eq!(claims["aud"], push.base_url, "aud is the endpoint's origin");
    assert_eq!(claims["sub"], push.vapid_subject);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = claims["exp"].as_u64().unwrap();
    assert!(exp > now && exp <= now + 24 * 3600, "exp within 24 hours");
    assert_eq!(r.header("content-encoding"), Some("aes128gcm"));
    assert_eq!(r.header("urgency"), Some("high"));
    assert_eq!(r.header("topic"), Some("dlv_01J00000000000000000000001"));
    assert!(r.header("ttl").unwrap().parse::<u64>().unwrap() > 0);

    let plaintext = decrypt_independently(&sub, &r.body).expect("http_ece decrypts the body");
    let payload: Value = serde_json::from_slice(&plaintext).unwrap();
    assert_eq!(payload["title"], "Your order shipped");
    assert_eq!(payload["body"], "It arrives on Tuesday.");
    assert_eq!(payload["herald_delivery_id"], "dlv_01J00000000000000000000001");
    assert_eq!(payload["data"]["order_id"], 42);
}

#[tokio::test]
async fn urgency_follows_the_priority() {
    let push = WebPushStandIn::start().await;
    let sender = sender(&push_env(&[push.env()]));
    let token = push.subscribe().token();
    for priority in ["high", "normal", "low"] {
        assert!(send_token(&sender, &token, priority).await.ok);
    }
    let urgencies: Vec<String> = push
        .requests()
        .iter()
        .map(|r| r.header("urgency").unwrap().to_owned())
        .collect();
    assert_eq!(urgencies, ["high", "normal", "low"]);
}

#[tokio::test]
async fn a_gone_or_unknown_subscription_is_disabled() {
    let push = WebPushStandIn::start().await;
    let sender = sender(&push_env(&[push.env()]));
    let (gone, unknown) = (push.subscribe(), push.subscribe());
    push.fail_subscription(&gone, Reply::webpush_gone());
    push.fail_subscription(&unknown, Reply::webpush(404));

    for (sub, status) in [(&gone, 410), (&unknown, 404)] {
        let result = send_to(&sender, sub).await;
        assert!(result.unregistered, "{result:?}");
        assert_eq!(result.class, Some(ErrorClass::Permanent));
        assert_eq!(result.provider_status, Some(status));
        assert!(result.error.unwrap().contains("unsubscribed"));
    }
}

#[tokio::test]
async fn too_many_requests_is_rate_limited_and_server_errors_are_transient() {
    let push = WebPushStandIn::start().await;
    let sender = sender(&push_env(&[push.env()]));
    let sub = push.subscribe();
    push.fail_next(1, Reply::webpush_too_many_requests(Some(60)));
    push.fail_next(1, Reply::webpush(503));

    let limited = send_to(&sender, &sub).await;
    let down = send_to(&sender, &sub).await;

    assert_eq!(limited.class, Some(ErrorClass::RateLimited));
    assert_eq!(limited.retry_after, Some(Duration::from_secs(60)));
    assert_eq!(down.class, Some(ErrorClass::Transient));
    assert_eq!(down.provider_status, Some(503));
    assert!(!limited.unregistered && !down.unregistered);
}

#[tokio::test]
async fn redirects_are_never_followed() {
    let push = WebPushStandIn::start().await;
    let elsewhere = WebPushStandIn::start().await;
    let sender = sender(&push_env(&[push.env()]));
    let sub = push.subscribe();
    let target = elsewhere.subscribe();
    push.fail_subscription(&sub, Reply::redirect(307, &target.endpoint));

    let result = send_to(&sender, &sub).await;

    assert!(!result.ok);
    assert_eq!(result.class, Some(ErrorClass::Permanent));
    assert_eq!(result.provider_status, Some(307));
    assert!(elsewhere.requests().is_empty(), "the redirect was not followed");
}

#[tokio::test]
async fn without_the_test_switch_loopback_private_and_http_endpoints_are_refused_before_any_request() {
    let push = WebPushStandIn::start().await;
    let mut env = push_env(&[push.env()]);
    env.insert("HERALD_WEBPUSH_ALLOW_LOOPBACK".into(), "false".into());
    let sender = sender(&env);
    let sub = push.subscribe();
    let port = reqwest::Url::parse(&push.base_url).unwrap().port().unwrap();
    let endpoints = [
        sub.endpoint.clone(),                          // http://127.0.0.1:port: not https
        format!("https://127.0.0.1:{port}/push/x"),    // loopback literal
        format!("https://localhost:{port}/push/x"),    // a name resolving to loopback
        "https://10.0.0.1/push/x".to_owned(),          // private
        "https://172.16.5.4/push/x".to_owned(),        // private
        "https://192.168.1.10/push/x".to_owned(),      // private
        "https://169.254.169.254/latest".to_owned(),   // link-local (cloud metadata)
        "https://100.64.0.1/push/x".to_owned(),        // CGNAT
        "https://[::1]/push/x".to_owned(),             // IPv6 loopback
        "https://[fd00::1]/push/x".to_owned(),         // unique local
        "https://[fe80::1]/push/x".to_owned(),         // link-local
        "https://[::ffff:10.0.0.1]/push/x".to_owned(), // IPv4-mapped private
        "https://0.0.0.0/push/x".to_owned(),           // unspecified
    ];
    for endpoint in endpoints {
        let token = json!({"endpoint": endpoint, "keys": {"p256dh": sub.p256dh, "auth": sub.auth}}).to_string();
        let result = send_token(&sender, &token, "normal").await;
        assert!(!result.ok, "{endpoint} must be refused");
        assert!(result.unregistered, "{endpoint}: {result:?}");
        assert_eq!(result.class, Some(ErrorClass::Permanent));
        let error = result.error.unwrap();
        assert!(error.contains("endpoint refused"), "{endpoint}: {error}");
    }
    assert!(push.requests().is_empty(), "nothing reached the stand-in");
}

#[tokio::test]
async fn a_malformed_subscription_is_refused_and_disabled() {
    let push = WebPushStandIn::start().await;
    let sender = sender(&push_env(&[push.env()]));
    let sub = push.subscribe();
    for token in [
        "not json".to_owned(),
        json!({"endpoint": sub.endpoint}).to_string(),
        json!({"endpoint": sub.endpoint, "keys": {"p256dh": "AAAA", "auth": sub.auth}}).to_string(),
        json!({"endpoint": sub.endpoint, "keys": {"p256dh": sub.p256dh, "auth": "AAAA"}}).to_string(),
    ] {
        let result = send_token(&sender, &token, "normal").await;
        assert!(result.unregistered, "{token}: {result:?}");
        assert!(result.error.unwrap().starts_with("not a Web Push subscription"));
    }
    assert!(push.requests().is_empty());
}
