//! `cargo xtask bench metadata`: cradle's metadata service under load, with
//! nginx serving the very same bytes as the peer to beat.
//!
//! cradle picks the instance by the source address of the connection, so the
//! load does too: each connection binds the address of one registered guest.
//! nginx is given the same choice without any trick in the load: its root is
//! `<docroot>/$remote_addr`, and the files under each address are the bytes
//! cradle returned to that guest. Both are driven by the same load generator
//! (see `load.rs` and `http.rs`), with the same connections, source addresses
//! and paths.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::flags;
use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use cradle_client::announce::{self, Listening};
use cradle_client::route;
use cradle_model::api::InstanceSpec;
use serde_json::json;
use tokio::task::JoinSet;

use crate::http::{self, Conn};
use crate::load::{self, Guest, Outcome, Plan, Probe};
use crate::procs::{self, Guarded};
use crate::{debian, run_cargo, target_dir};

/// What every guest asks in the load, half of the requests each.
pub(crate) const PATHS: &[&str] = &[
    "/openstack/latest/meta_data.json",
    "/latest/meta-data/instance-id",
];
const NGINX: &str = "/usr/sbin/nginx";
/// Concurrent admin API requests used to register instances.
pub(crate) const REGISTER_CONNECTIONS: usize = 8;

pub struct Options {
    duration: u64,
    warmup: u64,
    instances: usize,
    runs: usize,
    connections: Vec<usize>,
    client_threads: usize,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            duration: 10,
            warmup: 2,
            instances: 10_000,
            runs: 1,
            connections: vec![64, 256],
            client_threads: 2,
        };
        for (flag, v) in flags::pairs(args)? {
            match flag {
                "--duration" => o.duration = flags::number(flag, v, 1)? as u64,
                "--warmup" => o.warmup = flags::number(flag, v, 0)? as u64,
                "--instances" => o.instances = flags::number(flag, v, 1)?,
                "--runs" => o.runs = flags::number(flag, v, 1)?,
                "--client-threads" => o.client_threads = flags::number(flag, v, 1)?,
                "--connections" => {
                    o.connections = v
                        .split(',')
                        .map(|c| flags::number(flag, c.trim(), 1))
                        .collect::<Result<_>>()?
                }
                other => bail!("unknown option {other:?} (see `cargo xtask --help`)"),
            }
        }
        if o.instances > 1_000_000 {
            bail!("--instances: at most 1000000");
        }
        Ok(o)
    }
}

/// The source address of instance `k`: 127.1.0.1, ..., 127.1.0.250,
/// 127.1.1.1, ... (250 per /24, never .0 or .255), all on loopback.
pub(crate) fn guest_ip(k: usize) -> Ipv4Addr {
    let net = k / 250;
    Ipv4Addr::new(
        127,
        (1 + net / 256) as u8,
        (net % 256) as u8,
        (1 + k % 250) as u8,
    )
}

/// A well-formed ssh-ed25519 public key line, distinct per `k`.
pub(crate) fn ssh_key(k: usize, comment: &str) -> String {
    let mut blob = Vec::with_capacity(51);
    blob.extend_from_slice(&11u32.to_be_bytes());
    blob.extend_from_slice(b"ssh-ed25519");
    blob.extend_from_slice(&32u32.to_be_bytes());
    let seed = (k as u64).to_be_bytes();
    for i in 0..32 {
        blob.push(seed[i % 8] ^ (i as u8).wrapping_mul(37));
    }
    format!("ssh-ed25519 {} {comment}", B64.encode(blob))
}

pub(crate) fn spec(k: usize) -> serde_json::Value {
    let ip = guest_ip(k);
    let [_, b, c, d] = ip.octets();
    let name = format!("bench-{k:05}");
    let user_data = format!(
        "#cloud-config\nhostname: {name}\nruncmd:\n  - echo provisioned {name} by cradle\n"
    );
    json!({
        "name": name,
        "metadata_address": ip.to_string(),
        "user_data": B64.encode(user_data),
        "metadata": {"role": "bench", "index": k.to_string()},
        "public_keys": {"default": ssh_key(k, &format!("{name}@cradle"))},
        "public_ipv4": format!("198.51.100.{d}"),
        "local_ipv4": format!("10.{}.{c}.{d}/16", b - 1),
    })
}

/// `cradle serve` as a child process, on port 0 for both listeners.
pub(crate) struct Cradle {
    pub(crate) proc: Guarded,
    pub(crate) admin: SocketAddr,
    pub(crate) metadata: SocketAddr,
    pub(crate) token: String,
    log: PathBuf,
}

/// Start `cradle serve` on `data_dir`, with `--config config` when given,
/// and wait for it to print the addresses of its listeners.
pub(crate) fn start_cradle(
    bin: &Path,
    data_dir: &Path,
    log: &Path,
    config: Option<&Path>,
) -> Result<Cradle> {
    start_cradle_with(bin, data_dir, log, config, &[])
}

/// [`start_cradle`], with environment variables set over its own (such as
/// `CRADLE_FIREWALL_ENABLED=true`, for a firewall in a namespace).
pub(crate) fn start_cradle_with(
    bin: &Path,
    data_dir: &Path,
    log: &Path,
    config: Option<&Path>,
    env: &[(&str, &str)],
) -> Result<Cradle> {
    let log_file = std::fs::File::create(log)?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve");
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    let child = cmd
        .arg("--data-dir")
        .arg(data_dir)
        .args([
            "--admin-listen",
            "127.0.0.1:0",
            "--metadata-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        // Benchmarks run in the machine's own namespace: no firewall there.
        .env("CRADLE_FIREWALL_ENABLED", "false")
        // Throughput benchmarks send from a few guests as fast as they can:
        // the per-instance budget and connection cap would measure the
        // limits instead of the service.
        .env("CRADLE_METADATA_RATE_LIMIT", "0")
        .env("CRADLE_METADATA_MAX_CONNECTIONS_PER_SOURCE", "0")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let mut proc = Guarded::new("cradle", "TERM", child);
    let stdout = proc.child_mut().stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    // Read stdout to the end, so cradle never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let listening = wait_for_addresses(&rx, log)?;
    let token = std::fs::read_to_string(data_dir.join("admin.token"))
        .context("cannot read the admin token")?
        .trim()
        .to_string();
    Ok(Cradle {
        proc,
        admin: listening.admin,
        metadata: listening.metadata,
        token,
        log: log.to_path_buf(),
    })
}

/// The addresses a starting `cradle serve` announces on standard output
/// (its lines arriving on `rx`), within 30 s; `log` is shown otherwise.
pub(crate) fn wait_for_addresses(
    rx: &std::sync::mpsc::Receiver<String>,
    log: &Path,
) -> Result<Listening> {
    match announce::wait(rx, Duration::from_secs(30)) {
        Some(both) => Ok(both),
        None => bail!(
            "cradle serve did not print its addresses; its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        ),
    }
}

impl Cradle {
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.proc.exited() {
            bail!(
                "cradle exited ({status}); its log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        Ok(())
    }
}

/// Register instances 0..n through the admin API, with the typed client,
/// a few requests at once.
pub(crate) async fn register(admin: SocketAddr, token: &str, n: usize) -> Result<Duration> {
    register_with(admin, token, n, spec).await
}

/// Register instances 0..n made by `spec`, as [`register`] does.
pub(crate) async fn register_with(
    admin: SocketAddr,
    token: &str,
    n: usize,
    spec: fn(usize) -> serde_json::Value,
) -> Result<Duration> {
    let api = cradle_client::Client::new(
        cradle_client::Target::new(&format!("http://{admin}"), token).no_proxy(),
    )?;
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..REGISTER_CONNECTIONS.min(n) {
        let (next, done, api) = (next.clone(), done.clone(), api.clone());
        tasks.spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= n {
                    return Ok::<(), anyhow::Error>(());
                }
                let spec: InstanceSpec = serde_json::from_value(spec(k))?;
                api.send(route::create_instance(&spec))
                    .await
                    .with_context(|| format!("registering bench-{k:05}"))?;
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                if d % 1000 == 0 {
                    let s = started.elapsed().as_secs_f64();
                    println!("    registered {d}/{n} ({s:.1} s, {:.0}/s)", d as f64 / s);
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(started.elapsed())
}

/// What cradle answers guest `ip` on each of PATHS.
pub(crate) async fn fetch_as_guest(metadata: SocketAddr, ip: IpAddr) -> Result<Vec<Vec<u8>>> {
    let mut conn = Conn::connect(Some(ip), metadata)
        .await
        .with_context(|| format!("cannot connect to cradle from {ip}"))?;
    let host = metadata.to_string();
    let mut bodies = Vec::new();
    for path in PATHS {
        let r = conn.request(&http::get(&host, path)).await?;
        if r.status != 200 || r.body.is_empty() {
            bail!(
                "GET {path} from {ip}: status {}, {} bytes: {}",
                r.status,
                r.body.len(),
                String::from_utf8_lossy(r.body)
            );
        }
        bodies.push(r.body.to_vec());
    }
    Ok(bodies)
}

pub(crate) fn guests_for(
    target: SocketAddr,
    ips: &[IpAddr],
    bodies: &[Vec<Vec<u8>>],
) -> Arc<Vec<Guest>> {
    let host = target.to_string();
    Arc::new(
        ips.iter()
            .zip(bodies)
            .map(|(ip, bodies)| Guest {
                ip: *ip,
                probes: PATHS
                    .iter()
                    .zip(bodies)
                    .map(|(path, body)| Probe {
                        path: path.to_string(),
                        request: http::get(&host, path),
                        expect_len: body.len(),
                    })
                    .collect(),
            })
            .collect(),
    )
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// nginx serving `docroot/<source address>/<path>`, from a prefix of its own
/// so that it touches nothing under /var or /etc.
fn start_nginx(dir: &Path, docroot: &Path) -> Result<(Guarded, SocketAddr)> {
    let port = free_port()?;
    let d = dir.display();
    let conf = format!(
        "daemon off;
master_process on;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 65;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            root {root}/$remote_addr;
            default_type text/plain;
        }}
    }}
}}
",
        root = docroot.display()
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let child = Command::new(NGINX)
        .arg("-c")
        .arg(&conf_path)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {NGINX}"))?;
    Ok((
        Guarded::new("nginx", "QUIT", child),
        SocketAddr::from(([127, 0, 0, 1], port)),
    ))
}

/// Wait until nginx answers guest 0's first request with the expected bytes.
async fn wait_ready(
    nginx: &mut Guarded,
    addr: SocketAddr,
    guest: &Guest,
    dir: &Path,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Some(status) = nginx.exited() {
            bail!(
                "nginx exited ({status}); error.log:\n{}",
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
        }
        match Conn::connect(Some(guest.ip), addr).await {
            Ok(mut c) => {
                let p = &guest.probes[0];
                match c.request(&p.request).await {
                    Ok(r) if r.status == 200 && r.body.len() == p.expect_len => return Ok(()),
                    Ok(r) => last = format!("status {} with {} bytes", r.status, r.body.len()),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "nginx did not serve {} to {} in time (last: {last}); error.log:\n{}",
        guest.probes[0].path,
        guest.ip,
        std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
    )
}

struct Row {
    target: &'static str,
    connections: usize,
    rate: f64,
    p50: f64,
    p99: f64,
    errors: f64,
    server_cores: f64,
    client_cores: f64,
}

fn row(target: &'static str, connections: usize, o: &Outcome) -> Row {
    Row {
        target,
        connections,
        rate: o.rate(),
        p50: o.quantile_ms(0.50),
        p99: o.quantile_ms(0.99),
        errors: o.errors as f64,
        server_cores: o.server_cores,
        client_cores: o.client_cores,
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn print_row(r: &Row) {
    println!(
        "{:<7} {:>6} {:>11.0} {:>9.3} {:>9.3} {:>7} {:>9.2} {:>9.2}",
        r.target,
        r.connections,
        r.rate,
        r.p50,
        r.p99,
        r.errors.round() as u64,
        r.server_cores,
        r.client_cores
    );
}

fn print_header() {
    println!(
        "{:<7} {:>6} {:>11} {:>9} {:>9} {:>7} {:>9} {:>9}",
        "target", "conns", "req/s", "p50 ms", "p99 ms", "errors", "srv CPU", "load CPU"
    );
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Build the release `cradle` the benchmarks measure; its path.
pub(crate) fn build_cradle() -> Result<PathBuf> {
    println!("==> cargo build --release -p cradle");
    run_cargo(
        &["build", "--release", "-p", "cradle"],
        "cradle does not build",
    )?;
    Ok(target_dir().join("release").join("cradle"))
}

pub fn run(o: Options) -> Result<()> {
    let bin = build_cradle()?;

    println!("==> nginx (the peer)");
    if !Path::new(NGINX).exists() {
        debian::ensure(&["nginx"], "the benchmark compares cradle with nginx")?;
    }
    if !Path::new(NGINX).exists() {
        bail!("{NGINX} is still missing after installing nginx");
    }
    println!("    {NGINX}");

    let tmp = tempfile::Builder::new().prefix("cradle-bench-").tempdir()?;
    // nginx's workers run as another user when we are root: let them in.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.client_threads)
        .enable_all()
        .build()?;

    println!("==> start cradle (release, RUST_LOG=warn)");
    let mut cradle = start_cradle(
        &bin,
        &tmp.path().join("data"),
        &tmp.path().join("cradle.log"),
        None,
    )?;
    let cradle_pid = cradle.proc.pid();
    println!(
        "    pid {cradle_pid}, admin http://{}, metadata http://{}",
        cradle.admin, cradle.metadata
    );

    println!(
        "==> register {} instances ({REGISTER_CONNECTIONS} connections)",
        o.instances
    );
    let took = rt.block_on(register(cradle.admin, &cradle.token, o.instances))?;
    println!(
        "    registered {} instances in {:.1} s ({:.0}/s)",
        o.instances,
        took.as_secs_f64(),
        o.instances as f64 / took.as_secs_f64()
    );
    cradle.check_alive()?;
    let rss_registered = procs::status_kib(cradle_pid, "VmRSS")?;
    let hwm_registered = procs::status_kib(cradle_pid, "VmHWM")?;
    println!(
        "    cradle after registration: VmRSS {:.1} MiB, VmHWM {:.1} MiB",
        mib(rss_registered),
        mib(hwm_registered)
    );

    // The guests the load speaks for: one per connection at most, spread
    // over the whole registry.
    let max_conns = o.connections.iter().copied().max().unwrap_or(1);
    let stride = (o.instances / max_conns).max(1);
    let mut chosen: Vec<usize> = (0..max_conns).map(|i| (i * stride) % o.instances).collect();
    chosen.dedup();
    let ips: Vec<IpAddr> = chosen.iter().map(|k| IpAddr::V4(guest_ip(*k))).collect();
    println!(
        "==> fetch what cradle serves to the {} guests of the load",
        ips.len()
    );
    let bodies = rt.block_on(async {
        let mut all = Vec::new();
        for ip in &ips {
            all.push(fetch_as_guest(cradle.metadata, *ip).await?);
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    for (path, b) in PATHS.iter().zip(&bodies[0]) {
        println!("    {path}: {} bytes (guest {})", b.len(), ips[0]);
    }

    println!("==> start nginx serving the same bytes from <docroot>/$remote_addr");
    let nginx_dir = tmp.path().join("nginx");
    let docroot = nginx_dir.join("docroot");
    for (ip, bodies) in ips.iter().zip(&bodies) {
        for (path, body) in PATHS.iter().zip(bodies) {
            let file = docroot.join(ip.to_string()).join(&path[1..]);
            std::fs::create_dir_all(file.parent().expect("a file has a parent"))?;
            std::fs::write(&file, body)?;
        }
    }
    set_tree_readable(&nginx_dir)?;
    let (mut nginx, nginx_addr) = start_nginx(&nginx_dir, &docroot)?;
    let cradle_guests = guests_for(cradle.metadata, &ips, &bodies);
    let nginx_guests = guests_for(nginx_addr, &ips, &bodies);
    rt.block_on(wait_ready(
        &mut nginx,
        nginx_addr,
        &nginx_guests[0],
        &nginx_dir,
    ))?;
    println!("    pid {}, http://{nginx_addr}", nginx.pid());

    // The load shares the machine with the servers (and with anything else
    // running): say how busy it was before we started.
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!(
            "    load average before the load phases: {} ({} CPUs)",
            l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
    }
    let mut rows: Vec<Row> = Vec::new();
    for run in 1..=o.runs {
        for &conns in &o.connections {
            for target in ["cradle", "nginx"] {
                let (addr, guests, pid) = match target {
                    "cradle" => (cradle.metadata, cradle_guests.clone(), cradle_pid),
                    _ => (nginx_addr, nginx_guests.clone(), nginx.pid()),
                };
                println!(
                    "==> run {run}/{}: {target}, {conns} connections, {} s warm-up + {} s",
                    o.runs, o.warmup, o.duration
                );
                let plan = Plan {
                    target: addr,
                    guests,
                    connections: conns,
                    warmup: Duration::from_secs(o.warmup),
                    duration: Duration::from_secs(o.duration),
                    server_pid: pid,
                };
                let outcome = rt
                    .block_on(load::run(&plan))
                    .with_context(|| format!("load on {target} with {conns} connections"))?;
                let r = row(target, conns, &outcome);
                print_header();
                print_row(&r);
                if let Some(e) = &outcome.first_error {
                    println!("    {} errors; the first: {e}", outcome.errors);
                }
                rows.push(r);
                match target {
                    "cradle" => cradle.check_alive()?,
                    _ => {
                        if let Some(s) = nginx.exited() {
                            bail!("nginx exited during the load ({s})");
                        }
                    }
                }
            }
        }
    }
    let hwm = procs::status_kib(cradle_pid, "VmHWM")?;
    let rss = procs::status_kib(cradle_pid, "VmRSS")?;
    nginx.stop();
    cradle.proc.stop();

    // Report: per target and connection count, the median over runs.
    println!();
    println!(
        "==> results: {} instances, {} s measured after {} s warm-up, {} run(s){}",
        o.instances,
        o.duration,
        o.warmup,
        o.runs,
        if o.runs > 1 { " (medians)" } else { "" }
    );
    println!(
        "    paths alternated per connection: {}; load generator: {} threads",
        PATHS.join(", "),
        o.client_threads
    );
    println!(
        "    srv/load CPU: cores busy during the window (server incl. nginx workers; load generator)"
    );
    print_header();
    let mut summary: Vec<Row> = Vec::new();
    for &conns in &o.connections {
        for target in ["cradle", "nginx"] {
            let of = |f: fn(&Row) -> f64| {
                median(
                    rows.iter()
                        .filter(|r| r.target == target && r.connections == conns)
                        .map(f)
                        .collect(),
                )
            };
            let r = Row {
                target,
                connections: conns,
                rate: of(|r| r.rate),
                p50: of(|r| r.p50),
                p99: of(|r| r.p99),
                errors: of(|r| r.errors),
                server_cores: of(|r| r.server_cores),
                client_cores: of(|r| r.client_cores),
            };
            print_row(&r);
            summary.push(r);
        }
    }
    let find = |t: &str, c: usize| {
        summary
            .iter()
            .find(|r| r.target == t && r.connections == c)
            .expect("every target ran at every count")
    };
    println!();
    for &c in &o.connections {
        println!(
            "cradle/nginx req/s at {c:>3} connections: {:.2}",
            find("cradle", c).rate / find("nginx", c).rate
        );
    }
    println!(
        "cradle memory with {} instances: peak RSS (VmHWM) {:.1} MiB; VmRSS {:.1} MiB after registration, {:.1} MiB after the load",
        o.instances,
        mib(hwm),
        mib(rss_registered),
        mib(rss)
    );

    println!();
    println!("targets (from the issue; reported, not enforced):");
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    for &c in &o.connections {
        let (cr, nr) = (find("cradle", c).rate, find("nginx", c).rate);
        println!(
            "  req/s >= nginx at {c} connections: {cr:.0} vs {nr:.0} -> {}",
            met(cr >= nr)
        );
    }
    if o.connections.contains(&256) {
        let p99 = find("cradle", 256).p99;
        println!(
            "  p99 < 2 ms at 256 connections: {p99:.3} ms -> {}",
            met(p99 < 2.0)
        );
    } else {
        println!("  p99 < 2 ms at 256 connections: not measured (256 not in --connections)");
    }
    println!(
        "  peak RSS < 200 MiB with {} instances: {:.1} MiB -> {}",
        o.instances,
        mib(hwm),
        met(mib(hwm) < 200.0)
    );
    let errors: f64 = rows.iter().map(|r| r.errors).sum();
    if errors > 0.0 {
        println!("  note: {errors} requests failed in all (see the errors column)");
    }
    Ok(())
}

/// Directories 0755 and files 0644 under `dir`, whatever the umask.
fn set_tree_readable(dir: &Path) -> Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            set_tree_readable(&e.path())?;
        } else {
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o644))?;
        }
    }
    Ok(())
}

/// The first non-empty line a tool prints for its version, from stdout or
/// (ssh -V, debugfs -V) stderr; empty when it cannot run.
pub fn tool_version(program: &str, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// A small, fast generator (xorshift64*) for bytes neither gzip nor
/// `--sparse` can shrink.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        // Never zero, and different seeds far apart.
        XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fill `buf` eight bytes at a time (a tail under eight is left as is).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for w in buf.chunks_exact_mut(8) {
            w.copy_from_slice(&self.next().to_le_bytes());
        }
    }
}

/// Fill `buf` from `r` as far as it goes; how many bytes.
pub fn read_full(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Flush dirty pages everywhere (untimed, between contenders).
pub fn sync() -> Result<()> {
    let status = Command::new("sync").status().context("cannot run sync")?;
    if !status.success() {
        bail!("sync failed ({status})");
    }
    Ok(())
}
