//! `cradle whoami`: who the admin API takes the presented token for.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use cradle_client::route;

use crate::{ApiArgs, Output};

const ABOUT_WHOAMI: &str = "\
A token acts for projects (tenants): the main token and tokens with the admin role for all of \
them, a named token for those its `projects` list in the tokens file. It sees and changes only \
their instances and security groups; a token with no projects can only ask this.";

#[derive(Args, Debug)]
#[command(after_help = ABOUT_WHOAMI)]
pub struct WhoamiArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    output: Output,
}

pub fn run(args: WhoamiArgs) -> Result<()> {
    let api = crate::client::connect(&args.api)?;
    let me = api.send(route::whoami())?;
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&me)?)?,
        Output::Table => {
            let list = |v: &[String]| {
                if v.is_empty() {
                    "(none)".to_string()
                } else {
                    v.join(", ")
                }
            };
            writeln!(out, "name      {}", me.name)?;
            writeln!(out, "roles     {}", list(&me.roles))?;
            let projects = if me.all_projects {
                "(all)".to_string()
            } else {
                list(&me.projects)
            };
            writeln!(out, "projects  {projects}")?;
        }
    }
    Ok(())
}
