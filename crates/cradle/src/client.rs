//! A small blocking client of the admin API, for the CLI verbs.

use anyhow::{Context, Result, bail};
use cradle_model::api::ErrorBody;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde::de::DeserializeOwned;

use crate::ApiArgs;

pub struct Api {
    base: String,
    token: String,
    http: Client,
}

impl Api {
    pub fn new(args: &ApiArgs) -> Result<Self> {
        let token = match (&args.token, &args.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => read_token(f)?,
            (None, None) => read_token(&args.data_dir.join("admin.token")).context(
                "no admin token: pass --token-file, set CRADLE_ADMIN_TOKEN, or run from the directory holding cradle-data/",
            )?,
        };
        let http = Client::builder()
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Api {
            base: args.url.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn send(&self, req: RequestBuilder) -> Result<Response> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .with_context(|| format!("cannot reach the admin API at {}", self.base))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => bail!(
                "{} (HTTP {}, {})",
                b.error.message,
                status.as_u16(),
                b.error.code
            ),
            Err(_) => bail!("the admin API answered HTTP {status}: {text}"),
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        Ok(self.send(self.http.get(self.url(path)))?.json()?)
    }

    pub fn post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        Ok(self
            .send(self.http.post(self.url(path)).json(body))?
            .json()?)
    }

    pub fn patch<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        Ok(self
            .send(self.http.patch(self.url(path)).json(body))?
            .json()?)
    }

    /// `GET path`, its body left to read.
    pub fn open(&self, path: &str) -> Result<Response> {
        self.send(self.http.get(self.url(path)))
    }

    /// Stream the body of `GET path` into `out`; returns the bytes copied.
    pub fn download(&self, path: &str, out: &mut impl std::io::Write) -> Result<u64> {
        let mut resp = self.send(self.http.get(self.url(path)))?;
        resp.copy_to(out).context("the download was cut short")
    }

    /// `PUT path` with no body, for verbs answered with 204 (attach).
    pub fn put(&self, path: &str) -> Result<()> {
        self.send(self.http.put(self.url(path)))?;
        Ok(())
    }

    pub fn delete(&self, path: &str) -> Result<()> {
        self.send(self.http.delete(self.url(path)))?;
        Ok(())
    }
}

fn read_token(path: &std::path::Path) -> Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the admin token from {}", path.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(t)
}

/// Percent-encode one path segment (an instance name may hold anything).
pub fn segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
