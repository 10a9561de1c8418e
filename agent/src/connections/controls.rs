//! A sender's controls over a connection as given when it is created or updated
//! ([`ConnectionSettings`]), their defaults and checks, and the address forms they compare.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use ipnet::IpNet;

use super::connection::{ApprovalMode, ConflictStrategy};
use crate::error::{Error, Result};

/// Default rows in one pull request.
pub const DEFAULT_MAX_RECORDS_PER_REQUEST: i64 = 10_000;
/// Default requests per minute per connection.
pub const DEFAULT_RATE_LIMIT_PER_MINUTE: i64 = 60;
/// Default auto-sync interval.
pub const DEFAULT_AUTO_SYNC_INTERVAL_MINUTES: i64 = 60;
/// Longest connection name accepted.
pub const MAX_NAME_LEN: usize = 200;

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) is treated as the IPv4 address it carries.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Sender-side controls, as given when creating or updating a connection.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    /// See [`Connection::approval_mode`].
    pub approval_mode: ApprovalMode,
    /// See [`Connection::allowed_tables`].
    pub allowed_tables: Vec<String>,
    /// See [`Connection::excluded_tables`].
    pub excluded_tables: Vec<String>,
    /// See [`Connection::auto_approve_tables`].
    pub auto_approve_tables: Vec<String>,
    /// See [`Connection::max_downloads`].
    pub max_downloads: Option<i64>,
    /// See [`Connection::max_records_total`].
    pub max_records_total: Option<i64>,
    /// See [`Connection::max_records_per_request`].
    pub max_records_per_request: i64,
    /// See [`Connection::rate_limit_per_minute`].
    pub rate_limit_per_minute: i64,
    /// Download password in clear; hashed (argon2id) before it is stored.
    pub download_password: Option<crate::secret::Secret<String>>,
    /// CIDR blocks or single addresses.
    pub ip_whitelist: Vec<String>,
    /// `(start, end)` hours, 0-23, end exclusive; wraps midnight when end < start.
    pub allowed_hours: Option<(u8, u8)>,
    /// IANA time zone of the allowed hours.
    pub time_zone: String,
    /// When the connection stops working.
    pub expires_at: Option<DateTime<Utc>>,
    /// See [`Connection::default_conflict_strategy`].
    pub default_conflict_strategy: ConflictStrategy,
    /// See [`Connection::auto_sync_enabled`].
    pub auto_sync_enabled: bool,
    /// See [`Connection::auto_sync_tables`].
    pub auto_sync_tables: Vec<String>,
    /// See [`Connection::auto_sync_interval_minutes`].
    pub auto_sync_interval_minutes: i64,
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        Self {
            approval_mode: ApprovalMode::AutoApprove,
            allowed_tables: Vec::new(),
            excluded_tables: Vec::new(),
            auto_approve_tables: Vec::new(),
            max_downloads: None,
            max_records_total: None,
            max_records_per_request: DEFAULT_MAX_RECORDS_PER_REQUEST,
            rate_limit_per_minute: DEFAULT_RATE_LIMIT_PER_MINUTE,
            download_password: None,
            ip_whitelist: Vec::new(),
            allowed_hours: None,
            time_zone: "UTC".into(),
            expires_at: None,
            default_conflict_strategy: ConflictStrategy::Overwrite,
            auto_sync_enabled: false,
            auto_sync_tables: Vec::new(),
            auto_sync_interval_minutes: DEFAULT_AUTO_SYNC_INTERVAL_MINUTES,
        }
    }
}

impl ConnectionSettings {
    /// Checks every field and returns the whitelist in canonical CIDR form.
    pub(super) fn validate(&self) -> Result<Vec<String>> {
        if self.default_conflict_strategy == ConflictStrategy::Replace {
            return Err(Error::invalid(
                "default_conflict_strategy",
                "replace is chosen per pull (dbsync pull --strategy replace), not as a default",
            ));
        }
        if self.max_records_per_request <= 0 {
            return Err(Error::invalid("max_records_per_request", "must be > 0"));
        }
        if self.rate_limit_per_minute <= 0 || self.rate_limit_per_minute > i64::from(u32::MAX) {
            return Err(Error::invalid(
                "rate_limit_per_minute",
                "must be between 1 and 4294967295",
            ));
        }
        if self.max_downloads.is_some_and(|n| n < 0) {
            return Err(Error::invalid("max_downloads", "must be >= 0"));
        }
        if self.max_records_total.is_some_and(|n| n < 0) {
            return Err(Error::invalid("max_records_total", "must be >= 0"));
        }
        if self.auto_sync_interval_minutes <= 0 {
            return Err(Error::invalid("auto_sync_interval_minutes", "must be > 0"));
        }
        if let Some((start, end)) = self.allowed_hours {
            if start > 23 || end > 23 {
                return Err(Error::invalid("allowed_hours", "hours are 0-23"));
            }
            if start == end {
                return Err(Error::invalid(
                    "allowed_hours",
                    "start equals end, which allows no hour; leave allowed hours unset to allow all day",
                ));
            }
        }
        self.time_zone.parse::<chrono_tz::Tz>().map_err(|_| {
            Error::invalid(
                "time_zone",
                format!("{:?} is not an IANA time zone", self.time_zone),
            )
        })?;
        for table in self
            .allowed_tables
            .iter()
            .chain(&self.excluded_tables)
            .chain(&self.auto_approve_tables)
            .chain(&self.auto_sync_tables)
        {
            if table.is_empty() || table.len() > 128 || table.chars().any(char::is_control) {
                return Err(Error::invalid(
                    "tables",
                    format!("{table:?} is not a table name"),
                ));
            }
        }
        self.ip_whitelist
            .iter()
            .map(|entry| parse_cidr(entry))
            .collect()
    }
}

/// Parses a CIDR block or a single address (which becomes a /32 or /128) into canonical form.
pub fn parse_cidr(entry: &str) -> Result<String> {
    let entry = entry.trim();
    let net = match entry.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => entry.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
            Error::invalid(
                "ip_whitelist",
                format!("{entry:?} is not an address or CIDR block"),
            )
        })?,
    };
    Ok(net.trunc().to_string())
}
