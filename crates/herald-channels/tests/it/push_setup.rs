//! Building the HTTP push transport from settings: bad credentials name the
//! variable to fix, unconfigured providers fail per device, and nothing
//! secret leaks into errors or debug output.

use std::collections::HashMap;
use std::time::Duration;

use herald_channels::push::{PushMessage, PushSender, PushSetupError, Target};
use herald_config::Settings;
use herald_core::{DevicePlatform, ErrorClass, Priority, PushProvider};
use herald_testkit::push_providers::{ApnsStandIn, FcmStandIn, WebPushStandIn, push_env};
use serde_json::json;

fn build(env: &HashMap<String, String>) -> Result<PushSender, PushSetupError> {
    let settings = Settings::from_map(env).expect("settings");
    PushSender::from_settings(&settings.push_transport, Duration::from_secs(5))
}

fn env_with(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    env.insert("HERALD_PUSH_TRANSPORT".into(), "http".into());
    env
}

fn message(data: &serde_json::Value) -> PushMessage<'_> {
    PushMessage {
        delivery_id: "dlv_1",
        notification_id: "ntf_1",
        title: "Hello",
        body: "World",
        data,
        priority: Priority::Normal,
    }
}

#[test]
fn a_missing_fcm_credentials_file_names_the_variable() {
    let err = build(&env_with(&[("HERALD_FCM_CREDENTIALS_FILE", "/nonexistent/sa.json")])).unwrap_err();
    assert_eq!(err.variable, "HERALD_FCM_CREDENTIALS_FILE");
    assert!(
        err.to_string()
            .starts_with("HERALD_FCM_CREDENTIALS_FILE: cannot read /nonexistent/sa.json"),
        "{err}"
    );
}

#[test]
fn a_credentials_file_without_a_private_key_is_not_a_service_account() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sa.json");
    std::fs::write(
        &file,
        json!({"type": "service_account", "project_id": "p", "client_email": "a@p.iam.gserviceaccount.com",
               "token_uri": "https://oauth2.googleapis.com/token"})
        .to_string(),
    )
    .unwrap();
    let err = build(&env_with(&[("HERALD_FCM_CREDENTIALS_FILE", file.to_str().unwrap())])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "HERALD_FCM_CREDENTIALS_FILE: not a service account: missing private_key"
    );
}

#[test]
fn a_credentials_file_that_is_not_json_or_has_a_bad_key_names_the_variable_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let not_json = dir.path().join("a.json");
    std::fs::write(&not_json, "private_key=-----BEGIN PRIVATE KEY-----hunter2").unwrap();
    let bad_key = dir.path().join("b.json");
    std::fs::write(
        &bad_key,
        json!({"type": "service_account", "project_id": "p", "client_email": "a@p.iam.gserviceaccount.com",
               "token_uri": "https://oauth2.googleapis.com/token",
               "private_key": "-----BEGIN PRIVATE KEY-----\nhunter2\n-----END PRIVATE KEY-----\n"})
        .to_string(),
    )
    .unwrap();
    for file in [not_json, bad_key] {
        let err = build(&env_with(&[("HERALD_FCM_CREDENTIALS_FILE", file.to_str().unwrap())])).unwrap_err();
        assert_eq!(err.variable, "HERALD_FCM_CREDENTIALS_FILE");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}

#[tokio::test]
async fn a_bad_apns_key_or_key_id_names_the_variable() {
    let apns = ApnsStandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("AuthKey.p8");
    std::fs::write(
        &garbage,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();

    let mut env = push_env(&[apns.env()]);
    env.insert("HERALD_APNS_KEY_FILE".into(), garbage.display().to_string());
    let err = build(&env).unwrap_err();
    assert_eq!(err.variable, "HERALD_APNS_KEY_FILE");
    assert!(err.message.contains(".p8"), "{err}");

    let mut env = push_env(&[apns.env()]);
    env.insert("HERALD_APNS_KEY_FILE".into(), "/nonexistent/AuthKey.p8".into());
    assert!(
        build(&env)
            .unwrap_err()
            .to_string()
            .starts_with("HERALD_APNS_KEY_FILE: cannot read")
    );

    let mut env = push_env(&[apns.env()]);
    env.insert("HERALD_APNS_KEY_ID".into(), "short".into());
    assert_eq!(build(&env).unwrap_err().variable, "HERALD_APNS_KEY_ID");
}

#[tokio::test]
async fn a_bad_vapid_key_names_the_variable() {
    let push = WebPushStandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("vapid.pem");
    std::fs::write(&garbage, "not a key").unwrap();
    let mut env = push_env(&[push.env()]);
    env.insert("HERALD_VAPID_PRIVATE_KEY_FILE".into(), garbage.display().to_string());
    let err = build(&env).unwrap_err();
    assert_eq!(err.variable, "HERALD_VAPID_PRIVATE_KEY_FILE");
    assert!(err.message.contains("P-256"), "{err}");
}

#[tokio::test]
async fn a_device_of_a_provider_that_is_not_configured_fails_permanently() {
    let fcm = FcmStandIn::start().await;
    let sender = build(&push_env(&[fcm.env()])).unwrap();
    let data = json!({});
    let targets = [
        Target {
            device_id: "dev_ios",
            provider: PushProvider::Apns,
            platform: DevicePlatform::Ios,
            token: "abcdef",
        },
        Target {
            device_id: "dev_web",
            provider: PushProvider::WebPush,
            platform: DevicePlatform::Web,
            token: "{}",
        },
        Target {
            device_id: "dev_android",
            provider: PushProvider::Fcm,
            platform: DevicePlatform::Android,
            token: "token-a",
        },
    ];

    let results = sender.send(&message(&data), &targets).await.unwrap();

    assert_eq!(results[0].class, Some(ErrorClass::Permanent));
    assert_eq!(
        results[0].error.as_deref(),
        Some("apns is not configured on this Herald")
    );
    assert!(
        !results[0].unregistered,
        "the device is fine; Herald is not set up for it"
    );
    assert_eq!(
        results[1].error.as_deref(),
        Some("webpush is not configured on this Herald")
    );
    assert!(results[2].ok);
}

#[tokio::test]
async fn a_connection_failure_is_transient_and_does_not_reveal_the_device_token() {
    let apns = ApnsStandIn::start().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut env = push_env(&[apns.env()]);
    env.insert("HERALD_APNS_BASE_URL".into(), format!("http://127.0.0.1:{port}"));
    let sender = build(&env).unwrap();
    let token = "feedfacefeedfacefeedfacefeedfacefeedfacefeedfacefeedfacefeedface";
    let data = json!({});
    let target = Target {
        device_id: "dev_1",
        provider: PushProvider::Apns,
        platform: DevicePlatform::Ios,
        token,
    };

    let result = sender.send(&message(&data), &[target]).await.unwrap().remove(0);

    assert_eq!(result.class, Some(ErrorClass::Transient));
    let error = result.error.unwrap();
    assert!(!error.contains("feedface"), "{error}");
}

#[tokio::test]
async fn debug_output_of_the_sender_carries_no_credentials() {
    let fcm = FcmStandIn::start().await;
    let apns = ApnsStandIn::start().await;
    let push = WebPushStandIn::start().await;
    let sender = build(&push_env(&[fcm.env(), apns.env(), push.env()])).unwrap();
    let debug = format!("{sender:?}");
    assert!(!debug.contains("PRIVATE KEY"), "{debug}");
    let service_account = std::fs::read_to_string(&fcm.credentials_file).unwrap();
    let account: serde_json::Value = serde_json::from_str(&service_account).unwrap();
    let key_line = account["private_key"].as_str().unwrap().lines().nth(1).unwrap();
    assert!(!debug.contains(key_line));
}

#[tokio::test]
async fn the_file_transport_still_writes_one_line_per_device() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("push.jsonl");
    let sender = PushSender::file(path.clone()).unwrap();
    let data = json!({"k": "v"});
    let targets = [
        Target {
            device_id: "dev_1",
            provider: PushProvider::Fcm,
            platform: DevicePlatform::Android,
            token: "t1",
        },
        Target {
            device_id: "dev_2",
            provider: PushProvider::Apns,
            platform: DevicePlatform::Ios,
            token: "t2",
        },
    ];
    let results = sender.send(&message(&data), &targets).await.unwrap();
    assert!(results.iter().all(|r| r.ok && r.class.is_none()));
    let lines = std::fs::read_to_string(path).unwrap();
    assert_eq!(lines.lines().count(), 2);
}
