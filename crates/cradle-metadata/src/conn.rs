//! A guest's connection, shared between hyper and the request it serves,
//! so that a request waiting for a change (`?wait=true`) learns when its
//! guest has gone.
//!
//! Why: hyper reads nothing while a request is in flight when half-close
//! is allowed (which busybox `nc` needs: it shuts its side down once its
//! request is sent), so a guest that gave up on a wait would keep its place
//! among the waiters, and its connection, until the wait timed out. Here
//! the socket is an `Arc<TcpStream>`: hyper reads and writes it through
//! [`Shared`] (tokio's own readiness-then-try loop), and a waiting request
//! watches the same socket for the peer's FIN with [`gone`].

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// The connection hyper serves.
pub(crate) struct Shared(pub(crate) Arc<TcpStream>);

impl AsyncRead for Shared {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Shared {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write);
        Poll::Ready(match r {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            r => r,
        })
    }
}

/// Resolves when the peer has closed its side of `conn` (or the socket
/// failed). Bytes it sends meanwhile (a pipelined request) mean it is still
/// there: then this never resolves, and the wait ends at its timeout.
pub(crate) async fn gone(conn: &TcpStream) {
    loop {
        let Ok(ready) = conn.ready(Interest::READABLE).await else {
            return;
        };
        if ready.is_read_closed() {
            return;
        }
        // Readable: new bytes, or readiness left from the request itself
        // (which hyper read in one go). A peek tells them apart, and
        // clears readiness only when nothing is there to read.
        let mut byte = [MaybeUninit::<u8>::uninit(); 1];
        match conn.try_io(Interest::READABLE, || {
            socket2::SockRef::from(conn).peek(&mut byte)
        }) {
            Ok(0) => return,
            Ok(_) => std::future::pending::<()>().await,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
    }
}
