//! `cradle instance install` and `install-status`: start an install job and
//! follow it through the admin API (`GET …/install?after=N&wait=S` long
//! polls, so a quiet job costs one request every 30 s).

use std::io::{IsTerminal, Write};

use std::time::Duration;

use anyhow::{Result, bail};
use cradle_client::route;
use cradle_model::job::{EventKind, JobEvent, JobView};

use crate::Output;
use crate::client::Api;

/// How long each follow request waits for news.
const WAIT: Duration = Duration::from_secs(30);

fn line(e: &JobEvent) -> String {
    let kind = match e.kind {
        EventKind::Job => "job",
        EventKind::Progress => "progress",
        EventKind::Log => "appliance",
        EventKind::Trusted => "trusted",
        EventKind::Status => "status",
    };
    format!("[{:>7.1}s] {kind:<9} {}", e.ms as f64 / 1000.0, e.text)
}

/// What the job is called: "install" for `create`, else its operation.
fn noun(job: &JobView) -> &str {
    match job.operation.as_str() {
        "create" => "install",
        other => other,
    }
}

/// A job just started or looked up: followed to its end, or printed.
pub fn show(
    api: &Api,
    instance: &str,
    job: JobView,
    follow_it: bool,
    output: Output,
) -> Result<()> {
    if follow_it {
        follow(api, instance, job, output)
    } else {
        print(&mut std::io::stdout().lock(), output, &job)
    }
}

/// Print a job and its events.
pub fn print(out: &mut impl Write, output: Output, job: &JobView) -> Result<()> {
    if output == Output::Json {
        writeln!(out, "{}", serde_json::to_string_pretty(job)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{} job {} of {}: {}",
        noun(job),
        job.id,
        job.instance_name,
        job.state
    )?;
    if let Some(r) = &job.reason {
        writeln!(out, "reason: {r}")?;
    }
    for e in &job.events {
        writeln!(out, "{}", line(e))?;
    }
    Ok(())
}

/// Show the job's events as they come until it ends; an error when it failed.
pub fn follow(api: &Api, instance: &str, mut job: JobView, output: Output) -> Result<()> {
    let bar = (output == Output::Table && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                .expect("the template is valid"),
        );
        b.enable_steady_tick(std::time::Duration::from_millis(120));
        b
    });
    let mut stdout = std::io::stdout();
    loop {
        for e in &job.events {
            match output {
                Output::Json => writeln!(stdout, "{}", serde_json::to_string(e)?)?,
                Output::Table => match &bar {
                    Some(b) => b.println(line(e)),
                    None => writeln!(stdout, "{}", line(e))?,
                },
            }
        }
        stdout.flush()?;
        if let (Some(b), Some(step)) = (&bar, &job.step) {
            b.set_message(step.clone());
        }
        if job.state != "running" {
            break;
        }
        job = api.send(route::install_job(instance, job.next, WAIT))?;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if job.dropped > 0 {
        eprintln!("({} early events were dropped by the server)", job.dropped);
    }
    match job.state.as_str() {
        "succeeded" => {
            eprintln!(
                "{} of {} succeeded in {:.1}s",
                noun(&job),
                job.instance_name,
                job.elapsed_ms as f64 / 1000.0
            );
            Ok(())
        }
        _ => bail!(
            "{} of {} failed: {}",
            noun(&job),
            job.instance_name,
            job.reason.as_deref().unwrap_or("no reason given")
        ),
    }
}
