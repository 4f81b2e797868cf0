//! The operator's side of the guest agent: `cradle instance host-keys`
//! (the host keys it published, as known_hosts lines) and `cradle instance
//! run` (an action sent to it, and its answer awaited).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use cradle_client::route;
use cradle_model::agent::{ActionState, ActionView, AgentView};
use cradle_model::api::InstanceView;

use crate::Output;
use crate::client::Api;

pub const RUN_ABOUT: &str = "\
The action is queued on the instance's channel; the agent in the guest (`cradle-agent guest`) \
runs it only when its baked configuration (/etc/cradle/agent.toml, [actions]) names it, as the \
argument vector given there, at most once. Its exit code and the last 32 KiB of its output \
come back: this prints the output and exits with the action's exit code. A refused action \
(not in the agent's configuration) is an error, and recorded as an event. The agent picks \
actions up at its poll interval.\n\nExample:\n  cradle instance run web1 restart-nginx";

pub const HOST_KEYS_ABOUT: &str = "\
The agent reads the guest's /etc/ssh/ssh_host_*_key.pub (generating an ed25519 key when there \
is none) and publishes them over the channel, so the host knows them without trusting a first \
connection. Lines are `NAMES TYPE KEY`, for ~/.ssh/known_hosts; NAMES are the instance's \
hostname, name and local IPv4 address.\n\nExample:\n  cradle instance host-keys web1 >> \
~/.ssh/known_hosts";

/// One line for `instance show`: the agent's state and when it was heard.
pub fn summary(a: Option<&AgentView>) -> String {
    match a {
        None => "- (no agent has reported)".into(),
        Some(a) => {
            let mut s = format!(
                "{} since {} (last heard {})",
                a.state.as_str(),
                a.since,
                a.last_heard
            );
            if !a.version.is_empty() {
                s.push_str(&format!(", cradle-agent {}", a.version));
            }
            if let Some(r) = &a.reason {
                s.push_str(&format!(": {r}"));
            }
            s
        }
    }
}

/// The known_hosts lines of `v`'s published host keys.
pub fn known_hosts(v: &InstanceView) -> Vec<String> {
    let mut names = vec![v.hostname.clone()];
    if v.name != v.hostname {
        names.push(v.name.clone());
    }
    if let Some(a) = v.local_ipv4 {
        names.push(a.addr.to_string());
    }
    let names = names.join(",");
    v.agent
        .iter()
        .flat_map(|a| &a.host_keys)
        .map(|k| format!("{names} {} {}", k.kind, k.key))
        .collect()
}

pub fn host_keys(api: &Api, instance: &str, fingerprints: bool, output: Output) -> Result<()> {
    let v = api.send(route::instance(instance))?;
    let mut out = std::io::stdout().lock();
    let keys = v.agent.as_ref().map(|a| &a.host_keys[..]).unwrap_or(&[]);
    if output == Output::Json {
        writeln!(out, "{}", serde_json::to_string_pretty(keys)?)?;
        return Ok(());
    }
    if keys.is_empty() {
        bail!(
            "instance {instance} has no published host keys (is its agent running with \
             communication on?)"
        );
    }
    if fingerprints {
        for k in keys {
            writeln!(out, "{} {}", k.kind, k.fingerprint)?;
        }
    } else {
        for line in known_hosts(&v) {
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}

/// Send `action` and wait up to `timeout` for the agent's answer.
pub fn run(api: &Api, instance: &str, action: &str, timeout: u64, output: Output) -> Result<()> {
    let sent = match api.send(route::send_action(instance, action)) {
        Err(cradle_client::Error::Api { code, .. }) if code == "wrong_host" => {
            // Only the serving host hears the agent: ask it.
            let (_, url) = crate::client::serving_host(api, instance)?;
            let there = Api::new(api.target().at(&url))?;
            return run(&there, instance, action, timeout, output);
        }
        other => other?,
    };
    let until = Instant::now() + Duration::from_secs(timeout);
    let mut view = sent;
    while view.state == ActionState::Sent {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "no answer from the agent of {instance} to action {action} ({}) within {timeout} s; \
                 it may still run it (see `cradle instance events {instance}`)",
                view.id
            );
        }
        let wait = left
            .min(Duration::from_secs(30))
            .max(Duration::from_secs(1));
        view = api.send(route::action(instance, view.id, wait))?;
    }
    finish(&view, output)
}

fn finish(v: &ActionView, output: Output) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if output == Output::Json {
        writeln!(out, "{}", serde_json::to_string_pretty(v)?)?;
    }
    match v.state {
        ActionState::Refused => bail!(
            "the agent refused action {}: {}",
            v.action,
            v.reason.as_deref().unwrap_or("not allowed")
        ),
        _ => {
            if output == Output::Table {
                out.write_all(v.output.as_deref().unwrap_or("").as_bytes())?;
                if v.truncated {
                    eprintln!("(output cut: only its last 32 KiB came back)");
                }
            }
            out.flush()?;
            let code = v.exit_code.unwrap_or(1);
            if code != 0 {
                eprintln!("action {} exited {code}", v.action);
                std::process::exit(code.clamp(1, 255));
            }
            Ok(())
        }
    }
}
