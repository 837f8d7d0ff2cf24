//! The admin web page in a real headless Chromium, driven over WebDriver
//! (a `chromedriver` this test starts on a free loopback port): sign in,
//! filter failures, open one, dry-run a replay, run it and see it finish.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs
//! them). `HERALD_CHROMEDRIVER` points at another driver;
//! `HERALD_ADMIN_SCREENSHOT=<path>` keeps a copy of the screenshot.

use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use herald_testkit::TestApp;
use herald_testkit::seed::{DeadLetters, seed_dead_letters};
use serde_json::json;

/// A chromedriver child process, killed on drop.
struct Driver {
    child: tokio::process::Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn chromedriver_path() -> String {
    if let Ok(p) = std::env::var("HERALD_CHROMEDRIVER") {
        return p;
    }
    for p in ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"] {
        if std::path::Path::new(p).exists() {
            return p.to_owned();
        }
    }
    panic!(
        "chromedriver not found: install Debian's chromium and chromium-driver \
         (apt-get install -y chromium chromium-driver; .ci/run does) or set HERALD_CHROMEDRIVER"
    );
}

async fn start_driver() -> Driver {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = tokio::process::Command::new(chromedriver_path())
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromedriver");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(res) = reqwest::get(format!("{url}/status")).await
            && res.status().is_success()
        {
            break;
        }
        assert!(Instant::now() < deadline, "chromedriver did not come up on {url}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Driver { child, url }
}

async fn browser(driver: &Driver, profile: &std::path::Path) -> Client {
    let args = vec![
        "--headless".to_owned(),
        "--no-sandbox".to_owned(),
        "--disable-gpu".to_owned(),
        "--disable-dev-shm-usage".to_owned(),
        "--disable-background-networking".to_owned(),
        "--disable-component-update".to_owned(),
        "--disable-sync".to_owned(),
        "--no-first-run".to_owned(),
        "--window-size=1400,1000".to_owned(),
        format!("--user-data-dir={}", profile.display()),
    ];
    let mut options = json!({ "args": args });
    if std::path::Path::new("/usr/bin/chromium").exists() {
        options["binary"] = json!("/usr/bin/chromium");
    }
    let mut caps = serde_json::Map::new();
    caps.insert("goog:chromeOptions".into(), options);
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("open a Chromium session")
}

/// Polls `check` (a JS expression) until it is truthy.
async fn wait_js(c: &Client, what: &str, check: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = c
            .execute(&format!("return !!({check});"), vec![])
            .await
            .expect("execute script");
        if v == json!(true) {
            return;
        }
        if Instant::now() > deadline {
            let body = c
                .execute("return document.body.innerText;", vec![])
                .await
                .unwrap_or_default();
            panic!("timed out waiting for {what} ({check}); the page says:\n{body}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn text_of(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css)).await.expect(css).text().await.expect("text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_signs_in_finds_a_failure_and_replays_it_in_the_browser() {
    let app = TestApp::spawn().await;
    seed_dead_letters(
        app.pool(),
        &DeadLetters {
            count: 20,
            tag: "0001",
            channel: "email",
            error: "SMTP 550 5.1.1 mailbox unavailable",
            error_class: "permanent",
            provider_status: Some(550),
            status: "failed",
            attempts: 1,
            user_prefix: "u_mail_",
            ..DeadLetters::default()
        },
    )
    .await;
    seed_dead_letters(
        app.pool(),
        &DeadLetters {
            count: 15,
            tag: "0002",
            channel: "in_app",
            error: "inbox write timed out",
            error_class: "transient",
            user_prefix: "u_app_",
            offset_secs: 100,
            ..DeadLetters::default()
        },
    )
    .await;

    let driver = start_driver().await;
    let profile = tempfile::tempdir().expect("profile dir");
    let c = browser(&driver, profile.path()).await;
    c.goto(&app.url("/admin")).await.expect("open /admin");

    // Sign in.
    wait_js(&c, "the sign-in form", "!document.getElementById('signin').hidden").await;
    c.find(Locator::Id("key"))
        .await
        .unwrap()
        .send_keys(&app.api_key)
        .await
        .unwrap();
    c.find(Locator::Id("signin-button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(
        &c,
        "the queue table",
        "document.querySelectorAll('#queues-body tr').length === 3",
    )
    .await;
    let queues = text_of(&c, "#queues-body").await;
    assert!(queues.contains("email") && queues.contains("in_app"), "{queues}");
    wait_js(
        &c,
        "the failures list",
        "document.querySelectorAll('tr.delivery-row').length === 35",
    )
    .await;

    // Filter: in-app failures only.
    c.find(Locator::Id("f-channel"))
        .await
        .unwrap()
        .select_by_value("in_app")
        .await
        .unwrap();
    c.find(Locator::Id("search-button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(
        &c,
        "the in-app failures",
        "document.querySelectorAll('tr.delivery-row').length === 15 && \
         [...document.querySelectorAll('tr.delivery-row')].every(r => r.children[2].textContent === 'in_app')",
    )
    .await;

    // Open one: its attempt history.
    c.find(Locator::Css("tr.delivery-row"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(
        &c,
        "the attempt history",
        "!document.getElementById('detail').hidden && document.querySelectorAll('#attempts-body tr').length === 3",
    )
    .await;
    let attempts = text_of(&c, "#attempts-body").await;
    assert!(attempts.contains("inbox write timed out"), "{attempts}");

    // Dry run first: the replay button is only enabled after it.
    let confirm = c.find(Locator::Id("replay-confirm")).await.unwrap();
    assert_eq!(confirm.attr("disabled").await.unwrap().as_deref(), Some("true"));
    c.find(Locator::Id("replay-dry-run"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(
        &c,
        "the dry-run count",
        "document.getElementById('dry-run-result').textContent.includes('15 would be replayed of 15 matched')",
    )
    .await;
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM replays")
            .fetch_one(app.pool())
            .await
            .unwrap(),
        0,
        "a dry run records nothing"
    );

    let png = c.screenshot().await.expect("screenshot");
    let shots = tempfile::tempdir().expect("screenshot dir");
    let shot = shots.path().join("admin-page.png");
    std::fs::write(&shot, &png).expect("write screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "a real page, not a blank one"
    );
    if let Ok(keep) = std::env::var("HERALD_ADMIN_SCREENSHOT") {
        std::fs::copy(&shot, &keep).expect("copy screenshot");
        println!("screenshot: {keep}");
    }

    // The real replay, confirmed in the browser's dialog, followed to its end.
    c.find(Locator::Id("replay-confirm"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.accept_alert().await.expect("confirm the replay");
    wait_js(
        &c,
        "the replay to finish",
        "document.getElementById('replay-state').textContent === 'completed'",
    )
    .await;
    let counts = text_of(&c, "#replay-counts").await;
    assert!(
        counts.contains("15 of 15 processed: 15 replayed, 0 skipped"),
        "{counts}"
    );

    let delivered = app
        .wait_count(
            "SELECT count(*) FROM deliveries WHERE channel = 'in_app' AND status = 'delivered'",
            15,
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(delivered, 15);
    let email_failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE channel = 'email' AND status = 'failed'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(email_failed, 20, "the filter kept email out of the replay");

    c.close().await.expect("close the browser");
    drop(driver);
    app.stop().await;
}
