//! The guest agent's conversation with its host, over the metadata
//! service's channel (`POST /cradle/latest/write`, `GET
//! /cradle/latest/read`): the messages both ends speak, and what the host
//! keeps of them. The agent (`cradle-agent guest`) and the operations layer
//! both use these types, so the two ends cannot drift apart.
//!
//! From the guest, one JSON object per message, tagged by `"agent"`:
//! - `{"agent": "guest", "state": "booting"|"ready"|"failed", ...}`: its
//!   state, sent when it changes and again as a heartbeat;
//! - `{"agent": "host_keys", "keys": ["ssh-ed25519 AAAA…", …]}`: the
//!   guest's SSH host public keys;
//! - `{"agent": "action_result", "id", "action", "exit_code", "output",
//!   "truncated"}`: what an action the operator sent did;
//! - `{"agent": "action_refused", "id", "action", "reason"}`: an action
//!   the agent's baked configuration does not name.
//!
//! To the guest: `{"agent": "run", "id": "…", "action": "NAME"}`.
//!
//! The install appliance's own messages (`progress`, `log`, `status`)
//! share the tag but none of these values.

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use time::OffsetDateTime;
use uuid::Uuid;

/// The longest action name.
pub const MAX_ACTION_NAME: usize = 64;
/// The most output an action result carries (its last bytes).
pub const MAX_ACTION_OUTPUT: usize = 32 * 1024;
/// The most host keys a guest may publish.
pub const MAX_HOST_KEYS: usize = 8;
/// The longest text field (version, kernel, OS release, reason) kept.
pub const MAX_FIELD: usize = 512;

/// The agent's state, as it reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    Booting,
    Ready,
    Failed,
}

impl AgentState {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Booting => "booting",
            AgentState::Ready => "ready",
            AgentState::Failed => "failed",
        }
    }
}

/// A message from the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "agent", rename_all = "snake_case", deny_unknown_fields)]
pub enum FromAgent {
    Guest {
        state: AgentState,
        #[serde(default)]
        version: String,
        #[serde(default)]
        kernel: String,
        #[serde(default)]
        os_release: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    HostKeys {
        keys: Vec<String>,
    },
    ActionResult {
        id: Uuid,
        action: String,
        exit_code: i32,
        #[serde(default)]
        output: String,
        #[serde(default)]
        truncated: bool,
    },
    ActionRefused {
        id: Uuid,
        action: String,
        reason: String,
    },
}

/// A message to the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "agent", rename_all = "snake_case")]
pub enum ToAgent {
    Run { id: Uuid, action: String },
}

impl FromAgent {
    /// The message, when `body` is one of the guest agent's. `Ok(None)`:
    /// not the guest agent's (no `agent` tag of its kinds); an error: it
    /// claims to be one and is malformed.
    pub fn parse(body: &[u8]) -> Result<Option<FromAgent>, String> {
        // A `Cow`, not a `&str`: a tag written with an escape
        // (`"gu\u0065st"`) cannot be borrowed, and must not pass for the
        // operator's message because of it.
        #[derive(Deserialize)]
        struct Tag<'a> {
            #[serde(borrow)]
            agent: Option<std::borrow::Cow<'a, str>>,
        }
        let Ok(tag) = serde_json::from_slice::<Tag>(body) else {
            return Ok(None);
        };
        match tag.agent.as_deref() {
            Some("guest" | "host_keys" | "action_result" | "action_refused") => {}
            _ => return Ok(None),
        }
        let m: FromAgent =
            serde_json::from_slice(body).map_err(|e| format!("a malformed agent message: {e}"))?;
        m.check()?;
        Ok(Some(m))
    }

    fn check(&self) -> Result<(), String> {
        let long = |what: &str, v: &str| {
            if v.len() > MAX_FIELD {
                Err(format!("{what} is longer than {MAX_FIELD} bytes"))
            } else {
                Ok(())
            }
        };
        match self {
            FromAgent::Guest {
                version,
                kernel,
                os_release,
                reason,
                ..
            } => {
                long("version", version)?;
                long("kernel", kernel)?;
                long("os_release", os_release)?;
                long("reason", reason.as_deref().unwrap_or(""))
            }
            FromAgent::HostKeys { keys } => {
                if keys.len() > MAX_HOST_KEYS {
                    return Err(format!("more than {MAX_HOST_KEYS} host keys"));
                }
                for k in keys {
                    HostKey::parse(k)?;
                }
                Ok(())
            }
            FromAgent::ActionResult { action, output, .. } => {
                check_action_name(action)?;
                if output.len() > MAX_ACTION_OUTPUT {
                    return Err(format!("output is longer than {MAX_ACTION_OUTPUT} bytes"));
                }
                Ok(())
            }
            FromAgent::ActionRefused { action, reason, .. } => {
                long("action", action)?;
                long("reason", reason)
            }
        }
    }
}

/// An action's name: 1 to 64 of `a-z`, `0-9`, `-`, `_`, `.`, starting with
/// a letter or digit.
pub fn check_action_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_ACTION_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not an action name (1 to {MAX_ACTION_NAME} of a-z, 0-9, '-', '_', '.', \
             starting with a letter or digit)"
        ))
    }
}

/// An SSH public key, as OpenSSH writes it: its type and its base64 blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostKey {
    #[serde(rename = "type")]
    pub kind: String,
    pub key: String,
}

/// The key types a host key may have.
const HOST_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
];

impl HostKey {
    /// `TYPE BASE64 [COMMENT]`: the type must be a host key's, and the blob
    /// must decode and name the same type.
    pub fn parse(line: &str) -> Result<HostKey, String> {
        let mut words = line.split_ascii_whitespace();
        let (Some(kind), Some(key)) = (words.next(), words.next()) else {
            return Err(format!("{:?} is not TYPE BASE64", cut(line)));
        };
        if !HOST_KEY_TYPES.contains(&kind) {
            return Err(format!("{:?} is not an SSH host key type", cut(kind)));
        }
        let blob = base64::engine::general_purpose::STANDARD
            .decode(key)
            .map_err(|_| format!("the {kind} key is not base64"))?;
        let named = blob
            .get(..4)
            .map(|n| u32::from_be_bytes(n.try_into().unwrap()) as usize)
            .and_then(|n| blob.get(4..4 + n));
        if named != Some(kind.as_bytes()) {
            return Err(format!("the {kind} key's blob does not name its type"));
        }
        Ok(HostKey {
            kind: kind.to_string(),
            key: key.to_string(),
        })
    }

    /// `SHA256:` and the unpadded base64 of the blob's SHA-256, as
    /// `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        let blob = base64::engine::general_purpose::STANDARD
            .decode(&self.key)
            .unwrap_or_default();
        let digest = sha2::Sha256::digest(&blob);
        format!(
            "SHA256:{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
        )
    }
}

fn cut(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// What the host keeps of an instance's agent (stored with the instance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentRecord {
    pub state: AgentState,
    pub version: String,
    pub kernel: String,
    pub os_release: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the state last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    #[serde(default)]
    pub host_keys: Vec<HostKey>,
}

/// The agent as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentView {
    pub state: AgentState,
    pub version: String,
    pub kernel: String,
    pub os_release: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the state last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// When the agent was last heard from (a heartbeat or any message), as
    /// the serving host knows it; `since` on another host.
    #[serde(with = "time::serde::rfc3339")]
    pub last_heard: OffsetDateTime,
    pub host_keys: Vec<HostKeyView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostKeyView {
    #[serde(rename = "type")]
    pub kind: String,
    pub key: String,
    pub fingerprint: String,
}

impl AgentView {
    /// The view of `r`; the serving host sets `last_heard` from its memory.
    pub fn of(r: &AgentRecord) -> AgentView {
        AgentView {
            state: r.state,
            version: r.version.clone(),
            kernel: r.kernel.clone(),
            os_release: r.os_release.clone(),
            reason: r.reason.clone(),
            since: r.since,
            last_heard: r.since,
            host_keys: r
                .host_keys
                .iter()
                .map(|k| HostKeyView {
                    kind: k.kind.clone(),
                    key: k.key.clone(),
                    fingerprint: k.fingerprint(),
                })
                .collect(),
        }
    }
}

/// Where an operator's action is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ActionState {
    /// Queued for the guest; no answer yet.
    Sent,
    /// The agent ran it: `exit_code` and `output` say how it went.
    Done,
    /// The agent's configuration does not name it.
    Refused,
}

/// `POST /v1/instances/{key}/actions`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    pub action: String,
}

/// An action sent to an instance's agent, and what came of it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ActionView {
    pub id: Uuid,
    pub instance: Uuid,
    pub action: String,
    pub state: ActionState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// The output is its last bytes only.
    #[serde(default)]
    pub truncated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub sent_at: OffsetDateTime,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub finished_at: Option<OffsetDateTime>,
}

#[cfg(test)]
mod tests {
    use super::*;

    // ssh-keygen -t ed25519 -f k -N '' -C c, and what ssh-keygen -lf k.pub says.
    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAII8YXbZL7dcZ0XnNBF+a6VSFD42WTNtCZwsP+HMRa/7l c";
    const FINGERPRINT: &str = "SHA256:gJ13643HWrBJ8mejWK57SZiJvl+Pj6Mak7p9bwLEWS0";

    #[test]
    fn host_keys_are_checked_and_fingerprinted() {
        let k = HostKey::parse(KEY).unwrap();
        assert_eq!(k.kind, "ssh-ed25519");
        assert_eq!(k.fingerprint(), FINGERPRINT);
        assert!(
            HostKey::parse("ssh-dss AAAA")
                .unwrap_err()
                .contains("not an SSH host key type")
        );
        assert!(
            HostKey::parse("ssh-ed25519 !!")
                .unwrap_err()
                .contains("not base64")
        );
        // A blob that names another type.
        let rsa = KEY.replace("ssh-ed25519 ", "ssh-rsa ");
        assert!(
            HostKey::parse(&rsa)
                .unwrap_err()
                .contains("does not name its type")
        );
    }

    #[test]
    fn only_the_guest_agents_messages_are_taken() {
        assert_eq!(FromAgent::parse(b"hello").unwrap(), None);
        assert_eq!(
            FromAgent::parse(br#"{"agent":"progress","step":"x"}"#).unwrap(),
            None
        );
        assert_eq!(FromAgent::parse(br#"{"other":1}"#).unwrap(), None);
        let m = FromAgent::parse(br#"{"agent":"guest","state":"ready","version":"1"}"#)
            .unwrap()
            .unwrap();
        assert!(matches!(
            m,
            FromAgent::Guest {
                state: AgentState::Ready,
                ..
            }
        ));
        let e = FromAgent::parse(br#"{"agent":"guest","state":"dancing"}"#).unwrap_err();
        assert!(e.contains("malformed"), "{e}");
        let e = FromAgent::parse(br#"{"agent":"host_keys","keys":["ssh-dss AAAA"]}"#).unwrap_err();
        assert!(e.contains("host key type"), "{e}");
    }

    #[test]
    fn action_names_are_checked() {
        for ok in ["uptime", "restart-nginx", "a.b_c", "0"] {
            check_action_name(ok).unwrap();
        }
        for bad in ["", "-x", "Upper", "a b", "a/b", &"x".repeat(65)] {
            assert!(check_action_name(bad).is_err(), "{bad}");
        }
    }
}
