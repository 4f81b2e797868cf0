//! The start-up contract: once both listeners are bound, `cradle serve`
//! prints one line for each, naming the address it actually got (a server
//! started on port 0 gets one from the kernel). Scripts, tests and benches
//! start it and read those lines; both sides use this module, so the
//! wording lives here only.

use std::net::SocketAddr;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

const ADMIN: &str = "admin API listening on http://";
const METADATA: &str = "metadata service listening on http://";

/// The line `serve` prints for the admin API.
pub fn admin_line(addr: SocketAddr) -> String {
    format!("{ADMIN}{addr}")
}

/// The line `serve` prints for the metadata service.
pub fn metadata_line(addr: SocketAddr) -> String {
    format!("{METADATA}{addr}")
}

/// Where a server said it listens, as its lines arrive.
#[derive(Debug, Default, Clone, Copy)]
pub struct Announced {
    pub admin: Option<SocketAddr>,
    pub metadata: Option<SocketAddr>,
}

/// Both addresses, once announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listening {
    pub admin: SocketAddr,
    pub metadata: SocketAddr,
}

impl Listening {
    /// The admin API's base URL.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// The metadata service's base URL.
    pub fn metadata_url(&self) -> String {
        format!("http://{}", self.metadata)
    }
}

impl Announced {
    /// Take one line of the server's standard output; other lines are
    /// ignored. Both addresses, once both have come.
    pub fn feed(&mut self, line: &str) -> Option<Listening> {
        let line = line.trim_end();
        if let Some(a) = line.strip_prefix(ADMIN).and_then(|a| a.parse().ok()) {
            self.admin = Some(a);
        } else if let Some(a) = line.strip_prefix(METADATA).and_then(|a| a.parse().ok()) {
            self.metadata = Some(a);
        }
        Some(Listening {
            admin: self.admin?,
            metadata: self.metadata?,
        })
    }
}

/// Both addresses from a starting server's standard output, its lines
/// arriving on `lines`, if they come within `within`. Lines after them are
/// left on `lines`.
pub fn wait(lines: &Receiver<String>, within: Duration) -> Option<Listening> {
    let deadline = Instant::now() + within;
    let mut seen = Announced::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Some(both) = seen.feed(&lines.recv_timeout(left).ok()?) {
            return Some(both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lines_serve_prints_are_the_lines_read() {
        let (a, m): (SocketAddr, SocketAddr) = (
            "127.0.0.1:8774".parse().unwrap(),
            "[::1]:80".parse().unwrap(),
        );
        let mut seen = Announced::default();
        assert_eq!(seen.feed("something else"), None);
        assert_eq!(seen.feed(&admin_line(a)), None);
        let both = seen.feed(&format!("{}\n", metadata_line(m))).unwrap();
        assert_eq!((both.admin, both.metadata), (a, m));
        assert_eq!(both.admin_url(), "http://127.0.0.1:8774");
        assert_eq!(both.metadata_url(), "http://[::1]:80");
    }

    #[test]
    fn waiting_ends_at_both_lines_or_the_deadline() {
        let (tx, rx) = std::sync::mpsc::channel();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        for l in ["compiling", &admin_line(a), &metadata_line(a), "after"] {
            tx.send(l.to_string()).unwrap();
        }
        assert_eq!(wait(&rx, Duration::from_secs(5)).unwrap().admin, a);
        assert_eq!(rx.recv().unwrap(), "after");
        assert!(wait(&rx, Duration::from_millis(50)).is_none());
    }
}
