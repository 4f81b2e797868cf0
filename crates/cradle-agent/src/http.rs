//! Plain HTTP to the metadata service, with ureq (no TLS: the service is
//! on a link-local address on the host's side of the tap, and knows the
//! instance by its source address). Every request carries
//! `Metadata-Flavor: cradle`, without which the native namespace answers
//! nothing.
//!
//! Every request connects within [`CONNECT_TIMEOUT`] and gets each read
//! within [`READ_TIMEOUT`] (a stalled download fails, a slow one does
//! not). No redirect is followed and no proxy is read from anywhere.
//! Answers are read under a size cap; a 404 is an answer (`None`), any
//! other status past 299 an error that names the URL and the status.

use std::io::Read;
use std::net::SocketAddrV4;
use std::path::Path;
use std::time::{Duration, Instant};

use cradle_model::answers::{METADATA_FLAVOR, METADATA_FLAVOR_HEADER};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Between two tries of a request that is retried.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Why a request failed.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    /// Worth trying again: no connection, a timeout, 429 or a 5xx.
    pub transient: bool,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<Failure> for String {
    fn from(f: Failure) -> String {
        f.message
    }
}

/// A body read as it comes, its `Content-Length` and one header's value.
pub type Streamed = (Box<dyn Read + Send>, Option<u64>, Option<String>);

/// A document that changed: its body and its new ETag.
pub type Changed = (Vec<u8>, Option<String>);

#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    service: SocketAddrV4,
}

impl Client {
    pub fn new(service: SocketAddrV4) -> Client {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout_read(READ_TIMEOUT)
            .timeout_write(READ_TIMEOUT)
            .redirects(0)
            .build();
        Client {
            agent,
            base: format!("http://{service}"),
            service,
        }
    }

    /// The metadata service's address.
    pub fn service(&self) -> SocketAddrV4 {
        self.service
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET `path`: `None` on 404.
    fn get(&self, path: &str) -> Result<Option<ureq::Response>, Failure> {
        let url = self.url(path);
        match self
            .agent
            .get(&url)
            .set(METADATA_FLAVOR_HEADER, METADATA_FLAVOR)
            .call()
        {
            Ok(r) => success("GET", &url, r).map(Some),
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(failure("GET", &url, e)),
        }
    }

    /// GET `path` whole, refusing more than `max` bytes; `None` on 404.
    pub fn get_bytes(&self, path: &str, max: u64) -> Result<Option<Vec<u8>>, Failure> {
        let Some(r) = self.get(path)? else {
            return Ok(None);
        };
        read_capped(r, &self.url(path), max).map(Some)
    }

    /// [`Client::get_bytes`], tried again for up to `within` while it
    /// fails for a reason that may pass (the link coming up, the service
    /// busy).
    pub fn get_bytes_retrying(
        &self,
        path: &str,
        max: u64,
        within: Duration,
    ) -> Result<Option<Vec<u8>>, Failure> {
        let until = Instant::now() + within;
        loop {
            match self.get_bytes(path, max) {
                Err(f) if f.transient && Instant::now() + RETRY_PAUSE < until => {
                    std::thread::sleep(RETRY_PAUSE);
                }
                other => return other,
            }
        }
    }

    /// GET `path` into the file `dest` (made with mode 0600), refusing
    /// more than `max` bytes. Returns the size. A 404 is an error here.
    pub fn get_to_file(&self, path: &str, dest: &Path, max: u64) -> Result<u64, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let url = self.url(path);
        let r = self
            .get(path)?
            .ok_or_else(|| format!("GET {url}: 404 Not Found"))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dest)
            .map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
        let n = std::io::copy(&mut r.into_reader().take(max + 1), &mut file)
            .map_err(|e| format!("GET {url} into {}: {e}", dest.display()))?;
        if n > max {
            let _ = std::fs::remove_file(dest);
            return Err(format!("GET {url}: the answer is larger than {max} bytes"));
        }
        Ok(n)
    }

    /// GET `path` unless it still has the ETag `etag`: `Ok(None)` when it
    /// does (304); otherwise its body (at most `max` bytes) and its ETag.
    /// A 404 is an error here.
    pub fn get_changed(
        &self,
        path: &str,
        etag: Option<&str>,
        max: u64,
    ) -> Result<Option<Changed>, Failure> {
        let url = self.url(path);
        let mut req = self
            .agent
            .get(&url)
            .set(METADATA_FLAVOR_HEADER, METADATA_FLAVOR);
        if let Some(t) = etag {
            req = req.set("If-None-Match", t);
        }
        let r = req.call().map_err(|e| failure("GET", &url, e))?;
        if r.status() == 304 {
            return Ok(None);
        }
        let r = success("GET", &url, r)?;
        let tag = r.header("ETag").map(str::to_string);
        Ok(Some((read_capped(r, &url, max)?, tag)))
    }

    /// Take the oldest message the host queued (`GET /cradle/latest/read`):
    /// `None` when there is none (204).
    pub fn read(&self, max: u64) -> Result<Option<Vec<u8>>, Failure> {
        let path = "/cradle/latest/read";
        let url = self.url(path);
        let r = self
            .agent
            .get(&url)
            .set(METADATA_FLAVOR_HEADER, METADATA_FLAVOR)
            .call()
            .map_err(|e| failure("GET", &url, e))?;
        let r = success("GET", &url, r)?;
        if r.status() == 204 {
            return Ok(None);
        }
        read_capped(r, &url, max).map(Some)
    }

    /// GET `path` to read as it comes: the body, and the values of the
    /// `Content-Length` and `header` headers. A 404 is an error here.
    pub fn get_stream(&self, path: &str, header: &str) -> Result<Streamed, Failure> {
        let url = self.url(path);
        let r = self.get(path)?.ok_or_else(|| Failure {
            message: format!("GET {url}: 404 Not Found"),
            transient: false,
        })?;
        let len = r.header("Content-Length").and_then(|v| v.parse().ok());
        let value = r.header(header).map(str::to_string);
        Ok((r.into_reader(), len, value))
    }

    /// POST `body` (one JSON object) to `/cradle/latest/write`.
    pub fn write(&self, body: &str) -> Result<(), Failure> {
        let url = self.url("/cradle/latest/write");
        self.agent
            .post(&url)
            .set(METADATA_FLAVOR_HEADER, METADATA_FLAVOR)
            .set("Content-Type", "application/json")
            .send_string(body)
            .map_err(|e| failure("POST", &url, e))
            .and_then(|r| success("POST", &url, r))
            .map(|_| ())
    }

    /// [`Client::write`], tried again for up to `within` until the service
    /// takes it (any failure is tried again: the message matters more than
    /// the reason).
    pub fn write_retrying(&self, body: &str, within: Duration) -> Result<(), Failure> {
        let until = Instant::now() + within;
        loop {
            match self.write(body) {
                Err(_) if Instant::now() + RETRY_PAUSE < until => {
                    std::thread::sleep(RETRY_PAUSE);
                }
                other => return other,
            }
        }
    }
}

/// The body of `r` (from `url`), refused past `max` bytes.
fn read_capped(r: ureq::Response, url: &str, max: u64) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    r.into_reader()
        .take(max + 1)
        .read_to_end(&mut body)
        .map_err(|e| Failure {
            message: format!("GET {url}: {e}"),
            transient: true,
        })?;
    if body.len() as u64 > max {
        return Err(Failure {
            message: format!("GET {url}: the answer is larger than {max} bytes"),
            transient: false,
        });
    }
    Ok(body)
}

/// The response, if it is a 2xx: ureq hands over the rest below 400 (a
/// redirect it was told not to follow) as if they were fine.
fn success(method: &str, url: &str, r: ureq::Response) -> Result<ureq::Response, Failure> {
    if (200..300).contains(&r.status()) {
        return Ok(r);
    }
    Err(Failure {
        message: format!("{method} {url}: HTTP {} {}", r.status(), r.status_text()),
        transient: false,
    })
}

fn failure(method: &str, url: &str, e: ureq::Error) -> Failure {
    match e {
        ureq::Error::Status(code, r) => {
            let text = r.status_text().to_string();
            // The service's error bodies are one short line of text.
            let mut body = String::new();
            let _ = r.into_reader().take(200).read_to_string(&mut body);
            let body = body.trim();
            Failure {
                message: if body.is_empty() {
                    format!("{method} {url}: HTTP {code} {text}")
                } else {
                    format!("{method} {url}: HTTP {code} {text}: {body}")
                },
                transient: code == 429 || code >= 500,
            }
        }
        // ureq names the URL itself when it has parsed it.
        ureq::Error::Transport(t) => Failure {
            message: if t.url().is_some() {
                format!("{method} {t}")
            } else {
                format!("{method} {url}: {t}")
            },
            transient: true,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    /// A service on 127.0.0.1 answering each path with a fixed status and
    /// body.
    fn service(answers: &'static [(&'static str, u16, &'static str)]) -> Client {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let std::net::SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let mut conn = conn.unwrap();
                let mut request = String::new();
                BufReader::new(&conn).read_line(&mut request).unwrap();
                let path = request.split_whitespace().nth(1).unwrap().to_string();
                let (_, code, body) = answers
                    .iter()
                    .find(|(p, _, _)| *p == path)
                    .copied()
                    .unwrap_or(("", 404, "404 Not Found"));
                let _ = write!(
                    conn,
                    "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Client::new(addr)
    }

    #[test]
    fn answers_are_told_apart() {
        let c = service(&[
            ("/doc", 200, "{}"),
            ("/big", 200, "0123456789"),
            ("/busy", 503, "try later"),
            ("/moved", 301, ""),
        ]);
        assert_eq!(c.get_bytes("/doc", 10).unwrap().unwrap(), b"{}");
        assert_eq!(c.get_bytes("/nothing", 10).unwrap(), None);
        let e = c.get_bytes("/big", 9).unwrap_err();
        assert!(
            e.message
                .ends_with("/big: the answer is larger than 9 bytes"),
            "{e}"
        );
        assert!(!e.transient);
        let e = c.get_bytes("/busy", 10).unwrap_err();
        assert!(e.message.ends_with("/busy: HTTP 503 X: try later"), "{e}");
        assert!(e.transient);
        let e = c.get_bytes("/moved", 10).unwrap_err();
        assert!(e.message.ends_with("/moved: HTTP 301 X"), "{e}");
        assert!(!e.transient);
        let e = c
            .get_to_file("/nothing", Path::new("/nonexistent/x"), 10)
            .unwrap_err();
        assert!(e.ends_with("/nothing: 404 Not Found"), "{e}");
    }

    #[test]
    fn no_service_is_a_transient_failure() {
        // A port nothing listens on.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let std::net::SocketAddr::V4(addr) = l.local_addr().unwrap() else {
            unreachable!()
        };
        drop(l);
        let e = Client::new(addr).write("{}").unwrap_err();
        assert!(e.transient);
        assert!(e.message.starts_with("POST http://127.0.0.1:"), "{e}");
    }
}
