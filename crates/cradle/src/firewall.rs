//! `cradle firewall …`: the nftables ruleset that enforces security groups.

use std::io::Write;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use cradle_client::route;
use serde_json::Value;

use crate::{ApiArgs, Output};

const ABOUT_FIREWALL: &str = "\
cradle enforces security groups with one nftables table of its own (`inet cradle` unless \
configured), which it replaces whole at start and changes as groups, rules and instances \
change. Only instances with an --interface (their tap on the host) are enforced. The ruleset \
is nft's JSON: `cradle firewall show | nft -j -c -f -` checks it, `nft -j -f -` loads it.\n\n\
With `[firewall] enabled = false` the server keeps the ruleset but applies nothing; `show` \
and `apply --dry-run` still print it.";

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
    /// Print the ruleset as nft JSON (for `nft -j -f -`); a line on standard
    /// error says whether the server enforces it.
    Show,
    /// Re-apply the whole ruleset, replacing the table (needs the admin
    /// role). For after the table was changed by hand, or an apply failed.
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
            let state = match (v.enforced, v.dirty) {
                (true, true) => format!(
                    "firewall: enforced in table {table}, but the last apply failed; \
                     `cradle firewall apply` retries"
                ),
                (true, false) => format!("firewall: enforced in table {table}"),
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
                    ruleset(&mut out, &v.ruleset)?;
                }
                Output::Table => {
                    if !v.applied {
                        bail!("the admin API did not apply the ruleset");
                    }
                    writeln!(out, "firewall re-applied")?;
                }
            }
            Ok(())
        }
    }
}

fn ruleset(out: &mut impl Write, r: &Value) -> Result<()> {
    if !r.is_object() {
        bail!("the admin API answered without a ruleset: {r}");
    }
    writeln!(out, "{}", serde_json::to_string_pretty(r)?)?;
    Ok(())
}
