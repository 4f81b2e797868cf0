//! The accept loop of the admin API and of the peer listener: connections
//! capped per client address at accept and in total (at the total, nothing
//! is accepted until one closes), as the metadata service does for guests;
//! a deadline for request headers (which also
//! ends idle keep-alive connections), headers capped in size and number
//! (431 past them), and a graceful end that lets requests in flight finish.
//!
//! Why not `axum::serve`: it has no hook at accept and no header deadline,
//! so one client holding connections or sending a byte a second could keep
//! every other operator out.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use cradle_core::Core;
use cradle_limits::{Admission, Caps};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

/// Largest request head (request line and headers), in bytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields in one request.
pub const MAX_HEADERS: usize = 100;

/// What a listener holds and how long it waits (`[admin]` in
/// docs/configuration.md).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub caps: Caps,
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            caps: Caps {
                total: 1024,
                per_source: 256,
                per_unknown_source: 256,
            },
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Serve `app` on `listener` until `shutdown` resolves. `handshake` turns
/// an admitted connection into the stream HTTP runs on (TLS for peers), or
/// drops it.
pub(crate) async fn serve<IO, H, HF>(
    name: &'static str,
    listener: TcpListener,
    app: Router,
    limits: Limits,
    core: Arc<Core>,
    handshake: H,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    H: Fn(TcpStream, SocketAddr) -> HF + Clone + Send + 'static,
    HF: Future<Output = Option<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let admission = Admission::new(limits.caps);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // At the limit, accept nothing until a connection closes (see
        // cradle-limits): new ones wait in the kernel's backlog.
        if admission.full() {
            core.metrics().limit_reached(name);
            tokio::select! {
                () = admission.room() => {}
                () = &mut shutdown => break,
            }
        }
        let (tcp, from) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off, don't spin.
                    warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // An operator's client is "known" everywhere: one cap per address.
        let admitted = tokio::select! {
            a = admission.admit_or_wait(from.ip(), true) => a,
            () = &mut shutdown => break,
        };
        let admitted = match admitted {
            Ok(a) => a,
            Err(refusal) => {
                core.metrics().refused(name, refusal.label());
                let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                continue;
            }
        };
        core.metrics().set_connections(name, admission.held());
        let _ = tcp.set_nodelay(true);
        let (handshake, app, http) = (handshake.clone(), app.clone(), http.clone());
        let watcher = graceful.watcher();
        let (core, admission) = (core.clone(), admission.clone());
        tokio::spawn(async move {
            if let Some(io) = handshake(tcp, from).await {
                let conn = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
                if let Err(e) = watcher.watch(conn).await {
                    debug!(listener = name, %from, error = %e, "connection ended with an error");
                }
            }
            drop(admitted);
            core.metrics().set_connections(name, admission.held());
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(5)) => {}
    }
    Ok(())
}
