//! `cargo xtask bench wait`: 10,000 guests on one host, each holding a
//! read of its `meta_data.json` with `?wait=true` (GCE's
//! `wait_for_change`).
//!
//! Reported: the server's RSS before the guests wait and while they all do;
//! its CPU over a few idle seconds with all of them waiting (what waiting
//! costs when nothing changes: no polling means about nothing); and the
//! wake-up latency, from the moment the operator's modify is sent to the
//! moment its guest has the new document, p50/p99/max, for a change to one
//! instance at a time and for changes to 1,000 instances sent at once. The
//! peer in the same run is the operator's own wait: how long the admin
//! API took to acknowledge the same modify. Every wake is checked to be
//! the changed instance's guest, and no other.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cradle_client::route;
use cradle_model::api::InstancePatch;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::bench;
use crate::flags;
use crate::http::{self, Conn};
use crate::procs;

const PATH: &str = "/openstack/latest/meta_data.json?wait=true&timeout_sec=3600";

pub struct Options {
    guests: usize,
    runs: usize,
    singles: usize,
    batch: usize,
    idle: u64,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            guests: 10_000,
            runs: 3,
            singles: 200,
            batch: 1_000,
            idle: 5,
        };
        for (flag, v) in flags::pairs(args)? {
            match flag {
                "--guests" => o.guests = flags::number(flag, v, 2)?,
                "--runs" => o.runs = flags::number(flag, v, 1)?,
                "--singles" => o.singles = flags::number(flag, v, 1)?,
                "--batch" => o.batch = flags::number(flag, v, 1)?,
                "--idle" => o.idle = flags::number(flag, v, 1)? as u64,
                other => bail!("unknown option {other:?} (see `cargo xtask --help`)"),
            }
        }
        if o.runs * (o.singles + o.batch) > o.guests {
            bail!(
                "each guest is changed at most once: --runs × (--singles + --batch) = {} \
                 is more than --guests {}",
                o.runs * (o.singles + o.batch),
                o.guests
            );
        }
        Ok(o)
    }
}

/// Let this process hold a socket per guest.
fn raise_open_files(need: u64) -> Result<()> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let l = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: l.maximum,
            maximum: l.maximum,
        },
    );
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    if now < need {
        bail!("the benchmark holds {need} sockets; the open-file limit is {now}");
    }
    Ok(())
}

fn marker(run: usize) -> InstancePatch {
    let mut p = InstancePatch::default();
    p.metadata
        .insert("changed".into(), Some(format!("in run {run}")));
    p
}

/// One guest's wait: connect from its address, ask, and report the moment
/// the answer came (with its instance's number).
async fn wait_once(
    metadata: SocketAddr,
    k: usize,
    woken: mpsc::UnboundedSender<(usize, Instant)>,
) -> Result<()> {
    let ip = bench::guest_ip(k).into();
    let mut conn = Conn::connect(Some(ip), metadata)
        .await
        .with_context(|| format!("guest {k} cannot connect"))?;
    let host = metadata.to_string();
    let r = conn.request(&http::get(&host, PATH)).await?;
    let at = Instant::now();
    if r.status != 200 {
        bail!(
            "guest {k}'s wait answered {}: {}",
            r.status,
            String::from_utf8_lossy(r.body)
        );
    }
    let _ = woken.send((k, at));
    Ok(())
}

fn quantiles(mut d: Vec<Duration>) -> (f64, f64, f64) {
    d.sort();
    let at = |q: f64| {
        d[((d.len() as f64 * q).ceil() as usize).clamp(1, d.len()) - 1].as_secs_f64() * 1e3
    };
    (at(0.5), at(0.99), at(1.0))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn waiting(api: &cradle_client::Client) -> Result<usize> {
    let text = api.send(route::metrics()).await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("cradle_metadata_waiting "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as usize)
}

struct Run {
    rss_idle_mib: f64,
    rss_waiting_mib: f64,
    idle_cpu_pct: f64,
    single: (f64, f64, f64),
    single_ack: (f64, f64, f64),
    batch: (f64, f64, f64),
    batch_ack: (f64, f64, f64),
    batch_all_ms: f64,
}

pub fn run(o: Options) -> Result<()> {
    let bin = bench::build_cradle()?;
    raise_open_files(o.guests as u64 + 1024)?;
    let tmp = tempfile::Builder::new()
        .prefix("cradle-bench-wait-")
        .tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let room = (o.guests + 512).to_string();
    println!("==> start cradle (release, RUST_LOG=warn)");
    let mut cradle = bench::start_cradle_with(
        &bin,
        &tmp.path().join("data"),
        &tmp.path().join("cradle.log"),
        None,
        &[
            ("CRADLE_METADATA_MAX_CONNECTIONS", &room),
            ("CRADLE_METADATA_MAX_WAITING", &room),
        ],
    )?;
    let pid = cradle.proc.pid();
    println!("==> register {} instances", o.guests);
    let took = rt.block_on(bench::register(cradle.admin, &cradle.token, o.guests))?;
    println!("    registered in {:.1} s", took.as_secs_f64());
    let api = cradle_client::Client::new(
        cradle_client::Target::new(&format!("http://{}", cradle.admin), &cradle.token).no_proxy(),
    )?;
    let mut runs = Vec::new();
    for run in 0..o.runs {
        println!("==> run {}/{}", run + 1, o.runs);
        let r = rt.block_on(one_run(&o, &cradle, &api, pid, run))?;
        cradle.check_alive()?;
        println!(
            "    RSS {:.1} MiB idle, {:.1} MiB with {} waiting; CPU while they wait {:.2}%",
            r.rss_idle_mib, r.rss_waiting_mib, o.guests, r.idle_cpu_pct
        );
        println!(
            "    one at a time ({}): wake p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
             the modify's answer p50 {:.2} ms, p99 {:.2} ms",
            o.singles, r.single.0, r.single.1, r.single.2, r.single_ack.0, r.single_ack.1
        );
        println!(
            "    {} at once: wake p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (each from its own \
             modify sent); the modify's answer p50 {:.2} ms, p99 {:.2} ms; all {} woken {:.1} ms \
             after the first was sent",
            o.batch,
            r.batch.0,
            r.batch.1,
            r.batch.2,
            r.batch_ack.0,
            r.batch_ack.1,
            o.batch,
            r.batch_all_ms
        );
        runs.push(r);
    }
    let m = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    println!(
        "\n==> medians of {} runs, {} guests waiting",
        o.runs, o.guests
    );
    println!(
        "    RSS: {:.1} MiB idle, {:.1} MiB waiting ({:.1} KiB per waiting guest)",
        m(|r| r.rss_idle_mib),
        m(|r| r.rss_waiting_mib),
        (m(|r| r.rss_waiting_mib) - m(|r| r.rss_idle_mib)) * 1024.0 / o.guests as f64
    );
    println!(
        "    CPU over {} s with every guest waiting and nothing changing: {:.2}%",
        o.idle,
        m(|r| r.idle_cpu_pct)
    );
    let (s50, s99) = (m(|r| r.single.0), m(|r| r.single.1));
    let (a50, a99) = (m(|r| r.single_ack.0), m(|r| r.single_ack.1));
    println!(
        "    a change to one instance: its guest woken p50 {s50:.2} ms, p99 {s99:.2} ms; \
         the operator's modify answered p50 {a50:.2} ms, p99 {a99:.2} ms (wake / answer at p50 {:.2}×)",
        s50 / a50
    );
    let (b50, b99) = (m(|r| r.batch.0), m(|r| r.batch.1));
    println!(
        "    changes to {} at once: each guest woken p50 {b50:.2} ms, p99 {b99:.2} ms after its \
         modify was sent (answered p50 {:.2} ms, p99 {:.2} ms); all woken {:.1} ms after the first",
        o.batch,
        m(|r| r.batch_ack.0),
        m(|r| r.batch_ack.1),
        m(|r| r.batch_all_ms)
    );
    Ok(())
}

async fn one_run(
    o: &Options,
    cradle: &bench::Cradle,
    api: &cradle_client::Client,
    pid: u32,
    run: usize,
) -> Result<Run> {
    let rss_idle = procs::status_kib(pid, "VmRSS")? as f64 / 1024.0;
    let (tx, mut woken) = mpsc::unbounded_channel();
    let mut guests = JoinSet::new();
    let started = Instant::now();
    for k in 0..o.guests {
        guests.spawn(wait_once(cradle.metadata, k, tx.clone()));
        // Connect in steps, so the listener's backlog never overflows.
        if k % 500 == 499 {
            while waiting(api).await? + 250 < k {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    drop(tx);
    while waiting(api).await? < o.guests {
        if let Some(r) = guests.try_join_next() {
            r??;
            bail!("a guest's wait ended before anything changed");
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("{} guests were not waiting within 120 s", o.guests);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "    {} guests waiting after {:.1} s",
        o.guests,
        started.elapsed().as_secs_f64()
    );
    let rss_waiting = procs::status_kib(pid, "VmRSS")? as f64 / 1024.0;
    let ticks = procs::cpu_ticks_with_children(pid);
    tokio::time::sleep(Duration::from_secs(o.idle)).await;
    let idle_cpu_pct =
        (procs::cpu_ticks_with_children(pid) - ticks) as f64 / procs::clock_ticks() / o.idle as f64
            * 100.0;
    if let Ok(Some((k, _))) = tokio::time::timeout(Duration::ZERO, woken.recv()).await {
        bail!("guest {k} was woken though nothing changed");
    }

    // Each guest changed at most once over all runs: this run's share.
    let first = run * (o.singles + o.batch);
    let patch = marker(run);
    let (mut single, mut single_ack) = (Vec::new(), Vec::new());
    for k in first..first + o.singles {
        let name = format!("bench-{k:05}");
        let sent = Instant::now();
        api.send(route::modify_instance(&name, &patch)).await?;
        single_ack.push(sent.elapsed());
        let (who, at) = tokio::time::timeout(Duration::from_secs(10), woken.recv())
            .await
            .with_context(|| format!("guest {k} was not woken within 10 s"))?
            .context("every guest's wait ended")?;
        if who != k {
            bail!("a change to {k} woke guest {who}");
        }
        single.push(at - sent);
    }

    let batch: Vec<usize> = (first + o.singles..first + o.singles + o.batch).collect();
    let sent_at = Arc::new(std::sync::Mutex::new(vec![None; o.guests]));
    let begun = Instant::now();
    let mut modifies = JoinSet::new();
    let per = batch.len().div_ceil(bench::REGISTER_CONNECTIONS);
    for part in batch.chunks(per) {
        let (api, part, sent_at, patch) =
            (api.clone(), part.to_vec(), sent_at.clone(), patch.clone());
        modifies.spawn(async move {
            let mut acks = Vec::new();
            for k in part {
                let sent = Instant::now();
                sent_at.lock().unwrap()[k] = Some(sent);
                api.send(route::modify_instance(&format!("bench-{k:05}"), &patch))
                    .await?;
                acks.push(sent.elapsed());
            }
            Ok::<_, anyhow::Error>(acks)
        });
    }
    let mut batch_ack = Vec::new();
    while let Some(r) = modifies.join_next().await {
        batch_ack.extend(r??);
    }
    let mut batch_wake = Vec::new();
    let mut last = begun;
    for _ in 0..o.batch {
        let (who, at) = tokio::time::timeout(Duration::from_secs(30), woken.recv())
            .await
            .context("the batch's guests were not all woken within 30 s")?
            .context("every guest's wait ended")?;
        let sent = sent_at.lock().unwrap()[who]
            .with_context(|| format!("guest {who} was woken but its instance was not changed"))?;
        batch_wake.push(at.saturating_duration_since(sent));
        last = last.max(at);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Ok(Some((k, _))) = tokio::time::timeout(Duration::ZERO, woken.recv()).await {
        bail!("guest {k} was woken though its instance did not change");
    }
    // End this run's waits: drop every guest's connection.
    guests.abort_all();
    while guests.join_next().await.is_some() {}
    while waiting(api).await? > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Run {
        rss_idle_mib: rss_idle,
        rss_waiting_mib: rss_waiting,
        idle_cpu_pct,
        single: quantiles(single),
        single_ack: quantiles(single_ack),
        batch: quantiles(batch_wake),
        batch_ack: quantiles(batch_ack),
        batch_all_ms: (last - begun).as_secs_f64() * 1e3,
    })
}
