//! The guest's SSH host keys: the public halves in `/etc/ssh`
//! (`ssh_host_*_key.pub`), which the agent publishes so that the host can
//! hand an operator known_hosts lines. A guest with none (an image without
//! openssh-server, or one that makes its keys at first boot, as cloud
//! images do) gets an ed25519 key made here, as OpenSSH would write it,
//! unless `generate_host_keys = false`. The private half is written 0600
//! and never leaves the guest.

use std::path::Path;

use cradle_model::agent::{HostKey, MAX_HOST_KEYS};

use super::apply::write_if_changed;

/// The public host keys under `dir`, in file-name order.
pub fn read(dir: &Path) -> Result<Vec<String>, String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", dir.display())),
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ssh_host_") && n.ends_with("_key.pub"))
        .collect();
    names.sort();
    let mut keys = Vec::new();
    for n in names.into_iter().take(MAX_HOST_KEYS) {
        let path = dir.join(&n);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let k = HostKey::parse(text.trim()).map_err(|e| format!("{}: {e}", path.display()))?;
        keys.push(format!("{} {}", k.kind, k.key));
    }
    Ok(keys)
}

/// Make an ed25519 host key pair in `dir` (as `ssh-keygen -A` would name
/// it).
pub fn generate(dir: &Path) -> Result<(), String> {
    use ssh_key::rand_core::OsRng;
    use ssh_key::{Algorithm, LineEnding, PrivateKey};
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    let key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519)
        .map_err(|e| format!("cannot make an ed25519 key: {e}"))?;
    let private = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| format!("cannot encode the host key: {e}"))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| format!("cannot encode the host key: {e}"))?;
    // The private half first: a public key without its private one would
    // be published for a key nobody holds.
    write_if_changed(
        &dir.join("ssh_host_ed25519_key"),
        private.as_bytes(),
        0o600,
        Some((0, 0)).filter(|_| is_root()),
    )?;
    write_if_changed(
        &dir.join("ssh_host_ed25519_key.pub"),
        format!("{public} root@cradle-agent\n").as_bytes(),
        0o644,
        Some((0, 0)).filter(|_| is_root()),
    )?;
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: getuid(2) takes nothing and cannot fail.
    unsafe { libc::getuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_is_read_back_and_openssh_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).unwrap().is_empty());
        assert!(read(&dir.path().join("none")).unwrap().is_empty());
        generate(dir.path()).unwrap();
        let keys = read(dir.path()).unwrap();
        assert_eq!(keys.len(), 1);
        assert!(
            keys[0].starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5"),
            "{}",
            keys[0]
        );
        let private = dir.path().join("ssh_host_ed25519_key");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&private).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // ssh-keygen derives the same public key from the private file.
        let out = std::process::Command::new("ssh-keygen")
            .args(["-y", "-f"])
            .arg(&private)
            .output()
            .expect("ssh-keygen (openssh-client) is installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), keys[0]);
    }

    #[test]
    fn a_bad_public_key_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ssh_host_dsa_key.pub"), "ssh-dss AAAA x\n").unwrap();
        let e = read(dir.path()).unwrap_err();
        assert!(
            e.contains("ssh_host_dsa_key.pub") && e.contains("not an SSH host key type"),
            "{e}"
        );
    }
}
