//! The JSON nft reads (`{"nftables": [...]}`), as small typed values with
//! their serde shapes, and [`Cmds`], which builds one transaction's commands
//! for one table. What the commands say is decided in `render` and `plan`;
//! nothing here runs nft.
//!
//! The commands are typed values serialized with serde, not
//! `serde_json::Value` trees: a table of 10,000 instances is 200,000 rules,
//! and a `Value` per node costs a second or more to build and drop. A
//! `Value` is made only for showing ([`render_full`](super::render_full),
//! [`Plan::doc`](super::Plan::doc)).

use std::sync::Arc;

use serde::{Serialize, Serializer};
use serde_json::Value;

pub(super) const FAMILY: &str = "inet";

/// A string shared by many commands (the table's name, a chain's name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Name(Arc<str>);

impl Name {
    pub(super) fn new(s: &str) -> Name {
        Name(Arc::from(s))
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// One command of a transaction: `{"add": {"rule": {...}}}` and the like.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Cmd {
    Add(Obj),
    Delete(Obj),
    Flush(Obj),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verb {
    Add,
    Delete,
    Flush,
}

impl Verb {
    fn cmd(self, obj: Obj) -> Cmd {
        match self {
            Verb::Add => Cmd::Add(obj),
            Verb::Delete => Cmd::Delete(obj),
            Verb::Flush => Cmd::Flush(obj),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Obj {
    Table {
        family: &'static str,
        name: Name,
    },
    Set {
        family: &'static str,
        table: Name,
        name: String,
        #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
        ty: Option<SetType>,
    },
    Map {
        family: &'static str,
        table: Name,
        name: &'static str,
        #[serde(rename = "type")]
        ty: &'static str,
        map: &'static str,
    },
    Chain {
        family: &'static str,
        table: Name,
        name: Name,
    },
    #[serde(rename = "chain")]
    BaseChain {
        family: &'static str,
        table: Name,
        name: &'static str,
        #[serde(rename = "type")]
        ty: &'static str,
        hook: &'static str,
        prio: i32,
        policy: &'static str,
    },
    Rule {
        family: &'static str,
        table: Name,
        chain: Name,
        expr: Rule,
    },
    Element {
        family: &'static str,
        table: Name,
        name: String,
        elem: Vec<ElemOut>,
    },
}

/// The statements of one rule.
pub(super) type Rule = Vec<Expr>;

/// A set's type: one name (`"ifname"`), or a concatenation (a list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SetType(&'static [&'static str]);

impl Serialize for SetType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            [one] => s.serialize_str(one),
            many => many.serialize(s),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Expr {
    Match {
        op: &'static str,
        left: Left,
        right: Right,
    },
    Accept(()),
    Drop(()),
    Return(()),
    Jump {
        target: Name,
    },
    Vmap {
        key: Left,
        data: &'static str,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Left {
    Meta {
        key: &'static str,
    },
    Payload {
        protocol: &'static str,
        field: &'static str,
    },
    Ct {
        key: &'static str,
    },
    Concat(Vec<Left>),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub(super) enum Right {
    Static(&'static str),
    Str(String),
    Num(u32),
    /// Flags of a bitmask type (`ct state`): a bitmask test, not a set.
    Flags(&'static [&'static str]),
    Prefix {
        prefix: Prefix,
    },
    Range {
        range: [u16; 2],
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct Prefix {
    pub(super) addr: String,
    pub(super) len: u8,
}

/// A set element as a key, or a map element as `[key, verdict]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub(super) enum ElemOut {
    Key(Key),
    Mapping(Key, Expr),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub(super) enum Key {
    One(String),
    Concat { concat: Vec<String> },
}

/// A whole transaction, as nft reads it.
#[derive(Serialize)]
pub(super) struct Doc<'a> {
    pub(super) nftables: &'a [Cmd],
}

pub(super) fn to_value(cmds: &[Cmd]) -> Value {
    serde_json::to_value(Doc { nftables: cmds }).expect("nft commands serialize")
}

/// The statements of one transaction, for one table.
pub(super) struct Cmds {
    table: Name,
    pub(super) out: Vec<Cmd>,
}

impl Cmds {
    pub(super) fn new(table: &str) -> Self {
        Cmds {
            table: Name::new(table),
            out: Vec::new(),
        }
    }

    pub(super) fn table(&mut self, verb: Verb) {
        self.out.push(verb.cmd(Obj::Table {
            family: FAMILY,
            name: self.table.clone(),
        }));
    }

    pub(super) fn set(&mut self, verb: Verb, name: String, ty: Option<&'static [&'static str]>) {
        let ty = ty.map(SetType);
        self.out.push(verb.cmd(Obj::Set {
            family: FAMILY,
            table: self.table.clone(),
            name,
            ty,
        }));
    }

    pub(super) fn map(&mut self, name: &'static str) {
        self.out.push(Cmd::Add(Obj::Map {
            family: FAMILY,
            table: self.table.clone(),
            name,
            ty: "ifname",
            map: "verdict",
        }));
    }

    pub(super) fn chain(&mut self, verb: Verb, name: &Name) {
        self.out.push(verb.cmd(Obj::Chain {
            family: FAMILY,
            table: self.table.clone(),
            name: name.clone(),
        }));
    }

    pub(super) fn base_chain(&mut self, name: &'static str, hook: &'static str, prio: i32) {
        self.out.push(Cmd::Add(Obj::BaseChain {
            family: FAMILY,
            table: self.table.clone(),
            name,
            ty: "filter",
            hook,
            prio,
            policy: "accept",
        }));
    }

    pub(super) fn rule(&mut self, chain: &Name, expr: Rule) {
        self.out.push(Cmd::Add(Obj::Rule {
            family: FAMILY,
            table: self.table.clone(),
            chain: chain.clone(),
            expr,
        }));
    }

    pub(super) fn elements(&mut self, verb: Verb, set: &str, elem: Vec<ElemOut>) {
        if elem.is_empty() {
            return;
        }
        self.out.push(verb.cmd(Obj::Element {
            family: FAMILY,
            table: self.table.clone(),
            name: set.to_string(),
            elem,
        }));
    }
}
