//! The dashboard in a real browser: Debian's chromium, headless, driven
//! over WebDriver (chromedriver on 127.0.0.1) with fantoccini. The page
//! signs in with the admin token, shows a worker coming online without a
//! reload, approves a pending pairing by typing the code the device shows,
//! lists the device and draws its health chart. Screenshots go to
//! `target/dashboard-screenshots/`; their paths are printed.
//!
//! Needs `chromium` and `chromedriver` (`.ci/run` installs both from apt);
//! without them the test fails and says so.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use mesh_core::storage::StorageExt;
use mesh_policy::runtime::RuntimePolicy;
use mesh_transport::gateway::{Gateway, GatewayConfig};
use serde_json::json;

use crate::node_e2e::{pair, primary_built, worker};

const WAIT: Duration = Duration::from_secs(30);

/// chromedriver on a free loopback port; killed on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find(program: &str, candidates: &[&str]) -> PathBuf {
    for c in candidates {
        let p = PathBuf::from(c);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{program} is not installed (looked in {candidates:?}): install chromium and chromium-driver (apt), as .ci/run does"
    );
}

fn start_driver() -> Driver {
    let driver = find(
        "chromedriver",
        &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"],
    );
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    Driver { child, port }
}

async fn browser(driver: &Driver) -> Client {
    let chromium = find(
        "chromium",
        &["/usr/bin/chromium", "/usr/bin/chromium-browser"],
    );
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium.display().to_string(),
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1200,1800", "--no-first-run", "--disable-extensions"],
        }),
    );
    let url = format!("http://127.0.0.1:{}", driver.port);
    // chromedriver takes a moment to listen.
    for _ in 0..100 {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        if let Ok(c) = ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&url)
            .await
        {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no WebDriver session from chromedriver at {url}");
}

fn shots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    let path = shots().join(name);
    std::fs::write(&path, png).unwrap();
    println!("screenshot: {}", path.canonicalize().unwrap().display());
}

/// Waits until `script` (a JavaScript expression) is truthy in the page.
async fn until(c: &Client, what: &str, script: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = c
            .execute(&format!("return !!({script});"), vec![])
            .await
            .unwrap();
        if v == json!(true) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let body = c
                .execute("return document.body.innerText;", vec![])
                .await
                .unwrap_or_default();
            shot(c, &format!("failed-{}.png", what.replace(' ', "-"))).await;
            panic!("the page never showed {what}; it shows: {body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_signs_in_shows_devices_live_approves_by_code_and_draws_health() {
    let store: Arc<dyn mesh_core::storage::Storage> =
        Arc::new(mesh_core::storage::MemoryStorage::new());
    let (p, _ledger) = primary_built(
        store.clone(),
        |c| c,
        |b| b.policy(Arc::new(RuntimePolicy::new())),
    );
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(
        p.node.clone(),
        GatewayConfig::new("127.0.0.1:0".parse().unwrap(), dir.path())
            .dashboard("Studio", Some("worker --connect ID@127.0.0.1:4433".into())),
    )
    .await
    .unwrap();
    let addr: SocketAddr = gateway.local_addr();
    let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();

    let driver = start_driver();
    let c = browser(&driver).await;
    c.goto(&format!("http://{addr}/")).await.unwrap();

    // Sign in with the admin token.
    c.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(admin.trim())
        .await
        .unwrap();
    c.find(Locator::Css("#login-button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        &c,
        "the signed-in app",
        "!document.querySelector('#app').hidden",
    )
    .await;
    until(
        &c,
        "no devices yet",
        "!document.querySelector('#devices-empty').hidden",
    )
    .await;
    until(
        &c,
        "the primary's fingerprint",
        &format!(
            "document.querySelector('#fingerprint').textContent === {:?}",
            p.node.node_id().fingerprint().to_string()
        ),
    )
    .await;
    shot(&c, "1-signed-in.png").await;

    // A worker pairs and comes online while the page is open: it appears
    // without a reload.
    let (laptop, _) = worker("laptop");
    pair(&p, &laptop, false).await;
    // The hour before, as the primary's health tick stores it (one sample
    // a minute here): the test lasts seconds, the chart shows an hour.
    let now = p.node.now().as_millis();
    for k in 1..=59u64 {
        let sample = mesh_core::storage::records::HealthSample {
            node: laptop.node_id(),
            at: mesh_core::clock::Timestamp::from_millis(now - k * 60_000),
            score: 60 + ((k * 7) % 41) as u8,
            latency_ms: Some(5.0 + (k % 12) as f64 * 6.0),
            battery_percent: Some(80.0),
            memory_percent: Some(40.0),
        };
        store.save(&sample).unwrap();
    }
    until(
        &c,
        "the laptop online",
        "[...document.querySelectorAll('#devices tbody tr')].some(r => r.cells[0].textContent === 'laptop' && r.cells[2].textContent !== 'offline')",
    )
    .await;

    // A second device asks; the user types the code it shows.
    let (phone, _) = worker("phone");
    let ticket = phone
        .request_pairing(p.node.node_id(), p.addr.clone())
        .await
        .unwrap();
    until(
        &c,
        "the pending request",
        "document.querySelectorAll('#pending li').length === 1",
    )
    .await;
    shot(&c, "2-pending-request.png").await;
    let code_box = c
        .find(Locator::Css("#pending li input.code"))
        .await
        .unwrap();
    code_box.send_keys(ticket.code()).await.unwrap();
    c.find(Locator::Css("#pending li button.approve"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    tokio::time::timeout(WAIT, ticket.finished())
        .await
        .expect("the pairing ends in time")
        .expect("approved by the code typed in the browser");
    until(
        &c,
        "the phone listed",
        "[...document.querySelectorAll('#devices tbody tr')].some(r => r.cells[0].textContent === 'phone')",
    )
    .await;
    until(
        &c,
        "no pending requests",
        "document.querySelectorAll('#pending li').length === 0",
    )
    .await;
    shot(&c, "3-approved.png").await;

    // The laptop's detail: metrics and the health chart from stored history.
    let row = c
        .find(Locator::XPath(
            "//table[@id='devices']//td[text()='laptop']",
        ))
        .await
        .unwrap();
    row.click().await.unwrap();
    until(
        &c,
        "the detail",
        "!document.querySelector('#detail').hidden",
    )
    .await;
    until(
        &c,
        "the health chart drawn",
        "Number(document.querySelector('#chart').dataset.points || 0) >= 59",
    )
    .await;
    shot(&c, "4-device-health.png").await;

    // A policy the primary refuses: the error is shown next to its field.
    let hours = c
        .find(Locator::Css("#policy-form input[name=allowedHoursUtc]"))
        .await
        .unwrap();
    hours.send_keys("25:00-26:00").await.unwrap();
    c.find(Locator::Css("#policy-form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        &c,
        "the field's error",
        "document.querySelector('.field-error[data-field=allowedHoursUtc]').textContent.length > 0",
    )
    .await;
    shot(&c, "5-policy-error.png").await;

    // On a phone's width: one column, nothing wider than the screen.
    c.set_window_size(390, 844).await.unwrap();
    until(
        &c,
        "the page fits a phone's width",
        "window.innerWidth <= 400 && document.documentElement.scrollWidth <= window.innerWidth",
    )
    .await;
    c.execute("window.scrollTo(0, 0)", vec![]).await.unwrap();
    shot(&c, "6-phone.png").await;

    c.close().await.unwrap();
    drop(driver);
    laptop.shutdown().await;
    phone.shutdown().await;
    gateway.shutdown().await;
    p.node.shutdown().await;
}
