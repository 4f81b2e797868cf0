//! The communication NIC, as Ganeti built it: per install job a tap on the
//! host holding 169.254.169.254/32, a /32 route to the instance's own
//! link-local address, and an nftables table of its own that lets in only
//! TCP from that address to the metadata port.
//!
//! The table hooks `prerouting` at priority `raw`, before conntrack and the
//! routing decision: a packet from a spoofed source, anything aimed at
//! another port of the host (the admin API), anything to be forwarded and
//! all IPv6 are dropped (and counted) before the host looks at them. The
//! listener then knows the guest by its source address. One table per tap
//! means removing a job's fence is deleting its table.
//!
//! `ip` and `nft` are run with argument vectors; the ruleset reaches nft on
//! its standard input. Tap names are cradle's own (`cri` and 8 hex digits).

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The host side of every communication NIC.
pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// The tools that make and remove communication NICs.
#[derive(Clone, Debug)]
pub struct Comm {
    pub ip: PathBuf,
    pub nft: PathBuf,
}

/// The nftables table fencing `tap`.
pub fn table_name(tap: &str) -> String {
    format!("cradle_comm_{}", tap.replace('-', "_"))
}

/// The ruleset for `tap`: only `guest` → 169.254.169.254:`port` over TCP.
pub fn ruleset(tap: &str, guest: Ipv4Addr, port: u16) -> String {
    let t = table_name(tap);
    format!(
        "table inet {t} {{\n\
         \tchain ingress {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tiifname \"{tap}\" ip saddr {guest} ip daddr {METADATA_IP} tcp dport {port} accept\n\
         \t\tiifname \"{tap}\" counter drop\n\
         \t}}\n\
         }}\n"
    )
}

impl Comm {
    fn run(&self, program: &PathBuf, args: &[&str], stdin: Option<&str>) -> Result<(), String> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let what = || format!("{} {}", program.display(), args.join(" "));
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", what()))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())
                .map_err(|e| format!("{}: {e}", what()))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("{}: {e}", what()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} failed: {}",
                what(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Make `tap` for the guest at `guest` and fence it. Leftovers of a
    /// job that died with the server are removed first.
    pub fn setup(&self, tap: &str, guest: Ipv4Addr, port: u16) -> Result<(), String> {
        self.teardown(tap);
        let ip = |args: &[&str]| self.run(&self.ip, args, None);
        let host = format!("{METADATA_IP}/32");
        let route = format!("{guest}/32");
        let meta = METADATA_IP.to_string();
        let fenced = self
            .run(&self.nft, &["-f", "-"], Some(&ruleset(tap, guest, port)))
            .and_then(|()| ip(&["tuntap", "add", "dev", tap, "mode", "tap"]))
            .and_then(|()| ip(&["addr", "add", &host, "dev", tap]))
            .and_then(|()| ip(&["link", "set", "dev", tap, "up"]))
            .and_then(|()| {
                ip(&[
                    "route", "replace", &route, "dev", tap, "src", &meta, "proto", "static",
                ])
            });
        if fenced.is_err() {
            self.teardown(tap);
        }
        fenced
    }

    /// Remove `tap` (its address and route go with it) and its table.
    /// Whatever is already gone is not an error.
    pub fn teardown(&self, tap: &str) {
        let _ = self.run(&self.ip, &["link", "del", "dev", tap], None);
        let _ = self.run(
            &self.nft,
            &["delete", "table", "inet", &table_name(tap)],
            None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_lets_only_the_guest_reach_the_metadata_port() {
        let r = ruleset("cri0123abcd", Ipv4Addr::new(169, 254, 1, 7), 8775);
        assert!(r.starts_with("table inet cradle_comm_cri0123abcd {"));
        assert!(r.contains("hook prerouting priority raw"));
        assert!(r.contains(
            "iifname \"cri0123abcd\" ip saddr 169.254.1.7 ip daddr 169.254.169.254 tcp dport 8775 accept"
        ));
        assert!(r.contains("iifname \"cri0123abcd\" counter drop"));
    }
}
