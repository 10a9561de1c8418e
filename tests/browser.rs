//! The admin pages in a real browser (headless Chromium over WebDriver) against two running
//! agents: sign in, create a connection to the second agent and see its token exactly once,
//! approve a pending transfer and see it in the history, watch an in-flight transfer's counters
//! move, suspend the connection with a reason and
//! see it suspended on the second agent, change the incoming settings, use a phone-sized screen,
//! sign out. Also: the forms' CSRF protection, checked with plain HTTP requests.
//!
//! Screenshots go to a temporary directory, or to `DBSYNC_SCREENSHOTS` when set (the ones in
//! `docs/screenshots/` come from `DBSYNC_SCREENSHOTS=docs/screenshots cargo test --test main
//! browser`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use dbsync_agent::audit::Actor;
use dbsync_agent::connection::{ConflictStrategy, ConnectionFilter, ConnectionStatus};
use dbsync_agent::pull::PullOptions;
use dbsync_agent::settings::IncomingMode;
use dbsync_agent::transfer::{
    NewTransfer, Progress, TransferDirection, TransferFilter, TransferStatus, Transport,
};
use reqwest::StatusCode;
use reqwest::redirect::Policy;

use crate::pull::exec;
use crate::support::agents::{Options, start};
use crate::support::browser::Browser;

const PREFIX: &str = "/admin/db-sync";

fn shots_dir(scratch: &tempfile::TempDir) -> PathBuf {
    std::env::var("DBSYNC_SCREENSHOTS").map_or_else(
        |_| scratch.path().to_path_buf(),
        |dir| {
            // Relative to the repository, not to the test's working directory.
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir);
            std::fs::create_dir_all(&dir).unwrap();
            dir
        },
    )
}

/// Every visible form control has a label (or an aria-label).
async fn assert_labelled(browser: &Browser, page: &str) {
    let unlabelled = browser
        .eval(
            "return [...document.querySelectorAll('input:not([type=hidden]), select, textarea, button')]
                .filter(e => e.tagName === 'BUTTON' ? !(e.textContent.trim() || e.getAttribute('aria-label'))
                                                    : !((e.labels && e.labels.length) || e.getAttribute('aria-label')))
                .map(e => e.name || e.id || e.outerHTML);",
        )
        .await;
    assert_eq!(
        unlabelled,
        serde_json::json!([]),
        "{page}: controls without a label"
    );
}

/// Nothing is wider than the screen (no sideways scrolling of the page itself).
async fn assert_fits(browser: &Browser, page: &str) {
    let overflow = browser
        .eval("return document.documentElement.scrollWidth - window.innerWidth;")
        .await;
    assert!(
        overflow.as_i64().unwrap_or(1) <= 0,
        "{page}: wider than the screen by {overflow}px"
    );
}

async fn wait_until<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_pages_in_a_real_browser() {
    let test = "browser::admin_pages_in_a_real_browser";
    let Some(browser) = Browser::start(test).await else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let shots = shots_dir(&scratch);
    let a = start(test, Options::default()).await.unwrap();
    let b = start(test, Options::default()).await.unwrap();
    let system = Actor::admin("setup");
    b.agent
        .store
        .set_incoming(IncomingMode::AutoAccept, None, &system, b.agent.now())
        .await
        .unwrap();
    exec(
        &a,
        &[
            "CREATE TABLE users (id BIGINT PRIMARY KEY, email TEXT NOT NULL)".to_owned(),
            "INSERT INTO users VALUES (1, 'ada@example.com'), (2, 'grace@example.com'), (3, 'edsger@example.com')".to_owned(),
        ],
    )
    .await;
    let (_, admin_token) = a
        .agent
        .store
        .create_admin_token("ops", &system, a.agent.now())
        .await
        .unwrap();
    let admin_token = admin_token.expose().to_owned();
    let base = a.url.trim_end_matches('/').to_owned();

    // Unauthenticated: the pages send the browser to the sign-in page.
    browser.goto(&format!("{base}{PREFIX}/connections")).await;
    assert!(
        browser
            .client
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with("/login")
    );
    assert_labelled(&browser, "login").await;
    browser.screenshot(&shots.join("login.png")).await;
    browser.fill("#token", "dbsa_not-a-real-token").await;
    browser.click("form button[type=submit]").await;
    let alert = browser.text("[role=alert]").await;
    assert!(alert.contains("unknown"), "{alert}");
    browser.fill("#token", &admin_token).await;
    browser.click("form button[type=submit]").await;
    assert_eq!(browser.text("main h1").await, "Overview");
    assert!(browser.text("header .who").await.contains("admin:ops"));

    // The session cookie is HttpOnly and SameSite=Strict.
    let cookie = browser
        .client
        .get_named_cookie("dbsync_session")
        .await
        .unwrap();
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(format!("{:?}", cookie.same_site()), "Some(Strict)");
    assert_eq!(
        browser
            .eval("return document.cookie.includes('dbsync_session');")
            .await,
        serde_json::json!(false),
        "scripts cannot read the session cookie"
    );
    let session_cookie = format!("dbsync_session={}", cookie.value());

    // Create a connection to b that needs approval per transfer.
    browser.goto(&format!("{base}{PREFIX}/connections")).await;
    assert_labelled(&browser, "connections").await;
    browser.fill("#name", "to-b").await;
    browser.fill("#site_url", &b.url).await;
    browser
        .find("#approval_mode")
        .await
        .select_by_value("require_approval")
        .await
        .unwrap();
    browser.fill("#max_downloads", "10").await;
    browser.fill("#max_records_total", "1000").await;
    browser.fill("#allowed_tables", "users").await;
    browser.click("form.connection button[type=submit]").await;
    assert_eq!(browser.text("main h1").await, "Connection token");
    assert!(
        browser
            .text("#registration")
            .await
            .contains("accepted it and it is active"),
        "{}",
        browser.text("#registration").await
    );
    let token = browser
        .find("#token-value")
        .await
        .prop("value")
        .await
        .unwrap()
        .unwrap();
    assert!(token.starts_with("dbs_"), "{token}");
    browser
        .find("button[data-copy]")
        .await
        .click()
        .await
        .unwrap();
    browser.screenshot(&shots.join("token.png")).await;

    // The token is never shown again: not in the list, not on the connection's page.
    let connection = a
        .agent
        .store
        .get_connection("to-b")
        .await
        .expect("created on a");
    assert_eq!(connection.status, ConnectionStatus::Active);
    assert_eq!(connection.max_downloads, Some(10));
    assert_eq!(connection.allowed_tables, ["users"]);
    browser.goto(&format!("{base}{PREFIX}/connections")).await;
    assert!(!browser.source().await.contains(&token));
    assert!(
        browser
            .text("tr[data-connection=to-b]")
            .await
            .contains("active")
    );
    browser.screenshot(&shots.join("connections.png")).await;
    browser
        .goto(&format!("{base}{PREFIX}/connections/{}", connection.id))
        .await;
    assert!(!browser.source().await.contains(&token));

    // b holds the receiver connection; its pull waits for approval on a.
    let receiver = b
        .agent
        .store
        .list_connections(&ConnectionFilter::default())
        .await
        .unwrap()
        .into_iter()
        .next()
        .expect("registered on b");
    assert_eq!(receiver.status, ConnectionStatus::Active);
    let puller = std::sync::Arc::clone(&b.agent);
    let receiver_name = receiver.name.clone();
    let pull = tokio::spawn(async move {
        puller
            .pull(
                &receiver_name,
                &PullOptions {
                    tables: Some(vec!["users".into()]),
                    approval_wait: Some(Duration::from_secs(60)),
                    ..PullOptions::default()
                },
                |_| {},
            )
            .await
    });
    let store = a.agent.store.clone();
    wait_until("a pending transfer on a", || {
        let store = store.clone();
        async move {
            store
                .list_transfers(&TransferFilter {
                    status: Some(TransferStatus::PendingApproval),
                    ..TransferFilter::default()
                })
                .await
                .unwrap()
                .total
                == 1
        }
    })
    .await;

    // The overview lists it; approve it from the history page.
    browser.goto(&format!("{base}{PREFIX}")).await;
    assert!(
        browser
            .text("tr[data-status=pending_approval]")
            .await
            .contains("users")
    );
    browser.screenshot(&shots.join("overview.png")).await;
    browser.goto(&format!("{base}{PREFIX}/history")).await;
    assert_labelled(&browser, "history").await;
    browser
        .click("tr[data-status=pending_approval] form[action$='/approve'] button")
        .await;
    assert!(browser.text("main .flash").await.contains("approved"));
    let summary = tokio::time::timeout(Duration::from_secs(60), pull)
        .await
        .expect("the pull ends after the approval")
        .unwrap()
        .expect("the pull succeeds");
    assert_eq!(summary.tables[0].rows, 3);

    // The history shows the completed transfer, filtered by connection and status.
    browser
        .goto(&format!(
            "{base}{PREFIX}/history?connection=to-b&status=completed&direction=send"
        ))
        .await;
    let row = browser.text("tr[data-table=users]").await;
    assert!(
        row.contains("completed") && row.contains("approved by admin:ops"),
        "{row}"
    );
    browser.screenshot(&shots.join("history.png")).await;

    // In-flight transfers: the page's script refreshes their counters from /history/live.
    let running = a
        .agent
        .store
        .create_transfer(
            NewTransfer {
                connection_id: connection.id,
                direction: TransferDirection::Send,
                table_name: "big_table".into(),
                requires_approval: false,
                records_requested: 0,
                conflict_strategy: ConflictStrategy::Overwrite,
                transport: Some(Transport::Ws),
                requester_ip: None,
                requester_user_agent: None,
            },
            a.agent.config.approval_ttl(),
            &system,
            a.agent.now(),
        )
        .await
        .unwrap();
    a.agent
        .store
        .start_transfer(running.id, a.agent.now())
        .await
        .unwrap();
    let progress = |rows: i64| Progress {
        records_transferred: rows,
        bytes_wire: rows * 40,
        ..Progress::default()
    };
    a.agent
        .store
        .record_progress(running.id, &progress(500))
        .await
        .unwrap();
    // The row estimate recorded at the start gives the progress a percentage.
    a.agent
        .store
        .merge_transfer_metadata(running.id, serde_json::json!({ "estimated_rows": 2_000 }))
        .await
        .unwrap();
    browser.goto(&format!("{base}{PREFIX}/history")).await;
    let live_rows = format!("#live tr[data-id='{}'] [data-field=rows]", running.id);
    let live_percent = format!("#live tr[data-id='{}'] [data-field=percent]", running.id);
    assert_eq!(browser.text(&live_rows).await, "500");
    assert_eq!(browser.text(&live_percent).await, "25 %");
    a.agent
        .store
        .record_progress(running.id, &progress(1_000))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while browser.text(&live_rows).await != "1,500" {
        assert!(
            Instant::now() < deadline,
            "the live counters never refreshed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(browser.text(&live_percent).await, "75 %");
    a.agent
        .store
        .complete_transfer(running.id, a.agent.now())
        .await
        .unwrap();
    let live_rate = format!("#live tr[data-id='{}'] [data-field=rate]", running.id);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !browser.text(&live_rate).await.contains("finished") {
        assert!(
            Instant::now() < deadline,
            "a finished transfer was never marked"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The finished transfer is a bar of the throughput chart (server-rendered SVG).
    browser.goto(&format!("{base}{PREFIX}/history")).await;
    let bar = browser
        .find("svg.throughput rect.bar[data-table=big_table] title")
        .await;
    let title = bar.html(true).await.unwrap();
    assert!(
        title.contains("1,500 rows") && title.contains("rows/s"),
        "{title}"
    );
    browser
        .eval("document.querySelector('svg.throughput').scrollIntoView(); return true;")
        .await;
    browser.screenshot(&shots.join("history-chart.png")).await;
    browser
        .goto(&format!("{base}{PREFIX}/connections/{}", connection.id))
        .await;
    browser
        .find("svg.throughput rect.bar[data-table=big_table]")
        .await;

    // A running transfer is cancelled from the page.
    let doomed = a
        .agent
        .store
        .create_transfer(
            NewTransfer {
                connection_id: connection.id,
                direction: TransferDirection::Send,
                table_name: "doomed".into(),
                requires_approval: false,
                records_requested: 0,
                conflict_strategy: ConflictStrategy::Overwrite,
                transport: Some(Transport::Ws),
                requester_ip: None,
                requester_user_agent: None,
            },
            a.agent.config.approval_ttl(),
            &system,
            a.agent.now(),
        )
        .await
        .unwrap();
    a.agent
        .store
        .start_transfer(doomed.id, a.agent.now())
        .await
        .unwrap();
    browser.goto(&format!("{base}{PREFIX}/history")).await;
    browser
        .click(&format!(
            "#live tr[data-id='{}'] form.cancel button",
            doomed.id
        ))
        .await;
    let flash = browser.text("main .flash").await;
    assert!(flash.contains("doomed cancelled"), "{flash}");
    assert_eq!(
        a.agent.store.get_transfer(doomed.id).await.unwrap().status,
        TransferStatus::Cancelled
    );

    // Suspend with a reason; b learns it.
    browser
        .goto(&format!("{base}{PREFIX}/connections/{}", connection.id))
        .await;
    assert_labelled(&browser, "connection").await;
    browser.fill("#suspend-reason", "maintenance window").await;
    browser.click("form[action$='/suspend'] button").await;
    let flash = browser.text("main .flash").await;
    assert!(
        flash.contains("now suspended") && flash.contains("was told"),
        "{flash}"
    );
    assert!(
        browser
            .text("#suspended-reason")
            .await
            .contains("maintenance window")
    );
    browser.screenshot(&shots.join("connection.png")).await;
    let on_b = b.agent.store.get_connection(&receiver.name).await.unwrap();
    assert_eq!(on_b.status, ConnectionStatus::Suspended);
    let reason_on_b = on_b.suspended_reason.unwrap_or_default();
    assert!(
        reason_on_b.ends_with(": maintenance window"),
        "{reason_on_b}"
    );
    let sent = a
        .agent
        .store
        .list_transfers(&TransferFilter {
            direction: Some(TransferDirection::Send),
            ..TransferFilter::default()
        })
        .await
        .unwrap();
    let users = sent.items.iter().find(|t| t.table_name == "users").unwrap();
    assert_eq!(users.approved_by.as_deref(), Some("admin:ops"));

    // Incoming settings from the overview form.
    browser.goto(&format!("{base}{PREFIX}")).await;
    browser
        .find("#mode")
        .await
        .select_by_value("require_password")
        .await
        .unwrap();
    browser.fill("#password", "incoming-secret").await;
    browser.click("form.settings button[type=submit]").await;
    assert!(
        browser
            .text("main .flash")
            .await
            .contains("require_password")
    );
    let settings = a.agent.store.settings().await.unwrap();
    assert_eq!(settings.incoming_mode, IncomingMode::RequirePassword);
    assert!(settings.incoming_password_matches("incoming-secret"));

    // A phone-sized screen: every page fits its width.
    browser.client.set_window_size(390, 844).await.unwrap();
    for (page, path) in [
        ("overview", PREFIX.to_owned()),
        ("connections", format!("{PREFIX}/connections")),
        (
            "connection",
            format!("{PREFIX}/connections/{}", connection.id),
        ),
        ("history", format!("{PREFIX}/history")),
    ] {
        browser.goto(&format!("{base}{path}")).await;
        assert_fits(&browser, page).await;
    }
    browser.screenshot(&shots.join("history-phone.png")).await;
    browser.client.set_window_size(1280, 900).await.unwrap();

    // CSRF: the same session without the form's token, with a wrong one, or from another
    // origin is refused and changes nothing.
    let http = reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap();
    let reactivate = format!("{base}{PREFIX}/connections/{}/reactivate", connection.id);
    for (body, origin) in [
        (String::new(), None),
        ("csrf=0000".to_owned(), None),
        ("csrf=".to_owned(), Some("http://evil.example")),
    ] {
        let mut request = http
            .post(&reactivate)
            .header("cookie", &session_cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
    }
    assert_eq!(
        a.agent.store.get_connection("to-b").await.unwrap().status,
        ConnectionStatus::Suspended,
        "refused forms changed nothing"
    );
    // Without a session: a page redirects to sign-in, a form post is refused.
    let response = http.get(format!("{base}{PREFIX}")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let response = http.post(&reactivate).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // Sign out: the session is gone.
    browser.click("header form.logout button").await;
    assert!(
        browser
            .client
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with("/login")
    );
    let response = http
        .get(format!("{base}{PREFIX}/connections"))
        .header("cookie", &session_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);

    browser.close().await;
    a.stop().await;
    b.stop().await;
}
