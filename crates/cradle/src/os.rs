//! `cradle os`: list, show and verify OS definitions (cradle-os), on this
//! host, from the `[os]` search path.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use cradle_config::Config;
use cradle_model::{OsParams, Secret};
use cradle_os::{Environment, Operation, OsDefinition, Placement, Runner, User, run_trusted};

use crate::Output;
use crate::instance::pairs;

#[derive(Args, Debug)]
#[command(
    after_help = "An OS definition is a directory named after the OS, in one of the \
directories of [os] search_path (CRADLE_OS_SEARCH_PATH, or --search-path). It holds \
ganeti_api_version (cradle speaks 20 and 15), optionally variants.list and parameters.list, \
trusted scripts create, export, import, rename and verify (run on this host as [os] \
script_user, never root), and untrusted/ (scripts that only run inside the install appliance). \
See docs/cli.md."
)]
pub struct OsArgs {
    /// TOML configuration file (its [os] section).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directories to look in, `:`-separated; overrides [os] search_path.
    #[arg(long, global = true, value_name = "DIRS")]
    search_path: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: OsCommand,
}

#[derive(Subcommand, Debug)]
enum OsCommand {
    /// Every OS in the search path, and whether its definition is usable.
    List,
    /// One OS: its API version, variants, parameters and scripts.
    Show {
        /// The OS name (a `+VARIANT` suffix is ignored).
        name: String,
    },
    /// Check a definition, a variant and parameters, then run the OS's
    /// trusted `verify parameters` script with them.
    #[command(
        after_help = "The script gets the OS API environment (OS_API_VERSION, OS_NAME, \
OS_VARIANT, INSTANCE_OS) and the public and private parameters as OSP_<NAME>. Secret parameters \
are never in its environment or argv: they arrive as one JSON object on descriptor 3 \
(CRADLE_SECRETS_FD). A non-zero exit refuses the parameters with the script's last words."
    )]
    Verify {
        /// NAME or NAME+VARIANT.
        name: String,
        /// Public parameter NAME=VALUE or NAME=@FILE (repeatable).
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
        /// Private parameter (repeatable).
        #[arg(long = "private-param", value_name = "NAME=VALUE")]
        private_params: Vec<String>,
        /// Secret parameter; NAME=@FILE keeps it off the command line (repeatable).
        #[arg(long = "secret-param", value_name = "NAME=VALUE")]
        secret_params: Vec<String>,
    },
}

pub fn run(args: OsArgs) -> Result<()> {
    let config = Config::load(args.config.as_deref(), std::env::vars())?.os;
    let search = cradle_os::search_path(args.search_path.as_deref().unwrap_or(&config.search_path));
    let mut out = std::io::stdout().lock();
    match args.command {
        OsCommand::List => {
            let listed = cradle_os::list(&search);
            if args.output == Output::Json {
                let all: Vec<serde_json::Value> = listed
                    .iter()
                    .map(|l| match &l.definition {
                        Ok(d) => serde_json::json!({"name": l.name, "dir": l.dir, "valid": true, "definition": d}),
                        Err(e) => serde_json::json!({"name": l.name, "dir": l.dir, "valid": false, "error": e.to_string()}),
                    })
                    .collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&all)?)?;
                return Ok(());
            }
            let rows: Vec<Vec<String>> = listed
                .iter()
                .map(|l| match &l.definition {
                    Ok(d) => vec![
                        l.name.clone(),
                        d.api_version.to_string(),
                        join_or_dash(&d.variants),
                        scripts(d),
                        "ok".into(),
                    ],
                    Err(e) => vec![
                        l.name.clone(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        format!("invalid: {}", reason(e)),
                    ],
                })
                .collect();
            crate::instance::table(
                &mut out,
                &["NAME", "API", "VARIANTS", "SCRIPTS", "STATUS"],
                &rows,
            )?;
            if listed.is_empty() {
                eprintln!(
                    "no OS definitions in {}",
                    cradle_os::display_search_path(&search)
                );
            }
        }
        OsCommand::Show { name } => {
            let (name, _) = cradle_os::split_name(&name);
            let d = cradle_os::find(&search, name)?;
            if args.output == Output::Json {
                writeln!(out, "{}", serde_json::to_string_pretty(&d)?)?;
                return Ok(());
            }
            let mut rows = vec![
                ("name", d.name.clone()),
                ("directory", d.dir.display().to_string()),
                ("api version", d.api_version.to_string()),
                ("variants", join_or_dash(&d.variants)),
            ];
            for op in Operation::ALL {
                let how = match d.placement(op) {
                    Some(Placement::Both) => "trusted (host) and untrusted (appliance)",
                    Some(Placement::Host) => "trusted (host)",
                    Some(Placement::Appliance) => "untrusted (appliance)",
                    None => "-",
                };
                rows.push((op.as_str(), how.into()));
            }
            for (k, v) in rows {
                writeln!(out, "{k:<12} {v}")?;
            }
            if !d.parameters.is_empty() {
                writeln!(out, "parameters:")?;
                for p in &d.parameters {
                    writeln!(out, "  {:<20} {}", p.name, p.description)?;
                }
            }
            let others: Vec<&String> = d
                .untrusted
                .keys()
                .filter(|f| !Operation::ALL.iter().any(|op| op.as_str() == *f))
                .collect();
            if !others.is_empty() {
                writeln!(
                    out,
                    "untrusted files: {}",
                    others
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )?;
            }
        }
        OsCommand::Verify {
            name,
            params,
            private_params,
            secret_params,
        } => {
            let (os_name, variant) = cradle_os::split_name(&name);
            let d = cradle_os::find(&search, os_name)?;
            d.check_variant(variant)?;
            let p = OsParams {
                public: pairs("--param", &params)?,
                private: secret_map(pairs("--private-param", &private_params)?),
                secret: secret_map(pairs("--secret-param", &secret_params)?),
            };
            let names = p
                .public
                .keys()
                .chain(p.private.keys())
                .chain(p.secret.keys())
                .map(String::as_str);
            d.check_parameters(names)?;
            verify(&d, variant, &p, &config)?;
            writeln!(out, "OS {name}: definition and parameters are valid")?;
        }
    }
    Ok(())
}

/// Run the trusted verify script, when the OS has one.
fn verify(
    d: &OsDefinition,
    variant: Option<&str>,
    p: &OsParams,
    config: &cradle_config::Os,
) -> Result<()> {
    let Some(script) = d.trusted.get(&Operation::Verify) else {
        if d.untrusted_script(Operation::Verify).is_some() {
            eprintln!(
                "note: {} has only an untrusted verify script; it runs in the install appliance, \
                 so only the definition, variant and parameter names were checked",
                d.name
            );
        }
        return Ok(());
    };
    let runner = Runner {
        user: Some(User::lookup(&config.script_user)?),
        timeout: Duration::from_secs(config.verify_timeout),
    };
    let env = Environment::for_os(d, variant).params(p);
    let done = run_trusted(script, &["parameters"], &env, &p.secret, &runner)?;
    if !done.status.success() {
        bail!(
            "OS {} refused the parameters ({}): {}",
            d.name,
            done.status,
            done.tail(5)
        );
    }
    Ok(())
}

fn secret_map(m: BTreeMap<String, String>) -> BTreeMap<String, Secret<String>> {
    m.into_iter().map(|(k, v)| (k, Secret::new(v))).collect()
}

fn scripts(d: &OsDefinition) -> String {
    Operation::ALL
        .iter()
        .filter_map(|&op| {
            let at = match d.placement(op)? {
                Placement::Both => "(host+appliance)",
                Placement::Host => "",
                Placement::Appliance => "(appliance)",
            };
            Some(format!("{}{at}", op.as_str()))
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn join_or_dash(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

/// The part of an invalid definition's error after its name and directory.
fn reason(e: &cradle_os::Error) -> String {
    match e {
        cradle_os::Error::Invalid { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}
