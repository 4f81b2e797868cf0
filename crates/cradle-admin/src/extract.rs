//! Extractors whose every failure is one of ours: a JSON body, path
//! parameters and query strings that do not fit answer with the JSON error
//! body and a 4xx, never axum's plain-text rejection.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::ApiError;
use crate::error::describe_json_error;

/// A JSON body: 400 for malformed JSON, 413 for too large, 422 for JSON
/// that does not fit the request type (naming the field) or is not an
/// object.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = bytes::Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    "the request body is too large",
                )
            } else {
                ApiError::bad_request("the request body could not be read")
            }
        })?;
        // Every body of this API is an object. serde would fill a struct
        // from an array too (`[null, null]` made a rule open to all).
        if bytes.trim_ascii_start().first() != Some(&b'{') {
            return Err(
                match serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
                    Ok(_) => ApiError::unprocessable("the request body must be a JSON object"),
                    Err(e) => ApiError::bad_request(format!(
                        "malformed JSON: {}",
                        describe_json_error(&e)
                    )),
                },
            );
        }
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        // The path names the field that did not fit ("os_params.secret.k"),
        // which serde_json's own message leaves out.
        let value = match serde_path_to_error::deserialize::<_, T>(&mut de) {
            Ok(v) => de.end().map(|()| v).map_err(|e| (String::new(), e)),
            Err(e) => Err((e.path().to_string(), e.into_inner())),
        };
        value.map(Json).map_err(|(path, e)| {
            use serde_json::error::Category;
            let described = describe_json_error(&e);
            match e.classify() {
                Category::Data if path.is_empty() || path == "." => {
                    ApiError::unprocessable(described)
                }
                Category::Data => ApiError::unprocessable(format!("{path}: {described}")),
                _ => ApiError::bad_request(format!("malformed JSON: {described}")),
            }
        })
    }
}

/// Path parameters (one as `String`, several as a tuple), as text: a
/// segment that is not UTF-8 once percent-decoded is a 400.
pub struct Params<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Params(p.0))
            .map_err(|_| ApiError::bad_request("a name or id in the path is not valid UTF-8"))
    }
}

/// A query string: one that does not fit the route's parameters is a 400
/// naming what is wrong.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|r| {
                let detail = r.body_text();
                let detail = detail
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&detail);
                ApiError::bad_request(format!("the query string is malformed: {detail}"))
            })
    }
}
