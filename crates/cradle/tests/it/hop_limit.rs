//! Replies cannot cross a router: a guest one router away from the metadata
//! listener gets no answer at the default hop limit of 1, and gets one when
//! the operator raises it to 2. Proven with real network namespaces (server,
//! router, guest) that the test creates and removes; needs root, as CI is.

use std::process::{Command, Output};

use crate::harness::*;
use serde_json::json;

fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn ok(args: &[&str]) {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Three namespaces: guest ── router ── server, on addresses that exist only
/// inside them. Removed on drop, whatever happened.
struct Topology {
    names: [String; 3],
}

impl Topology {
    fn new() -> Topology {
        let tag = std::process::id();
        let names = [
            format!("crg{tag}"),
            format!("crr{tag}"),
            format!("crs{tag}"),
        ];
        let t = Topology { names };
        let [g, r, s] = &t.names;
        for n in &t.names {
            ok(&["ip", "netns", "add", n]);
            ok(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        ok(&[
            "ip", "link", "add", "crga", "netns", g, "type", "veth", "peer", "name", "crgb",
            "netns", r,
        ]);
        ok(&[
            "ip", "link", "add", "crsa", "netns", s, "type", "veth", "peer", "name", "crsb",
            "netns", r,
        ]);
        for (ns, dev, addr) in [
            (g, "crga", "10.201.2.2/24"),
            (r, "crgb", "10.201.2.1/24"),
            (r, "crsb", "10.201.1.1/24"),
            (s, "crsa", "10.201.1.2/24"),
        ] {
            ok(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
            ok(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        ok(&[
            "ip",
            "netns",
            "exec",
            r,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        ok(&[
            "ip",
            "-n",
            g,
            "route",
            "add",
            "default",
            "via",
            "10.201.2.1",
        ]);
        ok(&[
            "ip",
            "-n",
            s,
            "route",
            "add",
            "default",
            "via",
            "10.201.1.1",
        ]);
        t
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = run(&["ip", "netns", "del", n]);
        }
    }
}

/// Start cradle inside the server namespace on an existing data dir, with
/// the given hop limit; returns the child.
fn serve_in(ns: &str, data_dir: &std::path::Path, hop_limit: &str) -> std::process::Child {
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            BIN,
            "serve",
            "--admin-listen",
            "127.0.0.1:0",
            "--metadata-listen",
            "10.201.1.2:8775",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .env("CRADLE_METADATA_HOP_LIMIT", hop_limit)
        .env("CRADLE_FIREWALL_ENABLED", "false")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the ready lines.
    use std::io::BufRead;
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    while let Some(Ok(l)) = lines.next() {
        if l.starts_with("metadata service listening") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    child
}

fn guest_get(ns: &str) -> Output {
    run(&[
        "ip",
        "netns",
        "exec",
        ns,
        "curl",
        "-sS",
        "--max-time",
        "3",
        "http://10.201.1.2:8775/latest/meta-data/hostname",
    ])
}

#[test]
fn replies_cannot_cross_a_router_at_hop_limit_one() {
    // Register the guest (10.201.2.2, behind the router) with a server on
    // loopback, then serve the same data dir inside the server namespace.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    {
        let s = Server::start_with(Opts {
            data_dir: Some(&data),
            ..Default::default()
        });
        s.admin().create(
            &json!({"name": "far", "hostname": "far-guest", "metadata_address": "10.201.2.2"}),
        );
    }
    let topo = Topology::new();
    let [g, _, s] = &topo.names;

    let mut server = serve_in(s, &data, "1");
    let out = guest_get(g);
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        !out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("far-guest"),
        "a reply with TTL 1 crossed the router: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The same guest, the same path, with one more hop allowed: answered.
    let mut server = serve_in(s, &data, "2");
    let out = guest_get(g);
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "far-guest");
}
