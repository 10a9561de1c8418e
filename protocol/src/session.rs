//! The rules of a data-plane session as plain data, in the manner of `quinn-proto`: no socket,
//! no database, no runtime. Each half is a state machine that takes the time as an argument;
//! the agent's sessions feed it what arrives and do what it answers (send, refuse, close), and
//! ask it when the session times out. Unit tests drive both halves against each other in memory.
//!
//! - [`SenderCore`]: which request each state allows, the credit window of a pull, the Hello and
//!   idle deadlines (pings do not move them).
//! - [`ReceiverCore`]: the version a `Welcome` may choose, and what a `TableSchema` and a
//!   `RowBatch` must be to answer what was asked.
//! - [`Code`]: the stable error codes.

use std::time::{Duration, Instant};

use crate::message::{Message, Pull, TableSchema, Welcome};

/// Most batches a receiver may let a sender have in flight in one pull.
pub use crate::message::MAX_CREDITS;

/// Time a receiver has to send `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a session may go without a request (pings do not count) or a credit.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The stable error codes of an `Error` frame (SPEC section 4 and the data plane).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// Token malformed or unknown.
    InvalidToken,
    /// Connection not active.
    ConnectionNotActive,
    /// Connection expired.
    ConnectionExpired,
    /// `max_downloads` reached.
    DownloadLimitExceeded,
    /// `max_records_total` reached.
    RecordLimitExceeded,
    /// Client address outside the whitelist.
    IpNotWhitelisted,
    /// Outside the allowed hours.
    OutsideAllowedHours,
    /// Download password missing.
    PasswordRequired,
    /// Download password wrong.
    InvalidPassword,
    /// Too many requests (or password guesses).
    RateLimited,
    /// No common protocol version.
    UnsupportedVersion,
    /// The table is not offered.
    TableNotAllowed,
    /// The transfer waits for an admin.
    ApprovalPending,
    /// An admin denied the transfer.
    ApprovalDenied,
    /// The peer sent something the protocol does not allow here.
    ProtocolError,
    /// A well-formed request the sender will not serve as asked.
    InvalidRequest,
    /// The agent or the client address holds as many sessions as allowed.
    TooManySessions,
    /// No request in time.
    Timeout,
    /// A whole-table pull asked to go on from a snapshot the sender no longer holds (the
    /// session that read it ended): the table is pulled again from the start.
    SnapshotGone,
    /// The sender failed.
    InternalError,
}

impl Code {
    /// Every code.
    pub const ALL: &'static [Code] = &[
        Code::InvalidToken,
        Code::ConnectionNotActive,
        Code::ConnectionExpired,
        Code::DownloadLimitExceeded,
        Code::RecordLimitExceeded,
        Code::IpNotWhitelisted,
        Code::OutsideAllowedHours,
        Code::PasswordRequired,
        Code::InvalidPassword,
        Code::RateLimited,
        Code::UnsupportedVersion,
        Code::TableNotAllowed,
        Code::ApprovalPending,
        Code::ApprovalDenied,
        Code::ProtocolError,
        Code::InvalidRequest,
        Code::TooManySessions,
        Code::Timeout,
        Code::SnapshotGone,
        Code::InternalError,
    ];

    /// The code as it goes on the wire.
    pub fn as_str(self) -> &'static str {
        use crate::error::codes;
        match self {
            Code::InvalidToken => codes::INVALID_TOKEN,
            Code::ConnectionNotActive => codes::CONNECTION_NOT_ACTIVE,
            Code::ConnectionExpired => codes::CONNECTION_EXPIRED,
            Code::DownloadLimitExceeded => codes::DOWNLOAD_LIMIT_EXCEEDED,
            Code::RecordLimitExceeded => codes::RECORD_LIMIT_EXCEEDED,
            Code::IpNotWhitelisted => codes::IP_NOT_WHITELISTED,
            Code::OutsideAllowedHours => codes::OUTSIDE_ALLOWED_HOURS,
            Code::PasswordRequired => codes::PASSWORD_REQUIRED,
            Code::InvalidPassword => codes::INVALID_PASSWORD,
            Code::RateLimited => codes::RATE_LIMITED,
            Code::UnsupportedVersion => codes::UNSUPPORTED_VERSION,
            Code::TableNotAllowed => codes::TABLE_NOT_ALLOWED,
            Code::ApprovalPending => codes::APPROVAL_PENDING,
            Code::ApprovalDenied => codes::APPROVAL_DENIED,
            Code::ProtocolError => codes::PROTOCOL_ERROR,
            Code::InvalidRequest => codes::INVALID_REQUEST,
            Code::TooManySessions => codes::TOO_MANY_SESSIONS,
            Code::Timeout => codes::TIMEOUT,
            Code::SnapshotGone => codes::SNAPSHOT_GONE,
            Code::InternalError => codes::INTERNAL_ERROR,
        }
    }

    /// The code a wire string names, if any.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|code| code.as_str() == text)
    }
}

/// Compares with a code as it goes on the wire.
impl PartialEq<str> for Code {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Code {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal the sender answers with an `Error` frame; `close` ends the session after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The code.
    pub code: Code,
    /// The explanation.
    pub message: String,
    /// Whether the session ends after the refusal.
    pub close: bool,
}

impl Refusal {
    fn new(code: Code, message: impl Into<String>, close: bool) -> Self {
        Self {
            code,
            message: message.into(),
            close,
        }
    }
}

/// Where a sender's session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderState {
    /// Only `Hello` is accepted.
    AwaitingHello,
    /// List, describe, pull and ping.
    Ready,
    /// Serving a pull: credits, cancel and ping.
    Pulling(Window),
    /// Over.
    Closed,
}

/// A pull's credit window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The pull answered.
    pub request_id: u64,
    /// Batches that may be sent now.
    pub credits: u32,
    /// Batches sent and not yet acknowledged.
    pub in_flight: u32,
}

/// What the sender does with a message that arrived.
#[derive(Debug, Clone, PartialEq)]
pub enum SenderEvent {
    /// A `Hello` to validate.
    Hello,
    /// A request to serve (list, describe, pull), past the state check.
    Request,
    /// A ping to answer (it counts against the rate limit, and moves no deadline).
    Ping,
    /// Credits for the current pull: this many batches acknowledged.
    Acknowledged(u32),
    /// The receiver cancelled the current pull.
    Cancelled,
    /// Nothing to do (a stray credit or cancel).
    Ignore,
}

/// The sender's half of a session.
#[derive(Debug, Clone)]
pub struct SenderCore {
    state: SenderState,
    idle: Duration,
    deadline: Instant,
}

impl SenderCore {
    /// A session opened at `now`, closed after `idle` without a request once welcomed.
    pub fn new(now: Instant, idle: Duration) -> Self {
        Self {
            state: SenderState::AwaitingHello,
            idle,
            deadline: now + HELLO_TIMEOUT,
        }
    }

    /// Where the session is.
    pub fn state(&self) -> SenderState {
        self.state
    }

    /// When the session times out if nothing that counts arrives first.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The refusal to send when `now` is past the deadline (and the session closes).
    pub fn poll_timeout(&mut self, now: Instant) -> Option<Refusal> {
        if now < self.deadline || self.state == SenderState::Closed {
            return None;
        }
        let message = match self.state {
            SenderState::AwaitingHello => "no Hello in time; closing the session",
            _ => "no request in time; closing the session",
        };
        self.state = SenderState::Closed;
        Some(Refusal::new(Code::Timeout, message, true))
    }

    /// Sorts out a message that arrived at `now`: what to do with it, or the refusal.
    pub fn handle(&mut self, now: Instant, message: &Message) -> Result<SenderEvent, Refusal> {
        let unexpected = |close| {
            Refusal::new(
                Code::ProtocolError,
                format!("unexpected {:?}", message.kind()),
                close,
            )
        };
        match (self.state, message) {
            (SenderState::Closed, _) => Err(Refusal::new(Code::ProtocolError, "closed", true)),
            (SenderState::AwaitingHello, Message::Hello(_)) => Ok(SenderEvent::Hello),
            (SenderState::AwaitingHello, _) => {
                self.state = SenderState::Closed;
                Err(Refusal::new(
                    Code::ProtocolError,
                    "the first frame must be Hello",
                    true,
                ))
            }
            (_, Message::Ping(_)) => Ok(SenderEvent::Ping),
            (
                SenderState::Ready,
                Message::ListTables
                | Message::DescribeTable(_)
                | Message::Pull(_)
                | Message::Verify(_)
                | Message::Split(_),
            ) => {
                self.deadline = now + self.idle;
                Ok(SenderEvent::Request)
            }
            (SenderState::Ready, Message::Credit(_) | Message::Cancel(_)) => {
                Ok(SenderEvent::Ignore)
            }
            (SenderState::Ready, _) => Err(unexpected(false)),
            (SenderState::Pulling(mut window), Message::Credit(credit))
                if credit.request_id == window.request_id =>
            {
                // A receiver cannot grant itself more than it was sent.
                let batches = credit.batches.min(window.in_flight);
                if batches == 0 {
                    return Ok(SenderEvent::Ignore);
                }
                window.in_flight -= batches;
                window.credits += batches;
                self.state = SenderState::Pulling(window);
                self.deadline = now + self.idle;
                Ok(SenderEvent::Acknowledged(batches))
            }
            (SenderState::Pulling(_), Message::Cancel(_)) => {
                self.deadline = now + self.idle;
                Ok(SenderEvent::Cancelled)
            }
            (SenderState::Pulling(_), _) => Ok(SenderEvent::Ignore),
        }
    }

    /// The Hello was accepted: requests may come.
    pub fn welcomed(&mut self, now: Instant) {
        self.state = SenderState::Ready;
        self.deadline = now + self.idle;
    }

    /// The session ends (refused, closed by either side).
    pub fn close(&mut self) {
        self.state = SenderState::Closed;
    }

    /// A pull starts: its window opens with the credits asked for, within `1..=MAX_CREDITS`.
    pub fn start_pull(&mut self, pull: &Pull) -> Window {
        let window = Window {
            request_id: pull.request_id,
            credits: pull.credits.clamp(1, MAX_CREDITS),
            in_flight: 0,
        };
        self.state = SenderState::Pulling(window);
        window
    }

    /// Whether a batch may be sent now (a credit is free).
    pub fn may_send(&self) -> bool {
        matches!(self.state, SenderState::Pulling(w) if w.credits > 0)
    }

    /// A batch was sent: it takes a credit.
    pub fn sent(&mut self) {
        if let SenderState::Pulling(mut window) = self.state
            && window.credits > 0
        {
            window.credits -= 1;
            window.in_flight += 1;
            self.state = SenderState::Pulling(window);
        }
    }

    /// Batches sent and not yet acknowledged.
    pub fn in_flight(&self) -> u32 {
        match self.state {
            SenderState::Pulling(window) => window.in_flight,
            _ => 0,
        }
    }

    /// The pull is over (done, refused or cancelled): back to taking requests.
    pub fn end_pull(&mut self) {
        if matches!(self.state, SenderState::Pulling(_)) {
            self.state = SenderState::Ready;
        }
    }
}

/// Why a receiver stops trusting what its sender said.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// The first answer was not a Welcome.
    #[error("expected Welcome, got {0}")]
    NotWelcome(String),
    /// The Welcome chose a version the receiver did not offer.
    #[error(
        "the sender chose protocol version {chosen}, which this receiver does not speak ({offered:?})"
    )]
    Version {
        /// What it chose.
        chosen: u16,
        /// What was offered.
        offered: Vec<u16>,
    },
    /// The description is not of the table asked for, or not a usable one.
    #[error("{0}")]
    Schema(String),
    /// A row batch does not answer the pull.
    #[error("{0}")]
    Batch(String),
}

/// What a receiver asked for in its current pull, which each batch must answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The pull's request id.
    pub request_id: u64,
    /// The columns asked for, in order.
    pub columns: Vec<String>,
    /// How many values a batch's last key has.
    pub key_len: usize,
}

/// The receiver's half of a session: what it may believe of its sender.
#[derive(Debug, Clone)]
pub struct ReceiverCore {
    offered: Vec<u16>,
    version: Option<u16>,
}

/// Most indexes, constraints, defaults, comments, ... of one kind a described table may bring.
pub const MAX_SCHEMA_PARTS: usize = 1_000;

impl ReceiverCore {
    /// A receiver that offers `versions` in its Hello.
    pub fn new(versions: &[u16]) -> Self {
        Self {
            offered: versions.to_vec(),
            version: None,
        }
    }

    /// The version the session speaks, once welcomed.
    pub fn version(&self) -> Option<u16> {
        self.version
    }

    /// Checks the sender's first answer: a Welcome of an offered version.
    pub fn on_welcome<'a>(&mut self, message: &'a Message) -> Result<&'a Welcome, Violation> {
        let Message::Welcome(welcome) = message else {
            return Err(Violation::NotWelcome(format!("{:?}", message.kind())));
        };
        if !self.offered.contains(&welcome.version) {
            return Err(Violation::Version {
                chosen: welcome.version,
                offered: self.offered.clone(),
            });
        }
        self.version = Some(welcome.version);
        Ok(welcome)
    }

    /// Checks the description of `table`: that table, under that name, with valid, distinct
    /// column names and a key made of its columns.
    pub fn check_schema(table: &str, schema: &TableSchema) -> Result<(), Violation> {
        let fail = |text: String| Err(Violation::Schema(text));
        if schema.name != table {
            return fail(format!(
                "asked to describe {table:?}, the sender described {:?}",
                schema.name
            ));
        }
        if schema.columns.is_empty() {
            return fail(format!("{table:?} is described with no columns"));
        }
        let mut names = std::collections::HashSet::new();
        for column in &schema.columns {
            if column.name.is_empty() || column.name.len() > 63 || column.name.contains('\0') {
                return fail(format!(
                    "{table:?} is described with a column named {:?}",
                    column.name
                ));
            }
            if !names.insert(column.name.as_str()) {
                return fail(format!(
                    "{table:?} is described with column {:?} twice",
                    column.name
                ));
            }
        }
        for key in &schema.primary_key {
            if !names.contains(key.as_str()) {
                return fail(format!(
                    "{table:?} is described with key column {key:?}, which it lacks"
                ));
            }
        }
        if let Some(extras) = &schema.postgres {
            if extras.types.len() > 200 || extras.extensions.len() > 64 {
                return fail(format!("{table:?} is described with too many types"));
            }
            for sequence in &extras.sequences {
                if !names.contains(sequence.column.as_str()) {
                    return fail(format!(
                        "{table:?} is described with a sequence for column {:?}, which it lacks",
                        sequence.column
                    ));
                }
            }
            // Each part is a statement (or more) on the receiver: bounded, whatever the frame
            // could hold.
            let parts = [
                extras.indexes.len(),
                extras.checks.len(),
                extras.comments.len(),
                extras.defaults.len(),
                extras.generated.len(),
                extras.collations.len(),
                extras.foreign_keys.len(),
            ];
            if parts.iter().any(|n| *n > MAX_SCHEMA_PARTS) {
                return fail(format!(
                    "{table:?} is described with more than {MAX_SCHEMA_PARTS} indexes, \
                     constraints, defaults or comments of one kind"
                ));
            }
            let columns_named = extras
                .defaults
                .iter()
                .map(|d| &d.column)
                .chain(extras.generated.iter().map(|g| &g.column))
                .chain(extras.collations.iter().map(|(c, _)| c))
                .chain(extras.comments.iter().filter_map(|c| c.column.as_ref()));
            for column in columns_named {
                if !names.contains(column.as_str()) {
                    return fail(format!(
                        "{table:?} is described with a default, generated expression, collation \
                         or comment for column {column:?}, which it lacks"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks that a row batch answers `expected`: its request, exactly its columns, and a last
    /// key of the key's length (or none).
    pub fn check_batch(
        expected: &Expected,
        request_id: u64,
        columns: &[String],
        last_key_len: usize,
    ) -> Result<(), Violation> {
        if request_id != expected.request_id
            || columns != expected.columns.as_slice()
            || !(last_key_len == 0 || last_key_len == expected.key_len)
        {
            return Err(Violation::Batch(format!(
                "a row batch for request {request_id} with columns {columns:?} does not answer \
                 request {} for {:?}",
                expected.request_id, expected.columns
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Cancel, ColumnInfo, Credit, Hello, Ping, TableSchema};
    use crate::secret::Secret;

    fn hello() -> Message {
        Message::Hello(Hello {
            versions: vec![2],
            token: Secret::new("dbs_x"),
            password: None,
            client_name: "test".into(),
        })
    }

    fn welcome(version: u16) -> Message {
        Message::Welcome(Welcome {
            version,
            session_id: "s".into(),
            max_records_per_request: 10,
            max_frame_bytes: 1 << 20,
        })
    }

    fn pull(request_id: u64, credits: u32) -> Pull {
        Pull {
            request_id,
            table: "t".into(),
            after_key: None,
            limit: 100,
            exclude_columns: vec![],
            credits,
            transfer_id: None,
            key_filter: None,
            cursor_column: None,
            keys_only: false,
            split: None,
        }
    }

    fn credit(request_id: u64, batches: u32) -> Message {
        Message::Credit(Credit {
            request_id,
            batches,
        })
    }

    const IDLE: Duration = Duration::from_secs(300);

    #[test]
    fn a_whole_session_between_both_halves() {
        let t0 = Instant::now();
        let mut sender = SenderCore::new(t0, IDLE);
        let mut receiver = ReceiverCore::new(&[2]);
        assert_eq!(sender.handle(t0, &hello()), Ok(SenderEvent::Hello));
        sender.welcomed(t0);
        let answer = welcome(2);
        assert_eq!(receiver.on_welcome(&answer).unwrap().version, 2);
        assert_eq!(receiver.version(), Some(2));
        assert_eq!(
            sender.handle(t0, &Message::ListTables),
            Ok(SenderEvent::Request)
        );
        let asked = Message::Pull(pull(1, 3));
        assert_eq!(sender.handle(t0, &asked), Ok(SenderEvent::Request));
        let Message::Pull(asked) = asked else {
            unreachable!()
        };
        let window = sender.start_pull(&asked);
        assert_eq!(window.credits, 3);
        let expected = Expected {
            request_id: 1,
            columns: vec!["id".into()],
            key_len: 1,
        };
        // Five batches through a window of three: the sender waits for each credit.
        let mut sent = 0;
        let mut applied = 0;
        while applied < 5 {
            while sender.may_send() && sent < 5 {
                sender.sent();
                sent += 1;
                ReceiverCore::check_batch(&expected, 1, &["id".into()], 1).unwrap();
            }
            assert!(sender.in_flight() <= 3);
            assert_eq!(
                sender.handle(t0, &credit(1, 1)),
                Ok(SenderEvent::Acknowledged(1))
            );
            applied += 1;
        }
        assert_eq!(sender.in_flight(), 0);
        sender.end_pull();
        assert_eq!(sender.state(), SenderState::Ready);
    }

    #[test]
    fn only_hello_opens_a_session() {
        for first in [
            Message::ListTables,
            Message::Pull(pull(1, 1)),
            credit(1, 1),
            Message::Ping(Ping { nonce: 1 }),
        ] {
            let t0 = Instant::now();
            let mut sender = SenderCore::new(t0, IDLE);
            let refusal = sender.handle(t0, &first).unwrap_err();
            assert_eq!(refusal.code, Code::ProtocolError);
            assert!(refusal.close);
            assert_eq!(sender.state(), SenderState::Closed);
        }
    }

    #[test]
    fn each_state_allows_its_requests_only() {
        let t0 = Instant::now();
        let mut sender = SenderCore::new(t0, IDLE);
        sender.handle(t0, &hello()).unwrap();
        sender.welcomed(t0);
        // Ready: a second Hello, a welcome or a batch are refused, the session goes on.
        for stray in [hello(), welcome(2), Message::TableList(vec![])] {
            let refusal = sender.handle(t0, &stray).unwrap_err();
            assert_eq!(refusal.code, Code::ProtocolError);
            assert!(!refusal.close);
        }
        assert_eq!(sender.handle(t0, &credit(9, 5)), Ok(SenderEvent::Ignore));
        assert_eq!(
            sender.handle(t0, &Message::Cancel(Cancel { request_id: 1 })),
            Ok(SenderEvent::Ignore)
        );
        // Pulling: credits of another request and requests are ignored until the pull ends.
        sender.start_pull(&pull(4, 2));
        assert_eq!(sender.handle(t0, &credit(3, 1)), Ok(SenderEvent::Ignore));
        assert_eq!(
            sender.handle(t0, &Message::ListTables),
            Ok(SenderEvent::Ignore)
        );
        assert_eq!(
            sender.handle(t0, &Message::Cancel(Cancel { request_id: 4 })),
            Ok(SenderEvent::Cancelled)
        );
    }

    #[test]
    fn a_receiver_cannot_grant_itself_more_than_it_was_sent() {
        let t0 = Instant::now();
        let mut sender = SenderCore::new(t0, IDLE);
        sender.handle(t0, &hello()).unwrap();
        sender.welcomed(t0);
        // Credits asked for are clamped to 1..=MAX_CREDITS.
        assert_eq!(sender.start_pull(&pull(1, 0)).credits, 1);
        assert_eq!(sender.start_pull(&pull(1, u32::MAX)).credits, MAX_CREDITS);
        sender.start_pull(&pull(2, 2));
        sender.sent();
        sender.sent();
        assert!(!sender.may_send());
        // A credit of a million acknowledges the two batches in flight, no more.
        assert_eq!(
            sender.handle(t0, &credit(2, 1_000_000)),
            Ok(SenderEvent::Acknowledged(2))
        );
        assert_eq!(sender.handle(t0, &credit(2, 5)), Ok(SenderEvent::Ignore));
        match sender.state() {
            SenderState::Pulling(window) => assert_eq!(window.credits, 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deadlines_move_with_requests_not_with_pings() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(2);
        let mut sender = SenderCore::new(t0, idle);
        assert_eq!(sender.deadline(), t0 + HELLO_TIMEOUT);
        assert!(sender.poll_timeout(t0 + Duration::from_secs(9)).is_none());
        sender.handle(t0, &hello()).unwrap();
        sender.welcomed(t0);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            sender.handle(t1, &Message::Ping(Ping { nonce: 1 })),
            Ok(SenderEvent::Ping)
        );
        assert_eq!(sender.deadline(), t0 + idle, "a ping moves nothing");
        sender.handle(t1, &Message::ListTables).unwrap();
        assert_eq!(sender.deadline(), t1 + idle);
        let refusal = sender.poll_timeout(t1 + idle).unwrap();
        assert_eq!(refusal.code, Code::Timeout);
        assert!(refusal.close);
        assert_eq!(sender.state(), SenderState::Closed);
        assert!(sender.poll_timeout(t1 + idle * 2).is_none(), "once");
        // A session that never says Hello times out at the Hello deadline.
        let mut silent = SenderCore::new(t0, idle);
        assert!(silent.poll_timeout(t0 + HELLO_TIMEOUT).is_some());
    }

    #[test]
    fn a_receiver_believes_only_what_answers_it() {
        let mut receiver = ReceiverCore::new(&[2]);
        assert!(matches!(
            receiver.on_welcome(&welcome(99)),
            Err(Violation::Version { chosen: 99, .. })
        ));
        assert!(matches!(
            receiver.on_welcome(&Message::ListTables),
            Err(Violation::NotWelcome(_))
        ));
        let column = |name: &str| ColumnInfo {
            name: name.into(),
            native_type: "TEXT".into(),
            neutral_type: "text".into(),
            nullable: true,
        };
        let schema = |name: &str, columns: &[&str], key: &[&str]| TableSchema {
            name: name.into(),
            engine: "sqlite".into(),
            columns: columns.iter().map(|c| column(c)).collect(),
            primary_key: key.iter().map(|k| (*k).to_owned()).collect(),
            postgres: None,
        };
        assert!(ReceiverCore::check_schema("t1", &schema("t1", &["id"], &["id"])).is_ok());
        for bad in [
            schema("DBSYNC_ADMIN_TOKENS", &["id"], &["id"]),
            schema("t1", &[], &[]),
            schema("t1", &["id", "id"], &["id"]),
            schema("t1", &["id"], &["other"]),
            schema("t1", &["a\0b"], &[]),
        ] {
            assert!(ReceiverCore::check_schema("t1", &bad).is_err(), "{bad:?}");
        }
        // What a PostgreSQL sender adds must name the table's own columns and stay bounded.
        let with = |extras: crate::message::PostgresSchema| TableSchema {
            postgres: Some(extras),
            ..schema("t1", &["id"], &["id"])
        };
        let sequence = |column: &str| crate::message::ColumnSequence {
            column: column.into(),
            identity: None,
            data_type: "bigint".into(),
            increment: 1,
            min_value: 1,
            max_value: i64::MAX,
            start: 1,
            cycle: false,
            last_value: Some(5),
        };
        let fine = crate::message::PostgresSchema {
            sequences: vec![sequence("id")],
            ..Default::default()
        };
        assert!(ReceiverCore::check_schema("t1", &with(fine)).is_ok());
        let lying = crate::message::PostgresSchema {
            sequences: vec![sequence("nope")],
            ..Default::default()
        };
        assert!(ReceiverCore::check_schema("t1", &with(lying)).is_err());
        let many = crate::message::PostgresSchema {
            types: (0..201)
                .map(|i| crate::message::UserType::Enum {
                    name: format!("t{i}"),
                    labels: vec![],
                })
                .collect(),
            ..Default::default()
        };
        assert!(ReceiverCore::check_schema("t1", &with(many)).is_err());
        let ghost = crate::message::PostgresSchema {
            generated: vec![crate::message::GeneratedColumn {
                column: "ghost".into(),
                expression: "1".into(),
            }],
            ..Default::default()
        };
        assert!(ReceiverCore::check_schema("t1", &with(ghost)).is_err());
        let flood = crate::message::PostgresSchema {
            comments: (0..=MAX_SCHEMA_PARTS)
                .map(|_| crate::message::CommentDef {
                    column: None,
                    text: "x".into(),
                })
                .collect(),
            ..Default::default()
        };
        assert!(ReceiverCore::check_schema("t1", &with(flood)).is_err());
        let expected = Expected {
            request_id: 3,
            columns: vec!["id".into(), "name".into()],
            key_len: 1,
        };
        let columns = ["id".to_owned(), "name".to_owned()];
        assert!(ReceiverCore::check_batch(&expected, 3, &columns, 1).is_ok());
        assert!(ReceiverCore::check_batch(&expected, 3, &columns, 0).is_ok());
        assert!(ReceiverCore::check_batch(&expected, 2, &columns, 1).is_err());
        assert!(ReceiverCore::check_batch(&expected, 3, &columns[..1], 1).is_err());
        assert!(ReceiverCore::check_batch(&expected, 3, &columns, 2).is_err());
    }

    #[test]
    fn codes_round_trip() {
        for code in Code::ALL {
            assert_eq!(Code::parse(code.as_str()), Some(*code));
        }
        assert_eq!(Code::parse("no_such_code"), None);
    }
}
