//! APNs against the HTTP/2 stand-in: headers, provider JWT, payload, and
//! how Apple's documented answers are classified.

use std::collections::HashMap;
use std::time::Duration;

use herald_channels::push::{DeviceResult, PushMessage, PushOptions, PushSender, Target};
use herald_config::Settings;
use herald_core::{DevicePlatform, ErrorClass, PushProvider};
use herald_testkit::push_providers::{ApnsStandIn, Reply, jwt_claims, jwt_header, push_env};
use serde_json::{Value, json};

const TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

fn sender_with(env: &HashMap<String, String>, options: PushOptions) -> PushSender {
    let settings = Settings::from_map(env).expect("settings");
    PushSender::from_settings_with(&settings.push_transport, Duration::from_secs(5), options).expect("push sender")
}

fn sender(env: &HashMap<String, String>) -> PushSender {
    sender_with(env, PushOptions::default())
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

fn apns_target<'a>(device_id: &'a str, token: &'a str) -> Target<'a> {
    Target {
        device_id,
        provider: PushProvider::Apns,
        platform: DevicePlatform::Ios,
        token,
    }
}

async fn send_one(sender: &PushSender, token: &str, priority: &str) -> DeviceResult {
    let data = json!({});
    let results = sender
        .send(&message("dlv_1", &data, priority), &[apns_target("dev_1", token)])
        .await
        .expect("send");
    results.into_iter().next().expect("one result")
}

fn bearer(request: &herald_testkit::push_providers::RecordedRequest) -> String {
    request
        .header("authorization")
        .and_then(|v| v.strip_prefix("bearer "))
        .expect("a bearer provider token")
        .to_owned()
}

#[tokio::test]
async fn a_push_goes_over_http2_with_the_documented_headers_and_payload() {
    let apns = ApnsStandIn::start().await;
    let sender = sender(&push_env(&[apns.env()]));
    let data = json!({"order_id": 42});
    let delivery_id = "dlv_01J00000000000000000000001";

    let results = sender
        .send(&message(delivery_id, &data, "high"), &[apns_target("dev_1", TOKEN)])
        .await
        .unwrap();

    assert!(results[0].ok, "{results:?}");
    let requests = apns.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.version, "HTTP/2.0");
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, format!("/3/device/{TOKEN}"));
    assert_eq!(r.header("apns-topic"), Some(apns.topic.as_str()));
    assert_eq!(r.header("apns-push-type"), Some("alert"));
    assert_eq!(r.header("apns-priority"), Some("10"));
    assert_eq!(r.header("apns-collapse-id"), Some(delivery_id));
    let apns_id = r.header("apns-id").unwrap();
    assert_eq!(apns_id.len(), 36, "a canonical UUID: {apns_id}");
    let jwt = bearer(r);
    assert_eq!(jwt_header(&jwt)["alg"], "ES256");
    assert_eq!(jwt_header(&jwt)["kid"], apns.key_id);
    assert_eq!(jwt_claims(&jwt)["iss"], apns.team_id);
    assert!(jwt_claims(&jwt)["iat"].is_u64());
    let body = r.json();
    assert_eq!(
        body["aps"],
        json!({"alert": {"title": "Your order shipped", "body": "It arrives on Tuesday."}})
    );
    assert_eq!(body["herald_delivery_id"], delivery_id);
    assert_eq!(body["order_id"], 42);
}

#[tokio::test]
async fn normal_and_low_priority_are_sent_with_apns_priority_5() {
    let apns = ApnsStandIn::start().await;
    let sender = sender(&push_env(&[apns.env()]));
    assert!(send_one(&sender, TOKEN, "normal").await.ok);
    assert!(send_one(&sender, TOKEN, "low").await.ok);
    let priorities: Vec<String> = apns
        .requests()
        .iter()
        .map(|r| r.header("apns-priority").unwrap().to_owned())
        .collect();
    assert_eq!(priorities, ["5", "5"]);
}

#[tokio::test]
async fn the_collapse_id_is_the_same_for_every_attempt_of_a_delivery() {
    let apns = ApnsStandIn::start().await;
    let sender = sender(&push_env(&[apns.env()]));
    apns.fail_next(1, Reply::apns_service_unavailable());
    assert!(!send_one(&sender, TOKEN, "normal").await.ok);
    assert!(send_one(&sender, TOKEN, "normal").await.ok);
    let requests = apns.requests();
    assert_eq!(requests[0].header("apns-collapse-id"), Some("dlv_1"));
    assert_eq!(requests[1].header("apns-collapse-id"), Some("dlv_1"));
    assert_ne!(requests[0].header("apns-id"), requests[1].header("apns-id"));
}

#[tokio::test]
async fn the_provider_jwt_is_reused_across_sends() {
    let apns = ApnsStandIn::start().await;
    let sender = sender(&push_env(&[apns.env()]));
    for _ in 0..3 {
        assert!(send_one(&sender, TOKEN, "normal").await.ok);
    }
    let jwts: Vec<String> = apns.requests().iter().map(bearer).collect();
    assert_eq!(jwts.len(), 3);
    assert!(jwts.iter().all(|j| *j == jwts[0]));
}

#[tokio::test]
async fn an_expired_provider_token_is_transient_and_replaced_on_the_next_send() {
    let apns = ApnsStandIn::start().await;
    let options = PushOptions {
        apns_token_min_interval: Duration::ZERO,
        ..PushOptions::default()
    };
    let sender = sender_with(&push_env(&[apns.env()]), options);
    apns.fail_next(1, Reply::apns_expired_provider_token());

    let first = send_one(&sender, TOKEN, "normal").await;
    // `iat` has a resolution of one second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = send_one(&sender, TOKEN, "normal").await;

    assert_eq!(first.class, Some(ErrorClass::Transient));
    assert_eq!(first.provider_status, Some(403));
    assert!(!first.unregistered);
    assert!(second.ok, "{second:?}");
    let requests = apns.requests();
    let (old, new) = (bearer(&requests[0]), bearer(&requests[1]));
    assert_ne!(old, new, "a new provider JWT");
    assert!(jwt_claims(&new)["iat"].as_u64() > jwt_claims(&old)["iat"].as_u64());
}

#[tokio::test]
async fn a_provider_jwt_younger_than_twenty_minutes_is_kept_even_when_apns_calls_it_expired() {
    let apns = ApnsStandIn::start().await;
    let sender = sender(&push_env(&[apns.env()]));
    apns.fail_next(1, Reply::apns_expired_provider_token());
    assert!(!send_one(&sender, TOKEN, "normal").await.ok);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(send_one(&sender, TOKEN, "normal").await.ok);
    let requests = apns.requests();
    assert_eq!(bearer(&requests[0]), bearer(&requests[1]));
}

#[tokio::test]
async fn a_provider_jwt_is_replaced_once_it_reaches_the_refresh_age() {
    let apns = ApnsStandIn::start().await;
    let options = PushOptions {
        apns_token_refresh: Duration::from_secs(1),
        ..PushOptions::default()
    };
    let sender = sender_with(&push_env(&[apns.env()]), options);
    assert!(send_one(&sender, TOKEN, "normal").await.ok);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(send_one(&sender, TOKEN, "normal").await.ok);
    let requests = apns.requests();
    assert_ne!(bearer(&requests[0]), bearer(&requests[1]));
}

#[tokio::test]
async fn apple_s_documented_errors_are_classified_per_device_in_parallel() {
    let apns = ApnsStandIn::start().await;
    let sender = sender(&push_env(&[apns.env()]));
    let tokens = ["aa01", "aa02", "aa03", "aa04", "aa05", "aa06", "aa07"];
    apns.fail_token(tokens[1], Reply::apns_unregistered());
    apns.fail_token(tokens[2], Reply::apns_bad_device_token());
    apns.fail_token(tokens[3], Reply::apns(400, "DeviceTokenNotForTopic"));
    apns.fail_token(tokens[4], Reply::apns_too_many_requests().retry_after(9));
    apns.fail_token(tokens[5], Reply::apns_service_unavailable());
    apns.fail_token(tokens[6], Reply::apns(400, "BadCollapseId"));
    let device_ids: Vec<String> = (0..tokens.len()).map(|i| format!("dev_{i}")).collect();
    let targets: Vec<Target<'_>> = tokens.iter().zip(&device_ids).map(|(t, d)| apns_target(d, t)).collect();
    let data = json!({});

    let results = sender
        .send(&message("dlv_mixed", &data, "normal"), &targets)
        .await
        .unwrap();

    let summary: Vec<(bool, Option<ErrorClass>, bool, Option<u16>)> = results
        .iter()
        .map(|r| (r.ok, r.class, r.unregistered, r.provider_status))
        .collect();
    assert_eq!(
        summary,
        [
            (true, None, false, None),
            (false, Some(ErrorClass::Permanent), true, Some(410)),
            (false, Some(ErrorClass::Permanent), true, Some(400)),
            (false, Some(ErrorClass::Permanent), true, Some(400)),
            (false, Some(ErrorClass::RateLimited), false, Some(429)),
            (false, Some(ErrorClass::Transient), false, Some(503)),
            (false, Some(ErrorClass::Permanent), false, Some(400)),
        ]
    );
    assert_eq!(results[4].retry_after, Some(Duration::from_secs(9)));
    assert!(results[1].error.as_deref().unwrap().contains("Unregistered"));
    assert_eq!(
        results.iter().map(|r| r.device_id.as_str()).collect::<Vec<_>>(),
        device_ids
    );
}

#[tokio::test]
async fn a_token_that_is_not_hex_is_refused_without_a_request() {
    let apns = ApnsStandIn::start().await;
    let sender = sender(&push_env(&[apns.env()]));
    let result = send_one(&sender, "../../admin?x=1", "normal").await;
    assert!(result.unregistered);
    assert_eq!(result.class, Some(ErrorClass::Permanent));
    assert!(apns.requests().is_empty());
}
