//! Maintenance events: an operation (a reboot, a stop) scheduled on an
//! instance for a time, which its guest sees coming (EC2's
//! `events/maintenance/scheduled`, cradle's `/cradle/latest/events`) and
//! may acknowledge, after which it runs at once.
//!
//! The events are part of the [`crate::Instance`] record (its
//! `maintenance` list), so every change to one is an instance update:
//! stored with the row, seen by the other hosts of a cluster, and by the
//! render cache. The list is bounded: at most [`MAX_EVENTS`] per
//! instance, and finished ones beyond the history limit go, oldest first.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::api::Invalid;

/// Events one instance holds, pending and finished together.
pub const MAX_EVENTS: usize = 100;
/// Finished events kept per instance unless configured otherwise
/// (`[maintenance] history`).
pub const DEFAULT_HISTORY: usize = 20;
/// Longest description, in bytes.
pub const MAX_DESCRIPTION: usize = 255;
/// How far ahead an event may be scheduled: a year.
pub const MAX_LEAD_SECONDS: i64 = 366 * 86_400;
/// The notice an event gets when its request names no time: ten minutes.
pub const DEFAULT_NOTICE_SECONDS: i64 = 600;

/// What the event does to the instance's VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MaintenanceCode {
    /// Stop the VM (gracefully, then forced), then start it again.
    Reboot,
    /// Stop the VM (gracefully, then forced).
    Stop,
}

impl MaintenanceCode {
    pub const NAMES: &'static [&'static str] = &["reboot", "stop"];

    pub fn as_str(self) -> &'static str {
        match self {
            MaintenanceCode::Reboot => "reboot",
            MaintenanceCode::Stop => "stop",
        }
    }

    /// EC2's code for it.
    pub fn ec2_code(self) -> &'static str {
        match self {
            MaintenanceCode::Reboot => "instance-reboot",
            MaintenanceCode::Stop => "instance-stop",
        }
    }
}

impl std::str::FromStr for MaintenanceCode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reboot" => Ok(MaintenanceCode::Reboot),
            "stop" => Ok(MaintenanceCode::Stop),
            other => Err(format!("the code must be reboot or stop, not {other:?}")),
        }
    }
}

/// Where an event is in its life: `scheduled`, maybe `acknowledged`, then
/// `started` and one of `completed` or `failed`; or `cancelled` before it
/// started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MaintenanceState {
    Scheduled,
    Acknowledged,
    Started,
    Completed,
    Cancelled,
    Failed,
}

impl MaintenanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            MaintenanceState::Scheduled => "scheduled",
            MaintenanceState::Acknowledged => "acknowledged",
            MaintenanceState::Started => "started",
            MaintenanceState::Completed => "completed",
            MaintenanceState::Cancelled => "cancelled",
            MaintenanceState::Failed => "failed",
        }
    }

    /// Not started yet: it may still be acknowledged or cancelled.
    pub fn is_pending(self) -> bool {
        matches!(
            self,
            MaintenanceState::Scheduled | MaintenanceState::Acknowledged
        )
    }

    /// Over, one way or another.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            MaintenanceState::Completed | MaintenanceState::Cancelled | MaintenanceState::Failed
        )
    }
}

/// One maintenance event of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MaintenanceEvent {
    /// `instance-event-` and 17 hex digits, as EC2's.
    pub id: String,
    pub code: MaintenanceCode,
    pub description: String,
    /// When it runs, unless the guest acknowledges it earlier (UTC).
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub not_before: OffsetDateTime,
    pub state: MaintenanceState,
    /// Why it failed (the hypervisor's error), when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub scheduled_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub acknowledged_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<OffsetDateTime>,
    /// When it completed, failed or was cancelled.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub ended_at: Option<OffsetDateTime>,
}

impl MaintenanceEvent {
    /// Whether it should run at `now`: pending, and acknowledged or due.
    pub fn is_due(&self, now: OffsetDateTime) -> bool {
        match self.state {
            MaintenanceState::Acknowledged => true,
            MaintenanceState::Scheduled => self.not_before <= now,
            _ => false,
        }
    }

    /// When it becomes due: `None` unless pending.
    pub fn due_at(&self) -> Option<OffsetDateTime> {
        match self.state {
            MaintenanceState::Acknowledged => Some(self.scheduled_at.min(self.not_before)),
            MaintenanceState::Scheduled => Some(self.not_before),
            _ => None,
        }
    }
}

/// Whether `id` looks like an event id: `instance-event-` and 17 lower-case
/// hex digits.
pub fn is_event_id(id: &str) -> bool {
    id.strip_prefix("instance-event-").is_some_and(|h| {
        h.len() == 17
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// `POST /v1/instances/{key}/maintenance`: schedule an event. `not_before`
/// and `delay_seconds` are exclusive; with neither it runs
/// [`DEFAULT_NOTICE_SECONDS`] after the server receives it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceRequest {
    /// Required: `reboot` or `stop`.
    pub code: Option<MaintenanceCode>,
    /// When it runs (RFC 3339); in the past means at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// When it runs, in seconds from now (as the server's clock says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_seconds: Option<i64>,
    /// Shown to the guest [default: "scheduled reboot" or "scheduled stop"].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

fn invalid<T>(field: &str, message: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid {
        field: field.into(),
        message: message.into(),
    })
}

impl MaintenanceRequest {
    /// Validate and build the event (state `scheduled`) with `id`, at `now`.
    pub fn into_event(self, id: String, now: OffsetDateTime) -> Result<MaintenanceEvent, Invalid> {
        let Some(code) = self.code else {
            return invalid("code", "is required: reboot or stop");
        };
        let not_before = match (self.not_before, self.delay_seconds) {
            (Some(_), Some(_)) => {
                return invalid(
                    "not_before",
                    "not_before and delay_seconds are mutually exclusive",
                );
            }
            (Some(t), None) => {
                OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339).or_else(
                    |e| {
                        invalid(
                            "not_before",
                            format!("{t:?} is not an RFC 3339 time (2025-06-01T12:00:00Z): {e}"),
                        )
                    },
                )?
            }
            (None, Some(s)) if !(0..=MAX_LEAD_SECONDS).contains(&s) => {
                return invalid(
                    "delay_seconds",
                    format!("must be from 0 to {MAX_LEAD_SECONDS} (a year), not {s}"),
                );
            }
            (None, Some(s)) => now + time::Duration::seconds(s),
            (None, None) => now + time::Duration::seconds(DEFAULT_NOTICE_SECONDS),
        };
        if not_before > now + time::Duration::seconds(MAX_LEAD_SECONDS) {
            return invalid("not_before", "must be within a year from now");
        }
        let description = self
            .description
            .unwrap_or_else(|| format!("scheduled {}", code.as_str()));
        if description.len() > MAX_DESCRIPTION || description.chars().any(char::is_control) {
            return invalid(
                "description",
                format!("must be at most {MAX_DESCRIPTION} bytes of printable text"),
            );
        }
        Ok(MaintenanceEvent {
            id,
            code,
            description,
            // Whole seconds, in UTC: what EC2 shows and every reader parses.
            not_before: not_before
                .to_offset(time::UtcOffset::UTC)
                .replace_nanosecond(0)
                .expect("0 is a valid nanosecond"),
            state: MaintenanceState::Scheduled,
            error: None,
            scheduled_at: now,
            acknowledged_at: None,
            started_at: None,
            ended_at: None,
        })
    }
}

/// Add `event` to `list`, dropping the oldest finished events beyond
/// `history` first. Refused when the list would hold more than
/// [`MAX_EVENTS`] even so.
pub fn schedule(
    list: &mut Vec<MaintenanceEvent>,
    event: MaintenanceEvent,
    history: usize,
) -> Result<(), Invalid> {
    prune(list, history);
    if list.len() >= MAX_EVENTS {
        return invalid(
            "maintenance",
            format!(
                "the instance holds {MAX_EVENTS} maintenance events already; \
                 cancel some or let them run"
            ),
        );
    }
    list.push(event);
    Ok(())
}

/// Keep at most `history` finished events (the newest), and at most
/// [`MAX_EVENTS`] in all; pending and started ones are never dropped.
pub fn prune(list: &mut Vec<MaintenanceEvent>, history: usize) {
    let finished = list.iter().filter(|e| e.state.is_finished()).count();
    let pending = list.len() - finished;
    let keep = history.min(MAX_EVENTS.saturating_sub(pending));
    let mut drop = finished.saturating_sub(keep);
    // The list is in scheduling order; drop the oldest finished first.
    list.retain(|e| {
        if drop > 0 && e.state.is_finished() {
            drop -= 1;
            false
        } else {
            true
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: u32, state: MaintenanceState) -> MaintenanceEvent {
        MaintenanceRequest {
            code: Some(MaintenanceCode::Reboot),
            delay_seconds: Some(0),
            ..Default::default()
        }
        .into_event(
            format!("instance-event-{n:017x}"),
            OffsetDateTime::UNIX_EPOCH,
        )
        .map(|mut e| {
            e.state = state;
            e
        })
        .unwrap()
    }

    #[test]
    fn history_is_pruned_oldest_first_and_pending_ones_stay() {
        let mut list: Vec<_> = (0..5).map(|n| ev(n, MaintenanceState::Completed)).collect();
        list.insert(2, ev(9, MaintenanceState::Scheduled));
        prune(&mut list, 2);
        let ids: Vec<_> = list.iter().map(|e| &e.id[15..]).collect();
        assert_eq!(
            ids,
            [
                "00000000000000009",
                "00000000000000003",
                "00000000000000004"
            ]
        );
    }

    #[test]
    fn the_list_is_bounded() {
        let mut list: Vec<_> = (0..MAX_EVENTS as u32)
            .map(|n| ev(n, MaintenanceState::Scheduled))
            .collect();
        let e = schedule(&mut list, ev(1000, MaintenanceState::Scheduled), 20).unwrap_err();
        assert!(e.message.contains("100"), "{e}");
        list[0].state = MaintenanceState::Cancelled;
        // A finished one makes room only while the history keeps it.
        schedule(&mut list, ev(1000, MaintenanceState::Scheduled), 0).unwrap();
        assert_eq!(list.len(), MAX_EVENTS);
    }

    #[test]
    fn requests_are_checked() {
        let now = OffsetDateTime::UNIX_EPOCH;
        let bad = |r: MaintenanceRequest| r.into_event("x".into(), now).unwrap_err().field;
        assert_eq!(bad(MaintenanceRequest::default()), "code");
        let code = Some(MaintenanceCode::Stop);
        assert_eq!(
            bad(MaintenanceRequest {
                code,
                not_before: Some("tomorrow".into()),
                ..Default::default()
            }),
            "not_before"
        );
        assert_eq!(
            bad(MaintenanceRequest {
                code,
                delay_seconds: Some(-1),
                ..Default::default()
            }),
            "delay_seconds"
        );
        let e = MaintenanceRequest {
            code,
            ..Default::default()
        }
        .into_event("x".into(), now)
        .unwrap();
        assert_eq!(e.description, "scheduled stop");
        assert_eq!((e.not_before - now).whole_seconds(), DEFAULT_NOTICE_SECONDS);
        assert!(is_event_id("instance-event-0d59937288b749b32"));
        assert!(!is_event_id("instance-event-0D59937288b749b32"));
    }
}
