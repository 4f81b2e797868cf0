//! `cradle instance …`: the admin API from the command line.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Args, Subcommand};
use cradle_client::route;
use cradle_model::api::{
    InstancePatch, InstanceSpec, MessageIn, OsParamsPatch, OsParamsSpec, Patch,
};
use cradle_model::{ImdsTokens, Secret};

use crate::{ApiArgs, Output};

#[derive(Args, Debug)]
pub struct InstanceArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: InstanceCommand,
}

#[derive(Subcommand, Debug)]
enum InstanceCommand {
    /// Register an instance.
    #[command(
        after_help = "Parameter values (--param, --private-param, --secret-param) and keys \
(--key) may be given as @FILE to read them from a file, which keeps them off the command line. \
Secret parameters are held in memory only: they are gone when the server restarts and must be \
given again (with `instance modify`).\n\nExample:\n  cradle instance add web1 --metadata-address \
169.254.10.1 --hostname web1 --key alice=@~/.ssh/id_ed25519.pub --user-data cloud-init.yaml \
--secret-param db_password=@db.pass"
    )]
    Add(Box<AddArgs>),
    /// List instances.
    List,
    /// Show one instance (by id or name).
    Show { instance: String },
    /// Change an instance. Only what is given changes.
    Modify(Box<ModifyArgs>),
    /// Remove an instance, its queued messages and its secrets.
    Remove { instance: String },
    /// Install the instance: boot the install appliance with its disks and
    /// run its OS definition's create scripts (untrusted ones inside the
    /// appliance, trusted ones on the host as the script user), then
    /// overlay its personalization package.
    #[command(
        after_help = "The job runs on the server; without --follow this prints the job \
and returns. --follow shows the agent's progress and the scripts' output as they come, and \
exits 0 when the install succeeded, 1 when it failed (the instance is then install_failed, \
and `instance show` says why). The job ends on the agent's final status, or at [install] \
timeout, counted from the start and never extended. Secret parameters are served to the \
appliance while the job runs, then dropped.\n\nExample:\n  cradle instance install web1 --follow"
    )]
    Install {
        instance: String,
        /// Show progress and output until the job ends.
        #[arg(long)]
        follow: bool,
    },
    /// Boot the instance's VM from its disks (run mode), with its memory,
    /// vcpus and interface. The VM is daemonized: it outlives the server.
    Start { instance: String },
    /// Power the instance's VM off (ACPI, then killed after --grace seconds).
    Stop {
        instance: String,
        /// Kill it at once instead of asking the guest.
        #[arg(long)]
        force: bool,
        /// Seconds the guest gets to power off.
        #[arg(long, default_value_t = 60)]
        grace: u64,
    },
    /// Move the instance to another host of the cluster (cold): check, stop
    /// its VM, copy its disks, move its placement, secrets, firewall and
    /// metadata service, start it there.
    #[command(after_help = crate::migrate::ABOUT)]
    Migrate {
        instance: String,
        /// The host to move it to.
        #[arg(long, value_name = "HOST")]
        to: String,
        /// How to copy the disks [default: [remote] transport on the instance's host].
        #[arg(long, value_enum)]
        transport: Option<crate::migrate::TransportArg>,
        /// Seconds the guest gets to power off before it is killed.
        #[arg(long, default_value_t = 60)]
        grace: u64,
    },
    /// The instance's state and what QEMU says of its VM.
    Status { instance: String },
    /// Print the end of the VM's serial console.
    Console {
        instance: String,
        /// Bytes from the end.
        #[arg(long, default_value_t = 65536)]
        bytes: u64,
    },
    /// Dump a disk through the OS's export script, to a file or standard output.
    #[command(after_help = crate::os_jobs::EXPORT_ABOUT)]
    Export {
        instance: String,
        /// Where the dump goes (a temporary name until it is whole); `-` is
        /// standard output. (`-o` is the output format, as everywhere.)
        #[arg(value_name = "FILE", default_value = "-")]
        file: PathBuf,
        /// The disk to export.
        #[arg(long, default_value_t = 0)]
        disk: usize,
    },
    /// Write a dump onto a disk through the OS's import script.
    #[command(after_help = crate::os_jobs::IMPORT_ABOUT)]
    Import {
        instance: String,
        /// The dump, as `instance export` wrote it.
        file: PathBuf,
        /// The disk to write.
        #[arg(long, default_value_t = 0)]
        disk: usize,
        /// The dump's SHA-256 [default: the one in FILE.sha256].
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
    },
    /// Rename the instance, through its OS's rename script when it has one.
    #[command(after_help = crate::os_jobs::RENAME_ABOUT)]
    Rename {
        instance: String,
        /// The new name.
        new_name: String,
    },
    /// Show the instance's last job (an install, export, import or
    /// rename), with its output.
    #[command(visible_alias = "job-status")]
    InstallStatus {
        instance: String,
        /// Keep following while it runs.
        #[arg(long)]
        follow: bool,
    },
    /// Queue a message for the guest (it reads it from /cradle/latest/read).
    Send {
        instance: String,
        /// The message text; omit to read the message from --file or standard input.
        text: Option<String>,
        /// Read the message (any bytes) from this file; `-` is standard input.
        #[arg(long, conflicts_with = "text")]
        file: Option<PathBuf>,
    },
    /// Drain and print the messages the guest wrote (to /cradle/latest/write).
    Receive { instance: String },
    /// Clear an instance's error state (needs the admin role).
    ResetState { instance: String },
    /// Show what happened to an instance (errors, state resets, runs) and
    /// its maintenance events, with the time of each step.
    Events { instance: String },
    /// Schedule a maintenance event: reboot or stop the VM at a time.
    #[command(after_help = crate::maintenance::SCHEDULE_ABOUT)]
    Schedule {
        instance: String,
        /// What to do.
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(cradle_model::maintenance::MaintenanceCode::NAMES))]
        code: String,
        /// When: RFC 3339, or now, +90s, +10m, +2h, +1d [default: +10m].
        #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
        not_before: Option<String>,
        /// What the guest is told [default: "scheduled reboot" or "scheduled stop"].
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
    },
    /// Cancel a maintenance event that has not started.
    CancelEvent {
        instance: String,
        /// The event's id (instance-event-…), as `instance events` shows it.
        event: String,
    },
    /// Print the SSH host keys the guest agent published, as known_hosts lines.
    #[command(after_help = crate::agent::HOST_KEYS_ABOUT)]
    HostKeys {
        instance: String,
        /// Print `TYPE SHA256:…` fingerprints instead.
        #[arg(long)]
        fingerprints: bool,
    },
    /// Run an action of the guest agent's allow-list and wait for its answer.
    #[command(after_help = crate::agent::RUN_ABOUT)]
    Run {
        instance: String,
        /// The action's name, as the agent's configuration names it.
        action: String,
        /// Seconds to wait for the agent's answer.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

/// Fields shared by add and modify.
#[derive(Args, Debug, Default)]
struct Fields {
    /// Project (tenant) the instance belongs to [add default: default].
    #[arg(long)]
    project: Option<String>,
    /// Hostname (RFC 1123) [add default: derived from the name].
    #[arg(long)]
    hostname: Option<String>,
    /// Availability zone [add default: nova].
    #[arg(long)]
    availability_zone: Option<String>,
    /// Launch index.
    #[arg(long)]
    launch_index: Option<u32>,
    /// Instance type shown to EC2 clients [add default: default].
    #[arg(long)]
    instance_type: Option<String>,
    /// File holding the user-data (at most 64 KiB); `-` is standard input.
    #[arg(long, value_name = "FILE")]
    user_data: Option<PathBuf>,
    /// Metadata item KEY=VALUE (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    meta: Vec<String>,
    /// SSH public key NAME=KEY or NAME=@FILE (repeatable).
    #[arg(long = "key", value_name = "NAME=KEY")]
    keys: Vec<String>,
    /// Inject a file into the guest: GUEST_PATH=@LOCAL_FILE (repeatable; at most 16, 64 KiB each).
    #[arg(long = "file", value_name = "GUEST_PATH=@LOCAL")]
    files: Vec<String>,
    /// The address the guest's metadata requests come from [add default:
    /// the first free link-local address from 169.254.1.1].
    #[arg(long)]
    metadata_address: Option<String>,
    /// MAC address [add default: fa:16:3e and 3 bytes of the id].
    #[arg(long)]
    mac: Option<String>,
    /// The guest's IPv4 address, optionally with a prefix (10.0.0.5/24).
    #[arg(long)]
    local_ipv4: Option<String>,
    /// The guest's IPv6 address.
    #[arg(long)]
    local_ipv6: Option<String>,
    /// The guest's IPv6 link-local address, when it is not the one its mac
    /// gives (RFC 7217 stable privacy): the firewall lets it through too.
    #[arg(long, value_name = "FE80::…")]
    link_local_ipv6: Option<String>,
    /// The guest's network interface on the host (its tap): where cradle's
    /// firewall enforces its security groups. Without one it is not enforced.
    #[arg(long, value_name = "IFNAME")]
    interface: Option<String>,
    /// Default gateway for network_data.json.
    #[arg(long)]
    gateway_ipv4: Option<String>,
    /// DNS server (repeatable).
    #[arg(long = "dns", value_name = "IP")]
    dns: Vec<String>,
    /// Public (floating) IPv4 address.
    #[arg(long)]
    public_ipv4: Option<String>,
    /// OS definition to install with.
    #[arg(long, conflicts_with = "os_image")]
    os_type: Option<String>,
    /// OS image to boot from.
    #[arg(long)]
    os_image: Option<String>,
    /// The personalization package: an http, https or file URL of a .tar.gz
    /// or .tgz. Download credentials go in the secret parameters
    /// personalization_user and personalization_password, or personalization_token.
    #[arg(long, value_name = "URL")]
    personalization_url: Option<String>,
    /// Pin the personalization package's content to this SHA-256 (64 hex digits).
    #[arg(long, value_name = "HEX")]
    personalization_sha256: Option<String>,
    /// Public OS parameter NAME=VALUE or NAME=@FILE: stored, logged and shown.
    #[arg(long = "param", value_name = "NAME=VALUE")]
    params: Vec<String>,
    /// Private OS parameter: stored, never logged or shown (only its name is).
    #[arg(long = "private-param", value_name = "NAME=VALUE")]
    private_params: Vec<String>,
    /// Secret OS parameter: held in memory only, never written anywhere.
    #[arg(long = "secret-param", value_name = "NAME=VALUE")]
    secret_params: Vec<String>,
    /// Which metadata reads need an IMDSv2 session token: none (optional,
    /// the default), EC2 paths (required; OpenStack paths stay open, as no
    /// OpenStack client sends a token) or EC2 and OpenStack paths (strict).
    /// The native namespace always takes a token or the header
    /// `Metadata-Flavor: cradle`.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(cradle_model::ImdsTokens::NAMES))]
    imds_tokens: Option<String>,
    /// A disk image on this host, PATH or PATH:raw or PATH:qcow2 (raw when
    /// not said), attached in order: the first is vda and DISK_0_PATH.
    /// Repeatable; on modify, the list given replaces the old one.
    #[arg(long = "disk", value_name = "PATH[:FORMAT]")]
    disks: Vec<String>,
    /// Memory in MiB (default 512).
    #[arg(long, value_name = "MIB")]
    memory: Option<u32>,
    /// Virtual CPUs (default 1).
    #[arg(long)]
    vcpus: Option<u32>,
    /// self_install: an installation CD-ROM image (ISO) to attach. The
    /// --install-* flags are stored apart from the run setup, so a
    /// reinstall repeats them; on modify, any of them replaces the whole set.
    #[arg(long, value_name = "ISO")]
    install_cdrom: Option<String>,
    /// self_install: a kernel to boot directly.
    #[arg(long, value_name = "PATH")]
    install_kernel: Option<String>,
    /// self_install: the initrd for --install-kernel.
    #[arg(long, value_name = "PATH")]
    install_initrd: Option<String>,
    /// self_install: the command line for --install-kernel.
    #[arg(long, value_name = "TEXT")]
    install_cmdline: Option<String>,
    /// self_install: boot from disk or cdrom (default: the CD-ROM if any).
    #[arg(long, value_parser = ["disk", "cdrom"])]
    install_boot: Option<String>,
    /// Run mode: give the VM the fenced communication NIC as its last NIC
    /// (it reaches the metadata service and nothing else), for a guest
    /// agent [add default: off]. Used from the next start.
    #[arg(long, value_parser = ["on", "off"])]
    communication: Option<String>,
    /// Run mode: a kernel to boot directly instead of the disk's boot
    /// loader. On modify, --kernel replaces --initrd and --cmdline too.
    #[arg(long, value_name = "PATH")]
    kernel: Option<String>,
    /// Run mode: the initrd for --kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<String>,
    /// Run mode: the command line for --kernel. With communication on,
    /// cradle appends `cradle.address=` and `cradle.nic=` for the agent.
    #[arg(long, value_name = "TEXT", requires = "kernel")]
    cmdline: Option<String>,
    /// Tag KEY=VALUE (repeatable; at most 50, as EC2's).
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    tags: Vec<String>,
    /// Serve the tags to the guest at meta-data/tags/instance/ [add default: off].
    #[arg(long, value_parser = ["on", "off"])]
    metadata_tags: Option<String>,
}

impl Fields {
    /// The --install-* flags, when any is given.
    fn install_params(&self) -> Option<cradle_model::machine::InstallParams> {
        use cradle_model::machine::{BootDevice, InstallParams};
        let p = InstallParams {
            cdrom: self.install_cdrom.clone(),
            kernel: self.install_kernel.clone(),
            initrd: self.install_initrd.clone(),
            cmdline: self.install_cmdline.clone(),
            boot: self.install_boot.as_deref().map(|b| {
                if b == "cdrom" {
                    BootDevice::Cdrom
                } else {
                    BootDevice::Disk
                }
            }),
        };
        (!p.is_empty()).then_some(p)
    }

    fn communication(&self) -> Option<bool> {
        self.communication.as_deref().map(|c| c == "on")
    }

    fn metadata_tags(&self) -> Option<bool> {
        self.metadata_tags.as_deref().map(|c| c == "on")
    }

    /// --kernel, --initrd and --cmdline, when --kernel is given.
    fn run_kernel(&self) -> Option<cradle_model::machine::RunKernel> {
        Some(cradle_model::machine::RunKernel {
            path: self.kernel.clone()?,
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
        })
    }
}

/// `PATH`, `PATH:raw` or `PATH:qcow2`.
fn parse_disk(arg: &str) -> cradle_model::machine::Disk {
    use cradle_model::machine::{Disk, DiskFormat};
    let (path, format) = match arg.rsplit_once(':') {
        Some((p, "raw")) => (p, DiskFormat::Raw),
        Some((p, "qcow2")) => (p, DiskFormat::Qcow2),
        _ => (arg, DiskFormat::Raw),
    };
    Disk {
        path: path.to_string(),
        format,
    }
}

#[derive(Args, Debug)]
struct AddArgs {
    /// Unique name of the instance.
    name: String,
    /// The cluster host that serves it (its metadata service, firewall and
    /// VM) [default: the host whose admin API is asked].
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    #[command(flatten)]
    fields: Fields,
}

#[derive(Args, Debug)]
struct ModifyArgs {
    /// Instance id or name.
    instance: String,
    /// New name.
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    fields: Fields,
    /// Remove a metadata item (repeatable).
    #[arg(long, value_name = "KEY")]
    unset_meta: Vec<String>,
    /// Remove an SSH key (repeatable).
    #[arg(long, value_name = "NAME")]
    unset_key: Vec<String>,
    /// Remove a tag (repeatable).
    #[arg(long, value_name = "KEY")]
    unset_tag: Vec<String>,
    /// Remove an injected file (repeatable).
    #[arg(long, value_name = "GUEST_PATH")]
    unset_file: Vec<String>,
    /// Remove an OS parameter, whatever its visibility (repeatable).
    #[arg(long, value_name = "NAME")]
    unset_param: Vec<String>,
    /// Remove the user-data.
    #[arg(long, conflicts_with = "user_data")]
    clear_user_data: bool,
    /// Remove the public IPv4 address.
    #[arg(long, conflicts_with = "public_ipv4")]
    clear_public_ipv4: bool,
    /// Remove the interface: the firewall stops enforcing for the instance.
    #[arg(long, conflicts_with = "interface")]
    clear_interface: bool,
    /// Remove the personalization package (its URL and its pin).
    #[arg(long, conflicts_with_all = ["personalization_url", "personalization_sha256"])]
    clear_personalization: bool,
    /// Remove the self_install parameters (--install-*).
    #[arg(long, conflicts_with_all = ["install_cdrom", "install_kernel", "install_initrd", "install_cmdline", "install_boot"])]
    clear_install_params: bool,
    /// Run mode: boot from the disks again (drop --kernel, --initrd, --cmdline).
    #[arg(long, conflicts_with = "kernel")]
    clear_kernel: bool,
}

pub fn run(args: InstanceArgs) -> Result<()> {
    let api = crate::client::connect(&args.api)?;
    let output = args.output;
    let mut out = std::io::stdout().lock();
    match args.command {
        InstanceCommand::Add(a) => {
            let spec = build_spec(*a)?;
            let v = api.send(route::create_instance(&spec))?;
            crate::show::print_instance(&mut out, output, &v)
        }
        InstanceCommand::List => {
            let instances = api.send(route::instances())?;
            match output {
                Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&instances)?)?,
                Output::Table => {
                    let rows: Vec<Vec<String>> = instances
                        .iter()
                        .map(|i| {
                            vec![
                                i.id.to_string(),
                                i.name.clone(),
                                i.state.as_str().into(),
                                i.metadata_address.to_string(),
                                i.hostname.clone(),
                                i.project_id.clone(),
                            ]
                        })
                        .collect();
                    table(
                        &mut out,
                        &[
                            "ID",
                            "NAME",
                            "STATE",
                            "METADATA ADDRESS",
                            "HOSTNAME",
                            "PROJECT",
                        ],
                        &rows,
                    )?;
                }
            }
            Ok(())
        }
        InstanceCommand::Show { instance } => {
            let v = api.send(route::instance(&instance))?;
            crate::show::print_instance(&mut out, output, &v)
        }
        InstanceCommand::Modify(m) => {
            let key = m.instance.clone();
            let patch = build_patch(*m)?;
            let v = api.send(route::modify_instance(&key, &patch))?;
            crate::show::print_instance(&mut out, output, &v)
        }
        InstanceCommand::Install { instance, follow } => {
            let job = api.send(route::start_install(&instance))?;
            crate::install::show(&api, &instance, job, follow, output)
        }
        InstanceCommand::Export {
            instance,
            file,
            disk,
        } => crate::os_jobs::export(&api, &instance, disk, Some(&file), output),
        InstanceCommand::Import {
            instance,
            file,
            disk,
            sha256,
        } => crate::os_jobs::import(&api, &instance, &file, disk, sha256.as_deref(), output),
        InstanceCommand::Rename { instance, new_name } => {
            crate::os_jobs::rename(&api, &instance, &new_name, output)
        }
        InstanceCommand::Migrate {
            instance,
            to,
            transport,
            grace,
        } => crate::migrate::run(&api, &instance, &to, transport, grace, output),
        InstanceCommand::Start { instance } => {
            let v = api.send(route::start_vm(&instance))?;
            crate::show::print_instance(&mut out, output, &v)
        }
        InstanceCommand::Stop {
            instance,
            force,
            grace,
        } => {
            let grace = std::time::Duration::from_secs(grace);
            let v = api.send(route::stop_vm(&instance, force, grace))?;
            crate::show::print_instance(&mut out, output, &v)
        }
        InstanceCommand::Status { instance } => {
            let v = api.send(route::vm_status(&instance))?;
            if output == Output::Json {
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                let agent = api.send(route::instance(&instance))?.agent;
                writeln!(
                    out,
                    "{}: state {}, vm {}, agent {}",
                    v.instance,
                    v.state,
                    v.vm,
                    crate::agent::summary(agent.as_ref())
                )?;
            }
            Ok(())
        }
        InstanceCommand::HostKeys {
            instance,
            fingerprints,
        } => crate::agent::host_keys(&api, &instance, fingerprints, output),
        InstanceCommand::Run {
            instance,
            action,
            timeout,
        } => crate::agent::run(&api, &instance, &action, timeout, output),
        InstanceCommand::Console { instance, bytes } => {
            api.download(route::console(&instance, bytes), &mut out)?;
            Ok(())
        }
        InstanceCommand::InstallStatus { instance, follow } => {
            let job = api.send(route::install_job(&instance, 0, std::time::Duration::ZERO))?;
            crate::install::show(&api, &instance, job, follow, output)
        }
        InstanceCommand::Remove { instance } => {
            api.send(route::remove_instance(&instance))?;
            if output == Output::Json {
                writeln!(out, "{}", serde_json::json!({ "removed": instance }))?;
            } else {
                writeln!(out, "removed {instance}")?;
            }
            Ok(())
        }
        InstanceCommand::Send {
            instance,
            text,
            file,
        } => {
            let msg = match (text, file) {
                (Some(t), _) => MessageIn {
                    text: Some(t),
                    data: None,
                },
                (None, f) => {
                    let bytes = read_source(f.as_deref().unwrap_or(std::path::Path::new("-")))?;
                    MessageIn {
                        text: None,
                        data: Some(B64.encode(bytes)),
                    }
                }
            };
            let id = api.send(route::send_message(&instance, &msg))?;
            if output == Output::Json {
                writeln!(out, "{}", serde_json::json!({ "id": id }))?;
            } else {
                writeln!(out, "queued message {id} for {instance}")?;
            }
            Ok(())
        }
        InstanceCommand::ResetState { instance } => {
            let v = api.send(route::reset_state(&instance))?;
            crate::show::print_instance(&mut out, output, &v)
        }
        InstanceCommand::Events { instance } => crate::maintenance::events(&api, &instance, output),
        InstanceCommand::Schedule {
            instance,
            code,
            not_before,
            description,
        } => crate::maintenance::schedule(
            &api,
            &instance,
            &code,
            not_before.as_deref(),
            description,
            output,
        ),
        InstanceCommand::CancelEvent { instance, event } => {
            crate::maintenance::cancel(&api, &instance, &event, output)
        }
        InstanceCommand::Receive { instance } => {
            let messages = api.send(route::receive_messages(&instance))?;
            match output {
                Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&messages)?)?,
                Output::Table => {
                    for m in &messages {
                        match &m.text {
                            Some(t) => writeln!(out, "{}", t)?,
                            None => writeln!(
                                out,
                                "[{} bytes, base64] {}",
                                B64.decode(&m.data).map(|b| b.len()).unwrap_or(0),
                                m.data
                            )?,
                        }
                    }
                }
            }
            Ok(())
        }
    }
}

fn read_source(path: &std::path::Path) -> Result<Vec<u8>> {
    if path == std::path::Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("cannot read standard input")?;
        Ok(buf)
    } else {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    }
}

/// `NAME=VALUE`, where a value of `@FILE` is read from the file (a trailing
/// newline dropped, as editors add one).
fn pair(flag: &str, s: &str) -> Result<(String, String)> {
    let Some((k, v)) = s.split_once('=') else {
        bail!("{flag} expects NAME=VALUE, got {s:?}");
    };
    let v = match v.strip_prefix('@') {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{flag} {k}: cannot read {path}"))?;
            text.strip_suffix('\n').map(str::to_string).unwrap_or(text)
        }
        None => v.to_string(),
    };
    Ok((k.to_string(), v))
}

/// `--file GUEST_PATH=@LOCAL`: the local file's bytes, base64, by guest path.
fn injected(items: &[String]) -> Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|s| {
            let Some((guest, local)) = s.split_once("=@") else {
                bail!("--file expects GUEST_PATH=@LOCAL_FILE, got {s:?}");
            };
            let bytes = std::fs::read(local)
                .with_context(|| format!("--file {guest}: cannot read {local}"))?;
            Ok((guest.to_string(), B64.encode(bytes)))
        })
        .collect()
}

pub(crate) fn pairs(flag: &str, items: &[String]) -> Result<BTreeMap<String, String>> {
    items.iter().map(|s| pair(flag, s)).collect()
}

fn build_spec(a: AddArgs) -> Result<InstanceSpec> {
    let f = a.fields;
    let install_params = f.install_params();
    let metadata_tags = f.metadata_tags();
    let run_params = match (f.communication(), f.run_kernel()) {
        (None, None) => None,
        (c, kernel) => Some(cradle_model::machine::RunParams {
            communication: c.unwrap_or(false),
            kernel,
        }),
    };
    Ok(InstanceSpec {
        name: a.name,
        host: a.host,
        project_id: f.project,
        hostname: f.hostname,
        availability_zone: f.availability_zone,
        launch_index: f.launch_index,
        instance_type: f.instance_type,
        user_data: f
            .user_data
            .as_deref()
            .map(read_source)
            .transpose()?
            .map(|b| B64.encode(b)),
        metadata: pairs("--meta", &f.meta)?,
        public_keys: pairs("--key", &f.keys)?,
        files: injected(&f.files)?,
        metadata_address: f.metadata_address,
        mac: f.mac,
        local_ipv4: f.local_ipv4,
        local_ipv6: f.local_ipv6,
        link_local_ipv6: f.link_local_ipv6,
        interface: f.interface,
        gateway_ipv4: f.gateway_ipv4,
        dns_nameservers: f.dns,
        public_ipv4: f.public_ipv4,
        os_type: f.os_type,
        os_image: f.os_image,
        personalization_url: f.personalization_url,
        personalization_sha256: f.personalization_sha256,
        disks: f.disks.iter().map(|d| parse_disk(d)).collect(),
        memory_mib: f.memory,
        vcpus: f.vcpus,
        install_params,
        run_params,
        os_params: OsParamsSpec {
            public: pairs("--param", &f.params)?,
            private: secrets("--private-param", &f.private_params)?,
            secret: secrets("--secret-param", &f.secret_params)?,
        },
        imds_tokens: f
            .imds_tokens
            .map(|t| t.parse::<ImdsTokens>().map_err(anyhow::Error::msg))
            .transpose()?,
        metadata_tags,
        tags: pairs("--tag", &f.tags)?,
    })
}

fn secrets(flag: &str, items: &[String]) -> Result<BTreeMap<String, Secret<String>>> {
    Ok(pairs(flag, items)?
        .into_iter()
        .map(|(k, v)| (k, Secret::new(v)))
        .collect())
}

fn some_map<V>(m: BTreeMap<String, V>) -> BTreeMap<String, Option<V>> {
    m.into_iter().map(|(k, v)| (k, Some(v))).collect()
}

fn build_patch(m: ModifyArgs) -> Result<InstancePatch> {
    let f = m.fields;
    let install_params = f.install_params();
    let metadata_tags = f.metadata_tags();
    let communication = f.communication();
    let run_kernel = match f.run_kernel() {
        _ if m.clear_kernel => Patch::Null,
        Some(k) => Patch::Value(k),
        None => Patch::Absent,
    };
    let mut metadata = some_map(pairs("--meta", &f.meta)?);
    metadata.extend(m.unset_meta.into_iter().map(|k| (k, None)));
    let mut tags = some_map(pairs("--tag", &f.tags)?);
    tags.extend(m.unset_tag.into_iter().map(|k| (k, None)));
    let mut public_keys = some_map(pairs("--key", &f.keys)?);
    public_keys.extend(m.unset_key.into_iter().map(|k| (k, None)));
    let mut files = some_map(injected(&f.files)?);
    files.extend(m.unset_file.into_iter().map(|k| (k, None)));
    let mut os_params = OsParamsPatch {
        public: some_map(pairs("--param", &f.params)?),
        private: some_map(secrets("--private-param", &f.private_params)?),
        secret: some_map(secrets("--secret-param", &f.secret_params)?),
    };
    for k in m.unset_param {
        // Removing from every visibility: the server drops it wherever it is.
        os_params.public.insert(k.clone(), None);
        os_params.private.insert(k.clone(), None);
        os_params.secret.insert(k, None);
    }
    let opt = |v: Option<String>| v.map(Patch::Value).unwrap_or_default();
    Ok(InstancePatch {
        name: m.name,
        project_id: f.project,
        hostname: f.hostname,
        availability_zone: f.availability_zone,
        launch_index: f.launch_index,
        instance_type: f.instance_type,
        user_data: if m.clear_user_data {
            Patch::Null
        } else {
            opt(f
                .user_data
                .as_deref()
                .map(read_source)
                .transpose()?
                .map(|b| B64.encode(b)))
        },
        metadata,
        public_keys,
        files,
        metadata_address: f.metadata_address,
        mac: f.mac,
        local_ipv4: opt(f.local_ipv4),
        local_ipv6: opt(f.local_ipv6),
        link_local_ipv6: opt(f.link_local_ipv6),
        interface: if m.clear_interface {
            Patch::Null
        } else {
            opt(f.interface)
        },
        gateway_ipv4: opt(f.gateway_ipv4),
        dns_nameservers: if f.dns.is_empty() { None } else { Some(f.dns) },
        public_ipv4: if m.clear_public_ipv4 {
            Patch::Null
        } else {
            opt(f.public_ipv4)
        },
        os_type: opt(f.os_type),
        os_image: opt(f.os_image),
        personalization_url: if m.clear_personalization {
            Patch::Null
        } else {
            opt(f.personalization_url)
        },
        personalization_sha256: if m.clear_personalization {
            Patch::Null
        } else {
            opt(f.personalization_sha256)
        },
        disks: if f.disks.is_empty() {
            None
        } else {
            Some(f.disks.iter().map(|d| parse_disk(d)).collect())
        },
        memory_mib: f.memory,
        vcpus: f.vcpus,
        install_params: if m.clear_install_params {
            Some(Default::default())
        } else {
            install_params
        },
        communication,
        run_kernel,
        metadata_tags,
        tags,
        os_params,
        imds_tokens: f
            .imds_tokens
            .map(|t| t.parse::<ImdsTokens>().map_err(anyhow::Error::msg))
            .transpose()?,
    })
}

/// Columns padded to their widest cell, two spaces apart.
pub(crate) fn table(out: &mut impl Write, headers: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(out, "{}", line(headers.to_vec()))?;
    for r in rows {
        writeln!(out, "{}", line(r.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}
