//! Fetching a package from its URL (`http`, `https` or `file`) into a
//! private temporary file, streamed, under the compressed-size cap, with
//! TLS verified (rustls with the webpki roots), at most 5 redirects, and
//! optional HTTP credentials that are used for this one request and never
//! logged, stored or put into an error.
//!
//! The temporary file has no name: it vanishes when the returned
//! [`Fetched`] is dropped or the process dies, whatever happened, so
//! nothing of the package stays on the host.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::Error;

/// How to authenticate the download. Debug never shows the values.
#[derive(Clone, Default)]
pub enum Credentials {
    #[default]
    None,
    Basic {
        user: String,
        password: String,
    },
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credentials::None => "None",
            Credentials::Basic { .. } => "Basic(<redacted>)",
            Credentials::Bearer(_) => "Bearer(<redacted>)",
        })
    }
}

impl Credentials {
    /// An instance's download credentials, from its secret parameters
    /// (names matched as OS scripts see them, ignoring case).
    pub fn of(params: &cradle_model::OsParams) -> Credentials {
        use cradle_model::personalization::{PASSWORD_PARAM, TOKEN_PARAM, USER_PARAM};
        let get = |name: &str| {
            params
                .secret
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.expose().clone())
        };
        match (get(USER_PARAM), get(PASSWORD_PARAM), get(TOKEN_PARAM)) {
            (Some(user), Some(password), _) => Credentials::Basic { user, password },
            (_, _, Some(token)) => Credentials::Bearer(token),
            _ => Credentials::None,
        }
    }
}

/// A downloaded package: an anonymous temporary file (`O_TMPFILE`, or
/// unlinked as soon as it is made), so no name of it ever exists and it is
/// gone when the last descriptor closes, even if cradle is killed.
pub struct Fetched {
    file: std::fs::File,
    path: std::path::PathBuf,
    pub bytes: u64,
    pub sha256: String,
}

impl Fetched {
    /// A path that opens the package while this value lives
    /// (`/proc/self/fd/N`), for the functions that take a path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The package as an open file, rewound to its start.
    pub fn into_file(mut self) -> std::io::Result<std::fs::File> {
        use std::io::Seek;
        self.file.rewind()?;
        Ok(self.file)
    }
}

/// Bytes received so far, and the total when the server said it.
pub type Progress<'a> = &'a mut dyn FnMut(u64, Option<u64>);

/// Download `url` into a temporary file. `max_bytes` caps the download;
/// `sha256`, when given, pins the content (hex, any case).
pub fn fetch(
    url: &str,
    credentials: &Credentials,
    max_bytes: u64,
    sha256: Option<&str>,
) -> Result<Fetched, Error> {
    fetch_with_progress(url, credentials, max_bytes, sha256, &mut |_, _| {})
}

/// [`fetch`], reporting progress as the bytes arrive.
pub fn fetch_with_progress(
    url: &str,
    credentials: &Credentials,
    max_bytes: u64,
    sha256: Option<&str>,
    progress: Progress<'_>,
) -> Result<Fetched, Error> {
    let err = |reason: String| Error::Fetch {
        url: redact(url),
        reason,
    };
    if let Err(why) = cradle_model::personalization::check_url(url) {
        return Err(err(why));
    }
    let (mut body, expected): (Box<dyn Read>, Option<u64>) =
        if let Some(path) = url.strip_prefix("file://") {
            let f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
            let len = f.metadata().ok().map(|m| m.len());
            (Box::new(f), len)
        } else {
            // check_url let only http and https through to here.
            let client = reqwest::blocking::Client::builder()
                .redirect(reqwest::redirect::Policy::limited(5))
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(3600))
                .build()
                .map_err(|e| err(format!("cannot build an HTTP client: {e}")))?;
            let mut req = client.get(url);
            req = match credentials {
                Credentials::None => req,
                Credentials::Basic { user, password } => req.basic_auth(user, Some(password)),
                Credentials::Bearer(t) => req.bearer_auth(t),
            };
            // reqwest's errors name the URL, never the credentials.
            let resp = req.send().map_err(|e| err(describe(&e)))?;
            let status = resp.status();
            if !status.is_success() {
                return Err(err(format!("the server answered {status}")));
            }
            let len = resp.content_length();
            (Box::new(resp), len)
        };
    receive(
        &mut body,
        expected,
        &redact(url),
        max_bytes,
        sha256,
        progress,
    )
}

/// Stream `body` into an anonymous temporary file: under `max_bytes`
/// (refused at once when `expected` says it is over), hashed as it
/// arrives, checked against `sha256` when given, and refused when it ends
/// short of `expected`. `source` names it in errors (never with
/// credentials). [`fetch`] uses it; so does anything else that receives a
/// package, such as a client of the admin API.
pub fn receive(
    body: &mut dyn Read,
    expected: Option<u64>,
    source: &str,
    max_bytes: u64,
    sha256: Option<&str>,
    progress: Progress<'_>,
) -> Result<Fetched, Error> {
    let err = |reason: String| Error::Fetch {
        url: source.to_string(),
        reason,
    };
    if let Some(len) = expected
        && len > max_bytes
    {
        return Err(Error::Limit(format!(
            "the package is {len} bytes, over the {max_bytes}-byte cap"
        )));
    }
    let mut file = tempfile::tempfile().map_err(|source| Error::Io {
        what: "cannot create a temporary file".into(),
        source,
    })?;
    let mut hash = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = body
            .read(&mut buf)
            .map_err(|e| err(format!("download cut short: {e}")))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > max_bytes {
            return Err(Error::Limit(format!(
                "the package is over the {max_bytes}-byte cap"
            )));
        }
        progress(total, expected);
        hash.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(|source| Error::Io {
            what: "cannot write the temporary file".into(),
            source,
        })?;
    }
    if let Some(len) = expected
        && len != total
    {
        return Err(err(format!("download cut short: {total} of {len} bytes")));
    }
    file.flush().map_err(|source| Error::Io {
        what: "cannot write the temporary file".into(),
        source,
    })?;
    let got = hex(&hash.finalize());
    if let Some(want) = sha256
        && let Some(why) = pin_mismatch(&got, want)
    {
        return Err(err(why));
    }
    let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    Ok(Fetched {
        file,
        path,
        bytes: total,
        sha256: got,
    })
}

/// An HTTP error in words, without a URL (the caller names it, redacted).
fn describe(e: &reqwest::Error) -> String {
    if e.is_redirect() {
        "too many redirects (more than 5)".into()
    } else if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        format!("cannot connect: {}", e.without_url_ref())
    } else {
        e.without_url_ref()
    }
}

trait WithoutUrl {
    fn without_url_ref(&self) -> String;
}

impl WithoutUrl for reqwest::Error {
    fn without_url_ref(&self) -> String {
        let mut s = self.to_string();
        if let Some(u) = self.url() {
            s = s.replace(u.as_str(), "");
        }
        let mut src = std::error::Error::source(self);
        while let Some(e) = src {
            s.push_str(&format!(": {e}"));
            src = e.source();
        }
        s
    }
}

/// The URL without any user:password in it.
fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (auth, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match auth.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://<redacted>@{host}{tail}"),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

/// Check a local package against a pinned SHA-256, reading it once.
pub fn check_sha256(path: &std::path::Path, want: &str) -> Result<(), Error> {
    let mut f = std::fs::File::open(path).map_err(|source| Error::Io {
        what: format!("cannot open {}", path.display()),
        source,
    })?;
    let mut hash = Sha256::new();
    std::io::copy(&mut f, &mut hash).map_err(|source| Error::Io {
        what: format!("cannot read {}", path.display()),
        source,
    })?;
    let got = hex(&hash.finalize());
    match pin_mismatch(&got, want) {
        Some(why) => Err(Error::Format(format!("{}: {why}", path.display()))),
        None => Ok(()),
    }
}

/// Why `got` is not the pinned `want`, if it is not.
fn pin_mismatch(got: &str, want: &str) -> Option<String> {
    (!want.eq_ignore_ascii_case(got)).then(|| {
        format!(
            "its sha256 is {got}, not the pinned {}",
            want.to_ascii_lowercase()
        )
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
