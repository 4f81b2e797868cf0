//! `cradle firewall …`: the nftables ruleset that enforces security groups.

use std::io::Write;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use cradle_client::route;

use crate::{ApiArgs, Output};

const ABOUT_FIREWALL: &str = "\
cradle enforces security groups with one nftables table of its own (`inet cradle` unless \
configured): a few fixed chains, and every instance's interface, addresses and rules as \
elements of hash sets, which a worker thread keeps equal to the registry over netlink. Only \
instances with an --interface (their tap on the host) are enforced. Every change the CLI \
makes waits until the kernel enforces it. The ruleset is nft's own language: \
`cradle firewall show | nft -c -f -` checks it, `nft -f -` loads it (replacing the table).\n\n\
`show` says on standard error how far enforcement is: the number of the last change handed \
to the firewall, and of the last one the kernel enforces. With `[firewall] enabled = false` \
the server keeps the ruleset but applies nothing; `show` and `apply --dry-run` still print it.";

#[derive(Args, Debug)]
#[command(after_help = ABOUT_FIREWALL)]
pub struct FirewallArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Output format: table prints the ruleset alone, json the whole answer
    /// (whether it is enforced, whether an apply failed, the table's name).
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: FirewallCommand,
}

#[derive(Subcommand, Debug)]
enum FirewallCommand {
    /// Print the ruleset in nft's language (for `nft -f -`); a line on
    /// standard error says whether the server enforces it, and how far.
    Show,
    /// Re-apply the whole ruleset and wait until the kernel enforces it
    /// (needs the admin role). For after the table was changed by hand.
    Apply {
        /// Print the ruleset that would be applied, and apply nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

pub fn run(args: FirewallArgs) -> Result<()> {
    let api = crate::client::connect(&args.api)?;
    let output = args.output;
    let mut out = std::io::stdout().lock();
    match args.command {
        FirewallCommand::Show => {
            let v = api.send(route::firewall())?;
            let table = &v.table;
            let progress = format!(
                "change {} of {} enforced, {} elements",
                v.applied_generation, v.wanted_generation, v.elements
            );
            let state = match (v.enforced, v.dirty) {
                (true, true) => format!(
                    "firewall: enforced in table {table}, but the last apply failed ({}); \
                     the server retries; {progress}",
                    v.last_error.as_deref().unwrap_or("no reason given")
                ),
                (true, false) => format!("firewall: enforced in table {table}; {progress}"),
                (false, _) => format!(
                    "firewall: not enforced ([firewall] enabled = false); \
                     this is what table {table} would hold"
                ),
            };
            eprintln!("{state}");
            match output {
                Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?,
                Output::Table => ruleset(&mut out, &v.ruleset)?,
            }
            Ok(())
        }
        FirewallCommand::Apply { dry_run } => {
            let v = api.send(route::apply_firewall(dry_run))?;
            match output {
                Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?,
                Output::Table if dry_run => {
                    eprintln!("firewall: dry run, nothing applied");
                    ruleset(&mut out, v.ruleset.as_deref().unwrap_or_default())?;
                }
                Output::Table => {
                    if !v.applied {
                        bail!("the admin API did not apply the ruleset");
                    }
                    if !v.enforced {
                        bail!(
                            "the ruleset was handed to the firewall but is not enforced yet; \
                             `cradle firewall show` says why"
                        );
                    }
                    writeln!(out, "firewall re-applied")?;
                }
            }
            Ok(())
        }
    }
}

fn ruleset(out: &mut impl Write, r: &str) -> Result<()> {
    if r.is_empty() {
        bail!("the admin API answered without a ruleset");
    }
    out.write_all(r.as_bytes())?;
    Ok(())
}
