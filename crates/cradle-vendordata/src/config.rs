//! `[[vendordata.dynamic]]` entries, their validation, and the HTTP client
//! each one gets.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::token::TokenFile;

/// Default `connect_timeout`, seconds.
pub const DEFAULT_CONNECT_TIMEOUT: u64 = 5;
/// Default `read_timeout`, seconds.
pub const DEFAULT_READ_TIMEOUT: u64 = 5;
/// Default `max_response_bytes`: 1 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Default `cache_ttl`, seconds.
pub const DEFAULT_CACHE_TTL: u64 = 300;
/// The name the static vendordata has in `vendor_data2.json`; no dynamic
/// target may take it.
pub const RESERVED_NAME: &str = "static";

/// One `[[vendordata.dynamic]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Key in `vendor_data2.json`; must not be `"static"`.
    pub name: String,
    /// `http://` or `https://` URL the instance's details are POSTed to.
    pub url: String,
    /// Seconds allowed to establish a connection (TCP and TLS).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: u64,
    /// Seconds within which the whole response (status, headers and body)
    /// must have arrived, counted from when the request is started; a
    /// connection that has to be made first counts against it too.
    #[serde(default = "default_read_timeout")]
    pub read_timeout: u64,
    /// What a failure of this target does to the guest's metadata.
    #[serde(default)]
    pub failure: Failure,
    /// Largest response body accepted, in bytes.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Seconds a response is cached when it carries no `Cache-Control:
    /// max-age`; 0 disables caching for this target altogether.
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl: u64,
    /// Seconds past its expiry that a cached entry may still be served when
    /// refreshing it fails; 0 = never.
    #[serde(default)]
    pub stale_if_error: u64,
    /// File holding the service token, sent as `X-Auth-Token`. Re-read
    /// whenever the file changes (mtime, length or inode), so rotating it
    /// needs no restart; write the new one atomically (rename over).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// PEM CA bundle that replaces the built-in roots for `https` URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain, presented when the server asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
}

impl TargetConfig {
    /// A target with every optional setting at its default.
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> Self {
        TargetConfig {
            name: name.into(),
            url: url.into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            failure: Failure::default(),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            cache_ttl: DEFAULT_CACHE_TTL,
            stale_if_error: 0,
            token_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
        }
    }
}

fn default_connect_timeout() -> u64 {
    DEFAULT_CONNECT_TIMEOUT
}
fn default_read_timeout() -> u64 {
    DEFAULT_READ_TIMEOUT
}
fn default_max_response_bytes() -> usize {
    DEFAULT_MAX_RESPONSE_BYTES
}
fn default_cache_ttl() -> u64 {
    DEFAULT_CACHE_TTL
}

/// What a failed target does to the guest's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Failure {
    /// The target's entry is `{}`; the rest is served (Nova's default).
    #[default]
    Soft,
    /// The whole `vendor_data2.json` fails (Nova's
    /// `vendordata_dynamic_failure_fatal`).
    Fatal,
}

/// A target that cannot be used as configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("vendordata target {target:?}: {field}: {message}")]
pub struct ConfigError {
    /// The target's `name`.
    pub target: String,
    /// The offending setting, e.g. `"ca_file"`.
    pub field: &'static str,
    pub message: String,
}

/// A validated target: its URL, client and token source.
pub(crate) struct Built {
    pub url: Url,
    pub client: reqwest::Client,
    pub token: Option<TokenFile>,
}

/// Checks that apply across targets: unique names.
pub(crate) fn check_names(targets: &[TargetConfig]) -> Result<(), ConfigError> {
    let mut seen = BTreeSet::new();
    for t in targets {
        if !seen.insert(t.name.as_str()) {
            return Err(ConfigError {
                target: t.name.clone(),
                field: "name",
                message: "used by more than one target".to_string(),
            });
        }
    }
    Ok(())
}

/// Validate one target and build its client.
pub(crate) fn build(cfg: &TargetConfig) -> Result<Built, ConfigError> {
    let err = |field: &'static str, message: String| ConfigError {
        target: cfg.name.clone(),
        field,
        message,
    };

    if cfg.name.is_empty() {
        return Err(err("name", "must not be empty".into()));
    }
    if cfg.name == RESERVED_NAME {
        return Err(err(
            "name",
            format!("{RESERVED_NAME:?} is reserved for the static vendordata"),
        ));
    }

    let url = Url::parse(&cfg.url).map_err(|e| err("url", format!("not a valid URL: {e}")))?;
    let https = match url.scheme() {
        "https" => true,
        "http" => false,
        other => {
            return Err(err(
                "url",
                format!("scheme must be http or https, not {other:?}"),
            ));
        }
    };
    if url.host_str().is_none_or(str::is_empty) {
        return Err(err("url", "has no host".into()));
    }

    for (field, secs) in [
        ("connect_timeout", cfg.connect_timeout),
        ("read_timeout", cfg.read_timeout),
    ] {
        if secs == 0 {
            return Err(err(field, "must be at least 1 second".into()));
        }
    }
    if cfg.max_response_bytes == 0 {
        return Err(err("max_response_bytes", "must be at least 1".into()));
    }

    let token = match &cfg.token_file {
        Some(path) => {
            let token = TokenFile::new(path.clone());
            token.get().map_err(|e| err("token_file", e))?;
            Some(token)
        }
        None => None,
    };

    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(Duration::from_secs(cfg.connect_timeout))
        .redirect(reqwest::redirect::Policy::none())
        // Vendordata servers are internal services: no HTTP(S)_PROXY detour.
        .no_proxy();

    if let Some(path) = &cfg.ca_file {
        if !https {
            return Err(err("ca_file", "is set but url is not https".into()));
        }
        let certs = read_certs(path).map_err(|e| err("ca_file", e))?;
        let mut store = rustls::RootCertStore::empty();
        builder = builder.tls_built_in_root_certs(false);
        for (i, cert) in certs.into_iter().enumerate() {
            store.add(cert.clone()).map_err(|e| {
                err(
                    "ca_file",
                    format!(
                        "{}: certificate {} is not usable as a root: {e}",
                        path.display(),
                        i + 1
                    ),
                )
            })?;
            let cert = reqwest::Certificate::from_der(&cert)
                .map_err(|e| err("ca_file", format!("{}: {e}", path.display())))?;
            builder = builder.add_root_certificate(cert);
        }
    }

    match (&cfg.client_cert, &cfg.client_key) {
        (None, None) => {}
        (Some(_), None) => {
            return Err(err("client_key", "must be set with client_cert".into()));
        }
        (None, Some(_)) => {
            return Err(err("client_cert", "must be set with client_key".into()));
        }
        (Some(cert_path), Some(key_path)) => {
            if !https {
                return Err(err("client_cert", "is set but url is not https".into()));
            }
            builder = builder.identity(identity(cert_path, key_path, &err)?);
        }
    }

    let client = builder
        .build()
        .map_err(|e| err("url", format!("cannot build an HTTP client: {e}")))?;
    Ok(Built { url, client, token })
}

/// Every certificate in a PEM file; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// The client identity from a certificate chain and its key, checked to
/// match so a mix-up shows at startup rather than as handshake failures.
fn identity(
    cert_path: &Path,
    key_path: &Path,
    err: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<reqwest::Identity, ConfigError> {
    let certs = read_certs(cert_path).map_err(|e| err("client_cert", e))?;
    let key_pem = std::fs::read(key_path).map_err(|e| {
        err(
            "client_key",
            format!("cannot read {}: {e}", key_path.display()),
        )
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        err(
            "client_key",
            format!("{}: no usable PEM private key: {e}", key_path.display()),
        )
    })?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
        err(
            "client_key",
            format!("{}: unsupported private key: {e}", key_path.display()),
        )
    })?;
    match rustls::sign::CertifiedKey::new(certs, signing_key).keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(e) => {
            return Err(err(
                "client_key",
                format!(
                    "{} does not belong to {}: {e}",
                    key_path.display(),
                    cert_path.display()
                ),
            ));
        }
    }
    let cert_pem = std::fs::read(cert_path).map_err(|e| {
        err(
            "client_cert",
            format!("cannot read {}: {e}", cert_path.display()),
        )
    })?;
    let mut both = cert_pem;
    both.push(b'\n');
    both.extend_from_slice(&key_pem);
    reqwest::Identity::from_pem(&both).map_err(|e| err("client_cert", format!("{e}")))
}
