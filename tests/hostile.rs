//! Hostile peers, written as the attacks are: a receiver and a sender that speak the protocol
//! by hand (over WebSocket and QUIC, against agents on SQLite and PostgreSQL) and lie about
//! names, sizes, counts and order, or say nothing. Each test names the item of the security
//! review it guards (docs/security.md).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dbsync_agent::audit::Actor;
use dbsync_agent::connection::{ApprovalMode, ConnectionSettings, NewConnection};
use dbsync_agent::link::{FrameReader, FrameWriter, Incoming, Link, LinkFailure};
use dbsync_agent::pull::PullOptions;
use dbsync_protocol::codec::{self, FLAG_ZSTD, Limits, MAGIC};
use dbsync_protocol::message::{
    ColumnInfo, Credit, KeyFilter, Ping, Pull, PullDone, RowBatch, TableInfo, TableSchema, Welcome,
};
use dbsync_protocol::{Kind, Message, Secret, Value};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::pull::exec;
use crate::support::agents::{Options, RunningAgent, start};

fn admin() -> Actor {
    Actor::admin("tester")
}

// ---------------------------------------------------------------------------------------------
// A receiver that speaks the protocol by hand.

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct WsIn(futures_util::stream::SplitStream<Ws>);

impl FrameReader for WsIn {
    async fn read_frame(&mut self) -> Result<Option<Vec<u8>>, LinkFailure> {
        loop {
            match self.0.next().await {
                Some(Ok(WsMessage::Binary(bytes))) => return Ok(Some(bytes.into())),
                Some(Ok(WsMessage::Close(_))) | None => return Ok(None),
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(LinkFailure::Transport(err.to_string())),
            }
        }
    }
}

struct WsOut(futures_util::stream::SplitSink<Ws, WsMessage>);

impl FrameWriter for WsOut {
    async fn write_frame(&mut self, frame: Vec<u8>) -> Result<(), String> {
        self.0
            .send(WsMessage::Binary(frame.into()))
            .await
            .map_err(|e| e.to_string())
    }

    async fn finish(&mut self) {
        let _ = self.0.close().await;
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Via {
    Ws,
    Quic,
}

/// One session opened by hand.
struct Hand {
    link: Link,
    _quic: Option<dbsync_agent::quic::QuicConnection>,
}

impl Hand {
    async fn open(agent: &RunningAgent, via: Via) -> Self {
        match via {
            Via::Ws => {
                let (socket, _) =
                    tokio_tungstenite::connect_async(format!("ws://{}/db-sync/ws", agent.addr))
                        .await
                        .unwrap();
                let (writer, reader) = socket.split();
                Self {
                    link: Link::spawn(WsIn(reader), WsOut(writer), Limits::default()),
                    _quic: None,
                }
            }
            Via::Quic => {
                let (link, quic) = quic_connect(agent).await;
                Self {
                    link,
                    _quic: Some(quic),
                }
            }
        }
    }

    async fn send(&mut self, message: &Message) {
        self.link.send(message).await.unwrap();
    }

    async fn send_raw(&mut self, frame: Vec<u8>) {
        self.link.send_frame(frame).await.unwrap();
    }

    /// The next thing the sender says (a closed link is `None`).
    async fn recv(&mut self) -> Option<Incoming> {
        tokio::time::timeout(Duration::from_secs(20), self.link.recv())
            .await
            .expect("the sender answers within 20 s")
    }

    /// The next message; panics on a batch or a closed link.
    async fn message(&mut self) -> Message {
        match self.recv().await {
            Some(Incoming::Message(message, _)) => message,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// The code of the next message, which must be an `Error`.
    async fn error_code(&mut self) -> String {
        match self.message().await {
            Message::Error(error) => error.code,
            other => panic!("expected an Error, got {other:?}"),
        }
    }

    async fn hello(&mut self, token: &str, password: Option<&str>) -> Message {
        self.hello_speaking(token, password, vec![2]).await
    }

    async fn hello_speaking(
        &mut self,
        token: &str,
        password: Option<&str>,
        versions: Vec<u16>,
    ) -> Message {
        self.send(&Message::Hello(dbsync_protocol::message::Hello {
            versions,
            token: Secret::new(token),
            password: password.map(Secret::new),
            client_name: "hostile/1".into(),
        }))
        .await;
        self.message().await
    }

    async fn welcomed(agent: &RunningAgent, via: Via, token: &str) -> Self {
        let mut hand = Self::open(agent, via).await;
        match hand.hello(token, None).await {
            Message::Welcome(_) => hand,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    async fn close(self) {
        self.link.close().await;
    }
}

async fn quic_connect(agent: &RunningAgent) -> (Link, dbsync_agent::quic::QuicConnection) {
    let fingerprint = agent
        .agent
        .quic_identity()
        .await
        .unwrap()
        .fingerprint
        .clone();
    dbsync_agent::quic::connect(
        agent.addr,
        "dbsync",
        &dbsync_agent::quic::Verify::Pinned(fingerprint),
        &dbsync_agent::quic::QuicConfig::default(),
        Limits::default(),
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| format!("{e:?}"))
    .unwrap()
}

fn frame(kind: Kind, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![MAGIC, kind as u8, flags, 0];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn pull_of(table: &str) -> Pull {
    Pull {
        request_id: 1,
        table: table.into(),
        after_key: None,
        limit: 100_000,
        exclude_columns: vec![],
        credits: 8,
        transfer_id: None,
        key_filter: None,
        cursor_column: None,
        keys_only: false,
        split: None,
    }
}

/// A sender connection on `agent` made and approved by hand; returns its token.
async fn sender_token(agent: &RunningAgent, settings: ConnectionSettings) -> String {
    named_sender_token(agent, "to-hostile", settings).await
}

/// [`sender_token`] under another name.
async fn named_sender_token(
    agent: &RunningAgent,
    name: &str,
    settings: ConnectionSettings,
) -> String {
    let created = agent
        .agent
        .store
        .create_sender(
            NewConnection {
                name: name.into(),
                site_url: format!("https://{name}.example"),
                settings,
            },
            &admin(),
            agent.agent.now(),
        )
        .await
        .unwrap();
    agent
        .agent
        .store
        .approve_connection(name, &admin(), agent.agent.now())
        .await
        .unwrap();
    created.token.expose().to_owned()
}

async fn agent(
    test: &str,
    postgres: bool,
    tweak: Option<fn(&mut dbsync_agent::Config)>,
) -> Option<RunningAgent> {
    start(
        test,
        Options {
            postgres,
            batch_rows: Some(50),
            tweak,
            ..Options::default()
        },
    )
    .await
}

async fn items(agent: &RunningAgent, rows: i64) {
    let mut statements = vec![
        "CREATE TABLE items (id BIGINT PRIMARY KEY, name TEXT NOT NULL)".to_owned(),
        "CREATE TABLE users (id BIGINT PRIMARY KEY, secret TEXT NOT NULL)".to_owned(),
        "INSERT INTO users VALUES (1, 'not for you')".to_owned(),
    ];
    for i in 1..=rows {
        statements.push(format!("INSERT INTO items VALUES ({i}, 'item {i}')"));
    }
    exec(agent, &statements).await;
}

fn key_of(row: &[Value]) -> i64 {
    match row[0] {
        Value::Int(id) => id,
        ref other => panic!("an id, not {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Item 2: a token holder reads nothing private.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_holder_reads_no_table_it_is_not_offered() {
    for postgres in [false, true] {
        let Some(a) = agent("hostile::private", postgres, None).await else {
            continue;
        };
        items(&a, 3).await;
        let token = sender_token(
            &a,
            ConnectionSettings {
                excluded_tables: vec!["users".into()],
                rate_limit_per_minute: 10_000,
                ..ConnectionSettings::default()
            },
        )
        .await;
        for via in [Via::Ws, Via::Quic] {
            let mut hand = Hand::welcomed(&a, via, &token).await;
            hand.send(&Message::ListTables).await;
            let Message::TableList(tables) = hand.message().await else {
                panic!("a table list");
            };
            let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names, ["items"], "{postgres} {via:?}");
            for name in [
                "dbsync_connections",
                "DBSYNC_CONNECTIONS",
                "DBSYNC_ADMIN_TOKENS",
                "DbSync_Settings",
                "DBSYNC_AUDIT_EVENTS",
                "dbsync_transfers",
                "_SQLX_MIGRATIONS",
                "_sqlx_migrations",
                "SQLITE_MASTER",
                "sqlite_master",
                "sqlite_schema",
                "pg_class",
                "pg_authid",
                "users",
                "USERS",
                "Users",
                "ITEMS",
                "items\0",
                "",
            ] {
                hand.send(&Message::DescribeTable(name.into())).await;
                assert_eq!(
                    hand.error_code().await,
                    "table_not_allowed",
                    "describe {name:?} ({postgres} {via:?})"
                );
                hand.send(&Message::Pull(pull_of(name))).await;
                assert_eq!(
                    hand.error_code().await,
                    "table_not_allowed",
                    "pull {name:?} ({postgres} {via:?})"
                );
            }
            hand.close().await;
        }
        // Nothing was counted or recorded for the refused requests.
        let connection = a.agent.store.get_connection("to-hostile").await.unwrap();
        assert_eq!(connection.downloads_used, 0);
        a.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Item 3: limits hold without credit; a resume cannot widen its transfer; keys are data.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_limits_hold_however_the_receiver_acknowledges() {
    for postgres in [false, true] {
        for via in [Via::Ws, Via::Quic] {
            let Some(a) = agent("hostile::credit", postgres, None).await else {
                continue;
            };
            limits_without_credit(&a, via).await;
            a.stop().await;
        }
    }
}

async fn limits_without_credit(a: &RunningAgent, via: Via) {
    items(a, 2_000).await;
    let token = sender_token(
        a,
        ConnectionSettings {
            max_records_total: Some(500),
            ..ConnectionSettings::default()
        },
    )
    .await;
    let mut seen: BTreeSet<i64> = BTreeSet::new();
    let mut transfer_id = None;

    // Reads every batch it is sent and never grants a credit, then goes away.
    let mut hand = Hand::welcomed(a, via, &token).await;
    hand.send(&Message::Pull(pull_of("items"))).await;
    for _ in 0..8 {
        match hand.recv().await {
            Some(Incoming::Batch(batch, _)) => {
                transfer_id = Some(batch.transfer_id.clone());
                for row in batch.rows.to_rows().unwrap() {
                    seen.insert(key_of(&row));
                }
            }
            other => panic!("a batch, got {other:?}"),
        }
    }
    hand.close().await;
    let transfer_id = transfer_id.unwrap();
    // The 400 rows sent count; the pages read ahead and never sent are given back once the
    // sender notices the receiver left.
    let started = Instant::now();
    loop {
        let used = a
            .agent
            .store
            .get_connection("to-hostile")
            .await
            .unwrap()
            .records_downloaded;
        if used == 400 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{via:?}: {used} records counted for 400 rows sent"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Resumes the same transfer with key ranges of its choosing: refused, the transfer covers
    // every key from the first.
    let mut hand = Hand::welcomed(a, via, &token).await;
    for filter in [
        KeyFilter::Range {
            from: Some(vec![Value::Int(1_000)]),
            to: None,
        },
        KeyFilter::Keys(vec![vec![Value::Int(1_999)]]),
    ] {
        hand.send(&Message::Pull(Pull {
            transfer_id: Some(transfer_id.clone()),
            key_filter: Some(filter),
            ..pull_of("items")
        }))
        .await;
        assert_eq!(hand.error_code().await, "invalid_request", "{via:?}");
    }
    // Resumes it from the start, granting every credit: what it was sent before comes again,
    // uncounted, then new rows until the limit cuts the transfer.
    let mut request = 10;
    let mut after: Option<Vec<Value>> = None;
    loop {
        request += 1;
        hand.send(&Message::Pull(Pull {
            request_id: request,
            transfer_id: Some(transfer_id.clone()),
            after_key: after.clone(),
            ..pull_of("items")
        }))
        .await;
        let done = loop {
            match hand.recv().await {
                Some(Incoming::Batch(batch, _)) => {
                    for row in batch.rows.to_rows().unwrap() {
                        seen.insert(key_of(&row));
                    }
                    after = Some(batch.last_key.clone());
                    hand.send(&Message::Credit(Credit {
                        request_id: request,
                        batches: 1_000,
                    }))
                    .await;
                }
                Some(Incoming::Message(Message::PullDone(done), _)) => break done,
                Some(Incoming::Message(Message::Error(error), _)) => {
                    assert_eq!(error.code, "record_limit_exceeded", "{error:?}");
                    break dbsync_protocol::message::PullDone {
                        request_id: request,
                        rows: 0,
                        more: false,
                        truncated: true,
                        last_key: None,
                        transfer_id: transfer_id.clone(),
                    };
                }
                other => panic!("{other:?}"),
            }
        };
        if !done.more {
            assert!(done.truncated, "the limit cut the pull");
            break;
        }
    }
    // A new transfer of a far range: the limit is spent.
    hand.send(&Message::Pull(Pull {
        request_id: 99,
        key_filter: Some(KeyFilter::Range {
            from: Some(vec![Value::Int(1_500)]),
            to: None,
        }),
        ..pull_of("items")
    }))
    .await;
    match hand.recv().await {
        Some(Incoming::Message(Message::PullDone(done), _)) => {
            assert_eq!(done.rows, 0);
            assert!(done.truncated);
        }
        Some(Incoming::Message(Message::Error(error), _)) => {
            assert_eq!(error.code, "record_limit_exceeded");
        }
        other => panic!("{other:?}"),
    }
    hand.close().await;

    let connection = a.agent.store.get_connection("to-hostile").await.unwrap();
    assert_eq!(
        seen.len(),
        500,
        "{via:?}: exactly the limit, in distinct rows"
    );
    assert_eq!(
        connection.records_downloaded,
        seen.len() as i64,
        "{via:?}: every row that left is counted once"
    );
    let transfer = a
        .agent
        .store
        .get_transfer(transfer_id.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(transfer.records_transferred, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_only_pass_waits_for_approval_and_counts_its_keys() {
    for postgres in [false, true] {
        let Some(a) = agent("hostile::keys", postgres, None).await else {
            continue;
        };
        items(&a, 100).await;
        let token = sender_token(
            &a,
            ConnectionSettings {
                approval_mode: ApprovalMode::RequireApproval,
                max_records_total: Some(10),
                ..ConnectionSettings::default()
            },
        )
        .await;
        let mut hand = Hand::welcomed(&a, Via::Ws, &token).await;
        hand.send(&Message::Pull(Pull {
            keys_only: true,
            ..pull_of("items")
        }))
        .await;
        let Message::ApprovalPending(pending) = hand.message().await else {
            panic!("a keys-only pass waits for approval");
        };
        a.agent
            .store
            .approve_transfer(
                pending.transfer_id.parse().unwrap(),
                &admin(),
                a.agent.now(),
            )
            .await
            .unwrap();
        hand.send(&Message::Pull(Pull {
            keys_only: true,
            transfer_id: Some(pending.transfer_id.clone()),
            ..pull_of("items")
        }))
        .await;
        let mut keys = 0;
        let done = loop {
            match hand.recv().await {
                Some(Incoming::Batch(batch, _)) => {
                    keys += batch.rows.len();
                    hand.send(&Message::Credit(Credit {
                        request_id: 1,
                        batches: 1,
                    }))
                    .await;
                }
                Some(Incoming::Message(Message::PullDone(done), _)) => break done,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(keys, 10, "keys count against the record limit");
        assert!(done.truncated);
        let connection = a.agent.store.get_connection("to-hostile").await.unwrap();
        assert_eq!(connection.records_downloaded, 10);
        hand.close().await;
        a.stop().await;
    }
}

/// A receiver that lies about where a whole-table pull is (a row count its session never
/// reached, one from another session, a key where a count goes, a key filter) gets a clear
/// refusal, and every row it was sent counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_pull_goes_on_only_from_the_snapshot_it_was_given() {
    for postgres in [false, true] {
        let Some(a) = agent("hostile::keyless", postgres, None).await else {
            continue;
        };
        let mut statements = vec!["CREATE TABLE event_log (at BIGINT, what TEXT)".to_owned()];
        for i in 0..30 {
            statements.push(format!("INSERT INTO event_log VALUES ({i}, 'e{i}')"));
        }
        exec(&a, &statements).await;
        let token = sender_token(&a, ConnectionSettings::default()).await;
        let mut hand = Hand::welcomed(&a, Via::Ws, &token).await;
        // A count no snapshot of this session is at.
        hand.send(&Message::Pull(Pull {
            after_key: Some(vec![Value::Int(10)]),
            ..pull_of("event_log")
        }))
        .await;
        assert_eq!(hand.error_code().await, "snapshot_gone");
        // Not a count; a key filter on a table without a key.
        for lie in [
            Pull {
                after_key: Some(vec![Value::Text("x".into())]),
                ..pull_of("event_log")
            },
            Pull {
                after_key: Some(vec![Value::Int(-1)]),
                ..pull_of("event_log")
            },
            Pull {
                key_filter: Some(dbsync_protocol::message::KeyFilter::Keys(vec![vec![
                    Value::Int(1),
                ]])),
                ..pull_of("event_log")
            },
        ] {
            hand.send(&Message::Pull(lie)).await;
            assert_eq!(hand.error_code().await, "invalid_request");
        }
        // Ten rows, then on from ten under the same transfer, then a count it never reached.
        hand.send(&Message::Pull(Pull {
            limit: 10,
            ..pull_of("event_log")
        }))
        .await;
        let mut seen = Vec::new();
        let mut done = None;
        while done.is_none() {
            match hand.recv().await {
                Some(Incoming::Batch(batch, _)) => {
                    seen.extend(batch.rows.to_rows().unwrap());
                    assert_eq!(batch.last_key, vec![Value::Int(seen.len() as i64)]);
                    hand.send(&Message::Credit(Credit {
                        request_id: 1,
                        batches: 1,
                    }))
                    .await;
                }
                Some(Incoming::Message(Message::PullDone(d), _)) => done = Some(d),
                other => panic!("{other:?}"),
            }
        }
        let first = done.unwrap();
        assert!(first.more);
        assert_eq!(seen.len(), 10);
        hand.send(&Message::Pull(Pull {
            after_key: Some(vec![Value::Int(25)]),
            transfer_id: Some(first.transfer_id.clone()),
            ..pull_of("event_log")
        }))
        .await;
        assert_eq!(hand.error_code().await, "snapshot_gone");
        let transfer = a
            .agent
            .store
            .get_transfer(first.transfer_id.parse().unwrap())
            .await
            .unwrap();
        assert_eq!(transfer.records_transferred, 10);
        hand.close().await;
        a.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Item 1: a hostile sender takes nothing over on the receiver.

/// What the fake sender lies about.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Lie {
    /// Offers dbsync's own tables and describes `t1` as `DBSYNC_ADMIN_TOKENS`.
    Names,
    /// Welcomes with a protocol version nobody offered.
    Version,
    /// Speaks protocol 4 and answers `Verify` with pages whose keys and hashes do not add up.
    Hashes,
    /// Speaks protocol 4 and answers every `Verify` with the same one-row page that says more.
    Stuck,
    /// Speaks protocol 5 as a PostgreSQL sender: a range's hash differs, and its rows' keys
    /// and hashes do not add up.
    RangeHashes,
    /// Speaks protocol 5 as a PostgreSQL sender: a range's rows come as the same one-row page
    /// that says more.
    RangeStuck,
    /// Speaks protocol 8 as a PostgreSQL sender: a range's buckets come out of order, past the
    /// count asked for, and with counts that do not make the range's rows.
    Buckets,
    /// Speaks protocol 9 as a PostgreSQL sender whose keys match the receiver's
    /// ([`KEYS_HERE`]): its rows written since its mark come as the same one-row page that
    /// says more.
    WrittenStuck,
    /// Speaks protocol 9 likewise: rows of listed keys come with a row of a key not asked for.
    ListedExtra,
    /// Speaks protocol 6 and cuts a table into far more ranges than asked for.
    CutTooMany,
    /// Speaks protocol 6 and cuts a table at bounds that are no keys of it.
    CutNotKeys,
    /// Speaks protocol 6, cuts a large table in two when asked, and never answers a pull.
    Silent,
}

/// Gives `b` a receiver connection `evil` to a fake sender telling `lie`.
async fn evil_receiver(b: &RunningAgent, lie: Lie) {
    let url = fake_sender(lie).await;
    b.agent
        .add_receiver_by_hand(
            "evil",
            &url,
            dbsync_agent::token::Token::generate().expose(),
            &admin(),
        )
        .await
        .unwrap();
}

/// A sender that speaks the protocol by hand over WebSocket; returns its URL.
async fn fake_sender(lie: Lie) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(fake_session(stream, lie));
        }
    });
    format!("http://{addr}")
}

async fn fake_session(stream: tokio::net::TcpStream, lie: Lie) {
    let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let admin_schema = |name: &str| TableSchema {
        name: name.into(),
        engine: "sqlite".into(),
        columns: [
            "id",
            "name",
            "token_hash",
            "token_prefix",
            "created_at",
            "created_by",
        ]
        .iter()
        .map(|c| ColumnInfo {
            name: (*c).into(),
            native_type: "TEXT".into(),
            neutral_type: "text".into(),
            nullable: true,
        })
        .collect(),
        primary_key: vec!["id".into()],
        postgres: None,
    };
    while let Some(Ok(WsMessage::Binary(bytes))) = socket.next().await {
        let Ok(message) = codec::decode_exact(&bytes, &Limits::default()) else {
            return;
        };
        let reply = match message {
            Message::Hello(_) => Message::Welcome(Welcome {
                version: match lie {
                    Lie::Version => 99,
                    Lie::Hashes | Lie::Stuck => 4,
                    Lie::RangeHashes | Lie::RangeStuck => 5,
                    Lie::Buckets => 8,
                    Lie::WrittenStuck | Lie::ListedExtra => 9,
                    Lie::CutTooMany | Lie::CutNotKeys | Lie::Silent => 6,
                    Lie::Names => 2,
                },
                session_id: "fake".into(),
                max_records_per_request: 1_000,
                max_frame_bytes: 16 << 20,
            }),
            Message::ListTables => Message::TableList(
                [
                    "DBSYNC_ADMIN_TOKENS",
                    "_SQLX_MIGRATIONS",
                    "dbsync_settings",
                    "t1",
                    "t2",
                ]
                .iter()
                // A second small table for the lies about cuts: the two go side by side.
                .filter(|name| **name != "t2" || matches!(lie, Lie::CutTooMany | Lie::CutNotKeys))
                .map(|name| TableInfo {
                    name: (*name).into(),
                    // Large enough to be cut for a parallel pull.
                    estimated_rows: if lie == Lie::Silent { 1_000_000 } else { 1 },
                    bytes: 1,
                    primary_key: vec!["id".into()],
                    depends_on: vec![],
                })
                .collect(),
            ),
            // Whatever is asked for, dbsync's admin tokens are described.
            Message::DescribeTable(name) if matches!(lie, Lie::Hashes | Lie::Stuck) => {
                let mut schema = admin_schema(&name);
                schema.columns.truncate(2);
                Message::TableSchema(schema)
            }
            // A PostgreSQL table of the receiver's types.
            Message::DescribeTable(name)
                if matches!(
                    lie,
                    Lie::RangeHashes
                        | Lie::RangeStuck
                        | Lie::Buckets
                        | Lie::WrittenStuck
                        | Lie::ListedExtra
                        | Lie::CutTooMany
                        | Lie::CutNotKeys
                        | Lie::Silent
                ) =>
            {
                let mut schema = admin_schema(&name);
                schema.columns.truncate(2);
                schema.engine = "postgres".into();
                for column in &mut schema.columns {
                    column.native_type = "text".into();
                }
                Message::TableSchema(schema)
            }
            Message::DescribeTable(_) => Message::TableSchema(admin_schema("DBSYNC_ADMIN_TOKENS")),
            Message::Split(split) => Message::SplitDone(dbsync_protocol::message::SplitDone {
                request_id: split.request_id,
                bounds: if lie == Lie::Silent {
                    // Two well-formed ranges (one when one part is asked for).
                    (1..split.parts.min(2))
                        .map(|_| vec![Value::Text("m".into())])
                        .collect()
                } else if lie == Lie::CutTooMany {
                    (0..5_000).map(|i| vec![Value::Int(i)]).collect()
                } else {
                    vec![vec![Value::Int(1), Value::Int(2)]; 2]
                },
                token: Some("t".into()),
            }),
            // Buckets that cannot be: out of order, past the count, summing to other rows.
            Message::Verify(verify) if lie == Lie::Buckets => {
                let count = verify
                    .range
                    .as_ref()
                    .and_then(|r| r.buckets.as_ref())
                    .map_or(1, |b| b.count);
                Message::VerifyPage(dbsync_protocol::message::VerifyPage {
                    request_id: verify.request_id,
                    rows: 5,
                    hash: vec![7; 8],
                    last_key: None,
                    more: false,
                    keys: vec![],
                    hashes: vec![],
                    buckets: Some(dbsync_protocol::message::BucketHashes {
                        ids: vec![count + 3, 1, 1],
                        rows: vec![1, 1, 1],
                        hashes: vec![9; 24],
                    }),
                    mark: None,
                })
            }
            // Protocol 9: the receiver's own keys, a mark, then rows that lie.
            Message::Verify(verify) if matches!(lie, Lie::WrittenStuck | Lie::ListedExtra) => {
                let range = verify.range.clone().unwrap_or_else(|| panic!("{verify:?}"));
                let page = |keys: Vec<Vec<Value>>, more: bool| {
                    Message::VerifyPage(dbsync_protocol::message::VerifyPage {
                        request_id: verify.request_id,
                        rows: keys.len() as u64,
                        hash: vec![0; 8],
                        last_key: keys.last().cloned(),
                        more,
                        hashes: vec![serde_bytes::ByteBuf::from(vec![3; 8]); keys.len()],
                        keys,
                        buckets: None,
                        mark: None,
                    })
                };
                if range.keys_only {
                    let (rows, hash) = KEYS_HERE.lock().unwrap().clone().expect("keys here");
                    Message::VerifyPage(dbsync_protocol::message::VerifyPage {
                        request_id: verify.request_id,
                        rows,
                        hash,
                        last_key: None,
                        more: false,
                        keys: vec![],
                        hashes: vec![],
                        buckets: None,
                        mark: Some(dbsync_protocol::message::Mark {
                            xid: 10,
                            table: "fake".into(),
                        }),
                    })
                } else if let Some(mut keys) = range.keys {
                    keys.push(vec![Value::Text("zz".into())]);
                    page(keys, false)
                } else if lie == Lie::WrittenStuck {
                    page(vec![vec![Value::Text("k".into())]], true)
                } else {
                    page(vec![], false)
                }
            }
            // A range's summary that differs from any table's.
            Message::Verify(verify)
                if matches!(lie, Lie::RangeHashes | Lie::RangeStuck) && !verify.detail =>
            {
                Message::VerifyPage(dbsync_protocol::message::VerifyPage {
                    request_id: verify.request_id,
                    rows: 5,
                    hash: vec![7; 8],
                    last_key: None,
                    more: false,
                    keys: vec![],
                    hashes: vec![],
                    buckets: None,
                    mark: None,
                })
            }
            Message::Verify(verify) if lie == Lie::RangeStuck => {
                Message::VerifyPage(dbsync_protocol::message::VerifyPage {
                    request_id: verify.request_id,
                    rows: 1,
                    hash: vec![1; 8],
                    last_key: Some(vec![Value::Text("k".into())]),
                    more: true,
                    keys: vec![vec![Value::Text("k".into())]],
                    hashes: vec![serde_bytes::ByteBuf::from(vec![1; 8])],
                    buckets: None,
                    mark: None,
                })
            }
            // The same page, again and again.
            Message::Verify(verify) if lie == Lie::Stuck => {
                Message::VerifyPage(dbsync_protocol::message::VerifyPage {
                    request_id: verify.request_id,
                    rows: 1,
                    hash: vec![7; 32],
                    last_key: Some(vec![Value::Text("k".into())]),
                    more: true,
                    keys: if verify.detail {
                        vec![vec![Value::Text("k".into())]]
                    } else {
                        vec![]
                    },
                    hashes: if verify.detail {
                        vec![serde_bytes::ByteBuf::from(vec![1; 16])]
                    } else {
                        vec![]
                    },
                    buckets: None,
                    mark: None,
                })
            }
            // Claims five rows, then details none (or keys without hashes).
            Message::Verify(verify) => Message::VerifyPage(dbsync_protocol::message::VerifyPage {
                request_id: verify.request_id,
                rows: 5,
                hash: vec![7; 32],
                last_key: None,
                more: false,
                keys: if verify.detail {
                    vec![vec![Value::Text("k".into())]; 5]
                } else {
                    vec![]
                },
                hashes: vec![],
                buckets: None,
                mark: None,
            }),
            // Not a word in answer, for as long as the session stays open.
            Message::Pull(_) if lie == Lie::Silent => continue,
            Message::Pull(pull) => Message::RowBatch(RowBatch {
                request_id: pull.request_id,
                seq: 0,
                columns: admin_schema("x")
                    .columns
                    .into_iter()
                    .map(|c| c.name)
                    .collect(),
                rows: vec![vec![
                    Value::Text("planted".into()),
                    Value::Text("planted".into()),
                    Value::Text("00".repeat(32)),
                    Value::Text("dbsa_xx".into()),
                    Value::Text("2026-01-01".into()),
                    Value::Text("evil".into()),
                ]],
                last_key: vec![Value::Text("planted".into())],
                transfer_id: "00000000-0000-0000-0000-000000000001".into(),
            }),
            _ => continue,
        };
        let frame = codec::encode(&reply, 1).unwrap();
        if socket.send(WsMessage::Binary(frame.into())).await.is_err() {
            return;
        }
    }
}

async fn tables_of(agent: &RunningAgent) -> Vec<String> {
    let mut names: Vec<String> = agent
        .agent
        .store
        .list_tables()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_sender_writes_no_table_the_receiver_did_not_ask_for() {
    for postgres in [false, true] {
        let Some(b) = agent("hostile::sender", postgres, None).await else {
            continue;
        };
        evil_receiver(&b, Lie::Names).await;
        let tokens_before = b.agent.store.list_admin_tokens().await.unwrap().len();
        let tables_before = tables_of(&b).await;
        // Every table offered, and then one named table.
        for tables in [None, Some(vec!["t1".to_owned()])] {
            let options = PullOptions {
                tables,
                ..PullOptions::default()
            };
            let err = b.agent.pull("evil", &options, |_| {}).await.unwrap_err();
            assert!(
                err.to_string().contains("DBSYNC_ADMIN_TOKENS"),
                "{postgres}: {err}"
            );
        }
        assert_eq!(
            b.agent.store.list_admin_tokens().await.unwrap().len(),
            tokens_before,
            "{postgres}: no admin token was planted"
        );
        assert_eq!(
            tables_of(&b).await,
            tables_before,
            "{postgres}: no table created"
        );
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_of_a_version_never_offered_is_refused() {
    let Some(b) = agent("hostile::version", false, None).await else {
        return;
    };
    evil_receiver(&b, Lie::Version).await;
    let err = b
        .agent
        .pull("evil", &PullOptions::default(), |_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("version 99"), "{err}");
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Item 4: QUIC streams that declare more than they send cost nothing, and silent connections
// close.

/// `dbsync serve` in its own process (so its memory is its own), with `config` as its
/// configuration file; returns the child, its QUIC address and certificate fingerprint.
fn serve_process(
    site: &crate::support::Site,
    config: &str,
) -> (std::process::Child, SocketAddr, String) {
    use std::io::BufRead;
    let config_file = site.path().join("dbsync.toml");
    std::fs::write(&config_file, config).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dbsync"))
        .args(["--config"])
        .arg(&config_file)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(site.path())
        .env("DBSYNC_DATABASE_URL", &site.url)
        .env("DBSYNC_KEY_FILE", site.key_file())
        .env("DBSYNC_LOG", "warn")
        .env_remove("DBSYNC_SITE_URL")
        .env_remove("DBSYNC_LISTEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn dbsync serve");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let quic = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("udp://"))
        .unwrap_or_else(|| panic!("no QUIC address in {line:?}"))
        .parse()
        .unwrap();
    let fingerprint = line
        .split_whitespace()
        .last()
        .unwrap()
        .trim_end_matches(')')
        .to_owned();
    (child, quic, fingerprint)
}

fn resident_bytes_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

async fn quic_to(
    addr: SocketAddr,
    fingerprint: &str,
) -> (Link, dbsync_agent::quic::QuicConnection) {
    dbsync_agent::quic::connect(
        addr,
        "dbsync",
        &dbsync_agent::quic::Verify::Pinned(fingerprint.to_owned()),
        &dbsync_agent::quic::QuicConfig::default(),
        Limits::default(),
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| format!("{e:?}"))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_streams_that_declare_more_than_they_send_cost_nothing() {
    let site = crate::support::Site::sqlite();
    let (mut child, addr, fingerprint) =
        serve_process(&site, "[server]\nmax_sessions_per_ip = 64\n");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = resident_bytes_of(child.id());
    // A request header declaring the most a request may be, then 8 bytes.
    let mut header = vec![MAGIC, Kind::Hello as u8, 0, 0];
    header.extend_from_slice(&codec::MAX_REQUEST_BYTES.to_be_bytes());
    header.extend_from_slice(&[0u8; 8]);
    let mut held = Vec::new();
    for _ in 0..10 {
        let (mut link, quic) = quic_to(addr, &fingerprint).await;
        // Four streams, as many as a connection may open: the session's own and three more.
        link.send_frame(header.clone()).await.unwrap();
        let mut streams = Vec::new();
        for _ in 0..3 {
            let (mut send, recv) = quic.connection.open_bi().await.unwrap();
            send.write_all(&header).await.unwrap();
            streams.push((send, recv));
        }
        held.push((link, quic, streams));
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let grown = resident_bytes_of(child.id()).saturating_sub(before);
    // 40 streams x 4 MiB declared: 160 MiB if allocated up front.
    assert!(grown < 48 << 20, "the agent grew by {} MiB", grown >> 20);

    // A stream declaring more than a request may be is refused from its header.
    let (mut link, _quic) = quic_to(addr, &fingerprint).await;
    let mut header = vec![MAGIC, Kind::Hello as u8, 0, 0];
    header.extend_from_slice(&(16u32 << 20).to_be_bytes());
    link.send_frame(header).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), link.recv())
        .await
        .unwrap()
    {
        Some(Incoming::Message(Message::Error(error), _)) => {
            assert_eq!(error.code, "protocol_error")
        }
        other => panic!("{other:?}"),
    }

    // Connections whose streams never finish a Hello, and one that opens no stream at all, are
    // closed by the sender (no keep-alive of its own holds them open; the client's keep-alives
    // do not either).
    let (idle_link, idle) = quic_to(addr, &fingerprint).await;
    drop(idle_link);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), idle.connection.closed())
        .await
        .expect("a streamless connection is closed");
    for (_, quic, _) in &held {
        tokio::time::timeout(Duration::from_secs(30), quic.connection.closed())
            .await
            .expect("a connection with no Hello is closed");
    }
    assert!(started.elapsed() < Duration::from_secs(28));
    let _ = child.kill();
    let _ = child.wait();
}

// ---------------------------------------------------------------------------------------------
// Item 5: silent TCP connections close; connections and sessions are capped.

fn tight(config: &mut dbsync_agent::Config) {
    config.server.header_read_timeout_secs = 1;
    config.server.max_connections_per_ip = 8;
    config.server.max_sessions_per_ip = 2;
    config.server.session_idle_timeout_secs = 2;
}

async fn closes_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(limit, stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

async fn status_from(addr: SocketAddr, local: &str) -> reqwest::StatusCode {
    let client = reqwest::Client::builder()
        .local_address(local.parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    client
        .get(format!("http://{addr}/db-sync/api/status"))
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_close_and_open_ones_are_capped() {
    let Some(a) = agent("hostile::silent", false, Some(tight)).await else {
        return;
    };
    let mut silent = Vec::new();
    for _ in 0..30 {
        silent.push(tokio::net::TcpStream::connect(a.addr).await.unwrap());
    }
    // Past the cap of 8 per address, connections are closed as they arrive; another address
    // is still served meanwhile.
    let mut refused = 0;
    for stream in &mut silent[8..] {
        if closes_within(stream, Duration::from_millis(500)).await {
            refused += 1;
        }
    }
    assert_eq!(refused, 22);
    assert!(status_from(a.addr, "127.0.0.2").await.is_success());
    // The 8 silent ones are closed on the header timer (1 s).
    for stream in &mut silent[..8] {
        assert!(closes_within(stream, Duration::from_secs(3)).await);
    }
    drop(silent);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(status_from(a.addr, "127.0.0.1").await.is_success());

    // Sessions: two per address; a third is refused with its own code.
    items(&a, 1).await;
    let token = sender_token(&a, ConnectionSettings::default()).await;
    let first = Hand::welcomed(&a, Via::Ws, &token).await;
    let second = Hand::welcomed(&a, Via::Quic, &token).await;
    let mut third = Hand::open(&a, Via::Ws).await;
    assert_eq!(third.error_code().await, "too_many_sessions");
    drop(third);
    first.close().await;
    second.close().await;
    a.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Item 6: password guesses are limited before any hashing, audited, and locked out.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_guesses_are_limited_audited_and_locked_out() {
    let clock = dbsync_agent::ManualClock::new(chrono::Utc::now());
    let Some(a) = start(
        "hostile::password",
        Options {
            clock: Some(std::sync::Arc::new(clock.clone())),
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    let token = sender_token(
        &a,
        ConnectionSettings {
            download_password: Some(dbsync_agent::config::Secret::new("right-one".into())),
            rate_limit_per_minute: 1_000,
            ..ConnectionSettings::default()
        },
    )
    .await;
    let mut codes = Vec::new();
    for guess in 0..8 {
        let mut hand = Hand::open(&a, Via::Ws).await;
        match hand.hello(&token, Some(&format!("guess-{guess}"))).await {
            Message::Error(error) => codes.push(error.code),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(codes[..5], ["invalid_password"; 5]);
    assert_eq!(codes[5..], ["rate_limited"; 3], "limited before hashing");
    // Even the right password waits its turn.
    let mut hand = Hand::open(&a, Via::Ws).await;
    assert!(
        matches!(hand.hello(&token, Some("right-one")).await, Message::Error(e) if e.code == "rate_limited")
    );

    // One guess every 12 s: the tenth wrong one in a row locks the password for 15 minutes.
    for guess in 5..10 {
        clock.advance(chrono::Duration::seconds(13));
        let mut hand = Hand::open(&a, Via::Ws).await;
        assert!(
            matches!(hand.hello(&token, Some(&format!("guess-{guess}"))).await, Message::Error(e) if e.code == "invalid_password")
        );
    }
    clock.advance(chrono::Duration::minutes(2));
    let mut hand = Hand::open(&a, Via::Ws).await;
    assert!(
        matches!(hand.hello(&token, Some("right-one")).await, Message::Error(e) if e.code == "rate_limited")
    );
    clock.advance(chrono::Duration::minutes(14));
    let mut hand = Hand::open(&a, Via::Ws).await;
    assert!(matches!(
        hand.hello(&token, Some("right-one")).await,
        Message::Welcome(_)
    ));

    let connection = a.agent.store.get_connection("to-hostile").await.unwrap();
    let events = a
        .agent
        .store
        .audit_events(Some(connection.id), 100)
        .await
        .unwrap();
    let failed = events
        .iter()
        .filter(|e| e.action == "password_failed")
        .count();
    let locked = events
        .iter()
        .filter(|e| e.action == "password_locked")
        .count();
    assert_eq!((failed, locked), (9, 1), "every wrong guess is audited");
    a.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Item 8: frames a receiver may not send, pings, oversized key filters.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_a_receiver_may_not_send_are_refused_before_decoding() {
    let Some(a) = agent("hostile::frames", false, Some(tight)).await else {
        return;
    };
    items(&a, 10).await;
    let token = sender_token(
        &a,
        ConnectionSettings {
            rate_limit_per_minute: 10_000,
            ..ConnectionSettings::default()
        },
    )
    .await;
    let pinger = named_sender_token(
        &a,
        "pinger",
        ConnectionSettings {
            rate_limit_per_minute: 5,
            ..ConnectionSettings::default()
        },
    )
    .await;
    for via in [Via::Ws, Via::Quic] {
        // A compressed frame (a zstd bomb or not) and a row batch: refused from the header.
        let bomb = zstd::bulk::compress(&vec![0u8; 8 << 20], 3).unwrap();
        for bad in [
            frame(Kind::Ping, FLAG_ZSTD, &bomb),
            frame(Kind::RowBatch, 0, &[0x90]),
        ] {
            let mut hand = Hand::welcomed(&a, via, &token).await;
            hand.send_raw(bad).await;
            assert_eq!(hand.error_code().await, "protocol_error", "{via:?}");
            hand.close().await;
        }

        // Keys of the wrong shape and too many of them: the receiver's error, not the sender's.
        let mut hand = Hand::welcomed(&a, via, &token).await;
        let too_many: Vec<Vec<Value>> = (0..10_001).map(|i| vec![Value::Int(i)]).collect();
        for pull in [
            Pull {
                key_filter: Some(KeyFilter::Keys(too_many)),
                ..pull_of("items")
            },
            Pull {
                after_key: Some(vec![Value::Int(1), Value::Int(2)]),
                ..pull_of("items")
            },
            Pull {
                cursor_column: Some("id".into()),
                ..pull_of("items")
            },
        ] {
            hand.send(&Message::Pull(pull)).await;
            assert_eq!(hand.error_code().await, "invalid_request", "{via:?}");
        }
        hand.close().await;
    }

    // Pings neither keep a session open nor escape the rate limit.
    let mut hand = Hand::welcomed(&a, Via::Ws, &pinger).await;
    let started = Instant::now();
    let mut codes = Vec::new();
    for nonce in 0..40 {
        hand.send(&Message::Ping(Ping { nonce })).await;
        match hand.recv().await {
            Some(Incoming::Message(Message::Pong(_), _)) => {}
            Some(Incoming::Message(Message::Error(error), _)) => {
                codes.push(error.code.clone());
                if error.code == "timeout" {
                    break;
                }
            }
            None => break,
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(codes.contains(&"rate_limited".to_owned()), "{codes:?}");
    assert_eq!(
        codes.last().map(String::as_str),
        Some("timeout"),
        "{codes:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    a.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Item 9: the sender's counts stay exact when the receiver dies again and again.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_stay_exact_when_the_receiver_dies_again_and_again() {
    for postgres in [false, true] {
        let Some((a, b, receiver)) = crate::pull::pair_with(
            "hostile::kills",
            Options {
                postgres,
                batch_rows: Some(200),
                ..Options::default()
            },
            Options {
                postgres,
                ..Options::default()
            },
            ConnectionSettings {
                max_records_total: Some(1_000_000),
                ..ConnectionSettings::default()
            },
        )
        .await
        else {
            continue;
        };
        exec(
            &a,
            &["CREATE TABLE events (id BIGINT PRIMARY KEY, kind TEXT NOT NULL)".into()],
        )
        .await;
        let values: Vec<String> = (1..=6_000).map(|i| format!("({i}, 'k{i}')")).collect();
        exec(
            &a,
            &[format!("INSERT INTO events VALUES {}", values.join(", "))],
        )
        .await;
        let options = PullOptions {
            credits: Some(4),
            ..PullOptions::default()
        };
        for kill in 0..6 {
            crate::support::agents::pull_killed_after(&b.agent, &receiver, &options, 2 + kill % 3)
                .await;
        }
        b.agent.pull(&receiver, &options, |_| {}).await.unwrap();
        let sent = a
            .agent
            .store
            .list_transfers(&dbsync_agent::transfer::TransferFilter {
                direction: Some(dbsync_agent::transfer::TransferDirection::Send),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(sent.total, 1, "{postgres}: one transfer, resumed each time");
        assert_eq!(sent.items[0].records_transferred, 6_000, "{postgres}");
        let on_a = a.agent.store.get_connection("to-b").await.unwrap();
        assert_eq!(on_a.records_downloaded, 6_000, "{postgres}");
        assert_eq!(on_a.total_records, 6_000, "{postgres}");
        a.stop().await;
        b.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Verification: the sender's checks hold, a lying sender changes nothing here.

/// 30 items on `a`, and a token of a connection that may not read `users`, may download 5
/// records in all and 10 a request.
async fn verifier_token(a: &RunningAgent) -> String {
    items(a, 30).await;
    sender_token(
        a,
        ConnectionSettings {
            excluded_tables: vec!["users".into()],
            max_records_total: Some(5),
            max_records_per_request: 10,
            rate_limit_per_minute: 10_000,
            ..ConnectionSettings::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_requests_are_checked_and_cost_no_limit() {
    let Some(a) = agent("hostile::verify", false, None).await else {
        return;
    };
    let token = verifier_token(&a).await;
    let verify = |table: &str, after: Option<Vec<Value>>, limit: u64, detail: bool| {
        Message::Verify(dbsync_protocol::message::Verify {
            request_id: 1,
            table: table.into(),
            after,
            limit,
            detail,
            range: None,
        })
    };
    // A session of protocol 2 may not verify.
    let mut old = Hand::open(&a, Via::Ws).await;
    assert!(matches!(old.hello(&token, None).await, Message::Welcome(_)));
    old.send(&verify("items", None, 10, false)).await;
    assert_eq!(old.error_code().await, "protocol_error");
    old.close().await;

    let mut hand = Hand::open(&a, Via::Ws).await;
    match hand.hello_speaking(&token, None, vec![2, 3, 4]).await {
        Message::Welcome(welcome) => assert_eq!(welcome.version, 4),
        other => panic!("{other:?}"),
    }
    for table in ["users", "dbsync_connections", "_sqlx_migrations", "nope"] {
        hand.send(&verify(table, None, 10, false)).await;
        assert_eq!(hand.error_code().await, "table_not_allowed", "{table}");
    }
    hand.send(&verify(
        "items",
        Some(vec![Value::Int(1), Value::Int(2)]),
        10,
        false,
    ))
    .await;
    assert_eq!(hand.error_code().await, "invalid_request");
    // A page asked for a billion rows holds the connection's rows per request; details line
    // up; the whole table is hashed past the record limit, and nothing is counted.
    let mut after = None;
    let mut seen = 0;
    loop {
        hand.send(&verify("items", after.clone(), 1_000_000_000, true))
            .await;
        let Message::VerifyPage(page) = hand.message().await else {
            panic!("a page");
        };
        assert!(page.rows <= 10);
        assert_eq!(page.keys.len() as u64, page.rows);
        assert_eq!(page.hashes.len() as u64, page.rows);
        assert!(page.hashes.iter().all(|h| h.len() == 16));
        seen += page.rows;
        if !page.more {
            break;
        }
        after = page.last_key;
    }
    assert_eq!(seen, 30);
    hand.close().await;
    let connection = a.agent.store.get_connection("to-hostile").await.unwrap();
    assert_eq!(
        (connection.downloads_used, connection.records_downloaded),
        (0, 0)
    );
    a.stop().await;
}

/// The keys of the page a verification request is answered with.
async fn page_keys(hand: &mut Hand, request: Message) -> Vec<Vec<Value>> {
    hand.send(&request).await;
    match hand.message().await {
        Message::VerifyPage(page) => page.keys,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_hashes_are_checked_and_cost_no_limit() {
    for postgres in [true, false] {
        let Some(a) = agent("hostile::range_hashes", postgres, None).await else {
            return;
        };
        let token = verifier_token(&a).await;
        let range = |table: &str, after: Option<i64>, upto: Option<Vec<Value>>, detail: bool| {
            Message::Verify(dbsync_protocol::message::Verify {
                request_id: 1,
                table: table.into(),
                after: after.map(|k| vec![Value::Int(k)]),
                limit: 1_000_000_000,
                detail,
                range: Some(dbsync_protocol::message::VerifyRange {
                    upto,
                    hash: dbsync_protocol::message::RangeHash::PgRecord,
                    buckets: None,
                    keys_only: false,
                    since: None,
                    keys: None,
                }),
            })
        };
        // The same, over `count` buckets (only those of the bitmap `only`, with `detail`).
        let in_buckets = |count: u32, only: Vec<u8>, detail: bool| {
            let Message::Verify(mut verify) = range("items", None, None, detail) else {
                unreachable!()
            };
            if let Some(range) = &mut verify.range {
                range.buckets = Some(dbsync_protocol::message::Buckets { count, only });
            }
            Message::Verify(verify)
        };
        // With the fields of protocol 9.
        let tracked = |after: Option<i64>,
                       detail: bool,
                       keys_only: bool,
                       since: Option<(u64, bool)>,
                       keys: Option<Vec<Vec<Value>>>| {
            let Message::Verify(mut verify) = range("items", after, None, detail) else {
                unreachable!()
            };
            if let Some(range) = &mut verify.range {
                range.keys_only = keys_only;
                range.since =
                    since.map(|(xid, written)| dbsync_protocol::message::Since { xid, written });
                range.keys = keys;
            }
            Message::Verify(verify)
        };
        // Protocol 4 has no ranges.
        let mut old = Hand::open(&a, Via::Ws).await;
        assert!(matches!(
            old.hello_speaking(&token, None, vec![2, 3, 4]).await,
            Message::Welcome(_)
        ));
        old.send(&range("items", None, None, false)).await;
        assert_eq!(old.error_code().await, "protocol_error");
        old.close().await;

        let mut hand = Hand::open(&a, Via::Ws).await;
        match hand.hello_speaking(&token, None, vec![2, 3, 4, 5]).await {
            Message::Welcome(welcome) => assert_eq!(welcome.version, 5),
            other => panic!("{other:?}"),
        }
        for table in ["users", "dbsync_connections", "nope"] {
            hand.send(&range(table, None, None, false)).await;
            assert_eq!(hand.error_code().await, "table_not_allowed", "{table}");
        }
        if !postgres {
            // A SQLite sender hashes pages of rows, not ranges in its database.
            hand.send(&range("items", None, None, false)).await;
            assert_eq!(hand.error_code().await, "invalid_request");
            hand.close().await;
            a.stop().await;
            continue;
        }
        hand.send(&range(
            "items",
            None,
            Some(vec![Value::Int(1), Value::Int(2)]),
            false,
        ))
        .await;
        assert_eq!(hand.error_code().await, "invalid_request");
        // A key of another type than the table's.
        let Message::Verify(mut texts) = range("items", None, None, false) else {
            unreachable!()
        };
        texts.after = Some(vec![Value::Text("not a number".into())]);
        hand.send(&Message::Verify(texts)).await;
        assert_eq!(hand.error_code().await, "invalid_request");
        // A summary covers its whole range whatever the limits: 30 rows, past a record limit
        // of 5; rows 11 to 20 only when asked for.
        hand.send(&range("items", None, None, false)).await;
        let Message::VerifyPage(whole) = hand.message().await else {
            panic!("a summary");
        };
        assert_eq!((whole.rows, whole.hash.len(), whole.more), (30, 8, false));
        hand.send(&range("items", Some(10), Some(vec![Value::Int(20)]), false))
            .await;
        let Message::VerifyPage(part) = hand.message().await else {
            panic!("a summary");
        };
        assert_eq!(part.rows, 10);
        // Row by row: pages of at most the rows per request, whose hashes XOR to the summary's.
        let mut after = None;
        let (mut seen, mut xor) = (0, [0u8; 8]);
        loop {
            hand.send(&range("items", after, None, true)).await;
            let Message::VerifyPage(page) = hand.message().await else {
                panic!("a page");
            };
            assert!(page.rows <= 10);
            assert_eq!(page.keys.len() as u64, page.rows);
            for hash in &page.hashes {
                assert_eq!(hash.len(), 8);
                for (x, h) in xor.iter_mut().zip(hash.iter()) {
                    *x ^= h;
                }
            }
            seen += page.rows;
            if !page.more {
                break;
            }
            after = match page.last_key.as_deref() {
                Some([Value::Int(k)]) => Some(*k),
                other => panic!("{other:?}"),
            };
        }
        assert_eq!(seen, 30);
        assert_eq!(xor.to_vec(), whole.hash);
        // Buckets need protocol 8.
        hand.send(&in_buckets(8, vec![], false)).await;
        assert_eq!(hand.error_code().await, "protocol_error");
        hand.close().await;

        let mut hand = Hand::open(&a, Via::Ws).await;
        match hand.hello_speaking(&token, None, vec![5, 8]).await {
            Message::Welcome(welcome) => assert_eq!(welcome.version, 8),
            other => panic!("{other:?}"),
        }
        // Not a power of two, too many, a bitmap of the wrong size or where none belongs.
        for bad in [
            in_buckets(3, vec![], false),
            in_buckets(1 << 20, vec![], false),
            in_buckets(16, vec![0xff], true),
            in_buckets(16, vec![0xff, 0xff], false),
        ] {
            hand.send(&bad).await;
            assert_eq!(hand.error_code().await, "invalid_request");
        }
        // The buckets make the whole: 30 rows, and their hashes XOR to the range's.
        hand.send(&in_buckets(16, vec![], false)).await;
        let Message::VerifyPage(summary) = hand.message().await else {
            panic!("a summary");
        };
        let buckets = summary.buckets.expect("buckets");
        assert!(buckets.is_well_formed(16, 30), "{buckets:?}");
        assert_eq!(
            (summary.rows, summary.hash.clone()),
            (30, whole.hash.clone())
        );
        let mut xor = [0u8; 8];
        for i in 0..buckets.ids.len() {
            for (x, h) in xor.iter_mut().zip(buckets.hash(i)) {
                *x ^= h;
            }
        }
        assert_eq!(xor.to_vec(), whole.hash);
        // Only the rows of the first bucket listed, in pages within the limit.
        let first = buckets.ids[0];
        let mut only = vec![0u8; 2];
        only[first as usize / 8] |= 1 << (first % 8);
        hand.send(&in_buckets(16, only, true)).await;
        let Message::VerifyPage(page) = hand.message().await else {
            panic!("a page");
        };
        assert_eq!(
            page.rows,
            buckets.rows[0].min(10),
            "only the bucket's rows, at most a page"
        );
        assert_eq!(page.hashes.len() as u64, page.rows);
        // Keys-only summaries, marks and listed keys need protocol 9.
        hand.send(&tracked(None, false, true, None, None)).await;
        assert_eq!(hand.error_code().await, "protocol_error");
        hand.close().await;

        let mut hand = Hand::open(&a, Via::Ws).await;
        match hand.hello_speaking(&token, None, vec![8, 9]).await {
            Message::Welcome(welcome) => assert_eq!(welcome.version, 9),
            other => panic!("{other:?}"),
        }
        let ids = |ids: &[i64]| ids.iter().map(|i| vec![Value::Int(*i)]).collect::<Vec<_>>();
        // A keys-only page, rows since a mark as a summary, listed keys without a mark, after
        // a key or more of them than a page holds (10 here), keys of another type.
        for bad in [
            tracked(None, true, true, None, None),
            tracked(None, false, false, Some((3, true)), None),
            tracked(None, true, false, None, Some(ids(&[1]))),
            tracked(Some(1), true, false, Some((3, false)), Some(ids(&[2]))),
            tracked(None, true, false, Some((3, false)), Some(ids(&[1; 11]))),
            tracked(
                None,
                true,
                false,
                Some((3, false)),
                Some(vec![vec![Value::Text("1".into())]]),
            ),
        ] {
            hand.send(&bad).await;
            assert_eq!(hand.error_code().await, "invalid_request", "{bad:?}");
        }
        // A keys-only summary: the whole table's 30 keys, and where the table stood.
        hand.send(&tracked(None, false, true, None, None)).await;
        let Message::VerifyPage(keys) = hand.message().await else {
            panic!("a summary");
        };
        assert_eq!((keys.rows, keys.hash.len()), (30, 8));
        assert_ne!(keys.hash, whole.hash, "keys only, not whole rows");
        let mark = keys.mark.expect("a mark").xid;
        // Nothing written since; then three rows written, and only they come.
        let written = |keys: Option<Vec<Vec<Value>>>, written: bool| {
            tracked(None, true, false, Some((mark, written)), keys)
        };
        assert!(page_keys(&mut hand, written(None, true)).await.is_empty());
        exec(
            &a,
            &["UPDATE items SET name = name || '!' WHERE id IN (2, 15, 29)".into()],
        )
        .await;
        assert_eq!(
            page_keys(&mut hand, written(None, true)).await,
            ids(&[2, 15, 29])
        );
        // Listed keys: only those not written since the mark, in key order; a key not in the
        // table comes as no row.
        assert_eq!(
            page_keys(&mut hand, written(Some(ids(&[3, 2, 1, 99])), false)).await,
            ids(&[1, 3])
        );
        assert_eq!(
            page_keys(&mut hand, written(Some(ids(&[3, 2, 1])), true)).await,
            ids(&[2])
        );
        // A mark from nowhere answers rows, as any mark would: the sender only reads its own.
        hand.send(&tracked(None, true, false, Some((u64::MAX, true)), None))
            .await;
        assert!(matches!(hand.message().await, Message::VerifyPage(_)));
        hand.close().await;
        let connection = a.agent.store.get_connection("to-hostile").await.unwrap();
        assert_eq!(
            (connection.downloads_used, connection.records_downloaded),
            (0, 0)
        );
        a.stop().await;
    }
}

/// The row count and keys' hash of the receiver's table, for a fake sender of protocol 9 to
/// match.
static KEYS_HERE: std::sync::Mutex<Option<(u64, Vec<u8>)>> = std::sync::Mutex::new(None);

/// A diff pull that compares the rows written since the last alike comparison (protocol 9),
/// against a sender whose keys match and whose rows then lie: a page of written rows that
/// never moves on, rows of keys not asked for. The pull ends with a protocol error and
/// changes nothing here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_lying_about_rows_written_since_changes_nothing_here() {
    for lie in [Lie::WrittenStuck, Lie::ListedExtra] {
        let Some(b) = agent("hostile::written", true, None).await else {
            return;
        };
        let store = &b.agent.store;
        store
            .execute_batch(&[
                "CREATE TABLE t1 (id TEXT PRIMARY KEY, name TEXT)".into(),
                "INSERT INTO t1 VALUES ('a', 'x'), ('b', 'y')".into(),
            ])
            .await
            .unwrap();
        let schema = store.describe_table("t1").await.unwrap();
        let (rows, hash) = store.range_keys_hash(&schema, None, None).await.unwrap();
        *KEYS_HERE.lock().unwrap() = Some((rows, hash.to_vec()));
        let here = store.change_mark(&schema).await.unwrap();
        // Written here since the mark: its key is listed to the sender.
        store
            .execute_batch(&["UPDATE t1 SET name = 'z' WHERE id = 'a'".into()])
            .await
            .unwrap();
        evil_receiver(&b, lie).await;
        // A comparison that left t1 alike, with its marks, as a diff pull records one.
        let connection = store.get_connection("evil").await.unwrap();
        let now = chrono::Utc::now();
        let earlier = store
            .create_transfer(
                dbsync_agent::transfer::NewTransfer {
                    connection_id: connection.id,
                    direction: dbsync_agent::transfer::TransferDirection::Receive,
                    table_name: "t1".into(),
                    requires_approval: false,
                    records_requested: 0,
                    conflict_strategy: connection.default_conflict_strategy,
                    transport: None,
                    requester_ip: None,
                    requester_user_agent: None,
                },
                chrono::Duration::hours(1),
                &Actor::system(),
                now,
            )
            .await
            .unwrap();
        store.start_transfer(earlier.id, now).await.unwrap();
        store
            .merge_transfer_metadata(
                earlier.id,
                serde_json::json!({
                    "kind": "verify",
                    "marks": {
                        "there": {"xid": 5, "table": "fake"},
                        "here": here,
                        "columns": "\"id\" text, \"name\" text",
                    },
                }),
            )
            .await
            .unwrap();
        store.complete_transfer(earlier.id, now).await.unwrap();
        let options = dbsync_agent::sync::verify::VerifyOptions {
            tables: Some(vec!["t1".into()]),
            repair: true,
            ..Default::default()
        };
        let err = tokio::time::timeout(
            Duration::from_secs(20),
            b.agent.verify("evil", &options, |_| {}),
        )
        .await
        .expect("a lying sender cannot keep a diff pull going")
        .unwrap_err();
        let expected = match lie {
            Lie::WrittenStuck => "ends on no new key",
            _ => "keys not asked for",
        };
        assert!(err.to_string().contains(expected), "{lie:?}: {err}");
        assert_eq!(
            crate::pull::rows(store, "t1").await.len(),
            2,
            "nothing deleted"
        );
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_lying_about_hashes_changes_nothing_here() {
    for (lie, postgres) in [
        (Lie::Hashes, false),
        (Lie::Stuck, false),
        (Lie::RangeHashes, true),
        (Lie::RangeStuck, true),
        (Lie::Buckets, true),
    ] {
        let Some(b) = agent("hostile::hashes", postgres, None).await else {
            return;
        };
        b.agent
            .store
            .execute_batch(&[
                "CREATE TABLE t1 (id TEXT PRIMARY KEY, name TEXT)".into(),
                "INSERT INTO t1 VALUES ('a', 'x'), ('b', 'y')".into(),
            ])
            .await
            .unwrap();
        evil_receiver(&b, lie).await;
        let options = dbsync_agent::sync::verify::VerifyOptions {
            tables: Some(vec!["t1".into()]),
            repair: matches!(lie, Lie::Hashes | Lie::RangeHashes),
            ..Default::default()
        };
        let err = tokio::time::timeout(
            Duration::from_secs(20),
            b.agent.verify("evil", &options, |_| {}),
        )
        .await
        .expect("a lying sender cannot keep a verification going")
        .unwrap_err();
        let expected = match lie {
            Lie::Stuck | Lie::RangeStuck => "does not move on",
            Lie::Buckets => "do not add up",
            _ => "do not match",
        };
        assert!(err.to_string().contains(expected), "{lie:?}: {err}");
        assert_eq!(
            crate::pull::rows(&b.agent.store, "t1").await.len(),
            2,
            "nothing deleted"
        );
        b.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Item 3 again: a parallel pull's cut (protocol 6) grants its own ranges, once each, to its own
// connection; anything else under its token is a pull of its own, and a download.

/// Opens a protocol 6 session as `token`.
async fn welcomed_v6(a: &RunningAgent, token: &str) -> Hand {
    let mut hand = Hand::open(a, Via::Ws).await;
    match hand.hello_speaking(token, None, vec![6]).await {
        Message::Welcome(welcome) => assert_eq!(welcome.version, 6),
        other => panic!("expected Welcome, got {other:?}"),
    }
    hand
}

/// Starts `pull` on a session of its own and waits for its first batch: the rows it covers
/// are being served, and counted.
async fn first_batch(a: &RunningAgent, token: &str, pull: Pull) -> Vec<Vec<Value>> {
    let mut hand = welcomed_v6(a, token).await;
    hand.send(&Message::Pull(pull)).await;
    let rows = match hand.recv().await {
        Some(Incoming::Batch(batch, _)) => batch.rows.to_rows().unwrap(),
        other => panic!("expected a batch, got {other:?}"),
    };
    hand.close().await;
    rows
}

async fn downloads(a: &RunningAgent, name: &str) -> i64 {
    a.agent
        .store
        .get_connection(name)
        .await
        .unwrap()
        .downloads_used
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_grants_its_own_ranges_once_each_and_nothing_else() {
    let Some(a) = agent("hostile::split", true, None).await else {
        return;
    };
    exec(
        &a,
        &[
            "CREATE TABLE items (id BIGINT PRIMARY KEY, name TEXT NOT NULL)".into(),
            "CREATE TABLE users (id BIGINT PRIMARY KEY, secret TEXT NOT NULL)".into(),
            "INSERT INTO users VALUES (1, 'not for you')".into(),
            "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 40000) g".into(),
            "ANALYZE items".into(),
        ],
    )
    .await;
    let settings = ConnectionSettings {
        excluded_tables: vec!["users".into()],
        rate_limit_per_minute: 10_000,
        ..ConnectionSettings::default()
    };
    let token = sender_token(&a, settings.clone()).await;
    let other = named_sender_token(&a, "other", settings).await;
    let split = |table: &str, parts| {
        Message::Split(dbsync_protocol::message::Split {
            request_id: 7,
            table: table.into(),
            parts,
        })
    };

    // A table it is not offered: refused as any request for it is, no bound, nothing counted.
    let mut cutter = welcomed_v6(&a, &token).await;
    cutter.send(&split("users", 4)).await;
    assert_eq!(cutter.error_code().await, "table_not_allowed");
    // A thousand parts asked: 40,000 rows make four of at least 10,000, one download for all.
    cutter.send(&split("items", 1_000)).await;
    let done = match cutter.message().await {
        Message::SplitDone(done) => done,
        other => panic!("expected SplitDone, got {other:?}"),
    };
    assert_eq!(done.request_id, 7);
    assert_eq!(done.bounds.len(), 3, "{done:?}");
    let bounds: Vec<i64> = done.bounds.iter().map(|b| key_of(b)).collect();
    assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:?}");
    let grant = done.token.clone().unwrap();
    assert_eq!(downloads(&a, "to-hostile").await, 1);
    let part = |index: usize| Pull {
        after_key: index.checked_sub(1).map(|i| done.bounds[i].clone()),
        key_filter: Some(KeyFilter::Range {
            from: None,
            to: done.bounds.get(index).cloned(),
        }),
        split: Some(grant.clone()),
        ..pull_of("items")
    };

    // Part 2 of the cut, from another session: its rows only, no download of its own.
    let rows = first_batch(&a, &token, part(1)).await;
    assert_eq!(key_of(&rows[0]), bounds[0] + 1);
    assert_eq!(downloads(&a, "to-hostile").await, 1);
    // The same part again, naming no transfer (a receiver killed before its first batch came
    // asks so): it goes on under the transfer it started, no second download, no second
    // transfer.
    let again = first_batch(&a, &token, part(1)).await;
    assert_eq!(key_of(&again[0]), bounds[0] + 1);
    assert_eq!(downloads(&a, "to-hostile").await, 1);
    let sent_items = || async {
        a.agent
            .store
            .list_transfers(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|t| t.table_name == "items")
            .count()
    };
    assert_eq!(sent_items().await, 1);
    // A range the cut did not make (parts 1 and 2 together), under its token: a download.
    let wider = Pull {
        key_filter: Some(KeyFilter::Range {
            from: None,
            to: Some(done.bounds[1].clone()),
        }),
        ..part(0)
    };
    first_batch(&a, &token, wider).await;
    assert_eq!(downloads(&a, "to-hostile").await, 2);
    // Another connection naming the token: its own pull, its own download.
    first_batch(&a, &other, part(2)).await;
    assert_eq!(downloads(&a, "other").await, 1);
    assert_eq!(downloads(&a, "to-hostile").await, 2);
    // A token it made up: a pull of its own.
    first_batch(
        &a,
        &token,
        Pull {
            split: Some("00".repeat(16)),
            ..part(3)
        },
    )
    .await;
    assert_eq!(downloads(&a, "to-hostile").await, 3);
    // The cutting session ends (a receiver killed mid-pull): its grant loses the session's
    // snapshot but not its ranges, so a range never started is still the cut's, once.
    cutter.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let transfers_before = sent_items().await;
    first_batch(&a, &token, part(3)).await;
    assert_eq!(downloads(&a, "to-hostile").await, 3);
    assert_eq!(sent_items().await, transfers_before + 1);
    first_batch(&a, &token, part(3)).await;
    assert_eq!(downloads(&a, "to-hostile").await, 3);
    assert_eq!(sent_items().await, transfers_before + 1);

    // A protocol 5 session cannot ask for a cut.
    let mut old = Hand::open(&a, Via::Ws).await;
    assert!(matches!(
        old.hello_speaking(&token, None, vec![5]).await,
        Message::Welcome(_)
    ));
    old.send(&split("items", 4)).await;
    assert_eq!(old.error_code().await, "protocol_error");
    old.close().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_cut_is_refused_before_any_table_is_made() {
    let Some(b) = agent("hostile::cut", true, None).await else {
        return;
    };
    // One table asked to be cut, and two small ones asked for whole (side by side), each
    // answered with bounds.
    let asks = [
        vec!["t1".to_owned()],
        vec!["t1".to_owned(), "t2".to_owned()],
    ];
    for (lie, tables) in [Lie::CutTooMany, Lie::CutNotKeys]
        .into_iter()
        .flat_map(|lie| asks.iter().map(move |tables| (lie, tables)))
    {
        evil_receiver(&b, lie).await;
        let tables_before = tables_of(&b).await;
        let options = PullOptions {
            tables: Some(tables.clone()),
            parallel: 4,
            ..PullOptions::default()
        };
        let err = b.agent.pull("evil", &options, |_| {}).await.unwrap_err();
        assert!(
            matches!(
                &err,
                dbsync_agent::Error::Session {
                    fault: dbsync_agent::SessionFault::Protocol,
                    ..
                }
            ),
            "{lie:?}: {err}"
        );
        if tables.len() == 2 {
            assert!(err.to_string().contains("one part"), "{lie:?}: {err}");
        }
        assert_eq!(tables_of(&b).await, tables_before, "{lie:?}: no table made");
        let connection = b.agent.store.get_connection("evil").await.unwrap();
        for table in tables {
            assert!(
                b.agent
                    .store
                    .part_checkpoints(connection.id, table)
                    .await
                    .unwrap()
                    .is_empty(),
                "{lie:?}: no range recorded"
            );
        }
        b.agent
            .store
            .delete_connection("evil", &admin(), b.agent.now())
            .await
            .unwrap();
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_that_stops_answering_ends_the_pull_in_time() {
    fn quick(config: &mut dbsync_agent::Config) {
        config.answer_timeout_secs = Some(1);
    }
    for postgres in [false, true] {
        let Some(b) = agent("hostile::silent_sender", postgres, Some(quick)).await else {
            continue;
        };
        evil_receiver(&b, Lie::Silent).await;
        // In one piece, and cut in two ranges over two sessions (a PostgreSQL receiver); once
        // giving up at the first silence, once retrying for a few seconds.
        let parallel: &[usize] = if postgres { &[1, 2] } else { &[1] };
        for (&parallel, retry) in parallel.iter().flat_map(|p| [(p, 0), (p, 3)]) {
            let options = PullOptions {
                tables: Some(vec!["t1".to_owned()]),
                parallel,
                retry_for: Duration::from_secs(retry),
                ..PullOptions::default()
            };
            let started = Instant::now();
            let err = tokio::time::timeout(
                Duration::from_secs(60),
                b.agent.pull("evil", &options, |_| {}),
            )
            .await
            .unwrap_or_else(|_| panic!("{postgres} {parallel}: the pull hung"))
            .unwrap_err();
            let took = started.elapsed();
            assert!(
                matches!(&err, dbsync_agent::Error::Unreachable { .. }),
                "{postgres} {parallel}: {err}"
            );
            assert!(
                err.to_string().contains("no answer for 1 s"),
                "{postgres} {parallel}: {err}"
            );
            // One silence, or as many as fit the time left to retry (each a second, between
            // backoffs of at most a few seconds).
            assert!(
                took < Duration::from_secs(retry + 15),
                "{postgres} {parallel}: {took:?}"
            );
            assert!(
                took >= Duration::from_secs(retry.max(1)),
                "{postgres} {parallel}: {took:?}"
            );
        }
        // The receiving transfers it started are ended, none left running.
        let page = b
            .agent
            .store
            .list_transfers(&Default::default())
            .await
            .unwrap();
        assert!(!page.items.is_empty(), "{postgres}: transfers recorded");
        for transfer in &page.items {
            assert_ne!(
                transfer.status,
                dbsync_agent::transfer::TransferStatus::InProgress,
                "{postgres}: {transfer:?}"
            );
        }
        b.stop().await;
    }
}

/// Every batch of `pull` on `hand`, credited at once, until its `PullDone`.
async fn pull_to_the_end(hand: &mut Hand, pull: Pull) -> (Vec<i64>, PullDone) {
    let (batches, done) = batches_to_the_end(hand, pull).await;
    let keys = batches
        .iter()
        .flat_map(|batch| batch.rows.to_rows().unwrap())
        .map(|row| key_of(&row))
        .collect();
    (keys, done)
}

/// Sends `pull` and every batch's credit back; the batches as they came, and the end.
async fn batches_to_the_end(
    hand: &mut Hand,
    pull: Pull,
) -> (Vec<dbsync_protocol::columns::ReceivedBatch>, PullDone) {
    let request_id = pull.request_id;
    hand.send(&Message::Pull(pull)).await;
    let mut batches = Vec::new();
    loop {
        match hand.recv().await {
            Some(Incoming::Batch(batch, _)) => {
                batches.push(batch);
                hand.send(&Message::Credit(Credit {
                    request_id,
                    batches: 1,
                }))
                .await;
            }
            Some(Incoming::Message(Message::PullDone(done), _)) => return (batches, done),
            other => panic!("expected a batch or PullDone, got {other:?}"),
        }
    }
}

/// A receiver killed after the sender finished its transfer, but before it heard the end, asks
/// again from its last key: nothing is left, so no transfer starts and no download is counted.
/// Asked from an earlier key, the rows go again as before (a pull of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_after_the_end_moves_and_counts_nothing() {
    let Some(a) = agent("hostile::resume_end", true, None).await else {
        return;
    };
    items(&a, 300).await;
    let settings = ConnectionSettings {
        rate_limit_per_minute: 10_000,
        ..ConnectionSettings::default()
    };
    let token = sender_token(&a, settings).await;
    let mut hand = welcomed_v6(&a, &token).await;
    let (keys, done) = pull_to_the_end(&mut hand, pull_of("items")).await;
    hand.close().await;
    assert_eq!(keys.len(), 300);
    assert!(!done.more);
    let transfers = || async {
        a.agent
            .store
            .list_transfers(&Default::default())
            .await
            .unwrap()
            .total
    };
    assert_eq!(
        (downloads(&a, "to-hostile").await, transfers().await),
        (1, 1)
    );
    let resume = |after: i64| Pull {
        request_id: 2,
        transfer_id: Some(done.transfer_id.clone()),
        after_key: Some(vec![Value::Int(after)]),
        ..pull_of("items")
    };

    let mut hand = welcomed_v6(&a, &token).await;
    let (keys, again) = pull_to_the_end(&mut hand, resume(300)).await;
    assert!(keys.is_empty());
    assert!(!again.more && !again.truncated);
    assert_eq!(again.transfer_id, done.transfer_id);
    assert_eq!(again.last_key, Some(vec![Value::Int(300)]));
    assert_eq!(
        (downloads(&a, "to-hostile").await, transfers().await),
        (1, 1)
    );
    // Other columns than the transfer's: not its resume.
    let (_, other) = pull_to_the_end(
        &mut hand,
        Pull {
            exclude_columns: vec!["name".into()],
            ..resume(300)
        },
    )
    .await;
    assert_ne!(other.transfer_id, done.transfer_id);
    assert_eq!(
        (downloads(&a, "to-hostile").await, transfers().await),
        (2, 2)
    );
    // From an earlier key: the rows after it go again, as a pull of its own.
    let (keys, earlier) = pull_to_the_end(&mut hand, resume(250)).await;
    assert_eq!(keys, (251..=300).collect::<Vec<_>>());
    assert_ne!(earlier.transfer_id, done.transfer_id);
    assert_eq!(
        (downloads(&a, "to-hostile").await, transfers().await),
        (3, 3)
    );
    hand.close().await;
    a.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Compact columns (protocol 7) go only to a receiver that speaks them.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_columns_go_only_to_a_peer_of_protocol_7() {
    use dbsync_protocol::message::columnar::{DELTAS, Kind as ColumnKind, PACKED};
    for postgres in [true, false] {
        let Some(a) = agent("hostile::compact_columns", postgres, None).await else {
            return;
        };
        let (uuid, random) = if postgres {
            ("UUID", "gen_random_uuid()")
        } else {
            ("BLOB", "randomblob(16)")
        };
        // `id` and `at` step evenly (differences pay: 1 byte a value against 5 and 9); `n` swings
        // between far-apart values with a NULL among them (differences would take more bytes).
        let mut statements = vec![format!(
            "CREATE TABLE stamps (id BIGINT PRIMARY KEY, u {uuid} NOT NULL, at BIGINT NOT NULL, \
             n BIGINT, name TEXT NOT NULL)"
        )];
        for i in 1..=120i64 {
            let n = match i {
                7 => "NULL".to_owned(),
                _ if i % 2 == 0 => "0".to_owned(),
                _ => "4000000000".to_owned(),
            };
            let at = 1_700_000_000_000_000 + i * 1_000_000;
            let id = 100_000 + i;
            statements.push(format!(
                "INSERT INTO stamps VALUES ({id}, {random}, {at}, {n}, 'row {i}')"
            ));
        }
        exec(&a, &statements).await;
        let token = sender_token(&a, ConnectionSettings::default()).await;
        let mut pulled = Vec::new();
        for (versions, speaks) in [(vec![2, 3, 4, 5, 6], 6), (vec![2, 3, 4, 5, 6, 7], 7)] {
            let mut hand = Hand::open(&a, Via::Ws).await;
            match hand.hello_speaking(&token, None, versions).await {
                Message::Welcome(welcome) => assert_eq!(welcome.version, speaks),
                other => panic!("{other:?}"),
            }
            let (batches, _) = batches_to_the_end(&mut hand, pull_of("stamps")).await;
            hand.close().await;
            let rows: Vec<Vec<Value>> = batches
                .iter()
                .flat_map(|batch| batch.rows.to_rows().unwrap())
                .collect();
            let tags: BTreeSet<Vec<u8>> = batches
                .iter()
                .map(|batch| batch.rows.column_tags())
                .collect();
            let uuid = if postgres {
                ColumnKind::Uuid
            } else {
                ColumnKind::Bytes
            } as u8;
            let (int, text) = (ColumnKind::Int as u8, ColumnKind::Text as u8);
            // A UUID column goes packed from PostgreSQL only: SQLite has no UUID type.
            let expected = if speaks == 6 {
                vec![int, uuid, int, int, text]
            } else if postgres {
                vec![int | DELTAS, uuid | PACKED, int | DELTAS, int, text]
            } else {
                vec![int | DELTAS, uuid, int | DELTAS, int, text]
            };
            assert_eq!(
                tags,
                BTreeSet::from([expected]),
                "postgres {postgres}, protocol {speaks}"
            );
            assert_eq!(rows.len(), 120);
            pulled.push(rows);
        }
        // The same rows either way.
        assert_eq!(pulled[0], pulled[1], "postgres {postgres}");
        a.stop().await;
    }
}

/// A key list is the receiver's word: keys of the wrong kind for the key column (text, a real,
/// null, bytes for an integer key; an integer for a text key; text that is no UUID for a UUID
/// key) are refused with the receiver's error on PostgreSQL, where the list is bound as one
/// typed array or as typed values, and read nothing; the session goes on, and a right list still
/// finds its rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_keys_of_the_wrong_kind_are_refused() {
    for postgres in [false, true] {
        let Some(a) = agent("hostile::listed_kinds", postgres, None).await else {
            continue;
        };
        items(&a, 20).await;
        exec(
            &a,
            &[
                "CREATE TABLE tags (name TEXT PRIMARY KEY, n BIGINT)".to_owned(),
                "INSERT INTO tags VALUES ('7', 7), ('x', 8)".to_owned(),
                "CREATE TABLE gadgets (id UUID PRIMARY KEY)".to_owned(),
                "INSERT INTO gadgets VALUES ('07070707-0707-0707-0707-070707070707')".to_owned(),
            ],
        )
        .await;
        let token = sender_token(&a, ConnectionSettings::default()).await;
        let mut hand = Hand::welcomed(&a, Via::Ws, &token).await;
        let lies: [(&str, Vec<Value>); 6] = [
            ("items", vec![Value::Int(3), Value::Text("3".into())]),
            ("items", vec![Value::Float(3.0)]),
            ("items", vec![Value::Null]),
            ("items", vec![Value::Bytes(vec![3; 4096])]),
            ("tags", vec![Value::Text("x".into()), Value::Int(7)]),
            // Text is how a SQLite peer names a UUID key; text that is no UUID is refused.
            (
                "gadgets",
                vec![Value::Text("not a uuid".into()), Value::Uuid([7; 16])],
            ),
        ];
        for (table, listed) in lies {
            // SQLite compares as its column affinity says ('7' is 7 to an integer column and 7
            // is '7' to a text one), so a list finds at most a row per key; null has no class
            // to compare by and is refused.
            let refused = postgres || listed.contains(&Value::Null);
            let most = listed.len();
            hand.send(&Message::Pull(Pull {
                key_filter: Some(KeyFilter::Keys(
                    listed.into_iter().map(|v| vec![v]).collect(),
                )),
                ..pull_of(table)
            }))
            .await;
            let mut rows = 0;
            loop {
                match hand.recv().await {
                    Some(Incoming::Message(Message::Error(error), _)) => {
                        assert!(refused, "{table}: {error:?}");
                        assert_eq!(error.code, "invalid_request", "{table}: {error:?}");
                        // Named by kind, not echoed: the 4 KiB key is not in the message.
                        assert!(error.message.len() < 200, "{error:?}");
                        break;
                    }
                    Some(Incoming::Batch(batch, _)) => {
                        rows += batch.rows.to_rows().unwrap().len();
                        hand.send(&Message::Credit(Credit {
                            request_id: 1,
                            batches: 1,
                        }))
                        .await;
                    }
                    Some(Incoming::Message(Message::PullDone(done), _)) => {
                        assert!(!refused, "{table}: {done:?}");
                        assert!(rows <= most && !done.more, "{table}: {rows} rows, {done:?}");
                        break;
                    }
                    other => panic!("{table}: {other:?}"),
                }
            }
        }
        let (found, done) = pull_to_the_end(
            &mut hand,
            Pull {
                key_filter: Some(KeyFilter::Keys(vec![
                    vec![Value::Int(3)],
                    vec![Value::Int(19)],
                ])),
                ..pull_of("items")
            },
        )
        .await;
        assert_eq!(found, vec![3, 19]);
        assert!(!done.more);
        hand.close().await;
        a.stop().await;
    }
}
