//! afterburn, the metadata agent of Fedora CoreOS and Flatcar, unmodified,
//! against `cradle serve` on 169.254.169.254:80 — the address it has
//! compiled in. The server runs in a network namespace the test makes, each
//! guest in another, joined by a veth pair; afterburn writes its attributes
//! file, the hostname and the ssh keys, and each is checked against the
//! instance. The ssh keys go to a home directory the test owns: afterburn
//! looks its user up with getpwnam, which nss_wrapper answers from a passwd
//! file the test wrote.
//!
//! afterburn is built from crates.io by `cargo xtask afterburn` (and so by
//! `cargo xtask ci`) into a cache outside the checkout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::firewall::common::Netns;
use crate::harness::*;

/// Where `cargo xtask afterburn` puts it (xtask/src/afterburn.rs).
fn afterburn() -> PathBuf {
    let bin = match std::env::var_os("CRADLE_AFTERBURN") {
        Some(p) => PathBuf::from(p),
        None => ci_cache("afterburn-5.11.0/bin/afterburn", "afterburn"),
    };
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo xtask afterburn` (cargo xtask ci does)",
        bin.display()
    );
    bin
}

const NSS_WRAPPER: &str = "/usr/lib/x86_64-linux-gnu/libnss_wrapper.so";

fn ok(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The server's namespace with 169.254.169.254 on its loopback, and a guest
/// namespace per address, each on its own veth pair from the server's.
struct Lab {
    server_ns: Netns,
    guests: Vec<Netns>,
}

impl Lab {
    fn new(guests: usize) -> Lab {
        let server_ns = Netns::new("abs");
        ok(
            server_ns.ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"]),
            "metadata address",
        );
        let mut lab = Lab {
            server_ns,
            guests: Vec::new(),
        };
        for n in 1..=guests {
            let g = Netns::new("abg");
            let (host_end, guest_end) = (format!("abh{n}"), format!("abg{n}"));
            ok(
                Command::new("ip")
                    .args(["link", "add", &host_end, "netns", &lab.server_ns.name])
                    .args(["type", "veth", "peer", "name", &guest_end, "netns", &g.name])
                    .output()
                    .unwrap(),
                "veth",
            );
            let gateway = format!("10.210.{n}.1");
            for (ns, dev, addr) in [
                (&lab.server_ns, &host_end, format!("{gateway}/24")),
                (&g, &guest_end, format!("10.210.{n}.2/24")),
            ] {
                ok(ns.ip(&["addr", "add", &addr, "dev", dev]), "address");
                ok(ns.ip(&["link", "set", dev, "up"]), "link up");
            }
            ok(
                g.ip(&["route", "add", "169.254.169.254/32", "via", &gateway]),
                "route to the metadata address",
            );
            lab.guests.push(g);
        }
        lab
    }

    fn guest_address(n: usize) -> String {
        format!("10.210.{n}.2")
    }
}

/// One afterburn run's outputs, in a directory of the test's.
struct Written {
    attributes: BTreeMap<String, String>,
    hostname: String,
    ssh_keys: String,
}

/// `afterburn multi --provider <provider>` in the guest namespace, writing
/// the attributes, the hostname and user `core`'s ssh keys under `dir`.
fn run_afterburn(guest: &Netns, provider: &str, dir: &Path) -> Written {
    let home = dir.join("home/core");
    std::fs::create_dir_all(&home).unwrap();
    // uid 0, so afterburn's switch to the user is no switch at all.
    let passwd = dir.join("passwd");
    std::fs::write(
        &passwd,
        format!("core:x:0:0:core:{}:/bin/sh\n", home.display()),
    )
    .unwrap();
    let group = dir.join("group");
    std::fs::write(&group, "core:x:0:\n").unwrap();
    let (attributes, hostname) = (dir.join("attributes"), dir.join("hostname"));
    let out = guest
        .command(afterburn().to_str().unwrap())
        .args(["multi", "--provider", provider, "--ssh-keys", "core"])
        .arg("--attributes")
        .arg(&attributes)
        .arg("--hostname")
        .arg(&hostname)
        .env("LD_PRELOAD", NSS_WRAPPER)
        .env("NSS_WRAPPER_PASSWD", &passwd)
        .env("NSS_WRAPPER_GROUP", &group)
        .output()
        .unwrap();
    ok(out, &format!("afterburn --provider {provider}"));
    let attributes = std::fs::read_to_string(&attributes)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=value");
            (k.to_string(), v.to_string())
        })
        .collect();
    Written {
        attributes,
        hostname: std::fs::read_to_string(&hostname).unwrap(),
        ssh_keys: std::fs::read_to_string(home.join(".ssh/authorized_keys.d/afterburn")).unwrap(),
    }
}

fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn afterburn_reads_ec2_and_openstack_metadata_unmodified() {
    let lab = Lab::new(2);
    let s = Server::start_with(Opts {
        netns: Some(&lab.server_ns.name),
        metadata_listen: Some("169.254.169.254:80"),
        ..Default::default()
    });
    let (alice, bob) = (ssh_key(7, "alice@laptop"), ssh_key(8, "bob@desk"));
    let mut ids = Vec::new();
    for (n, tokens) in [(1, "optional"), (2, "required")] {
        let address = Lab::guest_address(n);
        let name = format!("coreos-{tokens}");
        let run = Run::of(&mut s.cli([
            "instance",
            "add",
            &name,
            "--hostname",
            &format!("{name}.example"),
            "--metadata-address",
            &address,
            "--local-ipv4",
            &format!("{address}/24"),
            "--public-ipv4",
            &format!("203.0.113.{n}"),
            "--availability-zone",
            "eu-central-1b",
            "--instance-type",
            "c5.large",
            "--key",
            &format!("alice={alice}"),
            "--key",
            &format!("bob={bob}"),
            "--imds-tokens",
            tokens,
            "-o",
            "json",
        ]))
        .success();
        ids.push(run.json()["id"].as_str().unwrap().to_string());
    }
    let ec2_id = |id: &str| format!("i-{}", &id.replace('-', "")[..17]);
    let keys = format!("{alice}\n{bob}\n");
    let work = tempfile::tempdir().unwrap();

    for (n, tokens) in [(1, "optional"), (2, "required")] {
        let (guest, id) = (&lab.guests[n - 1], &ids[n - 1]);
        let name = format!("coreos-{tokens}");
        let address = Lab::guest_address(n);
        let public = format!("203.0.113.{n}");
        let hostname = format!("{name}.example");

        // The aws provider asks for 2021-01-03, with the IMDSv2 token it
        // fetches first.
        let aws = run_afterburn(guest, "aws", &work.path().join(format!("aws-{n}")));
        assert_eq!(
            aws.attributes,
            attrs(&[
                ("AFTERBURN_AWS_AVAILABILITY_ZONE", "eu-central-1b"),
                ("AFTERBURN_AWS_HOSTNAME", &hostname),
                ("AFTERBURN_AWS_INSTANCE_ID", &ec2_id(id)),
                ("AFTERBURN_AWS_INSTANCE_TYPE", "c5.large"),
                ("AFTERBURN_AWS_IPV4_LOCAL", &address),
                ("AFTERBURN_AWS_IPV4_PUBLIC", &public),
                ("AFTERBURN_AWS_PUBLIC_HOSTNAME", &hostname),
                ("AFTERBURN_AWS_REGION", "eu-central-1"),
            ]),
            "aws, imds_tokens = {tokens}"
        );
        assert_eq!(aws.hostname, format!("{hostname}\n"));
        assert_eq!(aws.ssh_keys, keys, "aws, imds_tokens = {tokens}");

        if tokens == "optional" {
            // The openstack-metadata provider reads meta_data.json and,
            // without a token, the EC2 paths.
            let os = run_afterburn(guest, "openstack-metadata", &work.path().join("os-1"));
            assert_eq!(
                os.attributes,
                attrs(&[
                    ("AFTERBURN_OPENSTACK_HOSTNAME", &hostname),
                    ("AFTERBURN_OPENSTACK_INSTANCE_ID", &ec2_id(id)),
                    ("AFTERBURN_OPENSTACK_INSTANCE_TYPE", "c5.large"),
                    ("AFTERBURN_OPENSTACK_INSTANCE_UUID", id),
                    ("AFTERBURN_OPENSTACK_IPV4_LOCAL", &address),
                    ("AFTERBURN_OPENSTACK_IPV4_PUBLIC", &public),
                ])
            );
            assert_eq!(os.hostname, format!("{hostname}\n"));
            assert_eq!(os.ssh_keys, keys);
        } else {
            // Where EC2 paths need a token, the OpenStack namespace still
            // answers afterburn's request without one; its EC2 reads, which
            // carry none, are told what is missing.
            let curl = |path: &str| {
                let out = guest
                    .command("curl")
                    .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}"])
                    .arg(format!("http://169.254.169.254{path}"))
                    .output()
                    .unwrap();
                let text = String::from_utf8(ok(out, "curl").stdout).unwrap();
                let (body, status) = text.rsplit_once('\n').unwrap();
                (status.to_string(), body.to_string())
            };
            let (status, md) = curl("/openstack/2012-08-10/meta_data.json");
            assert_eq!(status, "200", "{md}");
            let md: serde_json::Value = serde_json::from_str(&md).unwrap();
            assert_eq!(md["uuid"], id.as_str());
            let (status, ec2) = curl("/latest/meta-data/hostname");
            assert_eq!(status, "401", "{ec2}");
            assert!(ec2.contains("X-aws-ec2-metadata-token"), "{ec2}");
        }
    }
}
