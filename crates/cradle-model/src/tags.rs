//! Instance tags (EC2's): a map of key to value an operator gives an
//! instance, which its guest reads at `meta-data/tags/instance/KEY` when
//! the instance's `metadata_tags` switch is on.

use std::collections::BTreeMap;

use crate::api::Invalid;

/// Tags per instance.
pub const MAX_TAGS: usize = 50;
/// Longest key, in characters.
pub const MAX_KEY: usize = 128;
/// Longest value, in characters.
pub const MAX_VALUE: usize = 256;

fn invalid(message: String) -> Result<(), Invalid> {
    Err(Invalid {
        field: "tags".into(),
        message,
    })
}

/// Whether `key` can be a path segment of the metadata service: letters,
/// digits and `+ - = . , _ : @` (EC2 allows spaces too; cradle's metadata
/// service refuses percent-encoded paths, so a space could not be asked
/// for), never `.` or `..`.
pub fn is_metadata_key(key: &str) -> bool {
    key != "."
        && key != ".."
        && key
            .chars()
            .all(|c| c.is_alphanumeric() || "+-=.,_:@".contains(c))
}

/// Check `tags` as EC2 does (at most [`MAX_TAGS`], keys of 1 to
/// [`MAX_KEY`] characters not starting `aws:`, values of at most
/// [`MAX_VALUE`]), and, when they are served as metadata, that every key is
/// [`is_metadata_key`].
pub fn check_tags(tags: &BTreeMap<String, String>, metadata_tags: bool) -> Result<(), Invalid> {
    if tags.len() > MAX_TAGS {
        return invalid(format!(
            "{} tags; at most {MAX_TAGS} are allowed",
            tags.len()
        ));
    }
    for (k, v) in tags {
        let chars = k.chars().count();
        if chars == 0 || chars > MAX_KEY {
            return invalid(format!("key {k:?} must be 1 to {MAX_KEY} characters long"));
        }
        if k.to_ascii_lowercase().starts_with("aws:") {
            return invalid(format!("key {k:?}: the prefix aws: is reserved"));
        }
        if k.chars().chain(v.chars()).any(char::is_control) {
            return invalid(format!("tag {k:?} holds a control character"));
        }
        if v.chars().count() > MAX_VALUE {
            return invalid(format!(
                "the value of {k:?} is longer than {MAX_VALUE} characters"
            ));
        }
        if metadata_tags && !is_metadata_key(k) {
            return invalid(format!(
                "key {k:?} cannot be a metadata path (metadata_tags is on): use letters, \
                 digits and + - = . , _ : @ (no spaces or /; not . or ..)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn limits_are_ec2s() {
        assert!(check_tags(&tags(&[("Name", "web 1"), ("env:tier", "a=b")]), true).is_ok());
        let many: BTreeMap<_, _> = (0..51).map(|n| (n.to_string(), String::new())).collect();
        assert!(check_tags(&many, false).unwrap_err().message.contains("50"));
        let long = "k".repeat(129);
        assert!(check_tags(&tags(&[(&long, "")]), false).is_err());
        assert!(check_tags(&tags(&[("k", &"v".repeat(257))]), false).is_err());
        assert!(check_tags(&tags(&[("aws:x", "")]), false).is_err());
    }

    #[test]
    fn metadata_keys_are_path_segments() {
        for k in ["a/b", ".", "..", "has space"] {
            assert!(check_tags(&tags(&[(k, "")]), false).is_ok(), "{k}");
            let e = check_tags(&tags(&[(k, "")]), true).unwrap_err();
            assert!(e.message.contains("metadata path"), "{e}");
        }
    }
}
