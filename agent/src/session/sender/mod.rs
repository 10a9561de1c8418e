//! The sender's half of a data-plane session, over either transport: `Hello` is checked by
//! `validate_connection`, then list, describe and pull requests are served under the
//! connection's controls (offered tables, approval mode, download and record limits, rows per
//! request, rate limit). Which message each state allows, the credit window and the deadlines
//! are [`SenderCore`]'s; this module does what it answers, against the store. Rows go out in key
//! order, a batch at a time, never more batches in flight than the receiver granted
//! (`pull`, read by `pages`).

mod pages;
mod pull;
mod split;
mod verify;

pub use pages::Readers;
pub use split::{MIN_PART_ROWS, Splits};

use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use dbsync_protocol::Message;
use dbsync_protocol::message::{ErrorMessage, TableSchema, Welcome};
use dbsync_protocol::session::{Code, Refusal, SenderCore, SenderEvent};
use uuid::Uuid;

use crate::access::AccessDenied;
use crate::admission::Admission;
use crate::agent::Agent;
use crate::link::{Incoming, Link, LinkFailure};
use crate::transfer::Transport;

pub use dbsync_protocol::session::HELLO_TIMEOUT;

/// Why a sender's session ended (logged at debug level; the receiver was told already).
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    /// The receiver closed the session.
    #[error("closed by the receiver")]
    Closed,
    /// The transport failed, or the receiver sent what is not a frame of the protocol.
    #[error("the link failed: {0}")]
    Link(String),
    /// The session was refused or ended with this code (sent to the receiver).
    #[error("ended with {0}")]
    Ended(Code),
    /// The state database failed.
    #[error("the state database failed")]
    Store(#[from] crate::Error),
}

type SessionResult<T> = Result<T, SessionEnd>;

/// Runs one session over `link` until it ends or `stop` resolves (either transport). The session
/// takes a place under `sessions` first; with none left it is refused with `too_many_sessions`
/// before its `Hello` is read.
pub async fn serve(
    agent: &Agent,
    sessions: &Admission,
    mut link: Link,
    client_ip: IpAddr,
    user_agent: Option<String>,
    transport: Transport,
    stop: impl Future<Output = ()>,
) {
    link.set_zstd_level(agent.config.server.zstd_level);
    let _permit = match sessions.admit(client_ip) {
        Ok(permit) => permit,
        Err(refusal) => {
            tracing::debug!(client = %client_ip, reason = %refusal, %transport, "session refused");
            let _ = link
                .send(&Message::Error(ErrorMessage {
                    code: Code::TooManySessions.as_str().to_owned(),
                    message: format!("{refusal}; try again later"),
                    retry_after_ms: Some(5_000),
                    transfer_id: None,
                }))
                .await;
            link.close().await;
            return;
        }
    };
    let idle = Duration::from_secs(agent.config.server.session_idle_timeout_secs);
    let mut session = Session {
        agent,
        link,
        core: SenderCore::new(std::time::Instant::now(), idle),
        client_ip,
        user_agent,
        transport,
        snapshot: None,
        exported: None,
        splits_made: Vec::new(),
        verifying: Vec::new(),
        described: Vec::new(),
    };
    tokio::select! {
        outcome = session.run() => {
            if let Err(end) = outcome {
                tracing::debug!(reason = %end, %transport, "session ended");
            }
        }
        () = stop => tracing::debug!(%transport, "session ended by shutdown"),
    }
    // The cuts this session made lose its snapshot (their parts already reading keep it).
    for token in &session.splits_made {
        agent.splits.session_ended(token);
    }
    // Verifications the receiver did not finish end with the session.
    for (_, transfer) in std::mem::take(&mut session.verifying) {
        let _ = agent
            .store
            .fail_transfer(
                transfer,
                "the session ended before the verification did",
                agent.now(),
            )
            .await;
    }
    session.link.close().await;
}

struct Session<'a> {
    agent: &'a Agent,
    link: Link,
    core: SenderCore,
    client_ip: IpAddr,
    user_agent: Option<String>,
    transport: Transport,
    /// The snapshot a whole-table pull reads from between its requests, with its transfer.
    snapshot: Option<(uuid::Uuid, crate::source::Snapshot)>,
    /// The snapshot every table of this session's pulls is read from (PostgreSQL), exported at
    /// its first pull (or cut) and held until the session ends, and by the parts of its cuts
    /// that other sessions serve.
    exported: Option<std::sync::Arc<crate::source::ExportedSnapshot>>,
    /// The grants of the cuts this session made ([`Splits`]), forgotten when it ends.
    splits_made: Vec<String>,
    /// The tables being verified in this session, each with its verification transfer.
    verifying: Vec<(String, uuid::Uuid)>,
    /// Tables described lately, each with when: a verification asks about the same table a
    /// hundred times in a second, and describing it is a catalog query each time.
    described: Vec<(String, std::time::Instant, TableSchema)>,
}

/// How long a session reuses a table's description.
const DESCRIBED_FOR: Duration = Duration::from_secs(2);
/// Most descriptions a session keeps.
const DESCRIBED_MOST: usize = 16;

impl Session<'_> {
    /// Sends a message; returns (bytes on the wire, payload bytes before compression).
    async fn send_sized(&mut self, message: &Message) -> SessionResult<(usize, usize)> {
        self.link.send(message).await.map_err(SessionEnd::Link)
    }

    async fn send(&mut self, message: &Message) -> SessionResult<usize> {
        self.send_sized(message).await.map(|(wire, _)| wire)
    }

    async fn refuse(
        &mut self,
        code: Code,
        message: impl Into<String>,
        retry_after: Option<Duration>,
    ) -> SessionResult<()> {
        let error = Message::Error(ErrorMessage {
            code: code.as_str().to_owned(),
            message: message.into(),
            retry_after_ms: retry_after.map(|d| d.as_millis() as u64),
            transfer_id: None,
        });
        self.send(&error).await.map(|_| ())
    }

    /// Sends a refusal of the core's; one that closes the session ends it here.
    async fn refused(&mut self, refusal: Refusal) -> SessionResult<()> {
        self.refuse(refusal.code, refusal.message, None).await?;
        if refusal.close {
            self.core.close();
            return Err(SessionEnd::Ended(refusal.code));
        }
        Ok(())
    }

    /// The next message the core lets through, by its deadline: refusals are answered on the
    /// way (those that close end the session), silence past the deadline is `timeout`, and a
    /// frame that breaks the codec's rules is `protocol_error`.
    async fn next(&mut self) -> SessionResult<(SenderEvent, Message)> {
        loop {
            let deadline = tokio::time::Instant::from_std(self.core.deadline());
            let next = match tokio::time::timeout_at(deadline, self.link.recv()).await {
                Ok(next) => next,
                Err(_) => match self.core.poll_timeout(std::time::Instant::now()) {
                    Some(refusal) => {
                        let code = refusal.code;
                        let _ = self.refused(refusal).await;
                        return Err(SessionEnd::Ended(code));
                    }
                    None => continue,
                },
            };
            let message = match next {
                Some(Incoming::Message(message, _)) => message,
                // The link refuses row batches from a receiver before decoding them
                // (`Limits::requests`): this is never reached, and refused all the same.
                Some(Incoming::Batch(..)) => {
                    let reason = format!("unexpected {:?}", dbsync_protocol::Kind::RowBatch);
                    let _ = self.refuse(Code::ProtocolError, reason.clone(), None).await;
                    return Err(SessionEnd::Link(reason));
                }
                Some(Incoming::Malformed(reason)) => {
                    let _ = self.refuse(Code::ProtocolError, reason.clone(), None).await;
                    return Err(SessionEnd::Link(reason));
                }
                Some(Incoming::Failed(failure)) => {
                    if let LinkFailure::NotProtocol(reason) = &failure {
                        let _ = self.refuse(Code::ProtocolError, reason.clone(), None).await;
                    }
                    return Err(SessionEnd::Link(failure.to_string()));
                }
                None => return Err(SessionEnd::Closed),
            };
            match self.core.handle(std::time::Instant::now(), &message) {
                Ok(event) => return Ok((event, message)),
                Err(refusal) => self.refused(refusal).await?,
            }
        }
    }

    /// Answers an access check's refusal with its code.
    async fn denied(&mut self, denied: AccessDenied) -> SessionResult<()> {
        let retry = match &denied {
            AccessDenied::RateLimited { retry_after } => {
                self.agent.metrics.rate_limited();
                Some(*retry_after)
            }
            _ => None,
        };
        let message = match &denied {
            AccessDenied::Internal(err) => {
                tracing::error!(error = %err, "session check failed");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        let code = denied.wire_code();
        self.refuse(code, message, retry).await
    }

    /// The schema of `table` when the connection offers it; otherwise `table_not_allowed` is
    /// sent (a table not offered and one that does not exist look the same) and `None` returned.
    /// `table` as the database describes it now, or as it did under [`DESCRIBED_FOR`] ago in
    /// this session; none when it is not there.
    async fn describe(&mut self, table: &str) -> Option<TableSchema> {
        if let Some((_, at, schema)) = self.described.iter().find(|(name, ..)| name == table)
            && at.elapsed() < DESCRIBED_FOR
        {
            return Some(schema.clone());
        }
        self.described.retain(|(name, ..)| name != table);
        let schema = self.agent.store.describe_table(table).await.ok()?;
        if self.described.len() >= DESCRIBED_MOST {
            self.described.remove(0);
        }
        self.described
            .push((table.to_owned(), std::time::Instant::now(), schema.clone()));
        Some(schema)
    }

    async fn offered_schema(
        &mut self,
        connection: &crate::Connection,
        table: &str,
    ) -> SessionResult<Option<TableSchema>> {
        let described = if connection.offers_table(table) {
            self.describe(table).await
        } else {
            None
        };
        if described.is_none() {
            self.refuse(
                Code::TableNotAllowed,
                format!("{table:?} is not offered"),
                None,
            )
            .await?;
        }
        Ok(described)
    }

    async fn run(&mut self) -> SessionResult<()> {
        let (_, Message::Hello(hello)) = self.next().await? else {
            unreachable!("the core lets only Hello through first");
        };
        let Some(version) = dbsync_protocol::negotiate(&hello.versions) else {
            self.agent.metrics.session_refused(Code::UnsupportedVersion);
            self.refuse(
                Code::UnsupportedVersion,
                format!(
                    "this sender speaks {:?}",
                    dbsync_protocol::SUPPORTED_VERSIONS
                ),
                None,
            )
            .await?;
            return Err(SessionEnd::Ended(Code::UnsupportedVersion));
        };
        let now = self.agent.now();
        let connection = match self
            .agent
            .validator
            .validate_connection(
                hello.token.expose(),
                self.client_ip,
                now,
                hello.password.as_ref().map(dbsync_protocol::Secret::expose),
            )
            .await
        {
            Ok(connection) => connection,
            Err(denied) => {
                let code = denied.wire_code();
                self.agent.metrics.session_refused(code);
                self.denied(denied).await?;
                return Err(SessionEnd::Ended(code));
            }
        };
        self.agent.metrics.session_opened(self.transport.as_str());
        if self.user_agent.is_none() {
            self.user_agent = Some(hello.client_name.chars().take(200).collect());
        }
        tracing::info!(connection_id = %connection.id, client = %self.client_ip, "session opened");
        self.send(&Message::Welcome(Welcome {
            version,
            session_id: Uuid::new_v4().to_string(),
            max_records_per_request: connection.max_records_per_request as u64,
            max_frame_bytes: u64::from(dbsync_protocol::codec::DEFAULT_MAX_FRAME_BYTES),
        }))
        .await?;
        self.core.welcomed(std::time::Instant::now());
        loop {
            let (event, request) = self.next().await?;
            if matches!(event, SenderEvent::Ignore) {
                continue;
            }
            // Every request re-reads the connection: a suspension or a changed limit applies at once.
            let connection = match self.agent.store.find_connection(connection.id).await {
                Ok(Some(c)) if c.status == crate::ConnectionStatus::Active => c,
                Ok(Some(c)) => {
                    self.denied(AccessDenied::ConnectionNotActive(c.status))
                        .await?;
                    return Err(SessionEnd::Ended(Code::ConnectionNotActive));
                }
                Ok(None) => {
                    self.refuse(Code::InvalidToken, "the connection no longer exists", None)
                        .await?;
                    return Err(SessionEnd::Ended(Code::InvalidToken));
                }
                Err(err) => {
                    self.denied(AccessDenied::Internal(err)).await?;
                    return Err(SessionEnd::Ended(Code::InternalError));
                }
            };
            // Every request counts against the rate limit, pings included.
            if let Err(denied) = self.agent.validator.check_rate(&connection).await {
                self.denied(denied).await?;
                continue;
            }
            match request {
                Message::Ping(ping) => {
                    self.send(&Message::Pong(ping)).await?;
                }
                Message::ListTables => {
                    let tables = self.agent.store.list_tables().await?;
                    let offered = tables
                        .into_iter()
                        .filter(|t| connection.offers_table(&t.name))
                        .collect();
                    self.send(&Message::TableList(offered)).await?;
                }
                Message::DescribeTable(table) => {
                    if let Some(mut schema) = self.offered_schema(&connection, &table).await? {
                        // Version 3 carries what a PostgreSQL receiver rebuilds besides columns.
                        if version >= 3 {
                            schema.postgres = match self.agent.store.postgres_schema(&table).await {
                                Ok(extras) => extras,
                                Err(err) => {
                                    tracing::warn!(table = %table, error = %err, "cannot read the table's types and sequences; describing its columns only");
                                    None
                                }
                            };
                        }
                        self.send(&Message::TableSchema(schema)).await?;
                    }
                }
                Message::Verify(request) => {
                    // A key the table's key cannot be compared with is the receiver's error.
                    match self.verify(&connection, request, version).await {
                        Err(SessionEnd::Store(err @ crate::Error::Invalid { .. })) => {
                            self.refuse(Code::InvalidRequest, err.to_string(), None)
                                .await?;
                        }
                        other => other?,
                    }
                }
                Message::Split(request) => match self.split(&connection, request, version).await {
                    Err(SessionEnd::Store(err @ crate::Error::Invalid { .. })) => {
                        self.refuse(Code::InvalidRequest, err.to_string(), None)
                            .await?;
                    }
                    other => other?,
                },
                Message::Pull(pull) => {
                    let served = self.pull(&connection, pull, version).await;
                    self.core.end_pull();
                    served?;
                }
                // The core lets nothing else through in this state.
                _ => {}
            }
        }
    }
}
