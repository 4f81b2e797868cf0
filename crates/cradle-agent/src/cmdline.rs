//! The agent's parameters on the kernel command line (`/proc/cmdline`).
//!
//! - `cradle.address=A.B.C.D`: the instance's link-local address, which
//!   the agent gives its NIC (as `/16`). The metadata service knows the
//!   instance by it. Absent: there is nothing to install.
//! - `cradle.metadata=IP:PORT`: the metadata service, by default
//!   `169.254.169.254:80`. It must be in the address's `/16`: the agent
//!   sets no route, so only that network is reachable.
//!
//! - `cradle.nic=MAC`: which NIC is the communication NIC, in a guest
//!   with several (run mode says so; the appliance has one NIC).
//!
//! Other parameters are the kernel's own and are ignored. A parameter given
//! twice takes its last value, as the kernel does for its own.

use std::net::{Ipv4Addr, SocketAddrV4};

/// The metadata service when `cradle.metadata` is not given.
pub const DEFAULT_METADATA: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    pub address: Option<Ipv4Addr>,
    pub metadata: SocketAddrV4,
    /// Lower-case, colon-separated.
    pub nic: Option<String>,
}

/// Parse a kernel command line.
pub fn parse(cmdline: &str) -> Result<Boot, String> {
    let mut boot = Boot {
        address: None,
        metadata: DEFAULT_METADATA,
        nic: None,
    };
    for word in cmdline.split_ascii_whitespace() {
        if let Some(v) = word.strip_prefix("cradle.address=") {
            let a: Ipv4Addr = v
                .parse()
                .map_err(|_| format!("cradle.address={v} is not an IPv4 address"))?;
            boot.address = Some(a);
        } else if let Some(v) = word.strip_prefix("cradle.nic=") {
            let mac = v.to_ascii_lowercase();
            let ok = mac.len() == 17
                && mac.split(':').count() == 6
                && mac
                    .split(':')
                    .all(|b| b.len() == 2 && b.bytes().all(|c| c.is_ascii_hexdigit()));
            if !ok {
                return Err(format!("cradle.nic={v} is not a MAC address"));
            }
            boot.nic = Some(mac);
        } else if let Some(v) = word.strip_prefix("cradle.metadata=") {
            boot.metadata = v
                .parse()
                .map_err(|_| format!("cradle.metadata={v} is not IPv4-ADDRESS:PORT"))?;
        }
    }
    if let Some(a) = boot.address {
        let m = *boot.metadata.ip();
        if a.octets()[..2] != m.octets()[..2] {
            return Err(format!(
                "the metadata service {m} is not in the network of cradle.address={a} ({}.{}.0.0/16); \
                 the agent sets no route",
                a.octets()[0],
                a.octets()[1]
            ));
        }
    }
    Ok(boot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_read_among_the_kernel_ones() {
        let b = parse(
            "console=ttyS0 quiet cradle.address=169.254.3.7 panic=-1 \
             cradle.metadata=169.254.169.254:8080\n",
        )
        .unwrap();
        assert_eq!(b.address, Some(Ipv4Addr::new(169, 254, 3, 7)));
        assert_eq!(
            b.metadata,
            SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 8080)
        );
    }

    #[test]
    fn absent_parameters_mean_nothing_to_install_and_the_default_service() {
        let b = parse("console=ttyS0 quiet panic=-1").unwrap();
        assert_eq!(b.address, None);
        assert_eq!(b.metadata, DEFAULT_METADATA);
        assert_eq!(parse("").unwrap().address, None);
        // Any /16 will do when the service is in it.
        let b = parse("cradle.address=10.1.2.3 cradle.metadata=10.1.0.1:80").unwrap();
        assert_eq!(b.address, Some(Ipv4Addr::new(10, 1, 2, 3)));
        // Only whole words count.
        assert_eq!(parse("xcradle.address=169.254.0.9").unwrap().address, None);
    }

    #[test]
    fn the_nic_is_named_by_its_mac() {
        let b = parse("cradle.address=169.254.0.9 cradle.nic=02:AB:cd:00:11:22").unwrap();
        assert_eq!(b.nic.as_deref(), Some("02:ab:cd:00:11:22"));
        assert_eq!(parse("").unwrap().nic, None);
        let e = parse("cradle.nic=02:ab").unwrap_err();
        assert!(e.contains("cradle.nic=02:ab is not a MAC address"), "{e}");
    }

    #[test]
    fn the_last_value_wins() {
        let b = parse("cradle.address=169.254.0.1 cradle.address=169.254.0.2").unwrap();
        assert_eq!(b.address, Some(Ipv4Addr::new(169, 254, 0, 2)));
    }

    #[test]
    fn bad_values_are_named() {
        for (line, want) in [
            (
                "cradle.address=169.254.0",
                "cradle.address=169.254.0 is not",
            ),
            ("cradle.address=", "cradle.address= is not"),
            (
                "cradle.address=10.0.0.1",
                "169.254.169.254 is not in the network of cradle.address=10.0.0.1 (10.0.0.0/16)",
            ),
            (
                "cradle.metadata=169.254.169.254",
                "cradle.metadata=169.254.169.254 is not",
            ),
            ("cradle.metadata=[::1]:80", "is not IPv4-ADDRESS:PORT"),
        ] {
            let e = parse(line).unwrap_err();
            assert!(e.contains(want), "{line}: {e}");
        }
    }
}
