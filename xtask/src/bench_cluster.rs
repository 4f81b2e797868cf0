//! `cargo xtask bench cluster`: three `cradle serve` hosts on one real
//! PostgreSQL server, side by side with one host on SQLite, in the same run.
//!
//! Reported for both: the time from starting `serve` on a registry of N
//! instances to its first guest answer, admin create and modify throughput,
//! and guest read throughput (on the cluster, on one host serving a third of
//! the guests; the same guests' addresses on both, the loads in turns). For the cluster only: how long a change made through host A
//! takes to be served by host B's metadata service, timed from sending the
//! request until B's guest reads the new value (polled every millisecond).

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cradle_client::route;
use cradle_model::api::InstancePatch;
use cradle_store::testkit::PgServer;
use tokio::task::JoinSet;

use crate::bench::{self, Cradle};
use crate::flags;
use crate::http::{self, Conn};
use crate::load::{self, Plan};

const HOSTS: [&str; 3] = ["node-a", "node-b", "node-c"];

pub struct Options {
    instances: usize,
    runs: usize,
    samples: usize,
    modifies: usize,
    duration: u64,
    connections: usize,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            instances: 10_000,
            runs: 3,
            samples: 300,
            modifies: 2_000,
            duration: 5,
            connections: 64,
        };
        for (flag, v) in flags::pairs(args)? {
            match flag {
                "--instances" => o.instances = flags::number(flag, v, 3)?,
                "--runs" => o.runs = flags::number(flag, v, 1)?,
                "--samples" => o.samples = flags::number(flag, v, 1)?,
                "--modifies" => o.modifies = flags::number(flag, v, 1)?,
                "--duration" => o.duration = flags::number(flag, v, 1)? as u64,
                "--connections" => o.connections = flags::number(flag, v, 1)?,
                other => bail!("unknown option {other:?} (see `cargo xtask --help`)"),
            }
        }
        Ok(o)
    }
}

/// Instance `k` of the cluster, placed on host `k % 3`.
fn placed(k: usize) -> serde_json::Value {
    let mut spec = bench::spec(k);
    spec["host"] = HOSTS[k % HOSTS.len()].into();
    spec
}

fn write_config(path: &Path, store_url: Option<&str>, host: &str) -> Result<()> {
    let mut text = format!("[cluster]\nhost = \"{host}\"\n");
    if let Some(url) = store_url {
        text.push_str(&format!("\n[store]\nurl = \"{url}\"\n"));
    }
    std::fs::write(path, text)?;
    Ok(())
}

fn start(bin: &Path, dir: &Path, name: &str) -> Result<Cradle> {
    bench::start_cradle(
        bin,
        &dir.join(format!("data-{name}")),
        &dir.join(format!("{name}.log")),
        Some(&dir.join(format!("{name}.toml"))),
    )
}

/// Start `serve` on an existing registry; the time until `ip`'s first
/// guest read answers 200.
fn time_start(
    bin: &Path,
    dir: &Path,
    name: &str,
    ip: IpAddr,
    rt: &tokio::runtime::Runtime,
) -> Result<(Cradle, Duration)> {
    let started = Instant::now();
    let cradle = start(bin, dir, name)?;
    rt.block_on(async {
        loop {
            if bench::fetch_as_guest(cradle.metadata, ip).await.is_ok() {
                return Ok::<_, anyhow::Error>(());
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("{name} did not serve {ip} within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })?;
    Ok((cradle, started.elapsed()))
}

fn client(c: &Cradle) -> Result<cradle_client::Client> {
    Ok(cradle_client::Client::new(
        cradle_client::Target::new(&format!("http://{}", c.admin), &c.token).no_proxy(),
    )?)
}

fn marker(key: &str, value: String) -> InstancePatch {
    let mut p = InstancePatch::default();
    p.metadata.insert(key.into(), Some(value));
    p
}

/// `n` modifies through `c`, 8 at a time; per second.
async fn modify_rate(c: &Cradle, instances: usize, n: usize) -> Result<f64> {
    let api = client(c)?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..bench::REGISTER_CONNECTIONS {
        let (api, next) = (api.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= n {
                    return Ok::<(), anyhow::Error>(());
                }
                let name = format!("bench-{:05}", k % instances);
                api.send(route::modify_instance(&name, &marker("m", k.to_string())))
                    .await?;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Guest reads per second on `target` from the guests `ks`.
async fn read_rate(c: &Cradle, ks: &[usize], o: &Options) -> Result<(f64, f64)> {
    let ips: Vec<IpAddr> = ks.iter().map(|k| IpAddr::V4(bench::guest_ip(*k))).collect();
    let mut bodies = Vec::new();
    for ip in &ips {
        bodies.push(bench::fetch_as_guest(c.metadata, *ip).await?);
    }
    let plan = Plan {
        target: c.metadata,
        guests: bench::guests_for(c.metadata, &ips, &bodies),
        connections: o.connections,
        warmup: Duration::from_secs(1),
        duration: Duration::from_secs(o.duration),
        server_pid: c.proc.pid(),
    };
    let out = load::run(&plan).await?;
    if out.errors > 0 {
        bail!("{} guest reads failed: {:?}", out.errors, out.first_error);
    }
    Ok((out.rate(), out.quantile_ms(0.99)))
}

/// Change instance `k` (on B) through A, and time until B's guest `k`
/// reads the new value: from sending, and from A's answer.
async fn propagation(a: &Cradle, b: &Cradle, k: usize, n: usize) -> Result<(Duration, Duration)> {
    let api = client(a)?;
    let ip = IpAddr::V4(bench::guest_ip(k));
    let mut conn = Conn::connect(Some(ip), b.metadata).await?;
    let host = b.metadata.to_string();
    let req = http::get(&host, "/openstack/latest/meta_data.json");
    let value = format!("p{n}-{}", Instant::now().elapsed().as_nanos());
    let needle = format!("\"{value}\"");
    let sent = Instant::now();
    api.send(route::modify_instance(
        &format!("bench-{k:05}"),
        &marker("p", value),
    ))
    .await?;
    let answered = sent.elapsed();
    loop {
        let r = conn.request(&req).await?;
        if r.status == 200 && String::from_utf8_lossy(r.body).contains(&needle) {
            let seen = sent.elapsed();
            return Ok((seen, seen.saturating_sub(answered)));
        }
        if sent.elapsed() > Duration::from_secs(10) {
            bail!("B never served the change to bench-{k:05}");
        }
        if conn.closed() {
            conn = Conn::connect(Some(ip), b.metadata).await?;
        }
        // Poll every millisecond, not flat out: a busy loop here would take
        // the CPU that B's catch-up needs on a small machine.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

pub fn run(o: Options) -> Result<()> {
    let bin = bench::build_cradle()?;
    let tmp = tempfile::Builder::new()
        .prefix("cradle-bench-cluster-")
        .tempdir()?;
    let dir = tmp.path();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    println!("==> PostgreSQL (initdb + pg_ctl in {})", dir.display());
    let pg = PgServer::start().context("cannot start PostgreSQL")?;
    let url = pg.url();
    write_config(&dir.join("single.toml"), None, "single")?;
    for h in HOSTS {
        write_config(&dir.join(format!("{h}.toml")), Some(&url), h)?;
    }

    // One host on SQLite.
    println!("==> one host on SQLite: register {} instances", o.instances);
    let single = start(&bin, dir, "single")?;
    let took = rt.block_on(bench::register_with(
        single.admin,
        &single.token,
        o.instances,
        bench::spec,
    ))?;
    let single_create = o.instances as f64 / took.as_secs_f64();
    let single_modify = rt.block_on(modify_rate(&single, o.instances, o.modifies))?;
    drop(single);
    let mut single_starts = Vec::new();
    for _ in 0..o.runs {
        let (c, t) = time_start(
            &bin,
            dir,
            "single",
            IpAddr::V4(bench::guest_ip(o.instances - 1)),
            &rt,
        )?;
        single_starts.push(t.as_secs_f64());
        drop(c);
    }
    let (single, _) = time_start(&bin, dir, "single", IpAddr::V4(bench::guest_ip(0)), &rt)?;
    // The same guests the cluster's host B serves (k % 3 == 1).
    let b_guests: Vec<usize> = (0..o.instances)
        .filter(|k| k % 3 == 1)
        .step_by(((o.instances / 3) / o.connections).max(1))
        .take(o.connections)
        .collect();
    // Kept running: its read loads alternate with host B's below.

    // Three hosts on PostgreSQL.
    println!(
        "==> three hosts on PostgreSQL: register {} instances through A",
        o.instances
    );
    let a = start(&bin, dir, HOSTS[0])?;
    let mut b = start(&bin, dir, HOSTS[1])?;
    let c = start(&bin, dir, HOSTS[2])?;
    let took = rt.block_on(bench::register_with(a.admin, &a.token, o.instances, placed))?;
    let cluster_create = o.instances as f64 / took.as_secs_f64();
    let cluster_modify = rt.block_on(modify_rate(&a, o.instances, o.modifies))?;

    println!(
        "==> propagation: {} changes through A, read by guests on B",
        o.samples
    );
    let mut from_send = Vec::new();
    let mut from_answer = Vec::new();
    for n in 0..o.samples {
        let k = b_guests[n % b_guests.len()];
        let (s, a_) = rt.block_on(propagation(&a, &b, k, n))?;
        from_send.push(s);
        from_answer.push(a_);
    }
    from_send.sort();
    from_answer.sort();

    // Read loads in turns, one host on SQLite then host B, so that the
    // machine's own ups and downs fall on both alike.
    println!("==> guest reads: {} loads each, in turns", o.runs);
    let (mut single_reads, mut cluster_reads) = (Vec::new(), Vec::new());
    for _ in 0..o.runs {
        single_reads.push(rt.block_on(read_rate(&single, &b_guests, &o))?);
        cluster_reads.push(rt.block_on(read_rate(&b, &b_guests, &o))?);
    }
    drop(single);
    b.check_alive()?;
    drop(b);
    let mut cluster_starts = Vec::new();
    for _ in 0..o.runs {
        let (h, t) = time_start(
            &bin,
            dir,
            HOSTS[1],
            IpAddr::V4(bench::guest_ip(b_guests[0])),
            &rt,
        )?;
        cluster_starts.push(t.as_secs_f64());
        drop(h);
    }
    drop((a, c));

    let single_read = median(single_reads.iter().map(|r| r.0).collect());
    let cluster_read = median(cluster_reads.iter().map(|r| r.0).collect());
    println!();
    println!(
        "{} instances; medians of {} runs where repeated",
        o.instances, o.runs
    );
    println!(
        "{:<44} {:>14} {:>14} {:>8}",
        "", "SQLite, 1 host", "PG, 3 hosts", "PG/SQLite"
    );
    let line = |what: &str, s: f64, c: f64, unit: &str| {
        println!(
            "{what:<44} {:>11.1} {unit:<2} {:>11.1} {unit:<2} {:>7.2}x",
            s,
            c,
            c / s
        );
    };
    line(
        "start-up to first guest answer (ms)",
        median(single_starts.clone()) * 1e3,
        median(cluster_starts.clone()) * 1e3,
        "ms",
    );
    line(
        "admin creates per second",
        single_create,
        cluster_create,
        "/s",
    );
    line(
        "admin modifies per second",
        single_modify,
        cluster_modify,
        "/s",
    );
    line(
        &format!("guest reads per second ({} conns, host B)", o.connections),
        single_read,
        cluster_read,
        "/s",
    );
    line(
        "guest read p99 (ms)",
        median(single_reads.iter().map(|r| r.1).collect()),
        median(cluster_reads.iter().map(|r| r.1).collect()),
        "ms",
    );
    println!(
        "change through A served by B ({} samples): from sending p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; from A's answer p50 {:.2} ms, p99 {:.2} ms",
        o.samples,
        quantile(&from_send, 0.5),
        quantile(&from_send, 0.99),
        quantile(&from_send, 1.0),
        quantile(&from_answer, 0.5),
        quantile(&from_answer, 0.99),
    );
    println!(
        "start-up runs: SQLite {:?} s, cluster host B {:?} s",
        single_starts
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>(),
        cluster_starts
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
    );
    Ok(())
}
