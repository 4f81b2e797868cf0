//! One exchange with a vendordata server: the request Nova sends, and the
//! checks that turn anything but a JSON object into a failure reason.

use std::error::Error as StdError;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use cradle_model::{Instance, Os};
use reqwest::header::{ACCEPT, CACHE_CONTROL, CONTENT_TYPE, HeaderMap, HeaderValue, USER_AGENT};
use reqwest::{Client, Url};
use serde_json::{Value, json};

/// `User-Agent` of every request (Nova's is `openstack-nova-vendordata`).
pub const USER_AGENT_VALUE: &str = "cradle-vendordata";

/// What the response's `Cache-Control` says about keeping it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Freshness {
    /// No usable directive: the target's `cache_ttl` applies.
    Default,
    /// `no-store` or `no-cache`: keep nothing.
    NoStore,
    /// `max-age=N`.
    MaxAge(u64),
}

/// The JSON body Nova's `DynamicVendorData` POSTs, field for field.
///
/// - `image-id`: the image, or the OS definition when there is no image.
/// - `user-data`: base64, as Nova stores and sends it.
/// - `boot-roles`: the role names joined with `,`, as Nova keeps them in
///   system metadata (`','.join(context.roles)`); `""` when there are none.
pub(crate) fn request_body(instance: &Instance) -> Value {
    let image = match &instance.os {
        Some(Os::Image(name) | Os::Type(name)) => Some(name.as_str()),
        None => None,
    };
    json!({
        "project-id": instance.project_id,
        "instance-id": instance.id.hyphenated().to_string(),
        "image-id": image,
        "user-data": instance.user_data.as_ref().map(|d| STANDARD.encode(d)),
        "hostname": instance.hostname,
        "metadata": instance.metadata,
        "boot-roles": instance.boot_roles.join(","),
    })
}

/// POST `body` and read the answer: a JSON object of at most `max` bytes.
///
/// No deadline here; the caller puts one around the whole exchange.
pub(crate) async fn exchange(
    client: &Client,
    url: &Url,
    token: Option<HeaderValue>,
    body: Vec<u8>,
    max: usize,
    connect_timeout: u64,
) -> Result<(Value, Freshness), String> {
    let mut request = client
        .post(url.clone())
        .header(CONTENT_TYPE, "application/json")
        .header(ACCEPT, "application/json")
        .header(USER_AGENT, USER_AGENT_VALUE)
        .body(body);
    if let Some(token) = token {
        request = request.header("X-Auth-Token", token);
    }
    let mut response = request
        .send()
        .await
        .map_err(|e| describe(e, connect_timeout))?;

    let status = response.status();
    if !status.is_success() {
        let note = if status.is_redirection() {
            " (redirects are not followed)"
        } else {
            ""
        };
        return Err(format!("upstream answered HTTP {status}{note}"));
    }
    let freshness = cache_control(response.headers());

    let too_large = || format!("response larger than {max} bytes");
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(response.content_length().map_or(0, |n| n as usize).min(max));
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| describe(e, connect_timeout))?
    {
        if buf.len() + chunk.len() > max {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }

    if buf.iter().all(u8::is_ascii_whitespace) {
        return Err("response is empty, not a JSON object".to_string());
    }
    // serde_json's syntax errors give a position, never the input.
    let value: Value =
        serde_json::from_slice(&buf).map_err(|e| format!("response is not JSON: {e}"))?;
    match value {
        Value::Object(_) => Ok((value, freshness)),
        other => Err(format!(
            "response is JSON {}, not an object",
            json_kind(&other)
        )),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Read `Cache-Control`: `no-store`/`no-cache` win over `max-age`.
pub(crate) fn cache_control(headers: &HeaderMap) -> Freshness {
    let mut out = Freshness::Default;
    for value in headers.get_all(CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',') {
            let (name, arg) = match directive.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
                return Freshness::NoStore;
            }
            if name.eq_ignore_ascii_case("max-age")
                && out == Freshness::Default
                && let Some(secs) = arg.and_then(|a| a.parse().ok())
            {
                out = Freshness::MaxAge(secs);
            }
        }
    }
    out
}

/// A reason for a transport error: its cause chain, without the URL (which
/// may carry credentials) and classified, TLS errors first.
fn describe(err: reqwest::Error, connect_timeout: u64) -> String {
    let err = err.without_url();
    if err.is_connect() && err.is_timeout() {
        return format!("cannot connect within {connect_timeout}s (connect_timeout)");
    }
    let mut tls = None;
    let mut chain: Vec<String> = Vec::new();
    let mut cause = err.source();
    while let Some(e) = cause {
        tls = tls.or_else(|| tls_error(e));
        let text = e.to_string();
        // Wrappers often repeat their inner error's text; hyper's
        // "client error (Connect)" adds nothing to what follows it.
        if !text.is_empty()
            && !text.starts_with("client error (")
            && !chain.iter().any(|c| c.contains(&text))
        {
            chain.push(text);
        }
        cause = e.source();
    }
    if let Some(tls) = tls {
        return format!("TLS error: {tls}");
    }
    let detail = if chain.is_empty() {
        err.to_string()
    } else {
        chain.join(": ")
    };
    if err.is_connect() {
        format!("cannot connect: {detail}")
    } else if err.is_body() || err.is_decode() {
        format!("error reading the response: {detail}")
    } else {
        format!("request failed: {detail}")
    }
}

/// The rustls error in `e`, directly or inside (possibly nested)
/// `io::Error`s, whose `source()` skips the error they wrap.
fn tls_error(mut e: &(dyn StdError + 'static)) -> Option<String> {
    loop {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        e = e.downcast_ref::<std::io::Error>()?.get_ref()?;
    }
}

/// How long a response may be served from the cache.
pub(crate) fn ttl(freshness: Freshness, cache_ttl: u64) -> Duration {
    /// Bounds a server's `max-age`, so that adding it to a clock cannot
    /// overflow; entries die with their instance long before.
    const MAX_TTL: u64 = 365 * 24 * 3600;
    let secs = match (cache_ttl, freshness) {
        (0, _) | (_, Freshness::NoStore) => 0,
        (_, Freshness::MaxAge(secs)) => secs,
        (default, Freshness::Default) => default,
    };
    Duration::from_secs(secs.min(MAX_TTL))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn cache_control_directives() {
        assert_eq!(cache_control(&headers(&[])), Freshness::Default);
        assert_eq!(
            cache_control(&headers(&["public, max-age=60"])),
            Freshness::MaxAge(60)
        );
        assert_eq!(
            cache_control(&headers(&["Max-Age=\"7\""])),
            Freshness::MaxAge(7)
        );
        assert_eq!(
            cache_control(&headers(&["max-age=60", "no-store"])),
            Freshness::NoStore
        );
        assert_eq!(cache_control(&headers(&["no-cache"])), Freshness::NoStore);
        assert_eq!(
            cache_control(&headers(&["max-age=soon"])),
            Freshness::Default
        );
    }

    #[test]
    fn ttl_rules() {
        assert_eq!(ttl(Freshness::Default, 300), Duration::from_secs(300));
        assert_eq!(ttl(Freshness::MaxAge(5), 300), Duration::from_secs(5));
        assert_eq!(ttl(Freshness::MaxAge(5), 0), Duration::ZERO);
        assert_eq!(ttl(Freshness::NoStore, 300), Duration::ZERO);
        assert_eq!(
            ttl(Freshness::MaxAge(u64::MAX), 300),
            Duration::from_secs(365 * 24 * 3600)
        );
    }
}
