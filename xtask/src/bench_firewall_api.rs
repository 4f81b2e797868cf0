//! The second half of `cargo xtask bench firewall`: the layout before
//! issue 20 (per-instance chains, `cradle` built from [`OLD_REV`]) and
//! today's, side by side in the same run, through `cradle serve` and its
//! admin API, each step timed until the kernel enforces it: a packet from a
//! real guest (a network namespace behind a veth) passes or is dropped.
//!
//! A "host" namespace routes four guests (`vg1`..`vg4`, 10.77.K.2). N
//! instances are registered once per N with the firewall off (by the old
//! cradle, whose registry the new one migrates) (three of
//! them are guests 1 to 3; the others' interfaces do not exist), with 20
//! tenant default rules, two of them from groups `web` and `db`; guest 1 is
//! in `web`. Then, for each layout and run, on a copy of that data dir:
//!
//! - start-up: `serve` started with the firewall on (no table in the
//!   kernel), until it answers a guest's metadata read, and until guest 3's
//!   probe of a port no rule allows on guest 2 is dropped;
//! - full apply: `POST /v1/firewall/apply` (both answer once applied);
//! - rule: a rule added to guest 2's group, until guest 1 reaches the port;
//! - membership: guest 3 attached to `web`, until it reaches guest 2's
//!   port 6379 (allowed from `web`);
//! - create: guest 4 registered, until a probe of a port its rules do not
//!   allow is dropped.
//!
//! Probes are TCP connects from a prober process in each guest; a drop is
//! seen as a connect that times out after [`PROBE_MS`], which is taken off
//! the figures for drops.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use cradle_client::route;
use cradle_model::api::InstanceSpec;
use cradle_secgroups::api::GroupRequest;
use cradle_secgroups::{Direction, EtherType, Match, Protocol, Remote, RuleSpec};

use crate::bench::{self, Cradle, median};
use crate::bench_install::{Netns, must};
use crate::{repo_root, run_cargo, target_dir};

/// The last commit with per-instance chains.
pub(crate) const OLD_REV: &str = "dab89b7";
/// A connect that gets no answer in this long is a drop.
const PROBE_MS: u64 = 25;
const TENANT: &str = "bench";

/// Build `cradle` as it was at [`OLD_REV`] (once; kept under target/).
pub(crate) fn build_old() -> Result<PathBuf> {
    let dir = target_dir().join("bench-firewall-old");
    let src = dir.join("src");
    if !src.join("Cargo.toml").exists() {
        println!("==> the layout before: cradle at {OLD_REV}, from git");
        std::fs::create_dir_all(&src)?;
        let mut git = Command::new("git")
            .args(["archive", "--format=tar", OLD_REV])
            .current_dir(repo_root())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot run git")?;
        let tar = Command::new("tar")
            .args(["-x", "-C"])
            .arg(&src)
            .stdin(git.stdout.take().expect("piped"))
            .status()
            .context("cannot run tar")?;
        if !git.wait()?.success() || !tar.success() {
            let _ = std::fs::remove_dir_all(&src);
            bail!("cannot unpack cradle at {OLD_REV}");
        }
    }
    let manifest = src.join("Cargo.toml");
    let target = dir.join("target");
    println!("==> cargo build --release -p cradle (at {OLD_REV})");
    run_cargo(
        &[
            "build",
            "--release",
            "-p",
            "cradle",
            "--manifest-path",
            manifest.to_str().expect("a UTF-8 path"),
            "--target-dir",
            target.to_str().expect("a UTF-8 path"),
        ],
        "cradle at the old revision does not build",
    )?;
    Ok(target.join("release").join("cradle"))
}

/// Connects on demand from inside a guest: a Python process reading
/// `DST PORT` lines and answering 1 (connected) or 0.
struct Prober {
    _child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

const PROBER: &str = r#"
import socket, sys
for line in sys.stdin:
    dst, port, ms = line.split()
    s = socket.socket()
    s.settimeout(int(ms) / 1000)
    try:
        s.connect((dst, int(port)))
        ok = s.recv(2) == b"ok"
    except OSError:
        ok = False
    s.close()
    print(1 if ok else 0, flush=True)
"#;

const SERVER: &str = r#"
import select, socket, sys
socks = []
for port in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(64)
    socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        c, _ = s.accept()
        c.sendall(b"ok")
        c.close()
"#;

impl Prober {
    fn connects(&mut self, dst: &str, port: u16) -> Result<bool> {
        writeln!(self.input, "{dst} {port} {PROBE_MS}")?;
        let mut line = String::new();
        self.output.read_line(&mut line)?;
        match line.trim() {
            "1" => Ok(true),
            "0" => Ok(false),
            other => bail!("the prober answered {other:?}"),
        }
    }
}

struct Lab {
    host: Netns,
    _guests: Vec<Netns>,
    probers: Vec<Prober>,
    _servers: Vec<crate::procs::Guarded>,
}

fn ns_python(ns: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "/usr/bin/python3", "-u", "-c"]);
    c
}

impl Lab {
    fn new() -> Result<Lab> {
        let host = Netns::new("fw-host")?;
        let ip = |ns: &str, args: &[&str]| {
            let mut c = Command::new("ip");
            c.args(["-n", ns]).args(args);
            must(&mut c, &format!("ip {}", args.join(" ")))
        };
        must(
            Command::new("ip").args([
                "netns",
                "exec",
                &host.0,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]),
            "sysctl",
        )?;
        let (mut guests, mut probers, mut servers) = (Vec::new(), Vec::new(), Vec::new());
        for k in 1..=4u8 {
            let g = Netns::new(&format!("fw-g{k}"))?;
            let vg = format!("vg{k}");
            ip(
                &host.0,
                &[
                    "link", "add", &vg, "type", "veth", "peer", "name", "eth0", "netns", &g.0,
                ],
            )?;
            ip(&g.0, &["link", "set", "eth0", "address", &mac(k)])?;
            ip(
                &host.0,
                &["addr", "add", &format!("10.77.{k}.1/30"), "dev", &vg],
            )?;
            ip(
                &g.0,
                &["addr", "add", &format!("10.77.{k}.2/30"), "dev", "eth0"],
            )?;
            ip(&host.0, &["link", "set", &vg, "up"])?;
            ip(&g.0, &["link", "set", "eth0", "up"])?;
            ip(
                &g.0,
                &["route", "add", "default", "via", &format!("10.77.{k}.1")],
            )?;
            let mut server = ns_python(&g.0)
                .arg(SERVER)
                .args(["6379", "7777", "8888", "9999"])
                .stdout(Stdio::piped())
                .stdin(Stdio::null())
                .spawn()
                .context("cannot start a server in a guest")?;
            let mut line = String::new();
            BufReader::new(server.stdout.take().expect("piped")).read_line(&mut line)?;
            if line.trim() != "ready" {
                bail!("the server in guest {k} did not start");
            }
            servers.push(crate::procs::Guarded::new("server", "KILL", server));
            let mut p = ns_python(&g.0)
                .arg(PROBER)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("cannot start a prober in a guest")?;
            probers.push(Prober {
                input: p.stdin.take().expect("piped"),
                output: BufReader::new(p.stdout.take().expect("piped")),
                _child: p,
            });
            guests.push(g);
        }
        Ok(Lab {
            host,
            _guests: guests,
            probers,
            _servers: servers,
        })
    }

    fn connects(&mut self, from: u8, to: u8, port: u16) -> Result<bool> {
        self.probers[usize::from(from) - 1].connects(&format!("10.77.{to}.2"), port)
    }

    /// Probe until the answer is `want`; how long it took (for drops, less
    /// the probe's own timeout).
    fn until(&mut self, from: u8, to: u8, port: u16, want: bool, since: Instant) -> Result<f64> {
        let deadline = since + Duration::from_secs(120);
        loop {
            if self.connects(from, to, port)? == want {
                let ms = since.elapsed().as_secs_f64() * 1000.0;
                return Ok(if want {
                    ms
                } else {
                    (ms - PROBE_MS as f64).max(0.0)
                });
            }
            if Instant::now() > deadline {
                bail!("guest {from} -> guest {to}:{port} never became {want}");
            }
        }
    }

    fn drop_table(&self) {
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.host.0,
                "nft",
                "delete",
                "table",
                "inet",
                "cradle",
            ])
            .stderr(Stdio::null())
            .status();
    }
}

fn mac(k: u8) -> String {
    format!("02:77:00:00:00:{k:02x}")
}

/// Instance `k`: guests 1 to 4 are `vgK`; the others' taps do not exist.
fn spec(k: usize) -> serde_json::Value {
    let mut s = bench::spec(k + 10);
    s["project_id"] = TENANT.into();
    if (1..=4).contains(&k) {
        s["interface"] = format!("vg{k}").into();
        s["mac"] = mac(k as u8).into();
        s["local_ipv4"] = format!("10.77.{k}.2/30").into();
    } else {
        let [_, _, a, b] = (k as u32).to_be_bytes();
        s["interface"] = format!("tap{k:05}").into();
        s["mac"] = format!("02:cc:00:00:{a:02x}:{b:02x}").into();
    }
    s
}

/// The tenant's 20 default rules; two are from groups `web` and `db`.
fn default_rules(web: &str, db: &str) -> Vec<RuleSpec> {
    use Direction::Ingress;
    use EtherType::{IPv4, IPv6};
    use Protocol::{Icmp, Tcp, Udp};
    let cidr = |s: &str| Remote::Cidr(s.parse().expect("a CIDR"));
    let ports = |from: u16, to: u16| Match::Ports { from, to };
    let rule = |ethertype, protocol, matches, remote| RuleSpec {
        direction: Ingress,
        ethertype,
        protocol,
        matches,
        remote,
    };
    let group = |g: &str| Remote::Group(g.parse().expect("a group id"));
    vec![
        rule(IPv4, Tcp, ports(22, 22), cidr("10.0.0.0/8")),
        rule(IPv6, Tcp, ports(22, 22), cidr("fd00::/8")),
        rule(IPv4, Tcp, ports(80, 80), cidr("0.0.0.0/0")),
        rule(IPv4, Tcp, ports(443, 443), cidr("0.0.0.0/0")),
        rule(IPv6, Tcp, ports(443, 443), cidr("::/0")),
        rule(IPv4, Tcp, ports(8000, 8080), cidr("192.168.0.0/16")),
        rule(IPv4, Tcp, ports(9100, 9100), cidr("10.0.0.0/8")),
        rule(IPv4, Udp, ports(53, 53), cidr("172.16.0.0/12")),
        rule(IPv4, Udp, ports(123, 123), cidr("0.0.0.0/0")),
        rule(IPv4, Udp, ports(60000, 61000), cidr("0.0.0.0/0")),
        rule(IPv6, Udp, ports(546, 547), cidr("fe80::/10")),
        rule(IPv4, Tcp, ports(3000, 3100), cidr("198.51.100.0/24")),
        rule(IPv4, Tcp, ports(5000, 5999), cidr("10.2.0.0/16")),
        rule(IPv4, Tcp, ports(25, 25), cidr("10.0.0.0/8")),
        rule(IPv4, Tcp, ports(587, 587), cidr("10.0.0.0/8")),
        rule(IPv4, Tcp, ports(993, 993), cidr("203.0.113.0/24")),
        rule(
            IPv4,
            Icmp,
            Match::Icmp {
                icmp_type: 8,
                code: None,
            },
            cidr("0.0.0.0/0"),
        ),
        rule(IPv4, Tcp, ports(2049, 2049), cidr("10.3.0.0/16")),
        rule(IPv4, Tcp, ports(6379, 6379), group(web)),
        rule(IPv4, Tcp, ports(5432, 5432), group(db)),
    ]
}

fn client(c: &Cradle) -> Result<cradle_client::blocking::Client> {
    Ok(cradle_client::blocking::Client::new(
        cradle_client::Target::new(&format!("http://{}", c.admin), &c.token).no_proxy(),
    )?)
}

/// A data dir with `n` instances, their tenant's groups and default rules.
fn populate(bin: &Path, dir: &Path, n: usize) -> Result<()> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let c = bench::start_cradle(bin, &data, &dir.join("populate.log"), None)?;
    let api = client(&c)?;
    let group = |name: &str| -> Result<String> {
        let req = GroupRequest {
            name: name.into(),
            description: String::new(),
        };
        Ok(api
            .send(route::create_security_group(TENANT, &req))?
            .id
            .to_string())
    };
    let (web, db) = (group("web")?, group("db")?);
    for r in default_rules(&web, &db) {
        api.send(route::add_default_rule(TENANT, &r.to_request()))?;
    }
    println!("==> registering {n} instances with 20 default rules each");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Instance 4 (guest 4) is created by the runs themselves.
    runtime.block_on(bench::register_with(c.admin, &c.token, n, |k| {
        spec(if k >= 4 { k + 1 } else { k })
    }))?;
    api.send(route::attach_group(TENANT, &web, &name(1)))?;
    std::fs::write(dir.join("web"), &web)?;
    Ok(())
}

fn name(k: usize) -> String {
    spec(k)["name"].as_str().expect("a name").to_string()
}

/// One run's figures, in ms.
#[derive(Default, Clone)]
struct Run {
    serving: f64,
    enforced: f64,
    full: f64,
    rule: f64,
    member: f64,
    create: f64,
}

fn one_run(bin: &Path, lab: &mut Lab, template: &Path, work: &Path) -> Result<Run> {
    let data = work.join("data");
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)?;
    must(
        Command::new("cp")
            .arg("-a")
            .arg(template.join("data"))
            .arg(&data),
        "cp -a",
    )?;
    let web = std::fs::read_to_string(template.join("web"))?;
    lab.drop_table();
    // Before any firewall, guest 3 reaches what no rule allows.
    if !lab.connects(3, 2, 9999)? {
        bail!("the lab does not route before the firewall");
    }
    let config = work.join("cradle.toml");
    std::fs::write(
        &config,
        format!("[firewall]\nenabled = true\nnetns = \"{}\"\n", lab.host.0),
    )?;
    let started = Instant::now();
    let c = bench::start_cradle_with(
        bin,
        &data,
        &work.join("serve.log"),
        Some(&config),
        &[("CRADLE_FIREWALL_ENABLED", "true")],
    )?;
    let guest = bench::guest_ip(11);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench::fetch_as_guest(c.metadata, guest.into()))?;
    let mut r = Run {
        serving: started.elapsed().as_secs_f64() * 1000.0,
        ..Run::default()
    };
    r.enforced = lab.until(3, 2, 9999, false, started)?;
    let api = client(&c)?;

    // (The answer's ruleset is JSON before and text now: read raw.)
    let t = Instant::now();
    let applied = api.fetch(&route::apply_firewall(false))?;
    if applied.status != 200 {
        bail!("the full apply answered {}", applied.status);
    }
    r.full = t.elapsed().as_secs_f64() * 1000.0;

    let own = api.send(route::instance_groups(&name(2)))?;
    let own = own.first().ok_or_else(|| anyhow!("guest 2 has no group"))?;
    let rule = RuleSpec {
        direction: Direction::Ingress,
        ethertype: EtherType::IPv4,
        protocol: Protocol::Tcp,
        matches: Match::Ports {
            from: 7777,
            to: 7777,
        },
        // A /24: a shape the default rules use already.
        remote: Remote::Cidr("10.77.1.0/24".parse().expect("a CIDR")),
    };
    let t = Instant::now();
    api.send(route::add_rule(
        TENANT,
        &own.id.to_string(),
        &rule.to_request(),
    ))?;
    r.rule = lab.until(1, 2, 7777, true, t)?;

    let t = Instant::now();
    api.send(route::attach_group(TENANT, web.trim(), &name(3)))?;
    r.member = lab.until(3, 2, 6379, true, t)?;

    if !lab.connects(1, 4, 8888)? {
        bail!("guest 4 is filtered before it is registered");
    }
    let t = Instant::now();
    let s: InstanceSpec = serde_json::from_value(spec(4))?;
    api.send(route::create_instance(&s))?;
    r.create = lab.until(1, 4, 8888, false, t)?;
    drop(c);
    Ok(r)
}

pub(crate) fn run(instances: &[usize], runs: usize) -> Result<()> {
    let old = build_old()?;
    let new = bench::build_cradle()?;
    let mut lab = Lab::new()?;
    let tmp = tempfile::tempdir()?;
    let mut table = Vec::new();
    for &n in instances {
        let template = tmp.path().join(format!("n{n}"));
        std::fs::create_dir_all(&template)?;
        // By the old cradle: the new one migrates its copies of the
        // registry, the old one could not read a newer one.
        populate(&old, &template, n)?;
        let mut by_layout: Vec<(&str, Vec<Run>)> = Vec::new();
        for (layout, bin) in [("before", &old), ("sets", &new)] {
            let mut got = Vec::new();
            for k in 1..=runs {
                let r = one_run(bin, &mut lab, &template, &tmp.path().join("run"))
                    .with_context(|| format!("{layout}, {n} instances, run {k}"))?;
                println!(
                    "    {layout:>6} N={n:<6} run {k}: serving {:.0} ms, enforced {:.0} ms, \
                     full {:.1} ms, rule {:.1} ms, membership {:.1} ms, create {:.1} ms",
                    r.serving, r.enforced, r.full, r.rule, r.member, r.create
                );
                got.push(r);
            }
            by_layout.push((layout, got));
        }
        table.push((n, by_layout));
    }
    drop(lab);
    println!();
    println!(
        "==> through the API, until the kernel enforces it: medians of {runs} runs (ms), \
         and today's layout over the one before"
    );
    println!(
        "{:>7} {:>7} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9}",
        "N", "layout", "serving", "enforced", "full", "rule", "membership", "create"
    );
    for (n, layouts) in &table {
        let meds: Vec<[f64; 6]> = layouts
            .iter()
            .map(|(_, runs)| {
                let m = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
                [
                    m(|r| r.serving),
                    m(|r| r.enforced),
                    m(|r| r.full),
                    m(|r| r.rule),
                    m(|r| r.member),
                    m(|r| r.create),
                ]
            })
            .collect();
        for ((layout, _), m) in layouts.iter().zip(&meds) {
            println!(
                "{n:>7} {layout:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.2} {:>10.2} {:>9.2}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            );
        }
        let (b, s) = (&meds[0], &meds[1]);
        println!(
            "{n:>7} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>10.3} {:>9.3}",
            "ratio",
            s[0] / b[0],
            s[1] / b[1],
            s[2] / b[2],
            s[3] / b[3],
            s[4] / b[4],
            s[5] / b[5]
        );
    }
    Ok(())
}
