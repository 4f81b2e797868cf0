//! What the agent tells the host, through `POST /cradle/latest/write`
//! (one JSON object per request, each body under 8 KiB):
//!
//! - `{"agent": "progress", "step": "running create"}` at each step;
//! - `{"agent": "log", "lines": ["...", ...]}`: the script's output
//!   ([`crate::lines`]);
//! - `{"agent": "status", "exit_code": 0, "error": null, "log_tail": "..."}`
//!   once, at the end: the script's exit code (128 + the signal when one
//!   killed it), 0 on success, 1 when the agent itself failed; `error` says
//!   why when it is not 0; `log_tail` is the output's last lines.
//!
//! Progress and log messages are tried for a short while and otherwise
//! given up (said on the console): the install goes on. The status is
//! tried until the service takes it, for up to [`STATUS_RETRY`]. Every
//! step and error is also said on the console; no secret ever is.

use std::time::Duration;

use cradle_model::job::StreamDigest;

use crate::http::Client;
use crate::lines::{MAX_BODY, Tail, cut, log_body};
use crate::system::say;

/// How long the final status is tried.
pub const STATUS_RETRY: Duration = Duration::from_secs(30);
/// How long a progress or log message is tried.
const MESSAGE_RETRY: Duration = Duration::from_secs(5);
/// The longest error text sent.
const MAX_ERROR: usize = 1000;

/// The body of a `progress` message.
pub fn progress_body(step: &str) -> String {
    serde_json::json!({"agent": "progress", "step": step}).to_string()
}

/// The body of the `status` message, the tail cut so the body stays
/// within [`MAX_BODY`].
pub fn status_body(exit_code: i32, error: Option<&str>, tail: &Tail) -> String {
    status_body_with(exit_code, error, tail, None)
}

/// [`status_body`], with the length and SHA-256 of an export's or
/// import's dump as the agent counted them.
pub fn status_body_with(
    exit_code: i32,
    error: Option<&str>,
    tail: &Tail,
    stream: Option<&StreamDigest>,
) -> String {
    let error = error.map(|e| cut(e, MAX_ERROR));
    let body = |log_tail: &str| {
        let mut v = serde_json::json!({
            "agent": "status",
            "exit_code": exit_code,
            "error": error,
            "log_tail": log_tail,
        });
        if let Some(d) = stream {
            v["stream"] = serde_json::json!({"bytes": d.bytes, "sha256": d.sha256});
        }
        v.to_string()
    };
    let room = MAX_BODY.saturating_sub(body("").len());
    body(&tail.text(room))
}

/// Sends messages to the host.
pub struct Reporter<'a> {
    client: &'a Client,
}

impl<'a> Reporter<'a> {
    pub fn new(client: &'a Client) -> Reporter<'a> {
        Reporter { client }
    }

    /// Say `step` on the console and send it to the host.
    pub fn progress(&self, step: &str) {
        say(step);
        if let Err(e) = self
            .client
            .write_retrying(&progress_body(step), MESSAGE_RETRY)
        {
            say(&format!("cannot send progress {step:?} to the host: {e}"));
        }
    }

    /// Send a batch of the script's output lines.
    pub fn log(&self, lines: &[String]) {
        if let Err(e) = self.client.write_retrying(&log_body(lines), MESSAGE_RETRY) {
            say(&format!(
                "cannot send {} output lines to the host: {e}",
                lines.len()
            ));
        }
    }

    /// Send the final status; say on the console whether it arrived.
    pub fn status(
        &self,
        exit_code: i32,
        error: Option<&str>,
        tail: &Tail,
        stream: Option<&StreamDigest>,
    ) {
        match error {
            Some(e) => say(&format!("failed (exit code {exit_code}): {e}")),
            None => say(&format!("finished (exit code {exit_code})")),
        }
        let body = status_body_with(exit_code, error, tail, stream);
        if let Err(e) = self.client.write_retrying(&body, STATUS_RETRY) {
            say(&format!(
                "cannot send the status to the host within {} s: {e}",
                STATUS_RETRY.as_secs()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn progress_is_one_object() {
        let v: Value = serde_json::from_str(&progress_body("running \"create\"")).unwrap();
        assert_eq!(
            v,
            json!({"agent": "progress", "step": "running \"create\""})
        );
    }

    #[test]
    fn status_carries_code_error_and_tail() {
        let mut t = Tail::default();
        t.push("one");
        t.push("two");
        let v: Value =
            serde_json::from_str(&status_body(3, Some("the create script exited 3"), &t)).unwrap();
        assert_eq!(
            v,
            json!({"agent": "status", "exit_code": 3, "error": "the create script exited 3",
                   "log_tail": "one\ntwo"})
        );
        let v: Value = serde_json::from_str(&status_body(0, None, &Tail::default())).unwrap();
        assert_eq!(
            v,
            json!({"agent": "status", "exit_code": 0, "error": null, "log_tail": ""})
        );
    }

    #[test]
    fn status_stays_under_the_body_limit() {
        let mut t = Tail::default();
        for _ in 0..40 {
            // 6 bytes each once escaped.
            t.push(&"\u{1}".repeat(1000));
        }
        let error = "\u{2}".repeat(5000);
        let body = status_body(1, Some(&error), &t);
        assert!(body.len() <= MAX_BODY, "{}", body.len());
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"].as_str().unwrap().len(), MAX_ERROR);
        assert!(!v["log_tail"].as_str().unwrap().is_empty());
    }
}
