//! `/admin/db-sync`: connections by status, transfers today, what waits for an admin, and this
//! site's incoming settings (how other sites' registrations are answered).

use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use dbsync_agent::connection::{ConnectionFilter, ConnectionStatus, Direction};
use dbsync_agent::settings::IncomingMode;
use dbsync_agent::transfer::{TransferFilter, TransferStatus};
use maud::{Markup, html};

use super::forms::Fields;
use super::layout::{self, Nav};
use super::viewer::Viewer;
use super::{PREFIX, history};
use crate::AppState;

/// What the overview shows, gathered before rendering.
struct Overview {
    /// Rows: direction, then a count per status in [`ConnectionStatus::ALL`] order.
    by_status: Vec<(Direction, Vec<i64>)>,
    pending_connections: Vec<dbsync_agent::Connection>,
    today: [(Option<TransferStatus>, i64); 4],
    pending_transfers: Vec<dbsync_agent::transfer::Transfer>,
    names: Vec<(uuid::Uuid, String)>,
    settings: dbsync_agent::settings::Settings,
}

async fn gather(state: &AppState) -> dbsync_agent::Result<Overview> {
    let store = &state.agent.store;
    let connections = store.list_connections(&ConnectionFilter::default()).await?;
    let by_status = Direction::ALL
        .iter()
        .map(|direction| {
            let counts = ConnectionStatus::ALL
                .iter()
                .map(|status| {
                    connections
                        .iter()
                        .filter(|c| c.direction == *direction && c.status == *status)
                        .count()
                })
                .map(|n| i64::try_from(n).unwrap_or(i64::MAX))
                .collect();
            (*direction, counts)
        })
        .collect();
    let names = connections.iter().map(|c| (c.id, c.name.clone())).collect();
    let pending_connections = connections
        .into_iter()
        .filter(|c| c.status == ConnectionStatus::Pending)
        .collect();
    let midnight = state
        .agent
        .now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc());
    let mut today = [
        (None, 0),
        (Some(TransferStatus::Completed), 0),
        (Some(TransferStatus::Failed), 0),
        (Some(TransferStatus::InProgress), 0),
    ];
    for (status, count) in &mut today {
        *count = store
            .list_transfers(&TransferFilter {
                status: *status,
                since: midnight,
                per_page: Some(1),
                ..TransferFilter::default()
            })
            .await?
            .total;
    }
    let pending_transfers = store
        .list_transfers(&TransferFilter {
            status: Some(TransferStatus::PendingApproval),
            per_page: Some(20),
            ..TransferFilter::default()
        })
        .await?
        .items;
    Ok(Overview {
        by_status,
        pending_connections,
        today,
        pending_transfers,
        names,
        settings: store.settings().await?,
    })
}

/// `GET /admin/db-sync`.
pub(crate) async fn show(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
) -> Response {
    match gather(&state).await {
        Ok(overview) => render(&viewer, &state, &overview).into_response(),
        Err(err) => layout::agent_error(err),
    }
}

fn render(viewer: &Viewer, state: &AppState, o: &Overview) -> Markup {
    let site = o
        .settings
        .site_name
        .clone()
        .or_else(|| o.settings.site_url.clone())
        .unwrap_or_else(|| state.agent.config.default_site_url());
    let body = html! {
        p.lead { "Site " strong { (site) } " · now " (layout::time(Some(Utc::now()))) " UTC" }
        section.cards aria-label="Summary" {
            div.card {
                h2 { "Transfers today" }
                dl.stats {
                    @for (status, count) in &o.today {
                        div {
                            dt { (status.map_or("all", TransferStatus::as_str).replace('_', " ")) }
                            dd { (layout::number(*count)) }
                        }
                    }
                }
                a href={ (PREFIX) "/history" } { "Open the history" }
            }
            div.card {
                h2 { "Waiting for an admin" }
                dl.stats {
                    div { dt { "connections" } dd { (o.pending_connections.len()) } }
                    div { dt { "transfers" } dd { (o.pending_transfers.len()) } }
                }
            }
        }
        section aria-labelledby="by-status" {
            h2 #by-status { "Connections by status" }
            div.scroll {
                table {
                    thead { tr {
                        th scope="col" { "direction" }
                        @for status in ConnectionStatus::ALL { th scope="col" { (status.as_str()) } }
                    } }
                    tbody {
                        @for (direction, counts) in &o.by_status {
                            tr {
                                th scope="row" { (direction.as_str()) }
                                @for (status, n) in ConnectionStatus::ALL.iter().zip(counts) {
                                    td {
                                        @if *n > 0 {
                                            a href={ (PREFIX) "/connections?status=" (status.as_str()) "&direction=" (direction.as_str()) } { (n) }
                                        } @else { "0" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="pending" {
            h2 #pending { "Pending approvals" }
            @if o.pending_connections.is_empty() && o.pending_transfers.is_empty() {
                p.empty { "Nothing waits for approval." }
            }
            @if !o.pending_connections.is_empty() {
                h3 { "Connections" }
                ul {
                    @for c in &o.pending_connections {
                        li { a href={ (PREFIX) "/connections/" (c.id) } { (c.name) } " (" (c.direction.as_str()) ", " (c.site_url) ")" }
                    }
                }
            }
            @if !o.pending_transfers.is_empty() {
                h3 { "Transfers" }
                (history::transfer_table(viewer, &o.pending_transfers, &o.names, PREFIX))
            }
        }
        section aria-labelledby="incoming" {
            h2 #incoming { "Incoming settings" }
            p { "How this site answers another site that registers a connection here." }
            form.settings method="post" action={ (PREFIX) "/settings/incoming" } {
                (layout::csrf(viewer))
                div.field {
                    label for="mode" { "Mode" }
                    select #mode name="mode" {
                        @for mode in IncomingMode::ALL {
                            option value=(mode.as_str()) selected[*mode == o.settings.incoming_mode] { (mode.as_str()) }
                        }
                    }
                }
                div.field {
                    label for="password" { "Incoming password" }
                    input #password type="password" name="password" autocomplete="new-password" aria-describedby="password-hint";
                    small.hint #password-hint {
                        @if o.settings.incoming_password_hash.is_some() { "A password is set; type a new one to replace it." }
                        @else { "None set; require_password needs one." }
                    }
                }
                button type="submit" { "Save incoming settings" }
            }
        }
    };
    layout::page(viewer, Nav::Overview, "Overview", body)
}

/// `POST /admin/db-sync/settings/incoming`.
pub(crate) async fn set_incoming(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    body: Bytes,
) -> Response {
    let fields = Fields::parse(&body);
    let outcome = match fields.choice::<IncomingMode>("mode") {
        Ok(Some(mode)) => state
            .agent
            .store
            .set_incoming(
                mode,
                fields.optional("password"),
                &viewer.actor,
                state.agent.now(),
            )
            .await
            .map(|s| format!("Incoming mode is now {}.", s.incoming_mode))
            .map_err(|err| layout::user_message(err).1),
        Ok(None) => Err("Choose a mode.".to_owned()),
        Err(err) => Err(err),
    };
    match outcome {
        Ok(text) => state.web_sessions.flash(&viewer, false, text).await,
        Err(text) => state.web_sessions.flash(&viewer, true, text).await,
    }
    Redirect::to(PREFIX).into_response()
}
