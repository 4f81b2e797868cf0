//! An export's or import's dump between the script and the host, on its
//! own stream of the metadata service (`/cradle/latest/os/stream`), never
//! through the channel's small messages:
//!
//! - **out** (export): the script's standard output is uploaded as it
//!   comes, one chunked `PUT`; the host counts it, hashes it, caps it and
//!   answers what it counted.
//! - **in** (import): `GET` of the spooled dump, copied to the script's
//!   standard input; its `Content-Length` and SHA-256 header are checked
//!   against what was read.
//!
//! Either way the length and SHA-256 of what passed go into the status, so
//! the host can check both ends agree. Nothing is held: a chunk at a time.
//!
//! Under TCG every system call and every switch between the script and
//! the agent is emulated, and they, not the bytes, are what a dump costs
//! (measured: a 64 KiB pipe and ureq's 16 KiB chunks moved 12.7 MiB/s
//! where the disk reads at 68). So the pipes are widened to 1 MiB
//! ([`widen_pipe`]), and the upload is written here, not by ureq, whose
//! chunked bodies cannot be made larger than 16 KiB: one `PUT` with
//! `Transfer-Encoding: chunked` in chunks of up to [`CHUNK`], over a plain
//! `TcpStream` with the same timeouts as every other request.

use std::io::{BufRead, Read, Write};
use std::os::fd::AsRawFd;

use cradle_model::answers::STREAM_SHA256_HEADER;
use cradle_model::job::{StreamCounter, StreamDigest};
use cradle_os::read_full;

use crate::http::Client;

/// Which way the dump goes, and where.
#[derive(Clone, Copy)]
pub enum Data<'a> {
    None,
    /// Standard output is the dump, uploaded to `path`.
    Out {
        client: &'a Client,
        path: &'a str,
    },
    /// Standard input is the dump, read from `path`.
    In {
        client: &'a Client,
        path: &'a str,
    },
}

/// Counts and hashes what is read through it.
pub struct Hashing<R> {
    inner: R,
    counted: StreamCounter,
}

impl<R> Hashing<R> {
    pub fn new(inner: R) -> Hashing<R> {
        Hashing {
            inner,
            counted: StreamCounter::default(),
        }
    }

    pub fn digest(self) -> StreamDigest {
        self.counted.finish()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counted.update(&buf[..n]);
        Ok(n)
    }
}

/// The largest chunk uploaded, and the import's copy buffer.
pub const CHUNK: usize = 1 << 20;

/// Make the pipe behind `fd` 1 MiB (Linux's default `pipe-max-size`), so
/// the script and the agent take turns 16 times less often. A pipe that
/// stays smaller only costs speed.
pub fn widen_pipe(fd: &impl AsRawFd) {
    // SAFETY: fcntl(F_SETPIPE_SZ) takes an integer and no pointer; on a
    // descriptor that is not a pipe it fails with EBADF or EINVAL.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
}

/// `PUT path` with `body` chunked in pieces of up to [`CHUNK`]: the
/// answer's status and body (at most 64 KiB).
fn put_chunked(
    client: &Client,
    path: &str,
    body: &mut impl Read,
) -> Result<(u16, Vec<u8>), String> {
    let service = client.service();
    let url = client.url(path);
    let broke = |what: &str, e: std::io::Error| format!("PUT {url}: {what}: {e}");
    let conn = std::net::TcpStream::connect_timeout(&service.into(), crate::http::CONNECT_TIMEOUT)
        .map_err(|e| broke("cannot connect", e))?;
    conn.set_read_timeout(Some(crate::http::READ_TIMEOUT))
        .and_then(|()| conn.set_write_timeout(Some(crate::http::READ_TIMEOUT)))
        .map_err(|e| broke("cannot set timeouts", e))?;
    let mut w = &conn;
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: {service}\r\n{}: {}\r\nContent-Type: \
         application/octet-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        cradle_model::answers::METADATA_FLAVOR_HEADER,
        cradle_model::answers::METADATA_FLAVOR,
    );
    w.write_all(head.as_bytes())
        .map_err(|e| broke("sending the head", e))?;
    // Room for the chunk's size line before it and its end after it, so
    // each chunk leaves in one write.
    const ROOM: usize = 10;
    let mut buf = vec![0u8; ROOM + CHUNK + 2];
    loop {
        let n = read_full(body, &mut buf[ROOM..ROOM + CHUNK])
            .map_err(|e| broke("reading the dump", e))?;
        let size = format!("{n:x}\r\n");
        let start = ROOM - size.len();
        buf[start..ROOM].copy_from_slice(size.as_bytes());
        buf[ROOM + n..ROOM + n + 2].copy_from_slice(b"\r\n");
        // The last chunk is `0\r\n\r\n`.
        if let Err(e) = w.write_all(&buf[start..ROOM + n + 2]) {
            // The host may answer early (past the cap) and close: its
            // answer says why better than the broken write.
            return read_answer(&conn).map_err(|_| broke("sending the dump", e));
        }
        if n == 0 {
            break;
        }
    }
    read_answer(&conn).map_err(|e| broke("reading the answer", e))
}

/// An HTTP/1.1 answer: its status and body (by `Content-Length`, or to the
/// close), at most 64 KiB.
fn read_answer(conn: &std::net::TcpStream) -> std::io::Result<(u16, Vec<u8>)> {
    let mut r = std::io::BufReader::new(conn);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {:?}", line.trim())))?;
    let mut length = None;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse::<u64>().ok();
        }
    }
    let mut body = Vec::new();
    r.take(length.unwrap_or(64 << 10).min(64 << 10))
        .read_to_end(&mut body)?;
    Ok((status, body))
}

/// Upload `stdout` to `path` on a thread; what was sent, once the host
/// took all of it and counted the same.
pub fn upload(
    client: &Client,
    path: &str,
    stdout: impl Read + Send + 'static,
) -> std::thread::JoinHandle<Result<StreamDigest, String>> {
    let (client, path) = (client.clone(), path.to_string());
    std::thread::spawn(move || {
        let mut body = Hashing::new(stdout);
        let answer = put_chunked(&client, &path, &mut body);
        let sent = body.digest();
        let answer = match answer {
            Ok((200..=299, body)) => body,
            Ok((status, body)) => {
                return Err(format!(
                    "the host refused the dump after {} bytes: HTTP {status}: {}",
                    sent.bytes,
                    String::from_utf8_lossy(&body).trim()
                ));
            }
            Err(e) => {
                return Err(format!(
                    "uploading the dump failed after {} bytes: {e}",
                    sent.bytes
                ));
            }
        };
        let host: StreamDigest = serde_json::from_slice(&answer)
            .map_err(|e| crate::job::json_error("the host's answer to the upload", &e))?;
        if host != sent {
            return Err(format!(
                "the host counted {} bytes (SHA-256 {}) of the {} sent (SHA-256 {})",
                host.bytes, host.sha256, sent.bytes, sent.sha256
            ));
        }
        Ok(sent)
    })
}

/// The dump to read: its body, opened before the script starts (so a
/// missing stream fails the job before anything runs), with what the
/// host says it holds.
pub struct Download {
    body: Box<dyn Read + Send>,
    len: Option<u64>,
    sha256: Option<String>,
}

pub fn open_download(client: &Client, path: &str) -> Result<Download, String> {
    let (body, len, sha256) = client
        .get_stream(path, STREAM_SHA256_HEADER)
        .map_err(|e| e.message)?;
    Ok(Download { body, len, sha256 })
}

/// Copy the dump into the script's standard input on a thread; what was
/// fed, once all of it was and it is what the host said.
pub fn feed(
    d: Download,
    mut stdin: impl Write + Send + 'static,
) -> std::thread::JoinHandle<Result<StreamDigest, String>> {
    std::thread::spawn(move || {
        let mut body = Hashing::new(d.body);
        let mut buf = vec![0u8; CHUNK];
        let copied = (|| -> std::io::Result<()> {
            loop {
                let n = read_full(&mut body, &mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                stdin.write_all(&buf[..n])?;
            }
        })();
        drop(stdin);
        let fed = body.digest();
        copied.map_err(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                format!(
                    "the script stopped reading its dump after {} bytes",
                    fed.bytes
                )
            } else {
                format!("reading the dump failed after {} bytes: {e}", fed.bytes)
            }
        })?;
        if d.len.is_some_and(|n| n != fed.bytes)
            || d.sha256.as_ref().is_some_and(|s| *s != fed.sha256)
        {
            return Err(format!(
                "the dump read is not the one sent: {} bytes with SHA-256 {}, the host said {} \
                 bytes with SHA-256 {}",
                fed.bytes,
                fed.sha256,
                d.len.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
                d.sha256.as_deref().unwrap_or("?")
            ));
        }
        Ok(fed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn what_passes_is_counted_and_hashed() {
        let mut r = Hashing::new(&b"hello dump"[..]);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        let d = r.digest();
        assert_eq!(d.bytes, 10);
        assert_eq!(d.sha256, hex(&Sha256::digest(b"hello dump")));
    }

    #[test]
    fn a_dump_that_is_not_what_the_host_said_fails() {
        let d = Download {
            body: Box::new(&b"abc"[..]),
            len: Some(4),
            sha256: None,
        };
        let e = feed(d, Vec::new()).join().unwrap().unwrap_err();
        assert!(e.contains("is not the one sent"), "{e}");
        let ok = Download {
            body: Box::new(&b"abc"[..]),
            len: Some(3),
            sha256: Some(hex(&Sha256::digest(b"abc"))),
        };
        assert_eq!(feed(ok, Vec::new()).join().unwrap().unwrap().bytes, 3);
    }
}
