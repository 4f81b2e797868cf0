//! The load generator: closed-loop keep-alive connections, each from the
//! source address of one registered guest, for a warm-up and then a measured
//! window.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use tokio::task::JoinSet;

use crate::http::Conn;
use crate::procs;

/// One request a guest makes, and the body length its reply must have.
pub struct Probe {
    pub path: String,
    pub request: Vec<u8>,
    pub expect_len: usize,
}

/// A guest: the source address its connections come from, and what it asks.
pub struct Guest {
    pub ip: IpAddr,
    pub probes: Vec<Probe>,
}

pub struct Plan {
    pub target: SocketAddr,
    /// Connection `i` belongs to guest `i % guests.len()`.
    pub guests: Arc<Vec<Guest>>,
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// The server process; its CPU time (with its children's) is sampled
    /// over the measured window.
    pub server_pid: u32,
}

pub struct Outcome {
    /// Requests answered correctly within the measured window.
    pub requests: u64,
    /// Failed requests during warm-up and the measured window: I/O errors,
    /// timeouts, a status other than 200 or a body of the wrong length.
    pub errors: u64,
    pub first_error: Option<String>,
    /// Latency in nanoseconds of the requests counted in `requests`.
    pub latency: Histogram<u64>,
    pub seconds: f64,
    /// CPU used during the measured window, in cores (1.0 = one core busy).
    pub server_cores: f64,
    pub client_cores: f64,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1e6
    }
}

struct WorkerOut {
    requests: u64,
    errors: u64,
    first_error: Option<String>,
    latency: Histogram<u32>,
}

pub(crate) fn histogram<T: hdrhistogram::Counter>() -> Histogram<T> {
    // 1 µs resolution, up to a minute, 3 significant figures.
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid histogram bounds")
}

pub async fn run(plan: &Plan) -> Result<Outcome> {
    let guests = &plan.guests;
    if guests.is_empty() || guests.iter().any(|g| g.probes.is_empty()) {
        bail!("the load needs guests with at least one request each");
    }
    // Open every connection before the clock starts.
    let mut connecting = JoinSet::new();
    for i in 0..plan.connections {
        let ip = guests[i % guests.len()].ip;
        let target = plan.target;
        connecting.spawn(async move { (i, Conn::connect(Some(ip), target).await) });
    }
    let mut conns: Vec<Option<Conn>> = (0..plan.connections).map(|_| None).collect();
    let mut failed = Vec::new();
    while let Some(r) = connecting.join_next().await {
        let (i, c) = r?;
        match c {
            Ok(c) => conns[i] = Some(c),
            Err(e) => failed.push(format!("{}: {e}", guests[i % guests.len()].ip)),
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} connections to {} failed, e.g. {}",
            failed.len(),
            plan.connections,
            plan.target,
            failed[0]
        );
    }

    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let end = measure_from + plan.duration;
    let mut workers = JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let guests = plan.guests.clone();
        let target = plan.target;
        workers.spawn(worker(guests, i, conn, target, measure_from, end));
    }

    let ticks = procs::clock_ticks();
    tokio::time::sleep_until(measure_from.into()).await;
    let (server0, client0, t0) = (
        procs::cpu_ticks_with_children(plan.server_pid),
        procs::own_cpu_ticks(),
        Instant::now(),
    );
    tokio::time::sleep_until(end.into()).await;
    let (server1, client1, t1) = (
        procs::cpu_ticks_with_children(plan.server_pid),
        procs::own_cpu_ticks(),
        Instant::now(),
    );
    let window = (t1 - t0).as_secs_f64();

    let mut out = Outcome {
        requests: 0,
        errors: 0,
        first_error: None,
        latency: histogram(),
        seconds: plan.duration.as_secs_f64(),
        server_cores: server1.saturating_sub(server0) as f64 / ticks / window,
        client_cores: client1.saturating_sub(client0) as f64 / ticks / window,
    };
    while let Some(r) = workers.join_next().await {
        let w = r?;
        out.requests += w.requests;
        out.errors += w.errors;
        if out.first_error.is_none() {
            out.first_error = w.first_error;
        }
        for v in w.latency.iter_recorded() {
            out.latency
                .record_n(v.value_iterated_to(), u64::from(v.count_at_value()))?;
        }
    }
    Ok(out)
}

/// One connection's closed loop: send, wait for the whole reply, check it,
/// repeat, alternating between the guest's requests. A broken connection is
/// counted as an error and reopened from the same source address.
async fn worker(
    guests: Arc<Vec<Guest>>,
    index: usize,
    conn: Option<Conn>,
    target: SocketAddr,
    measure_from: Instant,
    end: Instant,
) -> WorkerOut {
    let guest = &guests[index % guests.len()];
    let mut out = WorkerOut {
        requests: 0,
        errors: 0,
        first_error: None,
        latency: histogram(),
    };
    // No request may outlive the run by more than this.
    let deadline = tokio::time::Instant::from_std(end + Duration::from_secs(5));
    let mut conn = conn;
    // Start half the connections on each request, so both are always mixed.
    let mut next = index;
    loop {
        let started = Instant::now();
        if started >= end {
            break;
        }
        let probe = &guest.probes[next % guest.probes.len()];
        next += 1;
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::connect(Some(guest.ip), target).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    note(&mut out, format!("reconnect from {}: {e}", guest.ip));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let result = match tokio::time::timeout_at(deadline, c.request(&probe.request)).await {
            Err(_) => Err((format!("GET {}: timed out", probe.path), true)),
            Ok(Err(e)) => Err((format!("GET {}: {e}", probe.path), true)),
            Ok(Ok(r))
                if r.status == 200 && !r.body.is_empty() && r.body.len() == probe.expect_len =>
            {
                Ok(())
            }
            Ok(Ok(r)) => Err((
                format!(
                    "GET {} from {}: status {} with {} bytes; expected 200 with {} bytes",
                    probe.path,
                    guest.ip,
                    r.status,
                    r.body.len(),
                    probe.expect_len
                ),
                false,
            )),
        };
        let finished = Instant::now();
        match result {
            Ok(()) => {
                if started >= measure_from && finished <= end {
                    out.requests += 1;
                    let ns = (finished - started).as_nanos().min(u64::MAX as u128) as u64;
                    out.latency.saturating_record(ns);
                }
            }
            Err((msg, broken)) => {
                note(&mut out, msg);
                if broken {
                    conn = None;
                    continue;
                }
            }
        }
        if conn.as_ref().is_some_and(Conn::closed) {
            conn = None;
        }
    }
    out
}

fn note(out: &mut WorkerOut, msg: String) {
    out.errors += 1;
    out.first_error.get_or_insert(msg);
}
