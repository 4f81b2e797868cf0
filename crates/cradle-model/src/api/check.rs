//! The checks every field of a create or modify request goes through,
//! each naming the field it refuses, so every caller gets the same rules
//! and the same messages.

use super::*;

pub(super) fn check_text(field: &str, v: &str, max: usize) -> Result<(), Invalid> {
    if v.is_empty() {
        return invalid(field, "must not be empty");
    }
    if v.chars().count() > max {
        return invalid(field, format!("is longer than {max} characters"));
    }
    if v.chars().any(char::is_control) {
        return invalid(field, "must not contain control characters");
    }
    Ok(())
}

pub(super) fn check_name(v: &str) -> Result<(), Invalid> {
    check_text("name", v, 255)?;
    if v.contains('/') {
        return invalid("name", "must not contain '/'");
    }
    if v.trim() != v {
        return invalid("name", "must not start or end with whitespace");
    }
    if Uuid::parse_str(v).is_ok() {
        return invalid(
            "name",
            "must not be a UUID (it would be mistaken for an id)",
        );
    }
    Ok(())
}

/// A hostname as RFC 1123 allows; stored lower-case.
pub(super) fn parse_hostname(v: &str) -> Result<String, Invalid> {
    parse_host_name("hostname", v)
}

/// A hostname in `field`, lower-cased: an instance's own, and a cluster
/// host's name (`[cluster] host`, an instance's `host`, a migration's `to`).
pub fn parse_host_name(field: &str, v: &str) -> Result<String, Invalid> {
    if v.is_empty() || v.len() > 253 {
        return invalid(field, "must be 1 to 253 characters");
    }
    for label in v.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return invalid(
                field,
                format!(
                    "{v:?} is not a valid hostname (labels of 1-63 letters, digits and inner hyphens)"
                ),
            );
        }
    }
    Ok(v.to_ascii_lowercase())
}

/// The hostname Nova would derive from a display name.
pub(super) fn hostname_from_name(name: &str, id: Uuid) -> String {
    let mut h: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    h.truncate(63);
    let h = h.trim_matches('-').to_string();
    if h.is_empty() {
        format!("instance-{}", &id.simple().to_string()[..8])
    } else {
        h
    }
}

pub(super) fn parse_user_data(v: &str) -> Result<Vec<u8>, Invalid> {
    let bytes = B64
        .decode(v.as_bytes())
        .or_else(|_| invalid("user_data", "is not valid base64"))?;
    if bytes.len() > MAX_USER_DATA {
        return invalid(
            "user_data",
            format!(
                "is {} bytes; at most {MAX_USER_DATA} are allowed",
                bytes.len()
            ),
        );
    }
    Ok(bytes)
}

pub(super) fn check_metadata(m: &BTreeMap<String, String>) -> Result<(), Invalid> {
    if m.len() > MAX_METADATA_ITEMS {
        return invalid(
            "metadata",
            format!("has {} items; at most {MAX_METADATA_ITEMS}", m.len()),
        );
    }
    for (k, v) in m {
        check_text("metadata key", k, MAX_METADATA_KEY)?;
        if v.chars().count() > MAX_METADATA_VALUE {
            return invalid(
                format!("metadata.{k}"),
                format!("is longer than {MAX_METADATA_VALUE} characters"),
            );
        }
    }
    Ok(())
}

/// An OpenSSH public key line: `<type> <base64 blob> [comment]`, where the
/// blob names the same type.
pub fn check_openssh_key(field: &str, key: &str) -> Result<(), Invalid> {
    const TYPES: &[&str] = &[
        "ssh-ed25519",
        "ssh-rsa",
        "ssh-dss",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    let bad = |why: &str| invalid(field, format!("is not an OpenSSH public key: {why}"));
    if key.contains(['\n', '\r']) {
        return bad("it spans several lines");
    }
    let mut parts = key.split_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return bad("expected \"<type> <base64> [comment]\"");
    };
    if !TYPES.contains(&kind) {
        return bad(&format!("unknown key type {kind:?}"));
    }
    let Ok(raw) = B64.decode(blob) else {
        return bad("the key data is not base64");
    };
    let named = raw
        .get(..4)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
        .and_then(|n| raw.get(4..4 + n));
    if named != Some(kind.as_bytes()) {
        return bad("the key data does not match its type");
    }
    Ok(())
}

pub(super) fn check_public_keys(m: &BTreeMap<String, String>) -> Result<(), Invalid> {
    if m.len() > MAX_PUBLIC_KEYS {
        return invalid(
            "public_keys",
            format!("has {} keys; at most {MAX_PUBLIC_KEYS}", m.len()),
        );
    }
    for (name, key) in m {
        check_text("public_keys name", name, 255)?;
        if name.contains('/') || name.contains('=') {
            return invalid(
                "public_keys name",
                format!("{name:?} must not contain '/' or '='"),
            );
        }
        check_openssh_key(&format!("public_keys.{name}"), key)?;
    }
    Ok(())
}

/// Injected files: absolute guest paths, decoded contents within limits.
pub(super) fn parse_files(
    m: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, Vec<u8>>, Invalid> {
    if m.len() > MAX_FILES {
        return invalid(
            "files",
            format!("has {} files; at most {MAX_FILES}", m.len()),
        );
    }
    m.iter()
        .map(|(path, contents)| {
            check_file_path(path)?;
            let bytes = B64
                .decode(contents.as_bytes())
                .or_else(|_| invalid(format!("files.{path}"), "is not valid base64"))?;
            if bytes.len() > MAX_FILE_BYTES {
                return invalid(
                    format!("files.{path}"),
                    format!(
                        "is {} bytes; at most {MAX_FILE_BYTES} are allowed",
                        bytes.len()
                    ),
                );
            }
            Ok((path.clone(), bytes))
        })
        .collect()
}

pub(super) fn check_file_path(path: &str) -> Result<(), Invalid> {
    let ok = path.starts_with('/')
        && path.len() <= MAX_FILE_PATH
        && !path.chars().any(char::is_control)
        && path[1..]
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    if !ok {
        return invalid(
            "files",
            format!(
                "{path:?} must be an absolute path of at most {MAX_FILE_PATH} bytes without empty, '.' or '..' segments"
            ),
        );
    }
    Ok(())
}

/// The address a guest's requests come from. IPv4-mapped IPv6 is stored as IPv4
/// so that a dual-stack listener finds it.
pub fn parse_metadata_address(v: &str) -> Result<IpAddr, Invalid> {
    let field = "metadata_address";
    let ip: IpAddr = v
        .parse()
        .or_else(|_| invalid(field, format!("{v:?} is not an IP address")))?;
    let ip = ip.to_canonical();
    let refused = match ip {
        IpAddr::V4(a) => a.is_unspecified() || a.is_broadcast() || a.is_multicast(),
        IpAddr::V6(a) => a.is_unspecified() || a.is_multicast(),
    };
    if refused {
        return invalid(field, format!("{ip} cannot be a guest's source address"));
    }
    Ok(ip)
}

/// A unicast MAC, returned lower-case.
pub fn parse_mac(v: &str) -> Result<String, Invalid> {
    let octets: Vec<&str> = v.split(':').collect();
    let ok = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
    if !ok {
        return invalid(
            "mac",
            format!("{v:?} is not a MAC address like fa:16:3e:12:34:56"),
        );
    }
    let first = u8::from_str_radix(octets[0], 16).unwrap_or(0);
    if first & 1 == 1 {
        return invalid("mac", format!("{v} is a multicast address"));
    }
    Ok(v.to_ascii_lowercase())
}

pub(super) fn mac_from_id(id: Uuid) -> String {
    let b = id.as_bytes();
    format!("fa:16:3e:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

pub(super) fn parse_ipv4(field: &str, v: &str) -> Result<Ipv4Addr, Invalid> {
    v.parse()
        .or_else(|_| invalid(field, format!("{v:?} is not an IPv4 address")))
}

pub(super) fn parse_host_addr(v: &str) -> Result<HostAddr, Invalid> {
    v.parse().or_else(|e: String| invalid("local_ipv4", e))
}

pub(super) fn parse_ipv6(v: &str) -> Result<Ipv6Addr, Invalid> {
    v.parse()
        .or_else(|_| invalid("local_ipv6", format!("{v:?} is not an IPv6 address")))
}

pub(super) fn parse_link_local(v: &str) -> Result<Ipv6Addr, Invalid> {
    match v.parse::<Ipv6Addr>() {
        Ok(a) if a.is_unicast_link_local() => Ok(a),
        Ok(_) => invalid(
            "link_local_ipv6",
            format!("{v:?} is not a link-local address (fe80::/10)"),
        ),
        Err(_) => invalid("link_local_ipv6", format!("{v:?} is not an IPv6 address")),
    }
}

/// A Linux interface name: 1 to 15 bytes, no `/`, whitespace or `:`, not
/// `.` or `..`.
pub(super) fn parse_interface(v: &str) -> Result<String, Invalid> {
    if !crate::is_interface_name(v) {
        return invalid(
            "interface",
            format!("{v:?} is not an interface name (1 to 15 of A-Z a-z 0-9 - _ .)"),
        );
    }
    Ok(v.to_string())
}

pub(super) fn parse_dns(v: &[String]) -> Result<Vec<IpAddr>, Invalid> {
    v.iter()
        .map(|s| {
            s.parse()
                .or_else(|_| invalid("dns_nameservers", format!("{s:?} is not an IP address")))
        })
        .collect()
}

pub(super) fn check_os(field: &str, v: &str) -> Result<(), Invalid> {
    check_text(field, v, 1024)
}

pub(super) fn check_param_name(name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok {
        return invalid(
            "os_params",
            format!("parameter name {name:?} must be 1-64 letters, digits or underscores"),
        );
    }
    Ok(())
}

pub(super) fn check_param_value(name: &str, len: usize) -> Result<(), Invalid> {
    if len > MAX_OS_PARAM_VALUE {
        return invalid(
            "os_params",
            format!("parameter {name:?} is longer than {MAX_OS_PARAM_VALUE} bytes"),
        );
    }
    Ok(())
}

/// Names must be unique across visibilities, ignoring case, because OS
/// scripts see them as `OSP_<NAME>` environment variables.
pub(super) fn check_os_params(p: &OsParams) -> Result<(), Invalid> {
    let mut seen = BTreeSet::new();
    let names = p
        .public
        .iter()
        .map(|(k, v)| (k, v.len()))
        .chain(p.private.iter().map(|(k, v)| (k, v.expose().len())))
        .chain(p.secret.iter().map(|(k, v)| (k, v.expose().len())));
    let mut count = 0;
    for (name, len) in names {
        count += 1;
        check_param_name(name)?;
        check_param_value(name, len)?;
        if !seen.insert(name.to_ascii_uppercase()) {
            return invalid(
                "os_params",
                format!("parameter {name:?} is given in more than one visibility"),
            );
        }
    }
    if count > MAX_OS_PARAMS {
        return invalid(
            "os_params",
            format!("has {count} parameters; at most {MAX_OS_PARAMS}"),
        );
    }
    Ok(())
}

pub(super) fn parse_personalization(
    url: Option<String>,
    sha256: Option<String>,
) -> Result<(Option<String>, Option<String>), Invalid> {
    if let Some(u) = &url {
        personalization::check_url(u).or_else(|m| invalid("personalization_url", m))?;
    }
    let sha256 = sha256
        .map(|h| {
            personalization::parse_sha256(&h).or_else(|m| invalid("personalization_sha256", m))
        })
        .transpose()?;
    if url.is_none() && sha256.is_some() {
        return invalid(
            "personalization_sha256",
            "pins a package, but the instance has no personalization_url",
        );
    }
    Ok((url, sha256))
}

pub(super) fn check_params(p: &OsParams) -> Result<(), Invalid> {
    check_os_params(p)?;
    personalization::check_credential_params(p).or_else(|m| invalid("os_params", m))
}

pub(super) fn resolve_os(
    os_type: Option<String>,
    os_image: Option<String>,
) -> Result<Option<Os>, Invalid> {
    match (os_type, os_image) {
        (Some(_), Some(_)) => invalid("os_type", "os_type and os_image are mutually exclusive"),
        (Some(t), None) => check_os("os_type", &t).map(|_| Some(Os::Type(t))),
        (None, Some(m)) => check_os("os_image", &m).map(|_| Some(Os::Image(m))),
        (None, None) => Ok(None),
    }
}
