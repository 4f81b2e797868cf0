//! `cradle identity`: the key set guests' identity is signed with.
//!
//! `cert` and `jwks` print what verifies guests' signed identity
//! documents and identity tokens, from the admin API. `rotate` works on a
//! key-set directory offline: the standalone `<data_dir>/identity`, or a
//! cluster's `<CA>/identity` (then copied to every host); a running
//! `cradle serve` takes the new set on SIGHUP.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use cradle_client::route;
use cradle_config::Config;
use cradle_identity::{KeySet, unix_now};

use crate::ApiArgs;

pub const ABOUT: &str = "\
A guest proves who it is with its EC2 identity document signed by cradle's key \
(dynamic/instance-identity/signature, pkcs7, rsa2048) or with an identity token \
(GET /cradle/latest/identity?audience=AUD, a JWT signed RS256). Verify documents with \
`cradle identity cert`, tokens with `cradle identity jwks`. Rotate the key with \
`cradle identity rotate --dir DIR`, then send the server SIGHUP: the old key still verifies \
for [identity] rotation_overlap. See docs/identity.md.";

#[derive(Args, Debug)]
#[command(after_help = ABOUT)]
pub struct IdentityArgs {
    #[command(subcommand)]
    command: IdentityCommand,
}

#[derive(Subcommand, Debug)]
enum IdentityCommand {
    /// Print the PEM certificates that verify identity documents (current first).
    Cert(ApiOnly),
    /// Print the JWKS that verifies identity tokens.
    Jwks(ApiOnly),
    /// Make a new current key in a key-set directory; the old one stays valid for the overlap.
    Rotate(RotateArgs),
}

#[derive(Args, Debug)]
struct ApiOnly {
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Args, Debug)]
struct RotateArgs {
    /// The key-set directory (holding keyset.json): `<data_dir>/identity`, or a cluster's `<CA>/identity`.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The configuration whose [identity] issuer, rotation_overlap and cert_validity_days apply.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

pub fn run(args: IdentityArgs) -> Result<()> {
    match args.command {
        IdentityCommand::Cert(a) => {
            let api = crate::client::connect(&a.api)?;
            let pem = api.send(route::identity_certificate())?;
            std::io::stdout().lock().write_all(pem.as_bytes())?;
            Ok(())
        }
        IdentityCommand::Jwks(a) => {
            let api = crate::client::connect(&a.api)?;
            let jwks = api.send(route::identity_jwks())?;
            writeln!(
                std::io::stdout().lock(),
                "{}",
                serde_json::to_string_pretty(&jwks)?
            )?;
            Ok(())
        }
        IdentityCommand::Rotate(a) => rotate(&a),
    }
}

/// What a new key's certificate says, from `[identity]`.
pub fn params(config: &cradle_config::Identity) -> cradle_identity::Params {
    cradle_identity::Params {
        issuer: config.issuer.clone(),
        cert_validity: Duration::from_secs(u64::from(config.cert_validity_days) * 86_400),
    }
}

/// A new key set in `dir` (`cradle cluster init`), refusing to replace one.
pub fn create(dir: &Path, config: &cradle_config::Identity) -> Result<KeySet> {
    if dir.join(cradle_identity::FILE).exists() {
        anyhow::bail!(
            "{} exists already: refusing to replace it (use `cradle identity rotate`)",
            dir.join(cradle_identity::FILE).display()
        );
    }
    let set = KeySet::generate(&params(config))?;
    set.save(dir)?;
    Ok(set)
}

fn rotate(a: &RotateArgs) -> Result<()> {
    let config = Config::load(a.config.as_deref(), std::env::vars())?;
    let now = unix_now();
    let set = KeySet::load(&a.dir, now).with_context(|| {
        format!(
            "`cradle identity rotate --dir` takes a key-set directory: the standalone \
             <data_dir>/identity, or a cluster's <CA>/identity; {} is not one",
            a.dir.display()
        )
    })?;
    let overlap = Duration::from_secs(config.identity.rotation_overlap);
    let next = set.rotate(&params(&config.identity), overlap, now)?;
    next.save(&a.dir)?;
    println!(
        "rotated the identity key in {}: current key {}, previous {} valid for {} more seconds; \
         send the server SIGHUP (in a cluster: copy the directory to every host's \
         <tls_dir>/identity first)",
        a.dir.display(),
        next.kid(),
        set.kid(),
        overlap.as_secs()
    );
    Ok(())
}
