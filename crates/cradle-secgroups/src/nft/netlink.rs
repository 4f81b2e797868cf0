//! Set elements over netlink: one `NETLINK_NETFILTER` socket, kept open,
//! and one nf_tables batch (begin, element messages, end) per transaction,
//! which the kernel applies all or nothing.
//!
//! Written by hand, on `rustix`'s safe socket calls. The crates that speak
//! nf_tables were checked: `rustables` is GPL-3.0, and `nftnl`/`mnl` bind
//! libnftnl and libmnl (GPL-2.0), which cradle's Apache-2.0 licence rules
//! out; `netlink-packet-netfilter` (MIT) had the batch messages but not
//! nf_tables set elements in the version on crates.io. What is needed here
//! is small: new element, delete element and the element listing, with
//! nested key and verdict attributes, and reading the acknowledgements.
//!
//! Only the batch's last message asks for an acknowledgement: the kernel
//! reports every failed message anyway, in order, before that one, so a
//! batch of any size costs one reply when it succeeds.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

use super::layout::Elem;
use super::layout::{Present, tag_chain};
use super::plan::OpRef;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;

const NFPROTO_INET: u8 = 1;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFT_JUMP: i32 = -3;

/// An attribute's length is 16 bits: element messages stay under this.
const MAX_MESSAGE: usize = 48 * 1024;

/// A batch the kernel refused, or a socket that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket{}: {source}", in_netns(.netns))]
    Open {
        netns: Option<String>,
        source: io::Error,
    },
    #[error("netlink: {0}")]
    Io(#[from] io::Error),
    /// The kernel refused the batch (nothing of it was applied), or a
    /// listing.
    #[error("the kernel refused the element batch: {}", .0.join("; "))]
    Refused(Vec<String>),
}

impl NetlinkError {
    /// The same error, its messages prefixed with what was being done.
    fn what(self, doing: &str) -> NetlinkError {
        match self {
            NetlinkError::Refused(m) => {
                NetlinkError::Refused(m.into_iter().map(|m| format!("{doing}: {m}")).collect())
            }
            other => other,
        }
    }
}

fn in_netns(ns: &Option<String>) -> String {
    ns.as_ref()
        .map(|n| format!(" in network namespace {n}"))
        .unwrap_or_default()
}

/// A listed element: its key, and the chain its verdict jumps to (maps).
pub(super) type ListedElem = (Box<[u8]>, Option<String>);

/// An open `NETLINK_NETFILTER` socket.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    /// A socket in this process's network namespace, or in the named one
    /// (`/run/netns/NAME`, as `ip netns` makes them): it is made on a
    /// short-lived thread that enters the namespace, and keeps talking to
    /// that namespace's kernel tables whichever thread uses it.
    pub fn open(netns: Option<&str>) -> Result<Netlink, NetlinkError> {
        let err = |source| NetlinkError::Open {
            netns: netns.map(String::from),
            source,
        };
        let fd = match netns {
            None => socket().map_err(err)?,
            Some(ns) => {
                let path = format!("/run/netns/{ns}");
                std::thread::scope(|s| {
                    s.spawn(|| {
                        let f = File::open(&path)?;
                        rustix::thread::move_into_link_name_space(
                            f.as_fd(),
                            Some(rustix::thread::LinkNameSpaceType::Network),
                        )?;
                        socket()
                    })
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
                })
                .map_err(err)?
            }
        };
        Ok(Netlink { fd, seq: 1 })
    }

    /// Apply `ops` to `table` (family inet) as one transaction.
    pub(super) fn apply(&mut self, table: &str, ops: &[OpRef]) -> Result<(), NetlinkError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut batch = Vec::with_capacity(64 * 1024);
        let begin = self.next_seq();
        header(
            &mut batch,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            begin,
            0,
            NFNL_SUBSYS_NFTABLES,
        );
        let messages = encode(table, ops);
        let mut last = 0;
        let n = messages.len();
        for (i, m) in messages.into_iter().enumerate() {
            let seq = self.next_seq();
            let mut flags = NLM_F_REQUEST | m.flags;
            if i + 1 == n {
                flags |= NLM_F_ACK;
                last = seq;
            }
            let start = batch.len();
            header(&mut batch, m.kind, flags, seq, NFPROTO_INET, 0);
            batch.extend_from_slice(&m.body);
            let len = (batch.len() - start) as u32;
            batch[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        }
        let end = self.next_seq();
        header(
            &mut batch,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            end,
            0,
            NFNL_SUBSYS_NFTABLES,
        );

        let fd = self.fd.as_fd();
        if batch.len() + 65536 > 212_992 {
            let want = batch.len() + 65536;
            if rustix::net::sockopt::set_socket_send_buffer_size_force(fd, want).is_err() {
                rustix::net::sockopt::set_socket_send_buffer_size(fd, want)
                    .map_err(io::Error::from)?;
            }
        }
        let kernel = SocketAddrNetlink::new(0, 0);
        let sent = rustix::net::sendto(fd, &batch, SendFlags::empty(), &kernel)
            .map_err(io::Error::from)?;
        if sent != batch.len() {
            return Err(io::Error::other("the batch was sent only in part").into());
        }
        self.replies(begin, last)
    }

    /// Read replies up to the acknowledgement of message `last`; any error
    /// before it means the kernel refused the batch.
    fn replies(&mut self, begin: u32, last: u32) -> Result<(), NetlinkError> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut errors = Vec::new();
        loop {
            let n = self.receive(&mut buf)?;
            for (kind, seq, msg) in messages(&buf[..n]) {
                if kind != NLMSG_ERROR || msg.len() < 20 {
                    continue;
                }
                let code = i32::from_ne_bytes(msg[16..20].try_into().unwrap());
                // The failed message's header follows: its sequence number
                // says which it was.
                let failed = if msg.len() >= 36 {
                    u32::from_ne_bytes(msg[28..32].try_into().unwrap())
                } else {
                    seq
                };
                if code != 0 {
                    errors.push(format!(
                        "message {}: {}",
                        failed.wrapping_sub(begin),
                        io::Error::from_raw_os_error(-code)
                    ));
                }
                if failed == last || failed == begin && code != 0 {
                    return if errors.is_empty() {
                        Ok(())
                    } else {
                        Err(NetlinkError::Refused(errors))
                    };
                }
            }
        }
    }

    fn receive(&self, buf: &mut [u8]) -> Result<usize, NetlinkError> {
        let (_, n) =
            rustix::net::recv(self.fd.as_fd(), buf, RecvFlags::empty()).map_err(io::Error::from)?;
        Ok(n)
    }

    /// Every element of set `set` of `table`: its key, and for a map
    /// whose data is a jump, the chain it jumps to.
    pub(super) fn elements(
        &mut self,
        table: &str,
        set: &str,
    ) -> Result<Vec<ListedElem>, NetlinkError> {
        let mut out = Vec::new();
        self.dump(NFT_MSG_GETSETELEM, &list_header(table, set), |attrs_of| {
            for (t, v) in attrs_of {
                if t == NFTA_SET_ELEM_LIST_ELEMENTS {
                    out.extend(attrs(v).into_iter().map(|(_, e)| element(e)));
                }
            }
        })
        .map_err(|e| e.what(&format!("listing set {set}")))?;
        Ok(out)
    }

    /// What `table` holds besides elements: whether it exists, its sets'
    /// and its chains' names. (Listing it with nft fetches every element
    /// first: 3 s at 400,000.)
    pub(super) fn present(&mut self, table: &str) -> Result<Present, NetlinkError> {
        let mut p = Present::default();
        let mut req = Vec::new();
        string(&mut req, NFTA_TABLE_NAME, table);
        self.dump(NFT_MSG_GETTABLE, &[], |a| {
            if a.iter()
                .any(|(t, v)| *t == NFTA_TABLE_NAME && name(v) == table)
            {
                p.table = true;
            }
        })?;
        if !p.table {
            return Ok(p);
        }
        for (kind, name_attr, into) in [
            (NFT_MSG_GETSET, NFTA_SET_NAME, &mut p.sets),
            (NFT_MSG_GETCHAIN, NFTA_CHAIN_NAME, &mut p.chains),
        ] {
            self.dump(kind, &req, |a| {
                // Attribute 1 is the table in both replies.
                let mine = a.iter().any(|(t, v)| *t == 1 && name(v) == table);
                if let Some((_, v)) = a.iter().find(|(t, _)| *t == name_attr).filter(|_| mine) {
                    into.insert(name(v).to_string());
                }
            })?;
        }
        Ok(p)
    }

    /// Send a dump request of `kind` with attributes `body`; `each` gets
    /// every reply's attributes.
    fn dump(
        &mut self,
        kind: u16,
        body: &[u8],
        mut each: impl FnMut(Vec<(u16, &[u8])>),
    ) -> Result<(), NetlinkError> {
        let seq = self.next_seq();
        let mut req = Vec::with_capacity(128);
        header(
            &mut req,
            kind,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            NFPROTO_INET,
            0,
        );
        req.extend_from_slice(body);
        let len = req.len() as u32;
        req[0..4].copy_from_slice(&len.to_ne_bytes());
        let kernel = SocketAddrNetlink::new(0, 0);
        rustix::net::sendto(self.fd.as_fd(), &req, SendFlags::empty(), &kernel)
            .map_err(io::Error::from)?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = self.receive(&mut buf)?;
            for (kind, got, msg) in messages(&buf[..n]) {
                if got != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = i32::from_ne_bytes(msg[16..20].try_into().unwrap());
                        if code != 0 {
                            return Err(NetlinkError::Refused(vec![
                                io::Error::from_raw_os_error(-code).to_string(),
                            ]));
                        }
                    }
                    // nlmsghdr, nfgenmsg, then the object's attributes.
                    _ if msg.len() >= 20 => each(attrs(&msg[20..])),
                    _ => {}
                }
            }
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }
}

fn socket() -> io::Result<OwnedFd> {
    let fd = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        Some(rustix::net::netlink::NETFILTER),
    )?;
    rustix::net::bind(&fd, &SocketAddrNetlink::new(0, 0))?;
    // Replies to a refused batch quote the failed messages: room for a few.
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size_force(&fd, 4 << 20)
        .or_else(|_| rustix::net::sockopt::set_socket_recv_buffer_size(&fd, 1 << 20));
    rustix::net::sockopt::set_socket_timeout(
        &fd,
        rustix::net::sockopt::Timeout::Recv,
        Some(Duration::from_secs(30)),
    )?;
    Ok(fd)
}

fn header(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) {
    let kind = if kind < 0x100 && kind != NFNL_MSG_BATCH_BEGIN && kind != NFNL_MSG_BATCH_END {
        (NFNL_SUBSYS_NFTABLES << 8) | kind
    } else {
        kind
    };
    out.extend_from_slice(&20u32.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&[family, 0]);
    out.extend_from_slice(&res_id.to_be_bytes());
}

/// An attribute: `kind`, then what `body` writes, padded.
fn attr(out: &mut Vec<u8>, kind: u16, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    body(out);
    let len = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    out[start + 2..start + 4].copy_from_slice(&kind.to_ne_bytes());
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn string(out: &mut Vec<u8>, kind: u16, s: &str) {
    attr(out, kind, |o| {
        o.extend_from_slice(s.as_bytes());
        o.push(0);
    });
}

struct Message {
    kind: u16,
    flags: u16,
    body: Vec<u8>,
}

fn list_header(table: &str, set: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(MAX_MESSAGE + 256);
    string(&mut body, NFTA_SET_ELEM_LIST_TABLE, table);
    string(&mut body, NFTA_SET_ELEM_LIST_SET, set);
    body
}

/// The messages for `ops`, in order: consecutive additions (or deletions)
/// to one set share messages of up to [`MAX_MESSAGE`] bytes.
fn encode(table: &str, ops: &[OpRef]) -> Vec<Message> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < ops.len() {
        let (add, first) = ops[i];
        let (kind, flags) = if add {
            (NFT_MSG_NEWSETELEM, NLM_F_CREATE)
        } else {
            (NFT_MSG_DELSETELEM, 0)
        };
        let set = first.set;
        let mut body = list_header(table, &set.name());
        let start = body.len();
        body.extend_from_slice(&[0; 4]);
        while let Some((a, e)) = ops.get(i) {
            if e.set != set || *a != add || body.len() - start > MAX_MESSAGE {
                break;
            }
            element_attr(&mut body, e, add);
            i += 1;
        }
        let len = (body.len() - start) as u16;
        let kind_attr = NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED;
        body[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        body[start + 2..start + 4].copy_from_slice(&kind_attr.to_ne_bytes());
        out.push(Message { kind, flags, body });
    }
    out
}

/// One element of a list: its key, and (added to a map) its verdict.
fn element_attr(body: &mut Vec<u8>, e: &Elem, add: bool) {
    attr(body, NFTA_LIST_ELEM | NLA_F_NESTED, |o| {
        attr(o, NFTA_SET_ELEM_KEY | NLA_F_NESTED, |o| {
            attr(o, NFTA_DATA_VALUE, |o| o.extend_from_slice(&e.key));
        });
        if let (true, Some(n)) = (add, e.tag) {
            attr(o, NFTA_SET_ELEM_DATA | NLA_F_NESTED, |o| {
                attr(o, NFTA_DATA_VERDICT | NLA_F_NESTED, |o| {
                    attr(o, NFTA_VERDICT_CODE, |o| {
                        o.extend_from_slice(&NFT_JUMP.to_be_bytes())
                    });
                    string(o, NFTA_VERDICT_CHAIN, &tag_chain(n));
                });
            });
        }
    });
}

/// The netlink messages in what one `recv` read: (type, sequence number,
/// the whole message), errors at least 20 bytes long.
fn messages(buf: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
        let seq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().unwrap());
        if len < 16 || at + len > buf.len() || (kind == NLMSG_ERROR && len < 20) {
            break;
        }
        out.push((kind, seq, &buf[at..at + len]));
        at += len.div_ceil(4) * 4;
    }
    out
}

/// The attributes in `b`: (type without flags, payload).
fn attrs(b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= b.len() {
        let len = u16::from_ne_bytes([b[at], b[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([b[at + 2], b[at + 3]]) & 0x3fff;
        if len < 4 || at + len > b.len() {
            break;
        }
        out.push((kind, &b[at + 4..at + len]));
        at += len.div_ceil(4) * 4;
    }
    out
}

/// A string attribute's text (up to its NUL).
fn name(v: &[u8]) -> &str {
    let end = v.iter().position(|c| *c == 0).unwrap_or(v.len());
    std::str::from_utf8(&v[..end]).unwrap_or("")
}

/// One listed element: its key, and the chain its verdict jumps to.
fn element(b: &[u8]) -> ListedElem {
    let mut key: Box<[u8]> = Box::new([]);
    let mut chain = None;
    for (t, v) in attrs(b) {
        match t {
            NFTA_SET_ELEM_KEY => {
                if let Some((_, k)) = attrs(v).into_iter().find(|(t, _)| *t == NFTA_DATA_VALUE) {
                    key = k.into();
                }
            }
            NFTA_SET_ELEM_DATA => {
                for (t, verdict) in attrs(v) {
                    if t != NFTA_DATA_VERDICT {
                        continue;
                    }
                    for (t, c) in attrs(verdict) {
                        if t == NFTA_VERDICT_CHAIN {
                            let end = c.iter().position(|x| *x == 0).unwrap_or(c.len());
                            chain = Some(String::from_utf8_lossy(&c[..end]).into_owned());
                        }
                    }
                }
            }
            _ => {}
        }
    }
    (key, chain)
}
