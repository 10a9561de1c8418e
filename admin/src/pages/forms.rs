//! Reading urlencoded forms, and the form for a connection's sender-side controls (SPEC section
//! 4), shared by "new connection" and "edit settings".

use std::collections::HashMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use dbsync_agent::config::Secret;
use dbsync_agent::connection::{
    ApprovalMode, ConflictStrategy, ConnectionSettings, PasswordChange,
};
use maud::{Markup, html};

/// The fields of a submitted form (the last value wins for a repeated name).
#[derive(Debug, Default)]
pub(crate) struct Fields(HashMap<String, String>);

impl Fields {
    /// Reads an urlencoded body.
    pub(crate) fn parse(body: &[u8]) -> Self {
        Self(url::form_urlencoded::parse(body).into_owned().collect())
    }

    /// The trimmed text of `name`, empty when absent.
    pub(crate) fn text(&self, name: &str) -> &str {
        self.0.get(name).map_or("", |v| v.trim())
    }

    /// The text of `name`, or `None` when absent or blank.
    pub(crate) fn optional(&self, name: &str) -> Option<&str> {
        Some(self.text(name)).filter(|v| !v.is_empty())
    }

    /// Whether the checkbox `name` was ticked.
    pub(crate) fn checked(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// A comma- or newline-separated list.
    pub(crate) fn list(&self, name: &str) -> Vec<String> {
        self.text(name)
            .split([',', '\n'])
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// An integer, or `None` when blank.
    pub(crate) fn number(&self, name: &'static str) -> Result<Option<i64>, String> {
        self.optional(name)
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("{}: {v:?} is not a whole number", label(name)))
            })
            .transpose()
    }

    /// A `datetime-local` value read as UTC, or `None` when blank.
    pub(crate) fn utc_time(&self, name: &'static str) -> Result<Option<DateTime<Utc>>, String> {
        self.optional(name)
            .map(|v| {
                NaiveDateTime::parse_from_str(v, "%Y-%m-%dT%H:%M")
                    .or_else(|_| NaiveDateTime::parse_from_str(v, "%Y-%m-%dT%H:%M:%S"))
                    .map(|t| t.and_utc())
                    .map_err(|_| format!("{}: {v:?} is not a date and time", label(name)))
            })
            .transpose()
    }

    /// One of a string enum's values.
    pub(crate) fn choice<T: std::str::FromStr<Err = dbsync_agent::Error>>(
        &self,
        name: &'static str,
    ) -> Result<Option<T>, String> {
        self.optional(name)
            .map(|v| v.parse().map_err(|e: dbsync_agent::Error| e.to_string()))
            .transpose()
    }
}

/// The human label of a form field.
fn label(name: &str) -> &str {
    match name {
        "max_downloads" => "Max downloads",
        "max_records_total" => "Max records in total",
        "max_records_per_request" => "Max records per request",
        "rate_limit_per_minute" => "Requests per minute",
        "allowed_hours_start" => "Allowed from hour",
        "allowed_hours_end" => "Allowed until hour",
        "expires_at" => "Expires at",
        "auto_sync_interval_minutes" => "Auto-sync interval",
        other => other,
    }
}

/// The sender-side controls read from a form over `current` (the defaults on create). The
/// download password is set when typed, cleared when "remove" is ticked, else kept.
pub(crate) fn read_settings(
    fields: &Fields,
    mut s: ConnectionSettings,
) -> Result<(ConnectionSettings, PasswordChange), String> {
    if let Some(mode) = fields.choice::<ApprovalMode>("approval_mode")? {
        s.approval_mode = mode;
    }
    s.allowed_tables = fields.list("allowed_tables");
    s.excluded_tables = fields.list("excluded_tables");
    s.auto_approve_tables = fields.list("auto_approve_tables");
    s.max_downloads = fields.number("max_downloads")?;
    s.max_records_total = fields.number("max_records_total")?;
    if let Some(n) = fields.number("max_records_per_request")? {
        s.max_records_per_request = n;
    }
    if let Some(n) = fields.number("rate_limit_per_minute")? {
        s.rate_limit_per_minute = n;
    }
    s.ip_whitelist = fields.list("ip_whitelist");
    s.allowed_hours = match (
        fields.number("allowed_hours_start")?,
        fields.number("allowed_hours_end")?,
    ) {
        (None, None) => None,
        (Some(start), Some(end)) => Some((hour(start)?, hour(end)?)),
        _ => return Err("allowed hours need both a start and an end hour (or neither)".into()),
    };
    if let Some(zone) = fields.optional("time_zone") {
        zone.clone_into(&mut s.time_zone);
    }
    s.expires_at = fields.utc_time("expires_at")?;
    if let Some(strategy) = fields.choice::<ConflictStrategy>("default_conflict_strategy")? {
        s.default_conflict_strategy = strategy;
    }
    s.auto_sync_enabled = fields.checked("auto_sync_enabled");
    s.auto_sync_tables = fields.list("auto_sync_tables");
    if let Some(n) = fields.number("auto_sync_interval_minutes")? {
        s.auto_sync_interval_minutes = n;
    }
    let password = match fields.optional("download_password") {
        Some(password) => PasswordChange::Set(Secret::new(password.to_owned())),
        None if fields.checked("clear_download_password") => PasswordChange::Clear,
        None => PasswordChange::Keep,
    };
    Ok((s, password))
}

fn hour(n: i64) -> Result<u8, String> {
    u8::try_from(n)
        .ok()
        .filter(|h| *h < 24)
        .ok_or_else(|| format!("hour {n} is not between 0 and 23"))
}

fn joined(list: &[String]) -> String {
    list.join(", ")
}

fn opt(n: Option<i64>) -> String {
    n.map(|n| n.to_string()).unwrap_or_default()
}

/// A labelled field with a hint under it.
fn field(id: &str, label: &str, hint: &str, input: Markup) -> Markup {
    html! {
        div.field {
            label for=(id) { (label) }
            (input)
            @if !hint.is_empty() { small.hint id={ (id) "-hint" } { (hint) } }
        }
    }
}

/// The inputs for every sender-side control, filled from `s`. `has_password` adds the
/// "remove the password" box (editing).
pub(crate) fn settings_inputs(s: &ConnectionSettings, has_password: bool) -> Markup {
    let (hours_start, hours_end) = s
        .allowed_hours
        .map_or((String::new(), String::new()), |(a, b)| {
            (a.to_string(), b.to_string())
        });
    let expires = s
        .expires_at
        .map(|t| t.format("%Y-%m-%dT%H:%M").to_string())
        .unwrap_or_default();
    html! {
        fieldset {
            legend { "Approval and tables" }
            (field("approval_mode", "Approval mode", "auto_approve: pulls go at once; require_approval: every table waits for an admin; per_table: the auto-approve tables go at once.", html! {
                select #approval_mode name="approval_mode" aria-describedby="approval_mode-hint" {
                    @for mode in ApprovalMode::ALL {
                        option value=(mode.as_str()) selected[*mode == s.approval_mode] { (mode.as_str()) }
                    }
                }
            }))
            (field("allowed_tables", "Allowed tables", "Comma-separated; empty offers every table not excluded.", html! {
                input #allowed_tables type="text" name="allowed_tables" value=(joined(&s.allowed_tables)) aria-describedby="allowed_tables-hint";
            }))
            (field("excluded_tables", "Excluded tables", "Never offered, listed or described.", html! {
                input #excluded_tables type="text" name="excluded_tables" value=(joined(&s.excluded_tables)) aria-describedby="excluded_tables-hint";
            }))
            (field("auto_approve_tables", "Auto-approve tables", "Used by per_table approval.", html! {
                input #auto_approve_tables type="text" name="auto_approve_tables" value=(joined(&s.auto_approve_tables)) aria-describedby="auto_approve_tables-hint";
            }))
            (field("default_conflict_strategy", "Default conflict strategy", "What the receiver does with a row whose key it already holds, when a pull names no strategy.", html! {
                select #default_conflict_strategy name="default_conflict_strategy" aria-describedby="default_conflict_strategy-hint" {
                    @for strategy in ConflictStrategy::ALL.iter().filter(|s| **s != ConflictStrategy::Replace) {
                        option value=(strategy.as_str()) selected[*strategy == s.default_conflict_strategy] { (strategy.as_str()) }
                    }
                }
            }))
        }
        fieldset {
            legend { "Limits" }
            (field("max_downloads", "Max downloads", "Table transfers started; empty for no limit.", html! {
                input #max_downloads type="number" min="1" name="max_downloads" value=(opt(s.max_downloads)) aria-describedby="max_downloads-hint";
            }))
            (field("max_records_total", "Max records in total", "Rows ever sent; empty for no limit.", html! {
                input #max_records_total type="number" min="1" name="max_records_total" value=(opt(s.max_records_total)) aria-describedby="max_records_total-hint";
            }))
            (field("max_records_per_request", "Max records per request", "", html! {
                input #max_records_per_request type="number" min="1" name="max_records_per_request" value=(s.max_records_per_request) required;
            }))
            (field("rate_limit_per_minute", "Requests per minute", "Session opens, lists, describes and pull requests.", html! {
                input #rate_limit_per_minute type="number" min="1" name="rate_limit_per_minute" value=(s.rate_limit_per_minute) required aria-describedby="rate_limit_per_minute-hint";
            }))
            (field("expires_at", "Expires at (UTC)", "Empty for never.", html! {
                input #expires_at type="datetime-local" name="expires_at" value=(expires) aria-describedby="expires_at-hint";
            }))
        }
        fieldset {
            legend { "Access" }
            (field("ip_whitelist", "IP allow-list", "CIDR blocks, comma-separated; empty allows every address.", html! {
                input #ip_whitelist type="text" name="ip_whitelist" value=(joined(&s.ip_whitelist)) placeholder="10.0.0.0/8, 2001:db8::/32" aria-describedby="ip_whitelist-hint";
            }))
            div.row {
                (field("allowed_hours_start", "Allowed from hour", "", html! {
                    input #allowed_hours_start type="number" min="0" max="23" name="allowed_hours_start" value=(hours_start);
                }))
                (field("allowed_hours_end", "Allowed until hour", "", html! {
                    input #allowed_hours_end type="number" min="0" max="23" name="allowed_hours_end" value=(hours_end);
                }))
            }
            (field("time_zone", "Time zone of the hours", "An IANA name such as Europe/Berlin; the window may wrap midnight.", html! {
                input #time_zone type="text" name="time_zone" value=(s.time_zone) aria-describedby="time_zone-hint";
            }))
            (field("download_password", "Download password", if has_password { "Set: type a new one to replace it." } else { "Optional; the receiver must give it with every pull." }, html! {
                input #download_password type="password" name="download_password" autocomplete="new-password" aria-describedby="download_password-hint";
            }))
            @if has_password {
                div.field.check {
                    input #clear_download_password type="checkbox" name="clear_download_password";
                    label for="clear_download_password" { "Remove the download password" }
                }
            }
        }
        fieldset {
            legend { "Scheduled sync (on the receiver)" }
            div.field.check {
                input #auto_sync_enabled type="checkbox" name="auto_sync_enabled" checked[s.auto_sync_enabled];
                label for="auto_sync_enabled" { "Auto-sync enabled" }
            }
            (field("auto_sync_tables", "Auto-sync tables", "Comma-separated.", html! {
                input #auto_sync_tables type="text" name="auto_sync_tables" value=(joined(&s.auto_sync_tables)) aria-describedby="auto_sync_tables-hint";
            }))
            (field("auto_sync_interval_minutes", "Auto-sync interval (minutes)", "", html! {
                input #auto_sync_interval_minutes type="number" min="1" name="auto_sync_interval_minutes" value=(s.auto_sync_interval_minutes);
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filled_form_sets_every_control() {
        let body = "approval_mode=per_table&allowed_tables=a%2C+b&excluded_tables=&auto_approve_tables=a\
                    &max_downloads=5&max_records_total=&max_records_per_request=1000&rate_limit_per_minute=30\
                    &ip_whitelist=10.0.0.0%2F8&allowed_hours_start=22&allowed_hours_end=6&time_zone=Europe%2FBerlin\
                    &expires_at=2027-01-02T03%3A04&default_conflict_strategy=merge&auto_sync_enabled=on\
                    &auto_sync_tables=a&auto_sync_interval_minutes=15&download_password=s3cret";
        let (s, password) = read_settings(
            &Fields::parse(body.as_bytes()),
            ConnectionSettings::default(),
        )
        .unwrap();
        assert_eq!(s.approval_mode, ApprovalMode::PerTable);
        assert_eq!(s.allowed_tables, ["a", "b"]);
        assert!(s.excluded_tables.is_empty());
        assert_eq!(s.max_downloads, Some(5));
        assert_eq!(s.max_records_total, None);
        assert_eq!(s.allowed_hours, Some((22, 6)));
        assert_eq!(s.time_zone, "Europe/Berlin");
        assert_eq!(
            s.expires_at.unwrap().to_rfc3339(),
            "2027-01-02T03:04:00+00:00"
        );
        assert_eq!(s.default_conflict_strategy, ConflictStrategy::Merge);
        assert!(s.auto_sync_enabled);
        assert_eq!(s.auto_sync_interval_minutes, 15);
        assert!(matches!(password, PasswordChange::Set(_)));
    }

    #[test]
    fn bad_values_are_named() {
        let err = read_settings(
            &Fields::parse(b"max_downloads=lots"),
            ConnectionSettings::default(),
        )
        .unwrap_err();
        assert!(err.contains("Max downloads"), "{err}");
        let err = read_settings(
            &Fields::parse(b"allowed_hours_start=3"),
            ConnectionSettings::default(),
        )
        .unwrap_err();
        assert!(err.contains("both"), "{err}");
    }
}
