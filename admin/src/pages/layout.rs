//! The frame every admin page shares (header, navigation, flash message), the login page, error
//! pages, and small widgets (status badges, usage meters, hidden CSRF fields).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use super::viewer::{CSRF_FIELD, Viewer};
use super::{ASSET_VERSION, PREFIX};

/// Which navigation entry is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nav {
    Overview,
    Connections,
    History,
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · dbsync" }
            link rel="stylesheet" href={ (PREFIX) "/assets/admin.css?v=" (ASSET_VERSION) };
            script src={ (PREFIX) "/assets/admin.js?v=" (ASSET_VERSION) } defer {}
        }
    }
}

/// A whole page for a signed-in viewer.
pub(crate) fn page(viewer: &Viewer, nav: Nav, title: &str, body: Markup) -> Markup {
    let entries = [
        (Nav::Overview, "Overview", PREFIX.to_owned()),
        (
            Nav::Connections,
            "Connections",
            format!("{PREFIX}/connections"),
        ),
        (Nav::History, "History", format!("{PREFIX}/history")),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header.top {
                    a.brand href=(PREFIX) { "dbsync" }
                    nav aria-label="Main" {
                        ul {
                            @for (entry, label, href) in &entries {
                                li {
                                    a href=(href) aria-current=[(*entry == nav).then_some("page")] { (label) }
                                }
                            }
                        }
                    }
                    form.logout method="post" action={ (PREFIX) "/logout" } {
                        (csrf(viewer))
                        span.who { "admin:" (viewer.name) }
                        button type="submit" { "Sign out" }
                    }
                }
                main {
                    h1 { (title) }
                    @if let Some(flash) = &viewer.flash {
                        p.flash.error[flash.error] role=(if flash.error { "alert" } else { "status" }) { (flash.text) }
                    }
                    (body)
                }
            }
        }
    }
}

/// The hidden CSRF field every form carries.
pub(crate) fn csrf(viewer: &Viewer) -> Markup {
    html! { input type="hidden" name=(CSRF_FIELD) value=(viewer.csrf); }
}

/// The sign-in page; `nonce` is also in the login cookie.
pub(crate) fn login(nonce: &str, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Sign in"))
            body.login {
                main {
                    h1 { "dbsync admin" }
                    @if let Some(error) = error {
                        p.flash.error role="alert" { (error) }
                    }
                    form method="post" action={ (PREFIX) "/login" } {
                        input type="hidden" name=(CSRF_FIELD) value=(nonce);
                        label for="token" { "Admin token" }
                        input #token type="password" name="token" autocomplete="off" required
                            placeholder="dbsa_…" autofocus;
                        p.hint { "Create one on the server with " code { "dbsync admin-tokens create <name>" } "." }
                        button type="submit" { "Sign in" }
                    }
                }
            }
        }
    }
}

/// A small page for an error, with its status.
pub(crate) fn error_page(status: StatusCode, message: &str) -> Response {
    let body = html! {
        (DOCTYPE)
        html lang="en" {
            (head("Error"))
            body.login {
                main {
                    h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("Error")) }
                    p role="alert" { (message) }
                    p { a href=(PREFIX) { "Back to the overview" } }
                }
            }
        }
    };
    (status, body).into_response()
}

/// The page for an agent error: its message when it is the user's to fix, else a generic 500
/// (logged, never echoed).
pub(crate) fn agent_error(err: dbsync_agent::Error) -> Response {
    let (status, message) = user_message(err);
    error_page(status, &message)
}

/// Status and message for an error: the user's to fix, or a generic one for internal errors
/// (logged, never echoed), as the JSON API maps them.
pub(crate) fn user_message(err: dbsync_agent::Error) -> (StatusCode, String) {
    let api = crate::ApiError::from(err);
    (api.status(), api.message().to_owned())
}

/// A status word as a coloured badge.
pub(crate) fn badge(status: &str) -> Markup {
    html! { span class={ "badge " (status) } { (status.replace('_', " ")) } }
}

/// `used` of `limit` (or "no limit"), with a meter when limited.
pub(crate) fn usage(used: i64, limit: Option<i64>) -> Markup {
    html! {
        @match limit {
            Some(limit) if limit > 0 => {
                meter min="0" max=(limit) value=(used.min(limit)) title={ (used) " of " (limit) } {}
                " " (number(used)) " / " (number(limit))
            }
            _ => { (number(used)) " / no limit" }
        }
    }
}

/// A count with thousands separators.
pub(crate) fn number(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// Bytes in KiB/MiB/GiB.
pub(crate) fn bytes(n: i64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    #[allow(clippy::cast_precision_loss)]
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A time in UTC, to the second, in a `<time>` element.
pub(crate) fn time(at: Option<DateTime<Utc>>) -> Markup {
    html! {
        @if let Some(at) = at {
            time datetime=(at.to_rfc3339()) { (at.format("%Y-%m-%d %H:%M:%S")) }
        } @else {
            "—"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_bytes_read_well() {
        assert_eq!(number(0), "0");
        assert_eq!(number(1_234_567), "1,234,567");
        assert_eq!(number(-1000), "-1,000");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn text_is_escaped() {
        let markup = badge("<script>");
        assert!(!markup.into_string().contains("<script>"));
    }
}
