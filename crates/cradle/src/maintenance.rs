//! `cradle instance schedule`, `cancel-event` and `events`: maintenance
//! events from the command line, and the instance's event log beside them.

use std::io::Write;

use anyhow::{Result, bail};
use cradle_client::route;
use cradle_model::maintenance::{MaintenanceCode, MaintenanceEvent, MaintenanceRequest};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::Output;
use crate::client::Api;
use crate::instance::table;

/// What `cradle instance schedule --help` adds.
pub const SCHEDULE_ABOUT: &str = "The host that serves the instance runs the event at its \
not-before time: `stop` powers the VM off (ACPI, then killed after [maintenance] stop_grace \
seconds), `reboot` does the same and starts it again. A VM that is not running is left as it \
is (the event completes with nothing done). The guest sees the event at \
meta-data/events/maintenance/scheduled (EC2's shape) and /cradle/latest/events, and may \
acknowledge it (POST /cradle/latest/events/ID/ack): it then runs at once. Until it starts, \
`cradle instance cancel-event` cancels it.\n\nTIME is RFC 3339 (2025-06-01T12:00:00Z), or \
relative to the server's clock: now, +90s, +10m, +2h, +1d. Without --not-before the event runs \
in 10 minutes.\n\nExample:\n  cradle instance schedule web1 reboot --not-before +2h \
--description 'host kernel update'";

/// `--not-before`: RFC 3339, or `now` / `+N[smhd]` as seconds from now.
fn not_before(arg: Option<&str>) -> Result<(Option<String>, Option<i64>)> {
    let Some(t) = arg else {
        return Ok((None, None));
    };
    if t == "now" {
        return Ok((None, Some(0)));
    }
    if let Some(rel) = t.strip_prefix('+') {
        let (n, unit) = rel.split_at(rel.len().saturating_sub(1));
        let scale = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => bail!("--not-before {t:?}: a relative time is +N and s, m, h or d (+10m)"),
        };
        let n: i64 = n
            .parse()
            .map_err(|_| anyhow::anyhow!("--not-before {t:?}: {n:?} is not a whole number"))?;
        return Ok((None, Some(n.saturating_mul(scale))));
    }
    if OffsetDateTime::parse(t, &Rfc3339).is_err() {
        bail!(
            "--not-before {t:?} is neither RFC 3339 (2025-06-01T12:00:00Z) nor relative (+10m, now)"
        );
    }
    Ok((Some(t.to_string()), None))
}

pub fn schedule(
    api: &Api,
    instance: &str,
    code: &str,
    at: Option<&str>,
    description: Option<String>,
    output: Output,
) -> Result<()> {
    let code: MaintenanceCode = code.parse().map_err(anyhow::Error::msg)?;
    let (not_before, delay_seconds) = not_before(at)?;
    let req = MaintenanceRequest {
        code: Some(code),
        not_before,
        delay_seconds,
        description,
    };
    let e = api.send(route::schedule_maintenance(instance, &req))?;
    let mut out = std::io::stdout().lock();
    match output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&e)?)?,
        Output::Table => writeln!(
            out,
            "scheduled {} ({}) on {instance} for {}",
            e.id,
            e.code.as_str(),
            time(Some(e.not_before))
        )?,
    }
    Ok(())
}

pub fn cancel(api: &Api, instance: &str, event: &str, output: Output) -> Result<()> {
    let e = api.send(route::cancel_maintenance(instance, event))?;
    let mut out = std::io::stdout().lock();
    match output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&e)?)?,
        Output::Table => writeln!(out, "cancelled {} on {instance}", e.id)?,
    }
    Ok(())
}

fn time(t: Option<OffsetDateTime>) -> String {
    t.and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "-".into())
}

/// The event log, then the maintenance events with the time of each step.
pub fn events(api: &Api, instance: &str, output: Output) -> Result<()> {
    let events = api.send(route::events(instance))?;
    let maintenance: Vec<MaintenanceEvent> = api.send(route::maintenance(instance))?;
    let mut out = std::io::stdout().lock();
    if output == Output::Json {
        let both = serde_json::json!({ "events": events, "maintenance": maintenance });
        writeln!(out, "{}", serde_json::to_string_pretty(&both)?)?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|ev| {
            vec![
                time(Some(ev.created_at)),
                ev.kind.clone(),
                ev.message.clone(),
            ]
        })
        .collect();
    table(&mut out, &["TIME", "KIND", "MESSAGE"], &rows)?;
    if maintenance.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    let rows: Vec<Vec<String>> = maintenance
        .iter()
        .map(|e| {
            vec![
                e.id.clone(),
                e.code.as_str().into(),
                e.state.as_str().into(),
                time(Some(e.not_before)),
                time(Some(e.scheduled_at)),
                time(e.acknowledged_at),
                time(e.started_at),
                time(e.ended_at),
                match &e.error {
                    Some(err) => format!("{} (error: {err})", e.description),
                    None => e.description.clone(),
                },
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "EVENT",
            "CODE",
            "STATE",
            "NOT BEFORE",
            "SCHEDULED",
            "ACKNOWLEDGED",
            "STARTED",
            "ENDED",
            "DESCRIPTION",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_before_takes_rfc3339_and_relative_times() {
        assert_eq!(not_before(Some("+10m")).unwrap(), (None, Some(600)));
        assert_eq!(not_before(Some("+2h")).unwrap(), (None, Some(7200)));
        assert_eq!(not_before(Some("now")).unwrap(), (None, Some(0)));
        assert_eq!(
            not_before(Some("2025-06-01T12:00:00Z")).unwrap(),
            (Some("2025-06-01T12:00:00Z".into()), None)
        );
        for bad in ["+10", "+xm", "tomorrow", "+"] {
            assert!(not_before(Some(bad)).is_err(), "{bad}");
        }
    }
}
