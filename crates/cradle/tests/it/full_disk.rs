//! A full disk under the data directory: admin writes answer 507 naming
//! the disk and change nothing, guests keep reading, and once space is
//! freed writes work again without a restart; SQLite's file stays sound.
//!
//! The data directory is a 4 MiB tmpfs mounted in a mount namespace the
//! test makes (held by `unshare … sleep`), so nothing of it is seen
//! outside, and it goes when the holder dies. The server runs in it
//! through `nsenter`; the test fills the disk through `/proc/PID/root`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::harness::*;

const TOKEN: &str = "full-disk-test-token";

/// A private mount namespace with a tmpfs at `dir`; gone when dropped.
struct MountNs {
    holder: Child,
    dir: PathBuf,
}

impl MountNs {
    fn new(dir: &Path, size: &str) -> MountNs {
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sleep", "infinity"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare (util-linux) must be installed");
        let ns = MountNs {
            holder,
            dir: dir.to_path_buf(),
        };
        // The holder is in its namespace once /proc says so.
        let mine = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        for _ in 0..200 {
            if std::fs::read_link(format!("/proc/{}/ns/mnt", ns.pid())).ok() != Some(mine.clone()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = ns
            .enter()
            .args([
                "mount",
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ns
    }

    fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// `nsenter` into the namespace, ready for a program and its arguments.
    fn enter(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid().to_string(), "-m", "--"]);
        c
    }

    /// A path inside the tmpfs, as this process reaches it.
    fn inside(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid()))
            .join(self.dir.strip_prefix("/").unwrap())
            .join(name)
    }

    /// Write to `name` until the disk is full.
    fn fill(&self, name: &str) {
        let mut f = std::fs::File::create(self.inside(name)).unwrap();
        let chunk = vec![0x5au8; 64 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        // Byte by byte to the last one.
        while f.write(&[0]).is_ok_and(|n| n == 1) {}
    }
}

impl Drop for MountNs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

#[test]
fn a_full_disk_refuses_writes_with_507_and_guests_keep_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let ns = MountNs::new(&data, "4m");
    let pid = ns.pid().to_string();
    let prefix = ["nsenter", "-t", &pid, "-m", "--"];
    let s = Server::start_with(Opts {
        data_dir: Some(&data),
        prefix: &prefix,
        // The token file is inside the namespace: the test brings its own.
        // Its guest reads as fast as it can.
        env: &[
            ("CRADLE_METADATA_RATE_LIMIT", "0"),
            ("CRADLE_ADMIN_TOKEN", TOKEN),
        ],
        ..Default::default()
    });
    let admin = s.admin();
    let first = admin.create(&json!({"name": "before", "metadata_address": "127.0.0.2",
        "hostname": "before-0"}));
    let id = first["id"].as_str().unwrap().to_string();
    let guest = s.guest("127.0.0.2");
    assert_eq!(guest.get("/latest/meta-data/hostname").text(), "before-0");

    ns.fill("ballast");
    // Some writes may still fit in pages SQLite already has; the disk is
    // full for good within a few.
    let mut refused = None;
    for n in 0..200 {
        let spec = json!({"name": format!("during-{n}"), "metadata_address": format!("127.0.1.{}", n + 1),
            "user_data": b64(&vec![b'x'; 16 * 1024])});
        let spec: cradle_model::api::InstanceSpec = serde_json::from_value(spec).unwrap();
        let a = admin.fetch(route::create_instance(&spec));
        if a.status != 201 {
            refused = Some((n, a));
            break;
        }
    }
    let (n, a) = refused.expect("200 instances of 16 KiB fit on a full 4 MiB disk");
    assert_eq!(a.status, 507, "{}", a.text());
    let body = a.json();
    assert_eq!(body["error"]["code"], "disk_full", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("no space left")
            && message.contains(&*data.join("cradle.db").to_string_lossy()),
        "the error does not name the disk: {message}"
    );
    // Nothing of the refused write is there.
    let missing = admin.fetch(route::instance(&format!("during-{n}")));
    assert_eq!(missing.status, 404);
    // A modify is refused the same way and leaves the instance as it was.
    let patch: cradle_model::api::InstancePatch = serde_json::from_value(
        json!({"hostname": "before-1", "user_data": b64(&vec![b'y'; 64 * 1024])}),
    )
    .unwrap();
    let a = admin.fetch(route::modify_instance(&id, &patch));
    assert_eq!(a.status, 507, "{}", a.text());
    assert_eq!(admin.send(route::instance(&id)).hostname, "before-0");
    // Guests keep reading, from memory.
    for _ in 0..50 {
        let a = guest.get("/latest/meta-data/hostname");
        assert_eq!((a.status, a.text()), (200, "before-0".to_string()));
    }
    let m = admin.fetch(route::metrics()).text();
    assert!(m.contains("status=\"507\""), "the 507s are not counted");

    // Space again: the same writes work, with no restart.
    std::fs::remove_file(ns.inside("ballast")).unwrap();
    let a = admin.fetch(route::modify_instance(&id, &patch));
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(guest.get("/latest/meta-data/hostname").text(), "before-1");
    let after = admin.create(&json!({"name": "after", "metadata_address": "127.0.0.3"}));
    assert_eq!(after["name"], "after");

    // And the file is sound: integrity_check, and what was acknowledged is
    // what a restart finds.
    let names = |s: &Server| -> Vec<String> {
        let mut v: Vec<String> = s
            .admin()
            .send(route::instances())
            .into_iter()
            .map(|i| i.name)
            .collect();
        v.sort();
        v
    };
    let before_restart = names(&s);
    let mut s = s;
    s.stop();
    let db = ns.inside("cradle.db");
    let c = rusqlite::Connection::open(&db).unwrap();
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    drop(c);
    let s = Server::start_with(Opts {
        data_dir: Some(&data),
        prefix: &prefix,
        env: &[("CRADLE_ADMIN_TOKEN", TOKEN)],
        ..Default::default()
    });
    assert_eq!(names(&s), before_restart);
    assert_eq!(s.admin().send(route::instance(&id)).hostname, "before-1");
    assert!(!before_restart.contains(&format!("during-{n}")));
}
