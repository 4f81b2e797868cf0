//! What a guest may do. A [`Guest`] is the instance whose metadata address
//! is the source address of a connection, found by [`Core::guest`]; that
//! is the only identity a guest has. What its request presents (an IMDSv2
//! token, the `Metadata-Flavor` header) is checked against the namespace it
//! reads by [`Core::authorize_guest`] before anything else. Then
//! it reads its own documents (from the one renderer, through the cache),
//! uses the channel, sets its password once, and, while it is being
//! installed, reads its install files.
//!
//! Nothing here blocks the metadata service's single-threaded workers: the
//! store is reached on the blocking pool, and the appliance's package is
//! served from the one buffer its job holds.

mod cache;
mod token;
mod wait;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cradle_model::{ImdsTokens, Instance};
use cradle_registry::ChannelDirection;
use cradle_registry::jobs::Forwarded;
use cradle_render::{Context, Resolved};
use tracing::warn;

pub use cache::Doc;
pub use wait::{DEFAULT_WAIT, WaitLimits};

use crate::{Core, Error, Kind, blocking};

/// The guest-side state: the token key (drawn at start, so tokens die with
/// the process) and the render cache.
pub(crate) struct Guests {
    tokens: token::TokenKey,
    cache: cache::RenderCache,
    max_token_ttl: u32,
    /// Shared with the registry's change hook, which wakes them.
    pub(crate) waits: Arc<wait::Waiters>,
}

impl Guests {
    pub(crate) fn new(
        cache_bytes: usize,
        max_token_ttl: u32,
        waits: WaitLimits,
        metrics: Arc<cradle_registry::metrics::Metrics>,
    ) -> Guests {
        Guests {
            tokens: token::TokenKey::generate(),
            cache: cache::RenderCache::new(cache_bytes),
            max_token_ttl,
            waits: Arc::new(wait::Waiters::new(waits, metrics)),
        }
    }
}

/// What a waiting request waits for: a document whose tag differs from
/// `last_etag` (the document's tag when the request came, when it names
/// none), for at most `timeout`.
#[derive(Debug, Clone)]
pub struct Wait {
    pub last_etag: Option<String>,
    pub timeout: std::time::Duration,
}

/// A guest, known by the source address of its connection.
#[derive(Clone)]
pub struct Guest {
    instance: Arc<Instance>,
}

impl Guest {
    pub fn id(&self) -> uuid::Uuid {
        self.instance.id
    }

    pub(crate) fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }
}

/// The three trees a guest reads, each with its own token rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespace {
    /// `/`, `/<version>/…` and `/latest/…`: EC2's.
    Ec2,
    /// `/openstack/…`.
    OpenStack,
    /// `/cradle/…` (alias `/ganeti/…`).
    Native,
}

impl Namespace {
    /// The namespace of a path split into segments.
    pub fn of(segs: &[&str]) -> Namespace {
        match segs.first() {
            Some(&"cradle") | Some(&"ganeti") => Namespace::Native,
            Some(&"openstack") => Namespace::OpenStack,
            _ => Namespace::Ec2,
        }
    }

    /// The label the metadata service's requests are counted under.
    pub fn label(self) -> &'static str {
        match self {
            Namespace::Ec2 => "ec2",
            Namespace::OpenStack => "openstack",
            Namespace::Native => "cradle",
        }
    }
}

/// What a guest's request presents besides its source address.
#[derive(Debug, Clone, Copy, Default)]
pub struct Presented<'a> {
    /// `X-aws-ec2-metadata-token`, when the request has one.
    pub token: Option<&'a [u8]>,
    /// Whether it carries `Metadata-Flavor: cradle`.
    pub flavor: bool,
}

/// A file of the running install job, for the appliance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallFile<'a> {
    /// `install.json`.
    Manifest,
    /// An untrusted script of the OS definition, by name.
    Script(&'a str),
    /// The personalization package.
    Package,
}

/// Where a message the guest wrote went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Its install job took it (an agent report, or input for the trusted
    /// script).
    Job,
    /// Queued for the operator, with this id.
    Queued(i64),
    /// A guest agent's report or answer, which the host keeps.
    Agent,
}

/// Milliseconds since the Unix epoch. Token expiry is kept in milliseconds:
/// in whole seconds a token issued late in a second would lose most of its
/// first second (a one-second token could be dead on arrival).
fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Days since the epoch: cached answers are valid for one day, since the
/// OpenStack versions offered depend on the date.
fn unix_day() -> u64 {
    unix_now_ms() / 86_400_000
}

/// A tag without its quotes (or weak marker): GCE's clients send
/// `last_etag` bare, HTTP's send it quoted.
fn bare_tag(tag: &str) -> String {
    tag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

fn today() -> String {
    cradle_render::date(time::OffsetDateTime::now_utc())
}

impl Core {
    /// The guest whose requests come from `source`: the only way a guest is
    /// identified. While it is being installed, its job notes the
    /// appliance's first request.
    /// Whether `source` is the metadata address of an instance this host
    /// serves. Unlike [`Core::guest`] it marks nothing as seen: the
    /// listener asks it at accept, before any request.
    pub fn knows_source(&self, source: IpAddr) -> bool {
        self.registry.by_address(source).is_some()
    }

    pub fn guest(&self, source: IpAddr) -> Option<Guest> {
        let instance = self.registry.by_address(source)?;
        // Only an instance being installed has a running job: its state
        // says so without taking the jobs' lock on every request.
        if instance.state.is_busy()
            && let Some(job) = self.registry.running_install(instance.id)
        {
            job.saw_request();
        }
        Some(Guest { instance })
    }

    /// Whether a request may read `namespace`, by what it presents (the
    /// table in docs/metadata-api.md). A token that is presented must be
    /// good, in every namespace. Without one, the instance's `imds_tokens`
    /// rules the EC2 and OpenStack paths, and the native namespace, where
    /// private and secret parameters leave cradle, wants the
    /// `Metadata-Flavor: cradle` header: a request whose only choice is the
    /// URL (an SSRF, a browser's cross-site request) gets nothing there.
    pub fn authorize_guest(
        &self,
        guest: &Guest,
        namespace: Namespace,
        presented: Presented<'_>,
    ) -> Result<(), Error> {
        if let Some(t) = presented.token {
            let ok = std::str::from_utf8(t).ok().map(|t| {
                self.guests
                    .tokens
                    .check(t, guest.instance.id, unix_now_ms())
            });
            return match ok {
                Some(Ok(())) => Ok(()),
                _ => Err(Error::Unauthorized(
                    "the IMDSv2 token in X-aws-ec2-metadata-token is invalid or expired; \
                     get a new one with PUT /latest/api/token",
                )),
            };
        }
        let tokens = guest.instance.imds_tokens;
        match namespace {
            Namespace::Native if presented.flavor => Ok(()),
            Namespace::Native => Err(Error::forbidden(
                "the native namespace needs the header Metadata-Flavor: cradle \
                 (or an IMDSv2 token in X-aws-ec2-metadata-token)",
            )),
            Namespace::Ec2 if tokens != ImdsTokens::Optional => Err(Error::Unauthorized(
                "this instance requires an IMDSv2 token: PUT /latest/api/token with \
                 X-aws-ec2-metadata-token-ttl-seconds, then send it in X-aws-ec2-metadata-token",
            )),
            Namespace::OpenStack if tokens == ImdsTokens::Strict => Err(Error::Unauthorized(
                "this instance requires an IMDSv2 token on OpenStack paths too \
                 (imds_tokens = strict): PUT /latest/api/token with \
                 X-aws-ec2-metadata-token-ttl-seconds, then send it in X-aws-ec2-metadata-token",
            )),
            Namespace::Ec2 | Namespace::OpenStack => Ok(()),
        }
    }

    /// The longest token a guest may ask for, in seconds.
    pub fn max_token_ttl(&self) -> u32 {
        self.guests.max_token_ttl
    }

    /// An IMDSv2 session token for the guest, valid `ttl` seconds (1 up to
    /// [`Core::max_token_ttl`]).
    pub fn issue_token(&self, guest: &Guest, ttl: u32) -> Result<String, Error> {
        if !(1..=self.guests.max_token_ttl).contains(&ttl) {
            return Err(Error::refused(
                Kind::BadRequest,
                "bad_request",
                format!(
                    "the TTL must be from 1 to {} seconds",
                    self.guests.max_token_ttl
                ),
            ));
        }
        Ok(self
            .guests
            .tokens
            .issue(guest.instance.id, unix_now_ms() + u64::from(ttl) * 1000))
    }

    /// The document at `path` (split into `segs`) of the guest's own trees.
    /// Dynamic vendordata has its own cache; a fatal failure of it puts the
    /// instance in state `error` (with an event) and answers
    /// `vendordata_failed`.
    pub async fn document(&self, guest: &Guest, path: &str, segs: &[&str]) -> Result<Doc, Error> {
        let inst = &guest.instance;
        let dynamic = match segs {
            ["openstack", _, "vendor_data2.json"] if !self.vendordata.is_empty() => {
                match self.vendordata.fetch(inst).await {
                    Ok(d) => Some(d.entries),
                    Err(fatal) => return Err(self.vendordata_failed(inst, &fatal).await),
                }
            }
            _ => None,
        };
        // The native namespace carries OS parameters: never cached.
        let cacheable = Namespace::of(segs) != Namespace::Native && dynamic.is_none();
        // Signed identity documents are cached under the key that signed
        // them (signatures are deterministic), so that after a rotation the
        // old key's are never served, and each is signed once per version
        // of its instance rather than on every read.
        // The key set is looked up only for those, so a cached read of
        // anything else takes no lock of it.
        let signed = matches!(segs, [.., "instance-identity", f]
            if cradle_render::SIGNED_IDENTITY_FILES.contains(f));
        let (key, keys) = if signed {
            let keys = self.identity.keys();
            (
                std::borrow::Cow::Owned(format!("{path}#{}", keys.kid())),
                Some(keys),
            )
        } else {
            (std::borrow::Cow::Borrowed(path), None)
        };
        let day = unix_day();
        if cacheable && let Some(doc) = self.guests.cache.get(inst, day, &key) {
            return Ok(doc);
        }
        let today = today();
        let signer = crate::identity::Signer(keys.unwrap_or_else(|| self.identity.keys()));
        let ctx = Context::new(&today, &self.vendor_data).with_identity(&signer);
        let ctx = match &dynamic {
            Some(d) => ctx.with_dynamic(d),
            None => ctx,
        };
        let doc = match cradle_render::root(inst, &ctx).resolve(segs) {
            Some(Resolved::File(bytes)) => {
                let last = segs.last().copied().unwrap_or("");
                let json = last.ends_with(".json")
                    || last == "document"
                    || matches!(segs, ["cradle" | "ganeti", "latest", "events"]);
                let content_type = if json {
                    "application/json"
                } else if last == "user-data" || last == "user_data" {
                    "application/octet-stream"
                } else {
                    "text/plain; charset=utf-8"
                };
                Doc::new(content_type, bytes.into())
            }
            Some(Resolved::Listing(bytes)) => Doc::new("text/plain; charset=utf-8", bytes.into()),
            None => return Err(Error::not_found("not_found", "no such document")),
        };
        if cacheable {
            self.guests.cache.put(inst, day, &key, doc.clone());
        }
        Ok(doc)
    }

    /// The document at `path` once it differs from what `wait` names, or
    /// when the wait times out (then as it is), or when the server shuts
    /// down. The request holds a place among the waiters (capped per
    /// instance and in total: past a cap it is refused with 429) and
    /// sleeps until its instance changes; nothing polls.
    pub async fn wait_document(
        &self,
        guest: &Guest,
        path: &str,
        segs: &[&str],
        wait: Wait,
    ) -> Result<Doc, Error> {
        let waits = &self.guests.waits;
        let max = waits.limits().max_timeout;
        if wait.timeout.is_zero() || wait.timeout > max {
            return Err(Error::refused(
                Kind::BadRequest,
                "bad_request",
                format!("timeout_sec must be from 1 to {}", max.as_secs()),
            ));
        }
        let place = waits.join(guest.instance.id).map_err(|full| {
            let message = match full {
                wait::Full::Total(n) => {
                    format!("{n} requests are waiting for changes already, from every guest")
                }
                wait::Full::Instance(n) => {
                    format!("this instance has {n} requests waiting for changes already")
                }
            };
            Error::refused(Kind::TooMany, "too_many_waiting", message)
        })?;
        let deadline = tokio::time::Instant::now() + wait.timeout;
        let last = wait.last_etag.as_deref().map(bare_tag);
        self.wait_on(&place, guest.clone(), path, segs, last, deadline)
            .await
    }

    async fn wait_on(
        &self,
        place: &wait::Place<'_>,
        mut guest: Guest,
        path: &str,
        segs: &[&str],
        mut last: Option<String>,
        deadline: tokio::time::Instant,
    ) -> Result<Doc, Error> {
        loop {
            // Listen before looking, so a change between the two is not missed.
            let woken = place.notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let doc = self.document(&guest, path, segs).await?;
            let tag = doc.tag();
            let last = last.get_or_insert_with(|| bare_tag(&tag));
            if bare_tag(&tag) != *last || self.guests.waits.closed() {
                return Ok(doc);
            }
            tokio::select! {
                () = woken => {}
                () = tokio::time::sleep_until(deadline) => return Ok(doc),
            }
            // The instance as it is now, if it is still this guest's.
            guest = match self.registry.get(&guest.instance.id.to_string()) {
                Ok(i)
                    if self.registry.is_local(&i)
                        && i.metadata_address == guest.instance.metadata_address =>
                {
                    Guest { instance: i }
                }
                _ => return Err(Error::not_found("not_found", "no such document")),
            };
        }
    }

    /// End every wait: each answers its document as it is. For shutdown.
    pub fn end_waits(&self) {
        self.guests.waits.close();
    }

    async fn vendordata_failed(&self, inst: &Instance, fatal: &cradle_vendordata::Fatal) -> Error {
        let reason = fatal.to_string();
        warn!(instance = %inst.id, reason = %reason, "fatal vendordata failure; instance set to error");
        let (registry, id, why) = (self.registry.clone(), inst.id, reason.clone());
        if let Err(e) =
            blocking(move || Ok(registry.set_error(id, "vendordata", &why).map(|_| ())?)).await
        {
            warn!(instance = %inst.id, error = %e, "cannot record the vendordata failure");
        }
        Error::unavailable("vendordata_failed", reason)
    }

    /// Whether the guest's OpenStack `version` has a password file (only
    /// those take a password).
    pub fn has_password_file(&self, guest: &Guest, version: &str) -> bool {
        let today = today();
        let ctx = Context::new(&today, &self.vendor_data);
        cradle_render::openstack_versions(&guest.instance, &ctx)
            .resolve(&[version, "password"])
            .is_some()
    }

    /// Set the guest's password, once.
    pub async fn set_password(&self, guest: &Guest, password: String) -> Result<(), Error> {
        let (registry, id) = (self.registry.clone(), guest.instance.id);
        blocking(move || Ok(registry.set_password(id, &password)?)).await
    }

    /// The largest message the guest may write on the channel.
    pub fn max_message_bytes(&self) -> usize {
        self.registry.limits().message_bytes
    }

    /// Take the oldest message queued for the guest, if any.
    pub async fn read_message(
        &self,
        guest: &Guest,
    ) -> Result<Option<cradle_store::Message>, Error> {
        let (registry, id) = (self.registry.clone(), guest.instance.id);
        blocking(move || Ok(registry.pop_message(id, ChannelDirection::ToGuest)?)).await
    }

    /// A message the guest wrote. While it is being installed, the agent's
    /// reports are its job's, and anything else goes to the job's trusted
    /// script when one runs (the two halves of an OS definition talk through
    /// the channel); a trusted script that has not caught up makes the
    /// writer wait (`queue_full`). Otherwise it is queued for the operator.
    pub async fn write_message(&self, guest: &Guest, body: Bytes) -> Result<Written, Error> {
        // The guest agent's reports and answers are the host's to keep.
        match cradle_model::agent::FromAgent::parse(&body) {
            Ok(Some(m)) => {
                self.agent_message(guest, m).await?;
                return Ok(Written::Agent);
            }
            Ok(None) => {}
            Err(e) => return Err(Error::refused(Kind::BadRequest, "bad_request", e)),
        }
        if let Some(job) = self.registry.running_install(guest.instance.id) {
            if job.agent_message(&body) {
                return Ok(Written::Job);
            }
            match job.forward(&body) {
                Forwarded::Sent => return Ok(Written::Job),
                Forwarded::Full => {
                    return Err(cradle_registry::RegistryError::QueueFull(
                        cradle_registry::jobs::FORWARD_QUEUE,
                    )
                    .into());
                }
                Forwarded::NoListener => {}
            }
        }
        let (registry, id) = (self.registry.clone(), guest.instance.id);
        let n = blocking(move || Ok(registry.push_message(id, ChannelDirection::ToHost, &body)?))
            .await?;
        Ok(Written::Queued(n))
    }

    /// A file of the guest's running install job: only the instance being
    /// installed has one, and only while it runs. The package's SHA-256
    /// comes with it.
    pub fn install_file(
        &self,
        guest: &Guest,
        file: InstallFile<'_>,
    ) -> Result<(Bytes, Option<String>), Error> {
        let artifacts = self
            .registry
            .running_install(guest.instance.id)
            .and_then(|job| job.artifacts())
            .ok_or_else(|| {
                Error::not_found(
                    "no_install_job",
                    "no install job is running for this instance",
                )
            })?;
        match file {
            InstallFile::Manifest => Ok((artifacts.manifest.clone(), None)),
            InstallFile::Script(name) => match artifacts.scripts.get(name) {
                Some(b) => Ok((b.clone(), None)),
                None => Err(Error::not_found(
                    "no_script",
                    "the OS definition has no such untrusted script",
                )),
            },
            InstallFile::Package => match &artifacts.package {
                Some(p) => Ok((p.bytes.clone(), Some(p.sha256.clone()))),
                None => Err(Error::not_found(
                    "no_personalization",
                    "the instance has no personalization package",
                )),
            },
        }
    }
}
