//! `cargo xtask fuzz-api`: schemathesis against a live `cradle serve`,
//! driven by docs/openapi.json.
//!
//! schemathesis comes from PyPI, pinned, in a venv under
//! `~/.cache/cradle-ci` made with Debian's python3 (and made again when it
//! no longer imports). The server runs from the debug build on loopback with
//! a fresh data directory and the firewall off; an instance, a spare one and
//! a shared group are registered first, and schemathesis is told their names
//! (`schemathesis.toml`), so that the routes under an instance or a group
//! are exercised beyond their 404s. It checks every operation for server
//! errors, status codes and content types the document does not declare,
//! and answers that do not fit their schema. CI runs a short pass with a
//! fixed seed (`cargo xtask ci`); run this for a longer, random one.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use cradle_client::{Target, route};
use cradle_model::api::InstanceSpec;
use cradle_secgroups::api::GroupRequest;

use crate::{flags, repo_root, target_dir};

/// The schemathesis release the run is written against.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";
/// The checks the issue asks for; `positive_data_acceptance` is left out
/// (the document does not spell out every rule, such as a name's length,
/// that the API enforces).
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance";

pub struct Options {
    examples: usize,
    seed: Option<String>,
}

impl Options {
    /// What `cargo xtask ci` runs.
    pub fn ci() -> Options {
        Options {
            examples: 10,
            seed: Some("1".into()),
        }
    }

    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            examples: 100,
            seed: None,
        };
        for (flag, value) in flags::pairs(args)? {
            match flag {
                "--examples" => o.examples = flags::number(flag, value, 1)?,
                "--seed" => o.seed = Some(value.to_string()),
                other => bail!("unknown option {other} (see `cargo xtask --help`)"),
            }
        }
        Ok(o)
    }
}

pub fn run(o: &Options) -> Result<()> {
    println!("==> schemathesis against cradle serve, from docs/openapi.json");
    let venv = venv()?;
    crate::run_cargo(
        &["build", "-p", "cradle"],
        "the cradle binary does not build",
    )?;
    let work = tempfile::Builder::new()
        .prefix("cradle-fuzz-api-")
        .tempdir()?;
    let bin = target_dir().join("debug/cradle");
    let mut cradle = crate::bench::start_cradle(
        &bin,
        &work.path().join("data"),
        &work.path().join("serve.log"),
        None,
    )?;
    let url = format!("http://{}", cradle.admin);
    let group = seed_fixtures(&url, &cradle.token)?;
    std::fs::write(work.path().join("schemathesis.toml"), config(&group))?;

    let mut cmd = Command::new(venv.join("bin/schemathesis"));
    cmd.arg("--config-file")
        .arg(work.path().join("schemathesis.toml"))
        .arg("run")
        .arg(repo_root().join("docs/openapi.json"))
        .args(["--url", &url])
        .args(["--checks", CHECKS])
        .args(["--max-examples", &o.examples.to_string()])
        // More than one worker trips a race inside hypothesis (its lambda
        // source cache), reported as a runtime error of the tool itself.
        .args(["--workers", "1"])
        .arg("--header")
        .arg(format!("Authorization: Bearer {}", cradle.token));
    if let Some(seed) = &o.seed {
        cmd.args(["--seed", seed]);
    }
    let status = cmd
        .current_dir(work.path())
        .env_remove("PYTHONPATH")
        .env("NO_PROXY", "*")
        .stdin(Stdio::null())
        .status()
        .context("cannot run schemathesis")?;
    cradle.check_alive()?;
    let log = std::fs::read_to_string(work.path().join("serve.log")).unwrap_or_default();
    if log.contains("panicked") {
        bail!("cradle serve panicked while schemathesis ran; its log:\n{log}");
    }
    if !status.success() {
        bail!("schemathesis found problems ({status}); see above");
    }
    Ok(())
}

/// Identifiers for the path parameters: the fixtures registered first
/// (`group` the shared group's id). Removals get the spare instance, so
/// the rest keep theirs.
fn config(group: &str) -> String {
    format!(
        r#"
[parameters]
"path.key" = "fuzz-web"
"path.tenant" = "fuzz"
"path.instance" = "fuzz-web"
"path.id" = "{group}"

[[operations]]
include-path = "/v1/instances/{{key}}"
include-method = "DELETE"
parameters = {{ "path.key" = "fuzz-spare" }}
"#
    )
}

/// Register the fixtures; the shared group's id.
fn seed_fixtures(url: &str, token: &str) -> Result<String> {
    let api = cradle_client::blocking::Client::new(Target::new(url, token.to_string()).no_proxy())?;
    for (name, address) in [("fuzz-web", "127.0.0.2"), ("fuzz-spare", "127.0.0.3")] {
        api.send(route::create_instance(&InstanceSpec {
            name: name.into(),
            project_id: Some("fuzz".into()),
            metadata_address: Some(address.into()),
            ..Default::default()
        }))
        .with_context(|| format!("cannot register {name}"))?;
    }
    let group = api
        .send(route::create_security_group(
            "fuzz",
            &GroupRequest {
                name: "fuzz-shared".into(),
                description: "for schemathesis".into(),
            },
        ))
        .context("cannot create the shared group")?;
    Ok(group.id.to_string())
}

/// The venv, made (again) when it does not run schemathesis.
fn venv() -> Result<PathBuf> {
    crate::venv::ensure(SCHEMATHESIS, "schemathesis", "--version")
}
