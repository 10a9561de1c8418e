//! Errors of the HTTP APIs: JSON bodies with a stable code; internal failures become a generic
//! 500 and are logged, never echoed.

use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dbsync_agent::registration::PeerError;
use dbsync_protocol::peer::{ErrorBody, ErrorDetail};

/// An API error: status, stable code, message, and an optional `Retry-After`.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after_secs: Option<u64>,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    /// 401 for a missing, wrong or revoked credential.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 429 with a `Retry-After`.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self {
            retry_after_secs: Some(retry_after_secs.max(1)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests",
            )
        }
    }

    /// The HTTP status.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The message (a generic one for internal errors, which are logged instead).
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    fn internal(err: &dyn std::error::Error) -> Self {
        let chain: Vec<String> = std::iter::successors(Some(err), |e| e.source())
            .map(ToString::to_string)
            .collect();
        tracing::error!(error = %chain.join(": "), "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs
            && let Ok(value) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

impl From<dbsync_agent::Error> for ApiError {
    fn from(err: dbsync_agent::Error) -> Self {
        use dbsync_agent::Error as E;
        match &err {
            E::NotFound { .. } => Self::new(StatusCode::NOT_FOUND, "not_found", err.to_string()),
            E::IllegalTransition { .. } => {
                Self::new(StatusCode::CONFLICT, "illegal_transition", err.to_string())
            }
            E::Invalid { .. } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_input",
                err.to_string(),
            ),
            E::Conflict(_) => Self::new(StatusCode::CONFLICT, "conflict", err.to_string()),
            _ => Self::internal(&err),
        }
    }
}

impl From<PeerError> for ApiError {
    fn from(err: PeerError) -> Self {
        match err {
            PeerError::Refused {
                status,
                code,
                message,
            } => Self::new(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                code,
                message,
            ),
            PeerError::Internal(err) => Self::from(err),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        // JSON of the wrong shape (a missing field, a wrong type) is a malformed request like
        // JSON that does not parse: 400, as both APIs document (axum says 422).
        let status = match rejection.status() {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            other => other,
        };
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "invalid_request"
        };
        Self::new(status, code, rejection.body_text())
    }
}

/// `axum::Json` whose rejections are [`ApiError`]s.
#[derive(Debug, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub(crate) struct ApiJson<T>(pub(crate) T);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_errors_never_leak() {
        let err = dbsync_agent::Error::Database(sqlx::Error::Protocol(
            "relation \"dbsync_secret_table\" does not exist".into(),
        ));
        let api = ApiError::from(err);
        assert_eq!(api.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(api.message, "internal error");
    }
}
