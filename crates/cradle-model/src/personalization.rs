//! The rules for an instance's personalization package (seed 003): where it
//! comes from, what pins it, and which secret parameters carry the download
//! credentials. One place, so the admin API, the store, the CLI and the
//! fetcher agree.

use crate::OsParams;

/// The extensions a package may have; the extension decides the format.
pub const PACKAGE_EXTENSIONS: &[&str] = &[".tar.gz", ".tgz"];

/// Longest URL accepted, in bytes.
pub const MAX_URL: usize = 2048;

/// Secret parameter: the HTTP basic-auth user for the download.
pub const USER_PARAM: &str = "personalization_user";
/// Secret parameter: the HTTP basic-auth password for the download.
pub const PASSWORD_PARAM: &str = "personalization_password";
/// Secret parameter: a bearer token for the download.
pub const TOKEN_PARAM: &str = "personalization_token";

/// Every parameter name that holds a download credential.
pub const CREDENTIAL_PARAMS: &[&str] = &[USER_PARAM, PASSWORD_PARAM, TOKEN_PARAM];

/// Whether a file name or a URL path ends in a package extension.
pub fn has_package_extension(name: &str) -> bool {
    PACKAGE_EXTENSIONS.iter().any(|e| name.ends_with(e))
}

/// The URL without its query and fragment: what the extension is read from.
fn url_path(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or("")
}

/// Check a package URL: `http`, `https` or `file`, a package extension, no
/// credentials in it (they would be stored and shown; they belong in the
/// secret parameters), no whitespace or control characters.
pub fn check_url(url: &str) -> Result<(), String> {
    if url.len() > MAX_URL {
        return Err(format!("is longer than {MAX_URL} bytes"));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must not contain whitespace or control characters".into());
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!(
            "{url:?} is not a URL (http://, https:// or file://)"
        ));
    };
    match scheme {
        "http" | "https" => {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
            if authority.contains('@') {
                return Err(format!(
                    "must not carry credentials (they would be stored and shown); give them \
                     apart: on an instance, as the secret parameters {USER_PARAM} and \
                     {PASSWORD_PARAM}, or {TOKEN_PARAM}"
                ));
            }
            if authority.is_empty() {
                return Err(format!("{url:?} names no host"));
            }
        }
        "file" => {
            if !rest.starts_with('/') {
                return Err(format!("{url:?}: a file URL must be file:///absolute/path"));
            }
        }
        other => {
            return Err(format!(
                "scheme {other:?} is not supported; use http, https or file"
            ));
        }
    }
    if !has_package_extension(url_path(url)) {
        return Err(format!(
            "{url:?} must end in .tar.gz or .tgz (the extension decides the format)"
        ));
    }
    Ok(())
}

/// Where a package URL's request goes: its scheme and authority, lower
/// case (`https://pkg.example:8443`); `file://` for every file URL. Two
/// URLs with the same origin get the same credentials.
pub fn origin(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = match scheme {
        "file" => "",
        _ => rest.split(['/', '?', '#']).next().unwrap_or(""),
    };
    format!("{scheme}://{authority}").to_ascii_lowercase()
}

/// A SHA-256 pin: 64 hex digits, returned lower-case.
pub fn parse_sha256(v: &str) -> Result<String, String> {
    if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{v:?} is not a SHA-256 (64 hex digits)"));
    }
    Ok(v.to_ascii_lowercase())
}

/// Credentials live only among the secret parameters (memory only, never
/// stored), and come as a user with a password or as a token, not both.
pub fn check_credential_params(p: &OsParams) -> Result<(), String> {
    let is_credential = |k: &String| CREDENTIAL_PARAMS.iter().any(|c| c.eq_ignore_ascii_case(k));
    for (visibility, mut names) in [
        (
            "public",
            Box::new(p.public.keys()) as Box<dyn Iterator<Item = &String>>,
        ),
        ("private", Box::new(p.private.keys())),
    ] {
        if let Some(k) = names.find(|k| is_credential(k)) {
            return Err(format!(
                "parameter {k:?} holds a download credential and must be secret, not {visibility} \
                 (secret parameters are never stored)"
            ));
        }
    }
    let has = |name: &str| p.secret.keys().any(|k| k.eq_ignore_ascii_case(name));
    match (has(USER_PARAM), has(PASSWORD_PARAM), has(TOKEN_PARAM)) {
        (true, false, _) => Err(format!("{USER_PARAM} is given without {PASSWORD_PARAM}")),
        (false, true, _) => Err(format!("{PASSWORD_PARAM} is given without {USER_PARAM}")),
        (true, true, true) => Err(format!(
            "give {USER_PARAM} and {PASSWORD_PARAM}, or {TOKEN_PARAM}, not both"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Secret;

    #[test]
    fn urls() {
        for ok in [
            "http://h/p.tar.gz",
            "https://h:8443/a/b.tgz?sig=x",
            "file:///srv/pkg/web.tar.gz",
        ] {
            assert_eq!(check_url(ok), Ok(()), "{ok}");
        }
        for (bad, says) in [
            ("http://h/p.zip", "must end in .tar.gz or .tgz"),
            ("http://h/p.tar.gz.sig", "must end in"),
            ("http://h/p?x=.tar.gz", "must end in"),
            ("ftp://h/p.tar.gz", "scheme \"ftp\""),
            ("HTTP://h/p.tar.gz", "use http, https or file"),
            ("http://u:pw@h/p.tar.gz", "must not carry credentials"),
            ("file://relative/p.tar.gz", "file:///absolute"),
            ("http:///p.tar.gz", "names no host"),
            ("http://h/a b.tar.gz", "whitespace"),
            ("p.tar.gz", "is not a URL"),
        ] {
            let e = check_url(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn sha256() {
        let h = "AB".repeat(32);
        assert_eq!(parse_sha256(&h).unwrap(), "ab".repeat(32));
        assert!(parse_sha256("abc").is_err());
        assert!(parse_sha256(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn credentials() {
        let s = |v: &str| Secret::new(v.to_string());
        let mut p = OsParams::default();
        p.secret.insert(USER_PARAM.into(), s("u"));
        assert!(check_credential_params(&p).unwrap_err().contains("without"));
        p.secret.insert(PASSWORD_PARAM.into(), s("pw"));
        assert_eq!(check_credential_params(&p), Ok(()));
        p.secret.insert(TOKEN_PARAM.into(), s("t"));
        assert!(
            check_credential_params(&p)
                .unwrap_err()
                .contains("not both")
        );
        let mut p = OsParams::default();
        p.private.insert("Personalization_Token".into(), s("t"));
        let e = check_credential_params(&p).unwrap_err();
        assert!(e.contains("must be secret, not private"), "{e}");
        let mut p = OsParams::default();
        p.public.insert(PASSWORD_PARAM.into(), "pw".into());
        assert!(
            check_credential_params(&p)
                .unwrap_err()
                .contains("not public")
        );
    }
}
