//! Install jobs as both listeners see them.
//!
//! An [`InstallJob`] is created by the installer when `cradle instance
//! install` starts one, and lives in the registry next to its instance: the
//! metadata service serves the appliance its manifest, its untrusted scripts
//! and its personalization package from it (only while it runs, and only to
//! the instance's own address), and turns the agent's messages on the
//! `write` channel into the job's events; the admin API shows it.
//!
//! A job holds no secret: the log lines the appliance sends are scrubbed of
//! the instance's secret values before they are kept, and the values used
//! for scrubbing are dropped when the job ends. It is kept in memory only
//! (the last job per instance), so the appliance's scratch state goes with
//! it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Instant;

use bytes::Bytes;
use cradle_model::Secret;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// Events kept per job; older ones are dropped (and counted).
pub const MAX_EVENTS: usize = 10_000;
/// Bytes kept of one log line.
pub const MAX_LINE: usize = 1000;
/// Messages from the appliance waiting for the trusted script to read them;
/// beyond this the appliance is told to slow down (429).
pub const FORWARD_QUEUE: usize = 64;

pub use cradle_model::job::{
    AgentStatus, EventKind, JobEvent, JobOperation, JobView, StreamDigest,
};

use crate::stream::DataStream;

/// How a job ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub succeeded: bool,
    pub reason: Option<String>,
    pub ms: u64,
}

/// The personalization package, fetched and verified before the appliance
/// boots, held once: every request for it is served from this one buffer.
pub struct Package {
    pub bytes: Bytes,
    pub sha256: String,
}

/// What the appliance is served while the job runs. Dropped when the job
/// ends: the manifest carries private values (as `OSP_*`), the package may
/// be large.
pub struct Artifacts {
    /// `install.json`, as the appliance reads it.
    pub manifest: Bytes,
    /// The OS definition's untrusted scripts, by file name.
    pub scripts: BTreeMap<String, Bytes>,
    pub package: Option<Package>,
}

/// What became of a message handed to the trusted script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// Queued for its standard input.
    Sent,
    /// Its queue is full: the writer must slow down.
    Full,
    /// No trusted script listens.
    NoListener,
}

#[derive(Default)]
struct State {
    events: std::collections::VecDeque<JobEvent>,
    next_seq: u64,
    dropped: u64,
    step: Option<String>,
    status: Option<AgentStatus>,
    outcome: Option<Outcome>,
    first_request_ms: Option<u64>,
    /// Secret values to scrub from what is kept; emptied when the job ends.
    scrub: Vec<Secret<String>>,
}

/// One OS job: an install (`create`), an export, an import or a rename.
pub struct InstallJob {
    pub id: Uuid,
    pub instance: Uuid,
    pub instance_name: String,
    pub operation: JobOperation,
    /// The instance's state before the job, which an export, a rename or
    /// an import that never began writing gives back.
    pub previous: cradle_model::State,
    /// An export's or import's data stream.
    stream: Option<std::sync::Arc<DataStream>>,
    pub started: Instant,
    pub started_at: OffsetDateTime,
    /// `None` once the job has ended.
    artifacts: Mutex<Option<std::sync::Arc<Artifacts>>>,
    state: Mutex<State>,
    changed: tokio::sync::watch::Sender<u64>,
    /// The trusted script's standard input, while it runs: what the
    /// appliance writes on the channel (other than the agent's reports).
    forward: Mutex<Option<SyncSender<Vec<u8>>>>,
}

/// An agent message on the `write` channel.
#[derive(Deserialize)]
#[serde(tag = "agent", rename_all = "snake_case")]
enum AgentMessage {
    Progress {
        step: String,
    },
    Log {
        lines: Vec<String>,
    },
    Status {
        exit_code: i32,
        #[serde(default)]
        error: Option<String>,
        #[serde(default)]
        log_tail: String,
        #[serde(default)]
        stream: Option<StreamDigest>,
    },
}

/// `text` with every value of `secrets` in it replaced by `<redacted>`.
fn scrub(secrets: &[Secret<String>], text: &str) -> String {
    secrets.iter().fold(text.to_string(), |t, s| {
        t.replace(s.expose().as_str(), cradle_model::REDACTED)
    })
}

fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

impl InstallJob {
    pub fn new(instance: &cradle_model::Instance, artifacts: Artifacts) -> InstallJob {
        InstallJob::for_operation(instance, JobOperation::Create, None, artifacts)
    }

    /// A job running `operation`, with the data stream of an export or
    /// an import.
    pub fn for_operation(
        instance: &cradle_model::Instance,
        operation: JobOperation,
        stream: Option<DataStream>,
        artifacts: Artifacts,
    ) -> InstallJob {
        let scrub = instance
            .os_params
            .secret
            .values()
            .chain(instance.os_params.private.values())
            .filter(|v| v.expose().len() >= 4)
            .cloned()
            .collect();
        InstallJob {
            id: Uuid::new_v4(),
            instance: instance.id,
            instance_name: instance.name.clone(),
            operation,
            previous: instance.state,
            stream: stream.map(std::sync::Arc::new),
            started: Instant::now(),
            started_at: OffsetDateTime::now_utc(),
            artifacts: Mutex::new(Some(std::sync::Arc::new(artifacts))),
            state: Mutex::new(State {
                scrub,
                ..State::default()
            }),
            changed: tokio::sync::watch::Sender::new(0),
            forward: Mutex::new(None),
        }
    }

    /// What the appliance is served, while the job runs.
    pub fn artifacts(&self) -> Option<std::sync::Arc<Artifacts>> {
        self.artifacts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn push(&self, st: &mut State, kind: EventKind, text: &str) {
        // Scrubbed whole, then cut: a cut first could leave the start of a
        // secret that no longer matches in full.
        let text = cut(&scrub(&st.scrub, text), MAX_LINE);
        st.next_seq += 1;
        let ev = JobEvent {
            seq: st.next_seq,
            ms: self.ms(),
            kind,
            text,
        };
        if st.events.len() == MAX_EVENTS {
            st.events.pop_front();
            st.dropped += 1;
        }
        st.events.push_back(ev);
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Record an event.
    pub fn note(&self, kind: EventKind, text: &str) {
        let mut st = self.lock();
        self.push(&mut st, kind, text);
        drop(st);
        self.bump();
    }

    /// Record the appliance's first metadata request (later ones change nothing).
    pub fn saw_request(&self) {
        let mut st = self.lock();
        if st.first_request_ms.is_none() {
            st.first_request_ms = Some(self.ms());
            let ms = st.first_request_ms.unwrap_or(0);
            self.push(
                &mut st,
                EventKind::Job,
                &format!("first metadata request from the appliance after {ms} ms"),
            );
            drop(st);
            self.bump();
        }
    }

    /// Take a message the appliance wrote on the channel, when it is the
    /// agent's (`{"agent": …}`). Anything else is not the job's: `false`.
    pub fn agent_message(&self, body: &[u8]) -> bool {
        let Ok(msg) = serde_json::from_slice::<AgentMessage>(body) else {
            return false;
        };
        let mut st = self.lock();
        if st.outcome.is_some() {
            return true;
        }
        match msg {
            AgentMessage::Progress { step } => {
                self.push(&mut st, EventKind::Progress, &step);
                st.step = st.events.back().map(|e| e.text.clone());
            }
            AgentMessage::Log { lines } => {
                for l in &lines {
                    self.push(&mut st, EventKind::Log, l);
                }
            }
            AgentMessage::Status {
                exit_code,
                error,
                log_tail,
                stream,
            } => {
                if st.status.is_none() {
                    let text = match &error {
                        Some(e) => format!("exit code {exit_code}: {e}"),
                        None => format!("exit code {exit_code}"),
                    };
                    self.push(&mut st, EventKind::Status, &text);
                    let scrubbed = |s: &str| cut(&scrub(&st.scrub, s), 8 * MAX_LINE);
                    let status = AgentStatus {
                        exit_code,
                        error: error.as_deref().map(scrubbed),
                        log_tail: scrubbed(&log_tail),
                        stream,
                    };
                    st.status = Some(status);
                }
            }
        }
        drop(st);
        self.bump();
        true
    }

    /// Hand what the appliance writes on the channel to the trusted script
    /// from now on, through a queue of [`FORWARD_QUEUE`] messages: the
    /// receiving end feeds its standard input.
    pub fn forward_to_script(&self) -> Receiver<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(FORWARD_QUEUE);
        *self.forward.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }

    /// No trusted script listens any more.
    pub fn stop_forwarding(&self) {
        *self.forward.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Give a channel message to the trusted script, when one listens.
    /// Never waits: a full queue is the writer's to retry.
    pub fn forward(&self, body: &[u8]) -> Forwarded {
        let f = self.forward.lock().unwrap_or_else(|e| e.into_inner());
        match f.as_ref().map(|tx| tx.try_send(body.to_vec())) {
            None | Some(Err(TrySendError::Disconnected(_))) => Forwarded::NoListener,
            Some(Err(TrySendError::Full(_))) => Forwarded::Full,
            Some(Ok(())) => Forwarded::Sent,
        }
    }

    /// The agent's status, once it has sent one.
    pub fn status(&self) -> Option<AgentStatus> {
        self.lock().status.clone()
    }

    pub fn is_running(&self) -> bool {
        self.lock().outcome.is_none()
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.lock().outcome.clone()
    }

    /// End the job (once); the scrub values are dropped.
    pub(crate) fn finish(&self, succeeded: bool, reason: Option<String>) {
        let mut st = self.lock();
        if st.outcome.is_some() {
            return;
        }
        let noun = self.operation.noun();
        let text = match &reason {
            Some(r) if succeeded => format!("{noun} succeeded: {r}"),
            Some(r) => format!("{noun} failed: {r}"),
            None if succeeded => format!("{noun} succeeded"),
            None => format!("{noun} failed"),
        };
        self.push(&mut st, EventKind::Job, &text);
        st.outcome = Some(Outcome {
            succeeded,
            reason,
            ms: self.ms(),
        });
        st.scrub.clear();
        drop(st);
        self.artifacts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.stop_forwarding();
        if let Some(s) = &self.stream {
            s.close();
        }
        self.bump();
    }

    /// An export's or import's data stream.
    pub fn stream(&self) -> Option<&std::sync::Arc<DataStream>> {
        self.stream.as_ref()
    }

    /// Wakes on every change (an event, the status, the end).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The job as the admin API shows it, with the events after `after`.
    pub fn view(&self, after: u64) -> JobView {
        let st = self.lock();
        let state = match &st.outcome {
            None => "running",
            Some(o) if o.succeeded => "succeeded",
            Some(_) => "failed",
        };
        JobView {
            id: self.id,
            instance: self.instance,
            instance_name: self.instance_name.clone(),
            operation: self.operation.as_str().to_string(),
            state: state.to_string(),
            reason: st.outcome.as_ref().and_then(|o| o.reason.clone()),
            step: st.step.clone(),
            started_at: self.started_at,
            elapsed_ms: st.outcome.as_ref().map(|o| o.ms).unwrap_or(self.ms()),
            first_request_ms: st.first_request_ms,
            status: st.status.clone(),
            events: st
                .events
                .iter()
                .filter(|e| e.seq > after)
                .cloned()
                .collect(),
            next: st.next_seq,
            dropped: st.dropped,
            stream: self.stream.as_ref().and_then(|s| s.digest()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(secret: &str) -> InstallJob {
        let mut i = cradle_model::api::InstanceSpec {
            name: "a".into(),
            metadata_address: Some("169.254.1.1".into()),
            ..Default::default()
        }
        .into_instance(Uuid::new_v4(), OffsetDateTime::now_utc(), vec![0; 512])
        .unwrap();
        i.os_params
            .secret
            .insert("pw".into(), Secret::new(secret.to_string()));
        InstallJob::new(
            &i,
            Artifacts {
                manifest: Bytes::from_static(b"{}"),
                scripts: BTreeMap::new(),
                package: Some(Package {
                    bytes: Bytes::from(vec![7u8; 1 << 20]),
                    sha256: "x".into(),
                }),
            },
        )
    }

    #[test]
    fn agent_messages_become_events_and_secrets_are_scrubbed() {
        let j = job("canary-7f3e");
        assert!(j.agent_message(br#"{"agent":"progress","step":"running create"}"#));
        assert!(j.agent_message(br#"{"agent":"log","lines":["a","pw is canary-7f3e!"]}"#));
        assert!(!j.agent_message(b"hello from a script"));
        assert!(!j.agent_message(br#"{"agent":"dance"}"#));
        assert!(j.status().is_none());
        assert!(j.agent_message(
            br#"{"agent":"status","exit_code":3,"error":"create exited 3","log_tail":"canary-7f3e"}"#
        ));
        let v = j.view(0);
        assert_eq!(v.state, "running");
        assert_eq!(v.step.as_deref(), Some("running create"));
        let texts: Vec<_> = v.events.iter().map(|e| e.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "running create",
                "a",
                "pw is <redacted>!",
                "exit code 3: create exited 3"
            ]
        );
        assert_eq!(v.status.as_ref().unwrap().log_tail, "<redacted>");
        assert_eq!(j.view(v.next).events.len(), 0);
        assert_eq!(j.view(2).events.len(), 2);
        j.finish(false, Some("the create script exited 3".into()));
        let v = j.view(0);
        assert_eq!(v.state, "failed");
        assert!(!j.is_running());
        // Nothing after the end is taken.
        assert!(j.agent_message(br#"{"agent":"log","lines":["late"]}"#));
        assert_eq!(j.view(0).events.len(), v.events.len());
    }

    #[test]
    fn long_lines_are_cut_and_old_events_dropped() {
        let j = job("xxxxxxxx");
        j.note(EventKind::Job, &"é".repeat(MAX_LINE));
        assert!(j.view(0).events[0].text.len() <= MAX_LINE + "…".len());
        for n in 0..MAX_EVENTS {
            j.note(EventKind::Log, &n.to_string());
        }
        let v = j.view(0);
        assert_eq!(v.events.len(), MAX_EVENTS);
        assert_eq!(v.dropped, 1);
        assert_eq!(v.events[0].text, "0");
    }

    #[test]
    fn a_secret_across_the_cut_is_scrubbed_whole() {
        let secret = "canary-secret-across-the-cut";
        let j = job(secret);
        // The secret starts 5 bytes before the cut: cut first, its first
        // part would survive, no longer matching the whole value.
        let line = format!("{}{secret}", "x".repeat(MAX_LINE - 5));
        j.note(EventKind::Trusted, &line);
        assert!(j.agent_message(format!(r#"{{"agent":"progress","step":"{line}"}}"#).as_bytes()));
        for e in j.view(0).events {
            assert!(!e.text.contains("canar"), "{}", e.text);
        }
    }

    #[test]
    fn artifacts_go_when_the_job_ends() {
        let j = job("xxxxxxxx");
        let a = j.artifacts().expect("served while it runs");
        assert_eq!(a.package.as_ref().unwrap().bytes.len(), 1 << 20);
        // Two requests share one buffer.
        let b = j.artifacts().unwrap();
        assert_eq!(
            a.package.as_ref().unwrap().bytes.as_ptr(),
            b.package.as_ref().unwrap().bytes.as_ptr()
        );
        drop((a, b));
        j.finish(true, None);
        assert!(j.artifacts().is_none());
    }

    #[test]
    fn the_forward_queue_is_bounded() {
        let j = job("xxxxxxxx");
        assert_eq!(j.forward(b"nobody"), Forwarded::NoListener);
        let rx = j.forward_to_script();
        for _ in 0..FORWARD_QUEUE {
            assert_eq!(j.forward(b"m"), Forwarded::Sent);
        }
        assert_eq!(j.forward(b"one too many"), Forwarded::Full);
        rx.recv().unwrap();
        assert_eq!(j.forward(b"room again"), Forwarded::Sent);
        drop(rx);
        assert_eq!(j.forward(b"reader gone"), Forwarded::NoListener);
        let _rx = j.forward_to_script();
        j.finish(false, None);
        assert_eq!(j.forward(b"after the end"), Forwarded::NoListener);
    }
}
