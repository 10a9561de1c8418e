//! What every page knows of the browser it answers: the signed-in viewer, the message left for
//! the next page, and the name of the CSRF field. Shared by the session layer ([`super::auth`])
//! and the page frame ([`super::layout`]), which import this and not each other.

use dbsync_agent::audit::Actor;

/// Name of the hidden form field carrying the CSRF token.
pub(crate) const CSRF_FIELD: &str = "csrf";

/// A message shown once at the top of the next page.
#[derive(Debug, Clone)]
pub(crate) struct Flash {
    /// Whether it reports a failure.
    pub(crate) error: bool,
    /// The text (escaped when rendered).
    pub(crate) text: String,
}

/// What a page handler learns about the signed-in browser.
#[derive(Debug, Clone)]
pub(crate) struct Viewer {
    /// Key of the session in the store.
    pub(super) key: [u8; 32],
    /// Actor for audit events.
    pub(crate) actor: Actor,
    /// CSRF token for the forms on the page.
    pub(crate) csrf: String,
    /// Admin token name, shown in the header.
    pub(crate) name: String,
    /// Message left by the previous action.
    pub(crate) flash: Option<Flash>,
}
