//! `cradle secgroup …`: security groups, their rules, and a tenant's default
//! rules, through the admin API's native routes under `/v1/tenants/{tenant}/`.
//!
//! Rule values go to the server as given: it checks them and answers a bad
//! one with a 400 naming the field. Only `--ports FROM-TO` is parsed here.

use std::collections::HashMap;
use std::io::Write;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use cradle_client::route;
use cradle_secgroups::api::{GroupPatch, GroupRequest};
use cradle_secgroups::{GroupView, RuleRequest, RuleView};
use serde_json::{Value, json};

use crate::client::Api;
use crate::instance::table;
use crate::{ApiArgs, Output};

const ABOUT_GROUPS: &str = "\
Every instance has its own group (named cradle-sg-<instance id>), made with it, seeded from its \
tenant's default rules, and removed with it. Tenant groups are made with `secgroup create` and \
attached to any number of the tenant's instances. An instance's rules are those of every group \
it is in.\n\n\
Rules only allow: ingress to an enforced instance is dropped unless a rule allows it; egress \
is allowed unless the instance has egress rules, and then only what they allow. Only instances \
with an --interface are enforced (see `cradle firewall`).\n\n\
GROUP is a group id, an instance id (its own group), a group name, or an instance name. The \
tenant is an instance's --project; another tenant's groups are not found.";

#[derive(Args, Debug)]
#[command(after_help = ABOUT_GROUPS)]
pub struct SecgroupArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: SecgroupCommand,
}

/// Whose groups: every verb names the tenant.
#[derive(Args, Debug)]
struct Tenant {
    /// The tenant (an instance's --project) the groups belong to.
    #[arg(long, env = "CRADLE_TENANT")]
    tenant: String,
}

#[derive(Subcommand, Debug)]
enum SecgroupCommand {
    /// List the tenant's groups: its tenant groups and its instances' own groups.
    List {
        #[command(flatten)]
        tenant: Tenant,
    },
    /// Show a group and its rules.
    #[command(after_help = ABOUT_GROUPS)]
    Show {
        /// Group id, instance id (its own group), group name or instance name.
        group: String,
        #[command(flatten)]
        tenant: Tenant,
    },
    /// Make a tenant group, with no rules; add rules, then attach it to instances.
    Create {
        /// Its name, unique in the tenant (not starting with cradle-sg-).
        name: String,
        /// What it is for.
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        tenant: Tenant,
    },
    /// Rename a tenant group or change its description (instance groups are
    /// fixed).
    Update {
        /// Group id or name.
        group: String,
        /// Its new name, unique in the tenant.
        #[arg(long)]
        name: Option<String>,
        /// Its new description.
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        tenant: Tenant,
    },
    /// Delete a tenant group and its rules. It must be detached from every
    /// instance and named as remote by no other rule. Instance groups go
    /// with their instance.
    Delete {
        /// Group id or name.
        group: String,
        #[command(flatten)]
        tenant: Tenant,
    },
    /// Attach a tenant group to an instance of the tenant: the group's rules
    /// apply to the instance, and rules naming the group as remote match the
    /// instance's addresses.
    Attach {
        /// Group id or name (a tenant group, not an instance's own).
        group: String,
        /// Instance id or name.
        instance: String,
        #[command(flatten)]
        tenant: Tenant,
    },
    /// Detach a tenant group from an instance.
    Detach {
        /// Group id or name.
        group: String,
        /// Instance id or name.
        instance: String,
        #[command(flatten)]
        tenant: Tenant,
    },
    /// Add rules to a group, or delete them.
    #[command(subcommand, subcommand_required = true)]
    Rule(RuleCommand),
    /// The tenant's default rules: copied into the own group of each instance
    /// made afterwards (existing instances keep their rules).
    #[command(subcommand, subcommand_required = true)]
    Default(DefaultCommand),
}

const ABOUT_RULES: &str = "\
Without flags a rule allows ingress of every protocol from anywhere over IPv4. The ethertype \
follows --cidr when given (IPv6 for an IPv6 network, and for --protocol icmpv6). Ports are \
destination ports, for tcp and udp only; --icmp-type and --icmp-code are for icmp (IPv4) and \
icmpv6 (IPv6) only. The server checks every value and names the one that is wrong.\n\n\
Examples:\n  cradle secgroup rule add web --tenant t1 --protocol tcp --port 443\n  \
cradle secgroup rule add web --tenant t1 --protocol tcp --ports 8000-8080 --cidr 10.0.0.0/8\n  \
cradle secgroup rule add web --tenant t1 --protocol icmp --icmp-type 8\n  \
cradle secgroup rule add web --tenant t1 --protocol tcp --port 5432 --remote-group db-clients\n  \
cradle secgroup rule add web --tenant t1 --direction egress --protocol udp --port 53";

#[derive(Subcommand, Debug)]
enum RuleCommand {
    /// Add a rule to a group; prints the new rule's id.
    #[command(after_help = ABOUT_RULES)]
    Add {
        /// Group id, instance id (its own group), group name or instance name.
        group: String,
        #[command(flatten)]
        tenant: Tenant,
        #[command(flatten)]
        rule: RuleFlags,
    },
    /// Delete a rule from whichever of the tenant's groups holds it.
    Delete {
        /// The rule's id (see `secgroup show`).
        rule_id: String,
        #[command(flatten)]
        tenant: Tenant,
    },
}

#[derive(Subcommand, Debug)]
enum DefaultCommand {
    /// List the tenant's default rules.
    List {
        #[command(flatten)]
        tenant: Tenant,
    },
    /// Add a default rule; prints its id. Only instances made afterwards get it.
    #[command(after_help = ABOUT_RULES)]
    Add {
        #[command(flatten)]
        tenant: Tenant,
        #[command(flatten)]
        rule: RuleFlags,
    },
    /// Delete a default rule. Instance groups already seeded with it keep their copy.
    Delete {
        /// The default rule's id (see `secgroup default list`).
        id: String,
        #[command(flatten)]
        tenant: Tenant,
    },
}

/// What a rule matches. Every value is passed to the server as given.
#[derive(Args, Debug)]
#[command(next_help_heading = "Rule")]
struct RuleFlags {
    /// ingress (traffic to the instance) or egress (from it) [default: ingress].
    #[arg(long, value_name = "ingress|egress")]
    direction: Option<String>,
    /// IPv4 or IPv6 [default: the family of --cidr; IPv6 for icmpv6; else IPv4].
    #[arg(long, value_name = "IPv4|IPv6")]
    ethertype: Option<String>,
    /// tcp, udp, icmp, icmpv6 or any [default: any].
    #[arg(long, value_name = "PROTOCOL")]
    protocol: Option<String>,
    /// One destination port, 1-65535 (tcp and udp) [default: every port].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    port: Option<i64>,
    /// A destination port range, both ends included (tcp and udp).
    #[arg(long, value_name = "FROM-TO", conflicts_with = "port")]
    ports: Option<String>,
    /// ICMP type, 0-255 (icmp, icmpv6) [default: every type].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    icmp_type: Option<i64>,
    /// ICMP code, 0-255; needs --icmp-type [default: every code].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    icmp_code: Option<i64>,
    /// The remote network: the source for ingress, the destination for
    /// egress; no host bits (10.0.0.0/24, not 10.0.0.1/24) [default:
    /// 0.0.0.0/0 or ::/0].
    #[arg(long, value_name = "CIDR")]
    cidr: Option<String>,
    /// The remote is the current members of this group of the tenant (id,
    /// instance id, or name): their addresses, kept up to date.
    #[arg(long, value_name = "GROUP", conflicts_with = "cidr")]
    remote_group: Option<String>,
}

pub fn run(args: SecgroupArgs) -> Result<()> {
    let api = crate::client::connect(&args.api)?;
    let output = args.output;
    let mut out = std::io::stdout().lock();
    match args.command {
        SecgroupCommand::List { tenant } => {
            let groups = api.send(route::security_groups(&tenant.tenant))?;
            match output {
                Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&groups)?)?,
                Output::Table => {
                    let rows: Vec<Vec<String>> = groups
                        .into_iter()
                        .map(|g| {
                            vec![
                                g.id.to_string(),
                                g.name,
                                g.instance_id
                                    .map(|i| i.to_string())
                                    .unwrap_or_else(|| "-".into()),
                                g.rules.len().to_string(),
                                g.instances.len().to_string(),
                            ]
                        })
                        .collect();
                    table(
                        &mut out,
                        &["ID", "NAME", "INSTANCE", "RULES", "MEMBERS"],
                        &rows,
                    )?;
                }
            }
            Ok(())
        }
        SecgroupCommand::Show { group, tenant } => {
            let t = &tenant.tenant;
            let key = resolve_group(&api, t, &group)?;
            let g = api.send(route::security_group(t, &key))?;
            print_group(&api, &mut out, output, t, &g)
        }
        SecgroupCommand::Create {
            name,
            description,
            tenant,
        } => {
            let t = &tenant.tenant;
            let request = GroupRequest { name, description };
            let g = api.send(route::create_security_group(t, &request))?;
            print_group(&api, &mut out, output, t, &g)
        }
        SecgroupCommand::Update {
            group,
            name,
            description,
            tenant,
        } => {
            let t = &tenant.tenant;
            if name.is_none() && description.is_none() {
                anyhow::bail!("nothing to change: give --name, --description or both");
            }
            let key = resolve_group(&api, t, &group)?;
            let patch = GroupPatch { name, description };
            let g = api.send(route::update_security_group(t, &key, &patch))?;
            print_group(&api, &mut out, output, t, &g)
        }
        SecgroupCommand::Delete { group, tenant } => {
            let t = &tenant.tenant;
            let key = resolve_group(&api, t, &group)?;
            api.send(route::delete_security_group(t, &key))?;
            done(
                &mut out,
                output,
                json!({ "deleted": key }),
                &format!("deleted security group {key}"),
            )
        }
        SecgroupCommand::Attach {
            group,
            instance,
            tenant,
        } => {
            let t = &tenant.tenant;
            let key = resolve_group(&api, t, &group)?;
            api.send(route::attach_group(t, &key, &instance))?;
            done(
                &mut out,
                output,
                json!({ "attached": { "group": key, "instance": instance } }),
                &format!("attached security group {key} to instance {instance}"),
            )
        }
        SecgroupCommand::Detach {
            group,
            instance,
            tenant,
        } => {
            let t = &tenant.tenant;
            let key = resolve_group(&api, t, &group)?;
            api.send(route::detach_group(t, &key, &instance))?;
            done(
                &mut out,
                output,
                json!({ "detached": { "group": key, "instance": instance } }),
                &format!("detached security group {key} from instance {instance}"),
            )
        }
        SecgroupCommand::Rule(RuleCommand::Add {
            group,
            rule,
            tenant,
        }) => {
            let t = &tenant.tenant;
            let key = resolve_group(&api, t, &group)?;
            let request = rule_request(&api, t, rule)?;
            let r = api.send(route::add_rule(t, &key, &request))?;
            print_new_rule(&mut out, output, &r)
        }
        SecgroupCommand::Rule(RuleCommand::Delete { rule_id, tenant }) => {
            api.send(route::delete_rule(&tenant.tenant, &rule_id))?;
            done(
                &mut out,
                output,
                json!({ "deleted": rule_id }),
                &format!("deleted security group rule {rule_id}"),
            )
        }
        SecgroupCommand::Default(DefaultCommand::List { tenant }) => {
            let rules = api.send(route::default_rules(&tenant.tenant))?;
            match output {
                Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&rules)?)?,
                Output::Table => rules_table(&mut out, &rules, &HashMap::new())?,
            }
            Ok(())
        }
        SecgroupCommand::Default(DefaultCommand::Add { rule, tenant }) => {
            let t = &tenant.tenant;
            let request = rule_request(&api, t, rule)?;
            let r = api.send(route::add_default_rule(t, &request))?;
            print_new_rule(&mut out, output, &r)
        }
        SecgroupCommand::Default(DefaultCommand::Delete { id, tenant }) => {
            api.send(route::delete_default_rule(&tenant.tenant, &id))?;
            done(
                &mut out,
                output,
                json!({ "deleted": id }),
                &format!("deleted default rule {id}"),
            )
        }
    }
}

/// Whether `s` is a uuid in any form the server parses (hyphenated, simple,
/// braced or urn); such a key goes to the server as it is.
fn is_uuid(s: &str) -> bool {
    let s = s.strip_prefix("urn:uuid:").unwrap_or(s);
    let s = s
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or(s);
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    (s.len() == 32 || s.len() == 36)
        && hex.len() == 32
        && hex.chars().all(|c| c.is_ascii_hexdigit())
}

/// A GROUP argument as the server takes it: a group id or an instance id.
/// Anything else is a group name of the tenant, or else an instance name.
fn resolve_group(api: &Api, tenant: &str, key: &str) -> Result<String> {
    if is_uuid(key) {
        return Ok(key.to_string());
    }
    if let Some(g) = api
        .send(route::security_groups(tenant))?
        .into_iter()
        .find(|g| g.name == key)
    {
        return Ok(g.id.to_string());
    }
    // An instance name: its own group. Another tenant's instance is as good
    // as missing.
    if let Ok(i) = api.send(route::instance(key))
        && i.project_id == tenant
    {
        return Ok(i.id.to_string());
    }
    bail!(
        "tenant {tenant:?} has no security group or instance named {key:?} \
         (give a group id, an instance id, or a name; `cradle secgroup list` shows them)"
    )
}

/// The id of a rule's remote group. The server takes only a group's own id
/// there, so an instance (id or name) is looked up to its own group's id.
fn remote_group(api: &Api, tenant: &str, key: &str) -> Result<String> {
    let key = resolve_group(api, tenant, key)?;
    Ok(api
        .send(route::security_group(tenant, &key))?
        .id
        .to_string())
}

/// A new rule: the flags as given, with `--ports` split and
/// `--remote-group` resolved to an id.
fn rule_request(api: &Api, tenant: &str, f: RuleFlags) -> Result<RuleRequest> {
    let (from_port, to_port) = match (f.port, f.ports.as_deref()) {
        (Some(p), _) => (Some(p), Some(p)),
        (None, Some(range)) => {
            let (from, to) = port_range(range)?;
            (Some(from), Some(to))
        }
        (None, None) => (None, None),
    };
    let remote_group_id = f
        .remote_group
        .as_deref()
        .map(|g| remote_group(api, tenant, g).context("--remote-group"))
        .transpose()?;
    Ok(RuleRequest {
        direction: f.direction,
        ethertype: f.ethertype,
        protocol: f.protocol,
        from_port,
        to_port,
        icmp_type: f.icmp_type,
        icmp_code: f.icmp_code,
        cidr: f.cidr,
        remote_group_id,
    })
}

/// `FROM-TO`, two whole numbers. Whether they make a valid range is the
/// server's to say.
fn port_range(s: &str) -> Result<(i64, i64)> {
    let parsed = s
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
    match parsed {
        Some(r) => Ok(r),
        None => bail!(
            "--ports expects a range FROM-TO of two port numbers, such as 8000-8080; got {s:?} \
             (use --port N for one port)"
        ),
    }
}

fn done(out: &mut impl Write, output: Output, json: Value, text: &str) -> Result<()> {
    match output {
        Output::Json => writeln!(out, "{json}")?,
        Output::Table => writeln!(out, "{text}")?,
    }
    Ok(())
}

/// A new rule: its id alone (for scripts), or the whole rule as JSON.
fn print_new_rule(out: &mut impl Write, output: Output, rule: &RuleView) -> Result<()> {
    match output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(rule)?)?,
        Output::Table => writeln!(out, "{}", rule.id)?,
    }
    Ok(())
}

fn print_group(
    api: &Api,
    out: &mut impl Write,
    output: Output,
    tenant: &str,
    g: &GroupView,
) -> Result<()> {
    if output == Output::Json {
        writeln!(out, "{}", serde_json::to_string_pretty(g)?)?;
        return Ok(());
    }
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let members: Vec<String> = g.instances.iter().map(|i| i.to_string()).collect();
    let rows = [
        ("id", g.id.to_string()),
        ("name", g.name.clone()),
        ("tenant", g.tenant.clone()),
        ("description", dash(&g.description)),
        (
            "instance",
            g.instance_id
                .map(|i| i.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        ("members", dash(&members.join(", "))),
        (
            "created",
            g.created_at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        ),
    ];
    for (k, val) in rows {
        writeln!(out, "{k:<12} {val}")?;
    }
    writeln!(out)?;
    // Name the remote groups, when some rule has one.
    let mut names = HashMap::new();
    if g.rules.iter().any(|r| r.rule.remote_group_id.is_some()) {
        for other in api.send(route::security_groups(tenant)).unwrap_or_default() {
            names.insert(other.id.to_string(), other.name);
        }
    }
    rules_table(out, &g.rules, &names)
}

fn rules_table(
    out: &mut impl Write,
    rules: &[RuleView],
    group_names: &HashMap<String, String>,
) -> Result<()> {
    let opt = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = rules
        .iter()
        .map(|v| {
            let r = &v.rule;
            let matches = match (r.from_port, r.to_port, r.icmp_type, r.icmp_code) {
                (Some(f), Some(t), _, _) if f == t => format!("port {f}"),
                (Some(f), Some(t), _, _) => format!("ports {f}-{t}"),
                (Some(p), None, _, _) | (None, Some(p), _, _) => format!("port {p}"),
                (None, None, Some(t), Some(c)) => format!("type {t} code {c}"),
                (None, None, Some(t), None) => format!("type {t}"),
                (None, None, None, _) => "all".into(),
            };
            let remote = match (&r.cidr, &r.remote_group_id) {
                (Some(c), _) => c.clone(),
                (None, Some(g)) => match group_names.get(g) {
                    Some(name) => format!("group {name} ({g})"),
                    None => format!("group {g}"),
                },
                (None, None) => "-".into(),
            };
            vec![
                v.id.to_string(),
                opt(&r.direction),
                opt(&r.ethertype),
                opt(&r.protocol),
                matches,
                remote,
            ]
        })
        .collect();
    table(
        out,
        &[
            "RULE ID",
            "DIRECTION",
            "ETHERTYPE",
            "PROTOCOL",
            "PORTS/ICMP",
            "REMOTE",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        assert_eq!(port_range("8000-8080").unwrap(), (8000, 8080));
        // Reversed or out of range is the server's to refuse, with its message.
        assert_eq!(port_range("80-22").unwrap(), (80, 22));
        for bad in ["80", "80-", "-80", "a-b", "1-2-3", ""] {
            let e = port_range(bad).unwrap_err().to_string();
            assert!(e.contains("FROM-TO"), "{bad}: {e}");
        }
    }

    #[test]
    fn uuids_go_as_they_are() {
        assert!(is_uuid("67e55044-10b1-426f-9247-bb680e5fe0c8"));
        assert!(is_uuid("67e5504410b1426f9247bb680e5fe0c8"));
        assert!(is_uuid("{67e55044-10b1-426f-9247-bb680e5fe0c8}"));
        assert!(!is_uuid("web"));
        assert!(!is_uuid("67e55044-10b1-426f-9247-bb680e5fe0c"));
        assert!(!is_uuid("67e55044-10b1-426f-9247-bb680e5fe0cg"));
    }
}
