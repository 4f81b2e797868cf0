//! How `cradle instance add`, `show`, `modify`, `start` and `stop` print
//! an instance: a table of its fields, or its view as JSON.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Result;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use cradle_model::api::InstanceView;

use crate::Output;

pub(crate) fn print_instance(out: &mut impl Write, output: Output, v: &InstanceView) -> Result<()> {
    if output == Output::Json {
        writeln!(out, "{}", serde_json::to_string_pretty(v)?)?;
        return Ok(());
    }
    let join = |m: &BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let os = match (&v.os_type, &v.os_image) {
        (Some(t), _) => format!("type {t}"),
        (_, Some(i)) => format!("image {i}"),
        _ => "-".into(),
    };
    let rows: Vec<(&str, String)> = vec![
        ("id", v.id.to_string()),
        ("name", v.name.clone()),
        ("state", v.state.as_str().into()),
        (
            "state reason",
            v.state_reason.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "boot roles",
            if v.boot_roles.is_empty() {
                "-".into()
            } else {
                v.boot_roles.join(", ")
            },
        ),
        ("project", v.project_id.clone()),
        ("hostname", v.hostname.clone()),
        ("availability zone", v.availability_zone.clone()),
        ("launch index", v.launch_index.to_string()),
        ("instance type", v.instance_type.clone()),
        ("metadata address", v.metadata_address.to_string()),
        ("mac", v.mac.clone()),
        (
            "local ipv4",
            v.local_ipv4
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "local ipv6",
            v.local_ipv6
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "link-local ipv6",
            v.link_local_ipv6
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "interface",
            v.interface.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "public ipv4",
            v.public_ipv4
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        ("os", os),
        (
            "personalization",
            match (&v.personalization_url, &v.personalization_sha256) {
                (Some(u), Some(h)) => format!("{u} (sha256 {h})"),
                (Some(u), None) => u.clone(),
                _ => "-".into(),
            },
        ),
        (
            "disks",
            if v.disks.is_empty() {
                "-".into()
            } else {
                v.disks
                    .iter()
                    .map(|d| format!("{} ({})", d.path, d.format.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
        ("memory", format!("{} MiB", v.memory_mib)),
        (
            "install params",
            if v.install_params.is_empty() {
                "-".into()
            } else {
                serde_json::to_string(&v.install_params).unwrap_or_default()
            },
        ),
        ("vcpus", v.vcpus.to_string()),
        (
            "communication",
            if v.run_params.communication {
                "on"
            } else {
                "off"
            }
            .into(),
        ),
        (
            "run kernel",
            match &v.run_params.kernel {
                Some(k) => serde_json::to_string(k).unwrap_or_default(),
                None => "-".into(),
            },
        ),
        ("agent", crate::agent::summary(v.agent.as_ref())),
        ("imds tokens", v.imds_tokens.as_str().into()),
        ("metadata", join(&v.metadata)),
        ("tags", join(&v.tags)),
        (
            "metadata tags",
            if v.metadata_tags { "on" } else { "off" }.into(),
        ),
        (
            "maintenance",
            v.maintenance
                .iter()
                .filter(|e| !e.state.is_finished())
                .map(|e| format!("{} {} {}", e.id, e.code.as_str(), e.state.as_str()))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        (
            "public keys",
            v.public_keys.keys().cloned().collect::<Vec<_>>().join(", "),
        ),
        (
            "user data",
            v.user_data
                .as_ref()
                .map(|u| format!("{} bytes", B64.decode(u).map(|b| b.len()).unwrap_or(0)))
                .unwrap_or_else(|| "-".into()),
        ),
        ("public params", join(&v.os_params.public)),
        ("private params", v.os_params.private.join(", ")),
        ("secret params", v.os_params.secret.join(", ")),
        ("password set", v.password_set.to_string()),
        ("created", v.created_at.to_string()),
        ("updated", v.updated_at.to_string()),
    ];
    for (k, val) in rows {
        writeln!(out, "{k:<18} {val}")?;
    }
    Ok(())
}
