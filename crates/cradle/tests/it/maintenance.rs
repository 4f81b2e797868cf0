//! Maintenance events and instance tags, end to end: scheduled with the
//! CLI, read by the guest with curl from its own metadata address (EC2's
//! `events/maintenance/` and `tags/instance/`, cradle's `/cradle/latest/
//! events`), acknowledged by the guest, cancelled, and run through QEMU by
//! the real `cradle serve`: a reboot seen as a new QEMU process, a stop as
//! a stopped VM, an event cut short by a killed server failed at restart.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cradle_client::route;
use serde_json::Value;

use crate::harness::*;

/// `curl` from `source` (the guest's metadata address): the status and
/// the body.
fn curl(s: &Server, source: &str, method: &str, path: &str, flavor: bool) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--noproxy", "*", "--max-time", "10", "-X", method])
        .args(["--interface", source, "-w", "\n%{http_code}"]);
    if flavor {
        cmd.args(["-H", "Metadata-Flavor: cradle"]);
    }
    let out = cmd
        .arg(format!("{}{path}", s.metadata_url()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.parse().unwrap(), body.to_string())
}

/// A GET that must answer 200: its body.
#[track_caller]
fn read(s: &Server, source: &str, path: &str) -> String {
    let (status, body) = curl(s, source, "GET", path, false);
    assert_eq!(status, 200, "{path}: {body}");
    body
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The instance's maintenance event `id` through the admin API.
fn event(s: &Server, instance: &str, id: &str) -> Value {
    let list = s.admin().send(route::maintenance(instance));
    let e = list.into_iter().find(|e| e.id == id).expect("event listed");
    serde_json::to_value(e).unwrap()
}

/// Poll the admin API until event `id` is in `state` (or fail after `limit`).
#[track_caller]
fn wait_state(s: &Server, instance: &str, id: &str, state: &str, limit: Duration) -> Value {
    let until = Instant::now() + limit;
    loop {
        let e = event(s, instance, id);
        if e["state"] == state {
            return e;
        }
        assert!(
            Instant::now() < until,
            "event {id} still {} after {limit:?}: {e}\n{}",
            e["state"],
            s.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// EC2's event date: `21 Jan 2019 09:00:43 GMT`.
fn is_ec2_date(s: &str) -> bool {
    let parts: Vec<&str> = s.split(' ').collect();
    parts.len() == 5
        && parts[0].parse::<u8>().is_ok_and(|d| (1..=31).contains(&d))
        && parts[1].len() == 3
        && parts[2].len() == 4
        && parts[3].len() == 8
        && parts[4] == "GMT"
}

#[test]
fn guests_see_acknowledge_and_operators_cancel_maintenance_events() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tmp.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        tokens_toml(&[Named {
            name: "stranger",
            roles: &[],
            projects: &["other"],
            token: "stranger-token",
        }]),
    )
    .unwrap();
    let s = Server::start_with(Opts {
        data_dir: Some(&tmp.path().join("data")),
        env: &[("CRADLE_ADMIN_TOKENS_FILE", tokens.to_str().unwrap())],
        ..Default::default()
    });
    let cli = |args: &[&str]| Run::from(s.cli(args).output().unwrap());
    cli(&["instance", "add", "g1", "--metadata-address", "127.0.0.21"]).success();
    cli(&["instance", "add", "g2", "--metadata-address", "127.0.0.22"]).success();
    let (g1, g2) = ("127.0.0.21", "127.0.0.22");

    // Nothing scheduled: EC2's listing and empty lists.
    assert_eq!(
        read(&s, g1, "/latest/meta-data/events/maintenance/"),
        "history\nscheduled"
    );
    assert_eq!(
        json(&read(
            &s,
            g1,
            "/latest/meta-data/events/maintenance/scheduled"
        )),
        Value::Array(vec![])
    );

    let scheduled = cli(&[
        "instance",
        "schedule",
        "g1",
        "reboot",
        "--not-before",
        "+2h",
        "--description",
        "host kernel update",
        "-o",
        "json",
    ])
    .success()
    .json();
    let id = scheduled["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("instance-event-") && id.len() == 32, "{id}");
    assert_eq!(scheduled["state"], "scheduled");

    // EC2's shape, at EC2's path.
    let ec2 = json(&read(
        &s,
        g1,
        "/latest/meta-data/events/maintenance/scheduled",
    ));
    let e = &ec2[0];
    assert_eq!(ec2.as_array().unwrap().len(), 1, "{ec2}");
    assert_eq!(e["Code"], "instance-reboot", "{e}");
    assert_eq!(e["EventId"], id.as_str());
    assert_eq!(e["State"], "active");
    assert_eq!(e["Description"], "host kernel update");
    for k in ["NotBefore", "NotAfter"] {
        assert!(is_ec2_date(e[k].as_str().unwrap()), "{k}: {e}");
    }
    assert_eq!(
        json(&read(
            &s,
            g1,
            "/latest/meta-data/events/maintenance/history"
        )),
        Value::Array(vec![])
    );
    // The other guest sees none of it.
    assert_eq!(
        json(&read(
            &s,
            g2,
            "/latest/meta-data/events/maintenance/scheduled"
        )),
        Value::Array(vec![])
    );

    // The native namespace: cradle's states, behind its header.
    assert_eq!(curl(&s, g1, "GET", "/cradle/latest/events", false).0, 403);
    let (status, native) = curl(&s, g1, "GET", "/cradle/latest/events", true);
    assert_eq!(status, 200, "{native}");
    let native = json(&native);
    assert_eq!(native[0]["id"], id.as_str());
    assert_eq!(native[0]["state"], "scheduled");
    assert_eq!(native[0]["code"], "reboot");

    // Acknowledging: only the guest's own event, only with the header.
    let ack = format!("/cradle/latest/events/{id}/ack");
    assert_eq!(curl(&s, g1, "POST", &ack, false).0, 403);
    assert_eq!(
        curl(&s, g2, "POST", &ack, true).0,
        404,
        "another guest's event"
    );
    let unknown = "/cradle/latest/events/instance-event-00000000000000000/ack";
    assert_eq!(curl(&s, g1, "POST", unknown, true).0, 404);
    assert_eq!(curl(&s, g1, "GET", &ack, true).0, 405);
    let (status, acked) = curl(&s, g1, "POST", &ack, true);
    assert_eq!(status, 200, "{acked}");
    assert_eq!(json(&acked)["id"], id.as_str());

    // Acknowledged, it runs at once (hours before its not-before): g1 has
    // no VM running, so there is nothing to reboot.
    let done = wait_state(&s, "g1", &id, "completed", Duration::from_secs(20));
    for step in ["scheduled_at", "acknowledged_at", "started_at", "ended_at"] {
        assert!(done[step].is_string(), "{step}: {done}");
    }
    assert_eq!(
        json(&read(
            &s,
            g1,
            "/latest/meta-data/events/maintenance/scheduled"
        )),
        Value::Array(vec![])
    );
    let history = json(&read(
        &s,
        g1,
        "/latest/meta-data/events/maintenance/history",
    ));
    assert_eq!(history[0]["EventId"], id.as_str());
    assert_eq!(history[0]["State"], "completed");
    assert_eq!(history[0]["Description"], "[Completed] host kernel update");
    // Too late to acknowledge or cancel.
    let (status, body) = curl(&s, g1, "POST", &ack, true);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("completed"), "{body}");
    cli(&["instance", "cancel-event", "g1", &id])
        .fails_with(&["completed", "scheduled or acknowledged"]);

    // Its life in the event log and the maintenance table.
    let log = cli(&["instance", "events", "g1"]).success().stdout;
    for needle in [
        "scheduled for",
        "acknowledged by the guest",
        "reboot started",
        "completed: its VM was not running: nothing to do",
        "NOT BEFORE",
    ] {
        assert!(log.contains(needle), "{needle:?} missing:\n{log}");
    }
    assert!(log.contains(&id), "{log}");

    // Cancelled before it starts.
    let stop = cli(&["instance", "schedule", "g1", "stop", "-o", "json"])
        .success()
        .json();
    let stop_id = stop["id"].as_str().unwrap().to_string();
    assert_eq!(stop["description"], "scheduled stop");
    cli(&["instance", "cancel-event", "g1", &stop_id]).success();
    assert_eq!(event(&s, "g1", &stop_id)["state"], "cancelled");
    cli(&["instance", "cancel-event", "g1", &stop_id]).fails_with(&["cancelled"]);
    let history = json(&read(
        &s,
        g1,
        "/latest/meta-data/events/maintenance/history",
    ));
    assert_eq!(history[1]["State"], "canceled", "{history}");
    assert_eq!(
        curl(
            &s,
            g1,
            "POST",
            &format!("/cradle/latest/events/{stop_id}/ack"),
            true
        )
        .0,
        409
    );
    cli(&[
        "instance",
        "cancel-event",
        "g1",
        "instance-event-00000000000000000",
    ])
    .fails_with(&["no maintenance event"]);

    // Bad input is named, and changes nothing.
    cli(&[
        "instance",
        "schedule",
        "g1",
        "reboot",
        "--not-before",
        "tomorrow",
    ])
    .fails_with(&["--not-before", "RFC 3339"]);
    cli(&["instance", "schedule", "g1", "halt"]).fails_with(&["halt"]);
    let a = s.admin().fetch_raw(
        route::schedule_maintenance("g1", &Default::default()),
        r#"{"code": "reboot", "not_before": "soon"}"#,
    );
    assert_eq!(a.status, 422, "{}", a.text());
    assert!(a.text().contains("not_before"), "{}", a.text());
    assert_eq!(s.admin().send(route::maintenance("g1")).len(), 2);

    // Another project's caller: the instance is not there.
    let stranger = s.admin().with_token("stranger-token");
    for a in [
        stranger.fetch(route::maintenance("g1")),
        stranger.fetch(route::schedule_maintenance(
            "g1",
            &cradle_model::maintenance::MaintenanceRequest {
                code: Some(cradle_model::maintenance::MaintenanceCode::Stop),
                ..Default::default()
            },
        )),
        stranger.fetch(route::cancel_maintenance("g1", &id)),
    ] {
        assert_eq!(a.status, 404, "{}", a.text());
        assert!(!a.text().contains(&id), "{}", a.text());
    }
    assert_eq!(s.admin().send(route::maintenance("g1")).len(), 2);
}

/// The pid of the instance's QEMU, from its run directory.
fn qemu_pid(data_dir: &Path, id: &str) -> Option<u32> {
    let text = std::fs::read_to_string(data_dir.join(format!("run/vm-{id}/pid"))).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

#[test]
fn maintenance_reboots_and_stops_the_vm_on_time_and_survives_a_killed_server() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let disk = tmp.path().join("disk.img");
    // Nothing to boot: SeaBIOS waits on it, which is a running VM all the same.
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let start = |grace: &str| {
        Server::start_with(Opts {
            data_dir: Some(&data),
            env: &[
                ("CRADLE_INSTALL_ACCEL", "tcg"),
                ("CRADLE_MAINTENANCE_STOP_GRACE", grace),
            ],
            ..Default::default()
        })
    };
    let mut s = start("1");
    let cli = |s: &Server, args: &[&str]| Run::from(s.cli(args).output().unwrap());
    let vm = cli(
        &s,
        &[
            "instance",
            "add",
            "vm1",
            "--disk",
            disk.to_str().unwrap(),
            "--memory",
            "128",
            "--metadata-address",
            "127.0.0.31",
            "-o",
            "json",
        ],
    )
    .success()
    .json();
    let vm_id = vm["id"].as_str().unwrap().to_string();
    cli(&s, &["instance", "start", "vm1"]).success();
    let first = qemu_pid(&data, &vm_id).expect("QEMU runs");

    // A reboot a few seconds ahead, as RFC 3339: it waits for its time.
    let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let at = at
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let e = cli(
        &s,
        &[
            "instance",
            "schedule",
            "vm1",
            "reboot",
            "--not-before",
            &at,
            "-o",
            "json",
        ],
    )
    .success()
    .json();
    let id = e["id"].as_str().unwrap().to_string();
    let done = wait_state(&s, "vm1", &id, "completed", Duration::from_secs(60));
    let parse = |v: &Value| {
        time::OffsetDateTime::parse(
            v.as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    assert!(
        parse(&done["started_at"]) >= parse(&done["not_before"]),
        "{done}"
    );
    let second = qemu_pid(&data, &vm_id).expect("QEMU runs again after the reboot");
    assert_ne!(first, second, "a reboot is a new QEMU process");
    let st = cli(&s, &["instance", "status", "vm1"]).success().stdout;
    assert!(st.contains("state running, vm running"), "{st}");

    // A stop due now.
    let e = cli(
        &s,
        &[
            "instance",
            "schedule",
            "vm1",
            "stop",
            "--not-before",
            "now",
            "-o",
            "json",
        ],
    )
    .success()
    .json();
    let stop_id = e["id"].as_str().unwrap().to_string();
    wait_state(&s, "vm1", &stop_id, "completed", Duration::from_secs(60));
    let st = cli(&s, &["instance", "status", "vm1"]).success().stdout;
    assert!(st.contains("state stopped, vm stopped"), "{st}");
    assert!(qemu_pid(&data, &vm_id).is_none());
    let log = cli(&s, &["instance", "events", "vm1"]).success().stdout;
    for needle in [
        "completed: the VM was stopped and started again",
        "completed: the VM was stopped",
        "started (tcg)",
    ] {
        assert!(log.contains(needle), "{needle:?} missing:\n{log}");
    }

    // A server killed while a stop waits out its grace: at the next start
    // the event is failed, not run twice, and says why.
    s.stop();
    let mut s = start("30");
    cli(&s, &["instance", "start", "vm1"]).success();
    let e = cli(
        &s,
        &[
            "instance",
            "schedule",
            "vm1",
            "stop",
            "--not-before",
            "now",
            "-o",
            "json",
        ],
    )
    .success()
    .json();
    let cut = e["id"].as_str().unwrap().to_string();
    wait_state(&s, "vm1", &cut, "started", Duration::from_secs(20));
    s.kill();
    let s = start("1");
    let failed = wait_state(&s, "vm1", &cut, "failed", Duration::from_secs(20));
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("the server stopped while it ran"),
        "{failed}"
    );
    cli(&s, &["instance", "stop", "vm1", "--force"]).success();
}

#[test]
fn metadata_tags_are_served_only_when_switched_on() {
    let s = Server::start();
    let cli = |args: &[&str]| Run::from(s.cli(args).output().unwrap());
    let g = "127.0.0.41";
    cli(&[
        "instance",
        "add",
        "t1",
        "--metadata-address",
        g,
        "--tag",
        "Name=web1",
        "--tag",
        "env=prod",
    ])
    .success();
    // Off (the default): no tags/ at all, as EC2 without the option.
    assert!(!read(&s, g, "/latest/meta-data/").contains("tags/"));
    assert_eq!(
        curl(&s, g, "GET", "/latest/meta-data/tags/instance", false).0,
        404
    );
    assert_eq!(
        curl(&s, g, "GET", "/latest/meta-data/tags/instance/Name", false).0,
        404
    );

    cli(&["instance", "modify", "t1", "--metadata-tags", "on"]).success();
    assert!(read(&s, g, "/latest/meta-data/").contains("tags/"));
    assert_eq!(read(&s, g, "/latest/meta-data/tags/"), "instance/");
    assert_eq!(read(&s, g, "/latest/meta-data/tags/instance"), "Name\nenv");
    assert_eq!(read(&s, g, "/latest/meta-data/tags/instance/Name"), "web1");
    assert_eq!(read(&s, g, "/latest/meta-data/tags/instance/env"), "prod");

    cli(&[
        "instance",
        "modify",
        "t1",
        "--tag",
        "env=staging",
        "--unset-tag",
        "Name",
    ])
    .success();
    assert_eq!(read(&s, g, "/latest/meta-data/tags/instance"), "env");
    assert_eq!(
        read(&s, g, "/latest/meta-data/tags/instance/env"),
        "staging"
    );
    assert_eq!(
        curl(&s, g, "GET", "/latest/meta-data/tags/instance/Name", false).0,
        404
    );
    let shown = cli(&["instance", "show", "t1"]).success().stdout;
    assert!(shown.contains("env=staging"), "{shown}");
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("metadata tags") && l.ends_with(" on")),
        "{shown}"
    );

    // A key that cannot be a path is refused while tags are served, and
    // the refusal changes nothing.
    cli(&["instance", "modify", "t1", "--tag", "has space=x"])
        .fails_with(&["tags", "metadata path"]);
    cli(&["instance", "modify", "t1", "--tag", "aws:x=1"]).fails_with(&["aws:"]);
    assert_eq!(read(&s, g, "/latest/meta-data/tags/instance"), "env");

    cli(&["instance", "modify", "t1", "--metadata-tags", "off"]).success();
    assert_eq!(
        curl(&s, g, "GET", "/latest/meta-data/tags/instance/env", false).0,
        404
    );
    // Off, any key goes (it is not a path then).
    cli(&["instance", "modify", "t1", "--tag", "has space=x"]).success();
    let v = s.admin().send(route::instance("t1"));
    assert_eq!(v.tags.get("has space").map(String::as_str), Some("x"));
    assert!(!v.metadata_tags);
    cli(&["instance", "modify", "t1", "--metadata-tags", "on"]).fails_with(&["has space"]);
}
