//! One error type for every admin response, rendered in one place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cradle_core::{Error, Kind};
use cradle_model::api::{ErrorBody, ErrorDetail};
use tracing::error;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

/// The one place an operation's failure becomes an HTTP status. What is
/// not the caller's doing is logged here with its detail; the caller gets
/// only the public message.
impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match e.kind() {
            Kind::BadRequest => StatusCode::BAD_REQUEST,
            Kind::Unauthorized => StatusCode::UNAUTHORIZED,
            Kind::Forbidden => StatusCode::FORBIDDEN,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::Conflict => StatusCode::CONFLICT,
            Kind::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
            Kind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::Full => StatusCode::INSUFFICIENT_STORAGE,
            Kind::TooMany => StatusCode::TOO_MANY_REQUESTS,
            Kind::Upstream => StatusCode::BAD_GATEWAY,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if e.is_server_side() {
            error!(error = %e, code = e.code(), "admin request failed");
        }
        ApiError::new(status, e.code(), e.public_message())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// serde_json's message without the value it choked on: an error about a
/// mistyped secret must not echo the secret back into a response or a log.
pub fn describe_json_error(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    // serde_json quotes offending string values as `string "…"`.
    let msg = match (msg.find("string \""), msg.rfind('"')) {
        (Some(start), Some(end)) if end > start + 8 => {
            format!("{}string{}", &msg[..start], &msg[end + 1..])
        }
        _ => msg,
    };
    // An enum (such as `imds_tokens`) given an unknown string names it as
    // ``unknown variant `…`, expected …``.
    const VARIANT: &str = "unknown variant `";
    match msg.find(VARIANT) {
        Some(start) => {
            let value_at = start + VARIANT.len();
            let rest = &msg[value_at..];
            let end = rest
                .rfind("`, expected")
                .or_else(|| rest.rfind("`, there are no variants"))
                .map_or(msg.len(), |n| value_at + n + 1);
            format!("{}unknown variant{}", &msg[..start], &msg[end..])
        }
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_internal_failure_is_a_500_with_the_json_body() {
        let r = ApiError::from(Error::Internal("a task panicked at /some/path".into()));
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(r.code, "internal");
        assert!(!r.message.contains("/some/path"), "{}", r.message);
        let missing = ApiError::from(Error::Refused {
            kind: Kind::NotFound,
            code: "no_install_job",
            message: "instance web has no install job".into(),
        });
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
        assert_eq!(missing.code, "no_install_job");
    }

    fn error_for(json: &str) -> String {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        enum Mode {
            #[serde(rename = "optional")]
            Optional,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct T {
            n: Option<u32>,
            mode: Option<Mode>,
        }
        describe_json_error(&serde_json::from_str::<T>(json).unwrap_err())
    }

    #[test]
    fn offending_strings_are_not_echoed() {
        let m = error_for(r#"{"n": "CANARY"}"#);
        assert!(!m.contains("CANARY") && m.contains("expected u32"), "{m}");
        let m = error_for(r#"{"mode": "CANARY`, x"}"#);
        assert!(!m.contains("CANARY"), "{m}");
        assert!(m.starts_with("unknown variant, expected `optional`"), "{m}");
    }
}
