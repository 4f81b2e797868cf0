//! `cradle cluster`: the hosts of a cluster and their credentials.
//!
//! `init` makes the cluster's certificate authority; `join HOST` issues a
//! host its certificate, signed by it, into a directory to copy to that host
//! (`[cluster] tls_dir`); `show` lists the hosts the store knows. The CA's
//! key signs host certificates and nothing else: keep it off the hosts.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use cradle_client::route;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::files::write_whole;
use crate::{ApiArgs, Output};

const ABOUT: &str = "\
Every host of a cluster runs `cradle serve` on one PostgreSQL store ([store] url) with its own \
name ([cluster] host). A secret parameter lives only in the memory of the host that serves its \
instance; one given to another host is handed to it over mutual TLS, with certificates of the \
cluster's own CA:\n\n  cradle cluster init --dir ./cluster-ca\n  cradle cluster join node1 --ca \
./cluster-ca --address 10.0.0.1 --out ./node1-tls\n\nthen copy ./node1-tls to node1 and set \
[cluster] tls_dir and peer_listen there. See docs/cluster.md.";

#[derive(Args, Debug)]
#[command(after_help = ABOUT)]
pub struct ClusterArgs {
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Make the cluster's certificate authority (ca.pem, ca.key) in a new directory.
    Init(InitArgs),
    /// Issue a host its certificate (host.pem, host.key, with ca.pem) for its tls_dir.
    Join(JoinArgs),
    /// List the hosts of the cluster and when each was last heard of.
    Show(ShowArgs),
}

#[derive(Args, Debug)]
struct InitArgs {
    /// Where to write ca.pem, ca.key (mode 0600) and the identity key set (identity/); must not hold them yet.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The configuration whose [identity] issuer and cert_validity_days the identity key takes.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct JoinArgs {
    /// The host's name, as its [cluster] host says.
    host: String,
    /// The directory `cluster init` wrote.
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// Where to write the host's tls_dir (ca.pem, host.pem, host.key, identity/); must not hold them yet.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// An address other hosts reach its peer listener at (repeatable); the
    /// certificate names it, beside the host name.
    #[arg(long, value_name = "IP")]
    address: Vec<IpAddr>,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 825)]
    days: u32,
}

#[derive(Args, Debug)]
struct ShowArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    output: Output,
}

pub fn run(args: ClusterArgs) -> Result<()> {
    match args.command {
        ClusterCommand::Init(a) => init(&a),
        ClusterCommand::Join(a) => join(&a),
        ClusterCommand::Show(a) => show(&a),
    }
}

/// The CA's name. Fixed, so that `join` can sign with the key alone.
fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "cradle");
    dn.push(DnType::CommonName, "cradle cluster CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

fn validity(p: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(i64::from(days));
}

fn fresh_dir(dir: &Path, names: &[&str]) -> Result<()> {
    for n in names {
        if dir.join(n).exists() {
            bail!(
                "{} exists already: refusing to replace it (remove it first)",
                dir.join(n).display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

fn init(a: &InitArgs) -> Result<()> {
    fresh_dir(&a.dir, &["ca.pem", "ca.key", "identity"])?;
    let key = KeyPair::generate()?;
    let mut params = ca_params();
    validity(&mut params, 3650);
    let cert = params.self_signed(&key)?;
    write_whole(&a.dir.join("ca.key"), key.serialize_pem().as_bytes(), 0o600)?;
    write_whole(&a.dir.join("ca.pem"), cert.pem().as_bytes(), 0o644)?;
    // The cluster's identity key: every host signs guests' identity with
    // it (`join` copies it), never the store, which is no place for a
    // secret.
    let config = cradle_config::Config::load(a.config.as_deref(), std::env::vars())?;
    let identity = crate::identity::create(&a.dir.join("identity"), &config.identity)?;
    println!(
        "made the cluster CA in {} (ca.pem, ca.key) and its identity key set (identity/,          key {}); keep ca.key off the hosts",
        a.dir.display(),
        identity.kid()
    );
    Ok(())
}

fn join(a: &JoinArgs) -> Result<()> {
    let host = cradle_model::api::parse_host_name("HOST", &a.host).map_err(anyhow::Error::msg)?;
    let read = |name: &str| {
        let p = a.ca.join(name);
        std::fs::read_to_string(&p).with_context(|| {
            format!(
                "cannot read {} (made by `cradle cluster init`)",
                p.display()
            )
        })
    };
    let (ca_pem, ca_key) = (read("ca.pem")?, read("ca.key")?);
    let ca_key = KeyPair::from_pem(&ca_key).context("ca.key is not a private key")?;
    fresh_dir(&a.out, &["ca.pem", "host.pem", "host.key", "identity"])?;
    let identity =
        cradle_identity::KeySet::load(&a.ca.join("identity"), cradle_identity::unix_now())
            .with_context(|| {
                format!(
                    "the cluster's identity key set in {} (made by `cradle cluster init`)",
                    a.ca.display()
                )
            })?;
    let mut params = CertificateParams::new(vec![host.clone()])?;
    params.distinguished_name = {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "cradle");
        dn.push(DnType::CommonName, host.as_str());
        dn
    };
    for ip in &a.address {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut params, a.days);
    let key = KeyPair::generate()?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let cert = params.signed_by(&key, &issuer)?;
    write_whole(
        &a.out.join("host.key"),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_whole(&a.out.join("host.pem"), cert.pem().as_bytes(), 0o644)?;
    write_whole(&a.out.join("ca.pem"), ca_pem.as_bytes(), 0o644)?;
    identity.save(&a.out.join("identity"))?;
    println!(
        "issued {host}'s certificate into {} (ca.pem, host.pem, host.key) with the cluster's \
         identity key set (identity/): copy it to {host} and set [cluster] tls_dir to it",
        a.out.display()
    );
    Ok(())
}

fn show(a: &ShowArgs) -> Result<()> {
    let api = crate::client::connect(&a.api)?;
    let cluster = api.send(route::cluster())?;
    let mut out = std::io::stdout().lock();
    if a.output == Output::Json {
        writeln!(out, "{}", serde_json::to_string_pretty(&cluster)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "this host: {} (store: {})",
        cluster.host, cluster.store
    )?;
    writeln!(
        out,
        "{:<20} {:<5} {:>9} {:<22} {:<28} {:<28}",
        "HOST", "UP", "INSTANCES", "LAST SEEN", "ADMIN", "PEER"
    )?;
    for h in &cluster.hosts {
        let seen = h
            .seen_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let peer = if h.peer_url.is_empty() {
            "-"
        } else {
            &h.peer_url
        };
        writeln!(
            out,
            "{:<20} {:<5} {:>9} {:<22} {:<28} {:<28}",
            h.name,
            if h.up { "yes" } else { "no" },
            h.instances,
            seen,
            h.admin_url,
            peer
        )?;
    }
    Ok(())
}
