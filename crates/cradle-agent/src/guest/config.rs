//! The agent's baked configuration, `/etc/cradle/agent.toml` by default:
//! written into the image by `cradle bake` or the diskimage-builder
//! element, never holding a secret (it is a file of the image, which every
//! instance booted from it shares). Every key is optional:
//!
//! ```toml
//! metadata = "169.254.169.254:80"  # when the kernel command line does not say
//! heartbeat = 30                   # seconds between heartbeats
//! poll = 5                         # seconds between looks at metadata and the channel
//! user = "root"                    # whose ~/.ssh/authorized_keys the instance's keys go to; "" for none
//! hostname = true                  # set the hostname from metadata
//! generate_host_keys = true        # make an ed25519 SSH host key when the guest has none
//! action_timeout = 300             # seconds an action may run before it is killed
//! state_dir = "/var/lib/cradle-agent"
//!
//! [actions]                        # the only commands the host may run; none by default
//! uptime = ["/usr/bin/uptime"]
//! restart-nginx = ["/usr/bin/systemctl", "restart", "nginx"]
//! ```
//!
//! An action is an argument vector run as is (no shell), its program an
//! absolute path; the host names the action, never its arguments.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::cmdline::DEFAULT_METADATA;

/// Where the configuration is read from when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/cradle/agent.toml";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub metadata: SocketAddrV4,
    pub heartbeat: Duration,
    pub poll: Duration,
    /// `None`: write no authorized_keys.
    pub user: Option<String>,
    pub hostname: bool,
    pub generate_host_keys: bool,
    pub action_timeout: Duration,
    pub state_dir: PathBuf,
    pub actions: BTreeMap<String, Vec<String>>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            metadata: DEFAULT_METADATA,
            heartbeat: Duration::from_secs(30),
            poll: Duration::from_secs(5),
            user: Some("root".into()),
            hostname: true,
            generate_host_keys: true,
            action_timeout: Duration::from_secs(300),
            state_dir: PathBuf::from("/var/lib/cradle-agent"),
            actions: BTreeMap::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    metadata: Option<String>,
    heartbeat: Option<u64>,
    poll: Option<u64>,
    user: Option<String>,
    hostname: Option<bool>,
    generate_host_keys: Option<bool>,
    action_timeout: Option<u64>,
    state_dir: Option<String>,
    #[serde(default)]
    actions: BTreeMap<String, Vec<String>>,
}

fn seconds(key: &str, v: Option<u64>, default: Duration, max: u64) -> Result<Duration, String> {
    match v {
        None => Ok(default),
        Some(s) if (1..=max).contains(&s) => Ok(Duration::from_secs(s)),
        Some(s) => Err(format!("{key} = {s}: must be 1 to {max} seconds")),
    }
}

impl Config {
    /// The configuration in `text` (the file at `path`, for messages).
    pub fn parse(text: &str, path: &str) -> Result<Config, String> {
        let f: File = toml::from_str(text).map_err(|e| format!("{path}: {e}"))?;
        let bad = |m: String| format!("{path}: {m}");
        let d = Config::default();
        let metadata = match f.metadata {
            None => d.metadata,
            Some(m) => m
                .parse()
                .map_err(|_| bad(format!("metadata = {m:?} is not IPv4-ADDRESS:PORT")))?,
        };
        let user = match f.user {
            None => d.user,
            Some(u) if u.is_empty() => None,
            Some(u) => {
                let ok = u.len() <= 32
                    && u.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
                    && !u.starts_with('-');
                if !ok {
                    return Err(bad(format!("user = {u:?} is not a user name")));
                }
                Some(u)
            }
        };
        let state_dir = PathBuf::from(
            f.state_dir
                .unwrap_or_else(|| "/var/lib/cradle-agent".into()),
        );
        if !state_dir.is_absolute() {
            return Err(bad(format!(
                "state_dir = {:?} is not an absolute path",
                state_dir.display()
            )));
        }
        for (name, argv) in &f.actions {
            cradle_model::agent::check_action_name(name)
                .map_err(|e| bad(format!("[actions]: {e}")))?;
            match argv.first() {
                None => {
                    return Err(bad(format!(
                        "[actions] {name}: the argument vector is empty"
                    )));
                }
                Some(p) if !p.starts_with('/') => {
                    return Err(bad(format!(
                        "[actions] {name}: the program {p:?} is not an absolute path"
                    )));
                }
                _ => {}
            }
            if argv.iter().any(|a| a.contains('\0')) {
                return Err(bad(format!(
                    "[actions] {name}: an argument holds a NUL byte"
                )));
            }
        }
        Ok(Config {
            metadata,
            heartbeat: seconds("heartbeat", f.heartbeat, d.heartbeat, 3600).map_err(bad)?,
            poll: seconds("poll", f.poll, d.poll, 3600).map_err(bad)?,
            user,
            hostname: f.hostname.unwrap_or(d.hostname),
            generate_host_keys: f.generate_host_keys.unwrap_or(d.generate_host_keys),
            action_timeout: seconds("action_timeout", f.action_timeout, d.action_timeout, 86_400)
                .map_err(bad)?,
            state_dir,
            actions: f.actions,
        })
    }

    /// The file at `path`; a missing file is the defaults.
    pub fn load(path: &str) -> Result<Config, String> {
        match std::fs::read_to_string(path) {
            Ok(t) => Config::parse(&t, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(format!("cannot read {path}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_defaults() {
        assert_eq!(Config::parse("", "a.toml").unwrap(), Config::default());
        let d = Config::default();
        assert!(d.actions.is_empty(), "no action is allowed by default");
        assert_eq!(d.heartbeat, Duration::from_secs(30));
    }

    #[test]
    fn every_key_is_read() {
        let c = Config::parse(
            r#"
metadata = "169.254.169.254:8775"
heartbeat = 10
poll = 2
user = "debian"
hostname = false
generate_host_keys = false
action_timeout = 20
state_dir = "/run/agent"
[actions]
uptime = ["/usr/bin/uptime"]
restart-nginx = ["/usr/bin/systemctl", "restart", "nginx"]
"#,
            "a.toml",
        )
        .unwrap();
        assert_eq!(c.metadata.port(), 8775);
        assert_eq!(c.heartbeat, Duration::from_secs(10));
        assert_eq!(c.poll, Duration::from_secs(2));
        assert_eq!(c.user.as_deref(), Some("debian"));
        assert!(!c.hostname && !c.generate_host_keys);
        assert_eq!(c.action_timeout, Duration::from_secs(20));
        assert_eq!(c.state_dir, PathBuf::from("/run/agent"));
        assert_eq!(c.actions["restart-nginx"][2], "nginx");
        assert_eq!(Config::parse("user = \"\"", "a").unwrap().user, None);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        for (text, want) in [
            ("metadata = \"169.254.169.254\"", "is not IPv4-ADDRESS:PORT"),
            ("heartbeat = 0", "heartbeat = 0: must be 1 to 3600 seconds"),
            ("poll = 99999", "poll = 99999"),
            ("user = \"a b\"", "is not a user name"),
            ("state_dir = \"var\"", "is not an absolute path"),
            (
                "[actions]\nx = []",
                "[actions] x: the argument vector is empty",
            ),
            (
                "[actions]\nx = [\"uptime\"]",
                "\"uptime\" is not an absolute path",
            ),
            ("[actions]\nBad = [\"/bin/true\"]", "is not an action name"),
            ("password = \"x\"", "unknown field `password`"),
            ("heartbeat = \"x\"", "a.toml"),
        ] {
            let e = Config::parse(text, "a.toml").unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
            assert!(e.starts_with("a.toml"), "{e}");
        }
    }
}
