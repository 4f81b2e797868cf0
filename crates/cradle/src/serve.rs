//! `cradle serve`: open the data directory, then run the admin API and the
//! metadata service until SIGINT or SIGTERM.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cradle_secgroups::nft::{MarkBits, NftEnforcer};
use cradle_secgroups::worker::{FirewallMetrics, Worker};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;
use cradle_config::{Config, LogFormat};
use cradle_core::{Caller, Core, Metrics};
use cradle_model::Secret;
use cradle_model::api::{InstanceSpec, InstanceView};
use cradle_registry::{ChannelLimits, Registry};
use cradle_store::{PgStore, SqliteStore, Store};
use rand::RngCore;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "With no flags, serve runs on the embedded SQLite store in ./cradle-data, \
the admin API on 127.0.0.1:8774 and the metadata service on 127.0.0.1:8775. In production the \
metadata service listens on 169.254.169.254:80.\n\nEvery setting can also come from --config FILE \
or from CRADLE_<SECTION>_<KEY> environment variables; see docs/configuration.md."
)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory for the database and the generated admin token [default: ./cradle-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Admin API address [default: 127.0.0.1:8774].
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    /// Metadata service address [default: 127.0.0.1:8775; production: 169.254.169.254:80].
    #[arg(long, value_name = "ADDR")]
    metadata_listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormatArg>,
    /// Register a demo instance at 127.0.0.2 and print how to read its metadata as that guest.
    #[arg(long)]
    demo: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let mut config = Config::load(args.config.as_deref(), std::env::vars())?;
    if let Some(d) = args.data_dir {
        config.server.data_dir = d;
    }
    if let Some(a) = args.admin_listen {
        config.admin.listen = a;
    }
    if let Some(a) = args.metadata_listen {
        config.metadata.listen = a;
    }
    if let Some(f) = args.log_format {
        config.log.format = match f {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        };
    }
    init_logging(&config)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(serve(config, args.demo))
}

fn init_logging(config: &Config) -> Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) => {
            tracing_subscriber::EnvFilter::try_new(f).context("RUST_LOG is not a valid filter")?
        }
        Err(_) => tracing_subscriber::EnvFilter::try_new(&config.log.level)
            .with_context(|| format!("log.level {:?} is not a valid filter", config.log.level))?,
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

/// The installer's settings from `[install]` and `[os]`.
fn install_settings(config: &Config, metadata_port: u16) -> Result<cradle_install::Settings> {
    let i = &config.install;
    if i.timeout == 0 {
        bail!("install.timeout must be at least 1 second");
    }
    cradle_model::machine::check_memory(i.memory_mib)
        .map_err(anyhow::Error::msg)
        .context("install.memory_mib")?;
    Ok(cradle_install::Settings {
        appliance: i.appliance.clone(),
        qemu: i.qemu.clone(),
        accel: i
            .accel
            .parse()
            .map_err(anyhow::Error::msg)
            .context("install.accel")?,
        timeout: Duration::from_secs(i.timeout),
        memory_mib: i.memory_mib,
        metadata_port: match i.metadata_port {
            0 => metadata_port,
            p => p,
        },
        comm: cradle_install::Comm {
            ip: i.ip.clone(),
            nft: i.nft.clone(),
        },
        run_dir: config.server.data_dir.join("run"),
        os_search: cradle_os::search_path(&config.os.search_path),
        script_user: config.os.script_user.clone(),
        qemu_img: i.qemu_img.clone(),
        dnsmasq: i.dnsmasq.clone(),
        spool_dir: config.server.data_dir.join("spool"),
        stream_max_bytes: i.stream_max_bytes,
    })
}

/// Remove what imports that ran when the server stopped spooled.
fn remove_spooled(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if name.to_string_lossy().starts_with("import-") {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    info!(file = %e.path().display(), "removed the dump of an interrupted import")
                }
                Err(err) => {
                    warn!(file = %e.path().display(), error = %err, "cannot remove an interrupted import's dump")
                }
            }
        }
    }
}

/// Lift the soft limit on open files to the hard one: the connection caps
/// are only what the listeners hold if the kernel lets them hold it (many
/// systems start services at a soft limit of 1024).
fn raise_open_files(config: &Config) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            warn!(error = %e, "cannot raise the open-file limit");
        }
    }
    let wanted = (config.metadata.max_connections + 2 * config.admin.max_connections + 256) as u64;
    let have = getrlimit(Resource::Nofile).current;
    if let Some(have) = have.filter(|h| *h < wanted) {
        warn!(
            open_files = have,
            wanted,
            "the open-file limit is below what metadata.max_connections and admin.max_connections hold; past it, accepts fail"
        );
    }
}

async fn serve(config: Config, demo: bool) -> Result<()> {
    // Validate everything before the first write to the data directory.
    let drive_limits = cradle_drive::Limits {
        vfat_bytes: config.drive.vfat_bytes,
        max_bytes: config.drive.max_bytes,
    };
    drive_limits.check().context("drive.vfat_bytes")?;
    let vendor_data = match &config.vendordata.static_file {
        None => serde_json::json!({}),
        Some(path) => {
            let text = std::fs::read(path).with_context(|| {
                format!("cannot read vendordata.static_file {}", path.display())
            })?;
            serde_json::from_slice(&text)
                .with_context(|| format!("vendordata.static_file {} is not JSON", path.display()))?
        }
    };
    raise_open_files(&config);
    let mut metrics = Metrics::new();
    let firewall_metrics = FirewallMetrics::default();
    firewall_metrics.register(metrics.registry_mut());
    let vendordata = Arc::new(
        cradle_vendordata::Vendordata::new(
            config.vendordata.dynamic.clone(),
            metrics.registry_mut(),
        )
        .context("vendordata.dynamic")?,
    );
    let metrics = Arc::new(metrics);
    let data_dir = &config.server.data_dir;
    create_private_dir(data_dir)?;
    let token = match &config.admin.token {
        Some(t) if t.trim().is_empty() => bail!("admin.token is set but empty"),
        Some(t) => Secret::new(t.trim().to_string()),
        None => load_or_create_token(&data_dir.join("admin.token"))?,
    };

    let tokens = cradle_admin::Tokens::new(token, config.admin.tokens_file.clone())
        .map_err(anyhow::Error::msg)
        .context("admin.tokens_file")?;
    let identity = load_identity(&config)?;
    let host = host_name(&config)?;
    let started = std::time::Instant::now();
    // The PostgreSQL client blocks, and may not run on the runtime's workers.
    let registry = tokio::task::block_in_place(|| open_registry(&config, &host))?;
    let registry = Arc::new(registry);
    info!(
        host = %host,
        store = registry.store_backend(),
        instances = registry.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "registry loaded"
    );
    let mark = MarkBits::new(config.firewall.mark_mask)
        .map_err(anyhow::Error::msg)
        .context("[firewall] mark_mask")?;
    let enforced = start_firewall(&config, &registry, mark, firewall_metrics, demo)?;

    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("cannot listen on {} for the admin API", config.admin.listen))?;
    let workers = match config.metadata.workers {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    };
    let metadata_listeners =
        cradle_metadata::bind(config.metadata.listen, workers).with_context(|| {
            format!(
                "cannot listen on {} for the metadata service",
                config.metadata.listen
            )
        })?;
    let admin_addr = admin_listener.local_addr()?;
    let metadata_addr = metadata_listeners[0].local_addr()?;
    let peers = peer_credentials(&config)?;
    let peer_listener = match config.cluster.peer_listen {
        None => None,
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} for peers ([cluster] peer_listen)")
        })?),
    };
    let peer_url = match &peer_listener {
        None => String::new(),
        Some(l) => {
            let addr = l.local_addr()?;
            match addr.ip().is_unspecified() {
                true => format!("https://{host}:{}", addr.port()),
                false => format!("https://{addr}"),
            }
        }
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let failed = tokio::task::block_in_place(|| registry.fail_interrupted_installs())
        .context("cannot mark interrupted installs")?;
    // No import survives a restart: the dumps they spooled go.
    remove_spooled(&config.server.data_dir.join("spool"));
    tokio::task::block_in_place(|| {
        cluster_threads(
            &config,
            &registry,
            &host,
            admin_addr,
            metadata_addr,
            &peer_url,
        )
    });
    if !failed.is_empty() {
        warn!(instances = ?failed, "installs interrupted by a server stop are now install_failed");
    }
    let core = Core::new(cradle_core::Parts {
        registry,
        install: install_settings(&config, metadata_addr.port())?,
        metrics,
        vendor_data,
        vendordata,
        drive_limits,
        firewall_table: config.firewall.table.clone(),
        firewall_enforced: enforced,
        firewall_mark: mark,
        render_cache_bytes: config.metadata.cache_bytes,
        max_token_ttl: config.metadata.max_token_ttl,
        waits: cradle_core::WaitLimits {
            total: config.metadata.max_waiting,
            per_instance: config.metadata.max_waiting_per_instance,
            max_timeout: Duration::from_secs(config.metadata.max_wait_timeout),
        },
        peers: match peers.0 {
            Some(tls) => cradle_core::peers::Peers::new(tls)
                .map_err(anyhow::Error::msg)
                .context("[cluster] tls_dir")?,
            None => Default::default(),
        },
        migration: cradle_core::migrate::MigrationSettings {
            disk_dir: match config.cluster.disk_dir.as_str() {
                "" => data_dir.join("disks"),
                d => std::path::PathBuf::from(d),
            },
            ssh_address: config.cluster.ssh_address.clone(),
            remote: crate::remote::from_config(config.remote.clone()),
        },
        maintenance: cradle_core::MaintenanceSettings {
            history: config.maintenance.history,
            stop_grace: std::time::Duration::from_secs(config.maintenance.stop_grace.min(3600)),
        },
        identity,
    });
    // Installed before the "listening" lines, so that a SIGHUP sent once
    // they are out reloads rather than ends the process.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install a SIGHUP handler")?;
    let reloading = core.clone();
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match reloading.reload_identity().await {
                Ok(kids) => info!(keys = ?kids, "SIGHUP: identity key set reloaded"),
                Err(e) => {
                    warn!(error = %e, "SIGHUP: identity key set not reloaded; the one in use stays")
                }
            }
        }
    });
    core.spawn_maintenance();
    let admin_state = Arc::new(cradle_admin::AdminState {
        core: core.clone(),
        tokens,
        max_body_bytes: config.admin.max_body_bytes,
        limits: cradle_admin::Limits {
            caps: cradle_limits::Caps {
                total: config.admin.max_connections,
                per_source: config.admin.max_connections_per_source,
                per_unknown_source: config.admin.max_connections_per_source,
            },
            header_timeout: Duration::from_secs(config.admin.header_timeout),
        },
    });
    if let (Some(listener), Some(tls)) = (peer_listener, peers.1) {
        info!(url = %peer_url, "listening for peers (mutual TLS)");
        tokio::spawn(cradle_admin::serve_peers(
            listener,
            admin_state.clone(),
            tls,
            stopped(stop_rx.clone()),
        ));
    }
    let admin = tokio::spawn(cradle_admin::serve(
        admin_listener,
        admin_state,
        stopped(stop_rx.clone()),
    ));
    let settings = cradle_metadata::Settings {
        hop_limit: config.metadata.hop_limit,
        caps: cradle_limits::Caps {
            total: config.metadata.max_connections,
            per_source: config.metadata.max_connections_per_source,
            per_unknown_source: config.metadata.max_connections_per_unknown_source,
        },
        rate: config.metadata.rate_limit,
        burst: config.metadata.rate_burst,
        header_timeout: Duration::from_secs(config.metadata.header_timeout),
        body_timeout: Duration::from_secs(config.metadata.body_timeout),
        max_body_bytes: config.metadata.max_body_bytes,
    };
    let service = Arc::new(cradle_metadata::MetadataService::new(
        core.clone(),
        settings,
    ));
    let metadata = cradle_metadata::serve_workers(metadata_listeners, service, stop_rx)
        .context("cannot start the metadata workers")?;

    info!(instances = core.instance_count(), data_dir = %data_dir.display(), "cradle started");
    // These two lines are the contract with scripts and tests that start
    // cradle on port 0: they name the ports actually bound.
    let demo_instance = match demo {
        true => Some(demo_instance(&core).await?),
        false => None,
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", cradle_client::announce::admin_line(admin_addr))?;
    writeln!(
        out,
        "{}",
        cradle_client::announce::metadata_line(metadata_addr)
    )?;
    if let Some(demo) = &demo_instance {
        print_demo(&mut out, demo, admin_addr, metadata_addr, data_dir)?;
    }
    out.flush()?;
    drop(out);

    shutdown_signal().await;
    info!("shutting down");
    core.shutdown().await;
    let _ = stop_tx.send(true);
    admin.await.context("admin task")?.context("admin API")?;
    let workers = tokio::task::spawn_blocking(move || {
        metadata.into_iter().map(|h| h.join()).collect::<Vec<_>>()
    })
    .await
    .context("metadata workers")?;
    for w in workers {
        w.map_err(|_| anyhow::anyhow!("a metadata worker panicked"))?
            .context("metadata service")?;
    }
    Ok(())
}

/// The identity key set: a cluster host's is the cluster's (from `cradle
/// cluster join`) and must be there; a standalone server makes its own at
/// first start.
fn load_identity(config: &Config) -> Result<cradle_core::identity::Identity> {
    let dir = config.identity.dir(&config.cluster, &config.server);
    let now = cradle_identity::unix_now();
    let keys = match (&config.identity.dir, &config.cluster.tls_dir) {
        (None, Some(tls)) => match cradle_identity::KeySet::load(&dir, now) {
            Ok(keys) => keys,
            Err(cradle_identity::Error::Missing { .. }) => bail!(
                "{} has no identity key set: every host of a cluster signs guests' identity with \
                 the cluster's key, which `cradle cluster join` copies into <out>/identity. Rerun \
                 `cradle cluster join` for this host into {} or copy the CA directory's \
                 identity/ to {} (or set [identity] dir)",
                dir.display(),
                tls.display(),
                dir.display()
            ),
            Err(e) => return Err(e).context("[identity]"),
        },
        _ => {
            let params = crate::identity::params(&config.identity);
            let (keys, new) = cradle_identity::KeySet::load_or_create(&dir, &params, now)
                .context("[identity] dir")?;
            if new {
                info!(dir = %dir.display(), key = keys.kid(), "generated the identity key set");
            }
            keys
        }
    };
    info!(dir = %dir.display(), key = keys.kid(), keys = keys.kids().len(), "identity key set loaded");
    cradle_core::identity::Identity::new(
        Some(dir),
        keys,
        config.identity.issuer.clone(),
        config.identity.token_lifetime,
    )
    .map_err(anyhow::Error::msg)
    .context("[identity]")
}

/// This host's name: `[cluster] host`, else the machine's hostname.
fn host_name(config: &Config) -> Result<String> {
    let name = match config.cluster.host.trim() {
        "" => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("cannot read the hostname; set [cluster] host")?
            .trim()
            .to_string(),
        h => h.to_string(),
    };
    cradle_model::api::parse_host_name("cluster.host", &name).map_err(anyhow::Error::msg)
}

/// The store (`[store] url`, else SQLite in the data directory) and the
/// registry over it.
fn open_registry(config: &Config, host: &str) -> Result<Registry> {
    let store: Arc<dyn Store> = match &config.store.url {
        Some(url) => Arc::new(
            PgStore::connect(url).context("cannot open the store at [store] url (PostgreSQL)")?,
        ),
        None => {
            let db = config.server.data_dir.join("cradle.db");
            // Private parameters live in this file: create it for the owner
            // only (SQLite gives its -wal and -shm files the same mode).
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&db)
                .with_context(|| format!("cannot create the database {}", db.display()))?;
            Arc::new(
                SqliteStore::open(&db)
                    .with_context(|| format!("cannot open the database {}", db.display()))?,
            )
        }
    };
    let limits = ChannelLimits {
        queue_len: config.channel.queue_len,
        message_bytes: config.channel.message_bytes,
    };
    let mut registry = Registry::open(store, limits, host).context("cannot load instances")?;
    if config.security_groups.enabled {
        registry = registry
            .enable_security_groups(cradle_secgroups::state::Limits {
                max_rules_per_group: config.security_groups.max_rules_per_group,
            })
            .context("cannot load security groups")?;
    }
    Ok(registry)
}

/// This host's cluster credentials: for calling peers, and for its peer
/// listener when it has one.
fn peer_credentials(
    config: &Config,
) -> Result<(
    Option<Arc<cradle_client::PeerTls>>,
    Option<rustls::ServerConfig>,
)> {
    let Some(dir) = &config.cluster.tls_dir else {
        if config.cluster.peer_listen.is_some() {
            bail!("[cluster] peer_listen needs [cluster] tls_dir (see `cradle cluster join`)");
        }
        return Ok((None, None));
    };
    let client = cradle_client::PeerTls::from_dir(dir).map_err(anyhow::Error::msg)?;
    let server = match config.cluster.peer_listen {
        None => None,
        Some(_) => Some(
            cradle_admin::server_tls(dir)
                .map_err(anyhow::Error::msg)
                .context("[cluster] tls_dir")?,
        ),
    };
    Ok((Some(Arc::new(client)), server))
}

/// On a shared store: follow other hosts' changes, and say this host is up.
fn cluster_threads(
    config: &Config,
    registry: &Arc<Registry>,
    host: &str,
    admin: SocketAddr,
    metadata: SocketAddr,
    peer_url: &str,
) {
    let every = Duration::from_secs(config.cluster.resync_interval.max(1));
    if registry.follow(every).is_none() {
        return;
    }
    let record = cradle_store::HostRecord {
        name: host.to_string(),
        admin_url: format!("http://{admin}"),
        peer_url: peer_url.to_string(),
        metadata_address: metadata.to_string(),
        started_at: time::OffsetDateTime::now_utc(),
        seen_at: time::OffsetDateTime::now_utc(),
    };
    // The first record before serving: once `serve` says it listens, the
    // other hosts know this one.
    if let Err(e) = registry.heartbeat(&record) {
        warn!(error = %e, "cannot record this host in the store yet; retrying");
    }
    let every = Duration::from_secs(config.cluster.heartbeat_interval.max(1));
    let registry = registry.clone();
    std::thread::Builder::new()
        .name("cradle-heartbeat".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                let mut record = record.clone();
                record.seen_at = time::OffsetDateTime::now_utc();
                if let Err(e) = registry.heartbeat(&record) {
                    tracing::debug!(error = %e, "cannot record the heartbeat");
                }
            }
        })
        .expect("spawn the heartbeat thread");
}

/// Start the firewall's worker and ask it for the whole ruleset, so the
/// kernel matches the registry after a restart or a crash. Serving does not
/// wait for it: a table left by the previous run keeps filtering until the
/// new elements replace it in one batch. That nft runs and may change the
/// table is checked first, so a host that cannot enforce fails at start.
/// Returns whether changes are enforced.
fn start_firewall(
    config: &Config,
    registry: &Arc<Registry>,
    mark: MarkBits,
    metrics: FirewallMetrics,
    demo: bool,
) -> Result<bool> {
    if !config.security_groups.enabled {
        return Ok(false);
    }
    if demo || !config.firewall.enabled {
        let why = if demo {
            "--demo"
        } else {
            "[firewall] enabled = false"
        };
        warn!("security groups are not enforced ({why})");
        return Ok(false);
    }
    let nft = cradle_secgroups::nft::Nft {
        program: config.firewall.nft.clone(),
        netns: Some(config.firewall.netns.clone()).filter(|n| !n.is_empty()),
    };
    let table = config.firewall.table.clone();
    nft.apply_text(&format!("add table inet {table}\n"))
        .map_err(anyhow::Error::msg)
        .context(
            "cannot apply the firewall ruleset; it needs nft and CAP_NET_ADMIN \
             (set [firewall] enabled = false, or CRADLE_FIREWALL_ENABLED=false, to run without enforcement)",
        )?;
    let enforcer = Arc::new(NftEnforcer::with_mark(nft, table.clone(), mark));
    let weak = Arc::downgrade(registry);
    let desired = Arc::new(move || {
        weak.upgrade()
            .map(|r| r.firewall_desired())
            .unwrap_or_default()
    });
    let counted = enforcer.clone();
    let worker = Worker::start(
        enforcer,
        desired,
        metrics,
        Arc::new(move || counted.elements()),
    );
    registry.set_firewall(Arc::new(worker));
    registry.enforce_all();
    info!(table = %table, "firewall: the whole ruleset is being applied");
    Ok(true)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private (mode 0700)", dir.display()))?;
    }
    Ok(())
}

/// Read the admin token, or create one: 32 random bytes, hex, written to a
/// temporary file of mode 0600 and renamed into place, so the token is never
/// visible half-written or to other users.
fn load_or_create_token(path: &Path) -> Result<Secret<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => {
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                warn!(path = %path.display(), "the admin token file is readable by other users; chmod 600 it");
            }
            return Ok(Secret::new(t.trim().to_string()));
        }
        Ok(_) => bail!(
            "{} is empty; remove it to have a new token generated",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    crate::files::write_whole(path, token.as_bytes(), 0o600)?;
    info!(path = %path.display(), "generated the admin token");
    Ok(Secret::new(token))
}

const DEMO_ADDRESS: &str = "127.0.0.2";

/// An ed25519 public key line built from fixed bytes: a well-formed example,
/// not anyone's key.
fn demo_key() -> String {
    use base64::Engine;
    let mut blob = Vec::new();
    blob.extend_from_slice(&11u32.to_be_bytes());
    blob.extend_from_slice(b"ssh-ed25519");
    blob.extend_from_slice(&32u32.to_be_bytes());
    blob.extend_from_slice(&[0x5a; 32]);
    format!(
        "ssh-ed25519 {} demo@cradle",
        base64::engine::general_purpose::STANDARD.encode(blob)
    )
}

/// The demo instance: the one at [`DEMO_ADDRESS`] if there is one (a
/// restart keeps it), else registered now.
async fn demo_instance(core: &Core) -> Result<InstanceView> {
    let system = Caller::system();
    if let Some(i) = core
        .instances(&system)?
        .into_iter()
        .find(|i| i.metadata_address.to_string() == DEMO_ADDRESS)
    {
        return Ok(i);
    }
    let mut spec = InstanceSpec {
        name: "demo".into(),
        hostname: Some("demo".into()),
        metadata_address: Some(DEMO_ADDRESS.into()),
        local_ipv4: Some("10.0.0.2/24".into()),
        gateway_ipv4: Some("10.0.0.1".into()),
        user_data: Some(
            base64::engine::general_purpose::STANDARD
                .encode("#cloud-config\nhostname: demo\nruncmd:\n  - echo provisioned by cradle\n"),
        ),
        ..Default::default()
    };
    spec.metadata.insert("role".into(), "demo".into());
    spec.public_keys.insert("demo".into(), demo_key());
    spec.os_params
        .public
        .insert("greeting".into(), "hello".into());
    match core.create_instance(&system, spec).await {
        Ok(i) => Ok(i),
        Err(e) if e.kind() == cradle_core::Kind::Conflict => {
            bail!("cannot register the demo instance: {e}")
        }
        Err(e) => Err(e).context("cannot register the demo instance"),
    }
}

fn print_demo(
    out: &mut impl Write,
    instance: &InstanceView,
    admin: SocketAddr,
    metadata: SocketAddr,
    data_dir: &Path,
) -> Result<()> {
    let m = metadata;
    writeln!(out)?;
    writeln!(
        out,
        "demo instance {} ({}) registered at {DEMO_ADDRESS}. Read its metadata as that guest:",
        instance.name, instance.id
    )?;
    writeln!(
        out,
        "  curl --interface {DEMO_ADDRESS} http://{m}/openstack/latest/meta_data.json"
    )?;
    writeln!(
        out,
        "  curl --interface {DEMO_ADDRESS} http://{m}/latest/meta-data/"
    )?;
    writeln!(
        out,
        "  curl --interface {DEMO_ADDRESS} -H 'Metadata-Flavor: cradle' http://{m}/cradle/latest/os/parameters.json"
    )?;
    writeln!(out, "IMDSv2:")?;
    writeln!(
        out,
        "  TOKEN=$(curl -s --interface {DEMO_ADDRESS} -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' http://{m}/latest/api/token)"
    )?;
    writeln!(
        out,
        "  curl --interface {DEMO_ADDRESS} -H \"X-aws-ec2-metadata-token: $TOKEN\" http://{m}/latest/meta-data/instance-id"
    )?;
    writeln!(
        out,
        "Manage it through the admin API (token in {}):",
        data_dir.join("admin.token").display()
    )?;
    writeln!(
        out,
        "  cargo run --release -- instance show demo --url http://{admin}"
    )?;
    Ok(())
}
