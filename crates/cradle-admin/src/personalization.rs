//! `GET /v1/instances/{key}/personalization`: the instance's personalization
//! package, fetched now from its URL with its secret download credentials
//! and streamed to the caller.
//!
//! The server fetches (not the caller) because the credentials are secret
//! parameters: they exist only in this process's memory and no API shows
//! them. They are used for this one download. The package goes through an
//! anonymous temporary file (so the pin is checked before the first byte is
//! sent, and the length is known) that vanishes when the response ends, or
//! if the server dies. Each call fetches afresh: a package that changed
//! upstream is never served stale.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cradle_personalize::{Credentials, Error, Limits, fetch};
use tracing::{info, warn};

use crate::{ADMIN_ROLE, AdminState, ApiError, Caller, Key};

/// The response header carrying the served package's SHA-256.
pub const SHA256_HEADER: &str = "x-cradle-package-sha256";

pub async fn package(
    State(s): State<Arc<AdminState>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Key(key): Key,
) -> Result<Response, ApiError> {
    let instance = s.registry.get(&key)?;
    let Some(url) = instance.personalization_url.clone() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_personalization",
            format!("instance {} has no personalization_url", instance.name),
        ));
    };
    // A file URL is read with the server's own rights: operators only.
    if url.starts_with("file://") && !caller.has(ADMIN_ROLE) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("serving a file:// package needs the {ADMIN_ROLE:?} role"),
        ));
    }
    let credentials = Credentials::of(&instance.os_params);
    let pin = instance.personalization_sha256.clone();
    let _permit = s
        .package_fetches
        .acquire()
        .await
        .map_err(|_| ApiError::internal())?;
    let fetched = tokio::task::spawn_blocking(move || {
        fetch(
            &url,
            &credentials,
            Limits::default().max_compressed,
            pin.as_deref(),
        )
    })
    .await
    .map_err(|_| ApiError::internal())?
    .map_err(|e| match e {
        Error::Fetch { .. } | Error::Limit(_) => {
            warn!(instance = %instance.id, error = %e, "personalization package fetch failed");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "personalization_fetch_failed",
                e.to_string(),
            )
        }
        other => {
            tracing::error!(instance = %instance.id, error = %other, "personalization package fetch failed");
            ApiError::internal()
        }
    })?;
    let (bytes, sha256) = (fetched.bytes, fetched.sha256.clone());
    let file = fetched.into_file().map_err(|e| {
        tracing::error!(error = %e, "cannot rewind the fetched package");
        ApiError::internal()
    })?;
    info!(instance = %instance.id, bytes, sha256 = %sha256, "personalization package served");
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    let mut r = (StatusCode::OK, Body::from_stream(stream)).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/gzip"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes));
    if let Ok(v) = HeaderValue::from_str(&sha256) {
        h.insert(SHA256_HEADER, v);
    }
    Ok(r)
}
