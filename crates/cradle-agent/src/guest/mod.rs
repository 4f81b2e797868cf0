//! `cradle-agent guest`: the agent in a running guest, started by systemd
//! (`cradle-agent.service`, written by `cradle bake` or the
//! diskimage-builder element) with its baked configuration
//! ([`config`]). It never listens on a port, never needs sshd, and talks
//! to nothing but the metadata service, over the communication NIC:
//!
//! 1. when the kernel command line says `cradle.address=` (run mode with
//!    communication on and a kernel booted directly), it gives the NIC
//!    `cradle.nic=` names that address, IPv6 off; otherwise the guest's own
//!    network configuration must reach the metadata address;
//! 2. it reports `booting`, publishes the SSH host keys ([`hostkeys`]),
//!    applies the hostname and authorized_keys from `meta_data.json`
//!    ([`apply`]) and reports `ready` with its version, the kernel and the
//!    OS release, or `failed` with the reason;
//! 3. then, every `poll` seconds: the metadata again (a conditional GET:
//!    304 when nothing changed) and the channel's messages, which may be
//!    actions ([`actions`]); the state again every `heartbeat` seconds;
//! 4. while the metadata service is away it backs off ([`backoff`]) and
//!    keeps what it applied.
//!
//! It logs to standard error, which systemd sends to the journal. No
//! secret ever reaches it: the configuration holds none and the documents
//! it reads carry none.

mod actions;
mod apply;
mod backoff;
pub mod config;
mod hostkeys;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use cradle_model::agent::{AgentState, FromAgent, ToAgent};

use crate::http::Client;
use config::Config;

const META_PATH: &str = "/cradle/latest/meta_data.json";
const MAX_META: u64 = 1 << 20;
const MAX_MESSAGE: u64 = 64 << 10;
/// Messages taken from the channel in one look.
const MESSAGES_PER_POLL: usize = 16;

pub const USAGE: &str = "\
usage: cradle-agent guest [--config FILE]
       cradle-agent guest --check-config FILE

The guest agent of a running VM (see docs/agent.md): reports its state,
applies the hostname and SSH keys from metadata, publishes the SSH host
keys and runs the actions its configuration allows, over the metadata
service only. --config defaults to /etc/cradle/agent.toml (missing: the
defaults). --check-config reads FILE, says what is wrong with it and exits.";

/// Say `line` on standard error (the journal, under systemd).
pub fn log(line: &str) {
    eprintln!("cradle-agent: {line}");
}

/// `cradle-agent guest ARGS`.
pub fn main(args: &[String]) -> i32 {
    let mut path = config::DEFAULT_PATH.to_string();
    let mut check = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" | "--check-config" => {
                check |= a == "--check-config";
                match it.next() {
                    Some(p) => path = p.clone(),
                    None => {
                        eprintln!("{a} needs a FILE\n\n{USAGE}");
                        return 2;
                    }
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return 0;
            }
            other => {
                eprintln!("unknown argument {other:?}\n\n{USAGE}");
                return 2;
            }
        }
    }
    let loaded = if check {
        std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {path}: {e}"))
            .and_then(|t| Config::parse(&t, &path))
    } else {
        Config::load(&path)
    };
    if check {
        return match loaded {
            Ok(c) => {
                println!("{path}: ok ({} action(s) allowed)", c.actions.len());
                0
            }
            Err(e) => {
                eprintln!("{e}");
                1
            }
        };
    }
    log(&format!("started ({})", env!("CARGO_PKG_VERSION")));
    let (config, broken) = match loaded {
        Ok(c) => (c, None),
        Err(e) => {
            log(&e);
            // The defaults reach the service; nothing is applied or run.
            (Config::default(), Some(e))
        }
    };
    Agent::new(config, broken).run()
}

/// The communication NIC to configure, when the kernel command line says.
struct Nic {
    address: Ipv4Addr,
    mac: Option<String>,
}

struct Agent {
    config: Config,
    /// Why the agent cannot do its work (a bad configuration): it reports
    /// `failed` and applies nothing.
    broken: Option<String>,
    nic: Option<Nic>,
    nic_up: bool,
    client: Client,
    /// What the guest is, read once (it does not change while it runs).
    kernel: String,
    os_release: String,
    /// What was last sent, and when.
    reported: Option<(AgentState, Option<String>, Instant)>,
    keys_published: bool,
    meta_etag: Option<String>,
    /// Why applying the metadata failed, when it did.
    apply_error: Option<String>,
    done: Option<actions::Done>,
}

impl Agent {
    fn new(config: Config, broken: Option<String>) -> Agent {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let (service, nic) = match crate::cmdline::parse(&cmdline) {
            Ok(b) => match b.address {
                Some(address) => (
                    b.metadata,
                    Some(Nic {
                        address,
                        mac: b.nic,
                    }),
                ),
                None => (config.metadata, None),
            },
            Err(e) => {
                log(&format!("ignoring the kernel command line: {e}"));
                (config.metadata, None)
            }
        };
        log(&format!("metadata service {service}"));
        let done = match actions::Done::open(&config.state_dir) {
            Ok(d) => Some(d),
            Err(e) => {
                log(&format!("{e}: no action will run"));
                None
            }
        };
        Agent {
            client: Client::new(service),
            kernel: kernel(),
            os_release: os_release(Path::new("/")),
            config,
            broken,
            nic,
            nic_up: false,
            reported: None,
            keys_published: false,
            meta_etag: None,
            apply_error: None,
            done,
        }
    }

    fn run(mut self) -> ! {
        let mut backoff = backoff::Backoff::new(self.config.poll);
        loop {
            let wait = match self.tick() {
                Ok(()) => backoff.succeeded(),
                Err(e) => {
                    let w = backoff.failed();
                    if backoff.failures() <= 3 || backoff.failures().is_multiple_of(20) {
                        log(&format!("{e} (trying again in {} s)", w.as_secs()));
                    }
                    // The NIC may have been taken down or renamed.
                    self.nic_up = false;
                    backoff::jitter(w, random())
                }
            };
            std::thread::sleep(wait);
        }
    }

    /// One look: the network, the state, the host keys, the metadata, the
    /// channel. An error is a failure to reach the service.
    fn tick(&mut self) -> Result<(), String> {
        if let Some(nic) = &self.nic
            && !self.nic_up
        {
            let name = crate::net::configure_nic(nic.address, nic.mac.as_deref())?;
            log(&format!(
                "communication NIC {name}: {}/{}",
                nic.address,
                crate::net::PREFIX
            ));
            self.nic_up = true;
        }
        if self.reported.is_none() {
            self.report(AgentState::Booting, None)?;
        }
        if let Some(why) = self.broken.clone() {
            return self.report(AgentState::Failed, Some(why));
        }
        if !self.keys_published {
            self.publish_host_keys()?;
        }
        self.look_at_metadata()?;
        let (state, why) = match &self.apply_error {
            None => (AgentState::Ready, None),
            Some(e) => (AgentState::Failed, Some(e.clone())),
        };
        self.report(state, why)?;
        self.read_channel()
    }

    /// Send the state when it changed or a heartbeat is due.
    fn report(&mut self, state: AgentState, reason: Option<String>) -> Result<(), String> {
        if let Some((s, r, at)) = &self.reported
            && *s == state
            && *r == reason
            && at.elapsed() < self.config.heartbeat
        {
            return Ok(());
        }
        let msg = FromAgent::Guest {
            state,
            version: env!("CARGO_PKG_VERSION").to_string(),
            kernel: self.kernel.clone(),
            os_release: self.os_release.clone(),
            reason: reason.clone(),
        };
        self.send(&msg)?;
        if self.reported.as_ref().map(|r| (r.0, &r.1)) != Some((state, &reason)) {
            match &reason {
                None => log(&format!("state {}", state.as_str())),
                Some(r) => log(&format!("state {}: {r}", state.as_str())),
            }
        }
        self.reported = Some((state, reason, Instant::now()));
        Ok(())
    }

    fn send(&self, msg: &FromAgent) -> Result<(), String> {
        let body = serde_json::to_string(msg).map_err(|e| e.to_string())?;
        self.client.write(&body).map_err(|e| e.message)
    }

    fn publish_host_keys(&mut self) -> Result<(), String> {
        let dir = Path::new("/etc/ssh");
        let mut keys = hostkeys::read(dir);
        if matches!(&keys, Ok(k) if k.is_empty()) && self.config.generate_host_keys {
            match hostkeys::generate(dir) {
                Ok(()) => {
                    log("made an ed25519 SSH host key in /etc/ssh");
                    keys = hostkeys::read(dir);
                }
                Err(e) => log(&e),
            }
        }
        match keys {
            Ok(keys) => {
                self.send(&FromAgent::HostKeys { keys: keys.clone() })?;
                log(&format!("published {} SSH host key(s)", keys.len()));
            }
            // Not the service's fault: said once, not tried again.
            Err(e) => log(&e),
        }
        self.keys_published = true;
        Ok(())
    }

    fn look_at_metadata(&mut self) -> Result<(), String> {
        let got = self
            .client
            .get_changed(META_PATH, self.meta_etag.as_deref(), MAX_META)
            .map_err(|e| e.message)?;
        let Some((body, etag)) = got else {
            return Ok(());
        };
        let meta: apply::Meta = match serde_json::from_slice(&body) {
            Ok(m) => m,
            Err(e) => {
                self.apply_error = Some(format!("{META_PATH} does not read: {e}"));
                return Ok(());
            }
        };
        let mut errors = Vec::new();
        if self.config.hostname && !meta.hostname.is_empty() {
            match apply::apply_hostname(Path::new("/"), &meta.hostname) {
                Ok(true) => log(&format!("hostname set to {}", meta.hostname)),
                Ok(false) => {}
                Err(e) => errors.push(e),
            }
        }
        if let Some(user) = &self.config.user {
            match apply::apply_keys(Path::new("/etc/passwd"), user, &meta.public_keys) {
                Ok(true) => log(&format!(
                    "{} SSH key(s) written for {user}",
                    meta.public_keys.len()
                )),
                Ok(false) => {}
                Err(e) => errors.push(e),
            }
        }
        self.apply_error = (!errors.is_empty()).then(|| errors.join("; "));
        // Tried again on the next look when it failed.
        self.meta_etag = if errors.is_empty() { etag } else { None };
        Ok(())
    }

    fn read_channel(&mut self) -> Result<(), String> {
        for _ in 0..MESSAGES_PER_POLL {
            let Some(body) = self.client.read(MAX_MESSAGE).map_err(|e| e.message)? else {
                return Ok(());
            };
            let ToAgent::Run { id, action } = match serde_json::from_slice::<ToAgent>(&body) {
                Ok(m) => m,
                Err(_) => {
                    log(&format!(
                        "ignoring a {}-byte message that is not an agent request",
                        body.len()
                    ));
                    continue;
                }
            };
            let Some(done) = self.done.as_mut() else {
                continue;
            };
            log(&format!("action {action} ({id}) asked for"));
            let timeout = self.config.action_timeout;
            if let Some(answer) = actions::handle(id, &action, &self.config.actions, timeout, done)
            {
                match &answer {
                    FromAgent::ActionResult { exit_code, .. } => {
                        log(&format!("action {action} ({id}) exited {exit_code}"))
                    }
                    _ => log(&format!(
                        "action {action} ({id}) refused: not in the configuration"
                    )),
                }
                // The answer matters more than the pace: tried for a while.
                let body = serde_json::to_string(&answer).map_err(|e| e.to_string())?;
                self.client
                    .write_retrying(&body, Duration::from_secs(60))
                    .map_err(|e| e.message)?;
            }
        }
        Ok(())
    }
}

/// The kernel, as `uname -sr` says it.
fn kernel() -> String {
    let r = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    format!(
        "{} {}",
        r("/proc/sys/kernel/ostype"),
        r("/proc/sys/kernel/osrelease")
    )
    .trim()
    .to_string()
}

/// `PRETTY_NAME` of os-release under `root`.
fn os_release(root: &Path) -> String {
    let text = std::fs::read_to_string(root.join("etc/os-release"))
        .or_else(|_| std::fs::read_to_string(root.join("usr/lib/os-release")))
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim().trim_matches('"').to_string())
        .unwrap_or_default()
}

/// A few random bits for jitter (the clock's nanoseconds will do).
fn random() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_os_release_is_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/os-release"),
            "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
        )
        .unwrap();
        assert_eq!(os_release(dir.path()), "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(os_release(&dir.path().join("none")), "");
        assert!(kernel().starts_with("Linux "), "{}", kernel());
    }
}
