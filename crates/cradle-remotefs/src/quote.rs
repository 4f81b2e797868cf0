//! Quoting for the three readers a name can meet on its way: the remote
//! POSIX shell (ssh's command string), scp's SFTP glob (the source of a
//! download), rsync's filter patterns, and rsync's own split of `-e`.
//!
//! Hand-written because each is a few lines with an exact rule, and no crate
//! covers the glob and filter cases; `shell-escape`-style crates work on
//! `str`, and remote names need not be UTF-8.

/// One word for a POSIX shell: single-quoted, with each `'` written as
/// `'\''`. Every other byte, newlines and non-UTF-8 included, is literal
/// inside single quotes.
pub fn shell_word(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len() + 2);
    out.push(b'\'');
    for &c in b {
        if c == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(c);
        }
    }
    out.push(b'\'');
    out
}

/// A literal path for the glob(3) that scp's SFTP mode runs on a download's
/// source: `\`, `*`, `?` and `[` escaped with a backslash.
pub fn glob_literal(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    for &c in b {
        if matches!(c, b'\\' | b'*' | b'?' | b'[') {
            out.push(b'\\');
        }
        out.push(c);
    }
    out
}

/// An anchored rsync filter pattern matching exactly the path `components`
/// (relative to the transfer root), with `suffix` appended (`/` to match a
/// directory, `/***` for a directory and everything in it).
///
/// rsync treats a backslash as an escape only when the pattern holds a
/// wildcard (`*`, `?` or `[`); without one it matches literally. So the
/// names are escaped exactly when the finished pattern will be a wildcard
/// pattern.
pub fn filter_pattern<'a>(components: impl IntoIterator<Item = &'a [u8]>, suffix: &str) -> Vec<u8> {
    let comps: Vec<&[u8]> = components.into_iter().collect();
    let wild = suffix.contains(['*', '?', '['])
        || comps
            .iter()
            .any(|c| c.iter().any(|b| matches!(b, b'*' | b'?' | b'[')));
    let mut out = Vec::new();
    for c in comps {
        out.push(b'/');
        if wild {
            out.extend(glob_literal(c));
        } else {
            out.extend_from_slice(c);
        }
    }
    out.extend_from_slice(suffix.as_bytes());
    out
}

/// One word of rsync's `-e` command, which rsync splits itself on spaces:
/// single-quoted, with a `'` inside doubled (rsync's rule, not the shell's).
pub fn rsync_rsh_word(b: &[u8]) -> Vec<u8> {
    if !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_./=:@,+%".contains(c))
    {
        return b.to_vec();
    }
    let mut out = vec![b'\''];
    for &c in b {
        if c == b'\'' {
            out.push(b'\'');
        }
        out.push(c);
    }
    out.push(b'\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// The quoted word, read back by a real /bin/sh, is the original bytes.
    #[test]
    fn sh_reads_back_every_byte() {
        let nasty: &[&[u8]] = &[
            b"plain",
            b"it's",
            b"''",
            b"a b\tc\nd",
            b"$(id) `id` ${x} ;|&<>*?[a] ~ \\ \" !",
            b"-rf",
            b"\xff\xfe\x80",
        ];
        for n in nasty {
            let mut script = b"printf %s ".to_vec();
            script.extend(shell_word(n));
            let out = Command::new("/bin/sh")
                .arg("-c")
                .arg(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&script))
                .output()
                .unwrap();
            assert!(out.status.success());
            assert_eq!(out.stdout, *n, "{:?}", String::from_utf8_lossy(n));
        }
    }

    #[test]
    fn patterns() {
        assert_eq!(filter_pattern([b"a".as_slice(), b"b\\c"], "/"), b"/a/b\\c/");
        assert_eq!(
            filter_pattern([b"a".as_slice(), b"b\\c"], "/***"),
            b"/a/b\\\\c/***"
        );
        assert_eq!(filter_pattern([b"x*[y]".as_slice()], ""), b"/x\\*\\[y]");
        assert_eq!(rsync_rsh_word(b"/k/id_ed25519"), b"/k/id_ed25519");
        assert_eq!(rsync_rsh_word(b"/a b/it's"), b"'/a b/it''s'");
    }
}
