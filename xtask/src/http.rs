//! A minimal HTTP/1.1 keep-alive client over tokio's `TcpStream`.
//!
//! Why hand-written rather than hyper or reqwest: the load generator shares
//! the machine's cores with the server under test, so every cycle the client
//! spends is one the server does not get. This client sends a prebuilt request
//! with one write, reads the reply into a reused buffer and parses only the
//! status line, Content-Length and Connection: no allocation per request, no
//! header map, no body stream machinery. cradle and nginx are driven by the
//! same code, so whatever the client costs, it costs both alike. It
//! understands what the two servers send here (bodies with Content-Length);
//! anything else (chunked, close-delimited) is an error, not a guess.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Largest reply accepted (headers and body).
const MAX_REPLY: usize = 16 << 20;

pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// The server said `Connection: close`; open a new connection.
    closed: bool,
}

pub struct Reply<'a> {
    pub status: u16,
    pub body: &'a [u8],
}

impl Conn {
    /// Connect to `target`, from `source` when given (the address a guest is
    /// known by).
    pub async fn connect(source: Option<IpAddr>, target: SocketAddr) -> io::Result<Conn> {
        let socket = match target {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(target).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: vec![0; 16 * 1024],
            start: 0,
            end: 0,
            closed: false,
        })
    }

    /// Whether the server closed (or announced closing) this connection.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Send one complete request (head and body) and read its reply.
    pub async fn request(&mut self, req: &[u8]) -> io::Result<Reply<'_>> {
        if self.closed {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the server closed the connection",
            ));
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        self.stream.write_all(req).await?;
        // Find the end of the head.
        let head_len = loop {
            if let Some(i) = find_head_end(&self.buf[self.start..self.end]) {
                break i;
            }
            self.fill().await?;
        };
        let head = &self.buf[self.start..self.start + head_len];
        let (status, body_len, close) = parse_head(head)?;
        if close {
            self.closed = true;
        }
        let total = head_len + body_len;
        if total > MAX_REPLY {
            return Err(bad(format!("reply of {total} bytes is too large")));
        }
        while self.end - self.start < total {
            self.fill().await?;
        }
        let body_start = self.start + head_len;
        self.start += total;
        Ok(Reply {
            status,
            body: &self.buf[body_start..body_start + body_len],
        })
    }

    /// Read more bytes, making room first when the buffer is full.
    async fn fill(&mut self) -> io::Result<()> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let n = (self.buf.len() * 2).min(MAX_REPLY);
                if n == self.buf.len() {
                    return Err(bad("reply too large".into()));
                }
                self.buf.resize(n, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            self.closed = true;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection mid-reply",
            ));
        }
        self.end += n;
        Ok(())
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Length of the head including its closing blank line, once it is complete.
fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Status, Content-Length, and whether the server will close the connection.
fn parse_head(head: &[u8]) -> io::Result<(u16, usize, bool)> {
    let text = std::str::from_utf8(head).map_err(|_| bad("reply head is not UTF-8".into()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| version.starts_with("HTTP/1."))
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let mut close = version == "HTTP/1.0";
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| bad(format!("bad Content-Length {value:?}")))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad(format!(
                "Transfer-Encoding {value:?} is not supported by this client"
            )));
        } else if name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                close = true;
            } else if v.contains("keep-alive") {
                close = false;
            }
        }
    }
    let length = match (length, status) {
        (Some(n), _) => n,
        (None, 204 | 304) | (None, 100..=199) => 0,
        (None, _) => return Err(bad("reply has no Content-Length".into())),
    };
    Ok((status, length, close))
}

/// A GET request, ready to send.
pub fn get(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: cradle-xtask-bench\r\n\r\n")
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let h = b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\ncontent-type: x\r\n\r\n";
        assert_eq!(find_head_end(h), Some(h.len()));
        assert_eq!(parse_head(h).unwrap(), (200, 12, false));
        let h = b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nConnection: close\r\n\r\n";
        assert_eq!(parse_head(h).unwrap(), (404, 3, true));
        let h = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(parse_head(h).is_err());
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
    }
}
