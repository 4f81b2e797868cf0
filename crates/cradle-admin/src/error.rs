//! One error type for every admin response, rendered in one place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cradle_model::api::{ErrorBody, ErrorDetail, Invalid};
use cradle_registry::RegistryError;
use cradle_secgroups::state::SgError;
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
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::unprocessable(e.to_string())
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match &e {
            RegistryError::NotFound(_) => return ApiError::not_found(e.to_string()),
            RegistryError::Conflict(_) | RegistryError::PasswordSet => {
                (StatusCode::CONFLICT, "conflict")
            }
            RegistryError::Busy(_) => (StatusCode::CONFLICT, "busy"),
            RegistryError::Invalid(_) | RegistryError::PasswordTooLong => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid")
            }
            RegistryError::QueueFull(_) => (StatusCode::TOO_MANY_REQUESTS, "queue_full"),
            RegistryError::MessageTooLarge(..) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            RegistryError::SecGroup(sg) => match sg {
                SgError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
                SgError::NoGroup(_)
                | SgError::NoRule(_)
                | SgError::NoDefault(_)
                | SgError::NotAttached(_) => (StatusCode::NOT_FOUND, "not_found"),
                SgError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
                SgError::InUse(_) => (StatusCode::CONFLICT, "in_use"),
                SgError::TooManyRules(_) => (StatusCode::CONFLICT, "quota"),
            },
            RegistryError::SecGroupsDisabled => {
                return ApiError::not_found("no such route (security groups are disabled)");
            }
            RegistryError::Firewall(msg) => {
                error!(error = %msg, "firewall update failed");
                (StatusCode::SERVICE_UNAVAILABLE, "firewall")
            }
            RegistryError::Store(inner) => {
                error!(error = %inner, "storage failure");
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage",
                    "storage failed; see the server log",
                );
            }
        };
        ApiError::new(status.0, status.1, e.to_string())
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
