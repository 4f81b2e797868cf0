//! The README's first command, run as a newcomer runs it: the first line
//! of the "Set up" block is read out of README.md (so the check and the
//! README cannot drift), split into words (no shell) and started from the
//! root of the checkout. Then the demo guest must answer: its OpenStack
//! metadata as 127.0.0.2, a 404 to any other source address. Then the
//! `curl` lines of the tour's first block run as written (split as a shell
//! would, with shlex, then run without one), and each must print the
//! document it names. Then the server is stopped. A README whose first
//! command or tour fails makes CI fail.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cradle_client::announce::{Announced, Listening};

use crate::http::{self, Conn};
use crate::repo_root;

/// The address the demo guest's requests come from (`serve --demo`).
const DEMO_GUEST: &str = "127.0.0.2";
/// How long the first command may take to print its addresses: it builds
/// the release binary first.
const START_WITHIN: Duration = Duration::from_secs(1800);

/// The first command of the README's "Set up" block, as its words.
pub fn first_command(readme: &str) -> Result<Vec<String>> {
    let mut lines = readme.lines().skip_while(|l| l.trim() != "## Set up");
    if lines.next().is_none() {
        bail!("README.md has no \"## Set up\" section");
    }
    let mut lines = lines.skip_while(|l| !l.trim_start().starts_with("```"));
    if lines.next().is_none() {
        bail!("README.md's Set up section has no code block");
    }
    let line = lines
        .map(str::trim)
        .find(|l| !l.is_empty())
        .filter(|l| !l.starts_with("```"))
        .context("README.md's Set up code block is empty")?;
    let command = line.split(" #").next().unwrap_or(line);
    if command.contains(['"', '\'', '$', '`', '|', '&', ';', '<', '>', '\\']) {
        bail!(
            "README.md's first command {command:?} needs a shell; \
             the check runs it as plain words"
        );
    }
    Ok(command.split_whitespace().map(str::to_string).collect())
}

/// The `curl` commands of the first code block of "A short tour", as the
/// words a shell would make of them.
pub fn tour_commands(readme: &str) -> Result<Vec<Vec<String>>> {
    let mut lines = readme.lines().skip_while(|l| l.trim() != "## A short tour");
    if lines.next().is_none() {
        bail!("README.md has no \"## A short tour\" section");
    }
    let block = lines
        .skip_while(|l| !l.trim_start().starts_with("```"))
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with("```"));
    let mut out = Vec::new();
    for line in block.map(str::trim).filter(|l| l.starts_with("curl ")) {
        if line.contains(['$', '`', '|', '&', ';', '<', '>', '\\']) {
            bail!("the tour's command {line:?} needs more of a shell than quoting");
        }
        out.push(shlex::split(line).with_context(|| format!("cannot split {line:?}"))?);
    }
    if out.is_empty() {
        bail!("README.md's tour has no curl command in its first code block");
    }
    Ok(out)
}

/// Run one tour command against the demo; it must print a document: JSON
/// for a `.json` URL, a listing otherwise, never an error status line.
fn run_tour_command(words: &[String]) -> Result<()> {
    let shown = shlex::try_join(words.iter().map(String::as_str)).unwrap_or(words.join(" "));
    let out = Command::new(&words[0])
        .args(&words[1..])
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    let body = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "the README's `{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let status_line = body.len() > 4
        && body.as_bytes()[..3].iter().all(u8::is_ascii_digit)
        && body.as_bytes()[3] == b' ';
    let is_json = words.last().is_some_and(|u| u.ends_with(".json"));
    if body.trim().is_empty()
        || status_line
        || (is_json && serde_json::from_str::<serde_json::Value>(&body).is_err())
    {
        bail!("the README's `{shown}` printed no document: {body:?}");
    }
    println!("    {shown}: {} bytes", body.len());
    Ok(())
}

/// A process group killed (SIGTERM, then SIGKILL) when dropped.
struct Started(Child);

impl Started {
    fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(s) = self.0.try_wait()? {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        bail!("the first command did not stop within 20 s of SIGTERM");
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.stop();
        }
    }
}

/// Run the README's first command and check the demo guest.
pub fn check() -> Result<()> {
    let root = repo_root();
    let readme =
        std::fs::read_to_string(root.join("README.md")).context("cannot read README.md")?;
    let words = first_command(&readme)?;
    println!(
        "==> the README's first command, as written: {}",
        words.join(" ")
    );
    let mut cmd = Command::new(&words[0]);
    cmd.args(&words[1..])
        .current_dir(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0);
    let mut child = Started(
        cmd.spawn()
            .with_context(|| format!("cannot run {}", words[0]))?,
    );
    let stdout = child.0.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            println!("    | {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let listening = wait_for_demo(&rx, &mut child)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(ask_as_guests(listening.metadata))?;
    for words in tour_commands(&readme)? {
        run_tour_command(&words)?;
    }
    let status = child.stop()?;
    println!("    stopped ({status})");
    Ok(())
}

/// Until the server has announced both addresses and the demo guest.
fn wait_for_demo(rx: &mpsc::Receiver<String>, child: &mut Started) -> Result<Listening> {
    let deadline = Instant::now() + START_WITHIN;
    let mut seen = Announced::default();
    let mut listening = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {
                if let Some(status) = child.0.try_wait()? {
                    bail!("the README's first command exited ({status}) before serving");
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("the README's first command did not serve the demo guest in time")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.0.wait()?;
                bail!("the README's first command exited ({status}) before serving");
            }
        };
        if let Some(l) = seen.feed(&line) {
            listening = Some(l);
        }
        if line.starts_with("demo instance ") {
            return listening.context("the demo was announced before the listeners");
        }
    }
}

/// The demo guest reads its metadata; any other source gets 404.
async fn ask_as_guests(metadata: SocketAddr) -> Result<()> {
    let path = "/openstack/latest/meta_data.json";
    let host = metadata.to_string();
    let guest: IpAddr = DEMO_GUEST.parse()?;
    let mut conn = Conn::connect(Some(guest), metadata)
        .await
        .with_context(|| format!("cannot connect to {metadata} from {guest}"))?;
    let r = conn.request(&http::get(&host, path)).await?;
    let doc: serde_json::Value = serde_json::from_slice(r.body).with_context(|| {
        format!(
            "{path} as {guest} is not JSON: {}",
            String::from_utf8_lossy(r.body)
        )
    })?;
    if r.status != 200 || doc["name"] != "demo" {
        bail!("{path} as {guest}: HTTP {} {doc}", r.status);
    }
    println!("    {path} as {guest}: 200, name {}", doc["name"]);
    let other: IpAddr = "127.0.0.1".parse()?;
    let mut conn = Conn::connect(Some(other), metadata).await?;
    let r = conn.request(&http::get(&host, path)).await?;
    if r.status != 404 {
        bail!(
            "{path} as {other}, which is no instance, answered HTTP {} instead of 404",
            r.status
        );
    }
    println!("    {path} as {other}: 404");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_set_up_line_is_the_command() {
        let readme = "# x\n\n## Set up\n\n```sh\ncargo run --release -- serve --demo   # run it\ncargo xtask ci\n```\n";
        assert_eq!(
            first_command(readme).unwrap(),
            ["cargo", "run", "--release", "--", "serve", "--demo"]
        );
        assert!(first_command("## Set up\n```\nFOO=$(x) run\n```\n").is_err());
        assert!(first_command("no such section").is_err());
        // The real README's.
        let real = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
        assert_eq!(first_command(&real).unwrap()[..2], ["cargo", "run"]);
    }

    #[test]
    fn the_tour_curls_are_split_as_a_shell_would() {
        let readme = "## A short tour\n\ntext\n\n```sh\ncurl -H 'A: b' http://x/y.json\nother\n```\n\n```sh\ncurl http://later\n```\n";
        assert_eq!(
            tour_commands(readme).unwrap(),
            [vec!["curl", "-H", "A: b", "http://x/y.json"]]
        );
        assert!(tour_commands("## A short tour\n```\ncurl $(x)\n```\n").is_err());
        let real = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
        let tour = tour_commands(&real).unwrap();
        assert!(
            tour.iter()
                .any(|w| w.iter().any(|a| a == "Metadata-Flavor: cradle"))
        );
    }
}
