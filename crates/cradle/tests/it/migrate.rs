//! Cold migration between real hosts of a cluster (each `cradle serve` in a
//! network namespace of its own with its own data dir, one PostgreSQL, a
//! real sshd on the bridge they share, real QEMU): over ssh and back over
//! rsync, interrupted by Ctrl-C, and failing at the copy step.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cradle_remotefs::testkit::{Sshd, SshdOptions};
use cradle_store::testkit::PgServer;
use serde_json::json;

use crate::cluster::{Lan, TOKEN, credentials, host_env, within};
use crate::harness::{BIN, Server, route};

/// A 64 MiB disk, sparse, with 3 MiB of data in its middle.
fn disk(path: &Path) -> Vec<u8> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(64 << 20).unwrap();
    let data: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    f.seek(SeekFrom::Start(8 << 20)).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    data
}

fn migrate(via: &Server, name: &str, to: &str, transport: &str) -> std::process::Output {
    Command::new(BIN)
        .args([
            "instance",
            "migrate",
            name,
            "--to",
            to,
            "--transport",
            transport,
            // The guest has no OS to answer ACPI: do not wait for it long.
            "--grace",
            "1",
        ])
        .args(["--url", &via.admin_url])
        .env("CRADLE_ADMIN_TOKEN", TOKEN)
        .output()
        .unwrap()
}

fn vm_state(s: &Server, name: &str) -> String {
    s.admin().send(route::vm_status(name)).vm
}

#[test]
fn an_instance_moves_with_its_disks_and_comes_back_and_a_failed_copy_leaves_it_running() {
    let pg = PgServer::start().expect("start PostgreSQL");
    let url = pg.url();
    // Each host in a network namespace of its own; the sshd every host
    // copies to listens on the bridge they share.
    let lan = Lan::new(3);
    let sshd = Sshd::start_with(&SshdOptions {
        full_dir: true,
        also_listen: Some(lan.bridge_ip()),
    })
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (_, tls) = credentials(
        tmp.path(),
        &[
            ("node-a", &lan.host_ip(0)),
            ("node-b", &lan.host_ip(1)),
            ("node-c", &lan.host_ip(2)),
        ],
    );
    let ssh_address = lan.bridge_ip().to_string();
    let home = sshd.home();
    for d in ["disks-a", "disks-b"] {
        std::fs::create_dir_all(home.join(d)).unwrap();
        sshd.give(&home.join(d)).unwrap();
    }
    let port = sshd.port().to_string();
    let key = sshd.key().display().to_string();
    let known = sshd.known_hosts().display().to_string();
    let start = |i: usize, name: &str, tls: &Path, disk_dir: &Path| {
        let mut env = host_env(&url, name, Some(tls));
        let disk_dir = disk_dir.display().to_string();
        let extra = [
            ("CRADLE_CLUSTER_DISK_DIR", disk_dir.as_str()),
            ("CRADLE_CLUSTER_SSH_ADDRESS", ssh_address.as_str()),
            ("CRADLE_REMOTE_PORT", port.as_str()),
            ("CRADLE_REMOTE_USER", sshd.user()),
            ("CRADLE_REMOTE_IDENTITY_FILE", key.as_str()),
            ("CRADLE_REMOTE_KNOWN_HOSTS", known.as_str()),
            ("CRADLE_INSTALL_ACCEL", "tcg"),
            // 16 MiB/s: a 64 MiB disk takes 4 s, long enough to interrupt.
            ("CRADLE_REMOTE_BWLIMIT", "16384"),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        lan.host_with(i, env, None)
    };
    let a = start(0, "node-a", &tls[0], &home.join("disks-a"));
    let b = start(1, "node-b", &tls[1], &home.join("disks-b"));
    // C takes its disks where sshd sees a 1 MiB filesystem: the copy fails.
    let c = start(2, "node-c", &tls[2], &sshd.full().join("c"));
    let g41 = lan.guest(41);

    let img = tmp.path().join("vm1.img");
    let data = disk(&img);
    a.admin().create(&json!({
        "name": "vm1", "host": "node-a", "metadata_address": g41,
        "disks": [{"path": img.display().to_string(), "format": "raw"}],
        "memory_mib": 128,
    }));
    let mut secret = cradle_model::api::InstancePatch::default();
    secret.os_params.secret.insert(
        "root_password".into(),
        Some(cradle_model::Secret::new("MIGRATION-SECRET-CANARY".into())),
    );
    a.admin().send(route::modify_instance("vm1", &secret));
    a.admin().send(route::start_vm("vm1"));
    assert_eq!(vm_state(&a, "vm1"), "running");
    let hostname = "/latest/meta-data/hostname";
    assert_eq!(a.guest(&g41).get(hostname).status, 200);

    // Over ssh, asked through B: the CLI finds A, which runs it.
    let out = migrate(&b, "vm1", "node-b", "ssh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{stderr}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains("migrated vm1 to node-b"), "{stderr}");
    let view = b.admin().send(route::instance("vm1"));
    assert_eq!(view.host, "node-b");
    assert_eq!(
        view.os_params.secret,
        ["root_password"],
        "the secret moved with it"
    );
    assert_eq!(vm_state(&b, "vm1"), "running");
    let moved = Path::new(&view.disks[0].path).to_path_buf();
    assert!(
        moved.starts_with(home.join("disks-b")),
        "{}",
        moved.display()
    );
    let meta = std::fs::metadata(&moved).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(
        meta.blocks() * 512 < 16 << 20,
        "the copy is not sparse: {} bytes allocated",
        meta.blocks() * 512
    );
    let copied = std::fs::read(&moved).unwrap();
    assert_eq!(&copied[8 << 20..(8 << 20) + data.len()], &data[..]);
    assert!(!img.exists(), "A keeps a copy of the disk");
    within(Duration::from_secs(3), "B serves the guest", || {
        b.guest(&g41).get(hostname).status == 200
    });
    let params = b.guest(&g41).get("/cradle/latest/os/parameters.json");
    assert_eq!(
        params.json()["root_password"],
        json!(["MIGRATION-SECRET-CANARY", "secret"]),
        "B's guest reads the secret that moved"
    );
    assert_eq!(a.guest(&g41).get(hostname).status, 404);
    assert_eq!(vm_state(&a, "vm1"), "stopped", "A's VM is gone");
    let events = b.admin().send(route::events("vm1"));
    let said: Vec<&str> = events.iter().map(|e| e.message.as_str()).collect();
    for step in [
        "checks passed",
        "VM stopped",
        "copied to node-b",
        "placed on node-b",
        "migrated to node-b",
    ] {
        assert!(
            said.iter().any(|m| m.contains(step)),
            "no {step:?} event: {said:?}"
        );
    }

    // Back over rsync.
    let out = migrate(&a, "vm1", "node-a", "rsync");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view = a.admin().send(route::instance("vm1"));
    assert_eq!(view.host, "node-a");
    assert_eq!(vm_state(&a, "vm1"), "running");
    let back = Path::new(&view.disks[0].path).to_path_buf();
    assert!(back.starts_with(home.join("disks-a")));
    assert!(
        std::fs::metadata(&back).unwrap().blocks() * 512 < 16 << 20,
        "rsync kept it sparse"
    );
    assert!(!moved.exists(), "B keeps a copy of the disk");
    within(Duration::from_secs(3), "A serves the guest", || {
        a.guest(&g41).get(hostname).status == 200
    });
    assert_eq!(b.guest(&g41).get(hostname).status, 404);

    // The CLI stopped (Ctrl-C) while the disk is copied: it all rolls back.
    let mut child = Command::new(BIN)
        .args([
            "instance", "migrate", "vm1", "--to", "node-b", "--grace", "1",
        ])
        .args(["--url", &a.admin_url])
        .env("CRADLE_ADMIN_TOKEN", TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("copying disk 0") {
        let mut l = String::new();
        assert!(
            std::io::BufRead::read_line(&mut stdout, &mut l).unwrap() > 0,
            "the migration ended before its copy: {seen}"
        );
        seen.push_str(&l);
    }
    // At once: the copy has just begun, and however fast it is, the
    // server hears of the closed connection long before it ends. SIGTERM,
    // which ends the CLI as Ctrl-C does: a test run started in the
    // background by a non-interactive shell (as CI may start it) inherits
    // SIGINT ignored, and the CLI would never hear it.
    let interrupted = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let _ = child.wait();
    // The rollback starts the VM again on A, under TCG, beside the rest of
    // the suite: give it time.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let said: Vec<String> = a
            .admin()
            .send(route::events("vm1"))
            .into_iter()
            .map(|e| e.message)
            .collect();
        if said
            .iter()
            .any(|m| m.contains("migration to node-b failed: the client went away"))
        {
            break;
        }
        if std::time::Instant::now() > deadline {
            let log = a.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            panic!(
                "the interrupted migration did not roll back within 60 s; the CLI said:\n{seen}\n\
                 A's events: {said:#?}\nthe end of A's log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let view = a.admin().send(route::instance("vm1"));
    assert_eq!(view.host, "node-a");
    assert_eq!(view.os_params.secret, ["root_password"]);
    assert_eq!(vm_state(&a, "vm1"), "running", "it runs again where it was");
    assert!(back.exists(), "its disk is where it was");
    assert_eq!(a.guest(&g41).get(hostname).status, 200);
    let leftovers: Vec<_> = std::fs::read_dir(home.join("disks-b"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "copies left on B: {leftovers:?}");

    // To C, whose disk directory is full: the copy fails, and it all rolls back.
    let before = std::fs::read(&back).unwrap();
    let out = migrate(&a, "vm1", "node-c", "ssh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a migration into a full disk succeeded"
    );
    assert!(
        stderr.contains("failed") && stderr.contains("stays on node-a"),
        "{stderr}"
    );
    assert!(
        stderr.contains("No space left on device") || stderr.contains("space"),
        "{stderr}"
    );
    let view = a.admin().send(route::instance("vm1"));
    assert_eq!(view.host, "node-a");
    assert_eq!(
        view.os_params.secret,
        ["root_password"],
        "the secret is back"
    );
    assert_eq!(vm_state(&a, "vm1"), "running", "it runs again where it was");
    assert_eq!(std::fs::read(&back).unwrap(), before, "its disk is intact");
    assert_eq!(a.guest(&g41).get(hostname).status, 200);
    assert_eq!(c.guest(&g41).get(hostname).status, 404);
    // Nothing is left of the copy on C (as sshd, in its namespace, sees it).
    let left = Command::new("ssh")
        .args(["-i", &key, "-p", &port, "-o", "BatchMode=yes"])
        .args(["-o", &format!("UserKnownHostsFile={known}")])
        .arg(format!("{}@127.0.0.1", sshd.user()))
        .arg(format!("ls -A {}", sshd.full().join("c").display()))
        .output()
        .unwrap();
    assert!(
        left.status.success(),
        "{}",
        String::from_utf8_lossy(&left.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&left.stdout).trim(),
        "",
        "copies left on C"
    );
    let events = a.admin().send(route::events("vm1"));
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("migration to node-c failed")
                && e.message.contains("stays on node-a, running")),
        "{:?}",
        events.iter().map(|e| &e.message).collect::<Vec<_>>()
    );

    // The secret reached no disk of any host, nor the database.
    for dir in [&a.data_dir, &b.data_dir, &c.data_dir, &pg.data_dir()] {
        assert!(
            !crate::cluster::grep(dir, "MIGRATION-SECRET-CANARY")
                .iter()
                .any(|_| true)
        );
    }
    a.admin()
        .send(route::stop_vm("vm1", true, Duration::from_secs(1)));
}
