//! QUIC and fault tolerance: the same pulls over both transports, a pinned certificate that does
//! not match, `auto` falling back to WebSocket when UDP gets no answer, a bounded number of
//! streams per connection, and a sender restarted mid-pull that the receiver rides out.

use std::time::Duration;

use dbsync_agent::connection::ConnectionSettings;
use dbsync_agent::pull::{PullEvent, PullOptions, TransportChoice};
use dbsync_agent::transfer::{TransferDirection, TransferFilter, TransferStatus};
use dbsync_agent::{Error, quic};
use dbsync_protocol::codec::Limits;

use crate::pull::{exec, pair, rows, schema_statements};

fn over(transport: TransportChoice) -> PullOptions {
    PullOptions {
        tables: Some(vec!["users".into()]),
        transport,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_pull_over_websocket_and_quic() {
    for postgres in [false, true] {
        let Some((a, b, receiver)) =
            pair("quic::both", postgres, ConnectionSettings::default()).await
        else {
            return;
        };
        exec(&a, &schema_statements(3_500)).await;
        for (transport, expected) in [
            (TransportChoice::Quic, "quic"),
            (TransportChoice::Ws, "ws"),
            (TransportChoice::Auto, "quic"),
        ] {
            let summary = b
                .agent
                .pull(&receiver, &over(transport), |_| {})
                .await
                .unwrap();
            assert_eq!(summary.tables[0].transport, expected);
            assert_eq!(summary.tables[0].rows, 3_500);
            assert_eq!(
                rows(&a.agent.store, "users").await,
                rows(&b.agent.store, "users").await
            );
        }
        // Both sides recorded the transport.
        let sent = a
            .agent
            .store
            .list_transfers(&TransferFilter {
                direction: Some(TransferDirection::Send),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut transports: Vec<_> = sent
            .items
            .iter()
            .map(|t| t.transport.clone().unwrap_or_default())
            .collect();
        transports.sort();
        assert_eq!(transports, ["quic", "quic", "ws"]);
        a.stop().await;
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_is_not_the_pinned_one_is_refused() {
    let Some((a, b, receiver)) = pair("quic::pin", false, ConnectionSettings::default()).await
    else {
        return;
    };
    exec(&a, &schema_statements(10)).await;
    let connection = b.agent.store.get_connection(&receiver).await.unwrap();
    let offer = &connection.metadata["registration"]["quic"];
    assert_eq!(
        offer["cert_fingerprint"].as_str().unwrap(),
        a.agent.quic_identity().await.unwrap().fingerprint,
        "the fingerprint travelled with the registration"
    );
    b.agent
        .store
        .merge_connection_metadata(
            connection.id,
            serde_json::json!({ "quic": { "kind": "quic", "port": a.addr.port(), "cert_fingerprint": "00".repeat(32) } }),
        )
        .await
        .unwrap();
    for transport in [TransportChoice::Quic, TransportChoice::Auto] {
        let err = b
            .agent
            .pull(&receiver, &over(transport), |_| {})
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, Error::Session { .. }) && text.contains("not the pinned"),
            "{transport:?}: {text}"
        );
    }
    assert!(
        b.agent.store.describe_table("users").await.is_err(),
        "nothing was pulled"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_websocket_when_udp_gets_no_answer() {
    let Some((a, b, receiver)) = pair("quic::fallback", false, ConnectionSettings::default()).await
    else {
        return;
    };
    exec(&a, &schema_statements(50)).await;
    // A UDP port that swallows every datagram, like a firewall that drops UDP.
    let black_hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = black_hole.local_addr().unwrap().port();
    let connection = b.agent.store.get_connection(&receiver).await.unwrap();
    let fingerprint = a.agent.quic_identity().await.unwrap().fingerprint.clone();
    b.agent
        .store
        .merge_connection_metadata(
            connection.id,
            serde_json::json!({ "quic": { "kind": "quic", "port": port, "cert_fingerprint": fingerprint } }),
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let summary = b
        .agent
        .pull(&receiver, &over(TransportChoice::Auto), |_| {})
        .await
        .unwrap();
    assert_eq!(summary.tables[0].transport, "ws");
    assert_eq!(summary.tables[0].rows, 50);
    assert!(started.elapsed() < Duration::from_secs(10));
    let err = b
        .agent
        .pull(&receiver, &over(TransportChoice::Quic), |_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("UDP blocked"), "{err}");
    drop(black_hole);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_open_more_streams_than_allowed() {
    let Some(a) = crate::support::agents::start("quic::streams", Default::default()).await else {
        return;
    };
    let identity = a.agent.quic_identity().await.unwrap();
    let config = a.agent.config.quic.clone();
    let (link, connection) = quic::connect(
        a.addr,
        "dbsync",
        &quic::Verify::Pinned(identity.fingerprint.clone()),
        &config,
        Limits::default(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    // The first stream belongs to `link`; open the rest of the allowance, then one more.
    let mut open = Vec::new();
    for _ in 1..config.max_streams {
        let (mut send, recv) = connection.connection.open_bi().await.unwrap();
        send.write_all(&[0xDB]).await.unwrap();
        open.push((send, recv));
    }
    let beyond =
        tokio::time::timeout(Duration::from_secs(2), connection.connection.open_bi()).await;
    assert!(beyond.is_err(), "a stream beyond max_streams must wait");
    drop(open);
    drop(link);
    connection.close().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_restarted_mid_pull_is_ridden_out() {
    for transport in [TransportChoice::Ws, TransportChoice::Quic] {
        let Some((mut a, b, receiver)) =
            pair("quic::restart", true, ConnectionSettings::default()).await
        else {
            return;
        };
        exec(
            &a,
            &[
                "CREATE TABLE users (id BIGINT PRIMARY KEY, email TEXT NOT NULL, score REAL)".into(),
                "INSERT INTO users SELECT g, 'u' || g || '@example.com', g / 2.0 FROM generate_series(1, 60000) g".into(),
            ],
        )
        .await;
        let (seen, mut batches) = tokio::sync::mpsc::unbounded_channel::<()>();
        let agent = std::sync::Arc::clone(&b.agent);
        let name = receiver.clone();
        let options = PullOptions {
            retry_for: Duration::from_secs(60),
            ..over(transport)
        };
        let task = tokio::spawn(async move {
            agent
                .pull(&name, &options, move |event| {
                    if matches!(event, PullEvent::Batch { .. }) {
                        let _ = seen.send(());
                    }
                })
                .await
        });
        batches.recv().await.unwrap();
        batches.recv().await.unwrap();
        a.pause().await; // every session ends; nothing listens
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        a.resume().await;
        let summary = task.await.unwrap().unwrap();
        assert!(summary.tables[0].reconnects >= 1, "{transport:?}");
        assert_eq!(
            rows(&a.agent.store, "users").await,
            rows(&b.agent.store, "users").await
        );
        let on_a = a.agent.store.get_connection("to-b").await.unwrap();
        assert_eq!(on_a.downloads_used, 1);
        let sent = a
            .agent
            .store
            .list_transfers(&TransferFilter::default())
            .await
            .unwrap();
        assert_eq!(sent.total, 1);
        assert_eq!(sent.items[0].status, TransferStatus::Completed);
        assert_eq!(sent.items[0].records_transferred, 60_000);
        // The receiver's history says what happened: a broken-off transfer, then the one that
        // finished after reconnecting.
        let received = b
            .agent
            .store
            .list_transfers(&TransferFilter::default())
            .await
            .unwrap();
        assert!(
            received
                .items
                .iter()
                .any(|t| t.status == TransferStatus::Failed)
        );
        assert!(
            received
                .items
                .iter()
                .any(|t| t.status == TransferStatus::Completed
                    && t.metadata["reconnects"].as_u64() >= Some(1))
        );
        a.stop().await;
        b.stop().await;
    }
}
