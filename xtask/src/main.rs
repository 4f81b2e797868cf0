//! Project tasks: `cargo xtask ci` (what `.ci/run` runs), `cargo xtask
//! agent` (the appliance's static agent), `cargo xtask readme` (the
//! README's first command, run and checked),
//! `cargo xtask fuzz` (the property tests' fuzz targets, for minutes),
//! `cargo xtask bench metadata` (the metadata-service benchmark against nginx),
//! `cargo xtask bench drive` (config drives against genisoimage),
//! `cargo xtask bench vendordata` (dynamic vendordata against a slow target),
//! `cargo xtask bench firewall` (security groups in nftables at scale),
//! `cargo xtask bench remote` (remotefs copies against bare scp and rsync)
//! `cargo xtask bench personalize` (packages onto ext4 images against
//! guestfish), `cargo xtask bench install` (install jobs against
//! guestfish's bare appliance launch) and `cargo xtask bench export` (a
//! disk exported and imported through the appliance against `qemu-img
//! convert`).

mod afterburn;
mod bench;
mod bench_agent;
mod bench_cluster;
mod bench_drive;
mod bench_export;
mod bench_firewall;
mod bench_firewall_api;
mod bench_install;
mod bench_personalize;
mod bench_remote;
mod bench_vendordata;
mod bench_wait;
mod ci;
mod debian;
mod dib;
mod flags;
mod fuzz;
mod fuzz_api;
mod guest_image;
mod http;
mod load;
mod openapi;
mod procs;
mod readme;
mod venv;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  ci                   install the Debian packages the tests need (as root), then
                       cargo fmt --check, cargo clippy -D warnings, the
                       README's first command (as `readme`), the static agent
                       (as `agent`), afterburn (as `afterburn`), the guest
                       tree (as `guest-image`), diskimage-builder (as
                       `dib`), cargo test,
                       schemathesis (as `fuzz-api --examples 10 --seed 1`)
  agent                build the install appliance's /init, cradle-agent, as a
                       static binary into target/release (beside cradle, where
                       `cradle appliance build` takes it from)
  afterburn            build afterburn (the Fedora CoreOS and Flatcar metadata
                       agent) from crates.io, once, into ~/.cache/cradle-ci,
                       for the test that runs it against cradle
  dib                  diskimage-builder (pinned, from PyPI, in a venv under
                       ~/.cache/cradle-ci) and debootstrap, for the
                       cradle-agent element's test
  guest-image          build a Debian root tree (systemd, Debian's kernel, no
                       sshd) with mmdebstrap, once, into ~/.cache/cradle-ci,
                       for the guest agent's boot test (as root); with
                       --cloud-init, the same with Debian's cloud-init (for
                       `bench agent`)
  openapi              write docs/openapi.json, the admin API's OpenAPI document,
                       from the code (a test fails while it differs)
  fuzz-api             schemathesis (from PyPI, in a venv under ~/.cache/cradle-ci)
                       against a live cradle serve, from docs/openapi.json: no
                       server errors, only declared statuses and content types,
                       answers that fit their schemas; options:
      --examples N           examples per operation and phase [100]
      --seed N               schemathesis' seed [random]
  fuzz                 the property tests `cargo test` runs a few cases of (each
                       crate's tests/fuzz.rs, and cradle-agent's fuzz module),
                       round-robin in batches with a fresh proptest seed each
                       (CRADLE_FUZZ_CASES, PROPTEST_RNG_SEED) until the time is
                       up; prints cases run per target and every failure, with
                       its seed; targets: metadata, personalize, iso9660,
                       vfat, secgroups, config, agent; options:
      --minutes N            how long to fuzz [10]
      --target NAME          only this target [all]
  readme               run the README's first command as written from the
                       repository root, read the demo guest's metadata as
                       127.0.0.2, check another source gets 404, stop it
  bench metadata       benchmark cradle's metadata service against nginx serving
                       the same bytes; options:
      --duration SECS        measured seconds per load phase [10]
      --warmup SECS          warm-up seconds before each load phase [2]
      --instances N          instances to register [10000]
      --runs N               repeat the load phases; report medians [1]
      --connections LIST     comma-separated connection counts [64,256]
      --client-threads N     load generator threads [2]
  bench drive          build config drives in-process (ISO 9660, and vfat) and
                       compare with genisoimage run as Nova runs it, one
                       process per drive, on the same trees; options:
      --drives N             ISO drives per tool and run [1000]
      --vfat-drives N        vfat drives (64 MiB each) per run; 0 skips [100]
      --runs N               repeat the measurements; report medians [1]
  bench vendordata     every instance fetches vendor_data2.json a few times
                       from its own address while cradle's dynamic vendordata
                       target takes 50 ms; counts the upstream calls and times
                       misses and cache hits, on a fresh cradle per run; options:
      --instances N          instances to register [1000]
      --fetches N            fetches per instance, one after another [10]
      --concurrency N        instances fetching at once [128]
      --runs N               repeat the measurements; report medians [1]
  bench firewall       security groups in nftables, in network namespaces of its
                       own (as root): N instances x 20 rules; times planning, a
                       full apply, one rule, membership and instance change with
                       all N loaded; then the layout before (cradle built at
                       dab89b7) and today's side by side through cradle serve,
                       each step timed by real packets; options:
      --instances LIST       comma-separated instance counts [1000,10000]
      --runs N               repeat the in-process measurements [3]
      --changes N            single changes timed per run; median [10]
      --api-runs N           runs of the side-by-side (0: skip it) [5]
  bench remote         copy a dense and a sparse file to a local sshd (as root)
                       with cradle-remotefs's ssh and rsync drivers, and with
                       the bare scp (SFTP and -O) and rsync command lines, in
                       turn; reports throughput, driver/bare ratios and the
                       space the copies allocate; options:
      --size-mib N           size of each file in MiB [1024]
      --runs N               repeat the copies; report medians [3]
  bench personalize    overlay a package (small files in 50 directories and one
                       big file, made here) onto a fresh copy of an ext4 image
                       with `cradle personalize apply` and with guestfish's
                       tar-in (installed if missing, as root), in turn; checks
                       both images, reports medians and guestfish/cradle, and
                       times `cradle personalize check` alone; options:
      --runs N               repeat the measurements; report medians [3]
      --files N              small files in the package [5000]
      --big-mib N            size of the big file in MiB [100]
      --image-mib N          size of the ext4 image in MiB [1024]
  bench cluster        three `cradle serve` hosts on one PostgreSQL server (made
                       here) beside one host on SQLite, with 10,000 instances:
                       start-up to the first guest answer, admin create and
                       modify throughput, guest reads per host, and how long a
                       change made through host A takes to be served by host
                       B (p50/p99); options:
      --instances N          instances registered [10000]
      --runs N               repeat start-ups and read loads; medians [3]
      --samples N            changes timed across hosts [300]
      --modifies N           modifies timed per setup [2000]
      --duration SECS        each guest read load [5]
      --connections N        guest connections of the read load [64]
  bench agent          boot a Debian image baked with the agent and a copy with
                       cloud-init (as root; run mode, KVM when it works):
                       agent ready vs cloud-init done, the agent's size and
                       resident memory; options:
      --runs N               boots of each; report medians [5]
  bench wait           10,000 guests on one host each waiting for a change of
                       its meta_data.json (?wait=true): RSS and idle CPU while
                       they wait, and wake-up latency p50/p99 (modify sent to
                       answer received) for changes to one instance at a time
                       and to 1,000 at once, beside the modify's own answer;
                       options:
      --guests N             waiting guests [10000]
      --runs N               report medians [3]
      --singles N            changes one at a time per run [200]
      --batch N              changes sent at once per run [1000]
      --idle S               seconds of nothing changing [5]
  bench install        install a 64 MiB ext4 image (an untrusted create that
                       mounts it and writes, then a package) through the
                       install appliance, as root, in a namespace made here,
                       with KVM when it works and with TCG; times the first
                       metadata request and the whole install beside
                       `guestfish -a /dev/null run`; options:
      --runs N               repeat the measurements; report medians [5]
  bench export         export a 1 GiB ext4 disk (3/4 random files) through the
                       appliance (untrusted scripts using dd) to a file and
                       import it into a fresh disk, as root, in a namespace
                       made here; MiB/s of each beside `qemu-img convert` of
                       the same disk in the same run, and the ratios; options:
      --runs N               report medians [3]
      --accel A              the appliance's accelerator: tcg, kvm, auto [tcg]
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") if args.len() == 1 => ci::run(),
        Some("agent") if args.len() == 1 => ci::build_static_agent(),
        Some("readme") if args.len() == 1 => readme::check(),
        Some("afterburn") if args.len() == 1 => afterburn::ensure().map(|_| ()),
        Some("dib") if args.len() == 1 => dib::ensure().map(|_| ()),
        Some("guest-image") if args.len() == 1 => guest_image::ensure(false).map(|_| ()),
        Some("guest-image") if args.len() == 2 && args[1] == "--cloud-init" => {
            guest_image::ensure(true).map(|_| ())
        }
        Some("openapi") if args.len() == 1 => openapi::write(),
        Some("fuzz") => fuzz::Options::parse(&args[1..]).and_then(|o| fuzz::run(&o)),
        Some("fuzz-api") => fuzz_api::Options::parse(&args[1..]).and_then(|o| fuzz_api::run(&o)),
        Some("bench") => match args.get(1).map(String::as_str) {
            Some("metadata") => bench::Options::parse(&args[2..]).and_then(|o| {
                if cfg!(debug_assertions) {
                    reexec_optimized(&args, "the load generator must be optimized")
                } else {
                    bench::run(o)
                }
            }),
            Some("drive") => bench_drive::Options::parse(&args[2..]).and_then(|o| {
                if cfg!(debug_assertions) {
                    reexec_optimized(&args, "cradle's drive builder is measured in-process")
                } else {
                    bench_drive::run(o)
                }
            }),
            Some("vendordata") => bench_vendordata::Options::parse(&args[2..]).and_then(|o| {
                if cfg!(debug_assertions) {
                    reexec_optimized(&args, "the guests' client must be optimized")
                } else {
                    bench_vendordata::run(o)
                }
            }),
            Some("firewall") => bench_firewall::Options::parse(&args[2..]).and_then(|o| {
                if cfg!(debug_assertions) {
                    reexec_optimized(&args, "the renderer is measured in-process")
                } else {
                    bench_firewall::run(o)
                }
            }),
            Some("remote") => bench_remote::Options::parse(&args[2..]).and_then(|o| {
                if cfg!(debug_assertions) {
                    reexec_optimized(&args, "the drivers are measured in-process")
                } else {
                    bench_remote::run(o)
                }
            }),
            Some("cluster") => bench_cluster::Options::parse(&args[2..]).and_then(|o| {
                if cfg!(debug_assertions) {
                    reexec_optimized(&args, "the guests' client must be optimized")
                } else {
                    bench_cluster::run(o)
                }
            }),
            Some("export") => bench_export::Options::parse(&args[2..]).and_then(bench_export::run),
            Some("wait") => bench_wait::Options::parse(&args[2..]).and_then(|o| {
                if cfg!(debug_assertions) {
                    reexec_optimized(&args, "the guests' client must be optimized")
                } else {
                    bench_wait::run(o)
                }
            }),
            Some("agent") => bench_agent::Options::parse(&args[2..]).and_then(bench_agent::run),
            Some("install") => {
                bench_install::Options::parse(&args[2..]).and_then(bench_install::run)
            }
            Some("personalize") => bench_personalize::Options::parse(&args[2..]).and_then(|o| {
                if cfg!(debug_assertions) {
                    reexec_optimized(&args, "the package is made and checked in-process")
                } else {
                    bench_personalize::run(o)
                }
            }),
            _ => Err(anyhow::anyhow!(
                "unknown benchmark; expected `bench metadata`, `bench drive`, \
                 `bench vendordata`, `bench firewall`, `bench remote` or \
                 `bench personalize`, `bench install`, `bench cluster`, `bench wait`\n\n{USAGE}"
            )),
        },
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => Err(anyhow::anyhow!("unknown task {args:?}\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask` builds this crate unoptimized, and an unoptimized load
/// generator (tokio included) would measure itself rather than the servers,
/// as an unoptimized drive builder would measure the debug build: build the
/// release xtask and hand the benchmark over to it. The caller has checked
/// the options already, so a typo fails before the build.
fn reexec_optimized(args: &[String], why: &str) -> Result<()> {
    println!("==> cargo build --release -p xtask ({why})");
    run_cargo(
        &["build", "--release", "-p", "xtask"],
        "xtask does not build",
    )?;
    let bin = target_dir().join("release").join("xtask");
    let status = std::process::Command::new(&bin)
        .args(args)
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", bin.display()))?;
    if !status.success() {
        bail!("the benchmark failed ({status})");
    }
    Ok(())
}

/// Cargo's target directory.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| {
            if d.is_relative() {
                repo_root().join(d)
            } else {
                d
            }
        })
        .unwrap_or_else(|| repo_root().join("target"))
}

/// Where CI keeps the peers it builds (afterburn, the schemathesis venv),
/// outside every checkout: `$XDG_CACHE_HOME/cradle-ci`, else
/// `~/.cache/cradle-ci`. tests/it/afterburn.rs looks there too.
fn ci_cache_dir() -> Result<PathBuf> {
    let cache = match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(
            std::env::var_os("HOME").ok_or_else(|| anyhow::anyhow!("HOME is not set"))?,
        )
        .join(".cache"),
    };
    Ok(cache.join("cradle-ci"))
}

/// The workspace root: the parent of this crate's directory.
fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The cargo that runs us (`cargo xtask` sets CARGO), so nested builds use the
/// same toolchain.
fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Run `cargo <args>` in the workspace root with inherited output; fail with
/// `hint` when it exits non-zero.
fn run_cargo(args: &[&str], hint: &str) -> Result<()> {
    let status = std::process::Command::new(cargo())
        .args(args)
        .current_dir(repo_root())
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run cargo {}: {e}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status}): {hint}", args.join(" "));
    }
    Ok(())
}
