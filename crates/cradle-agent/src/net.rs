//! The communication NIC, set up with the same ioctls `ifconfig` makes
//! (there is no iproute2 in the appliance, and no DHCP: the host tells the
//! address on the kernel command line).
//!
//! `lo` goes up; the first interface backed by a device (virtio_net's
//! `eth0`) gets the instance's address with netmask `255.255.0.0` and goes
//! up. That makes the whole `/16`, the metadata service's
//! `169.254.169.254` included, on-link: the host answers ARP for it on its
//! tap. No route and no gateway are set.

use std::ffi::c_char;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// The prefix length the address is given.
pub const PREFIX: u8 = 16;

/// How long to wait for the NIC to appear once virtio_net is loaded.
const NIC_WAIT: Duration = Duration::from_secs(5);

/// Bring `lo` up and give the NIC `address`/16. Returns the NIC's name.
pub fn configure(address: Ipv4Addr) -> Result<String, String> {
    configure_nic(address, None)
}

/// [`configure`] on the NIC whose MAC is `mac` (the first one when
/// `None`), with IPv6 off on it: a communication NIC carries only the
/// metadata service's IPv4.
pub fn configure_nic(address: Ipv4Addr, mac: Option<&str>) -> Result<String, String> {
    let sock = socket()?;
    set_up(&sock, "lo")?;
    let nic = wait_for_nic(mac)?;
    let v6 = format!("/proc/sys/net/ipv6/conf/{nic}/disable_ipv6");
    if Path::new(&v6).exists() {
        std::fs::write(&v6, "1").map_err(|e| format!("cannot turn IPv6 off on {nic}: {e}"))?;
    }
    let mask = Ipv4Addr::from(u32::MAX << (32 - PREFIX));
    set_addr(&sock, &nic, libc::SIOCSIFADDR, address)
        .map_err(|e| format!("cannot give {nic} the address {address}: {e}"))?;
    set_addr(&sock, &nic, libc::SIOCSIFNETMASK, mask)
        .map_err(|e| format!("cannot give {nic} the netmask {mask}: {e}"))?;
    set_up(&sock, &nic)?;
    Ok(nic)
}

/// The first network interface with a device behind it (and the MAC
/// `mac`, when given), waiting for one.
fn wait_for_nic(mac: Option<&str>) -> Result<String, String> {
    let until = Instant::now() + NIC_WAIT;
    loop {
        let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != "lo")
                    .filter(|n| Path::new("/sys/class/net").join(n).join("device").exists())
                    .filter(|n| {
                        mac.is_none_or(|m| {
                            std::fs::read_to_string(
                                Path::new("/sys/class/net").join(n).join("address"),
                            )
                            .is_ok_and(|a| a.trim().eq_ignore_ascii_case(m))
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        if let Some(n) = names.into_iter().next() {
            return Ok(n);
        }
        if Instant::now() >= until {
            return Err(match mac {
                None => format!(
                    "no network interface appeared in {} s (is virtio_net loaded, and has the VM a NIC?)",
                    NIC_WAIT.as_secs()
                ),
                Some(m) => format!(
                    "no network interface with MAC {m} appeared in {} s",
                    NIC_WAIT.as_secs()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn socket() -> Result<OwnedFd, String> {
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!(
            "cannot open a socket to configure the network: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a descriptor just opened and owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `ifreq` naming `ifname`, the rest zero.
fn request(ifname: &str) -> std::io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain data, valid all zero.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if ifname.is_empty() || ifname.len() >= req.ifr_name.len() || ifname.contains('\0') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{ifname:?} is not an interface name"),
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *d = s as c_char;
    }
    Ok(req)
}

fn ioctl(sock: &OwnedFd, op: libc::c_ulong, req: &mut libc::ifreq) -> std::io::Result<()> {
    // SAFETY: every SIOC[GS]IF* request takes a pointer to an ifreq, which
    // outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), op as _, req as *mut libc::ifreq) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// SIOCSIFADDR or SIOCSIFNETMASK with an IPv4 address.
fn set_addr(
    sock: &OwnedFd,
    ifname: &str,
    op: libc::c_ulong,
    addr: Ipv4Addr,
) -> std::io::Result<()> {
    let mut req = request(ifname)?;
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes), and
    // the union member is plain data.
    unsafe {
        std::ptr::write(
            (&raw mut req.ifr_ifru.ifru_addr).cast::<libc::sockaddr_in>(),
            sin,
        );
    }
    ioctl(sock, op, &mut req)
}

/// Set IFF_UP on `ifname`, keeping its other flags.
fn set_up(sock: &OwnedFd, ifname: &str) -> Result<(), String> {
    let up = || -> std::io::Result<()> {
        let mut req = request(ifname)?;
        ioctl(sock, libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        ioctl(sock, libc::SIOCSIFFLAGS, &mut req)
    };
    up().map_err(|e| format!("cannot bring {ifname} up: {e}"))
}
