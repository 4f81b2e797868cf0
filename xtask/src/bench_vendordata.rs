//! `cargo xtask bench vendordata`: dynamic vendordata against a slow target.
//!
//! The issue's benchmark: 1,000 instances, each fetching
//! `vendor_data2.json` 10 times, against a target that takes 50 ms; report
//! the upstream calls (at most one per instance: the cache and the sharing
//! of concurrent calls must hold) and the guests' latency on cache hits.
//!
//! The target is a small HTTP/1.1 server in this process, on a runtime of
//! its own: it counts the POSTs it is sent, waits 50 ms and answers
//! `{"bench": true}`. Each run starts a fresh release `cradle serve` (a new
//! data directory, so the cache starts empty) configured with that target
//! as `slow`, and registers the instances through the admin API as
//! `bench metadata` does. Then every instance, from its own source address
//! and on one keep-alive connection, GETs `vendor_data2.json` `--fetches`
//! times one after another, `--concurrency` instances at a time. The first
//! fetch of an instance (the miss, which waits for the target) and the
//! others (hits) go to separate histograms; connecting is not timed.
//! Upstream calls are counted by the target and cross-checked with cradle's
//! own counters on `/metrics`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::flags;
use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

use crate::bench::{self, REGISTER_CONNECTIONS, guest_ip, median};
use crate::http::{self, Conn};
use crate::load::histogram;

/// The target's name in cradle's configuration (the key in
/// `vendor_data2.json` and the `target` label on `/metrics`).
const TARGET: &str = "slow";
/// How long the target takes to answer.
const TARGET_DELAY: Duration = Duration::from_millis(50);
/// What the target answers; guests must find `"bench"` in what cradle
/// serves them.
const TARGET_BODY: &str = r#"{"bench": true}"#;
const PATH: &str = "/openstack/latest/vendor_data2.json";
/// The issue's target for hits.
const HIT_P99_TARGET_MS: f64 = 2.0;
/// No fetch may take longer than this (cradle's read_timeout is 5 s).
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Options {
    instances: usize,
    fetches: usize,
    runs: usize,
    concurrency: usize,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            instances: 1000,
            fetches: 10,
            runs: 1,
            concurrency: 128,
        };
        for (flag, v) in flags::pairs(args)? {
            match flag {
                "--instances" => o.instances = flags::number(flag, v, 1)?,
                "--fetches" => o.fetches = flags::number(flag, v, 1)?,
                "--runs" => o.runs = flags::number(flag, v, 1)?,
                "--concurrency" => o.concurrency = flags::number(flag, v, 1)?,
                other => bail!("unknown option {other:?} (see `cargo xtask --help`)"),
            }
        }
        if o.instances > 1_000_000 {
            bail!("--instances: at most 1000000");
        }
        if o.fetches > 1_000_000 {
            bail!("--fetches: at most 1000000");
        }
        Ok(o)
    }
}

/// What the target has seen.
#[derive(Default)]
struct TargetStats {
    /// POSTs answered or being answered.
    calls: AtomicU64,
    /// Requests it was waiting on at once: now, and at most.
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
    /// Requests it refused (not a POST, or unreadable).
    rejected: AtomicU64,
}

/// The slow vendordata target, served by a runtime of its own so that the
/// guests' load does not delay its timers; dropping it stops it.
struct SlowTarget {
    addr: SocketAddr,
    stats: Arc<TargetStats>,
    _rt: tokio::runtime::Runtime,
}

impl SlowTarget {
    fn start() -> Result<SlowTarget> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("slow-target")
            .enable_all()
            .build()?;
        let stats = Arc::new(TargetStats::default());
        let listener = rt.block_on(async {
            let socket = TcpSocket::new_v4()?;
            socket.set_reuseaddr(true)?;
            socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            // Every instance's call may arrive at once.
            socket.listen(4096)
        })?;
        let addr = listener.local_addr()?;
        let s = stats.clone();
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of descriptors, say: let connections finish.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    if serve_target(stream, &s).await.is_err() {
                        s.rejected.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        Ok(SlowTarget {
            addr,
            stats,
            _rt: rt,
        })
    }
}

/// One keep-alive connection to the target: read a request (head and
/// Content-Length body), count it, wait, answer; until the peer closes.
async fn serve_target(mut stream: TcpStream, stats: &TargetStats) -> std::io::Result<()> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let head_len = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 64 * 1024 {
                return Err(bad("request head too large"));
            }
            if stream.read_buf(&mut buf).await? == 0 {
                // Closed between requests (or mid-head): done.
                return Ok(());
            }
        };
        let head = std::str::from_utf8(&buf[..head_len]).map_err(|_| bad("head not UTF-8"))?;
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or("");
        let is_post = request_line.starts_with("POST ");
        let mut body_len = 0usize;
        let mut close = request_line.ends_with("HTTP/1.0");
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                body_len = value.parse().map_err(|_| bad("bad Content-Length"))?;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                // Counted before the answer, so whoever reads the answer
                // also sees the count.
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                stream
                    .write_all(b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await?;
                return Ok(());
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.to_ascii_lowercase().contains("close");
            }
        }
        if body_len > 1 << 20 {
            return Err(bad("request body too large"));
        }
        while buf.len() < head_len + body_len {
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(bad("closed mid-body"));
            }
        }
        buf.drain(..head_len + body_len);
        if !is_post {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            stream
                .write_all(b"HTTP/1.1 405 Method Not Allowed\r\nAllow: POST\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await?;
            return Ok(());
        }
        stats.calls.fetch_add(1, Ordering::Relaxed);
        let now = stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        stats.peak_in_flight.fetch_max(now, Ordering::Relaxed);
        tokio::time::sleep(TARGET_DELAY).await;
        stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: {}\r\n\r\n{TARGET_BODY}",
            TARGET_BODY.len(),
            if close { "close" } else { "keep-alive" }
        );
        stream.write_all(reply.as_bytes()).await?;
        if close {
            return Ok(());
        }
    }
}

/// cradle's configuration: the slow target and nothing else.
fn config(target: SocketAddr) -> String {
    format!(
        "[[vendordata.dynamic]]\nname = \"{TARGET}\"\nurl = \"http://{target}/\"\n\
         cache_ttl = 300\nread_timeout = 5\n"
    )
}

/// What the guests measured.
struct Fetched {
    /// Latency in nanoseconds of each instance's first fetch, and of the
    /// others.
    miss: Histogram<u64>,
    hit: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Fetched {
    fn new() -> Fetched {
        Fetched {
            miss: histogram(),
            hit: histogram(),
            errors: 0,
            first_error: None,
        }
    }

    fn note(&mut self, msg: String) {
        self.errors += 1;
        self.first_error.get_or_insert(msg);
    }

    fn merge(&mut self, other: Fetched) -> Result<()> {
        self.miss.add(&other.miss).context("merging histograms")?;
        self.hit.add(&other.hit).context("merging histograms")?;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        Ok(())
    }
}

/// Instances 0..n, `concurrency` at a time: each fetches PATH `fetches`
/// times on one connection from its own address. A failed fetch is noted
/// and the instance moves on (on a new connection if the old one broke).
async fn fetch_all(
    metadata: SocketAddr,
    n: usize,
    fetches: usize,
    concurrency: usize,
) -> Result<Fetched> {
    let request: Arc<[u8]> = http::get(&metadata.to_string(), PATH).into();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency.min(n) {
        let (next, request) = (next.clone(), request.clone());
        tasks.spawn(async move {
            let mut out = Fetched::new();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= n {
                    return out;
                }
                guest(
                    metadata,
                    IpAddr::V4(guest_ip(k)),
                    fetches,
                    &request,
                    &mut out,
                )
                .await;
            }
        });
    }
    let mut all = Fetched::new();
    while let Some(r) = tasks.join_next().await {
        all.merge(r?)?;
    }
    Ok(all)
}

async fn guest(
    metadata: SocketAddr,
    ip: IpAddr,
    fetches: usize,
    request: &[u8],
    out: &mut Fetched,
) {
    let mut conn: Option<Conn> = None;
    for i in 0..fetches {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::connect(Some(ip), metadata).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    out.note(format!("connect from {ip}: {e}"));
                    continue;
                }
            },
        };
        let started = Instant::now();
        let result = tokio::time::timeout(FETCH_TIMEOUT, c.request(request)).await;
        let took = started.elapsed();
        let broken = match result {
            Err(_) => {
                out.note(format!("GET {PATH} from {ip} (fetch {}): timed out", i + 1));
                true
            }
            Ok(Err(e)) => {
                out.note(format!("GET {PATH} from {ip} (fetch {}): {e}", i + 1));
                true
            }
            Ok(Ok(r)) if r.status == 200 && contains(r.body, b"\"bench\"") => {
                let ns = took.as_nanos().min(u64::MAX as u128) as u64;
                if i == 0 {
                    out.miss.saturating_record(ns);
                } else {
                    out.hit.saturating_record(ns);
                }
                false
            }
            Ok(Ok(r)) => {
                out.note(format!(
                    "GET {PATH} from {ip} (fetch {}): status {}, expected 200 with \"bench\": {}",
                    i + 1,
                    r.status,
                    String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
                ));
                false
            }
        };
        if broken || conn.as_ref().is_some_and(Conn::closed) {
            conn = None;
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// cradle's vendordata counters for TARGET, from `/metrics` on the admin
/// API: (upstream calls, cache hits, cache misses, failures).
async fn cradle_counters(admin: SocketAddr, token: &str) -> Result<[u64; 4]> {
    let api = cradle_client::Client::new(
        cradle_client::Target::new(&format!("http://{admin}"), token).no_proxy(),
    )?;
    let text = api
        .send(cradle_client::route::metrics())
        .await
        .context("GET /metrics")?;
    let names = ["upstream_calls", "cache_hits", "cache_misses", "failures"];
    let mut out = [0u64; 4];
    for (slot, name) in out.iter_mut().zip(names) {
        *slot = counter(&text, &format!("cradle_vendordata_{name}_total"), TARGET).with_context(
            || format!("/metrics has no cradle_vendordata_{name}_total{{target=\"{TARGET}\"}}"),
        )?;
    }
    Ok(out)
}

/// The value of `metric{...target="<target>"...}` in Prometheus text.
fn counter(text: &str, metric: &str, target: &str) -> Option<u64> {
    let label = format!("target=\"{target}\"");
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(metric)?.strip_prefix('{')?;
        let (labels, value) = rest.split_once('}')?;
        if !labels.split(',').any(|l| l.trim() == label) {
            return None;
        }
        let v: f64 = value.split_whitespace().next()?.parse().ok()?;
        Some(v as u64)
    })
}

struct Row {
    upstream: f64,
    metrics_upstream: f64,
    hits: f64,
    misses: f64,
    peak: f64,
    miss_p50: f64,
    miss_p99: f64,
    hit_p50: f64,
    hit_p99: f64,
    hit_max: f64,
    seconds: f64,
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1e6
}

fn print_header() {
    println!(
        "{:<7} {:>8} {:>8} {:>7} {:>7} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "run",
        "upstream",
        "metrics",
        "hits",
        "misses",
        "peak",
        "miss p50",
        "miss p99",
        "hit p50",
        "hit p99",
        "hit max",
        "total s"
    );
}

fn print_row(label: &str, r: &Row) {
    println!(
        "{:<7} {:>8} {:>8} {:>7} {:>7} {:>5} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>8.2}",
        label,
        r.upstream.round() as u64,
        r.metrics_upstream.round() as u64,
        r.hits.round() as u64,
        r.misses.round() as u64,
        r.peak.round() as u64,
        r.miss_p50,
        r.miss_p99,
        r.hit_p50,
        r.hit_p99,
        r.hit_max,
        r.seconds
    );
}

/// One run: a fresh target and cradle, registration, then the fetches.
fn one_run(
    o: &Options,
    bin: &std::path::Path,
    rt: &tokio::runtime::Runtime,
    run: usize,
) -> Result<Row> {
    let target = SlowTarget::start().context("cannot start the slow target")?;
    let tmp = tempfile::Builder::new()
        .prefix("cradle-bench-vendordata-")
        .tempdir()?;
    let config_path = tmp.path().join("cradle.toml");
    std::fs::write(&config_path, config(target.addr))?;
    let mut cradle = bench::start_cradle(
        bin,
        &tmp.path().join("data"),
        &tmp.path().join("cradle.log"),
        Some(&config_path),
    )?;
    println!(
        "    target http://{}/ ({} ms); cradle pid {}, admin http://{}, metadata http://{}",
        target.addr,
        TARGET_DELAY.as_millis(),
        cradle.proc.pid(),
        cradle.admin,
        cradle.metadata
    );
    let took = rt.block_on(bench::register(cradle.admin, &cradle.token, o.instances))?;
    println!(
        "    registered {} instances in {:.1} s ({REGISTER_CONNECTIONS} connections)",
        o.instances,
        took.as_secs_f64()
    );
    cradle.check_alive()?;
    if target.stats.calls.load(Ordering::Relaxed) != 0 {
        bail!("run {run}: the target was called before any guest asked");
    }

    let started = Instant::now();
    let fetched = rt.block_on(fetch_all(
        cradle.metadata,
        o.instances,
        o.fetches,
        o.concurrency,
    ))?;
    let seconds = started.elapsed().as_secs_f64();
    cradle.check_alive()?;
    if fetched.errors > 0 {
        bail!(
            "run {run}: {} of {} fetches failed; the first: {}",
            fetched.errors,
            o.instances * o.fetches,
            fetched.first_error.unwrap_or_default()
        );
    }
    let [calls, hits, misses, failures] =
        rt.block_on(cradle_counters(cradle.admin, &cradle.token))?;
    let upstream = target.stats.calls.load(Ordering::Relaxed);
    let rejected = target.stats.rejected.load(Ordering::Relaxed);
    let peak = target.stats.peak_in_flight.load(Ordering::Relaxed);
    cradle.proc.stop();
    drop(target);

    if calls != upstream {
        println!(
            "    warning: the target counted {upstream} calls, cradle's /metrics says {calls}"
        );
    }
    if failures > 0 || rejected > 0 {
        println!(
            "    warning: cradle counted {failures} vendordata failures; the target refused {rejected} requests"
        );
    }
    let fetches = (o.instances * o.fetches) as u64;
    if hits + misses != fetches {
        println!(
            "    note: cradle counted {hits} hits + {misses} misses, the guests made {fetches} fetches"
        );
    }
    Ok(Row {
        upstream: upstream as f64,
        metrics_upstream: calls as f64,
        hits: hits as f64,
        misses: misses as f64,
        peak: peak as f64,
        miss_p50: ms(&fetched.miss, 0.50),
        miss_p99: ms(&fetched.miss, 0.99),
        hit_p50: ms(&fetched.hit, 0.50),
        hit_p99: ms(&fetched.hit, 0.99),
        hit_max: fetched.hit.max() as f64 / 1e6,
        seconds,
    })
}

pub fn run(o: Options) -> Result<()> {
    let bin = bench::build_cradle()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!(
            "    load average before the runs: {} ({} CPUs)",
            l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
    }
    let mut rows = Vec::new();
    for run in 1..=o.runs {
        println!(
            "==> run {run}/{}: {} instances x {} fetches, {} instances at a time",
            o.runs, o.instances, o.fetches, o.concurrency
        );
        let r = one_run(&o, &bin, &rt, run)?;
        print_header();
        print_row(&format!("{run}"), &r);
        rows.push(r);
    }

    let of = |f: fn(&Row) -> f64| median(rows.iter().map(f).collect());
    let m = Row {
        upstream: of(|r| r.upstream),
        metrics_upstream: of(|r| r.metrics_upstream),
        hits: of(|r| r.hits),
        misses: of(|r| r.misses),
        peak: of(|r| r.peak),
        miss_p50: of(|r| r.miss_p50),
        miss_p99: of(|r| r.miss_p99),
        hit_p50: of(|r| r.hit_p50),
        hit_p99: of(|r| r.hit_p99),
        hit_max: of(|r| r.hit_max),
        seconds: of(|r| r.seconds),
    };
    println!();
    println!(
        "==> results: {} instances x {} fetches of {PATH}, target {} ms, {} instances at a time, {} run(s){}",
        o.instances,
        o.fetches,
        TARGET_DELAY.as_millis(),
        o.concurrency,
        o.runs,
        if o.runs > 1 { " (medians)" } else { "" }
    );
    println!(
        "    upstream: POSTs the target received; metrics: cradle_vendordata_upstream_calls_total;"
    );
    println!("    hits/misses: cradle's cache counters; peak: most calls the target held at once;");
    println!(
        "    miss: each instance's first fetch; hit: fetches 2..{} (ms, connecting excluded)",
        o.fetches
    );
    print_header();
    print_row(if o.runs > 1 { "median" } else { "1" }, &m);

    println!();
    println!("targets (from the issue; reported, not enforced):");
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let worst_calls = rows.iter().map(|r| r.upstream).fold(0.0, f64::max);
    println!(
        "  upstream calls <= {} (one per instance): {} (most in a run: {}) -> {}",
        o.instances,
        m.upstream.round() as u64,
        worst_calls.round() as u64,
        met(worst_calls <= o.instances as f64)
    );
    if o.fetches > 1 {
        println!(
            "  hit p99 < {HIT_P99_TARGET_MS} ms: {:.3} ms -> {}",
            m.hit_p99,
            met(m.hit_p99 < HIT_P99_TARGET_MS)
        );
    } else {
        println!("  hit p99 < {HIT_P99_TARGET_MS} ms: not measured (--fetches 1 makes no hits)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options() {
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = Options::parse(&[]).unwrap();
        assert_eq!(
            (o.instances, o.fetches, o.runs, o.concurrency),
            (1000, 10, 1, 128)
        );
        let o =
            Options::parse(&args("--runs 3 --instances 10 --fetches 2 --concurrency 4")).unwrap();
        assert_eq!(
            (o.instances, o.fetches, o.runs, o.concurrency),
            (10, 2, 3, 4)
        );
        assert!(Options::parse(&args("--fetches 0")).is_err());
        assert!(Options::parse(&args("--runs")).is_err());
        assert!(Options::parse(&args("--bogus 1")).is_err());
    }

    #[test]
    fn reads_counters() {
        let text = "# TYPE cradle_vendordata_upstream_calls counter\n\
            cradle_vendordata_upstream_calls_total{target=\"other\"} 7\n\
            cradle_vendordata_upstream_calls_total{target=\"slow\"} 1000\n\
            cradle_vendordata_cache_hits_total{target=\"slow\"} 9000\n";
        let calls = "cradle_vendordata_upstream_calls_total";
        assert_eq!(counter(text, calls, "slow"), Some(1000));
        assert_eq!(counter(text, calls, "other"), Some(7));
        assert_eq!(counter(text, calls, "none"), None);
        assert_eq!(
            counter(text, "cradle_vendordata_cache_hits_total", "slow"),
            Some(9000)
        );
    }

    #[test]
    fn target_counts_and_answers() {
        let target = SlowTarget::start().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = Conn::connect(None, target.addr).await.unwrap();
            let body = r#"{"instance-id": "x"}"#;
            let req = format!(
                "POST / HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            );
            for _ in 0..2 {
                let started = Instant::now();
                let r = c.request(req.as_bytes()).await.unwrap();
                assert_eq!(r.status, 200);
                assert_eq!(r.body, TARGET_BODY.as_bytes());
                assert!(started.elapsed() >= TARGET_DELAY);
                assert!(!c.closed());
            }
            let mut c = Conn::connect(None, target.addr).await.unwrap();
            let r = c.request(&http::get("t", "/")).await.unwrap();
            assert_eq!(r.status, 405);
        });
        assert_eq!(target.stats.calls.load(Ordering::Relaxed), 2);
        assert_eq!(target.stats.rejected.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn config_names_the_target() {
        let c = config(SocketAddr::from(([127, 0, 0, 1], 4321)));
        assert!(c.contains("name = \"slow\""));
        assert!(c.contains("url = \"http://127.0.0.1:4321/\""));
    }
}
