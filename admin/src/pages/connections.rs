//! `/admin/db-sync/connections`: every connection with its usage against its limits, the
//! new-connection form, and one connection's page (settings, stats, lifecycle actions).

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use dbsync_agent::connection::{
    Connection, ConnectionFilter, ConnectionSettings, ConnectionStatus, Direction, NewConnection,
    PasswordChange,
};
use dbsync_agent::registration::StatusChange;
use dbsync_agent::token::Token;
use dbsync_agent::transfer::TransferFilter;
use maud::{Markup, html};
use serde::Deserialize;

use super::forms::{self, Fields};
use super::layout::{self, Nav};
use super::viewer::Viewer;
use super::{PREFIX, history};
use crate::AppState;

/// Filters of the list (from the query string).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListQuery {
    status: Option<String>,
    direction: Option<String>,
}

/// What the new-connection form showed when it was sent back with an error.
#[derive(Debug, Default)]
struct Draft {
    name: String,
    site_url: String,
    settings: ConnectionSettings,
    error: Option<String>,
}

fn connection_href(c: &Connection) -> String {
    format!("{PREFIX}/connections/{}", c.id)
}

/// `GET /admin/db-sync/connections`.
pub(crate) async fn list(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Query(query): Query<ListQuery>,
) -> Response {
    render_list(&state, &viewer, &query, Draft::default()).await
}

async fn render_list(
    state: &AppState,
    viewer: &Viewer,
    query: &ListQuery,
    draft: Draft,
) -> Response {
    let filter = ConnectionFilter {
        status: query
            .status
            .as_deref()
            .filter(|s| !s.is_empty())
            .and_then(|s| s.parse().ok()),
        direction: query
            .direction
            .as_deref()
            .filter(|s| !s.is_empty())
            .and_then(|s| s.parse().ok()),
    };
    let connections = match state.agent.store.list_connections(&filter).await {
        Ok(connections) => connections,
        Err(err) => return layout::agent_error(err),
    };
    let status = if draft.error.is_some() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    let open_form = draft.error.is_some() || connections.is_empty();
    let body = html! {
        form.filters method="get" action={ (PREFIX) "/connections" } aria-label="Filter connections" {
            div.field {
                label for="f-status" { "Status" }
                select #f-status name="status" {
                    option value="" { "any" }
                    @for s in ConnectionStatus::ALL {
                        option value=(s.as_str()) selected[filter.status == Some(*s)] { (s.as_str()) }
                    }
                }
            }
            div.field {
                label for="f-direction" { "Direction" }
                select #f-direction name="direction" {
                    option value="" { "any" }
                    @for d in Direction::ALL {
                        option value=(d.as_str()) selected[filter.direction == Some(*d)] { (d.as_str()) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        @if connections.is_empty() {
            p.empty { "No connections yet." }
        } @else {
            div.scroll {
                table.connections {
                    thead { tr {
                        th scope="col" { "name" }
                        th scope="col" { "direction" }
                        th scope="col" { "site" }
                        th scope="col" { "status" }
                        th scope="col" { "downloads" }
                        th scope="col" { "records" }
                        th scope="col" { "rate / min" }
                        th scope="col" { "last transfer" }
                    } }
                    tbody {
                        @for c in &connections {
                            tr data-connection=(c.name) {
                                th scope="row" { a href=(connection_href(c)) { (c.name) } }
                                td { (c.direction.as_str()) }
                                td.url { (c.site_url) }
                                td { (layout::badge(c.status.as_str())) }
                                td { (layout::usage(c.downloads_used, c.max_downloads)) }
                                td { (layout::usage(c.records_downloaded, c.max_records_total)) }
                                td { (c.rate_limit_per_minute) }
                                td { (layout::time(c.last_transfer_at)) }
                            }
                        }
                    }
                }
            }
        }
        details.new-connection open[open_form] {
            summary { "New connection" }
            p { "Creates a sender connection: the site at the URL may pull from this one, within the controls below. "
                "The site is told at once (registration); the token is shown once." }
            @if let Some(error) = &draft.error {
                p.flash.error role="alert" { (error) }
            }
            form.connection method="post" action={ (PREFIX) "/connections" } {
                (layout::csrf(viewer))
                fieldset {
                    legend { "Remote site" }
                    div.field {
                        label for="name" { "Name" }
                        input #name type="text" name="name" required value=(draft.name) pattern="[A-Za-z0-9_.-]{1,64}" aria-describedby="name-hint";
                        small.hint #name-hint { "Letters, digits, _ . - (up to 64)." }
                    }
                    div.field {
                        label for="site_url" { "Site URL" }
                        input #site_url type="url" name="site_url" required value=(draft.site_url) placeholder="https://staging.example.com";
                    }
                    div.field {
                        label for="remote_password" { "Remote incoming password" }
                        input #remote_password type="password" name="remote_password" autocomplete="off" aria-describedby="remote_password-hint";
                        small.hint #remote_password-hint { "Only when the remote site requires one for registrations." }
                    }
                }
                (forms::settings_inputs(&draft.settings, false))
                button type="submit" { "Create connection" }
            }
        }
    };
    (
        status,
        layout::page(viewer, Nav::Connections, "Connections", body),
    )
        .into_response()
}

/// `POST /admin/db-sync/connections`: creates a sender connection, registers it with the remote
/// site, and shows the token (the only time).
pub(crate) async fn create(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    body: Bytes,
) -> Response {
    let fields = Fields::parse(&body);
    let name = fields.text("name").to_owned();
    let site_url = fields.text("site_url").to_owned();
    let draft = |settings: ConnectionSettings, error: String| Draft {
        name: name.clone(),
        site_url: site_url.clone(),
        settings,
        error: Some(error),
    };
    let (mut settings, password) =
        match forms::read_settings(&fields, ConnectionSettings::default()) {
            Ok(read) => read,
            Err(error) => {
                return render_list(
                    &state,
                    &viewer,
                    &ListQuery::default(),
                    draft(ConnectionSettings::default(), error),
                )
                .await;
            }
        };
    if let PasswordChange::Set(secret) = password {
        settings.download_password = Some(secret);
    }
    let created = state
        .agent
        .create_sender(
            NewConnection {
                name: name.clone(),
                site_url: site_url.clone(),
                settings: settings.clone(),
            },
            fields.optional("remote_password"),
            &viewer.actor,
        )
        .await;
    match created {
        Ok(created) => {
            let headline = created.registration.headline(&created.connection.site_url);
            token_page(&viewer, &created.connection, &created.token, &headline)
        }
        Err(err) => {
            let (_, message) = layout::user_message(err);
            settings.download_password = None;
            render_list(
                &state,
                &viewer,
                &ListQuery::default(),
                draft(settings, message),
            )
            .await
        }
    }
}

/// The page that shows a token once, with a copy button.
fn token_page(viewer: &Viewer, c: &Connection, token: &Token, headline: &str) -> Response {
    let body = html! {
        p.flash role="status" #registration { (headline) }
        section.token aria-labelledby="token-title" {
            h2 #token-title { "Token for " (c.name) }
            p.warning { strong { "Shown only this once." } " Only its hash is stored; if it is lost, regenerate it." }
            div.copy {
                label for="token-value" { "Connection token" }
                input #token-value type="text" readonly value=(token.expose()) spellcheck="false" autocomplete="off";
                button type="button" data-copy="token-value" { "Copy" }
            }
            p { "On " (c.site_url) " the receiver can also be added by hand: "
                code { "dbsync connections add-receiver " (c.name) " --site-url <this site's URL> --token <token>" } }
        }
        p { a href=(connection_href(c)) { "Go to " (c.name) } " · " a href={ (PREFIX) "/connections" } { "All connections" } }
    };
    layout::page(viewer, Nav::Connections, "Connection token", body).into_response()
}

/// `GET /admin/db-sync/connections/{id}`.
pub(crate) async fn show(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<String>,
) -> Response {
    match render_one(&state, &viewer, &id).await {
        Ok(page) => page.into_response(),
        Err(err) => layout::agent_error(err),
    }
}

async fn render_one(state: &AppState, viewer: &Viewer, id: &str) -> dbsync_agent::Result<Markup> {
    let store = &state.agent.store;
    let c = store.get_connection(id).await?;
    let stats = store.connection_stats(c.id).await?;
    let recent = store
        .list_transfers(&TransferFilter {
            connection_id: Some(c.id),
            per_page: Some(10),
            ..TransferFilter::default()
        })
        .await?;
    let finished = store
        .list_transfers(&TransferFilter {
            connection_id: Some(c.id),
            status: Some(dbsync_agent::transfer::TransferStatus::Completed),
            per_page: Some(history::CHART_TRANSFERS),
            ..TransferFilter::default()
        })
        .await?;
    let action = |name: &str| format!("{}/{name}", connection_href(&c));
    let status = c.status;
    let body = html! {
        section.summary aria-labelledby="summary" {
            h2 #summary { "Summary" }
            dl.facts {
                div { dt { "status" } dd #connection-status { (layout::badge(status.as_str())) } }
                div { dt { "direction" } dd { (c.direction.as_str()) } }
                div { dt { "site" } dd { (c.site_url) } }
                @if let Some(prefix) = &c.token_prefix { div { dt { "token" } dd { code { (prefix) "…" } } } }
                div { dt { "created" } dd { (layout::time(Some(c.created_at))) " by " (c.created_by) } }
                @if let Some(by) = &c.approved_by { div { dt { "approved" } dd { (layout::time(c.approved_at)) " by " (by) } } }
                @if let Some(by) = &c.suspended_by {
                    div { dt { "suspended" } dd { (layout::time(c.suspended_at)) " by " (by) ": " span #suspended-reason { (c.suspended_reason.as_deref().unwrap_or("")) } } }
                }
                @if let Some(by) = &c.revoked_by {
                    div { dt { "revoked" } dd { (layout::time(c.revoked_at)) " by " (by) ": " (c.revoked_reason.as_deref().unwrap_or("")) } }
                }
                div { dt { "expires" } dd { (layout::time(c.expires_at)) } }
                div { dt { "last connected" } dd { (layout::time(c.last_connected_at)) } }
            }
        }
        section aria-labelledby="usage" {
            h2 #usage { "Usage and stats" }
            dl.facts {
                div { dt { "downloads" } dd { (layout::usage(c.downloads_used, c.max_downloads)) } }
                div { dt { "records" } dd { (layout::usage(c.records_downloaded, c.max_records_total)) } }
                div { dt { "transfers" } dd { (layout::number(stats.total_transfers)) " (" (stats.completed_transfers) " completed, " (stats.failed_transfers) " failed, " (stats.pending_approval) " pending)" } }
                div { dt { "rows moved" } dd { (layout::number(stats.total_records)) } }
                div { dt { "bytes" } dd { (layout::bytes(stats.total_bytes)) " on the wire, " (layout::bytes(stats.total_bytes_raw)) " raw" } }
            }
        }
        section.actions aria-labelledby="actions" {
            h2 #actions { "Actions" }
            @if status == ConnectionStatus::Pending {
                form method="post" action=(action("approve")) {
                    (layout::csrf(viewer))
                    button type="submit" { "Approve" }
                }
            }
            @if status == ConnectionStatus::Active {
                form method="post" action=(action("suspend")) {
                    (layout::csrf(viewer))
                    label for="suspend-reason" { "Reason for suspending" }
                    input #suspend-reason type="text" name="reason" required;
                    button type="submit" { "Suspend" }
                }
            }
            @if status == ConnectionStatus::Suspended {
                form method="post" action=(action("reactivate")) {
                    (layout::csrf(viewer))
                    button type="submit" { "Reactivate" }
                }
            }
            @if matches!(status, ConnectionStatus::Pending | ConnectionStatus::Active | ConnectionStatus::Suspended) {
                form method="post" action=(action("revoke")) {
                    (layout::csrf(viewer))
                    label for="revoke-reason" { "Reason for revoking (permanent)" }
                    input #revoke-reason type="text" name="reason" required;
                    button.danger type="submit" { "Revoke" }
                }
            }
            @if c.direction == Direction::Sender && matches!(status, ConnectionStatus::Pending | ConnectionStatus::Active | ConnectionStatus::Suspended) {
                form method="post" action=(action("regenerate-token")) {
                    (layout::csrf(viewer))
                    button type="submit" { "Regenerate token" }
                    small.hint { " The old token stops working at once." }
                }
            }
            form method="post" action=(action("delete")) {
                (layout::csrf(viewer))
                input #confirm-delete type="checkbox" name="confirm" required;
                label for="confirm-delete" { "Delete this connection and its checkpoints" }
                button.danger type="submit" { "Delete" }
            }
        }
        @if c.direction == Direction::Sender {
            details.settings {
                summary { "Sender controls" }
                form.connection method="post" action=(action("settings")) {
                    (layout::csrf(viewer))
                    (forms::settings_inputs(&c.settings(), c.download_password_hash.is_some()))
                    button type="submit" { "Save controls" }
                }
            }
        }
        section aria-labelledby="throughput" {
            h2 #throughput { "Throughput" }
            (super::chart::throughput_chart(&finished.items, &format!("Rows per second of the last {} completed transfers of {}", finished.items.len(), c.name)))
        }
        section aria-labelledby="recent" {
            h2 #recent { "Recent transfers" }
            (history::transfer_table(viewer, &recent.items, &[(c.id, c.name.clone())], &connection_href(&c)))
            p { a href={ (PREFIX) "/history?connection=" (c.name) } { "All transfers of " (c.name) } }
        }
    };
    Ok(layout::page(
        viewer,
        Nav::Connections,
        &format!("Connection {}", c.name),
        body,
    ))
}

/// `POST /admin/db-sync/connections/{id}/settings`: saves the sender controls.
pub(crate) async fn update(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let store = &state.agent.store;
    let current = match store.get_connection(&id).await {
        Ok(c) => c,
        Err(err) => return layout::agent_error(err),
    };
    let back = connection_href(&current);
    let outcome = match forms::read_settings(&Fields::parse(&body), current.settings()) {
        Ok((settings, password)) => store
            .update_connection_settings(&id, &settings, password, &viewer.actor, state.agent.now())
            .await
            .map(|_| "Controls saved.".to_owned())
            .map_err(|err| layout::user_message(err).1),
        Err(error) => Err(error),
    };
    flash(&state, &viewer, outcome).await;
    Redirect::to(&back).into_response()
}

async fn flash(state: &AppState, viewer: &Viewer, outcome: Result<String, String>) {
    match outcome {
        Ok(text) => state.web_sessions.flash(viewer, false, text).await,
        Err(text) => state.web_sessions.flash(viewer, true, text).await,
    }
}

/// `POST /admin/db-sync/connections/{id}/{action}`: approve, suspend, reactivate, revoke (each
/// pushed to the peer), regenerate-token (shows the new token), delete.
pub(crate) async fn act(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let fields = Fields::parse(&body);
    let reason = fields.text("reason").to_owned();
    let change = match action.as_str() {
        "approve" => StatusChange::Approve,
        "reactivate" => StatusChange::Reactivate,
        "suspend" | "revoke" if reason.is_empty() => {
            state
                .web_sessions
                .flash(
                    &viewer,
                    true,
                    format!("To {action} a connection, give a reason."),
                )
                .await;
            return Redirect::to(&format!("{PREFIX}/connections/{id}")).into_response();
        }
        "suspend" => StatusChange::Suspend(reason),
        "revoke" => StatusChange::Revoke(reason),
        "regenerate-token" => {
            return match state.agent.regenerate_token(&id, &viewer.actor).await {
                Ok((created, push)) => token_page(
                    &viewer,
                    &created.connection,
                    &created.token,
                    &format!(
                        "New token generated; the old one no longer works. {}",
                        push.describe(&created.connection.site_url)
                    ),
                ),
                Err(err) => {
                    flash(&state, &viewer, Err(layout::user_message(err).1)).await;
                    Redirect::to(&format!("{PREFIX}/connections/{id}")).into_response()
                }
            };
        }
        "delete" => {
            if !fields.checked("confirm") {
                state
                    .web_sessions
                    .flash(&viewer, true, "Tick the box to confirm the deletion.")
                    .await;
                return Redirect::to(&format!("{PREFIX}/connections/{id}")).into_response();
            }
            return match state.agent.delete_connection(&id, &viewer.actor).await {
                Ok((deleted, _)) => {
                    state.agent.validator.forget(deleted.id);
                    flash(
                        &state,
                        &viewer,
                        Ok(format!("Connection {} deleted.", deleted.name)),
                    )
                    .await;
                    Redirect::to(&format!("{PREFIX}/connections")).into_response()
                }
                Err(err) => {
                    flash(&state, &viewer, Err(layout::user_message(err).1)).await;
                    Redirect::to(&format!("{PREFIX}/connections/{id}")).into_response()
                }
            };
        }
        _ => return layout::error_page(StatusCode::NOT_FOUND, "No such action."),
    };
    let outcome = state
        .agent
        .change_status(&id, change, &viewer.actor)
        .await
        .map(|(c, push)| {
            format!(
                "Connection {} is now {}. {}",
                c.name,
                c.status,
                push.describe(&c.site_url)
            )
        })
        .map_err(|err| layout::user_message(err).1);
    flash(&state, &viewer, outcome).await;
    Redirect::to(&format!("{PREFIX}/connections/{id}")).into_response()
}
