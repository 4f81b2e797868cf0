//! The peer listener: where the other hosts of a cluster hand this host the
//! operations that carry secrets for the instances it serves (see
//! `cradle_core::peers`). Mutual TLS: a client must present a certificate of
//! the cluster's CA, and this host presents its own. The caller the peer
//! authorized travels in a header; the operation is the admin API's own
//! (the same handlers, the same `Core` call), so nothing is decided here.
//! Only what another host's operations need is offered: create, show,
//! modify and start an instance, and take one in (`/v1/migrations`).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, post};
use cradle_core::peers::{CALLER_HEADER, caller_from_header};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::{AdminState, ApiError, Shared, install, instances, migrate};

/// This host's side of the cluster's mutual TLS, from `tls_dir`
/// (`ca.pem`, `host.pem`, `host.key`).
pub fn server_tls(dir: &Path) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let read_certs = |name: &str| -> Result<Vec<CertificateDer<'static>>, String> {
        let path = dir.join(name);
        CertificateDer::pem_file_iter(&path)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs("ca.pem")? {
        roots
            .add(ca)
            .map_err(|e| format!("{}: {e}", dir.join("ca.pem").display()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("the cluster CA in {}: {e}", dir.display()))?;
    let key_path = dir.join("host.key");
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs("host.pem")?, key)
        .map_err(|e| format!("{}: {e}", dir.join("host.pem").display()))
}

/// The caller a peer speaks for; then catch up with the store, so that an
/// instance the peer just registered is known here.
async fn peer_caller(State(s): Shared, mut req: Request, next: Next) -> Response {
    let caller = req
        .headers()
        .get(CALLER_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(caller_from_header);
    let Some(caller) = caller else {
        return ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "invalid",
            format!("a peer request names its caller in the {CALLER_HEADER} header"),
        )
        .into_response();
    };
    if let Err(e) = s.core.catch_up().await {
        return ApiError::from(e).into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

fn peer_app(state: Arc<AdminState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v1/instances", post(instances::create))
        .route(
            "/v1/instances/{key}",
            patch(instances::modify).get(instances::show),
        )
        .route("/v1/instances/{key}/start", post(install::start_vm))
        .route("/v1/migrations", post(migrate::prepare))
        .route_layer(middleware::from_fn_with_state(state.clone(), peer_caller))
        .fallback(|| async { ApiError::not_found("no such route on the peer listener") })
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Serve peers on `listener` until `shutdown` resolves.
pub async fn serve_peers(
    listener: TcpListener,
    state: Arc<AdminState>,
    tls: rustls::ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let (limits, core) = (state.limits, state.core.clone());
    let handshake = move |tcp: tokio::net::TcpStream, from: std::net::SocketAddr| {
        let acceptor = acceptor.clone();
        async move {
            match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => Some(tls),
                Ok(Err(e)) => {
                    info!(%from, error = %e, "refused a peer connection (TLS)");
                    None
                }
                Err(_) => {
                    debug!(%from, "a peer connection did not finish its TLS handshake");
                    None
                }
            }
        }
    };
    let app = peer_app(state);
    crate::listen::serve("peer", listener, app, limits, core, handshake, shutdown).await
}
