//! The other hosts of a cluster, and the operations they do for this one.
//!
//! A secret parameter lives only in the memory of the host that serves its
//! instance. When it is given to another host's admin API, that host does
//! not keep it: the operation (create or modify, whole) is handed to the
//! serving host over mutual TLS (both ends present a certificate of the
//! cluster's CA, made by `cradle cluster init` and `cradle cluster join`),
//! with the caller it was authorized for, and the serving host runs it as
//! if it had been asked. The store never sees the secret, and neither does
//! any host but the one that serves it.

use std::sync::Arc;
use std::time::Duration;

use cradle_client::{PeerTls, Target, route};
use cradle_model::answers::{CallerView, ClusterView, HostView};
use cradle_model::api::{InstancePatch, InstanceSpec, InstanceView};
use cradle_store::HostRecord;

use crate::caller::Projects;
use crate::{Caller, Core, Error, Kind, blocking};

/// The header that carries the caller to a peer.
pub const CALLER_HEADER: &str = "x-cradle-caller";
/// A host not heard of for longer than this is taken to be down.
pub const HOST_SILENCE: Duration = Duration::from_secs(60);

/// The caller a peer speaks for, from its header: the view `whoami`
/// answers (name, roles, projects; none of them secret), as JSON.
pub fn caller_from_header(header: &str) -> Option<Caller> {
    let v: CallerView = serde_json::from_str(header).ok()?;
    Some(Caller {
        name: v.name,
        roles: v.roles,
        projects: match v.all_projects {
            true => Projects::All,
            false => Projects::Only(v.projects.into_iter().collect()),
        },
    })
}

/// How this host reaches its peers: one client over the cluster's mutual
/// TLS (certificates parsed once, connections kept), if it has credentials.
#[derive(Default, Clone)]
pub struct Peers {
    client: Option<cradle_client::Client>,
}

impl Peers {
    /// With this host's cluster credentials.
    pub fn new(tls: Arc<PeerTls>) -> Result<Peers, String> {
        let target = Target::new("https://peer.invalid", "")
            .presented(cradle_client::Presented::Anonymous)
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .with_tls(tls);
        let client = cradle_client::Client::new(target).map_err(|e| e.to_string())?;
        Ok(Peers {
            client: Some(client),
        })
    }
}

fn unreachable(host: &str, why: impl std::fmt::Display) -> Error {
    Error::refused(
        Kind::Unavailable,
        "host_unavailable",
        format!(
            "host {host:?}, which serves the instance, cannot be reached: {why}; nothing was changed"
        ),
    )
}

impl Core {
    /// This host and the others that share its store (operators only).
    pub async fn cluster(&self, caller: &Caller) -> Result<ClusterView, Error> {
        crate::caller::authorize(caller, crate::caller::Action::SeeServer)?;
        let registry = self.registry.clone();
        let hosts = blocking(move || Ok(registry.hosts()?)).await?;
        let now = time::OffsetDateTime::now_utc();
        let mut placed = std::collections::BTreeMap::<String, usize>::new();
        for i in self.registry.list() {
            *placed.entry(i.host.clone()).or_default() += 1;
        }
        Ok(ClusterView {
            host: self.registry.host().to_string(),
            store: self.registry.store_backend().to_string(),
            hosts: hosts
                .into_iter()
                .map(|h| HostView {
                    up: now - h.seen_at <= HOST_SILENCE,
                    instances: placed.get(&h.name).copied().unwrap_or(0),
                    name: h.name,
                    admin_url: h.admin_url,
                    peer_url: h.peer_url,
                    metadata_address: h.metadata_address,
                    started_at: h.started_at,
                    seen_at: h.seen_at,
                })
                .collect(),
        })
    }

    /// A client for host `host`'s peer listener, speaking for `caller`.
    pub(crate) async fn peer(
        &self,
        host: &str,
        caller: &Caller,
    ) -> Result<cradle_client::Client, Error> {
        let Some(base) = &self.peers.client else {
            return Err(Error::refused(
                Kind::Conflict,
                "wrong_host",
                format!(
                    "the instance is served by host {host:?}, and this host has no cluster \
                     credentials ([cluster] tls_dir) to hand it secret parameters: give them \
                     to that host's admin API"
                ),
            ));
        };
        let record = self.host_record(host).await?;
        if record.peer_url.is_empty() {
            return Err(unreachable(
                host,
                "it has no peer listener ([cluster] peer_listen)",
            ));
        }
        let silent = time::OffsetDateTime::now_utc() - record.seen_at;
        if silent > HOST_SILENCE {
            return Err(unreachable(
                host,
                format!("it was last seen {} s ago", silent.whole_seconds()),
            ));
        }
        let target = base
            .target()
            .at(&record.peer_url)
            .with_header(
                CALLER_HEADER,
                &serde_json::to_string(&CallerView::from(caller)).expect("a view serializes"),
            )
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(base.retarget(target))
    }

    /// Host `host`'s record (from the last heartbeat while it is fresh); a
    /// host that never joined is refused.
    pub(crate) async fn host_record(&self, host: &str) -> Result<HostRecord, Error> {
        let (registry, name) = (self.registry.clone(), host.to_string());
        let found = blocking(move || Ok(registry.host_record(&name, HOST_SILENCE)?)).await?;
        found.ok_or_else(|| {
            Error::refused(
                Kind::Invalid,
                "unknown_host",
                format!(
                    "host: no host {host:?} has joined the cluster (this host is {:?}; \
                     see `cradle cluster show`)",
                    self.registry.host()
                ),
            )
        })
    }

    /// Have `host` register the instance, secrets and all.
    pub(crate) async fn create_on(
        &self,
        host: &str,
        caller: &Caller,
        spec: InstanceSpec,
    ) -> Result<InstanceView, Error> {
        let peer = self.peer(host, caller).await?;
        peer.send(route::create_instance(&spec))
            .await
            .map_err(|e| from_peer(host, e))
    }

    /// Have `host` apply the patch, secrets and all.
    pub(crate) async fn modify_on(
        &self,
        host: &str,
        caller: &Caller,
        key: &str,
        patch: InstancePatch,
    ) -> Result<InstanceView, Error> {
        let peer = self.peer(host, caller).await?;
        peer.send(route::modify_instance(key, &patch))
            .await
            .map_err(|e| from_peer(host, e))
    }
}

/// A peer's refusal, passed on as it was (same status class and code); a
/// peer that did not answer is unavailable.
pub(crate) fn from_peer(host: &str, e: cradle_client::Error) -> Error {
    match (&e, e.status()) {
        (cradle_client::Error::Api { code, message, .. }, Some(status)) => {
            let kind = match status {
                400 => Kind::BadRequest,
                401 | 403 => Kind::Forbidden,
                404 => Kind::NotFound,
                409 => Kind::Conflict,
                413 => Kind::TooLarge,
                422 => Kind::Invalid,
                429 => Kind::TooMany,
                503 => Kind::Unavailable,
                _ => Kind::Upstream,
            };
            Error::Refused {
                kind,
                code: static_code(code),
                message: message.clone(),
            }
        }
        _ => unreachable(host, e),
    }
}

/// Codes are `&'static str`; a peer's is one of ours, so map it back.
fn static_code(code: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "invalid",
        "not_found",
        "conflict",
        "busy",
        "wrong_host",
        "forbidden",
        "store_unavailable",
        "storage",
        "too_large",
        "queue_full",
        "unknown_host",
        "no_space",
        "transport",
        "cancelled",
        "vm",
    ];
    KNOWN
        .iter()
        .find(|k| **k == code)
        .copied()
        .unwrap_or("peer")
}
