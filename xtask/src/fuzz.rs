//! `cargo xtask fuzz [--minutes N] [--target NAME]`: the property tests
//! that `cargo test` runs a few cases of (the `fuzz::` tests of each
//! crate's fuzz test binary), run round-robin in batches with a fresh
//! proptest seed each, until the time is up. Each batch is one run of the
//! test binary with `CRADLE_FUZZ_CASES` (cases per property) and
//! `PROPTEST_RNG_SEED`, so a failure can be run again exactly; proptest
//! shrinks it and saves it under the crate's tests/ (a
//! `fuzz.proptest-regressions` file, to be committed with the fix).
//!
//! Not to be confused with `fuzz-api` (schemathesis against the admin API).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cargo, flags, repo_root};

/// What a target's properties live in.
enum Binary {
    /// An integration test, `tests/fuzz.rs`.
    Test,
    /// The unit tests of a binary crate (its `fuzz` module).
    Bin(&'static str),
}

struct Target {
    name: &'static str,
    /// The test binaries, by package.
    binaries: &'static [(&'static str, Binary)],
    /// Cases per property in one batch: about ten seconds' worth.
    batch: u32,
    what: &'static str,
    /// The programs its properties run, and the Debian package of each:
    /// checked first, so that a missing one is not taken for a finding
    /// (and saved as a regression case).
    tools: &'static [(&'static str, &'static str)],
}

const TARGETS: &[Target] = &[
    Target {
        name: "metadata",
        binaries: &[("cradle-metadata", Binary::Test)],
        batch: 3000,
        what: "the metadata listener under random requests from 127/8",
        tools: &[],
    },
    Target {
        name: "personalize",
        binaries: &[("cradle-personalize", Binary::Test)],
        batch: 500,
        what: "personalization packages, verified and overlaid",
        tools: &[],
    },
    Target {
        name: "iso9660",
        binaries: &[("cradle-iso9660", Binary::Test)],
        batch: 200,
        what: "random trees read back by isoinfo and xorriso",
        tools: &[("isoinfo", "genisoimage"), ("xorriso", "xorriso")],
    },
    Target {
        name: "vfat",
        binaries: &[("cradle-drive", Binary::Test)],
        batch: 30,
        what: "random trees through fsck.vfat and mcopy",
        tools: &[("fsck.vfat", "dosfstools"), ("mcopy", "mtools")],
    },
    Target {
        name: "secgroups",
        binaries: &[("cradle-secgroups", Binary::Test)],
        batch: 500,
        what: "rule bodies: a 400 naming a field, or rules nft -c accepts",
        tools: &[("nft", "nftables")],
    },
    Target {
        name: "config",
        binaries: &[("cradle-config", Binary::Test)],
        batch: 2000,
        what: "config files and CRADLE_* variables through Config::load",
        tools: &[],
    },
    Target {
        name: "agent",
        binaries: &[
            ("cradle-model", Binary::Test),
            ("cradle-agent", Binary::Bin("cradle-agent")),
        ],
        batch: 1000,
        what: "channel messages, parsed by the host and by both agents",
        tools: &[],
    },
];

pub struct Options {
    minutes: u64,
    target: Option<String>,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            minutes: 10,
            target: None,
        };
        for (flag, value) in flags::pairs(args)? {
            match flag {
                "--minutes" => o.minutes = flags::number(flag, value, 1)? as u64,
                "--target" => {
                    if !TARGETS.iter().any(|t| t.name == value) {
                        bail!(
                            "--target: unknown target {value:?}; the targets are {}",
                            names()
                        );
                    }
                    o.target = Some(value.to_string());
                }
                other => bail!("unknown option {other} (see `cargo xtask --help`)"),
            }
        }
        Ok(o)
    }
}

fn names() -> String {
    TARGETS
        .iter()
        .map(|t| t.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A built test binary and how many properties it runs.
struct Built {
    package: &'static str,
    exe: PathBuf,
    properties: u64,
}

#[derive(Default)]
struct Tally {
    batches: u64,
    cases: u64,
    failure: Option<String>,
}

pub fn run(o: &Options) -> Result<()> {
    let targets: Vec<&Target> = TARGETS
        .iter()
        .filter(|t| o.target.as_deref().is_none_or(|n| n == t.name))
        .collect();
    for t in &targets {
        for (program, package) in t.tools {
            if !on_path(program) {
                bail!(
                    "{}: {program} is not installed: apt-get install {package}",
                    t.name
                );
            }
        }
    }
    println!("==> building the fuzz test binaries");
    let mut built: Vec<Vec<Built>> = Vec::new();
    for t in &targets {
        let mut bins = Vec::new();
        for (package, binary) in t.binaries {
            let exe = build(package, binary)?;
            let properties = count_properties(&exe)?;
            if properties == 0 {
                bail!("{}: no fuzz:: tests in {}", t.name, exe.display());
            }
            bins.push(Built {
                package,
                exe,
                properties,
            });
        }
        built.push(bins);
    }

    let deadline = Instant::now() + Duration::from_secs(o.minutes * 60);
    println!(
        "==> fuzzing {} for {} minute(s), round-robin, a fresh seed per batch",
        targets
            .iter()
            .map(|t| t.name)
            .collect::<Vec<_>>()
            .join(", "),
        o.minutes
    );
    let mut tallies: Vec<Tally> = targets.iter().map(|_| Tally::default()).collect();
    let random = RandomState::new();
    let mut round = 0u64;
    'rounds: while Instant::now() < deadline {
        let mut ran = false;
        for (i, t) in targets.iter().enumerate() {
            if Instant::now() >= deadline {
                break 'rounds;
            }
            if tallies[i].failure.is_some() {
                continue;
            }
            ran = true;
            let seed = random.hash_one((round, i));
            for b in &built[i] {
                match batch(b, t.batch, seed)? {
                    Ok(()) => tallies[i].cases += u64::from(t.batch) * b.properties,
                    Err(output) => {
                        let failure = format!(
                            "{} ({}), PROPTEST_RNG_SEED={seed} CRADLE_FUZZ_CASES={}:\n{output}",
                            t.name, b.package, t.batch
                        );
                        println!("==> FAILED: {failure}");
                        tallies[i].failure = Some(failure);
                        break;
                    }
                }
            }
            tallies[i].batches += 1;
            println!(
                "    {:<12} batch {:>3}: {} cases so far",
                t.name, tallies[i].batches, tallies[i].cases
            );
        }
        if !ran {
            break;
        }
        round += 1;
    }

    println!(
        "\n{:<12} {:>8} {:>10}  result",
        "target", "batches", "cases"
    );
    for (t, tally) in targets.iter().zip(&tallies) {
        let result = match tally.failure {
            Some(_) => "FAILED (see above)",
            None => "ok",
        };
        println!(
            "{:<12} {:>8} {:>10}  {result}  ({})",
            t.name, tally.batches, tally.cases, t.what
        );
    }
    let failed: Vec<&str> = targets
        .iter()
        .zip(&tallies)
        .filter(|(_, t)| t.failure.is_some())
        .map(|(t, _)| t.name)
        .collect();
    if !failed.is_empty() {
        bail!(
            "fuzzing found failures in {}; proptest saved each under the crate's tests/ \
             (fuzz.proptest-regressions): fix the code and commit the file",
            failed.join(", ")
        );
    }
    Ok(())
}

/// Whether `program` is in a directory of `PATH`, where the tests look
/// for it.
fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(program).is_file())
}

/// Build a test binary with cargo and return its path.
fn build(package: &str, binary: &Binary) -> Result<PathBuf> {
    let mut args = vec!["test", "--no-run", "--message-format=json", "-p", package];
    let name = match binary {
        Binary::Test => {
            args.extend(["--test", "fuzz"]);
            "fuzz"
        }
        Binary::Bin(bin) => {
            args.extend(["--bin", bin]);
            bin
        }
    };
    let out = Command::new(cargo())
        .args(&args)
        .current_dir(repo_root())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run cargo {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("`cargo {}` failed ({})", args.join(" "), out.status);
    }
    // One JSON message per line; the test artifact names the executable.
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact"
            && v["profile"]["test"] == true
            && v["target"]["name"] == name
            && let Some(exe) = v["executable"].as_str()
        {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("cargo {} named no test executable", args.join(" "))
}

/// The `fuzz::` tests a binary lists.
fn count_properties(exe: &PathBuf) -> Result<u64> {
    let out = Command::new(exe)
        .args(["--list", "fuzz::"])
        .output()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("fuzz::") && l.ends_with(": test"))
        .count() as u64)
}

/// One batch: the binary's `fuzz::` tests with `cases` cases each and
/// `seed`. `Err` holds the output of a failed batch.
fn batch(b: &Built, cases: u32, seed: u64) -> Result<Result<(), String>> {
    let dir = repo_root().join("crates").join(b.package);
    let out = Command::new(&b.exe)
        .arg("fuzz::")
        // As `cargo test` runs it: proptest saves failures beside the
        // test's source, found from here.
        .current_dir(&dir)
        .env("CARGO_MANIFEST_DIR", &dir)
        .env("CRADLE_FUZZ_CASES", cases.to_string())
        .env("PROPTEST_RNG_SEED", seed.to_string())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", b.exe.display()))?;
    if out.status.success() {
        return Ok(Ok(()));
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The failures and proptest's minimal input, not every passing line.
    let wanted: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("test ") || l.contains("FAILED"))
        .filter(|l| !l.trim_start().starts_with("at /rustc/"))
        .collect();
    Ok(Err(wanted.join("\n")))
}
