//! Two `dbsync serve` processes on loopback driven only through the CLI: registration, status
//! changes both ways, graceful shutdown, and no secret in any log line at trace level.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::support::Site;

struct Server {
    child: Child,
    url: String,
    log: std::path::PathBuf,
}

fn serve(site: &Site) -> Server {
    let log = site.path().join("serve.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dbsync"))
        .args(["--allow-private-peers", "serve", "--listen", "127.0.0.1:0"])
        .current_dir(site.path())
        .env("DBSYNC_DATABASE_URL", &site.url)
        .env("DBSYNC_KEY_FILE", site.key_file())
        .env("DBSYNC_LOG", "trace")
        .env_remove("DBSYNC_SITE_URL")
        .env_remove("DBSYNC_LISTEN")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn dbsync serve");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    Server { child, url, log }
}

fn terminate(server: &mut Server) -> i32 {
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let started = Instant::now();
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_agents_driven_through_the_cli() {
    let a = Site::sqlite();
    let b = Site::sqlite();
    // B accepts only with a password.
    let set = b.run(
        &[
            "settings",
            "incoming",
            "require_password",
            "--password-stdin",
        ],
        Some("b-incoming-pw\n"),
    );
    assert_eq!(set.status, 0, "{}", set.stderr);
    let mut server_a = serve(&a);
    let mut server_b = serve(&b);

    let cli_a = |args: &[&str], stdin: Option<&str>| {
        let mut full = vec!["--allow-private-peers", "--json"];
        full.extend_from_slice(args);
        a.run_with_env(&full, stdin, &[("DBSYNC_SITE_URL", server_a.url.as_str())])
    };
    let created = cli_a(
        &[
            "connections",
            "create",
            "to-b",
            "--site-url",
            &server_b.url,
            "--download-password-stdin",
            "--remote-password-stdin",
        ],
        Some("dl-pw-secret\nb-incoming-pw\n"),
    )
    .json();
    assert_eq!(created["registration"]["outcome"], "accepted", "{created}");
    assert_eq!(created["connection"]["status"], "active");
    let token = created["token"].as_str().unwrap().to_owned();

    let on_b = b.run(&["--json", "connections", "list"], None).json();
    assert_eq!(on_b[0]["status"], "active");
    assert_eq!(on_b[0]["site_url"], server_a.url);

    // B pulls a table with the download password, over both transports, logging at trace
    // level: the pull's log is checked for secrets below, with the agents'.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = sqlx::SqlitePool::connect(&a.url).await.unwrap();
        sqlx::query("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO items VALUES (1, 'one'), (2, 'two')")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    });
    let receiver = on_b[0]["name"].as_str().unwrap().to_owned();
    let mut pull_logs = Vec::new();
    for transport in ["ws", "quic"] {
        let pulled = b.run_logged(
            "trace",
            &[
                "--allow-private-peers",
                "--json",
                "pull",
                &receiver,
                "--tables",
                "items",
                "--transport",
                transport,
                "--password-stdin",
            ],
            Some("dl-pw-secret\n"),
        );
        assert_eq!(pulled.status, 0, "{transport}: {}", pulled.stderr);
        assert!(
            pulled.stderr.contains("TRACE") || pulled.stderr.contains("DEBUG"),
            "the pull logged at trace level"
        );
        pull_logs.push(pulled.stderr);
    }

    let suspended = cli_a(
        &[
            "connections",
            "suspend",
            "to-b",
            "--reason",
            "window closed",
        ],
        None,
    )
    .json();
    assert_eq!(suspended["peer_push"]["state"], "delivered");
    let on_b = b
        .run(
            &[
                "--json",
                "connections",
                "show",
                on_b[0]["name"].as_str().unwrap(),
            ],
            None,
        )
        .json();
    assert_eq!(on_b["connection"]["status"], "suspended");

    let receiver_name = on_b["connection"]["name"].as_str().unwrap().to_owned();
    let revoked = b
        .run_with_env(
            &[
                "--allow-private-peers",
                "--json",
                "connections",
                "revoke",
                &receiver_name,
                "--reason",
                "done",
            ],
            None,
            &[("DBSYNC_SITE_URL", server_b.url.as_str())],
        )
        .json();
    assert_eq!(revoked["peer_push"]["state"], "delivered", "{revoked}");
    assert_eq!(
        a.run(&["--json", "connections", "show", "to-b"], None)
            .json()["connection"]["status"],
        "revoked"
    );

    assert_eq!(terminate(&mut server_a), 0);
    assert_eq!(terminate(&mut server_b), 0);

    // Neither agent nor the pulls logged a token, a token hash or a password, at trace level,
    // in clear, as hex or as the bytes of a frame.
    let hash_hex = hex::encode(Sha256::digest(token.as_bytes()));
    let mut logs: Vec<(String, String)> = [&server_a.log, &server_b.log]
        .into_iter()
        .map(|log| {
            let text = std::fs::read_to_string(log).unwrap();
            assert!(
                text.contains("dbsync serving"),
                "the log is being written: {text}"
            );
            (log.display().to_string(), text)
        })
        .collect();
    logs.extend(pull_logs.into_iter().map(|text| ("pull".to_owned(), text)));
    let as_hex = |s: &str| hex::encode(s.as_bytes());
    let as_list = |s: &str| format!("{:?}", s.as_bytes());
    for (name, text) in &logs {
        for secret in [
            &token[10..],
            hash_hex.as_str(),
            "b-incoming-pw",
            "dl-pw-secret",
        ] {
            assert!(!text.contains(secret), "{name} leaked {secret}");
            assert!(
                !text.contains(&as_hex(secret)),
                "{name} leaked {secret} as hex"
            );
            assert!(
                !text.contains(&as_list(secret)[1..20]),
                "{name} leaked {secret} as bytes"
            );
        }
        assert!(!text.contains("dbs_"), "no token prefix either: {name}");
    }
}

/// `dbsync share` on one site, `dbsync pull --code --from` on another: the tables arrive once,
/// the second use of the code is refused, and no log line of the sender carries the code.
#[test]
fn a_share_code_through_the_cli() {
    let a = Site::sqlite();
    let b = Site::sqlite();
    let mut server_a = serve(&a);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = sqlx::SqlitePool::connect(&a.url).await.unwrap();
        for sql in [
            "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)",
            "INSERT INTO items VALUES (1, 'one'), (2, 'two'), (3, 'three')",
        ] {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
        pool.close().await;
    });
    let shared = a
        .run_with_env(
            &[
                "--json",
                "share",
                "--tables",
                "items",
                "--expires-in",
                "10m",
            ],
            None,
            &[("DBSYNC_SITE_URL", server_a.url.as_str())],
        )
        .json();
    let code = shared["code"].as_str().unwrap().to_owned();
    assert_eq!(shared["tables"], serde_json::json!(["items"]));
    assert!(
        shared["pull_command"]
            .as_str()
            .unwrap()
            .contains(&server_a.url)
    );
    let pull = |code: &str| {
        b.run(
            &[
                "--allow-private-peers",
                "--json",
                "pull",
                "--code",
                code,
                "--from",
                &server_a.url,
            ],
            None,
        )
    };
    let pulled = pull(&code);
    assert_eq!(pulled.status, 0, "{}", pulled.stderr);
    assert_eq!(pulled.json()["tables"][0]["rows"], 3);
    let held = b.run(&["--json", "connections", "list"], None).json();
    assert_eq!(held[0]["status"], "revoked", "{held}");
    let again = pull(&code);
    assert_eq!(again.status, 1);
    assert!(again.stderr.contains("refused"), "{}", again.stderr);
    let listed = a.run(&["--json", "transfers", "list"], None).json();
    assert_eq!(listed["total"], 1, "{listed}");
    assert_eq!(terminate(&mut server_a), 0);
    let log = std::fs::read_to_string(&server_a.log).unwrap();
    assert!(log.contains("share redeemed"));
    assert!(!log.contains(&code) && !log.contains(&code.replace('-', "")[4..]));
}
