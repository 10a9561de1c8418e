//! The CLI end to end: connections through their lifecycle with `--json` that parses, tokens
//! shown exactly once, clear errors with a non-zero exit.

use sha2::{Digest, Sha256};

use crate::support::{Output, Site, on_both_engines};

on_both_engines!(
    connection_lifecycle_with_json,
    token_appears_only_where_it_is_created,
    errors_are_one_clear_line_and_non_zero,
    receiver_token_handed_over_on_stdin,
    settings_and_transfers,
    human_output_is_a_table,
    config_file_then_env_then_flags,
    schedules_are_set_listed_and_refused_on_senders,
);

fn all_text(outputs: &[&Output]) -> String {
    outputs
        .iter()
        .map(|o| format!("{}\n{}", o.stdout, o.stderr))
        .collect()
}

fn connection_lifecycle_with_json(site: &Site) {
    let created = site
        .run(
            &[
                "--json",
                "connections",
                "create",
                "staging",
                "--site-url",
                "https://staging.example.com",
                "--max-downloads",
                "5",
            ],
            None,
        )
        .json();
    assert_eq!(created["connection"]["status"], "pending");
    assert_eq!(created["connection"]["max_downloads"], 5);
    let id = created["connection"]["id"].as_str().unwrap().to_owned();

    let listed = site.run(&["--json", "connections", "list"], None).json();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["name"], "staging");

    let steps: [(&[&str], &str); 4] = [
        (&["connections", "approve", "staging"], "active"),
        (
            &["connections", "suspend", &id, "--reason", "quarterly audit"],
            "suspended",
        ),
        (&["connections", "reactivate", "staging"], "active"),
        (
            &["connections", "revoke", "staging", "--reason", "replaced"],
            "revoked",
        ),
    ];
    for (args, status) in steps {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = site.run(&full, None).json();
        assert_eq!(out["connection"]["status"], status, "after {args:?}");
        // The peer never registered, so there is nobody to tell.
        assert_eq!(out["peer_push"]["state"], "no_peer_credential");
    }

    let shown = site
        .run(&["--json", "connections", "show", "staging"], None)
        .json();
    assert_eq!(shown["connection"]["revoked_reason"], "replaced");
    // Reactivation cleared the suspension from the connection; the audit trail keeps it.
    assert_eq!(
        shown["connection"]["suspended_reason"],
        serde_json::Value::Null
    );
    assert!(
        shown["audit_events"]
            .to_string()
            .contains("quarterly audit"),
        "{}",
        shown["audit_events"]
    );
    let actions: Vec<&str> = shown["audit_events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "connection.created",
            "connection.approved",
            "connection.suspended",
            "connection.reactivated",
            "connection.revoked"
        ]
    );
    let actor = shown["audit_events"][1]["actor"].as_str().unwrap();
    assert!(actor.starts_with("cli:"), "{actor}");

    let filtered = site
        .run(
            &["--json", "connections", "list", "--status", "active"],
            None,
        )
        .json();
    assert!(filtered.as_array().unwrap().is_empty());

    let deleted = site
        .run(
            &["--json", "connections", "delete", "staging", "--yes"],
            None,
        )
        .json();
    assert_eq!(deleted["deleted"]["name"], "staging");
    assert!(
        site.run(&["--json", "connections", "list"], None)
            .json()
            .as_array()
            .unwrap()
            .is_empty()
    );
}

fn token_appears_only_where_it_is_created(site: &Site) {
    let create = site.run(
        &[
            "connections",
            "create",
            "prod",
            "--site-url",
            "https://b.example.com",
        ],
        None,
    );
    assert_eq!(create.status, 0, "{}", create.stderr);
    let token = create
        .stdout
        .split_whitespace()
        .find(|w| w.starts_with("dbs_") && w.len() > 40)
        .expect("the create output shows the token")
        .to_owned();
    let hash_hex = hex::encode(Sha256::digest(token.as_bytes()));
    let secret_part = &token[10..];

    // Everything at the most verbose log level, so log lines are checked too.
    let outputs = [
        site.run_logged("trace", &["connections", "list"], None),
        site.run_logged("trace", &["--json", "connections", "list"], None),
        site.run_logged("trace", &["connections", "show", "prod"], None),
        site.run_logged("trace", &["--json", "connections", "show", "prod"], None),
        site.run_logged("trace", &["connections", "approve", "prod"], None),
        site.run_logged(
            "trace",
            &["--json", "connections", "suspend", "prod", "--reason", "r"],
            None,
        ),
        site.run_logged("trace", &["connections", "reactivate", "prod"], None),
        site.run_logged("trace", &["--json", "stats", "prod"], None),
        site.run_logged("trace", &["--json", "transfers", "list"], None),
        site.run_logged("trace", &["connections", "approve", "prod"], None), // an error path too
    ];
    let text = all_text(&outputs.iter().collect::<Vec<_>>());
    assert!(!text.contains(secret_part), "the token leaked:\n{text}");
    assert!(!text.contains(&hash_hex), "the token hash leaked:\n{text}");
    assert!(text.contains("dbs_"), "the display prefix is shown");

    // Regenerating shows the new token once; the old one is never shown again.
    let renewed = site
        .run(&["--json", "connections", "regenerate-token", "prod"], None)
        .json();
    let new_token = renewed["token"].as_str().unwrap().to_owned();
    assert_ne!(new_token, token);
    let after = site.run(&["--json", "connections", "show", "prod"], None);
    assert!(!all_text(&[&after]).contains(&new_token[10..]));
}

fn errors_are_one_clear_line_and_non_zero(site: &Site) {
    let missing = site.run(&["connections", "show", "nope"], None);
    assert_eq!(missing.status, 1);
    assert_eq!(missing.stderr.trim(), "error: connection not found: nope");

    site.run(
        &[
            "connections",
            "create",
            "x",
            "--site-url",
            "https://x.example.com",
        ],
        None,
    );
    site.run(&["connections", "approve", "x"], None);
    site.run(&["connections", "revoke", "x", "--reason", "done"], None);
    let illegal = site.run(&["connections", "reactivate", "x"], None);
    assert_eq!(illegal.status, 1);
    assert_eq!(
        illegal.stderr.trim(),
        "error: cannot reactivate connection x: it is revoked"
    );
    let json_err = site.run(&["--json", "connections", "reactivate", "x"], None);
    assert_eq!(json_err.status, 1);
    let parsed: serde_json::Value = serde_json::from_str(json_err.stderr.trim()).unwrap();
    assert_eq!(parsed["error"]["code"], "illegal_transition");

    let duplicate = site.run(
        &[
            "connections",
            "create",
            "x",
            "--site-url",
            "https://y.example.com",
        ],
        None,
    );
    assert_eq!(duplicate.status, 1);
    assert!(
        duplicate.stderr.contains("already exists"),
        "{}",
        duplicate.stderr
    );

    let bad_url = site.run(
        &[
            "connections",
            "create",
            "y",
            "--site-url",
            "ftp://y.example.com",
        ],
        None,
    );
    assert_eq!(bad_url.status, 1);
    assert!(bad_url.stderr.contains("site_url"), "{}", bad_url.stderr);

    let no_reason = site.run(&["connections", "suspend", "x"], None);
    assert_eq!(no_reason.status, 2, "clap usage error");

    let no_confirm = site.run(&["connections", "delete", "x"], None);
    assert_eq!(no_confirm.status, 1);
    assert!(no_confirm.stderr.contains("--yes"));

    let bad_db = site.run(
        &[
            "--database-url",
            "mysql://nowhere/db",
            "connections",
            "list",
        ],
        None,
    );
    assert_eq!(bad_db.status, 1);
    assert!(bad_db.stderr.contains("postgres://"), "{}", bad_db.stderr);
    for out in [
        &missing,
        &illegal,
        &duplicate,
        &bad_url,
        &no_confirm,
        &bad_db,
    ] {
        assert_eq!(
            out.stderr.trim().lines().count(),
            1,
            "one line: {}",
            out.stderr
        );
    }
}

fn receiver_token_handed_over_on_stdin(site: &Site) {
    // A token from another site, handed over by hand.
    let other = Site::sqlite();
    let token = other
        .run(
            &[
                "--json",
                "connections",
                "create",
                "to-b",
                "--site-url",
                "https://b.example.com",
            ],
            None,
        )
        .json()["token"]
        .as_str()
        .unwrap()
        .to_owned();

    let added = site
        .run(
            &[
                "--json",
                "connections",
                "add-receiver",
                "from-a",
                "--site-url",
                "https://a.example.com",
                "--token-stdin",
            ],
            Some(&format!("{token}\n")),
        )
        .json();
    assert_eq!(added["direction"], "receiver");
    assert_eq!(added["status"], "active");
    assert_eq!(added["token_stored"], true);
    assert!(!added.to_string().contains(&token[10..]));
    // The key file was created, private to the owner.
    let meta = std::fs::metadata(site.key_file()).expect("key file created");
    #[cfg(unix)]
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );

    let mut broken = token.clone();
    broken.replace_range(12..13, if &broken[12..13] == "z" { "y" } else { "z" });
    let refused = site.run(
        &[
            "connections",
            "add-receiver",
            "bad",
            "--site-url",
            "https://c.example.com",
            "--token-stdin",
        ],
        Some(&broken),
    );
    assert_eq!(refused.status, 1);
    assert!(refused.stderr.contains("checksum"), "{}", refused.stderr);
    assert!(
        !refused.stderr.contains(&broken[10..]),
        "the rejected token is not echoed"
    );

    // The sender regenerates the token; the new one is handed over and replaces the old.
    let fresh = other
        .run(&["--json", "connections", "regenerate-token", "to-b"], None)
        .json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let set = site
        .run(
            &[
                "--json",
                "connections",
                "set-token",
                "from-a",
                "--token-stdin",
            ],
            Some(&format!("{fresh}\n")),
        )
        .json();
    assert_eq!(
        set["token_prefix"],
        fresh[..set["token_prefix"].as_str().unwrap().len()]
    );
    assert!(!set.to_string().contains(&fresh[10..]));
    let bad = site.run(
        &["connections", "set-token", "from-a", "--token-stdin"],
        Some(&broken),
    );
    assert_eq!(bad.status, 1);
}

fn settings_and_transfers(site: &Site) {
    let shown = site.run(&["--json", "settings", "show"], None).json();
    assert_eq!(shown["incoming_mode"], "require_approval");
    assert_eq!(shown["incoming_password_set"], false);

    let refused = site.run(&["settings", "incoming", "require_password"], None);
    assert_eq!(refused.status, 1);
    assert!(
        refused.stderr.contains("--password-stdin"),
        "{}",
        refused.stderr
    );

    let set = site
        .run(
            &[
                "--json",
                "settings",
                "incoming",
                "require_password",
                "--password-stdin",
            ],
            Some("s3cret-pass\n"),
        )
        .json();
    assert_eq!(set["incoming_mode"], "require_password");
    assert_eq!(set["incoming_password_set"], true);
    assert!(!set.to_string().contains("s3cret-pass"));
    let auto = site
        .run(&["--json", "settings", "incoming", "auto_accept"], None)
        .json();
    assert_eq!(auto["incoming_mode"], "auto_accept");

    let bad_mode = site.run(&["settings", "incoming", "everyone"], None);
    assert_eq!(bad_mode.status, 2);
    assert!(
        bad_mode
            .stderr
            .contains("auto_accept, require_approval, require_password, deny_all")
    );

    site.run(
        &[
            "connections",
            "create",
            "c",
            "--site-url",
            "https://c.example.com",
        ],
        None,
    );
    let page = site
        .run(
            &[
                "--json",
                "transfers",
                "list",
                "--connection",
                "c",
                "--status",
                "completed",
            ],
            None,
        )
        .json();
    assert_eq!(page["total"], 0);
    assert_eq!(page["page"], 1);
    let stats = site.run(&["--json", "stats", "c"], None).json();
    assert_eq!(stats["stats"]["total_transfers"], 0);
    let missing = site.run(
        &["transfers", "show", "00000000-0000-0000-0000-000000000000"],
        None,
    );
    assert_eq!(missing.status, 1);
    assert!(missing.stderr.contains("transfer not found"));
    let cancel = site.run(
        &[
            "transfers",
            "cancel",
            "00000000-0000-0000-0000-000000000000",
        ],
        None,
    );
    assert_eq!(cancel.status, 1);
    assert!(
        cancel.stderr.contains("transfer not found"),
        "{}",
        cancel.stderr
    );
}

fn human_output_is_a_table(site: &Site) {
    site.run(
        &[
            "connections",
            "create",
            "alpha",
            "--site-url",
            "https://alpha.example.com",
            "--allowed-hours",
            "22-5",
        ],
        None,
    );
    let list = site.run(&["connections", "list"], None);
    assert_eq!(list.status, 0);
    let header = list
        .stdout
        .lines()
        .find(|l| l.contains("NAME"))
        .expect("a header row");
    for column in [
        "DIRECTION",
        "STATUS",
        "SITE URL",
        "TOKEN",
        "DOWNLOADS",
        "RECORDS",
    ] {
        assert!(header.contains(column), "{header}");
    }
    assert!(list.stdout.contains("alpha") && list.stdout.contains("pending"));
    let show = site.run(&["connections", "show", "alpha"], None);
    assert!(show.stdout.contains("22:00-05:00 UTC"), "{}", show.stdout);
}

fn config_file_then_env_then_flags(site: &Site) {
    let config = site.path().join("dbsync.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = {:?}\nkey_file = {:?}\n",
            site.url,
            site.key_file().display().to_string()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let created = site
        .run_bare(&[
            "--config",
            config,
            "--json",
            "connections",
            "create",
            "from-config",
            "--site-url",
            "https://c.example.com",
        ])
        .json();
    assert_eq!(created["connection"]["name"], "from-config");
    // The environment (what `run` sets) reaches the same database.
    let listed = site.run(&["--json", "connections", "list"], None).json();
    assert_eq!(listed[0]["name"], "from-config");

    // A flag beats the file: a config pointing elsewhere is overridden by --database-url.
    let elsewhere = site.path().join("elsewhere.toml");
    std::fs::write(&elsewhere, "database_url = \"sqlite://other.db\"\n").unwrap();
    let flagged = site
        .run_bare(&[
            "--config",
            elsewhere.to_str().unwrap(),
            "--database-url",
            &site.url,
            "--json",
            "connections",
            "list",
        ])
        .json();
    assert_eq!(flagged[0]["name"], "from-config");

    // A typo in the file is a clear error naming the file.
    let typo = site.path().join("typo.toml");
    std::fs::write(&typo, "databse_url = \"sqlite://x.db\"\n").unwrap();
    let refused = site.run_bare(&["--config", typo.to_str().unwrap(), "connections", "list"]);
    assert_eq!(refused.status, 1);
    assert!(
        refused.stderr.contains("typo.toml") && refused.stderr.contains("databse_url"),
        "{}",
        refused.stderr
    );
    let missing = site.run_bare(&[
        "--config",
        "/nonexistent/dbsync.toml",
        "connections",
        "list",
    ]);
    assert_eq!(missing.status, 1);
    assert!(
        missing.stderr.contains("/nonexistent/dbsync.toml"),
        "{}",
        missing.stderr
    );
}

#[test]
fn the_demo_copies_a_shop_and_finds_both_sides_identical() {
    let site = Site::sqlite();
    let out = site.run(&["--json", "demo", "--orders", "3000"], None);
    let report = out.json();
    assert_eq!(report["identical"], true, "{report}");
    let tables: Vec<&str> = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"].as_str().unwrap())
        .collect();
    assert_eq!(
        tables,
        ["customers", "products", "orders", "order_items"],
        "parents first"
    );
    assert!(report["rows"].as_i64().unwrap() > 10_000);
    assert!(report["bytes_wire"].as_i64().unwrap() < report["bytes_raw"].as_i64().unwrap());
    // The human form says so too.
    let human = site.run(&["demo", "--orders", "200"], None);
    assert_eq!(human.status, 0, "{}", human.stderr);
    assert!(
        human.stdout.contains("identical data, value by value: OK"),
        "{}",
        human.stdout
    );
}

fn schedules_are_set_listed_and_refused_on_senders(site: &Site) {
    let empty = site.run(&["schedule", "list"], None);
    assert_eq!(empty.status, 0, "{}", empty.stderr);
    assert!(
        empty.stdout.contains("No connection has auto-sync"),
        "{}",
        empty.stdout
    );

    // A receiver connection (token handed over by hand from another site).
    let other = Site::sqlite();
    let token = other
        .run(
            &[
                "--json",
                "connections",
                "create",
                "to-b",
                "--site-url",
                "https://b.example.com",
            ],
            None,
        )
        .json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    site.run(
        &[
            "--json",
            "connections",
            "add-receiver",
            "from-a",
            "--site-url",
            "https://a.example.com",
            "--token-stdin",
        ],
        Some(&format!("{token}\n")),
    )
    .json();
    let set = site
        .run(
            &[
                "--json",
                "schedule",
                "set",
                "from-a",
                "--tables",
                "users,orders",
                "--interval",
                "15m",
            ],
            None,
        )
        .json();
    assert_eq!(set["auto_sync_enabled"], true);
    assert_eq!(set["auto_sync_interval_minutes"], 15);
    let listed = site.run(&["--json", "schedule", "list"], None).json();
    assert_eq!(listed[0]["connection"], "from-a");
    assert_eq!(listed[0]["tables"], serde_json::json!(["users", "orders"]));
    assert_eq!(listed[0]["schedule"]["runs"], 0);
    let human = site.run(&["schedule", "list"], None);
    assert!(
        human.stdout.contains("never run") && human.stdout.contains("15 min"),
        "{}",
        human.stdout
    );

    // An interval under a minute, or not in whole minutes, is refused, not rounded.
    for bad in ["0m", "30s", "90s"] {
        let refused = site.run(&["schedule", "set", "from-a", "--interval", bad], None);
        assert_eq!(refused.status, 1, "{bad}");
        assert!(
            refused.stderr.contains("whole minutes"),
            "{}",
            refused.stderr
        );
    }
    // Pages of transfers are 1 to 500 long.
    for bad in ["0", "501"] {
        let refused = site.run(&["transfers", "list", "--per-page", bad], None);
        assert_ne!(refused.status, 0, "{bad}");
        assert!(refused.stderr.contains("per-page"), "{}", refused.stderr);
    }

    // A sender connection has nothing to pull.
    let sender = other.run(&["schedule", "set", "to-b"], None);
    assert_eq!(sender.status, 1);
    assert!(
        sender.stderr.contains("sender connection"),
        "{}",
        sender.stderr
    );

    let off = site
        .run(&["--json", "schedule", "set", "from-a", "--disable"], None)
        .json();
    assert_eq!(off["auto_sync_enabled"], false);
    assert_eq!(
        site.run(&["--json", "schedule", "list"], None).json(),
        serde_json::json!([])
    );
}
