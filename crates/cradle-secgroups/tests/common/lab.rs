//! A routing lab in network namespaces: a "host" namespace that routes, and
//! guest namespaces each joined to it by a veth pair (host end `vgN`, guest
//! end `eth0`, 10.77.N.2/30 behind 10.77.N.1 and fd00:77:0:N::2/64 behind
//! fd00:77:0:N::1), as a routed hypervisor joins its guests. Guests form
//! their link-local address from their mac (EUI-64) unless made with
//! [`Lab::with_stable_privacy`]. Python (Debian's) in the guests serves and
//! sends TCP, UDP and ICMP, over IPv4 and IPv6. Shared by the nftables tests
//! here and cradle's end-to-end test.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};

use super::{Netns, mac, require_tools};

/// Serves TCP and UDP ports (`serve tcp:P udp:Q ...`: answers "ok"), or
/// sends one probe (`tcp|udp DST PORT [SRC]`, `ping DST [SRC]`) and exits 0
/// when the answer came within the timeout.
pub const PROBE: &str = r#"
import os, select, socket, struct, sys, time
T = 0.6
mode = sys.argv[1]
def family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET
if mode == "serve":
    socks = []
    for spec in sys.argv[2:]:
        proto, port = spec.split(":")
        for fam, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            if proto == "tcp":
                s = socket.socket(fam, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            else:
                s = socket.socket(fam, socket.SOCK_DGRAM)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((any_addr, int(port)))
            if proto == "tcp":
                s.listen(16)
            socks.append((proto, s))
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([s for _, s in socks], [], [])
        for proto, s in socks:
            if s not in ready:
                continue
            if proto == "tcp":
                c, _ = s.accept()
                c.sendall(b"ok")
                c.close()
            else:
                _, peer = s.recvfrom(100)
                s.sendto(b"ok", peer)
elif mode in ("tcp", "udp"):
    dst, port = sys.argv[2], int(sys.argv[3])
    kind = socket.SOCK_STREAM if mode == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(family(dst), kind)
    s.settimeout(T)
    if len(sys.argv) > 4:
        s.bind((sys.argv[4], 0))
    try:
        if mode == "tcp":
            s.connect((dst, port))
            data = s.recv(10)
        else:
            s.sendto(b"hi", (dst, port))
            data, _ = s.recvfrom(10)
    except OSError:
        sys.exit(1)
    sys.exit(0 if data == b"ok" else 1)
elif mode == "ping":
    dst = sys.argv[2]
    v6 = family(dst) == socket.AF_INET6
    if v6:
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    if len(sys.argv) > 3:
        s.bind((sys.argv[3], 0))
    ident = os.getpid() & 0xFFFF
    def checksum(b):
        if len(b) % 2:
            b += b"\0"
        n = sum(struct.unpack("!%dH" % (len(b) // 2), b))
        n = (n >> 16) + (n & 0xFFFF)
        n += n >> 16
        return ~n & 0xFFFF
    body = b"cradle-probe"
    # ICMPv6: the kernel fills in the checksum.
    echo, reply = (128, 129) if v6 else (8, 0)
    head = struct.pack("!BBHHH", echo, 0, 0, ident, 1)
    sum_ = 0 if v6 else checksum(head + body)
    packet = struct.pack("!BBHHH", echo, 0, sum_, ident, 1) + body
    s.sendto(packet, (dst, 0))
    deadline = time.time() + T
    while True:
        left = deadline - time.time()
        if left <= 0:
            sys.exit(1)
        s.settimeout(left)
        try:
            data, peer = s.recvfrom(1500)
        except OSError:
            sys.exit(1)
        ihl = 0 if v6 else (data[0] & 0x0F) * 4
        typ, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
        if typ == reply and rid == ident and peer[0] == dst:
            sys.exit(0)
"#;

pub fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// A server in a guest, killed when dropped.
pub struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Lab {
    pub host: Netns,
    pub guests: Vec<Netns>,
    servers: Vec<Server>,
}

impl Lab {
    pub fn new(n: u8) -> Lab {
        Lab::build(n, &[])
    }

    /// The same, with guests `stable` forming their link-local address as
    /// RFC 7217 says (stable privacy: not derived from the mac).
    pub fn with_stable_privacy(n: u8, stable: &[u8]) -> Lab {
        Lab::build(n, stable)
    }

    fn build(n: u8, stable: &[u8]) -> Lab {
        require_tools();
        let host = Netns::new("host");
        host.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        host.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        // No duplicate address detection: addresses work at once.
        host.exec(&["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"]);
        let mut guests = Vec::new();
        for k in 1..=n {
            let g = Netns::new(&format!("g{k}"));
            g.exec(&["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"]);
            let vg = format!("vg{k}");
            host.ip(&[
                "link", "add", &vg, "type", "veth", "peer", "name", "eth0", "netns", &g.name,
            ]);
            let mac = mac(k)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            g.ip(&["link", "set", "eth0", "address", &mac]);
            if stable.contains(&k) {
                g.exec(&[
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.eth0.stable_secret=fd00:1234:5678:9abc:def0:1234:5678:9abc",
                ]);
                g.exec(&["sysctl", "-qw", "net.ipv6.conf.eth0.addr_gen_mode=2"]);
            }
            host.ip(&["addr", "add", &format!("10.77.{k}.1/30"), "dev", &vg]);
            g.ip(&["addr", "add", &format!("10.77.{k}.2/30"), "dev", "eth0"]);
            host.ip(&[
                "addr",
                "add",
                &format!("fd00:77:0:{k:x}::1/64"),
                "dev",
                &vg,
                "nodad",
            ]);
            g.ip(&["addr", "add", &addr6(k), "dev", "eth0", "nodad"]);
            host.ip(&["link", "set", &vg, "up"]);
            g.ip(&["link", "set", "eth0", "up"]);
            g.ip(&["route", "add", "default", "via", &format!("10.77.{k}.1")]);
            g.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:77:0:{k:x}::1"),
                "dev",
                "eth0",
                "onlink",
            ]);
            guests.push(g);
        }
        Lab {
            host,
            guests,
            servers: Vec::new(),
        }
    }

    /// Guest `k`'s link-local address, once the kernel has made it.
    pub fn link_local(&self, k: u8) -> std::net::Ipv6Addr {
        for _ in 0..100 {
            let out = self
                .guest(k)
                .ip(&["-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"]);
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(a) = text
                .split_whitespace()
                .skip_while(|w| *w != "inet6")
                .nth(1)
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse().ok())
            {
                return a;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("guest {k} has no link-local address");
    }

    /// Guest `k`'s mac, as `aa:bb:...`.
    pub fn mac(&self, k: u8) -> String {
        mac(k)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }

    /// Give guest `k` a second address that is not its own, with a host
    /// route back to it, so that only anti-spoofing can stop its traffic.
    pub fn foreign_address(&self, k: u8, addr: &str) {
        self.guest(k)
            .ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"]);
        self.host.ip(&[
            "route",
            "add",
            &format!("{addr}/32"),
            "dev",
            &format!("vg{k}"),
        ]);
    }

    pub fn guest(&self, k: u8) -> &Netns {
        &self.guests[usize::from(k) - 1]
    }

    pub fn serve(&mut self, k: u8, specs: &[&str]) {
        let mut cmd = self.guest(k).command(python());
        cmd.args(["-c", PROBE, "serve"])
            .args(specs)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("python3 starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the server in g{k} did not start");
        self.servers.push(Server(child));
    }

    /// Whether a probe from guest `from` got its answer.
    pub fn probe(&self, from: u8, args: &[&str]) -> bool {
        let out = self
            .guest(from)
            .command(python())
            .args(["-c", PROBE])
            .args(args)
            .output()
            .expect("python3 runs");
        match out.status.code() {
            Some(0) => true,
            Some(1) => false,
            _ => panic!(
                "the probe {args:?} broke: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    pub fn tcp(&self, from: u8, to: u8, port: u16) -> bool {
        self.probe(from, &["tcp", &addr(to), &port.to_string()])
    }

    pub fn udp(&self, from: u8, to: u8, port: u16) -> bool {
        self.probe(from, &["udp", &addr(to), &port.to_string()])
    }

    pub fn ping(&self, from: u8, to: u8) -> bool {
        self.probe(from, &["ping", &addr(to)])
    }

    pub fn tcp6(&self, from: u8, to: u8, port: u16) -> bool {
        self.probe(from, &["tcp", &addr6(to), &port.to_string()])
    }

    pub fn ping6(&self, from: u8, to: u8) -> bool {
        self.probe(from, &["ping", &addr6(to)])
    }
}

pub fn addr(k: u8) -> String {
    format!("10.77.{k}.2")
}

/// Guest `k`'s IPv6 address (the one `instance(k)` registers).
pub fn addr6(k: u8) -> String {
    format!("fd00:77:0:{k:x}::2")
}

/// That a probe passed, or was dropped, as `want` says.
#[track_caller]
pub fn expect(what: &str, got: bool, want: bool) {
    assert_eq!(
        got,
        want,
        "{what}: expected it to {}",
        if want { "pass" } else { "be dropped" }
    );
}
