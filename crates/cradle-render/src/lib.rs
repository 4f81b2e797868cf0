//! One renderer for every way metadata reaches a guest.
//!
//! Pure functions turn an [`Instance`] and a [`Context`] into a tree of
//! directories and documents: the EC2 tree, the OpenStack tree and cradle's
//! native tree. The metadata service walks the tree to answer a path; the
//! config-drive writer walks it to write files. Neither adds content of its
//! own, so a drive and the service cannot disagree.
//!
//! Invariant: this crate does no I/O and reads no clock or randomness; what
//! varies (today's date, static vendordata) comes in through [`Context`].
//!
//! The tree is lazy: a directory's entries and a document's bytes are built
//! only when asked for, so answering one path builds only what lies on it.

#![forbid(unsafe_code)]

use cradle_model::Instance;

mod ec2;
mod native;
mod openstack;
#[cfg(test)]
mod testing;

pub use ec2::{EC2_VERSIONS, ec2_meta_data_json, ec2_version};
pub use native::native;
pub use openstack::{OPENSTACK_VERSIONS, content_name, openstack_version, openstack_versions};

/// `YYYY-MM-DD` for [`Context::today`]. The caller reads the clock.
pub fn date(t: time::OffsetDateTime) -> String {
    let d = t.date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// What the renderer needs besides the instance.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    /// Today, `YYYY-MM-DD`: OpenStack versions dated after it are not offered.
    pub today: &'a str,
    /// Static vendordata (`vendor_data.json`; `"static"` in `vendor_data2.json`).
    pub vendor_data: &'a serde_json::Value,
    /// Dynamic vendordata, by target name, beside `"static"` in
    /// `vendor_data2.json`. Fetched by the caller; empty when none is configured.
    pub dynamic_vendor_data: &'a std::collections::BTreeMap<String, serde_json::Value>,
    /// Names of the instance's security groups, for EC2 `security-groups`.
    pub security_groups: &'a [&'a str],
    /// What signs the EC2 identity document (`signature`, `pkcs7`,
    /// `rsa2048` beside `document`); without one only `document` is there.
    pub identity: Option<&'a dyn IdentitySigner>,
}

/// What signs an instance's identity document: the key is the caller's,
/// the renderer only hands it the document's exact bytes. Each answers the
/// file's body as EC2 serves it (base64 in 64-column lines, no armour).
/// Signing is a pure function of the key and the bytes.
pub trait IdentitySigner: std::fmt::Debug {
    /// `signature`: RSA PKCS#1 v1.5, SHA-256.
    fn signature(&self, document: &[u8]) -> Vec<u8>;
    /// `pkcs7`: CMS SignedData, detached, with the signer's certificate.
    fn pkcs7(&self, document: &[u8]) -> Vec<u8>;
    /// `rsa2048`: the same SignedData with the document inside.
    fn rsa2048(&self, document: &[u8]) -> Vec<u8>;
}

/// The signed forms of the identity document, by file name: answers under
/// them depend on the signer's key, so they are cached under its id.
pub const SIGNED_IDENTITY_FILES: &[&str] = &["signature", "pkcs7", "rsa2048"];

/// What EC2 `security-groups` shows until instances have groups of their own.
pub const DEFAULT_SECURITY_GROUPS: &[&str] = &["default"];

static NO_DYNAMIC_VENDOR_DATA: std::collections::BTreeMap<String, serde_json::Value> =
    std::collections::BTreeMap::new();

impl<'a> Context<'a> {
    /// The context every front end uses (the metadata service, config
    /// drives), so that what they render cannot drift apart: no dynamic
    /// vendordata and the default security groups unless told otherwise.
    pub fn new(today: &'a str, vendor_data: &'a serde_json::Value) -> Self {
        Context {
            today,
            vendor_data,
            dynamic_vendor_data: &NO_DYNAMIC_VENDOR_DATA,
            security_groups: DEFAULT_SECURITY_GROUPS,
            identity: None,
        }
    }

    /// The same, with a signer for the identity document.
    pub fn with_identity(mut self, signer: &'a dyn IdentitySigner) -> Self {
        self.identity = Some(signer);
        self
    }

    /// The same, with the dynamic vendordata fetched for this instance.
    pub fn with_dynamic(
        mut self,
        dynamic: &'a std::collections::BTreeMap<String, serde_json::Value>,
    ) -> Self {
        self.dynamic_vendor_data = dynamic;
        self
    }
}

/// A node of a metadata tree.
pub enum Node<'a> {
    /// A document; the closure renders its bytes.
    File(Box<dyn Fn() -> Vec<u8> + 'a>),
    /// A directory; the closure lists its entries in order.
    Dir(Box<dyn Fn() -> Vec<Entry<'a>> + 'a>),
}

/// One entry of a directory.
pub struct Entry<'a> {
    /// The path segment that reaches the child.
    pub name: String,
    /// What a listing shows instead of `name`, e.g. EC2's `0=keyname`.
    pub label: Option<String>,
    /// Reachable but left out of listings (e.g. `openstack` under `/`).
    pub hidden: bool,
    pub node: Node<'a>,
}

impl<'a> Entry<'a> {
    pub fn file(name: impl Into<String>, f: impl Fn() -> Vec<u8> + 'a) -> Self {
        Entry {
            name: name.into(),
            label: None,
            hidden: false,
            node: Node::File(Box::new(f)),
        }
    }
    pub fn dir(name: impl Into<String>, f: impl Fn() -> Vec<Entry<'a>> + 'a) -> Self {
        Entry {
            name: name.into(),
            label: None,
            hidden: false,
            node: Node::Dir(Box::new(f)),
        }
    }
    /// An entry for a node built elsewhere (e.g. a whole version tree).
    pub fn node(name: impl Into<String>, node: Node<'a>) -> Self {
        Entry {
            name: name.into(),
            label: None,
            hidden: false,
            node,
        }
    }
    pub fn text(name: impl Into<String>, value: impl Into<String>) -> Self {
        let v: String = value.into();
        Entry::file(name, move || v.clone().into_bytes())
    }
    pub fn labelled(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }
    pub fn hidden(mut self) -> Self {
        self.hidden = true;
        self
    }
}

/// What a path resolves to.
pub enum Resolved {
    File(Vec<u8>),
    /// A listing as EC2 writes it: one entry per line, sub-directories with a
    /// trailing `/`, no trailing newline.
    Listing(Vec<u8>),
}

impl<'a> Node<'a> {
    /// Follow `segments` (already split, none empty) from this node.
    pub fn resolve(&self, segments: &[&str]) -> Option<Resolved> {
        match (self, segments.split_first()) {
            (Node::File(f), None) => Some(Resolved::File(f())),
            (Node::Dir(_), None) => Some(Resolved::Listing(self.listing())),
            (Node::File(_), Some(_)) => None,
            (Node::Dir(d), Some((first, rest))) => {
                let entries = d();
                let child = entries.into_iter().find(|e| e.name == *first)?;
                child.node.resolve(rest)
            }
        }
    }

    /// The listing of a directory (empty for a file).
    pub fn listing(&self) -> Vec<u8> {
        let Node::Dir(d) = self else {
            return Vec::new();
        };
        let lines: Vec<String> = d()
            .into_iter()
            .filter(|e| !e.hidden)
            .map(|e| match (&e.label, &e.node) {
                (Some(l), _) => l.clone(),
                (None, Node::Dir(_)) => format!("{}/", e.name),
                (None, Node::File(_)) => e.name.clone(),
            })
            .collect();
        lines.join("\n").into_bytes()
    }

    /// Every file under this node, as (path relative to it, bytes), depth
    /// first in listing order, hidden entries included. For config drives.
    pub fn files(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        self.collect("", &mut out);
        out
    }

    fn collect(&self, prefix: &str, out: &mut Vec<(String, Vec<u8>)>) {
        match self {
            Node::File(f) => out.push((prefix.to_string(), f())),
            Node::Dir(d) => {
                for e in d() {
                    let p = if prefix.is_empty() {
                        e.name.clone()
                    } else {
                        format!("{prefix}/{}", e.name)
                    };
                    e.node.collect(&p, out);
                }
            }
        }
    }
}

/// The whole tree a guest sees at `/`: the EC2 versions (listed), and
/// `openstack`, `cradle` and `ganeti` (reachable, not listed — EC2's root
/// listing has versions only).
pub fn root<'a>(instance: &'a Instance, ctx: &'a Context<'a>) -> Node<'a> {
    Node::Dir(Box::new(move || {
        let mut entries: Vec<Entry<'a>> = EC2_VERSIONS
            .iter()
            .copied()
            .chain(std::iter::once("latest"))
            .map(|v| Entry {
                name: v.to_string(),
                // EC2 lists versions bare, without the directory slash.
                label: Some(v.to_string()),
                hidden: false,
                node: ec2_version(instance, ctx, v).expect("listed version exists"),
            })
            .collect();
        entries.push(Entry {
            name: "openstack".into(),
            label: None,
            hidden: true,
            node: openstack_versions(instance, ctx),
        });
        entries.push(Entry {
            name: "cradle".into(),
            label: None,
            hidden: true,
            node: native(instance, ctx),
        });
        entries.push(Entry {
            name: "ganeti".into(),
            label: None,
            hidden: true,
            node: native(instance, ctx),
        });
        entries
    }))
}

/// A JSON object with its keys in sorted order whatever serde_json's map
/// type is: sorting before inserting gives the same bytes with or without
/// the `preserve_order` feature, which another crate could switch on.
pub(crate) fn json_object<const N: usize>(
    mut pairs: [(&str, serde_json::Value); N],
) -> serde_json::Value {
    pairs.sort_by(|a, b| a.0.cmp(b.0));
    serde_json::Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// Compact JSON bytes. Serializing a `Value` or a map of them with string
/// keys cannot fail, so there is no error to hand on.
pub(crate) fn to_json(v: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(v).expect("JSON values always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{instance, listing, with_ctx};

    #[test]
    fn root_lists_ec2_versions_then_latest_only() {
        let inst = instance();
        with_ctx("2025-06-01", |ctx| {
            let want: Vec<&str> = EC2_VERSIONS.iter().copied().chain(["latest"]).collect();
            assert_eq!(listing(&root(&inst, ctx), "").unwrap(), want.join("\n"));
        });
    }

    #[test]
    fn root_reaches_hidden_trees() {
        let inst = instance();
        with_ctx("2025-06-01", |ctx| {
            let r = root(&inst, ctx);
            assert!(listing(&r, "openstack").unwrap().ends_with("\nlatest"));
            assert_eq!(listing(&r, "cradle").unwrap(), "latest/");
            assert_eq!(
                listing(&r, "ganeti/latest").unwrap(),
                "events\nmeta_data.json\nos/"
            );
            assert!(r.resolve(&["nonesuch"]).is_none());
        });
    }

    #[test]
    fn json_object_sorts_keys() {
        let v = json_object([("b", 1.into()), ("a", 2.into())]);
        assert_eq!(String::from_utf8(to_json(&v)).unwrap(), r#"{"a":2,"b":1}"#);
    }
}
