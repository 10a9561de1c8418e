//! `/admin/db-sync/history`: transfers with filters and pages, approve or deny the pending ones,
//! and the pulls in flight with their progress (refreshed by the page's script from
//! `/history/live`).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Json};
use chrono::{DateTime, NaiveDate, Utc};
use dbsync_agent::connection::ConnectionFilter;
use dbsync_agent::transfer::{Transfer, TransferDirection, TransferFilter, TransferStatus};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::forms::Fields;
use super::layout::{self, Nav};
use super::viewer::Viewer;
use super::{PREFIX, chart};
use crate::AppState;

/// Transfers per page.
const PER_PAGE: i64 = 25;
/// Completed transfers in a throughput chart.
pub(crate) const CHART_TRANSFERS: i64 = 30;

/// Filters and page (from the query string; blank means "any").
#[derive(Debug, Default, Deserialize)]
pub(crate) struct HistoryQuery {
    connection: Option<String>,
    direction: Option<String>,
    status: Option<String>,
    table: Option<String>,
    /// First day, `YYYY-MM-DD` (UTC), inclusive.
    from: Option<String>,
    /// Last day, `YYYY-MM-DD` (UTC), inclusive.
    to: Option<String>,
    page: Option<i64>,
}

fn blank(value: Option<&String>) -> Option<&str> {
    value.map(|v| v.trim()).filter(|v| !v.is_empty())
}

fn day(value: Option<&String>, field: &str) -> Result<Option<NaiveDate>, String> {
    blank(value)
        .map(|v| {
            NaiveDate::parse_from_str(v, "%Y-%m-%d")
                .map_err(|_| format!("{field}: {v:?} is not a date (YYYY-MM-DD)"))
        })
        .transpose()
}

impl HistoryQuery {
    /// The store filter, with the connection's id looked up in `names`.
    fn filter(&self, ids: &HashMap<String, Uuid>) -> Result<TransferFilter, String> {
        let connection_id = match blank(self.connection.as_ref()) {
            Some(name) => Some(
                *ids.get(name)
                    .ok_or_else(|| format!("no connection named {name:?}"))?,
            ),
            None => None,
        };
        let parse_err = |e: dbsync_agent::Error| e.to_string();
        let since = day(self.from.as_ref(), "from")?.and_then(|d| d.and_hms_opt(0, 0, 0));
        let until = day(self.to.as_ref(), "to")?
            .and_then(|d| d.succ_opt())
            .and_then(|d| d.and_hms_opt(0, 0, 0));
        Ok(TransferFilter {
            connection_id,
            direction: blank(self.direction.as_ref())
                .map(str::parse)
                .transpose()
                .map_err(parse_err)?,
            status: blank(self.status.as_ref())
                .map(str::parse)
                .transpose()
                .map_err(parse_err)?,
            table_name: blank(self.table.as_ref()).map(str::to_owned),
            since: since.map(|t| t.and_utc()),
            until: until.map(|t| t.and_utc()),
            page: Some(self.page.unwrap_or(1).max(1)),
            per_page: Some(PER_PAGE),
        })
    }

    /// The query string for page `page` with the same filters.
    fn with_page(&self, page: i64) -> String {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (key, value) in [
            ("connection", &self.connection),
            ("direction", &self.direction),
            ("status", &self.status),
            ("table", &self.table),
            ("from", &self.from),
            ("to", &self.to),
        ] {
            if let Some(value) = blank(value.as_ref()) {
                query.append_pair(key, value);
            }
        }
        query.append_pair("page", &page.to_string());
        query.finish()
    }
}

/// `GET /admin/db-sync/history`.
pub(crate) async fn list(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Query(query): Query<HistoryQuery>,
) -> Response {
    let store = &state.agent.store;
    let connections = match store.list_connections(&ConnectionFilter::default()).await {
        Ok(connections) => connections,
        Err(err) => return layout::agent_error(err),
    };
    let ids: HashMap<String, Uuid> = connections.iter().map(|c| (c.name.clone(), c.id)).collect();
    let names: Vec<(Uuid, String)> = connections.iter().map(|c| (c.id, c.name.clone())).collect();
    let (page, finished, error) = match query.filter(&ids) {
        Ok(filter) => {
            // The chart: the latest completed transfers under the same filters.
            let finished = TransferFilter {
                status: Some(TransferStatus::Completed),
                page: Some(1),
                per_page: Some(CHART_TRANSFERS),
                ..filter.clone()
            };
            match (
                store.list_transfers(&filter).await,
                store.list_transfers(&finished).await,
            ) {
                (Ok(page), Ok(finished)) => (Some(page), finished.items, None),
                (Err(err), _) | (_, Err(err)) => {
                    (None, Vec::new(), Some(layout::user_message(err).1))
                }
            }
        }
        Err(error) => (None, Vec::new(), Some(error)),
    };
    let in_flight = match store
        .list_transfers(&TransferFilter {
            status: Some(TransferStatus::InProgress),
            per_page: Some(50),
            ..TransferFilter::default()
        })
        .await
    {
        Ok(page) => page.items,
        Err(err) => return layout::agent_error(err),
    };
    let here = format!(
        "{PREFIX}/history?{}",
        query.with_page(query.page.unwrap_or(1))
    );
    let body = html! {
        section.in-flight aria-labelledby="in-flight" data-live={ (PREFIX) "/history/live" } {
            h2 #in-flight { "In flight" }
            @if in_flight.is_empty() {
                p.empty #in-flight-empty { "No transfer is running." }
            } @else {
                div.scroll {
                    table #live {
                        thead { tr {
                            th scope="col" { "connection" }
                            th scope="col" { "direction" }
                            th scope="col" { "table" }
                            th scope="col" { "rows" }
                            th scope="col" { "progress" }
                            th scope="col" { "bytes" }
                            th scope="col" { "rate" }
                            th scope="col" { "started" }
                            th scope="col" { span.visually-hidden { "actions" } }
                        } }
                        tbody {
                            @for t in &in_flight {
                                tr data-id=(t.id) {
                                    td { (name_of(&names, t.connection_id)) }
                                    td { (t.direction.as_str()) }
                                    td { (t.table_name) }
                                    td data-field="rows" { (layout::number(t.records_transferred)) }
                                    td data-field="progress" { (progress(t)) }
                                    td data-field="bytes" { (layout::bytes(t.bytes_wire)) }
                                    td data-field="rate" { (rate(t, Utc::now())) }
                                    td { (layout::time(t.started_at)) }
                                    td { (cancel(&viewer, t, &here)) }
                                }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="throughput" {
            h2 #throughput { "Throughput" }
            (chart::throughput_chart(&finished, &format!("Rows per second of the last {} completed transfers shown by these filters", finished.len())))
        }
        section aria-labelledby="all" {
            h2 #all { "Transfers" }
            form.filters method="get" action={ (PREFIX) "/history" } aria-label="Filter transfers" {
                div.field {
                    label for="h-connection" { "Connection" }
                    select #h-connection name="connection" {
                        option value="" { "any" }
                        @for (_, name) in &names {
                            option value=(name) selected[blank(query.connection.as_ref()) == Some(name.as_str())] { (name) }
                        }
                    }
                }
                div.field {
                    label for="h-direction" { "Direction" }
                    select #h-direction name="direction" {
                        option value="" { "any" }
                        @for d in TransferDirection::ALL {
                            option value=(d.as_str()) selected[blank(query.direction.as_ref()) == Some(d.as_str())] { (d.as_str()) }
                        }
                    }
                }
                div.field {
                    label for="h-status" { "Status" }
                    select #h-status name="status" {
                        option value="" { "any" }
                        @for s in TransferStatus::ALL {
                            option value=(s.as_str()) selected[blank(query.status.as_ref()) == Some(s.as_str())] { (s.as_str()) }
                        }
                    }
                }
                div.field {
                    label for="h-table" { "Table" }
                    input #h-table type="text" name="table" value=(blank(query.table.as_ref()).unwrap_or(""));
                }
                div.field {
                    label for="h-from" { "From (UTC)" }
                    input #h-from type="date" name="from" value=(blank(query.from.as_ref()).unwrap_or(""));
                }
                div.field {
                    label for="h-to" { "To (UTC)" }
                    input #h-to type="date" name="to" value=(blank(query.to.as_ref()).unwrap_or(""));
                }
                button type="submit" { "Filter" }
                a href={ (PREFIX) "/history" } { "Clear" }
            }
            @if let Some(error) = &error {
                p.flash.error role="alert" { (error) }
            }
            @if let Some(page) = &page {
                (transfer_table(&viewer, &page.items, &names, &here))
                @let pages = (page.total + page.per_page - 1) / page.per_page.max(1);
                nav.pages aria-label="Pages" {
                    span { (layout::number(page.total)) " transfers · page " (page.page) " of " (pages.max(1)) }
                    @if page.page > 1 {
                        a rel="prev" href={ (PREFIX) "/history?" (query.with_page(page.page - 1)) } { "← Newer" }
                    }
                    @if page.page < pages {
                        a rel="next" href={ (PREFIX) "/history?" (query.with_page(page.page + 1)) } { "Older →" }
                    }
                }
            }
        }
    };
    layout::page(&viewer, Nav::History, "History", body).into_response()
}

fn name_of(names: &[(Uuid, String)], id: Option<Uuid>) -> String {
    id.and_then(|id| names.iter().find(|(i, _)| *i == id))
        .map_or_else(|| "—".to_owned(), |(_, n)| n.clone())
}

/// How far a running transfer is, from the row estimate recorded when it started (the sender's
/// for a pull; none for incremental or filtered pulls): a share below 100 % until it finishes.
fn percent(t: &Transfer) -> Option<i64> {
    let estimate = t.metadata.get("estimated_rows")?.as_i64()?;
    (estimate > 0).then(|| (t.records_transferred.saturating_mul(100) / estimate).clamp(0, 99))
}

fn progress(t: &Transfer) -> Markup {
    match percent(t) {
        Some(p) => html! {
            progress max="100" value=(p) aria-label={ "Progress of " (t.table_name) } {}
            " " span data-field="percent" { (p) " %" }
        },
        None => html! { span data-field="percent" { "—" } },
    }
}

/// A button that cancels a transfer not finished yet (a running pull stops at its next batch).
fn cancel(viewer: &Viewer, t: &Transfer, back: &str) -> Markup {
    html! {
        form.cancel method="post" action={ (PREFIX) "/history/" (t.id) "/cancel" } {
            (layout::csrf(viewer))
            input type="hidden" name="back" value=(back);
            button.danger type="submit" aria-label={ "Cancel transfer of " (t.table_name) } { "Cancel" }
        }
    }
}

/// Rows per second since the transfer started.
fn rate(t: &Transfer, now: DateTime<Utc>) -> String {
    let Some(started) = t.started_at else {
        return "—".into();
    };
    let secs = (now - started).num_milliseconds().max(1) as f64 / 1000.0;
    #[allow(clippy::cast_precision_loss)]
    let per_sec = t.records_transferred as f64 / secs;
    format!("{per_sec:.0} rows/s")
}

/// Approve and deny buttons for a pending transfer; `back` is where to return.
fn decide(viewer: &Viewer, t: &Transfer, back: &str) -> Markup {
    html! {
        div.decide {
            form method="post" action={ (PREFIX) "/history/" (t.id) "/approve" } {
                (layout::csrf(viewer))
                input type="hidden" name="back" value=(back);
                button type="submit" aria-label={ "Approve transfer of " (t.table_name) } { "Approve" }
            }
            form method="post" action={ (PREFIX) "/history/" (t.id) "/deny" } {
                (layout::csrf(viewer))
                input type="hidden" name="back" value=(back);
                input type="text" name="reason" placeholder="reason" aria-label={ "Reason to deny the transfer of " (t.table_name) };
                button.danger type="submit" aria-label={ "Deny transfer of " (t.table_name) } { "Deny" }
            }
        }
    }
}

/// A table of transfers; pending ones get approve/deny buttons.
pub(crate) fn transfer_table(
    viewer: &Viewer,
    items: &[Transfer],
    names: &[(Uuid, String)],
    back: &str,
) -> Markup {
    html! {
        @if items.is_empty() {
            p.empty { "No transfers." }
        } @else {
            div.scroll {
                table.transfers {
                    thead { tr {
                        th scope="col" { "created" }
                        th scope="col" { "connection" }
                        th scope="col" { "direction" }
                        th scope="col" { "table" }
                        th scope="col" { "status" }
                        th scope="col" { "rows" }
                        th scope="col" { "bytes" }
                        th scope="col" { "strategy" }
                        th scope="col" { "details" }
                    } }
                    tbody {
                        @for t in items {
                            tr data-transfer=(t.id) data-table=(t.table_name) data-status=(t.status.as_str()) {
                                td { (layout::time(Some(t.created_at))) }
                                td { (name_of(names, t.connection_id)) }
                                td { (t.direction.as_str()) }
                                td { (t.table_name) }
                                td { (layout::badge(t.status.as_str())) }
                                td { (layout::number(t.records_transferred)) }
                                td { (layout::bytes(t.bytes_wire)) }
                                td { (t.conflict_strategy.as_str()) }
                                td {
                                    @if t.status == TransferStatus::PendingApproval {
                                        (decide(viewer, t, back))
                                    } @else if matches!(t.status, TransferStatus::Approved | TransferStatus::InProgress) {
                                        (cancel(viewer, t, back))
                                    } @else if let Some(error) = &t.error_message {
                                        span.error { (error) }
                                    } @else if let Some(reason) = &t.denial_reason {
                                        "denied: " (reason)
                                    } @else if let Some(by) = &t.approved_by {
                                        "approved by " (by)
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `GET /admin/db-sync/history/live`: the running transfers' counters, for the page's script.
pub(crate) async fn live(State(state): State<AppState>) -> Response {
    let now = Utc::now();
    match state
        .agent
        .store
        .list_transfers(&TransferFilter {
            status: Some(TransferStatus::InProgress),
            per_page: Some(50),
            ..TransferFilter::default()
        })
        .await
    {
        Ok(page) => Json(json!({
            "items": page.items.iter().map(|t| json!({
                "id": t.id,
                "rows": layout::number(t.records_transferred),
                "bytes": layout::bytes(t.bytes_wire),
                "rate": rate(t, now),
                "percent": percent(t),
            })).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(err) => {
            let (status, message) = layout::user_message(err);
            (status, Json(json!({ "error": message }))).into_response()
        }
    }
}

/// `POST /admin/db-sync/history/{id}/{approve|deny|cancel}`; returns to the form's `back` page.
pub(crate) async fn act(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Path((id, action)): Path<(Uuid, String)>,
    body: Bytes,
) -> Response {
    let fields = Fields::parse(&body);
    // Only a page of this site: no open redirect.
    let back = Some(fields.text("back"))
        .filter(|b| b.starts_with(PREFIX) && !b.starts_with("//"))
        .unwrap_or(PREFIX)
        .to_owned();
    let store = &state.agent.store;
    let now = state.agent.now();
    let outcome = match action.as_str() {
        "approve" => store
            .approve_transfer(id, &viewer.actor, now)
            .await
            .map(|t| format!("Transfer of {} approved.", t.table_name)),
        "deny" => store
            .deny_transfer(id, fields.text("reason"), &viewer.actor, now)
            .await
            .map(|t| format!("Transfer of {} denied.", t.table_name)),
        "cancel" => store
            .cancel_transfer(id, &viewer.actor, now)
            .await
            .map(|t| {
                format!(
                    "Transfer of {} cancelled; a running pull stops at its next batch.",
                    t.table_name
                )
            }),
        _ => return layout::error_page(StatusCode::NOT_FOUND, "No such action."),
    };
    match outcome {
        Ok(text) => state.web_sessions.flash(&viewer, false, text).await,
        Err(err) => {
            state
                .web_sessions
                .flash(&viewer, true, layout::user_message(err).1)
                .await
        }
    }
    Redirect::to(&back).into_response()
}
