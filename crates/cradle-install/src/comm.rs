//! The communication NIC, as Ganeti built it: per install job a tap on the
//! host holding 169.254.169.254/32 (a /16 without its prefix route when
//! dnsmasq must serve the link), a /32 route to the instance's own
//! link-local address, and an nftables table of its own that lets in only
//! TCP from that address to the metadata port (and, for a self-installing
//! guest, its DHCP requests).
//!
//! The table hooks `prerouting` at priority `raw`, before conntrack and the
//! routing decision: a packet from a spoofed source, anything aimed at
//! another port of the host (the admin API), anything to be forwarded and
//! all IPv6 are dropped (and counted) before the host looks at them. The
//! listener then knows the guest by its source address. One table per tap
//! means removing a job's fence is deleting its table.
//!
//! `ip` is run with argument vectors; the ruleset reaches nft on its
//! standard input through the firewall's runner (`cradle_secgroups::nft`).
//! Tap names are cradle's own (`cri` and 8 hex digits).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use cradle_secgroups::nft::Nft;

/// The host side of every communication NIC.
pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// The tools that make and remove communication NICs.
#[derive(Clone, Debug)]
pub struct Comm {
    pub ip: PathBuf,
    pub nft: PathBuf,
}

/// A locally administered MAC for the communication NIC of instance `id`.
pub fn mac(id: uuid::Uuid) -> String {
    let id = id.as_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        id[0], id[1], id[2], id[3], id[4]
    )
}

/// The nftables table fencing `tap`.
pub fn table_name(tap: &str) -> String {
    format!("cradle_comm_{}", tap.replace('-', "_"))
}

/// The ruleset for `tap`: only `guest` → 169.254.169.254:`port` over TCP,
/// and with `dhcp` the guest's DHCP requests (from 0.0.0.0 before it has
/// its address).
pub fn ruleset(tap: &str, guest: Ipv4Addr, port: u16, dhcp: bool) -> String {
    let t = table_name(tap);
    let dhcp = if dhcp {
        format!("\t\tiifname \"{tap}\" udp sport 68 udp dport 67 accept\n")
    } else {
        String::new()
    };
    format!(
        "table inet {t} {{\n\
         \tchain ingress {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tiifname \"{tap}\" ip saddr {guest} ip daddr {METADATA_IP} tcp dport {port} counter accept\n\
         {dhcp}\
         \t\tiifname \"{tap}\" counter drop\n\
         \t}}\n\
         }}\n"
    )
}

impl Comm {
    /// `ip ARGS`, which must succeed.
    fn ip(&self, args: &[&str]) -> Result<(), String> {
        let what = || format!("{} {}", self.ip.display(), args.join(" "));
        let out = Command::new(&self.ip)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", what()))?;
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

    fn nft(&self) -> Nft {
        Nft {
            program: self.nft.clone(),
            netns: None,
        }
    }

    /// Make `tap` for the guest at `guest` and fence it. Leftovers of a
    /// job that died with the server are removed first.
    pub fn setup(&self, tap: &str, guest: Ipv4Addr, port: u16, dhcp: bool) -> Result<(), String> {
        self.teardown(tap);
        let ip = |args: &[&str]| self.ip(args);
        // The host side is 169.254.169.254/32. With DHCP it is a /16
        // without its prefix route instead, so that dnsmasq sees the
        // network it hands out; either way only the /32 route below leads
        // into this tap.
        let host = format!("{METADATA_IP}/{}", if dhcp { 16 } else { 32 });
        let mut addr = vec!["addr", "add", host.as_str(), "dev", tap];
        if dhcp {
            addr.push("noprefixroute");
        }
        let route = format!("{guest}/32");
        let meta = METADATA_IP.to_string();
        let fenced = self
            .nft()
            .apply_text(&ruleset(tap, guest, port, dhcp))
            .map_err(|e| e.to_string())
            .and_then(|()| ip(&["tuntap", "add", "dev", tap, "mode", "tap"]))
            .and_then(|()| ip(&addr))
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
        let _ = self.ip(&["link", "del", "dev", tap]);
        let _ = self
            .nft()
            .apply_text(&format!("delete table inet {}\n", table_name(tap)));
    }
}

/// dnsmasq for one self-installing guest: DHCP only (no DNS), on `tap`
/// alone, one static lease (`mac` → `guest`, a /16 with no router and no
/// name server: 169.254.169.254 is on the link), no lease file, in the
/// foreground, as nobody.
pub fn dnsmasq_args(tap: &str, mac: &str, guest: Ipv4Addr) -> Vec<String> {
    vec![
        "--keep-in-foreground".into(),
        "--conf-file=/dev/null".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--port=0".into(),
        format!("--interface={tap}"),
        "--bind-interfaces".into(),
        "--dhcp-range=169.254.0.0,static,255.255.0.0,1h".into(),
        format!("--dhcp-host={mac},{guest}"),
        "--dhcp-option=3".into(),
        "--dhcp-option=6".into(),
        "--dhcp-leasefile=/dev/null".into(),
        "--pid-file=".into(),
        "--user=nobody".into(),
        "--log-facility=-".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_lets_only_the_guest_reach_the_metadata_port() {
        let r = ruleset("cri0123abcd", Ipv4Addr::new(169, 254, 1, 7), 8775, false);
        assert!(!r.contains("udp"));
        let d = ruleset("cri0123abcd", Ipv4Addr::new(169, 254, 1, 7), 8775, true);
        assert!(d.contains("iifname \"cri0123abcd\" udp sport 68 udp dport 67 accept"));
        assert!(r.starts_with("table inet cradle_comm_cri0123abcd {"));
        assert!(r.contains("hook prerouting priority raw"));
        assert!(r.contains(
            "iifname \"cri0123abcd\" ip saddr 169.254.1.7 ip daddr 169.254.169.254 tcp dport 8775 counter accept"
        ));
        assert!(r.contains("iifname \"cri0123abcd\" counter drop"));
    }
}
