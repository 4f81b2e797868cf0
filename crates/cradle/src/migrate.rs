//! `cradle instance migrate`: ask the host that serves the instance to move
//! it, and show the steps and the copy's progress as they stream back.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use cradle_client::route;
use cradle_model::answers::{MigrateRequest, MigrationProgress};

use crate::Output;
use crate::client::Api;

pub const ABOUT: &str = "\
The host that serves the instance runs the migration (this command finds it and asks it): it \
checks the target (known, up, room for the disks) and the transport's credentials, stops the VM \
if it runs, copies every disk over ssh or rsync ([remote] on that host; sparse files stay \
sparse), moves the placement and the secrets (in memory, over the cluster's mutual TLS), then \
starts it on the target if it was running. A failure at any step, or Ctrl-C here, rolls back: \
the instance stays whole on its host, running if it was, and the copies are removed. Each step \
is an event (`cradle instance events`).\n\nExample:\n  cradle instance migrate web1 --to node2";

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum TransportArg {
    Ssh,
    Rsync,
}

/// A migration may copy large disks: the request lasts as long as it does.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

pub fn run(
    api: &Api,
    instance: &str,
    to: &str,
    transport: Option<TransportArg>,
    grace: u64,
    output: Output,
) -> Result<()> {
    // The host that serves it runs it.
    let (inst, base) = crate::client::serving_host(api, instance)?;
    let long = Api::new(api.target().at(&base).timeout(MIGRATION_TIMEOUT))?;
    let req = MigrateRequest {
        to: to.to_string(),
        transport: transport.map(|t| match t {
            TransportArg::Ssh => "ssh".to_string(),
            TransportArg::Rsync => "rsync".to_string(),
        }),
        grace: Some(grace),
    };
    let resp = long.open(route::migrate(&inst.id.to_string(), &req))?;
    let bar = (output == Output::Table && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("the template is valid"),
        );
        b
    });
    let mut stdout = std::io::stdout();
    let mut outcome = None;
    for l in BufReader::new(resp).lines() {
        let l = l.map_err(|e| anyhow!("the migration's answer broke off: {e}"))?;
        if l.trim().is_empty() {
            continue;
        }
        let p: MigrationProgress = serde_json::from_str(&l)
            .map_err(|e| anyhow!("the server sent a line that is not progress ({e}): {l}"))?;
        if output == Output::Json {
            writeln!(stdout, "{l}")?;
        }
        match (&bar, p.step.as_str(), p.done, p.total) {
            (Some(b), "copy", Some(done), Some(total)) => {
                b.set_length(total);
                b.set_position(done);
                if !p.message.is_empty() {
                    b.set_message(format!("disk {}", p.disk.unwrap_or(0)));
                    b.println(p.message.clone());
                }
            }
            (_, "copy", _, _) if p.message.is_empty() => {}
            _ if output == Output::Table => match &bar {
                Some(b) => b.println(&p.message),
                None => writeln!(stdout, "{}", p.message)?,
            },
            _ => {}
        }
        if p.step == "done" || p.step == "failed" {
            outcome = Some(p);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    match outcome {
        Some(p) if p.step == "done" => {
            eprintln!("migrated {} to {to}", inst.name);
            Ok(())
        }
        Some(p) => bail!(
            "migration of {} to {to} failed ({}): {}; it stays on {}",
            inst.name,
            p.code.unwrap_or_default(),
            p.message,
            inst.host
        ),
        None => bail!("the migration's answer ended before its outcome"),
    }
}
