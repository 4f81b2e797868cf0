//! A real PostgreSQL server for tests and benchmarks: `initdb` and `pg_ctl`
//! from Debian's packages in a temp dir, reached only by a Unix socket in
//! that dir (no TCP port; the socket also reaches processes in other network
//! namespaces). As root it runs as the `postgres` user, since PostgreSQL
//! refuses to run as root.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A running server; stopped (immediately) when dropped.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// `Some("postgres")` when commands must run as that user.
    run_as: Option<String>,
}

/// Where Debian puts the server's programs: the newest
/// `/usr/lib/postgresql/N/bin`, else the `PATH`.
fn bin_dir() -> io::Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((n, bin))
        })
        .collect();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return Ok(bin);
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists());
    on_path.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "PostgreSQL's server programs (initdb, pg_ctl) are not installed: \
             `cargo xtask ci` installs Debian's postgresql package",
        )
    })
}

fn uid_gid_of(user: &str) -> io::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == user)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no user {user:?} to run PostgreSQL as (root may not)"),
            )
        })
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

impl PgServer {
    /// `initdb` and start a server; fails with what the tools printed.
    pub fn start() -> io::Result<PgServer> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new().prefix("cradle-pg-").tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let run_as = match is_root() {
            true => {
                let (uid, gid) = uid_gid_of("postgres")?;
                std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
                Some("postgres".to_string())
            }
            false => None,
        };
        let server = PgServer { dir, bin, run_as };
        let data = server.data_dir();
        server.run(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "cradle",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        let conf = format!(
            "\nlisten_addresses = ''\nport = 5432\nunix_socket_directories = '{}'\n\
             max_connections = 200\n",
            path_str(server.dir.path())?
        );
        let mut existing = std::fs::read_to_string(data.join("postgresql.conf"))?;
        existing.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), existing)?;
        server.start_again()?;
        Ok(server)
    }

    /// What `[store] url` takes to reach it.
    pub fn url(&self) -> String {
        format!(
            "host={} port=5432 user=cradle dbname=postgres",
            self.dir.path().display()
        )
    }

    /// The server's data directory (for tests that search it).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Stop it (fast shutdown: sessions are ended, committed work is kept).
    pub fn stop(&self) -> io::Result<()> {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &["-D", path_str(&data)?, "-m", "fast", "-w", "stop"],
        )
        .map(drop)
    }

    /// Start it again after [`PgServer::stop`].
    pub fn start_again(&self) -> io::Result<()> {
        let data = self.data_dir();
        let log = self.dir.path().join("server.log");
        self.run(
            "pg_ctl",
            &["-D", path_str(&data)?, "-l", path_str(&log)?, "-w", "start"],
        )
        .map(drop)
    }

    /// A new, empty database; returns the URL that reaches it.
    pub fn create_database(&self, name: &str) -> io::Result<String> {
        let dir = self.dir.path().to_path_buf();
        self.run(
            "createdb",
            &["-h", path_str(&dir)?, "-p", "5432", "-U", "cradle", name],
        )?;
        Ok(format!(
            "host={} port=5432 user=cradle dbname={name}",
            self.dir.path().display()
        ))
    }

    /// `pg_dump` of the database, as SQL.
    pub fn dump(&self, database: &str) -> io::Result<Vec<u8>> {
        let dir = self.dir.path().to_path_buf();
        self.run(
            "pg_dump",
            &[
                "-h",
                path_str(&dir)?,
                "-p",
                "5432",
                "-U",
                "cradle",
                database,
            ],
        )
        .map(|o| o.stdout)
    }

    fn run(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        let path = self.bin.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={user}"),
                    &format!("--regid={user}"),
                    "--init-groups",
                    "--",
                ]);
                c.arg(&path);
                c
            }
            None => Command::new(&path),
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            let log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            return Err(io::Error::other(format!(
                "{program} {args:?} failed ({}): {}{}\n{log}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(out)
    }
}

fn path_str(p: &Path) -> io::Result<&str> {
    p.to_str()
        .ok_or_else(|| io::Error::other(format!("{} is not UTF-8", p.display())))
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data_dir();
        if let Ok(d) = path_str(&data) {
            let _ = self.run("pg_ctl", &["-D", d, "-m", "immediate", "-w", "stop"]);
        }
    }
}
