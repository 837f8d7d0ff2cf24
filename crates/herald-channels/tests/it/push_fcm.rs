//! FCM HTTP v1 against the stand-in: what Herald sends (OAuth2 token
//! exchange, bearer auth, payload) and how it reads the answers.

use std::collections::HashMap;
use std::time::Duration;

use herald_channels::push::{DeviceResult, PushMessage, PushSender, Target};
use herald_config::Settings;
use herald_core::{DevicePlatform, ErrorClass, PushProvider};
use herald_testkit::push_providers::{FcmStandIn, Reply, jwt_claims, push_env};
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

fn fcm_target<'a>(device_id: &'a str, token: &'a str) -> Target<'a> {
    Target {
        device_id,
        provider: PushProvider::Fcm,
        platform: DevicePlatform::Android,
        token,
    }
}

async fn send_one(sender: &PushSender, token: &str) -> DeviceResult {
    let data = json!({});
    let results = sender
        .send(&message("dlv_1", &data, "normal"), &[fcm_target("dev_1", token)])
        .await
        .expect("send");
    results.into_iter().next().expect("one result")
}

#[tokio::test]
async fn one_access_token_serves_many_sends_and_the_message_carries_the_delivery_id() {
    let fcm = FcmStandIn::start().await;
    let sender = sender(&push_env(&[fcm.env()]));
    let data = json!({"order_id": 42, "kind": "shipped"});
    let targets = [fcm_target("dev_a", "token-a"), fcm_target("dev_b", "token-b")];
    for delivery in ["dlv_one", "dlv_two", "dlv_three"] {
        let results = sender.send(&message(delivery, &data, "high"), &targets).await.unwrap();
        assert!(results.iter().all(|r| r.ok), "{results:?}");
    }

    let token_requests = fcm.token_requests();
    assert_eq!(token_requests.len(), 1, "the access token is cached");
    let form: HashMap<String, String> = url::form_urlencoded::parse(&token_requests[0].body)
        .into_owned()
        .collect();
    assert_eq!(form["grant_type"], "urn:ietf:params:oauth:grant-type:jwt-bearer");
    let claims = jwt_claims(&form["assertion"]);
    assert_eq!(claims["iss"], fcm.client_email);
    assert_eq!(claims["aud"], fcm.token_uri);
    assert_eq!(claims["scope"], "https://www.googleapis.com/auth/firebase.messaging");

    let sends = fcm.requests();
    assert_eq!(sends.len(), 6);
    assert!(sends.iter().all(|r| r.answered == 200));
    let first = &sends[0];
    assert_eq!(first.path, format!("/v1/projects/{}/messages:send", fcm.project_id));
    assert!(
        first
            .header("authorization")
            .unwrap()
            .starts_with("Bearer ya29.stand-in-")
    );
    let sent = first.json();
    let m = &sent["message"];
    assert!(m["token"] == "token-a" || m["token"] == "token-b");
    assert_eq!(
        m["notification"],
        json!({"title": "Your order shipped", "body": "It arrives on Tuesday."})
    );
    assert_eq!(m["data"]["herald_delivery_id"], "dlv_one");
    assert_eq!(m["data"]["order_id"], "42", "FCM data values are strings");
    assert_eq!(m["data"]["kind"], "shipped");
    assert_eq!(m["android"]["priority"], "HIGH");
    assert_eq!(m["apns"]["headers"]["apns-priority"], "10");
}

#[tokio::test]
async fn normal_priority_is_sent_as_normal_on_android_and_5_on_apns() {
    let fcm = FcmStandIn::start().await;
    let sender = sender(&push_env(&[fcm.env()]));
    assert!(send_one(&sender, "token-a").await.ok);
    let m = &fcm.requests()[0].json()["message"];
    assert_eq!(m["android"]["priority"], "NORMAL");
    assert_eq!(m["apns"]["headers"]["apns-priority"], "5");
}

#[tokio::test]
async fn concurrent_sends_wait_for_a_single_token_request() {
    let fcm = FcmStandIn::start().await;
    let sender = sender(&push_env(&[fcm.env()]));
    let sends = (0..10).map(|_| send_one(&sender, "token-a"));
    let results = futures::future::join_all(sends).await;
    assert!(results.iter().all(|r| r.ok));
    assert_eq!(fcm.token_requests().len(), 1);
    assert_eq!(fcm.requests().len(), 10);
}

#[tokio::test]
async fn a_revoked_access_token_is_refreshed_once_and_the_send_goes_through() {
    let fcm = FcmStandIn::start().await;
    let sender = sender(&push_env(&[fcm.env()]));
    assert!(send_one(&sender, "token-a").await.ok);
    fcm.revoke_access_tokens();

    let result = send_one(&sender, "token-a").await;

    assert!(result.ok, "{result:?}");
    assert_eq!(fcm.token_requests().len(), 2);
    let answered: Vec<u16> = fcm.requests().iter().map(|r| r.answered).collect();
    assert_eq!(answered, [200, 401, 200]);
}

#[tokio::test]
async fn a_401_with_a_fresh_token_too_is_transient() {
    let fcm = FcmStandIn::start().await;
    let sender = sender(&push_env(&[fcm.env()]));
    fcm.fail_next(2, Reply::fcm_unauthenticated());

    let result = send_one(&sender, "token-a").await;

    assert!(!result.ok);
    assert_eq!(result.class, Some(ErrorClass::Transient));
    assert_eq!(result.provider_status, Some(401));
    assert!(!result.unregistered);
    assert_eq!(fcm.token_requests().len(), 2, "one refresh, not more");
    assert_eq!(fcm.requests().len(), 2);
}

#[tokio::test]
async fn an_access_token_is_refreshed_before_it_expires() {
    let fcm = FcmStandIn::start().await;
    fcm.set_token_lifetime(1);
    let sender = sender(&push_env(&[fcm.env()]));
    assert!(send_one(&sender, "token-a").await.ok);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(send_one(&sender, "token-a").await.ok);
    assert_eq!(fcm.token_requests().len(), 2);
    assert!(fcm.requests().iter().all(|r| r.answered == 200));
}

#[tokio::test]
async fn an_unregistered_token_disables_the_device_and_says_why() {
    let fcm = FcmStandIn::start().await;
    let sender = sender(&push_env(&[fcm.env()]));
    fcm.fail_token("gone-token", Reply::fcm_unregistered());

    let result = send_one(&sender, "gone-token").await;

    assert!(!result.ok);
    assert!(result.unregistered);
    assert_eq!(result.class, Some(ErrorClass::Permanent));
    assert_eq!(result.provider_status, Some(404));
    let error = result.error.unwrap();
    assert!(error.contains("UNREGISTERED"), "{error}");
    assert!(!error.contains("gone-token"), "errors never carry the token: {error}");
}

#[tokio::test]
async fn an_invalid_argument_about_the_token_disables_the_device() {
    let fcm = FcmStandIn::start().await;
    let sender = sender(&push_env(&[fcm.env()]));
    fcm.fail_token("bad-token", Reply::fcm_invalid_token());
    fcm.fail_token(
        "good-token",
        Reply::fcm_error(
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "Invalid JSON payload received.",
        ),
    );

    let bad = send_one(&sender, "bad-token").await;
    let payload_problem = send_one(&sender, "good-token").await;

    assert!(bad.unregistered);
    assert_eq!(bad.class, Some(ErrorClass::Permanent));
    assert!(
        !payload_problem.unregistered,
        "a payload problem is not the device's fault"
    );
    assert_eq!(payload_problem.class, Some(ErrorClass::Permanent));
}

#[tokio::test]
async fn quota_exceeded_is_rate_limited_for_as_long_as_retry_after_says() {
    let fcm = FcmStandIn::start().await;
    let sender = sender(&push_env(&[fcm.env()]));
    fcm.fail_next(1, Reply::fcm_quota_exceeded(Some(42)));

    let result = send_one(&sender, "token-a").await;

    assert_eq!(result.class, Some(ErrorClass::RateLimited));
    assert_eq!(result.provider_status, Some(429));
    assert_eq!(result.retry_after, Some(Duration::from_secs(42)));
    assert!(!result.unregistered);
}

#[tokio::test]
async fn unavailable_and_internal_errors_are_transient_and_keep_retry_after() {
    let fcm = FcmStandIn::start().await;
    let sender = sender(&push_env(&[fcm.env()]));
    fcm.fail_next(1, Reply::fcm_unavailable(Some(7)));
    fcm.fail_next(1, Reply::fcm_internal());

    let unavailable = send_one(&sender, "token-a").await;
    let internal = send_one(&sender, "token-a").await;

    assert_eq!(unavailable.class, Some(ErrorClass::Transient));
    assert_eq!(unavailable.provider_status, Some(503));
    assert_eq!(unavailable.retry_after, Some(Duration::from_secs(7)));
    assert_eq!(internal.class, Some(ErrorClass::Transient));
    assert_eq!(internal.provider_status, Some(500));
}

#[tokio::test]
async fn parallel_sends_to_several_devices_report_each_device_in_order() {
    let fcm = FcmStandIn::start().await;
    let sender = sender(&push_env(&[fcm.env()]));
    fcm.fail_token("t-gone", Reply::fcm_unregistered());
    fcm.fail_token("t-slow", Reply::fcm_quota_exceeded(Some(5)));
    fcm.fail_token("t-down", Reply::fcm_unavailable(None));
    let targets = [
        fcm_target("dev_ok1", "t-ok1"),
        fcm_target("dev_gone", "t-gone"),
        fcm_target("dev_slow", "t-slow"),
        fcm_target("dev_down", "t-down"),
        fcm_target("dev_ok2", "t-ok2"),
    ];
    let data = json!({});

    let results = sender
        .send(&message("dlv_mixed", &data, "normal"), &targets)
        .await
        .unwrap();

    let summary: Vec<(&str, bool, Option<ErrorClass>, bool)> = results
        .iter()
        .map(|r| (r.device_id.as_str(), r.ok, r.class, r.unregistered))
        .collect();
    assert_eq!(
        summary,
        [
            ("dev_ok1", true, None, false),
            ("dev_gone", false, Some(ErrorClass::Permanent), true),
            ("dev_slow", false, Some(ErrorClass::RateLimited), false),
            ("dev_down", false, Some(ErrorClass::Transient), false),
            ("dev_ok2", true, None, false),
        ]
    );
    assert_eq!(fcm.requests().len(), 5);
    assert_eq!(fcm.token_requests().len(), 1);
}
