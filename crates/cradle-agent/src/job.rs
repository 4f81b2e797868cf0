//! The install job as the metadata service describes it, and the secret
//! parameters the script gets.
//!
//! `GET /cradle/latest/install.json`:
//!
//! ```json
//! {"job": "<uuid>", "operation": "create", "instance": "<name>",
//!  "env": {"OS_API_VERSION": "20", "DISK_0_PATH": "/dev/vda", ...},
//!  "scripts": ["create", "common.sh"],
//!  "run": "create",
//!  "personalization": {"path": "/cradle/latest/os/package", "disk": 0, "partition": 1}}
//! ```
//!
//! `run` and `personalization` may be `null` or absent; `env`, `scripts`,
//! `job`, `operation` and `instance` may be absent (empty). Unknown fields are ignored, so the host
//! can add some without breaking older agents. [`Job::check`] refuses what
//! the agent could not do safely: a script name that is not a plain file
//! name, a `run` that is not among the scripts, an environment variable
//! the kernel could not pass, a disk past `vdz`.
//!
//! `GET /cradle/latest/os/parameters.json` is `{name: [value, visibility]}`;
//! the `secret` ones go to the script as one JSON object on a pipe
//! ([`Secrets`]), never in its environment or argv, and never on the
//! console.
//!
//! Parse errors never quote the document: serde's messages can carry a
//! value, and values may be private or secret.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The job. Only `env`, `scripts`, `run` and `personalization` steer the
/// agent; `job`, `operation` and `instance` are said on the console, and
/// may be absent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Job {
    #[serde(default)]
    pub job: String,
    #[serde(default)]
    pub operation: String,
    #[serde(default)]
    pub instance: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub scripts: Vec<String>,
    #[serde(default)]
    pub run: Option<String>,
    #[serde(default)]
    pub personalization: Option<Personalization>,
    /// An export's or import's dump: where on the metadata service, and
    /// which way (`out`: the script's standard output is uploaded; `in`:
    /// it is the script's standard input).
    #[serde(default)]
    pub stream: Option<StreamSpec>,
}

/// Where an export's or import's dump goes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StreamSpec {
    pub path: String,
    pub direction: Direction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Out,
    In,
}

/// Where the personalization package is, and which disk it goes onto.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Personalization {
    /// A path on the metadata service, e.g. `/cradle/latest/os/package`.
    pub path: String,
    /// The disk's index: 0 is `/dev/vda`.
    pub disk: u32,
    /// The partition to mount, or the whole disk when absent.
    #[serde(default)]
    pub partition: Option<u32>,
}

impl Personalization {
    /// The block device to mount, e.g. `/dev/vda` or `/dev/vdb1`.
    pub fn device(&self) -> String {
        let letter = char::from(b'a' + self.disk as u8);
        match self.partition {
            Some(p) => format!("/dev/vd{letter}{p}"),
            None => format!("/dev/vd{letter}"),
        }
    }
}

/// Parse `install.json` and check it.
pub fn parse_job(body: &[u8]) -> Result<Job, String> {
    let job: Job = serde_json::from_slice(body).map_err(|e| json_error("install.json", &e))?;
    job.check()?;
    Ok(job)
}

impl Job {
    pub fn check(&self) -> Result<(), String> {
        for name in &self.scripts {
            check_script_name(name)?;
        }
        if let Some(run) = &self.run
            && !self.scripts.contains(run)
        {
            return Err(format!(
                "install.json: run {run:?} is not among its scripts {:?}",
                self.scripts
            ));
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.contains(['=', '\0']) {
                return Err(format!(
                    "install.json: {name:?} cannot be an environment variable's name"
                ));
            }
            if value.contains('\0') {
                return Err(format!(
                    "install.json: the value of {name} holds a NUL byte"
                ));
            }
        }
        if let Some(st) = &self.stream {
            if !st.path.starts_with('/') {
                return Err(format!(
                    "install.json: stream path {:?} is not a path on the metadata service",
                    st.path
                ));
            }
            if self.run.is_none() {
                return Err("install.json: a stream needs a script to run".into());
            }
        }
        if let Some(p) = &self.personalization {
            if !p.path.starts_with('/') {
                return Err(format!(
                    "install.json: personalization path {:?} is not a path on the metadata service",
                    p.path
                ));
            }
            if p.disk > 25 {
                return Err(format!(
                    "install.json: personalization disk {} is past /dev/vdz",
                    p.disk
                ));
            }
            if p.partition == Some(0) {
                return Err("install.json: partitions are numbered from 1".into());
            }
        }
        Ok(())
    }
}

/// A script is written to `/run/cradle/os/<name>` and fetched from
/// `/cradle/latest/os/scripts/<name>`: the name must be a plain file name
/// that needs no escaping in a URL path.
pub fn check_script_name(name: &str) -> Result<(), String> {
    let unsafe_char =
        |c: char| c.is_control() || c.is_whitespace() || matches!(c, '/' | '\\' | '%' | '?' | '#');
    if name.is_empty() || name.contains(unsafe_char) || name.starts_with('.') {
        return Err(format!(
            "install.json: script name {name:?} is not a plain file name"
        ));
    }
    Ok(())
}

/// The secret parameters as one JSON object, `{"name": "value"}`. Its
/// Debug shows no value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secrets {
    json: String,
    count: usize,
}

impl Secrets {
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn len(&self) -> usize {
        self.count
    }

    /// The JSON to write to the script's descriptor 3.
    pub fn expose(&self) -> &str {
        &self.json
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets(<{} redacted>)", self.count)
    }
}

/// The secret parameters in `parameters.json`.
pub fn secrets(parameters_json: &[u8]) -> Result<Secrets, String> {
    let all: BTreeMap<String, (String, String)> =
        serde_json::from_slice(parameters_json).map_err(|e| json_error("parameters.json", &e))?;
    let secret: BTreeMap<&str, &str> = all
        .iter()
        .filter(|(_, (_, visibility))| visibility == "secret")
        .map(|(name, (value, _))| (name.as_str(), value.as_str()))
        .collect();
    Ok(Secrets {
        json: serde_json::to_string(&secret).expect("strings serialize"),
        count: secret.len(),
    })
}

/// A JSON error without the document's content: the position and the kind,
/// and the field when one is missing (a name from this file, not a value).
pub fn json_error(what: &str, e: &serde_json::Error) -> String {
    let msg = e.to_string();
    if msg.starts_with("missing field") {
        return format!("{what} is not valid: {msg}");
    }
    let kind = match e.classify() {
        serde_json::error::Category::Io => "cannot be read",
        serde_json::error::Category::Syntax => "is not JSON",
        serde_json::error::Category::Data => "does not have the expected fields and types",
        serde_json::error::Category::Eof => "ends early",
    };
    format!("{what} {kind} (line {}, column {})", e.line(), e.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"{
        "job": "0b6c3f2e-6a53-4f4e-9f3b-0d8f6f1a2b3c", "operation": "create", "instance": "web1",
        "env": {"OS_API_VERSION": "20", "INSTANCE_NAME": "web1", "DISK_COUNT": "1",
                "DISK_0_PATH": "/dev/vda", "OSP_FOO": "bar", "PATH": "/bin"},
        "scripts": ["create", "common.sh"],
        "run": "create",
        "personalization": {"path": "/cradle/latest/os/package", "disk": 0, "partition": 1},
        "added_later": {"agents": "ignore this"}
    }"#;

    #[test]
    fn a_full_job_parses() {
        let j = parse_job(FULL.as_bytes()).unwrap();
        assert_eq!(j.job, "0b6c3f2e-6a53-4f4e-9f3b-0d8f6f1a2b3c");
        assert_eq!(j.operation, "create");
        assert_eq!(j.instance, "web1");
        assert_eq!(j.env["OSP_FOO"], "bar");
        assert_eq!(j.env.len(), 6);
        assert_eq!(j.scripts, ["create", "common.sh"]);
        assert_eq!(j.run.as_deref(), Some("create"));
        let p = j.personalization.unwrap();
        assert_eq!(p.path, "/cradle/latest/os/package");
        assert_eq!(p.device(), "/dev/vda1");
    }

    #[test]
    fn optional_parts_may_be_null_or_absent() {
        let j = parse_job(
            br#"{"job": "j", "operation": "create", "instance": "i",
                 "scripts": [], "run": null, "personalization": null}"#,
        )
        .unwrap();
        assert_eq!((j.run, j.personalization), (None, None));
        let j = parse_job(br#"{"job": "j", "operation": "create", "instance": "i"}"#).unwrap();
        assert!(j.env.is_empty() && j.scripts.is_empty());
        let j = parse_job(br#"{"scripts": ["create"], "run": "create"}"#).unwrap();
        assert_eq!((j.job.as_str(), j.instance.as_str()), ("", ""));
        let j = parse_job(
            br#"{"job": "j", "operation": "create", "instance": "i",
                 "personalization": {"path": "/p", "disk": 2}}"#,
        )
        .unwrap();
        assert_eq!(j.personalization.unwrap().device(), "/dev/vdc");
    }

    #[test]
    fn what_the_agent_cannot_do_is_refused() {
        let job = |patch: &str| {
            let mut v: serde_json::Value = serde_json::from_str(FULL).unwrap();
            let p: serde_json::Value = serde_json::from_str(patch).unwrap();
            for (k, x) in p.as_object().unwrap() {
                v[k] = x.clone();
            }
            parse_job(v.to_string().as_bytes())
        };
        for (patch, want) in [
            (
                r#"{"scripts": ["create", "../x"], "run": "create"}"#,
                r#""../x" is not a plain file name"#,
            ),
            (
                r#"{"scripts": ["a/b"], "run": null}"#,
                "not a plain file name",
            ),
            (
                r#"{"scripts": [".hidden"], "run": null}"#,
                "not a plain file name",
            ),
            (r#"{"scripts": [""], "run": null}"#, "not a plain file name"),
            (
                r#"{"scripts": ["a b"], "run": null}"#,
                "not a plain file name",
            ),
            (
                r#"{"scripts": ["a?b"], "run": null}"#,
                "not a plain file name",
            ),
            (
                r#"{"run": "import"}"#,
                r#"run "import" is not among its scripts"#,
            ),
            (
                r#"{"env": {"A=B": "x"}}"#,
                "cannot be an environment variable",
            ),
            (
                r#"{"env": {"A": "x\u0000y"}}"#,
                "the value of A holds a NUL byte",
            ),
            (
                r#"{"personalization": {"path": "http://x/p", "disk": 0}}"#,
                "is not a path on the metadata service",
            ),
            (
                r#"{"personalization": {"path": "/p", "disk": 26}}"#,
                "disk 26 is past /dev/vdz",
            ),
            (
                r#"{"personalization": {"path": "/p", "disk": 0, "partition": 0}}"#,
                "numbered from 1",
            ),
        ] {
            let e = job(patch).unwrap_err();
            assert!(e.contains(want), "{patch}: {e}");
        }
    }

    #[test]
    fn parse_errors_name_the_problem_but_quote_no_value() {
        let e = parse_job(br#"{"personalization": {"disk": 0}}"#).unwrap_err();
        assert_eq!(
            e,
            "install.json is not valid: missing field `path` at line 1 column 31"
        );
        let e = parse_job(br#"{"scripts": "create"}"#).unwrap_err();
        assert!(
            e.starts_with("install.json does not have the expected fields"),
            "{e}"
        );
        let e = parse_job(br#"{"job": "j", "operation": "create", "instance": "i", "env": {"OSP_PW": 123456789}}"#)
            .unwrap_err();
        assert!(
            e.starts_with("install.json does not have the expected fields"),
            "{e}"
        );
        assert!(!e.contains("123456789"), "{e}");
        let e = parse_job(b"<html>").unwrap_err();
        assert!(e.starts_with("install.json is not JSON"), "{e}");
    }

    #[test]
    fn only_secret_parameters_are_passed_on() {
        let s = secrets(
            br#"{"root_password": ["hunter2", "secret"], "flavour": ["minimal", "public"],
                 "db_pw": ["p\"w", "private"], "token": ["t0k", "secret"]}"#,
        )
        .unwrap();
        assert_eq!(s.len(), 2);
        let back: BTreeMap<String, String> = serde_json::from_str(s.expose()).unwrap();
        assert_eq!(
            back,
            BTreeMap::from([
                ("root_password".to_string(), "hunter2".to_string()),
                ("token".to_string(), "t0k".to_string()),
            ])
        );
        assert_eq!(format!("{s:?}"), "Secrets(<2 redacted>)");
        let none = secrets(br#"{"flavour": ["minimal", "public"]}"#).unwrap();
        assert!(none.is_empty());
        assert_eq!(none.expose(), "{}");
        assert!(secrets(b"{}").unwrap().is_empty());
    }

    #[test]
    fn a_malformed_parameters_json_does_not_leak_values() {
        let e = secrets(br#"{"root_password": "hunter2"}"#).unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(
            e.starts_with("parameters.json does not have the expected"),
            "{e}"
        );
        let e = secrets(br#"{"root_password": ["hunter2", "secret", "x"]}"#).unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
