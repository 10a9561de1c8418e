//! The OpenAPI 3.1 document of the peer API, the admin API and the operations routes, generated
//! from the handlers: every route is registered through `utoipa_axum::routes!`, which adds the
//! handler's description to the document as it adds the route, so the two cannot drift apart.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::{AppState, admin_api, health, peer_api};

/// Where the document is served (no credential: it describes the API, nothing of the site).
pub(crate) const PATH: &str = "/admin/db-sync/api/openapi.json";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "dbsync",
        description = "The peer API sites call each other on, the admin API, and the operations \
                       routes of a dbsync agent. The data plane (WebSocket at /db-sync/ws and \
                       QUIC) is described in docs/protocol.md."
    ),
    tags(
        (name = "peer", description = "Called by other sites: registration and status changes"),
        (name = "admin", description = "Managing connections, transfers, schedules and settings"),
        (name = "operations", description = "Health, readiness and metrics"),
    ),
    modifiers(&Credentials)
)]
struct Document;

/// The two bearer credentials: an admin API token, and a connection (or peer) token.
struct Credentials;

impl Modify for Credentials {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            let mut scheme = Http::new(HttpAuthScheme::Bearer);
            scheme.description = Some(description.to_owned());
            SecurityScheme::Http(scheme)
        };
        components.add_security_scheme(
            "admin_token",
            bearer("an admin API token (`dbsync admin-tokens create NAME`), `dbsa_...`"),
        );
        components.add_security_scheme(
            "connection_token",
            bearer("the connection token (receiver calling its sender) or the peer token (sender calling its receiver), `dbs_...`"),
        );
    }
}

/// This document (the router adds it as an extension once it is complete).
#[utoipa::path(get, path = PATH, tag = "operations",
    responses((status = 200, description = "this document", body = Object)))]
async fn serve_document(
    axum::Extension(document): axum::Extension<std::sync::Arc<utoipa::openapi::OpenApi>>,
) -> axum::Json<std::sync::Arc<utoipa::openapi::OpenApi>> {
    axum::Json(document)
}

/// Every described route, with the document.
pub(crate) fn routes(state: AppState) -> OpenApiRouter<AppState> {
    let mut document = Document::openapi();
    document.info.version = env!("CARGO_PKG_VERSION").to_owned();
    OpenApiRouter::with_openapi(document)
        .routes(routes!(serve_document))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .merge(peer_api::routes(state.clone()))
        .merge(admin_api::routes(state.clone()))
        .merge(admin_api::metrics_routes(state))
}
