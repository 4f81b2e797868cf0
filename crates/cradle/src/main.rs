//! `cradle`: the command line. Flag parsing and glue only; the work is in
//! the library crates. `serve` runs the two listeners; every other verb is a
//! client of the admin API.

#![forbid(unsafe_code)]

mod agent;
mod appliance;
mod bake;
mod client;
mod cluster;
mod drive;
mod files;
mod firewall;
mod identity;
mod install;
mod instance;
mod maintenance;
mod migrate;
mod os;
mod os_jobs;
mod personalize;
mod remote;
mod secgroup;
mod serve;
mod show;
mod whoami;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

// The metadata hot path allocates small, short-lived buffers on every
// request; glibc's malloc showed up as a fifth of the server's CPU in
// profiles, mimalloc as a sliver.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "cradle",
    version,
    about = "Guest provisioning for VM clusters",
    long_about = "cradle gives every VM guest its identity, metadata and parameters over a \
link-local metadata service that speaks EC2 (with IMDSv2), OpenStack and cradle's own format.\n\n\
Start the service with `cradle serve`; manage instances with `cradle instance`, their \
security groups with `cradle secgroup`, and the nftables firewall that enforces them with \
`cradle firewall`. `cradle remote` makes, removes and copies files on other hosts; \
`cradle personalize` overlays personalization packages; `cradle os` checks OS definitions.",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the admin API and the guest metadata service.
    Serve(serve::ServeArgs),
    /// Register, inspect, change and remove instances; use the host-guest channel.
    #[command(subcommand_required = true)]
    Instance(instance::InstanceArgs),
    /// Build config drives (ISO 9660 or vfat images labelled config-2).
    #[command(subcommand_required = true)]
    Drive(drive::DriveArgs),
    /// Manage security groups, their rules and a tenant's default rules; attach groups to instances.
    #[command(subcommand_required = true)]
    Secgroup(secgroup::SecgroupArgs),
    /// Show or re-apply the nftables ruleset that enforces security groups.
    #[command(subcommand_required = true)]
    Firewall(firewall::FirewallArgs),
    /// Verify personalization packages (.tar.gz) and overlay them onto a directory tree.
    #[command(subcommand_required = true)]
    Personalize(personalize::PersonalizeArgs),
    /// Make, remove and copy files on another host over ssh/scp or rsync.
    #[command(subcommand_required = true)]
    Remote(remote::RemoteArgs),
    /// List, show and verify OS definitions (the Ganeti OS API, with untrusted scripts).
    #[command(subcommand_required = true)]
    Os(os::OsArgs),
    /// Build the install appliance (a kernel and an initramfs running cradle-agent).
    #[command(subcommand_required = true)]
    Appliance(appliance::ApplianceArgs),
    /// Bake the guest agent, its configuration and its enabled unit into an ext4 guest image.
    #[command(after_help = bake::ABOUT)]
    Bake(bake::BakeArgs),
    /// Show the token's name, roles and the projects it acts for.
    Whoami(whoami::WhoamiArgs),
    /// Make the cluster's CA, issue hosts their certificates, list the hosts.
    #[command(subcommand_required = true)]
    Cluster(cluster::ClusterArgs),
    /// Print the certificates and JWKS that verify guests' identity; rotate its key.
    #[command(subcommand_required = true)]
    Identity(identity::IdentityArgs),
}

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

/// Where the admin API is and how to authenticate to it.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// Admin API base URL.
    #[arg(
        long,
        env = "CRADLE_ADMIN_URL",
        default_value = "http://127.0.0.1:8774",
        global = true
    )]
    pub url: String,
    /// Bearer token. Prefer CRADLE_ADMIN_TOKEN or --token-file: command lines are visible to other users.
    #[arg(
        long,
        env = "CRADLE_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
    /// File holding the bearer token [default: <data-dir>/admin.token].
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// The server's data directory, where `serve` wrote admin.token.
    #[arg(
        long,
        env = "CRADLE_SERVER_DATA_DIR",
        default_value = "./cradle-data",
        global = true
    )]
    pub data_dir: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Instance(args) => instance::run(args),
        Command::Drive(args) => drive::run(args),
        Command::Secgroup(args) => secgroup::run(args),
        Command::Firewall(args) => firewall::run(args),
        Command::Remote(args) => remote::run(args),
        Command::Personalize(args) => personalize::run(args),
        Command::Os(args) => os::run(args),
        Command::Appliance(args) => appliance::run(args),
        Command::Bake(args) => bake::run(args),
        Command::Whoami(args) => whoami::run(args),
        Command::Cluster(args) => cluster::run(args),
        Command::Identity(args) => identity::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
