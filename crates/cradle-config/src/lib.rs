//! cradle's configuration: one TOML file, every key optional.
//!
//! Precedence, lowest first: built-in defaults, the file, `CRADLE_<SECTION>_<KEY>`
//! environment variables, then command-line flags (applied by the binary).
//! Every key is documented in `docs/configuration.md`; a test keeps the two
//! in step.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use cradle_remotefs::Transport;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The cause is in the message and deliberately not a `source`: callers
    // print the chain (`{:#}`), which would repeat it.
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {error}")]
    Parse {
        path: String,
        error: Box<toml::de::Error>,
    },
    #[error("{var}: {message}")]
    Env { var: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: Server,
    pub admin: Admin,
    pub metadata: Metadata,
    pub channel: Channel,
    pub vendordata: Vendordata,
    pub drive: Drive,
    pub log: Log,
    pub security_groups: SecurityGroups,
    pub firewall: Firewall,
    pub remote: Remote,
    pub os: Os,
    pub install: Install,
    pub maintenance: Maintenance,
    pub store: Store,
    pub cluster: Cluster,
    pub identity: Identity,
}

/// Where the registry persists.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Store {
    /// A PostgreSQL URL (`postgres://user@host/db`, or libpq's
    /// `host=/run/postgresql dbname=cradle`) shared by every host of a
    /// cluster. Unset: the embedded SQLite file in the data directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// This host among the hosts of a cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cluster {
    /// This host's name; empty means the machine's hostname.
    pub host: String,
    /// Seconds between catch-ups with the store when no change is heard of.
    pub resync_interval: u64,
    /// Seconds between this host's "still up" records in the store.
    pub heartbeat_interval: u64,
    /// Where other hosts reach this one (mutual TLS, the cluster's CA): how
    /// secrets for the instances served here arrive. Unset: no peer
    /// listener, and other hosts cannot hand secrets to this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_listen: Option<SocketAddr>,
    /// The directory `cradle cluster join` wrote for this host: `ca.pem`,
    /// `host.pem`, `host.key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// Where instances migrated to this host get their disks (one directory
    /// per instance); empty means `<data_dir>/disks`.
    pub disk_dir: String,
    /// How other hosts reach this one over ssh or rsync to copy disks to it
    /// (`[remote]` on the sending host says how to log in); empty means the
    /// host name.
    pub ssh_address: String,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            host: String::new(),
            resync_interval: 5,
            heartbeat_interval: 10,
            peer_listen: None,
            tls_dir: None,
            disk_dir: String::new(),
            ssh_address: String::new(),
        }
    }
}

/// The key set guests' identity documents and tokens are signed with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Identity {
    /// The key-set directory (`keyset.json`). Unset: `<tls_dir>/identity`
    /// on a cluster host (`[cluster] tls_dir` set; `cradle cluster join`
    /// writes it), else `<data_dir>/identity`, made at first start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// The tokens' `iss`, and the common name of new certificates. The
    /// same on every host of a cluster.
    pub issuer: String,
    /// Seconds a previous key still verifies after `cradle identity rotate`.
    pub rotation_overlap: u64,
    /// Seconds an identity token is valid (at most 3600).
    pub token_lifetime: u64,
    /// Days a new key's certificate is valid.
    pub cert_validity_days: u32,
}

impl Default for Identity {
    fn default() -> Self {
        Identity {
            dir: None,
            issuer: "https://cradle.invalid".into(),
            rotation_overlap: 7 * 86_400,
            token_lifetime: 3600,
            cert_validity_days: 3650,
        }
    }
}

impl Identity {
    /// The key-set directory this configuration means (see [`Identity::dir`]).
    pub fn dir(&self, cluster: &Cluster, server: &Server) -> PathBuf {
        match (&self.dir, &cluster.tls_dir) {
            (Some(d), _) => d.clone(),
            (None, Some(tls)) => tls.join("identity"),
            (None, None) => server.data_dir.join("identity"),
        }
    }
}

/// Install jobs: the appliance VM, its limits and its communication NIC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Install {
    /// The directory `cradle appliance build -o` wrote (`vmlinuz`, `initrd.img`).
    pub appliance: PathBuf,
    /// The QEMU system emulator.
    pub qemu: PathBuf,
    /// `auto` (KVM when a probe boot shows it works, else TCG), `kvm` or `tcg`.
    pub accel: String,
    /// Seconds an install job may run, cluster-wide. Not reset by traffic:
    /// at the deadline the appliance is killed, whatever it is doing.
    pub timeout: u64,
    /// The appliance's memory, in MiB.
    pub memory_mib: u32,
    /// The port the appliance reaches the metadata service on, at
    /// 169.254.169.254; 0 is the `[metadata] listen` port.
    pub metadata_port: u16,
    /// The `ip` command (iproute2), which makes each job's tap.
    pub ip: PathBuf,
    /// The `nft` command, which fences each job's tap.
    pub nft: PathBuf,
    /// `qemu-img`, which writes a self_install's os_image onto disk 0.
    pub qemu_img: PathBuf,
    /// `dnsmasq`, which gives a self-installing guest its address by DHCP.
    pub dnsmasq: PathBuf,
    /// The largest disk dump, in bytes, an export sends or an import takes
    /// (and spools on the host before its job starts).
    pub stream_max_bytes: u64,
}

impl Default for Install {
    fn default() -> Self {
        Install {
            appliance: PathBuf::from("/var/lib/cradle/appliance"),
            qemu: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            accel: "auto".into(),
            timeout: 1800,
            memory_mib: 512,
            metadata_port: 0,
            ip: PathBuf::from("ip"),
            nft: PathBuf::from("nft"),
            qemu_img: PathBuf::from("qemu-img"),
            dnsmasq: PathBuf::from("dnsmasq"),
            stream_max_bytes: 1 << 40,
        }
    }
}

/// Maintenance events (`cradle instance schedule`): how they run and how
/// many finished ones an instance keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Maintenance {
    /// Seconds a guest gets to power off (ACPI) when an event stops or
    /// reboots its VM, before the VM is killed.
    pub stop_grace: u64,
    /// Finished events (completed, failed, cancelled) kept per instance;
    /// older ones are dropped first.
    pub history: usize,
}

impl Default for Maintenance {
    fn default() -> Self {
        Maintenance {
            stop_grace: 60,
            history: 20,
        }
    }
}

/// OS definitions (the Ganeti OS API) and how their trusted scripts run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Os {
    /// Directories holding one directory per OS, `:`-separated like PATH;
    /// an earlier one hides the same name in a later one.
    pub search_path: String,
    /// Who trusted scripts run as when cradle runs as root (never root).
    pub script_user: String,
    /// Seconds a trusted `verify` may run.
    pub verify_timeout: u64,
}

impl Default for Os {
    fn default() -> Self {
        Os {
            search_path: "/srv/cradle/os".into(),
            script_user: "nobody".into(),
            verify_timeout: 60,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Remote {
    /// ssh (ssh and scp) or rsync (rsync alone; works with rrsync).
    pub transport: Transport,
    /// Login user on other hosts; empty leaves it to ssh.
    pub user: String,
    pub port: u16,
    /// Private key to log in with; when set, only this key is offered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_file: Option<PathBuf>,
    /// known_hosts file; ssh's default when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub known_hosts: Option<PathBuf>,
    /// Refuse hosts whose key is not in known_hosts (off: accept and record
    /// a new host's key; a changed key is refused either way).
    pub strict_host_key_checking: bool,
    /// Seconds to wait for a connection.
    pub connect_timeout: u64,
    /// Compress in transit. Off: disk images (qcow2 above all) gain little.
    pub compression: bool,
    /// Bandwidth limit for copies in KiB/s; 0 is none.
    pub bwlimit: u64,
    /// Seconds allowed for mkdir, touch, rm and rmdir.
    pub timeout: u64,
    /// Seconds allowed for one copy.
    pub copy_timeout: u64,
}

impl Default for Remote {
    fn default() -> Self {
        Remote {
            transport: Transport::Ssh,
            user: String::new(),
            port: 22,
            identity_file: None,
            known_hosts: None,
            strict_host_key_checking: true,
            connect_timeout: 10,
            compression: false,
            bwlimit: 0,
            timeout: 60,
            copy_timeout: 6 * 3600,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityGroups {
    /// The security-group API and per-instance groups. Off: its routes answer
    /// 404 and no groups are made.
    pub enabled: bool,
    pub max_rules_per_group: usize,
}

impl Default for SecurityGroups {
    fn default() -> Self {
        SecurityGroups {
            enabled: true,
            max_rules_per_group: 100,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Firewall {
    /// Enforce security groups with nftables (needs security groups on, and
    /// CAP_NET_ADMIN).
    pub enabled: bool,
    /// The nftables table (family inet) cradle owns.
    pub table: String,
    /// The nft program.
    pub nft: PathBuf,
    /// Apply inside this named network namespace (`ip netns`), if set.
    pub netns: String,
    /// The packet-mark bits cradle may use for group tags (contiguous, at
    /// least 2): written only while cradle's lookup chains run, every other
    /// bit of a packet's mark is left as it came.
    pub mark_mask: u32,
}

impl Default for Firewall {
    fn default() -> Self {
        Firewall {
            enabled: true,
            table: "cradle".into(),
            nft: PathBuf::from("nft"),
            netns: String::new(),
            mark_mask: 0xfff0_0000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Server {
    /// Where the database and the generated admin token live.
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Admin {
    pub listen: SocketAddr,
    /// Bearer token. When unset, one is generated at first start into
    /// `<data_dir>/admin.token` (mode 0600).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Named tokens with roles (TOML: `[[token]]` name, roles, sha256).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_file: Option<PathBuf>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Connections held at once; past it, new ones are refused. 0: no cap.
    pub max_connections: usize,
    /// Connections held at once from one client address. 0: no cap.
    pub max_connections_per_source: usize,
    /// Seconds a client has to send a request's headers.
    pub header_timeout: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Metadata {
    pub listen: SocketAddr,
    /// IP TTL (IPv6 hop limit) of replies, so they cannot cross a router.
    pub hop_limit: u32,
    /// Connections held at once; past it, new ones are refused. 0: no cap.
    pub max_connections: usize,
    /// Connections held at once from one instance's address. 0: no cap.
    pub max_connections_per_source: usize,
    /// Connections held at once from an address that is no instance's.
    pub max_connections_per_unknown_source: usize,
    /// Requests a second one instance may make after a burst; 0: no limit.
    pub rate_limit: u32,
    /// Requests an instance may make at once before `rate_limit` applies.
    pub rate_burst: u32,
    /// Single-threaded workers sharing the listening address; 0 means one
    /// per CPU.
    pub workers: usize,
    /// Seconds a client has to send a request's headers.
    pub header_timeout: u64,
    /// Seconds a client has to send a request's body.
    pub body_timeout: u64,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Longest IMDSv2 session token lifetime a guest may ask for, in seconds.
    pub max_token_ttl: u32,
    /// Bytes of rendered EC2 and OpenStack answers kept in memory; 0 disables.
    pub cache_bytes: usize,
    /// Requests waiting for a change (`?wait=true`) at once, in total.
    pub max_waiting: usize,
    /// Requests waiting for a change at once, per instance.
    pub max_waiting_per_instance: usize,
    /// The longest `timeout_sec` a waiting request may ask for, in seconds.
    pub max_wait_timeout: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Channel {
    /// Messages queued per instance and direction before writes get 429.
    pub queue_len: usize,
    /// Largest message, in bytes.
    pub message_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Vendordata {
    /// A JSON file served as `vendor_data.json` and as `"static"` in
    /// `vendor_data2.json`. Unset: `{}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub static_file: Option<PathBuf>,
    /// Dynamic vendordata targets (`[[vendordata.dynamic]]`).
    pub dynamic: Vec<cradle_vendordata::TargetConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Drive {
    /// Size of a vfat config drive, in bytes (Nova: 64 MiB).
    pub vfat_bytes: u64,
    /// Largest ISO config drive, and largest content of a vfat one, in bytes.
    pub max_bytes: u64,
}

impl Default for Drive {
    fn default() -> Self {
        Drive {
            vfat_bytes: 64 * 1024 * 1024,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    pub format: LogFormat,
    /// A tracing filter such as `info` or `cradle=debug`; `RUST_LOG` wins.
    pub level: String,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            data_dir: PathBuf::from("./cradle-data"),
        }
    }
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: ([127, 0, 0, 1], 8774).into(),
            token: None,
            tokens_file: None,
            max_body_bytes: 4 * 1024 * 1024,
            max_connections: 1024,
            max_connections_per_source: 256,
            header_timeout: 10,
        }
    }
}

impl Default for Metadata {
    fn default() -> Self {
        Metadata {
            listen: ([127, 0, 0, 1], 8775).into(),
            hop_limit: 1,
            max_connections: 4096,
            max_connections_per_source: 16,
            max_connections_per_unknown_source: 2,
            rate_limit: 50,
            rate_burst: 200,
            workers: 0,
            header_timeout: 5,
            body_timeout: 10,
            max_body_bytes: 128 * 1024,
            max_token_ttl: 21600,
            cache_bytes: 64 * 1024 * 1024,
            max_waiting: 2048,
            max_waiting_per_instance: 4,
            max_wait_timeout: 3600,
        }
    }
}

impl Default for Channel {
    fn default() -> Self {
        Channel {
            queue_len: 256,
            message_bytes: 64 * 1024,
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

impl Config {
    /// Defaults, overlaid by `file` (if given), overlaid by `CRADLE_*` from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                    path: path.to_path_buf(),
                    error,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse {
                        path: path.display().to_string(),
                        error: Box::new(e),
                    })?
            }
            None => toml::Table::new(),
        };
        apply_env(&mut table, env)?;
        let origin = file
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "environment".into());
        Config::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Parse {
            path: origin,
            error: Box::new(e),
        })
    }
}

/// Overlay `CRADLE_<SECTION>_<KEY>=value` onto the table. The section is the
/// word after `CRADLE_`; the rest, lower-cased, is the key. The value's type
/// is the default's type, so `CRADLE_METADATA_HOP_LIMIT=2` is a number and
/// `CRADLE_ADMIN_TOKEN=123` stays a string. Variables naming no known key are
/// left alone (the CLI reads `CRADLE_ADMIN_URL`, for one).
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let defaults = toml::Table::try_from(Config::default()).expect("defaults serialize");
    for (var, raw) in env {
        // Sections may hold `_` (security_groups), so match whole names.
        let Some((section, key)) = KEYS.iter().find(|(s, k)| var == env_var(s, k)) else {
            continue;
        };
        let (section, key) = (section.to_string(), key.to_string());
        let default = defaults.get(&section).and_then(|s| s.get(&key));
        let bad = |message: String| ConfigError::Env {
            var: var.clone(),
            message,
        };
        let value = match default {
            Some(toml::Value::Integer(_)) => {
                let t = raw.trim();
                let n = match t.strip_prefix("0x") {
                    Some(hex) => i64::from_str_radix(hex, 16),
                    None => t.parse(),
                };
                toml::Value::Integer(n.map_err(|_| {
                    bad(format!(
                        "expected a whole number (or 0x and hex digits), got {raw:?}"
                    ))
                })?)
            }
            Some(toml::Value::Boolean(_)) => toml::Value::Boolean(
                raw.trim()
                    .parse()
                    .map_err(|_| bad(format!("expected true or false, got {raw:?}")))?,
            ),
            _ => toml::Value::String(raw),
        };
        let entry = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry {
            toml::Value::Table(t) => {
                t.insert(key, value);
            }
            _ => {
                return Err(bad(format!(
                    "[{section}] in the config file is not a table"
                )));
            }
        }
    }
    Ok(())
}

/// The environment variable that overrides `[section] key`.
pub fn env_var(section: &str, key: &str) -> String {
    format!(
        "CRADLE_{}_{}",
        section.to_ascii_uppercase(),
        key.to_ascii_uppercase()
    )
}

/// Every key, as (section, key). docs/configuration.md documents each.
pub const KEYS: &[(&str, &str)] = &[
    ("server", "data_dir"),
    ("store", "url"),
    ("cluster", "host"),
    ("cluster", "resync_interval"),
    ("cluster", "heartbeat_interval"),
    ("cluster", "peer_listen"),
    ("cluster", "tls_dir"),
    ("cluster", "disk_dir"),
    ("cluster", "ssh_address"),
    ("admin", "listen"),
    ("admin", "token"),
    ("admin", "tokens_file"),
    ("admin", "max_body_bytes"),
    ("admin", "max_connections"),
    ("admin", "max_connections_per_source"),
    ("admin", "header_timeout"),
    ("metadata", "listen"),
    ("metadata", "hop_limit"),
    ("metadata", "max_connections"),
    ("metadata", "max_connections_per_source"),
    ("metadata", "max_connections_per_unknown_source"),
    ("metadata", "rate_limit"),
    ("metadata", "rate_burst"),
    ("metadata", "workers"),
    ("metadata", "header_timeout"),
    ("metadata", "body_timeout"),
    ("metadata", "max_body_bytes"),
    ("metadata", "max_token_ttl"),
    ("metadata", "cache_bytes"),
    ("metadata", "max_waiting"),
    ("metadata", "max_waiting_per_instance"),
    ("metadata", "max_wait_timeout"),
    ("channel", "queue_len"),
    ("channel", "message_bytes"),
    ("vendordata", "static_file"),
    ("vendordata", "dynamic"),
    ("drive", "vfat_bytes"),
    ("drive", "max_bytes"),
    ("log", "format"),
    ("log", "level"),
    ("security_groups", "enabled"),
    ("security_groups", "max_rules_per_group"),
    ("firewall", "enabled"),
    ("firewall", "table"),
    ("firewall", "nft"),
    ("firewall", "netns"),
    ("firewall", "mark_mask"),
    ("remote", "transport"),
    ("remote", "user"),
    ("remote", "port"),
    ("remote", "identity_file"),
    ("remote", "known_hosts"),
    ("remote", "strict_host_key_checking"),
    ("remote", "connect_timeout"),
    ("remote", "compression"),
    ("remote", "bwlimit"),
    ("remote", "timeout"),
    ("remote", "copy_timeout"),
    ("os", "search_path"),
    ("os", "script_user"),
    ("os", "verify_timeout"),
    ("install", "appliance"),
    ("install", "qemu"),
    ("install", "accel"),
    ("install", "timeout"),
    ("install", "memory_mib"),
    ("install", "metadata_port"),
    ("install", "ip"),
    ("install", "nft"),
    ("install", "qemu_img"),
    ("install", "dnsmasq"),
    ("install", "stream_max_bytes"),
    ("maintenance", "stop_grace"),
    ("maintenance", "history"),
    ("identity", "dir"),
    ("identity", "issuer"),
    ("identity", "rotation_overlap"),
    ("identity", "token_lifetime"),
    ("identity", "cert_validity_days"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn runs_with_nothing() {
        assert_eq!(Config::load(None, env(&[])).unwrap(), Config::default());
    }

    #[test]
    fn env_overrides_file_with_typed_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[metadata]\nhop_limit = 3\nlisten = \"127.0.0.1:9000\"\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&path),
            env(&[
                ("CRADLE_METADATA_HOP_LIMIT", "2"),
                ("CRADLE_ADMIN_TOKEN", "123"),
                ("CRADLE_ADMIN_URL", "x"),
                ("CRADLE_FIREWALL_MARK_MASK", "0x00ff0000"),
            ]),
        )
        .unwrap();
        assert_eq!(c.metadata.hop_limit, 2);
        assert_eq!(c.firewall.mark_mask, 0x00ff_0000);
        assert_eq!(c.metadata.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.admin.token.as_deref(), Some("123"));
    }

    #[test]
    fn bad_values_name_what_is_wrong() {
        let e = Config::load(None, env(&[("CRADLE_METADATA_HOP_LIMIT", "two")])).unwrap_err();
        assert!(e.to_string().contains("CRADLE_METADATA_HOP_LIMIT"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[metadata]\nhop_limt = 3\n").unwrap();
        let e = Config::load(Some(&path), env(&[])).unwrap_err();
        assert!(e.to_string().contains("hop_limt"), "{e}");
    }

    #[test]
    fn every_key_is_documented() {
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/configuration.md"
        ))
        .expect("docs/configuration.md exists");
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        for (section, table) in &defaults {
            for key in table.as_table().unwrap().keys() {
                assert!(
                    KEYS.contains(&(section.as_str(), key.as_str())),
                    "{section}.{key} missing from KEYS"
                );
            }
        }
        for (section, key) in KEYS {
            let var = env_var(section, key);
            assert!(
                doc.contains(&format!("`{key}`")) && doc.contains(&var),
                "{section}.{key} ({var}) is not documented"
            );
        }
    }
}
