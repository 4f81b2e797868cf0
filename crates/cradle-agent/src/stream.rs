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

use std::io::{Read, Write};

use cradle_model::answers::STREAM_SHA256_HEADER;
use cradle_model::job::StreamDigest;
use sha2::{Digest, Sha256};

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

/// Counts and hashes what passes through.
pub struct Hashing<R> {
    inner: R,
    bytes: u64,
    hasher: Sha256,
}

impl<R> Hashing<R> {
    pub fn new(inner: R) -> Hashing<R> {
        Hashing {
            inner,
            bytes: 0,
            hasher: Sha256::new(),
        }
    }

    pub fn digest(self) -> StreamDigest {
        StreamDigest {
            bytes: self.bytes,
            sha256: hex(&self.hasher.finalize()),
        }
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
        let answer = client.put_stream(&path, &mut body);
        let sent = body.digest();
        let answer = answer
            .map_err(|e| format!("uploading the dump failed after {} bytes: {e}", sent.bytes))?;
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
        let copied = std::io::copy(&mut body, &mut stdin);
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
